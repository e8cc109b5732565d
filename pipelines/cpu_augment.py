"""Fused per-crop augmentation on the CPU: one numba-compiled function (nogil, run on a thread pool) that
takes uint8 crops [b, S, S, 3] and a per-crop parameter vector and writes normalised float32 NHWC output
(the memory of a channels-last [b, 3, S, S] tensor).

Why: on a GPU the batched tensor ops of pipelines/augment.py (FFCV) and the DALI graph are cheap, but
on the CPU they make one full pass over memory per elementary operation (the HSV hue rotation alone is
about 30), which made the CPU loaders slower than the PIL reference. Here every crop is visited at most
four times: (1) the jitter operations before contrast (plus the luma sum contrast needs), (2) the rest of
the jitter, grayscale, and -- without blur -- flip and normalisation straight into the output, (3)/(4)
the separable Gaussian blur, the second pass writing the flipped, normalised output.

Semantics (per crop, in the drawn order; values kept on the 0..255 scale, clamped after every colour
operation, exactly the formulas of pipelines/augment.py, which are tested against torchvision):
  brightness  x <- clamp(f x)
  contrast    x <- clamp(f x + (1 - f) mean(luma(x)))          luma = ITU-R 601-2 (0.299, 0.587, 0.114)
  saturation  x <- clamp(f x + (1 - f) luma(x))
  hue         HSV hue rotation by shift turns (branch-free sextant form, S and V unchanged)
  grayscale   x <- luma(x) on all three channels
  blur        separable Gaussian, taps exp(-t^2 / (2 sigma^2)) normalised, t in [-R, R], reflect-101 border
  flip, then (x / 255 - mean) / std.
`quantize=True` floors after brightness, contrast and saturation, the DALI graph's emulation of PIL's
uint8 enhancers (pipelines/dali.py); `radius=0` uses R = ceil(3 sigma) per crop as DALI's gaussian_blur,
radius=6 the fixed 13-tap window of pipelines/augment.py.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pipelines.crop_params import (NUM_PARAMS, P_BLUR, P_FACTORS, P_FLIP, P_GRAY, P_JITTER,  # noqa: F401
                                  P_ORDER, P_ROI, P_SIGMA)

_KERNEL = None
_POOLS: dict[int, ThreadPoolExecutor] = {}


def available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _compile():
    import numba

    jit = numba.njit(nogil=True, cache=True)
    f32 = np.float32
    lr, lg, lb = f32(0.299), f32(0.587), f32(0.114)
    factors_at, order_at = P_FACTORS.start, P_ORDER.start  # the parameter layout above, as ints

    # Every pass below runs over planar float32 planes x[c, p] (p = y * w + x) so LLVM vectorises it.
    @jit
    def clamp255(v, quantize):
        v = min(max(v, f32(0.0)), f32(255.0))
        return np.floor(v) if quantize else v

    @jit
    def blend(x, n, factor, base, quantize):  # brightness (base 0) and contrast (base = mean luma)
        rest = (f32(1.0) - factor) * base
        for c in range(3):
            for p in range(n):
                x[c, p] = clamp255(factor * x[c, p] + rest, quantize)

    @jit
    def saturation(x, n, factor, quantize):
        keep = f32(1.0) - factor
        for p in range(n):
            luma = lr * x[0, p] + lg * x[1, p] + lb * x[2, p]
            x[0, p] = clamp255(factor * x[0, p] + keep * luma, quantize)
            x[1, p] = clamp255(factor * x[1, p] + keep * luma, quantize)
            x[2, p] = clamp255(factor * x[2, p] + keep * luma, quantize)

    @jit
    def hue_channel(k, top, chroma):  # k = n + h', channel = V - C clamp(min(k', 4 - k'), 0, 1), k' = k mod 6
        k = k - f32(6.0) * np.floor(k / f32(6.0))
        return min(max(top - chroma * min(max(min(k, f32(4.0) - k), f32(0.0)), f32(1.0)), f32(0.0)), f32(255.0))

    @jit
    def hue(x, n, shift):  # sextant h in [0, 6) from the max channel, rotated by 6 * shift
        turn = f32(6.0) * shift
        for p in range(n):
            r, g, b = x[0, p], x[1, p], x[2, p]
            top = max(max(r, g), b)
            chroma = top - min(min(r, g), b)
            safe = chroma if chroma > f32(0.0) else f32(1.0)
            h = (r - g) / safe + f32(4.0)
            h = (b - r) / safe + f32(2.0) if g == top else h
            h = (g - b) / safe if r == top else h
            h = h + turn
            h = h - f32(6.0) * np.floor(h / f32(6.0))
            x[0, p] = hue_channel(f32(5.0) + h, top, chroma)
            x[1, p] = hue_channel(f32(3.0) + h, top, chroma)
            x[2, p] = hue_channel(f32(1.0) + h, top, chroma)

    @numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
    def mean_luma(x, n):
        total = 0.0
        for p in range(n):
            total += np.float64(lr * x[0, p] + lg * x[1, p] + lb * x[2, p])
        return f32(total / n)

    @jit
    def reflect(q, length):  # reflect-101 border index (clamped for lines shorter than the window)
        q = -q if q < 0 else q
        q = 2 * (length - 1) - q if q >= length else q
        return min(max(q, 0), length - 1)

    # The blur loops index with plain loop variables over row slices: numba's negative-index wraparound
    # check on computed indices would otherwise keep LLVM from vectorising them.
    @jit
    def blur_rows(src, dst, taps, rad, h, w):
        """Horizontal taps along each row of a plane [h, w]; interior outputs as tap-major AXPYs."""
        inner = w - 2 * rad
        for y in range(h):
            if inner > 0:
                out = dst[y, rad:w - rad]
                out[:] = f32(0.0)
                for t in range(2 * rad + 1):
                    k = taps[t]
                    line = src[y, t:t + inner]
                    for i in range(inner):
                        out[i] += k * line[i]
            for i in range(w):
                if i < rad or i >= w - rad:
                    acc = f32(0.0)
                    for t in range(2 * rad + 1):
                        acc += taps[t] * src[y, reflect(i - rad + t, w)]
                    dst[y, i] = acc

    @jit
    def blur_columns(src, dst, taps, rad, h, w):
        """Vertical taps: each output row is a weighted sum of 2*rad+1 input rows."""
        for y in range(h):
            out = dst[y]
            out[:] = f32(0.0)
            for t in range(2 * rad + 1):
                k = taps[t]
                line = src[reflect(y - rad + t, h)]
                for i in range(w):
                    out[i] += k * line[i]

    @jit
    def augment_rows(src, size, dst, params, start, stop, quantize, radius, mean, inv_std):
        h = w = size
        n = h * w
        x = np.empty((3, n), np.float32)
        tmp = np.empty((3, n), np.float32)
        scale = inv_std / f32(255.0)
        shift = mean * inv_std
        for i in range(start, stop):
            p = params[i]
            for q in range(n):  # de-interleave HWC uint8 into planes
                x[0, q] = f32(src[i, 3 * q])
                x[1, q] = f32(src[i, 3 * q + 1])
                x[2, q] = f32(src[i, 3 * q + 2])
            if p[P_JITTER] > 0.5:
                for s in range(4):
                    op = int(p[order_at + s] + 0.5)
                    factor = p[factors_at + op]
                    if op == 0:
                        blend(x, n, factor, f32(0.0), quantize)
                    elif op == 1:
                        blend(x, n, factor, mean_luma(x, n), quantize)
                    elif op == 2:
                        saturation(x, n, factor, quantize)
                    else:
                        hue(x, n, factor)
            if p[P_GRAY] > 0.5:
                for q in range(n):
                    luma = lr * x[0, q] + lg * x[1, q] + lb * x[2, q]
                    x[0, q] = luma
                    x[1, q] = luma
                    x[2, q] = luma
            if p[P_BLUR] > 0.5:
                sigma = p[P_SIGMA]
                rad = radius if radius > 0 else int(np.ceil(f32(3.0) * sigma))
                taps = np.empty(2 * rad + 1, np.float32)
                for t in range(2 * rad + 1):
                    ratio = f32(t - rad) / sigma
                    taps[t] = np.exp(f32(-0.5) * ratio * ratio)
                taps /= taps.sum()
                for c in range(3):  # horizontal taps along the rows, then vertical along the columns
                    blur_rows(x[c].reshape((h, w)), tmp[c].reshape((h, w)), taps, rad, h, w)
                    blur_columns(tmp[c].reshape((h, w)), x[c].reshape((h, w)), taps, rad, h, w)
            flip = p[P_FLIP] > 0.5
            for yy in range(h):  # interleave, flip, normalise into the output
                for xx in range(w):
                    q = yy * w + xx
                    xo = w - 1 - xx if flip else xx
                    for c in range(3):
                        dst[i, yy, xo, c] = x[c, q] * scale[c] - shift[c]

    return augment_rows


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="wcl-augment")
    return _POOLS[threads]


def _rows(view: np.ndarray) -> np.ndarray:
    """A uint8 [b, S, S, 3] array whose crops are each contiguous (a C-contiguous batch, or FFCV's
    [b, T] records sliced per crop) as [b, S*S*3] rows without a copy; copied otherwise."""
    if view.dtype != np.uint8 or view.ndim != 4 or view.shape[3] != 3 or view.shape[1] != view.shape[2]:
        raise ValueError(f"crops: expected uint8 [b, S, S, 3], got {view.dtype} {list(view.shape)}")
    size = view.shape[1]
    if view.strides[1:] != (size * 3, 3, 1):
        view = np.ascontiguousarray(view)
    rows = np.lib.stride_tricks.as_strided(view, shape=(view.shape[0], size * size * 3), strides=(view.strides[0], 1))
    return rows


def augment_crops(views: list, params: np.ndarray, mean, std, *, quantize: bool = False, radius: int = 6,
                  threads: int | None = None) -> torch.Tensor:
    """views: V arrays / CPU tensors uint8 [b, S, S, 3] (the same S); params: float32 [V*b, NUM_PARAMS],
    view-major. Returns float32 [V*b, 3, S, S] with channels-last strides. The rows are split over
    `threads` threads (default: the CPUs this process may use)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _compile()
    arrays = [_rows(v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for v in views]
    b, size = arrays[0].shape[0], int(views[0].shape[1])
    params = np.ascontiguousarray(params, dtype=np.float32)
    if params.shape != (len(arrays) * b, NUM_PARAMS):
        raise ValueError(f"params: expected shape {(len(arrays) * b, NUM_PARAMS)}, got {params.shape}")
    out = torch.empty(len(arrays) * b, size, size, 3, dtype=torch.float32)
    out_np = out.numpy()
    mean_np = np.asarray(mean, dtype=np.float32)
    inv_std = (1.0 / np.asarray(std, dtype=np.float64)).astype(np.float32)
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    chunk = max(1, math.ceil(b / max(1, 2 * threads // len(arrays))))  # about 2 tasks per thread
    tasks = [(v, s, min(b, s + chunk)) for v in range(len(arrays)) for s in range(0, b, chunk)]

    def run(task):
        v, s, e = task
        _KERNEL(arrays[v], size, out_np[v * b:(v + 1) * b], params[v * b:(v + 1) * b], s, e, quantize, radius, mean_np, inv_std)

    if threads == 1 or len(tasks) == 1:
        for task in tasks:
            run(task)
    else:
        list(_pool(threads).map(run, tasks))
    return out.permute(0, 3, 1, 2)
