"""Fused crop augmentation on the GPU (Triton): the FFCV path's colour jitter, grayscale, Gaussian blur,
flip and normalisation in two launches per call instead of hundreds of full-tensor kernels.

Input: V uint8 views [b, H, W, 3] (each crop HWC-contiguous; the views may be per-crop slices of FFCV's
[b, T] records, read in place) and the per-crop parameter vector of pipelines/crop_params.py. Output:
[V*b, 3, H, W] with channels-last strides in float32, bfloat16 or float16. The semantics are those of
the fused CPU kernel pipelines/cpu_augment.py (its docstring lists the formulas; values on the 0..255
scale, clamped after every colour operation, `quantize` floors after brightness / contrast /
saturation, `radius` > 0 a fixed window of 2 radius + 1 taps, 0 the per-crop 2 ceil(3 sigma) + 1).

Launches (docs/loaders.md, "Fused GPU augmentation"):
  1. _colour_kernel, one program per crop, looping over the crop in BLOCK-pixel tiles. Contrast needs
     the mean luma of the image after the jitter operations drawn before it. Those operations are
     pointwise, so the program computes the mean exactly in a first loop over the tiles that reads the
     uint8 pixels, applies the operations before contrast and sums their luma (float64 lanes, as the
     numba kernel), then a second loop recomputes them and applies the whole chain with that mean:
     an extra read of the uint8 crop (3 bytes a pixel) and no intermediate write. Then grayscale; a
     crop without blur is flipped, normalised and written to the output here; a crop with blur is
     written as float32 planes [3, H, W] into a scratch buffer holding only the blurred crops.
  2. _blur_kernel, one program per (crop, strip of `rows` output rows), only when some crop is
     blurred (the others return at once): the separable Gaussian with reflect-101 borders. For each
     input row of the strip and its 2 R halo rows it sums the horizontal taps from the scratch planes,
     then adds that row, times the vertical tap of each output row it belongs to, into a ring of
     KP >= 2 R + 1 output-row accumulators held in registers; an output row is complete after its last
     input row, and is flipped, normalised and written. Taps are summed in tap order in both
     directions, as in the numba kernel.
Bytes written: the output once, plus 12 bytes a pixel of scratch for the blurred crops (half of them at
the default blur_p 0.5): tested against the tensors' sizes, counted by python -m pipelines.bench_augment.

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

TABLE_COLUMNS = NUM_PARAMS + 1  # the parameter vector, then the crop's slot in the blur scratch (-1: no blur)
COLOUR_BLOCK = 1024  # pixels per tile of _colour_kernel (smaller crops: the next power of two)
BLUR_ROWS = 32  # output rows per _blur_kernel program

_STRIDE = tl.constexpr(TABLE_COLUMNS)
_SLOT = tl.constexpr(NUM_PARAMS)
_JITTER = tl.constexpr(P_JITTER)
_FACTORS = tl.constexpr(P_FACTORS.start)
_ORDER = tl.constexpr(P_ORDER.start)
_GRAY = tl.constexpr(P_GRAY)
_BLUR = tl.constexpr(P_BLUR)
_SIGMA = tl.constexpr(P_SIGMA)
_FLIP = tl.constexpr(P_FLIP)

LAUNCH_HOOKS: list = []  # callables hook(record: dict) called at every launch (see _launch)


@triton.jit
def _clamp255(v, QUANTIZE: tl.constexpr):
    v = tl.minimum(tl.maximum(v, 0.0), 255.0)
    if QUANTIZE:
        v = tl.floor(v)
    return v


@triton.jit
def _luma(r, g, b):  # ITU-R 601-2
    return 0.299 * r + 0.587 * g + 0.114 * b


@triton.jit
def _hue_channel(k, top, chroma):  # k' = k mod 6; V - C clamp(min(k', 4 - k'), 0, 1), clamped
    k = k - 6.0 * tl.floor(k / 6.0)
    return tl.minimum(tl.maximum(top - chroma * tl.minimum(tl.maximum(tl.minimum(k, 4.0 - k), 0.0), 1.0), 0.0), 255.0)


@triton.jit
def _hue(r, g, b, shift):
    """HSV hue rotation by `shift` turns, branch-free sextant form (S and V unchanged)."""
    top = tl.maximum(tl.maximum(r, g), b)
    chroma = top - tl.minimum(tl.minimum(r, g), b)
    safe = tl.where(chroma > 0.0, chroma, 1.0)
    h = (r - g) / safe + 4.0
    h = tl.where(g == top, (b - r) / safe + 2.0, h)
    h = tl.where(r == top, (g - b) / safe, h)
    h = h + 6.0 * shift
    h = h - 6.0 * tl.floor(h / 6.0)
    return _hue_channel(5.0 + h, top, chroma), _hue_channel(3.0 + h, top, chroma), _hue_channel(1.0 + h, top, chroma)


@triton.jit
def _jitter_op(r, g, b, op, factor, mean, QUANTIZE: tl.constexpr):
    """Operation `op` (0 brightness, 1 contrast with the given mean luma, 2 saturation, 3 hue)."""
    if op == 0:
        r = _clamp255(factor * r, QUANTIZE)
        g = _clamp255(factor * g, QUANTIZE)
        b = _clamp255(factor * b, QUANTIZE)
    elif op == 1:
        rest = (1.0 - factor) * mean
        r = _clamp255(factor * r + rest, QUANTIZE)
        g = _clamp255(factor * g + rest, QUANTIZE)
        b = _clamp255(factor * b + rest, QUANTIZE)
    elif op == 2:
        keep = 1.0 - factor
        luma = _luma(r, g, b)
        r = _clamp255(factor * r + keep * luma, QUANTIZE)
        g = _clamp255(factor * g + keep * luma, QUANTIZE)
        b = _clamp255(factor * b + keep * luma, QUANTIZE)
    else:
        r, g, b = _hue(r, g, b, factor)
    return r, g, b


@triton.jit
def _reflect(q, length):  # reflect-101 border index, clamped for lines shorter than the window
    q = tl.where(q < 0, -q, q)
    q = tl.where(q >= length, 2 * (length - 1) - q, q)
    return tl.minimum(tl.maximum(q, 0), length - 1)


@triton.jit
def _colour_kernel(src_ptr, table_ptr, out_ptr, tmp_ptr, src_offset, view_stride, crop_stride, per_view, H, W,
                   scale0, scale1, scale2, shift0, shift1, shift2,
                   QUANTIZE: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    n64 = n.to(tl.int64)
    src = src_ptr + src_offset + (n64 // per_view) * view_stride + (n64 % per_view) * crop_stride
    prm = table_ptr + n * _STRIDE
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
            if before > 0:
                r, g, b = _jitter_op(r, g, b, op0, f0, 0.0, QUANTIZE)
            if before > 1:
                r, g, b = _jitter_op(r, g, b, op1, f1, 0.0, QUANTIZE)
            if before > 2:
                r, g, b = _jitter_op(r, g, b, op2, f2, 0.0, QUANTIZE)
            total += tl.where(ok, _luma(r, g, b).to(tl.float64), 0.0)
        mean = (tl.sum(total, axis=0) / npx).to(tl.float32)
    out_crop = out_ptr + n64 * npx * 3
    tmp_crop = tmp_ptr + slot * npx * 3
    for start in range(0, npx, BLOCK):  # pass 2: the whole chain
        p = start + lanes
        ok = p < npx
        r = tl.load(src + 3 * p, mask=ok, other=0).to(tl.float32)
        g = tl.load(src + 3 * p + 1, mask=ok, other=0).to(tl.float32)
        b = tl.load(src + 3 * p + 2, mask=ok, other=0).to(tl.float32)
        if jitter:
            r, g, b = _jitter_op(r, g, b, op0, f0, mean, QUANTIZE)
            r, g, b = _jitter_op(r, g, b, op1, f1, mean, QUANTIZE)
            r, g, b = _jitter_op(r, g, b, op2, f2, mean, QUANTIZE)
            r, g, b = _jitter_op(r, g, b, op3, f3, mean, QUANTIZE)
        if gray:
            luma = _luma(r, g, b)
            r = luma
            g = luma
            b = luma
        if blur:  # float32 planes for _blur_kernel
            tl.store(tmp_crop + p, r, mask=ok)
            tl.store(tmp_crop + npx + p, g, mask=ok)
            tl.store(tmp_crop + 2 * npx + p, b, mask=ok)
        else:  # flip, normalise, interleave into the channels-last output
            y = p // W
            x = p - y * W
            q = 3 * (y * W + tl.where(flip, W - 1 - x, x))
            tl.store(out_crop + q, (r * scale0 - shift0).to(out_ptr.dtype.element_ty), mask=ok)
            tl.store(out_crop + q + 1, (g * scale1 - shift1).to(out_ptr.dtype.element_ty), mask=ok)
            tl.store(out_crop + q + 2, (b * scale2 - shift2).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _blur_kernel(tmp_ptr, table_ptr, out_ptr, H, W, rows, radius, scale0, scale1, scale2, shift0, shift1, shift2,
                 RMAX: tl.constexpr, KP: tl.constexpr, BW: tl.constexpr):
    n = tl.program_id(0)
    prm = table_ptr + n * _STRIDE
    if tl.load(prm + _BLUR) <= 0.5:
        return
    slot = tl.load(prm + _SLOT).to(tl.int64)
    sigma = tl.load(prm + _SIGMA)
    flip = tl.load(prm + _FLIP) > 0.5
    rad = tl.where(radius > 0, radius, tl.ceil(3.0 * sigma).to(tl.int32))  # this crop's window: taps |d| <= rad
    npx = H * W
    y0 = tl.program_id(1) * rows
    ring = tl.arange(0, KP)
    d = ring - RMAX
    ratio = d.to(tl.float32) / sigma
    norm = tl.sum(tl.where((ring <= 2 * RMAX) & (tl.abs(d) <= rad), tl.exp(-0.5 * ratio * ratio), 0.0), axis=0)
    cols = tl.arange(0, BW)
    col_ok = cols < W
    planes = tmp_ptr + slot * npx * 3
    out_crop = out_ptr + n.to(tl.int64) * npx * 3
    xo = 3 * tl.where(flip, W - 1 - cols, cols)
    acc0 = tl.zeros([KP, BW], dtype=tl.float32)
    acc1 = tl.zeros([KP, BW], dtype=tl.float32)
    acc2 = tl.zeros([KP, BW], dtype=tl.float32)
    # input row q (padded numbering: image row y0 - RMAX + q, reflected) feeds output rows j = q - t, t <= 2 RMAX
    for q in range(0, tl.minimum(rows, H - y0) + 2 * RMAX):
        line = planes + _reflect(y0 - RMAX + q, H) * W
        h0 = tl.zeros([BW], dtype=tl.float32)
        h1 = tl.zeros([BW], dtype=tl.float32)
        h2 = tl.zeros([BW], dtype=tl.float32)
        for s in tl.static_range(2 * RMAX + 1):
            ratio_s = (s - RMAX) / sigma
            k = tl.where(abs(s - RMAX) <= rad, tl.exp(-0.5 * ratio_s * ratio_s), 0.0) / norm
            xi = _reflect(cols + (s - RMAX), W)
            h0 += k * tl.load(line + xi, mask=col_ok, other=0.0)
            h1 += k * tl.load(line + npx + xi, mask=col_ok, other=0.0)
            h2 += k * tl.load(line + 2 * npx + xi, mask=col_ok, other=0.0)
        t = (q - ring + KP) % KP  # the tap by which this row enters the accumulator in each ring slot
        dt = t - RMAX
        ratio_t = dt.to(tl.float32) / sigma
        wt = tl.where((t <= 2 * RMAX) & (tl.abs(dt) <= rad), tl.exp(-0.5 * ratio_t * ratio_t), 0.0) / norm
        acc0 += wt[:, None] * h0[None, :]
        acc1 += wt[:, None] * h1[None, :]
        acc2 += wt[:, None] * h2[None, :]
        j = q - 2 * RMAX  # output row y0 + j has all its taps now: write it and free its slot
        done = (ring == (q + KP - 2 * RMAX) % KP)[:, None]
        o0 = tl.sum(tl.where(done, acc0, 0.0), axis=0)
        o1 = tl.sum(tl.where(done, acc1, 0.0), axis=0)
        o2 = tl.sum(tl.where(done, acc2, 0.0), axis=0)
        acc0 = tl.where(done, 0.0, acc0)
        acc1 = tl.where(done, 0.0, acc1)
        acc2 = tl.where(done, 0.0, acc2)
        row = out_crop + (y0 + j).to(tl.int64) * W * 3 + xo
        ok = col_ok & (j >= 0)
        tl.store(row, (o0 * scale0 - shift0).to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(row + 1, (o1 * scale1 - shift1).to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(row + 2, (o2 * scale2 - shift2).to(out_ptr.dtype.element_ty), mask=ok)


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
    """The blur window's half-width R of a launch: `radius` when fixed (> 0), else the largest per-crop
    ceil(3 sigma) of the blurred crops (float32 arithmetic, as the numba kernel); 0 without blur."""
    blurred = params[:, P_BLUR] > 0.5
    if not bool(blurred.any()):
        return 0
    if radius > 0:
        return int(radius)
    sigma = params[blurred, P_SIGMA].numpy().astype(np.float32)
    return int(np.ceil(np.float32(3.0) * sigma).max())


def augment_crops_triton(views, params: torch.Tensor, mean, std, *, quantize: bool = False, radius: int = 6,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """views: V uint8 tensors [b, H, W, 3] on one device (CUDA, the CPU under TRITON_INTERPRET=1, or "meta":
    count the launches only), each crop HWC-contiguous; params: [V*b, NUM_PARAMS] float32 on the CPU
    (view-major; a device tensor is copied to the host first, one synchronisation). Returns `dtype`
    [V*b, 3, H, W] with channels-last strides on the views' device: the numba kernel's
    pipelines.cpu_augment.augment_crops(views, params, mean, std, quantize=..., radius=...)."""
    views = [torch.as_tensor(v) for v in views]
    first = views[0]
    if any(v.dtype != torch.uint8 or v.ndim != 4 or v.shape[3] != 3 or v.shape != first.shape or v.device != first.device
           for v in views):
        raise ValueError("crops: expected uint8 [b, H, W, 3] views of one shape on one device, got "
                         + ", ".join(f"{v.dtype} {list(v.shape)} {v.device}" for v in views))
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype: expected torch.float32, bfloat16 or float16, got {dtype}")
    b, height, width = (int(s) for s in first.shape[:3])
    count = len(views) * b
    params = params.detach().to("cpu", torch.float32)
    if tuple(params.shape) != (count, NUM_PARAMS):
        raise ValueError(f"params: expected shape ({count}, {NUM_PARAMS}), got {tuple(params.shape)}")
    device = first.device
    blurred = params[:, P_BLUR] > 0.5
    n_blur = int(blurred.sum())
    table = torch.cat([params, torch.where(blurred, blurred.long().cumsum(0) - 1, -1).float()[:, None]], 1)
    rmax = window_radius(params, radius)
    out = torch.empty(count, height, width, 3, dtype=dtype, device=device)
    if count == 0:
        return out.permute(0, 3, 1, 2)
    tmp = torch.empty(n_blur, 3, height, width, dtype=torch.float32, device=device)
    src, offset, view_stride, crop_stride = _source(views)
    table = _to_device(table.contiguous(), device)
    inv_std = (1.0 / np.asarray(std, dtype=np.float64)).astype(np.float32)  # the numba kernel's constants
    scale = [float(v) for v in inv_std / np.float32(255.0)]
    shift = [float(v) for v in np.asarray(mean, dtype=np.float32) * inv_std]
    pixel = height * width * 3
    block = min(COLOUR_BLOCK, triton.next_power_of_2(height * width))
    _launch(_colour_kernel, (count,),
            (src, table, out, tmp, offset, view_stride, crop_stride, b, height, width, *scale, *shift),
            {"output": (count - n_blur) * pixel * out.element_size(), "blur scratch": tmp.numel() * 4},
            QUANTIZE=bool(quantize), BLOCK=block, num_warps=4)
    if n_blur:
        bw = triton.next_power_of_2(width)
        _launch(_blur_kernel, (count, triton.cdiv(height, BLUR_ROWS)),
                (tmp, table, out, height, width, BLUR_ROWS, int(radius), *scale, *shift),
                {"output": n_blur * pixel * out.element_size()},
                RMAX=rmax, KP=triton.next_power_of_2(2 * rmax + 1), BW=bw, num_warps=8 if bw >= 256 else 4)
    return out.permute(0, 3, 1, 2)
