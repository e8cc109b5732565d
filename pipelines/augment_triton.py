"""Fused crop augmentation on the GPU (Triton): the FFCV path's colour jitter, grayscale, Gaussian blur,
flip and normalisation in two launches per call instead of hundreds of full-tensor kernels.

Input: V uint8 views [b, H, W, 3] (each crop HWC-contiguous; the views may be per-crop slices of FFCV's
[b, T] records, read in place) and the per-crop parameter vector of pipelines/crop_params.py. Output:
[V*b, 3, H, W] with channels-last strides in float32, bfloat16 or float16. The semantics are those of
the fused CPU kernel pipelines/cpu_augment.py (its docstring lists the formulas; values on the 0..255
scale, clamped after every colour operation, `quantize` floors after brightness / contrast /
saturation, `radius` > 0 a fixed window of 2 radius + 1 taps, 0 the per-crop 2 ceil(3 sigma) + 1).

Launches (docs/loaders.md, "Fused GPU augmentation"), at most two per call:
  1. _colour_kernel, one program per crop, looping over the crop in BLOCK-pixel tiles. Contrast needs
     the mean luma of the image after the jitter operations drawn before it. Those operations are
     pointwise, so the program computes that mean exactly in a first loop over the tiles, which reads
     the uint8 pixels, applies the operations drawn before contrast and sums the luma (float64 lanes,
     as the numba kernel sums in float64); a second loop recomputes them and applies the whole drawn
     chain with that mean. The price is a second read of the uint8 crop (3 bytes a pixel) when the
     jitter is on, no intermediate write and no second launch. Then grayscale; a crop without blur is
     flipped, normalised and written to the output here; a crop with blur is written as float32
     (channel-interleaved, 0..255) into a scratch buffer that holds the blurred crops only.
  2. _blur_kernel, one program per (crop, strip of BLUR_ROWS output rows), launched only when some crop
     is blurred (programs of the other crops return at once): the separable Gaussian with reflect-101
     borders. The program walks the strip's input rows and their 2 R halo rows once; for each it sums
     the 2 R + 1 horizontal taps (a [KP, 3 W] gather from the scratch row, source lanes from
     window_columns) and adds the result, times its vertical tap, into the accumulators of the output
     rows it belongs to: a ring of KP >= 2 R + 1 rows in registers, each started at zero and summed in
     tap order as the numba kernel's vertical pass. A row whose last tap has arrived is flipped,
     normalised, written, and its ring slot cleared. Taps (window_taps) are computed on the host in
     float32 like the numba kernel's, and zero outside a crop's own window, so one window of R_max
     serves per-crop radii.
Per-crop inputs (parameter vector, blur-scratch slot, taps) and the column table travel to the device in
one copy. Bytes written: the output once, plus 12 bytes a pixel of scratch for the blurred crops only
(half the crops at blur_p 0.5), tested and counted by python -m pipelines.bench_augment.

Every launch goes through `_launch`, which reports (kernel, grid, bytes written) to the callbacks in
LAUNCH_HOOKS (the bench) and, for tensors on the "meta" device, only reports: the launch plan of a
full-size batch can be counted on a machine without a GPU. On the CPU the kernels run under
TRITON_INTERPRET=1 (tests/conftest.py sets it before import); on CUDA they compile for the device.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from pipelines.crop_params import NUM_PARAMS, P_BLUR, P_FACTORS, P_FLIP, P_GRAY, P_JITTER, P_ORDER, P_SIGMA

COLOUR_BLOCK = 1024  # pixels per tile of _colour_kernel (smaller crops: the next power of two)
BLUR_ROWS = 32  # output rows per _blur_kernel program

# Per-crop table handed to the kernels (one host-to-device copy): the parameter vector, the crop's slot in
# the blur scratch (-1: no blur), then its KP blur taps (window_taps).
_SLOT = tl.constexpr(NUM_PARAMS)
_TAPS = tl.constexpr(NUM_PARAMS + 1)
_JITTER = tl.constexpr(P_JITTER)
_FACTORS = tl.constexpr(P_FACTORS.start)
_ORDER = tl.constexpr(P_ORDER.start)
_GRAY = tl.constexpr(P_GRAY)
_BLUR = tl.constexpr(P_BLUR)
_FLIP = tl.constexpr(P_FLIP)

LAUNCH_HOOKS: list = []  # callables hook(record: dict) called at every launch (see _launch)


# tl.sum's own combine function: under TRITON_INTERPRET=1, tl.reduce with it is numpy's sum, while every call
# of a jit function (tl.sum is one) costs the interpreter milliseconds. Compiled, the two are the same reduction.
_sum_combine = tl.standard._sum_combine


@triton.jit
def _jitter(r, g, b, op0, op1, op2, op3, f0, f1, f2, f3, count, mean, QUANTIZE: tl.constexpr):
    """The first `count` jitter operations of the drawn order op0..op3 (0 brightness, 1 contrast towards
    `mean`, 2 saturation, 3 hue) with factors f0..f3, on float pixels 0..255 (the formulas of
    pipelines/cpu_augment.py, in one function: every jit call is slow under the interpreter)."""
    for s in tl.static_range(4):
        if s == 0:
            op = op0
            f = f0
        elif s == 1:
            op = op1
            f = f1
        elif s == 2:
            op = op2
            f = f2
        else:
            op = op3
            f = f3
        if s < count:
            if op < 3:
                if op < 2:  # brightness blends towards 0, contrast towards the mean luma
                    rest = (1.0 - f) * tl.where(op == 1, mean, 0.0)
                    r = f * r + rest
                    g = f * g + rest
                    b = f * b + rest
                else:  # saturation blends towards the pixel's luma (ITU-R 601-2)
                    keep = 1.0 - f
                    luma = 0.299 * r + 0.587 * g + 0.114 * b
                    r = f * r + keep * luma
                    g = f * g + keep * luma
                    b = f * b + keep * luma
                r = tl.minimum(tl.maximum(r, 0.0), 255.0)
                g = tl.minimum(tl.maximum(g, 0.0), 255.0)
                b = tl.minimum(tl.maximum(b, 0.0), 255.0)
                if QUANTIZE:
                    r = tl.floor(r)
                    g = tl.floor(g)
                    b = tl.floor(b)
            else:  # HSV hue rotation by f turns, branch-free sextant form (S and V unchanged)
                top = tl.maximum(tl.maximum(r, g), b)
                chroma = top - tl.minimum(tl.minimum(r, g), b)
                safe = tl.where(chroma > 0.0, chroma, 1.0)
                h = (r - g) / safe + 4.0
                h = tl.where(g == top, (b - r) / safe + 2.0, h)
                h = tl.where(r == top, (g - b) / safe, h)
                h = h + 6.0 * f
                h = h - 6.0 * tl.floor(h / 6.0)
                # channel n: V - C clamp(min(k, 4 - k), 0, 1) with k = (n + h) mod 6, n = 5, 3, 1
                k = 5.0 + h
                k = k - 6.0 * tl.floor(k / 6.0)
                wedge = tl.minimum(tl.maximum(tl.minimum(k, 4.0 - k), 0.0), 1.0)
                r = tl.minimum(tl.maximum(top - chroma * wedge, 0.0), 255.0)
                k = 3.0 + h
                k = k - 6.0 * tl.floor(k / 6.0)
                wedge = tl.minimum(tl.maximum(tl.minimum(k, 4.0 - k), 0.0), 1.0)
                g = tl.minimum(tl.maximum(top - chroma * wedge, 0.0), 255.0)
                k = 1.0 + h
                k = k - 6.0 * tl.floor(k / 6.0)
                wedge = tl.minimum(tl.maximum(tl.minimum(k, 4.0 - k), 0.0), 1.0)
                b = tl.minimum(tl.maximum(top - chroma * wedge, 0.0), 255.0)
    return r, g, b


@triton.jit
def _to_bfloat16(v):
    """float32 -> bfloat16 rounded to nearest even (finite values), spelled out on the bits: what the
    device conversion does, while TRITON_INTERPRET=1 truncates."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _colour_kernel(src_ptr, table_ptr, out_ptr, tmp_ptr, src_offset, view_stride, crop_stride, per_view, H, W,
                   scale0, scale1, scale2, shift0, shift1, shift2,
                   STRIDE: tl.constexpr, QUANTIZE: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    n64 = n.to(tl.int64)
    src = src_ptr + src_offset + (n64 // per_view) * view_stride + (n64 % per_view) * crop_stride
    prm = table_ptr + n * STRIDE
    jitter = tl.load(prm + _JITTER) > 0.5
    op0 = (tl.load(prm + _ORDER) + 0.5).to(tl.int32)
    op1 = (tl.load(prm + _ORDER + 1) + 0.5).to(tl.int32)
    op2 = (tl.load(prm + _ORDER + 2) + 0.5).to(tl.int32)
    op3 = (tl.load(prm + _ORDER + 3) + 0.5).to(tl.int32)
    f0 = tl.load(prm + _FACTORS + op0)
    f1 = tl.load(prm + _FACTORS + op1)
    f2 = tl.load(prm + _FACTORS + op2)
    f3 = tl.load(prm + _FACTORS + op3)
    # contrast's place in the order: the operations before it decide the mean luma it blends towards
    before = tl.where(op0 == 1, 0, tl.where(op1 == 1, 1, tl.where(op2 == 1, 2, 3)))
    gray = tl.load(prm + _GRAY) > 0.5
    blur = tl.load(prm + _BLUR) > 0.5
    flip = tl.load(prm + _FLIP) > 0.5
    slot = tl.load(prm + _SLOT).to(tl.int64)
    npx = H * W
    lanes = tl.arange(0, BLOCK)
    mean = tl.zeros([], dtype=tl.float32)
    if jitter:  # pass 1: mean luma of the crop after the operations before contrast
        total = tl.zeros([BLOCK], dtype=tl.float64)
        for start in range(0, npx, BLOCK):
            p = start + lanes
            ok = p < npx
            r = tl.load(src + 3 * p, mask=ok, other=0).to(tl.float32)
            g = tl.load(src + 3 * p + 1, mask=ok, other=0).to(tl.float32)
            b = tl.load(src + 3 * p + 2, mask=ok, other=0).to(tl.float32)
            r, g, b = _jitter(r, g, b, op0, op1, op2, op3, f0, f1, f2, f3, before, 0.0, QUANTIZE)
            total += tl.where(ok, (0.299 * r + 0.587 * g + 0.114 * b).to(tl.float64), 0.0)
        mean = (tl.reduce(total, 0, _sum_combine) / npx).to(tl.float32)
    out_crop = out_ptr + n64 * npx * 3
    tmp_crop = tmp_ptr + slot * npx * 3
    for start in range(0, npx, BLOCK):  # pass 2: the whole chain
        p = start + lanes
        ok = p < npx
        r = tl.load(src + 3 * p, mask=ok, other=0).to(tl.float32)
        g = tl.load(src + 3 * p + 1, mask=ok, other=0).to(tl.float32)
        b = tl.load(src + 3 * p + 2, mask=ok, other=0).to(tl.float32)
        if jitter:
            r, g, b = _jitter(r, g, b, op0, op1, op2, op3, f0, f1, f2, f3, 4, mean, QUANTIZE)
        if gray:
            luma = 0.299 * r + 0.587 * g + 0.114 * b
            r = luma
            g = luma
            b = luma
        if blur:  # float32, channel-interleaved, for _blur_kernel
            tl.store(tmp_crop + 3 * p, r, mask=ok)
            tl.store(tmp_crop + 3 * p + 1, g, mask=ok)
            tl.store(tmp_crop + 3 * p + 2, b, mask=ok)
        else:  # flip, normalise, interleave into the channels-last output
            y = p // W
            x = p - y * W
            q = 3 * (y * W + tl.where(flip, W - 1 - x, x))
            vr = r * scale0 - shift0
            vg = g * scale1 - shift1
            vb = b * scale2 - shift2
            if out_ptr.dtype.element_ty == tl.bfloat16:
                vr = _to_bfloat16(vr)
                vg = _to_bfloat16(vg)
                vb = _to_bfloat16(vb)
            tl.store(out_crop + q, vr.to(out_ptr.dtype.element_ty), mask=ok)
            tl.store(out_crop + q + 1, vg.to(out_ptr.dtype.element_ty), mask=ok)
            tl.store(out_crop + q + 2, vb.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _blur_kernel(tmp_ptr, table_ptr, out_ptr, H, W, rows, columns, scale0, scale1, scale2, shift0, shift1, shift2,
                 STRIDE: tl.constexpr, RMAX: tl.constexpr, KP: tl.constexpr, E: tl.constexpr):
    n = tl.program_id(0)
    prm = table_ptr + n * STRIDE
    if tl.load(prm + _BLUR) <= 0.5:
        return
    slot = tl.load(prm + _SLOT).to(tl.int64)
    flip = tl.load(prm + _FLIP) > 0.5
    taps = prm + _TAPS  # KP taps for the offsets -RMAX..RMAX (0 outside this crop's window and past 2 RMAX)
    ring = tl.arange(0, KP)
    k = tl.load(taps + ring)
    lanes = tl.arange(0, E)  # one image row, channel-interleaved: lane = 3 x + c
    ok = lanes < 3 * W
    tap_lanes = table_ptr + columns + ring[:, None] * E + lanes[None, :]  # window_columns: the taps' source lanes
    x = lanes // 3
    c = lanes - 3 * x
    scale = tl.where(c == 0, scale0, tl.where(c == 1, scale1, scale2))
    shift = tl.where(c == 0, shift0, tl.where(c == 1, shift1, shift2))
    lane_out = 3 * tl.where(flip, W - 1 - x, x) + c
    crop = tmp_ptr + slot * H * W * 3
    out_crop = out_ptr + n.to(tl.int64) * H * W * 3
    y0 = (tl.program_id(1) * rows).to(tl.int64)
    acc = tl.zeros([KP, E], dtype=tl.float32)
    zero = tl.zeros([], dtype=tl.int64)  # row arithmetic in int64 (the interpreter checks int32 for overflow)
    # input row q (image row y0 - RMAX + q, reflected) enters output row j = q - t with vertical tap t
    for step in range(0, tl.minimum(rows, H - y0) + 2 * RMAX):
        q = zero + step
        y_in = y0 - RMAX + q
        y_in = tl.where(y_in < 0, -y_in, y_in)  # reflect-101, clamped for crops shorter than the window
        y_in = tl.where(y_in >= H, 2 * (H - 1) - y_in, y_in)
        y_in = tl.minimum(tl.maximum(y_in, 0), H - 1)
        values = tl.load(crop + y_in * W * 3 + tl.load(tap_lanes).to(tl.int32),
                         mask=(ring[:, None] <= 2 * RMAX) & ok[None, :], other=0.0)
        h = tl.reduce(values * k[:, None], 0, _sum_combine)  # the row's horizontal blur
        acc += tl.load(taps + (q - ring + KP) % KP)[:, None] * h[None, :]  # slot i: tap t = (q - i) mod KP
        done = (ring == (q + KP - 2 * RMAX) % KP)[:, None]  # output row j = q - 2 RMAX has all its taps
        o = tl.reduce(tl.where(done, acc, 0.0), 0, _sum_combine)
        acc = tl.where(done, 0.0, acc)
        j = q - 2 * RMAX
        v = o * scale - shift
        if out_ptr.dtype.element_ty == tl.bfloat16:
            v = _to_bfloat16(v)
        tl.store(out_crop + (y0 + j) * W * 3 + lane_out, v.to(out_ptr.dtype.element_ty), mask=ok & (j >= 0))


def _launch(kernel, grid, args, writes: dict, **constants) -> None:
    """kernel[grid](*args, **constants), reported first to every hook in LAUNCH_HOOKS as
    {"kernel", "grid", "programs", "writes" ({buffer: bytes stored}), "bytes_written"}; not run when the
    tensors are on the "meta" device (counting only)."""
    record = {"kernel": kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, "grid": tuple(grid),
              "programs": math.prod(grid), "writes": dict(writes), "bytes_written": sum(writes.values())}
    for hook in LAUNCH_HOOKS:
        hook(record)
    if any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args):
        return
    kernel[grid](*args, **constants)


def _source(views: list[torch.Tensor]):
    """(base, offset, view stride, crop stride) in elements such that crop i of view v starts at
    base[offset + v * view stride + i * crop stride]: in place when the views are slices of one storage at
    evenly spaced offsets with the same crop stride (FFCV's records), else after one stacking copy."""
    first = views[0]
    height, width = first.shape[1:3]
    def in_place(v):
        return (v.untyped_storage()._cdata == first.untyped_storage()._cdata and v.stride(0) == first.stride(0)
                and v.stride()[1:] == (3 * width, 3, 1))
    offsets = [v.storage_offset() for v in views]
    steps = {b - a for a, b in zip(offsets, offsets[1:])}
    if all(in_place(v) for v in views) and len(steps) <= 1 and first.shape[0] > 0:
        base = first.as_strided((first.untyped_storage().nbytes(),), (1,), 0)
        return base, offsets[0], (steps.pop() if steps else 0), first.stride(0)
    stacked = torch.stack([v.contiguous() for v in views])
    return stacked.view(-1), 0, stacked.stride(0), stacked.stride(1)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def window_radius(params: torch.Tensor, radius: int) -> int:
    """The blur window's half-width R of a launch: `radius` when fixed (> 0; also without blurred crops, so
    that the kernels see one table layout), else the largest per-crop ceil(3 sigma) of the blurred crops
    (float32 arithmetic, as the numba kernel), 0 without any."""
    if radius > 0:
        return int(radius)
    blurred = params[:, P_BLUR] > 0.5
    if not bool(blurred.any()):
        return 0
    sigma = params[blurred, P_SIGMA].numpy().astype(np.float32)
    return int(np.ceil(np.float32(3.0) * sigma).max())


def window_taps(params: torch.Tensor, radius: int, rmax: int) -> torch.Tensor:
    """[n, KP] float32 (KP = next power of two >= 2 rmax + 1): crop i's Gaussian taps for the offsets
    -rmax..rmax, as the numba kernel computes them (exp(-(d / sigma)^2 / 2) for |d| <= its radius --
    `radius`, or ceil(3 sigma) when 0 -- divided by their sum, float32) and 0 elsewhere."""
    kp = triton.next_power_of_2(2 * rmax + 1)
    sigma = params[:, P_SIGMA].numpy().astype(np.float32)[:, None]
    sigma = np.where(params[:, P_BLUR].numpy()[:, None] > 0.5, sigma, np.float32(1.0))  # unused rows: any finite value
    rad = np.ceil(np.float32(3.0) * sigma).astype(np.int64) if radius <= 0 else np.full(sigma.shape, radius)
    d = np.arange(kp, dtype=np.int64)[None, :] - rmax
    ratio = d.astype(np.float32) / sigma
    taps = np.where((np.abs(d) <= rad) & (d <= rmax), np.exp(np.float32(-0.5) * ratio * ratio), np.float32(0.0))
    taps = (taps / taps.sum(axis=1, keepdims=True, dtype=np.float32)).astype(np.float32)
    return torch.from_numpy(taps)


def window_columns(width: int, rmax: int) -> torch.Tensor:
    """[KP, E] float32 (E = next power of two >= 3 width): for each horizontal tap t (offset t - rmax) and lane
    3 x + c of a channel-interleaved row, the source lane 3 reflect-101(x + t - rmax) + c (reflect as
    the numba kernel: clamped for rows shorter than the window); 0 for unused taps and lanes."""
    kp, lanes = triton.next_power_of_2(2 * rmax + 1), triton.next_power_of_2(3 * width)
    lane = np.arange(lanes)
    x, c = lane // 3, lane % 3
    q = x[None, :] + np.arange(kp)[:, None] - rmax
    q = np.where(q < 0, -q, q)
    q = np.where(q >= width, 2 * (width - 1) - q, q)
    q = np.clip(q, 0, width - 1)
    source = np.where((lane < 3 * width)[None, :] & (np.arange(kp) <= 2 * rmax)[:, None], 3 * q + c[None, :], 0)
    return torch.from_numpy(source.astype(np.float32))


def augment_crops_triton(views, params: torch.Tensor, mean, std, *, quantize: bool = False, radius: int = 6,
                         dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """views: V uint8 tensors [b, H, W, 3] on one device (CUDA, the CPU under TRITON_INTERPRET=1, or "meta":
    count the launches only), each crop HWC-contiguous; params: [V*b, NUM_PARAMS] float32 on the CPU
    (view-major; a device tensor is copied to the host first, one synchronisation). Returns `dtype`
    [V*b, 3, H, W] with channels-last strides on the views' device: the numba kernel's
    pipelines.cpu_augment.augment_crops(views, params, mean, std, quantize=..., radius=...). out: such a
    tensor (channels-last, on that device) to write instead; its dtype is the output's."""
    views = [torch.as_tensor(v) for v in views]
    first = views[0]
    if any(v.dtype != torch.uint8 or v.ndim != 4 or v.shape[3] != 3 or v.shape != first.shape or v.device != first.device
           for v in views):
        raise ValueError("crops: expected uint8 [b, H, W, 3] views of one shape on one device, got "
                         + ", ".join(f"{v.dtype} {list(v.shape)} {v.device}" for v in views))
    if out is not None:
        dtype = out.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype: expected torch.float32, bfloat16 or float16, got {dtype}")
    b, height, width = (int(s) for s in first.shape[:3])
    count = len(views) * b
    params = params.detach().to("cpu", torch.float32)
    if tuple(params.shape) != (count, NUM_PARAMS):
        raise ValueError(f"params: expected shape ({count}, {NUM_PARAMS}), got {tuple(params.shape)}")
    device = first.device
    if out is None:
        out = torch.empty(count, height, width, 3, dtype=dtype, device=device).permute(0, 3, 1, 2)
    elif (tuple(out.shape) != (count, 3, height, width) or out.device != device
          or not out.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"out: expected a channels-last [{count}, 3, {height}, {width}] tensor on {device}, got "
                         f"{list(out.shape)} with strides {out.stride()} on {out.device}")
    result, out = out, out.permute(0, 2, 3, 1)  # written as NHWC: the channels-last memory
    if count == 0:
        return result
    blurred = params[:, P_BLUR] > 0.5
    n_blur = int(blurred.sum())
    rmax = window_radius(params, radius)
    slot = torch.where(blurred, blurred.long().cumsum(0) - 1, -1).float()[:, None]
    crops = torch.cat([params, slot, window_taps(params, radius, rmax)], 1)
    stride = crops.shape[1]
    table = _to_device(torch.cat([crops.flatten(), window_columns(width, rmax).flatten()]), device)  # one copy
    tmp = torch.empty(max(n_blur, 1), height, width, 3, dtype=torch.float32, device=device)  # blurred crops only
    src, offset, view_stride, crop_stride = _source(views)
    inv_std = (1.0 / np.asarray(std, dtype=np.float64)).astype(np.float32)  # the numba kernel's constants
    scale = [float(v) for v in inv_std / np.float32(255.0)]
    shift = [float(v) for v in np.asarray(mean, dtype=np.float32) * inv_std]
    pixel = height * width * 3
    _launch(_colour_kernel, (count,),
            (src, table, out, tmp, offset, view_stride, crop_stride, b, height, width, *scale, *shift),
            {"output": (count - n_blur) * pixel * out.element_size(), "blur scratch": n_blur * pixel * 4},
            STRIDE=stride, QUANTIZE=bool(quantize), BLOCK=min(COLOUR_BLOCK, triton.next_power_of_2(height * width)),
            num_warps=4)
    if n_blur:
        lanes = triton.next_power_of_2(3 * width)
        _launch(_blur_kernel, (count, triton.cdiv(height, BLUR_ROWS)),
                (tmp, table, out, height, width, BLUR_ROWS, count * stride, *scale, *shift),
                {"output": n_blur * pixel * out.element_size()},
                STRIDE=stride, RMAX=rmax, KP=triton.next_power_of_2(2 * rmax + 1), E=lanes,
                num_warps=min(16, max(4, lanes // 64)))
    return result


def aot_report(arch: int = 90, dtype: torch.dtype = torch.float32, widths=(224, 96), radius: int = 6) -> list[dict]:
    """Compile both kernels for sm_<arch> with Triton's compiler and bundled ptxas, no GPU needed, as
    augment_crops_triton launches them for crops of each width; per kernel: registers per thread, stack
    and local bytes (register spills), shared memory. Must run without TRITON_INTERPRET=1."""
    import os
    import re
    import subprocess
    import tempfile

    import triton.backends.nvidia as nvidia
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointer = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    kp = triton.next_power_of_2(2 * radius + 1)
    stride = NUM_PARAMS + 1 + kp
    floats = {name: "fp32" for name in ("scale0", "scale1", "scale2", "shift0", "shift1", "shift2")}
    jobs = [("_colour_kernel", _colour_kernel, 4,
             {"src_ptr": "*u8", "table_ptr": "*fp32", "out_ptr": pointer, "tmp_ptr": "*fp32", "src_offset": "i32",
              "view_stride": "i32", "crop_stride": "i32", "per_view": "i32", "H": "i32", "W": "i32", **floats},
             {"STRIDE": stride, "QUANTIZE": False, "BLOCK": COLOUR_BLOCK})]
    for width in widths:
        lanes = triton.next_power_of_2(3 * width)
        jobs.append((f"_blur_kernel W={width}", _blur_kernel, min(16, max(4, lanes // 64)),
                     {"tmp_ptr": "*fp32", "table_ptr": "*fp32", "out_ptr": pointer, "H": "i32", "W": "i32", "rows": "i32",
                      "columns": "i32", **floats}, {"STRIDE": stride, "RMAX": radius, "KP": kp, "E": lanes}))
    rows = []
    for name, kernel, warps, signature, constants in jobs:
        signature = {**signature, **{key: "constexpr" for key in constants}}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
            handle.write(compiled.asm["cubin"])
        try:
            tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
            usage = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True, text=True,
                                   check=True).stdout
        finally:
            os.unlink(handle.name)
        fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
        rows.append({"kernel": name, "arch": arch, "dtype": str(dtype).replace("torch.", ""), "num_warps": warps,
                     "regs": int(fields["REG"]), "stack_bytes": int(fields["STACK"]), "local_bytes": int(fields["LOCAL"]),
                     "shared_bytes": int(compiled.metadata.shared)})
    return rows
