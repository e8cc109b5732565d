"""DALI multi-crop loader (NVIDIA DALI, https://docs.nvidia.com/deeplearning/dali/): each image is decoded
once (`device="mixed"`, nvJPEG, when a GPU is used; the CPU decoder with `device_id=None`) and all
2 global + L local crops are cut from that decode and resized in the DALI graph, which outputs uint8 HWC
crops and nothing else: 2 + 4 (2 + L) operators whatever the batch size (docs/loaders.md, "DALI").
The colour jitter, grayscale, blur, flip and normalisation then run in one fused kernel per resolution,
written into one channels-last tensor per resolution of the model's input dtype: through
pipelines.augment.augment_views (the Triton kernel on CUDA), or the fused numba kernel of
pipelines/cpu_augment.py on the CPU and with data.dali_augment=host (on a helper thread, also with a GPU).

Every random choice is that of `pipelines.reference.draw_crop_params` with the reference's generator
numpy.random.default_rng([seed, epoch, index]) -- the choices the reference loader makes for the same
sample -- computed for the whole batch at once by `draw_crop_vectors` (numpy's SeedSequence, PCG64 and
Generator methods as array operations, bit for bit; a sample off the common path is drawn one by one).
So DALI and the reference loader cut the same boxes, a batch does not depend on threads, and a resumed
run sees the same crops. Sample order is the trainer's StepSampler: one seeded global permutation per
epoch (no shuffle buffer), cut into global batches, rank r taking rows [r*b, (r+1)*b) (drop_last:
len // batch steps per epoch).

DALI runs its default asynchronous pipelined executor (prefetch_queue_depth=2): batches are fed through
external_source PREFETCH_DEPTH ahead of the one the trainer takes, the files read and the parameters
drawn on a helper thread one batch further ahead. An epoch iterator closed early (a stop signal, an
exception, a new epoch) collects what DALI still holds before it returns.

Deviations from the PIL reference (numerics only): bilinear resize with antialiasing differs from PIL's
by rounding; the colour operations are those of the fused kernels (docs/loaders.md); EXIF orientation
is ignored by both.

Unreadable files (not an image, truncated JPEG without its end marker) are detected on the host before
decoding, replaced by the next readable sample in training (left out in evaluation), counted in
`batch.failed` and named in a warning. Images over data.max_decode_pixels are downscaled on the host
before DALI sees them (EncodedReader), which bounds DALI's memory per decoded image.
"""
from __future__ import annotations

import functools
import io
import math
import re
import sys
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from pipelines.batch import MultiCropBatch, current_device_id
# the per-crop parameter vector: its ROI feeds the graph, the rest the augmentation kernels
from pipelines.crop_params import NUM_PARAMS, P_BLUR, P_FACTORS, P_FLIP, P_GRAY, P_JITTER, P_ORDER, P_ROI, P_SIGMA
from pipelines.images import ImageSource, scan_image_folder
from pipelines.sampling import EXIT_WAIT_S, StepSampler
from pipelines.reference import PROBE_STREAM, CropRecipe, crop_recipes, draw_crop_params, probe_crop_params
from wcl_fast.config import ConfigError, DataConfig

PREFETCH_DEPTH = 2  # batches in DALI's executor at once (its prefetch_queue_depth)


def _import_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise ConfigError("data.backend=dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                          "(or the wheel matching your CUDA); it also runs on the CPU") from None


class EncodedReader:
    """path -> (encoded bytes, width, height) of a file that looks decodable; raises otherwise: the header
    must parse and a JPEG must end with its EOI marker (a truncated JPEG decodes to garbage or fails in DALI).

    Memory bound: an image of more than `max_pixels` pixels (data.max_decode_pixels) is decoded on the host
    -- a JPEG with libjpeg's DCT scaling (PIL draft), so at most a quarter of its pixels at once when it is
    at least twice the cap in each direction -- resized to fit the cap (area filter) and handed to DALI
    re-encoded as JPEG (quality 95). DALI then decodes at most 3 * max_pixels bytes per image. The width and
    height returned are the original ones: every crop box is relative to the image, so it selects the same
    region. Each such image is named once in a warning and counted in `downscaled`."""

    def __init__(self, max_pixels: int = 0):
        self.max_pixels = max_pixels
        self.downscaled: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def __call__(self, path: str) -> tuple[np.ndarray, int, int]:
        with open(path, "rb") as handle:
            data = handle.read()
        return self.encoded(data, path)

    def encoded(self, data: bytes, path: str) -> tuple[np.ndarray, int, int]:
        """The same for bytes already read (a WebDataset shard's member); `path` names them in messages."""
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            kind = img.format
        if kind == "JPEG" and b"\xff\xd9" not in data[-4096:]:
            raise ValueError("truncated JPEG (no end-of-image marker)")
        if width < 1 or height < 1:
            raise ValueError(f"empty image ({width} x {height})")
        if self.max_pixels and width * height > self.max_pixels:
            data = self._downscale(path, data, width, height)
        return np.frombuffer(data, dtype=np.uint8), width, height

    def _downscale(self, path: str, data: bytes, width: int, height: int) -> bytes:
        from pipelines.images import load_rgb

        scale = math.sqrt(self.max_pixels / (width * height))
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        img = load_rgb(io.BytesIO(data), draft=size).resize(size, Image.Resampling.BOX)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=95)
        with self._lock:
            first = path not in self.downscaled
            self.downscaled[path] = size
            count = len(self.downscaled)
        if first and count <= 20:
            print(f"warning: '{path}' has {width * height / 1e6:.1f} M pixels ({width} x {height}), over "
                  f"data.max_decode_pixels={self.max_pixels}; decoded downscaled to {size[0]} x {size[1]} "
                  f"(image {count} over the cap)", file=sys.stderr, flush=True)
        return out.getvalue()


def read_encoded(path: str) -> tuple[np.ndarray, int, int]:
    """EncodedReader without a pixel cap."""
    return EncodedReader()(path)


def crop_param_vector(params, width: int, height: int) -> np.ndarray:
    top, left, h, w = params.box
    out = np.zeros(NUM_PARAMS, dtype=np.float32)
    out[P_ROI] = (top / height, left / width, (top + h) / height, (left + w) / width)
    if params.jitter is not None:
        out[P_JITTER] = 1.0
        out[P_FACTORS] = params.jitter
    else:
        out[P_FACTORS] = (1.0, 1.0, 1.0, 0.0)
    out[P_ORDER] = params.order
    out[P_GRAY] = float(params.gray)
    out[P_BLUR] = float(params.blur_sigma is not None)
    out[P_SIGMA] = params.blur_sigma if params.blur_sigma is not None else 1.0
    out[P_FLIP] = float(params.flip)
    return out



def sample_crop_vectors(seed: int, epoch: int, index: int, width: int, height: int,
                        recipes: list[CropRecipe] | None) -> np.ndarray:
    """[len(recipes), NUM_PARAMS] float32: the crop vectors of one sample, drawn one by one from
    default_rng([seed, epoch, index]) in crop order (recipes=None: the probe view, one vector). The definition
    that draw_crop_vectors computes for a whole batch."""
    if recipes is None:
        return crop_param_vector(probe_crop_params(seed, epoch, index, width, height), width, height)[None]
    rng = np.random.default_rng([seed, epoch, index])
    return np.stack([crop_param_vector(draw_crop_params(rng, width, height, recipe), width, height)
                     for recipe in recipes])


# numpy.random.default_rng(entropy) for every sample of a batch at once. numpy's generator is SeedSequence
# (O'Neill's seed_seq hashing with numpy's constants) -> PCG64 (a 128-bit LCG with the XSL-RR output,
# O'Neill 2014, "PCG: a family of simple fast space-efficient statistically good algorithms for random
# number generation") -> the Generator methods. Here each step is an array operation over the samples: the
# seeding hashes are 32-bit integer arithmetic, the k-th PCG64 state of every sample is a^k s + (1 + a + ...
# + a^(k-1)) inc (mod 2^128, in 32-bit limbs), and the draws the crop recipe makes (random, uniform,
# integers by Lemire's method, Lemire 2019, ACM TOMACS 29(1), permutation by masked rejection) read each
# sample's output stream through a per-sample cursor, with PCG64's buffered upper 32-bit half. A sample whose
# draws leave this path (a Lemire rejection, ten permutation rejections in a row: rarer than 1 in 10^6
# draws) is drawn again one by one, and the whole emulation is checked against numpy once per process
# (_batched_draws_agree), so the vectors are numpy's bit for bit.

_U32, _U64 = np.uint32, np.uint64
_LOW32 = _U64(0xFFFFFFFF)
_MASK64, _MASK128 = (1 << 64) - 1, (1 << 128) - 1
_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645  # PCG64's 128-bit LCG multiplier
_SEED_INIT_A, _SEED_MULT_A, _SEED_INIT_B, _SEED_MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_SEED_MIX_L, _SEED_MIX_R = 0xCA01F9DD, 0x4973F715


def _entropy_words(value: int) -> list[int]:
    """How SeedSequence reads a non-negative int: 32-bit words, least significant first ([0] for 0)."""
    words = [value & 0xFFFFFFFF]
    value >>= 32
    while value:
        words.append(value & 0xFFFFFFFF)
        value >>= 32
    return words


def _seed_sequence_words(entropy: np.ndarray) -> list[np.ndarray]:
    """uint32 entropy [n, E] -> the 4 uint64 arrays SeedSequence(row).generate_state(4, np.uint64) gives per row
    (pool of 4 words; the hash constants do not depend on the data, so they are Python ints)."""
    n, e = entropy.shape
    const = _SEED_INIT_A

    def hashmix(value):
        nonlocal const
        value = value ^ _U32(const)
        const = const * _SEED_MULT_A & 0xFFFFFFFF
        value = value * _U32(const)
        return value ^ (value >> _U32(16))

    def mix(x, y):
        value = x * _U32(_SEED_MIX_L) - y * _U32(_SEED_MIX_R)
        return value ^ (value >> _U32(16))

    pool = [hashmix(entropy[:, i] if i < e else np.zeros(n, _U32)) for i in range(4)]
    for src in range(4):
        for dst in range(4):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(4, e):
        for dst in range(4):
            pool[dst] = mix(pool[dst], hashmix(entropy[:, src]))
    const, half = _SEED_INIT_B, []
    for i in range(8):
        value = pool[i % 4] ^ _U32(const)
        const = const * _SEED_MULT_B & 0xFFFFFFFF
        value = value * _U32(const)
        half.append((value ^ (value >> _U32(16))).astype(_U64))
    return [half[2 * i] | (half[2 * i + 1] << _U64(32)) for i in range(4)]  # little-endian pairs


def _mul64(a, b):
    """Full product of uint64 arrays as (high, low) uint64 halves, through 32-bit limbs."""
    a0, a1, b0, b1 = a & _LOW32, a >> _U64(32), b & _LOW32, b >> _U64(32)
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    middle = (p00 >> _U64(32)) + (p01 & _LOW32) + (p10 & _LOW32)
    return p11 + (p01 >> _U64(32)) + (p10 >> _U64(32)) + (middle >> _U64(32)), (p00 & _LOW32) | (middle << _U64(32))


def _mul128(ah, al, bh, bl):
    high, low = _mul64(al, bl)
    return high + al * bh + ah * bl, low  # mod 2^128


def _add128(ah, al, bh, bl):
    low = al + bl
    return ah + bh + (low < al).astype(_U64), low


def _pcg64_seeded(entropy: np.ndarray):
    """(state, increment) of PCG64(SeedSequence(row)) per row, each a (high, low) pair of uint64 arrays:
    increment = 2 seq + 1; from state 0, one step, plus the initial state, one more step."""
    s_high, s_low, q_high, q_low = _seed_sequence_words(entropy)
    inc = ((q_high << _U64(1)) | (q_low >> _U64(63)), (q_low << _U64(1)) | _U64(1))
    mult = (np.full_like(s_high, _PCG_MULT >> 64), np.full_like(s_low, _PCG_MULT & _MASK64))
    state = _add128(*_mul128(*_add128(*inc, s_high, s_low), *mult), *inc)
    return state, inc


@functools.lru_cache(maxsize=16)
def _pcg64_jumps(start: int, count: int):
    """(a^k, 1 + a + ... + a^(k-1)) mod 2^128 for k = start + 1 .. start + count, as [1, count] uint64 rows
    (high, low, high, low): the LCG state k steps after s is a^k s + (1 + ... + a^(k-1)) inc."""
    power, total, rows = 1, 0, []
    for k in range(start + count):
        total = (total + power) & _MASK128
        power = power * _PCG_MULT & _MASK128
        if k >= start:
            rows.append((power >> 64, power & _MASK64, total >> 64, total & _MASK64))
    return tuple(np.array(column, dtype=_U64)[None] for column in zip(*rows))


def _pcg64_outputs(state, inc, start: int, count: int, block: int = 32) -> np.ndarray:
    """Outputs start .. start + count - 1 of each row's PCG64 stream, [n, count] uint64 (random_raw): the
    XSL-RR of the state after each step. Blocks of rows keep the temporaries in cache."""
    n = state[0].shape[0]
    out = np.empty((n, count), _U64)
    p_high, p_low, t_high, t_low = _pcg64_jumps(start, count)
    for r in range(0, n, block):
        rows = slice(r, r + block)
        high, low = _add128(*_mul128(p_high, p_low, state[0][rows, None], state[1][rows, None]),
                            *_mul128(t_high, t_low, inc[0][rows, None], inc[1][rows, None]))
        x = high ^ low
        rotate = high >> _U64(58)
        out[rows] = (x >> rotate) | (x << ((_U64(64) - rotate) & _U64(63)))
    return out


class _BatchGenerator:
    """numpy.random.default_rng(row) of every entropy row, read in blocks: `doubles` and `halves` look at the
    next outputs of each row's stream without taking them, `advance` and `take_halves` take a per-row count
    (so a draw that only some rows make costs no loop). Rows whose draws leave the emulated path are flagged in
    `diverged` (their values are then not numpy's)."""

    def __init__(self, entropy: np.ndarray, words: int):
        n = entropy.shape[0]
        self._state, self._inc = _pcg64_seeded(entropy)
        self._words = _pcg64_outputs(self._state, self._inc, 0, words)
        self._cursor = np.zeros(n, np.int64)  # each row's next unused output
        self._has_half = np.zeros(n, bool)  # a 32-bit draw keeps the upper half of its output for the next one
        self._half = np.zeros(n, _U64)
        self._rows = np.arange(n)
        self.diverged = np.zeros(n, bool)

    def _peek(self, count: int, rows=None) -> np.ndarray:
        """[rows, count] uint64: the next `count` outputs of each row (all rows, or those listed)."""
        rows = self._rows if rows is None else rows
        cursor = self._cursor[rows]
        have = self._words.shape[1]
        need = int(cursor.max()) + count if len(rows) else 0
        if need > have:  # a row drew more than expected (boxes tried again): more of every stream
            more = _pcg64_outputs(self._state, self._inc, have, max(need - have, 32))
            self._words = np.concatenate([self._words, more], axis=1)
            have = self._words.shape[1]
        return np.take(self._words, (rows * have + cursor)[:, None] + np.arange(count))

    def doubles(self, count: int, rows=None) -> np.ndarray:
        """Generator.random() of the next `count` outputs: the upper 53 bits times 2^-53 (not taken)."""
        return (self._peek(count, rows) >> _U64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)

    def advance(self, taken, rows=None) -> None:
        """Takes `taken` (per row) outputs of 64-bit draws."""
        if rows is None:
            self._cursor += taken
        else:
            self._cursor[rows] += taken

    def halves(self, count: int) -> np.ndarray:
        """[n, count] uint64: the next `count` 32-bit draws of every row (not taken): the kept upper half if
        there is one, then the lower and upper halves of the following outputs."""
        words = self._peek((count + 1) // 2)
        stream = np.empty((len(self._rows), 1 + 2 * words.shape[1]), _U64)
        stream[:, 0] = self._half
        stream[:, 1::2] = words & _LOW32
        stream[:, 2::2] = words >> _U64(32)
        start = self._rows * stream.shape[1] + (~self._has_half)  # past the kept half when there is none
        return np.take(stream, start[:, None] + np.arange(count))

    def take_halves(self, taken) -> None:
        """Takes `taken` (per row) 32-bit draws: the kept half first, then whole outputs; an odd count from
        the outputs keeps the upper half of the last."""
        moved = taken > 0
        from_words = taken - (self._has_half & moved)
        odd = from_words % 2 == 1
        have = self._words.shape[1]
        last = np.take(self._words, self._rows * have + np.minimum(self._cursor + from_words // 2, have - 1))
        self._half = np.where(moved & odd, last >> _U64(32), self._half)
        self._has_half = np.where(moved, odd, self._has_half)
        self._cursor += (from_words + 1) // 2

    def lemire(self, value, span, draw) -> np.ndarray:
        """Generator.integers(0, span + 1) from the 32-bit draw `value` where `draw` (Lemire's multiply-shift);
        a rejection (numpy then draws again) is flagged."""
        span = span.astype(_U64)
        excl = span + _U64(1)
        product = value * excl
        threshold = (_LOW32 - np.minimum(span, _LOW32)) % excl
        self.diverged |= draw & (((product & _LOW32) < threshold) | (span >= _LOW32))
        return np.where(draw, product >> _U64(32), _U64(0)).astype(np.int64)

    def permutation4(self, mask) -> np.ndarray:
        """Generator.permutation(4) where mask ([n, 4] int64; 0 1 2 3 elsewhere): Fisher-Yates from the last
        position, j uniform in [0, i] by rejection of 32-bit draws masked to the covering bits (3, 3, 1):
        only j for i = 2 rejects (a draw of 3), so 3 + rejections draws."""
        draws = self.halves(12)
        accepted = (draws[:, 1:11] & _U64(3)) != _U64(3)
        at = accepted.argmax(axis=1) + 1  # the draw that gives j for i = 2
        self.diverged |= mask & ~accepted.any(axis=1)
        self.take_halves(np.where(mask, at + 2, 0))
        j3, j1 = draws[:, 0] & _U64(3), draws[self._rows, at + 1] & _U64(1)
        j2 = np.minimum(draws[self._rows, at] & _U64(3), _U64(2))  # 3 only in a diverged row
        return np.where(mask[:, None], _shuffles()[j3, j2, j1], np.arange(4))


@functools.lru_cache(maxsize=1)
def _shuffles() -> np.ndarray:
    """[4, 3, 2, 4]: 0 1 2 3 after the swaps (3, j3), (2, j2), (1, j1) -- the permutation each draw gives."""
    table = np.empty((4, 3, 2, 4), np.int64)
    for j3, j2, j1 in np.ndindex(4, 3, 2):
        order = [0, 1, 2, 3]
        for i, j in ((3, j3), (2, j2), (1, j1)):
            order[i], order[j] = order[j], order[i]
        table[j3, j2, j1] = order
    return table


def _batch_boxes(gen: _BatchGenerator, width, height, scale, ratio):
    """pipelines.reference.random_resized_crop_box for every row: (top, left, h, w) int64 arrays. A try takes
    two outputs (area, log aspect); the first try that fits takes two 32-bit draws (top, left) unless the
    range is a single value."""
    n = len(width)
    area = (width * height).astype(np.float64)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    top, left, h, w = (np.zeros(n, np.int64) for _ in range(4))
    found = np.zeros(n, bool)
    pending = np.arange(n)
    for tries in (1, 9):  # every row's first try, then the other nine of the rows it missed
        if not len(pending):
            break
        u = gen.doubles(2 * tries, pending).reshape(len(pending), tries, 2)
        target = area[pending, None] * (scale[0] + (scale[1] - scale[0]) * u[:, :, 0])
        log_aspect = log_low + (log_high - log_low) * u[:, :, 1]
        # math.exp as the reference: numpy's exp differs from it in the last bit at times
        aspect = np.fromiter(map(math.exp, log_aspect.ravel().tolist()), np.float64, log_aspect.size)
        aspect = aspect.reshape(log_aspect.shape)
        new_w = np.rint(np.sqrt(target * aspect)).astype(np.int64)  # rint rounds half to even, as round()
        new_h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
        fits = (new_w > 0) & (new_w <= width[pending, None]) & (new_h > 0) & (new_h <= height[pending, None])
        hit, first = fits.any(axis=1), fits.argmax(axis=1)
        gen.advance(np.where(hit, 2 * (first + 1), 2 * tries), pending)
        rows = pending[hit]
        w[rows], h[rows], found[rows] = new_w[hit, first[hit]], new_h[hit, first[hit]], True
        pending = pending[~hit]
    span_top, span_left = np.where(found, height - h, 0), np.where(found, width - w, 0)
    draw_top, draw_left = span_top > 0, span_left > 0  # integers(0, 1) draws nothing
    draws = gen.halves(2)
    top = gen.lemire(draws[:, 0], span_top, draw_top)
    left = gen.lemire(np.where(draw_top, draws[:, 1], draws[:, 0]), span_left, draw_left)
    gen.take_halves(draw_top.astype(np.int64) + draw_left)
    if len(pending):  # ten misses: the whole image with its ratio clamped into `ratio`, centred
        width, height = width[pending], height[pending]
        in_ratio = width / height
        low, high = min(ratio), max(ratio)
        fall_w = np.where(in_ratio > high, np.rint(height * high).astype(np.int64), width)
        fall_h = np.where(in_ratio < low, np.rint(width / low).astype(np.int64), height)
        top[pending], left[pending] = (height - fall_h) // 2, (width - fall_w) // 2
        h[pending], w[pending] = np.maximum(fall_h, 1), np.maximum(fall_w, 1)
    return top, left, h, w


def _vectors_from_choices(out: np.ndarray, box, width, height, jitter=None, factors=None, order=None, gray=None,
                          sigma=None, blur=None, flip=None) -> None:
    """crop_param_vector for every row of out [n, NUM_PARAMS] (float64 values rounded to float32 once)."""
    top, left, h, w = box
    for column, value in zip(range(P_ROI.start, P_ROI.stop), (top / height, left / width, (top + h) / height,
                                                                (left + w) / width)):
        out[:, column] = value
    if jitter is None:
        out[:, P_FACTORS] = (1.0, 1.0, 1.0, 0.0)
        out[:, P_ORDER] = (0, 1, 2, 3)
        out[:, P_SIGMA] = 1.0
    else:
        out[:, P_JITTER] = jitter
        for column, (value, rest) in zip(range(P_FACTORS.start, P_FACTORS.stop), zip(factors, (1.0, 1.0, 1.0, 0.0))):
            out[:, column] = np.where(jitter, value, rest)
        out[:, P_ORDER] = order  # 0 1 2 3 where the jitter is off
        out[:, P_GRAY] = gray
        out[:, P_BLUR] = blur
        out[:, P_SIGMA] = np.where(blur, sigma, 1.0)
    out[:, P_FLIP] = flip


def draw_crop_vectors(seed: int, epoch: int, index, width, height, recipes: list[CropRecipe] | None) -> np.ndarray:
    """[len(recipes), n, NUM_PARAMS] float32: sample_crop_vectors of every sample index[i] of an image of
    width[i] x height[i] (recipes=None: the probe view), bit for bit, computed over the batch at once."""
    index, width, height = (np.asarray(v, dtype=np.int64).reshape(-1) for v in (index, width, height))
    if len(index) and min(seed, epoch, int(index.min())) >= 0 and int(index.max()) <= 0xFFFFFFFF \
            and _batched_draws_agree():
        return _batched_crop_vectors(seed, epoch, index, width, height, recipes)
    out = np.zeros((1 if recipes is None else len(recipes), len(index), NUM_PARAMS), np.float32)
    for i in range(len(index)):
        out[:, i] = sample_crop_vectors(seed, epoch, int(index[i]), int(width[i]), int(height[i]), recipes)
    return out


def _batched_crop_vectors(seed: int, epoch: int, index, width, height, recipes) -> np.ndarray:
    n, count = len(index), 1 if recipes is None else len(recipes)
    out = np.zeros((count, n, NUM_PARAMS), np.float32)
    words = _entropy_words(seed) + _entropy_words(epoch)
    tail = _entropy_words(PROBE_STREAM) if recipes is None else []
    entropy = np.empty((n, len(words) + 1 + len(tail)), _U32)  # [seed, epoch, index(, PROBE_STREAM)]
    entropy[:, :len(words)] = words
    entropy[:, len(words)] = index
    entropy[:, len(words) + 1:] = tail
    gen = _BatchGenerator(entropy, 8 if recipes is None else 16 * count + 8)  # about one sample's draws
    if recipes is None:  # probe_crop_params: a (0.08, 1) box, then a flip coin
        box = _batch_boxes(gen, width, height, (0.08, 1.0), (3 / 4, 4 / 3))
        flip = gen.doubles(1)[:, 0] < 0.5
        gen.advance(1)
        _vectors_from_choices(out[0], box, width, height, flip=flip)
    else:  # draw_crop_params, crop after crop, in its order of draws (uniform(lo, hi) = lo + (hi - lo) random())
        for c, recipe in enumerate(recipes):
            box = _batch_boxes(gen, width, height, recipe.scale, recipe.ratio)
            u = gen.doubles(5)  # the jitter coin, then the 4 factors if it came up
            jitter = u[:, 0] < recipe.jitter_p
            bounds = [(max(0.0, 1 - s), 1 + s) for s in recipe.jitter[:3]] + [(-recipe.jitter[3], recipe.jitter[3])]
            factors = [low + (high - low) * u[:, 1 + i] for i, (low, high) in enumerate(bounds)]
            gen.advance(1 + 4 * jitter)
            order = gen.permutation4(jitter)
            u = gen.doubles(4)  # grayscale coin, blur coin, sigma if blurred, flip coin
            gray, blur = u[:, 0] < recipe.gray_p, u[:, 1] < recipe.blur_p
            sigma = recipe.blur_sigma[0] + (recipe.blur_sigma[1] - recipe.blur_sigma[0]) * u[:, 2]
            flip = np.where(blur, u[:, 3], u[:, 2]) < recipe.flip_p
            gen.advance(3 + blur)
            _vectors_from_choices(out[c], box, width, height, jitter, factors, order, gray, sigma, blur, flip)
    for i in np.nonzero(gen.diverged)[0]:
        out[:, i] = sample_crop_vectors(seed, epoch, int(index[i]), int(width[i]), int(height[i]), recipes)
    return out


@functools.lru_cache(maxsize=None)
def _batched_draws_agree() -> bool:
    """Whether this numpy's generator draws what the batched emulation computes, checked once per process on
    48 samples of odd shapes (1 x 1, 2 x 10000, ...), three recipes, the probe view and a seed of two words.
    If not, one warning, and the draws are made one by one (slower, the same crops)."""
    sizes = np.array([(500, 375), (375, 500), (1, 1), (2, 10000), (10000, 2), (31, 17), (640, 480), (64, 4096)] * 6)
    index = np.arange(len(sizes), dtype=np.int64) * 7919 + 3
    recipes = [CropRecipe(224, (0.14, 1.0)), CropRecipe(96, (0.05, 0.14), jitter=(0.8, 0.8, 0.8, 0.2)),
               CropRecipe(32, (0.08, 1.0), jitter_p=1.0, gray_p=0.5, blur_p=1.0)]
    for seed, epoch, kind in ((0, 0, recipes), (2 ** 40 + 5, 3, recipes), (1, 2, None)):
        got = _batched_crop_vectors(seed, epoch, index, sizes[:, 0], sizes[:, 1], kind)
        want = np.stack([sample_crop_vectors(seed, epoch, int(i), int(w), int(h), kind)
                         for i, (w, h) in zip(index, sizes)], axis=1)
        if not np.array_equal(got, want):
            print(f"warning: numpy {np.__version__} draws differently from pipelines/dali.py's batched generator; "
                  f"DALI's crop parameters are drawn one sample at a time (the same crops, more host time)",
                  file=sys.stderr)
            return False
    return True


def build_pipeline(batch_size: int, sizes: list[int], num_threads: int, device_id: int | None, seed: int,
                   depth: int = PREFETCH_DEPTH):
    """The DALI graph: input 'jpegs' (encoded images) and, per crop slot c, 'roi{c}' (y0, x0, y1, x1 of the box
    relative to the image, one [4] float vector per sample); output c is uint8 [B, sizes[c], sizes[c], 3], the
    box resized (bilinear, antialiased). Operators: 2 + 4 per slot (its external source, the two halves of
    the ROI, the resize), whatever the batch size. The default executor: asynchronous and pipelined,
    prefetch_queue_depth=depth."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=depth)
    def multicrop():
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
        images = fn.decoders.image(jpegs, device="mixed" if device_id is not None else "cpu", output_type=types.RGB,
                                   adjust_orientation=False)
        outputs = []
        for c, size in enumerate(sizes):
            roi = fn.external_source(name=f"roi{c}", dtype=types.FLOAT, ndim=1)
            outputs.append(fn.resize(images, size=[size, size], roi_start=roi[0:2], roi_end=roi[2:4], roi_relative=True,
                                     interp_type=types.INTERP_LINEAR, antialias=True))
        return tuple(outputs)

    return multicrop()


def operator_count(pipe) -> int:
    """The operators of a built DALI pipeline's graph (external sources and argument slices included): the
    list DALI builds its graph from."""
    return len(pipe._ops)


@functools.lru_cache(maxsize=1)
def _small_jpeg() -> np.ndarray:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(out, format="JPEG")
    return np.frombuffer(out.getvalue(), dtype=np.uint8)


@functools.lru_cache(maxsize=1)
def _augment_views_keywords() -> frozenset:
    """Which of the keywords quantize and radius (DALI's semantics: the jitter floored, the blur window
    2 ceil(3 sigma) + 1), dtype and out (the output tensor) pipelines.augment.augment_views takes."""
    import inspect

    from pipelines.augment import augment_views

    return frozenset(inspect.signature(augment_views).parameters) & {"quantize", "radius", "dtype", "out"}


class _Prepared(NamedTuple):
    """One batch read and drawn on the host: what DALI is fed, and what the augmentation needs afterwards."""

    jpegs: list
    rois: list  # per crop slot: float32 [b, 4], contiguous
    params: np.ndarray  # [crops, b, NUM_PARAMS] float32
    index: list
    label: list
    failed: int


class DaliMultiCropLoader:
    """Same interface as pipelines.reference.MultiCropLoader: len() = steps per epoch,
    .epoch(e, start_step) -> iterator of MultiCropBatch for this rank, .num_samples; also .operator_count
    (the DALI graph's) and .close()."""

    def __init__(self, cfg: DataConfig, seed: int, rank: int, world: int, device_id: int | None = None,
                 linear: bool = False, subset: list[int] | None = None, batch_size: int | None = None,
                 augment: str | None = None, dtype: torch.dtype = torch.float32):
        """linear=True: the linear-probe / fine-tuning training view instead (one RandomResizedCrop
        (0.08, 1) + flip per image, drawn like pipelines.pil.LinearTrainDataset). subset: sample ids
        the sampler ranges over (fine-tuning label subsets). batch_size: global batch (default data.batch_size).
        augment: data.dali_augment (auto; host; graph, the former in-graph mode, now the same as auto).
        dtype: of the output crops (the model's input dtype)."""
        _import_dali()
        self.cfg, self.seed, self.linear = cfg, seed, linear
        self.reader = EncodedReader(cfg.max_decode_pixels)
        self.subset = subset
        batch_size = batch_size or cfg.batch_size
        self._open_source(batch_size, rank, world)
        self.local_batch = batch_size // world
        self.num_global = 1 if linear else 2
        self.num_crops = 1 if linear else 2 + cfg.local_crops
        self.sizes = [cfg.global_size] * self.num_global + [cfg.local_size] * (self.num_crops - self.num_global)
        self.device_id = device_id
        augment = augment or cfg.dali_augment
        if augment not in ("auto", "graph", "host"):
            raise ConfigError(f"data.dali_augment: {augment!r} is not one of 'auto', 'graph', 'host'")
        self.augment = "host" if augment == "host" else "auto"
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype: expected torch.float32, bfloat16 or float16, got {dtype}")
        self.dtype, self.depth, self.threads = dtype, PREFETCH_DEPTH, max(1, cfg.workers)
        self.pool = ThreadPoolExecutor(self.threads)  # file reads
        self.prefetch = ThreadPoolExecutor(1)  # reads and draws the batches ahead, in order
        self.finisher = ThreadPoolExecutor(1)  # CPU augmentation of one batch while the trainer uses the previous
        self.failed_total = 0
        self._stuck = False  # a helper thread did not finish within EXIT_WAIT_S when an epoch was abandoned
        self._active = None  # the epoch iterator in progress (a weak reference)
        self.pipe = None
        self._open_pipeline()
        self.operator_count = operator_count(self.pipe)

    def _open_source(self, batch_size: int, rank: int, world: int) -> None:
        """The samples and their order: an ImageFolder and StepSampler (pipelines/dali_shards.py: shards)."""
        self.samples, _ = scan_image_folder(self.cfg.train_dir, "data.train_dir")
        self.source = ImageSource(self.samples, decode=self.reader)
        count = len(self.subset) if self.subset is not None else len(self.samples)
        self.sampler = StepSampler(count, batch_size, rank, world, self.seed)

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def _open_pipeline(self) -> None:
        """Builds the graph and runs it `depth` times on an 8 x 8 JPEG: the pipelined executor's first run
        starts prefetch_queue_depth iterations, each taking one fed batch; afterwards every schedule_run
        runs exactly the batch fed before it."""
        self.pipe = None  # a broken pipeline is shut down when its last reference goes
        pipe = build_pipeline(self.local_batch, self.sizes, self.threads, self.device_id, self.seed, self.depth)
        pipe.build()
        roi = np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32)
        for _ in range(self.depth):
            pipe.feed_input("jpegs", [_small_jpeg()])
            for c in range(self.num_crops):
                pipe.feed_input(f"roi{c}", roi)
        pipe.schedule_run()
        for _ in range(self.depth):
            pipe.outputs()
        self.pipe, self._broken = pipe, False

    def _read(self, index: int):
        """(bytes, width, height, actual index, label, substitutions) with unreadable files skipped."""
        (data, width, height), actual, label, skipped = self.source.read(index)
        return data, width, height, actual, label, skipped

    def _prepare(self, keys: list[tuple[int, int]]) -> _Prepared:
        """Reads the files of one batch and draws the crop parameters of the requested samples (the boxes
        relative to the image actually read, which differs for a substituted unreadable file)."""
        epoch = keys[0][0]
        requested = [index if self.subset is None else self.subset[index] for _, index in keys]
        reads = list(self.pool.map(self._read, requested))
        params = self._draw(epoch, requested, [r[1] for r in reads], [r[2] for r in reads])
        rois = [np.ascontiguousarray(params[c][:, P_ROI]) for c in range(self.num_crops)]
        return _Prepared([r[0] for r in reads], rois, params, [r[3] for r in reads], [r[4] for r in reads],
                         sum(r[5] for r in reads))

    def _draw(self, epoch: int, index, width, height) -> np.ndarray:
        """[crops, b, NUM_PARAMS]: every crop's choices, those of pipelines.reference for (seed, epoch, index)."""
        if self.linear:
            return draw_crop_vectors(self.seed, epoch, index, width, height, None)
        global_recipe, local_recipe = crop_recipes(self.cfg, epoch)
        return draw_crop_vectors(self.seed, epoch, index, width, height,
                                 [global_recipe] * 2 + [local_recipe] * self.cfg.local_crops)

    def _schedule(self, prepared: _Prepared) -> None:
        try:
            self.pipe.feed_input("jpegs", prepared.jpegs)
            for c, roi in enumerate(prepared.rois):
                self.pipe.feed_input(f"roi{c}", roi)
            self.pipe.schedule_run()
        except Exception as exc:
            self._broken = True
            raise _dali_error(exc, prepared, self.samples) from exc

    def _outputs(self, prepared: _Prepared):
        """The DALI outputs of the oldest batch scheduled (on a GPU bound to the current stream: its buffers
        are released in that stream's order, after the copies below)."""
        stream = torch.cuda.current_stream(self.device_id) if self.device_id is not None else None
        try:
            return self.pipe.outputs(cuda_stream=stream)
        except Exception as exc:
            self._broken = True
            raise _dali_error(exc, prepared, self.samples) from exc

    def _crops(self, outputs) -> list:
        """DALI's uint8 crops per slot as [b, S, S, 3] arrays / tensors that do not depend on DALI's next runs:
        on the CPU views of DALI's buffers (which live while a view does); on a GPU one uint8 tensor per
        resolution that every slot is copied into (stream-ordered); host augmentation: host arrays."""
        if self.device_id is None:
            return [torch.from_numpy(_host_array(out)) for out in outputs]
        if self.augment == "host":
            return [_host_array(out.as_cpu()) for out in outputs]
        from nvidia.dali.plugin.pytorch import feed_ndarray

        stream = torch.cuda.current_stream(self.device_id)
        crops = []
        for start, stop in self._groups():
            size = self.sizes[start]
            staged = torch.empty((stop - start, len(outputs[start]), size, size, 3), dtype=torch.uint8,
                                 device=torch.device("cuda", self.device_id))
            for v in range(stop - start):
                out = outputs[start + v]
                if out.is_dense_tensor():
                    feed_ndarray(out.as_tensor(), staged[v], cuda_stream=stream)
                else:
                    for i in range(len(out)):
                        feed_ndarray(out[i], staged[v, i], cuda_stream=stream)
            crops.extend(staged.unbind(0))
        return crops

    def _groups(self):
        """(first slot, end) of each resolution present: the globals, then the locals."""
        return [(a, b) for a, b in ((0, self.num_global), (self.num_global, self.num_crops)) if b > a]

    def _finish(self, crops, prepared: _Prepared) -> MultiCropBatch:
        """The augmented batch: per resolution one [V*b, 3, S, S] channels-last tensor of self.dtype."""
        result = [None, None]
        for g, (start, stop) in enumerate(self._groups()):
            params = prepared.params[start:stop].reshape(-1, NUM_PARAMS)
            result[g] = self._augment(crops[start:stop], params)
        return MultiCropBatch(result[0], result[1], torch.tensor(prepared.index, dtype=torch.int64),
                              torch.tensor(prepared.label, dtype=torch.int64), prepared.failed)

    def _augment(self, views: list, params: np.ndarray) -> torch.Tensor:
        """The colour jitter, grayscale, blur, flip and normalisation of one resolution's crops with DALI's
        semantics (those of data.dali_augment=host: the jitter floored after brightness, contrast and
        saturation like PIL's uint8 enhancers, the blur window 2 ceil(3 sigma) + 1), through
        pipelines.augment.augment_views when it takes them (quantize=True, radius=0). Until it does, the CPU
        runs the fused kernel augment_views' CPU path runs, with them; CUDA runs augment_views as it is."""
        from pipelines.cpu_augment import augment_crops

        accepted = _augment_views_keywords()
        exact = {"quantize", "radius"} <= accepted
        if self.augment == "host" or (self.device_id is None and not exact):
            out = augment_crops(views, params, self.cfg.mean, self.cfg.std, quantize=True, radius=0, threads=self.threads)
            device = torch.device("cuda", self.device_id) if self.device_id is not None else out.device
            return out.to(device=device, dtype=self.dtype)
        from pipelines.augment import augment_views

        options = {"quantize": True, "radius": 0} if exact else {}
        if "dtype" in accepted:
            options["dtype"] = self.dtype
        if "out" in accepted:  # written in place: one tensor per resolution, no copy
            n, size = len(views) * views[0].shape[0], views[0].shape[1]
            options["out"] = torch.empty((n, size, size, 3), dtype=self.dtype, device=views[0].device).permute(0, 3, 1, 2)
        out = augment_views(views, None, self.cfg.mean, self.cfg.std, params=torch.from_numpy(params),
                            threads=self.threads, **options)
        return out if out.dtype == self.dtype else out.to(self.dtype)

    def epoch(self, epoch: int, start_step: int = 0):
        """The batches of `epoch` from step `start_step` on. One epoch iterator at a time: starting another
        ends an unfinished one (as closing it does)."""
        self.close_epoch()
        self.sampler.set_epoch(epoch, start_step)
        batches = self._batches(iter(self.sampler), len(self.sampler))
        self._active = weakref.ref(batches)
        return batches

    def close_epoch(self) -> None:
        """Ends the epoch iterator in progress, if any: its finally block collects DALI's pending batches."""
        active = self._active() if self._active is not None else None
        self._active = None
        if active is not None:
            active.close()

    def close(self) -> None:
        """Ends the epoch in progress and releases DALI's pipeline and the helper threads (without waiting for
        one that is blocked in a read: it ends with the process)."""
        self.close_epoch()
        self.pipe = None
        for pool in (self.prefetch, self.finisher, self.pool):
            pool.shutdown(wait=not self._stuck, cancel_futures=True)

    def _batches(self, steps, count: int):
        """The `count` batches of the step keys `steps` (an iterator). DALI holds `depth` batches fed ahead: after taking the outputs of batch s, batch s + depth is fed (its
        files read and its draws made on the prefetch thread meanwhile). On the CPU the augmentation of batch s
        runs on the finisher thread while the trainer has batch s - 1; on a GPU it is queued on the stream."""
        if not count:
            return
        if self._broken:
            self._open_pipeline()

        def prepare_next():  # on the prefetch thread, one at a time: the keys are taken in order there
            return self._prepare(next(steps))

        preparing = deque(self.prefetch.submit(prepare_next) for _ in range(min(count, self.depth + 1)))
        following = len(preparing)
        scheduled = deque()  # prepared batches in DALI, oldest first
        finishing = None
        on_host = self.device_id is None or self.augment == "host"
        try:
            while len(scheduled) < self.depth and preparing:
                scheduled.append(preparing.popleft().result())
                self._schedule(scheduled[-1])
            for _ in range(count):
                outputs = self._outputs(scheduled[0])
                prepared = scheduled.popleft()
                if preparing:  # keep DALI `depth` batches ahead
                    if following < count:
                        preparing.append(self.prefetch.submit(prepare_next))
                        following += 1
                    scheduled.append(preparing.popleft().result())
                    self._schedule(scheduled[-1])
                self.failed_total += prepared.failed
                crops = self._crops(outputs)
                del outputs
                if not on_host:
                    yield self._finish(crops, prepared)
                    continue
                previous, finishing = finishing, self.finisher.submit(self._finish, crops, prepared)
                if previous is not None:
                    yield previous.result()
            if finishing is not None:
                last, finishing = finishing, None
                yield last.result()
            next(steps, None)  # every key taken: a generator of keys runs to its end (the shards' read-ahead)
        finally:  # an abandoned epoch leaves no work on the helper threads and nothing in DALI
            running = [future for future in [*preparing, finishing] if future is not None and not future.cancel()]
            # bounded: on the way out of an exception or a second signal a helper may be blocked in a read that
            # never returns (wcl_fast.signals: the watchdog names it after data.read_timeout; the exit does not wait)
            if wait(running, timeout=EXIT_WAIT_S).not_done:
                self._stuck = True
            elif hasattr(steps, "close"):  # a generator of keys (the shards' sampler) abandoned: its reads end
                steps.close()
            for _ in scheduled:
                if not self._broken:
                    try:
                        self.pipe.outputs()
                    except Exception:
                        self._broken = True


def _host_array(tensor_list) -> np.ndarray:
    """A DALI CPU TensorList of equal shapes as one numpy array (a view of DALI's buffer when it is dense)."""
    if tensor_list.is_dense_tensor():
        return np.asarray(tensor_list.as_tensor())
    return tensor_list.as_array()


def _dali_error(exc: Exception, prepared: _Prepared, samples) -> RuntimeError:
    """One line: DALI's own reason (the line after its operator traceback) and the file it names, else the batch."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    after = lines.index("encountered:") + 1 if "encountered:" in lines else 0
    reason = next((line for line in lines[after:] if not line.startswith("Critical error")), type(exc).__name__)
    reason = reason.rstrip(" :")
    position = re.search(r"sample #(\d+)", reason)
    if position and int(position.group(1)) < len(prepared.index):
        index = prepared.index[int(position.group(1))]
        return RuntimeError(f"DALI failed on '{samples[index][0]}' (sample {index}): {reason}; "
                            f"remove or re-encode the file")
    return RuntimeError(f"DALI failed on a batch of {len(prepared.index)} images (first sample index "
                        f"{prepared.index[0]}): {reason}")


def _to_torch(tensor_list, device_id: int | None) -> torch.Tensor:
    if device_id is None:
        return torch.from_numpy(tensor_list.as_array())
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=torch.float32, device=torch.device("cuda", device_id))
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device_id))
    return out


def build_dali_loader(cfg: DataConfig, seed: int, rank: int, world: int,
                      dtype: torch.dtype = torch.float32) -> DaliMultiCropLoader:
    device_id = current_device_id()
    return DaliMultiCropLoader(cfg, seed, rank, world, device_id, dtype=dtype)


def build_eval_pipeline(batch_size: int, crop: int, mean, std, num_threads: int, device_id: int | None):
    """Evaluation transform in DALI: the region of the image that torchvision's Resize(short side) +
    CenterCrop(crop) keeps (computed on the host, relative to the image) resized straight to crop x crop,
    normalised; HWC float output. Resizing only the kept region bounds the work and memory per image
    by the crop size: resizing the whole image first would make a 2 x 10000 image 256 x 1280000 pixels."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0,
                  exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
    def evaluation():
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
        roi = fn.external_source(name="geometry", dtype=types.FLOAT, ndim=1)  # y0, x0, y1, x1 (relative)
        images = fn.decoders.image(jpegs, device="mixed" if device_id is not None else "cpu", output_type=types.RGB,
                                   adjust_orientation=False)
        images = fn.resize(images, size=[crop, crop], roi_start=roi[0:2], roi_end=roi[2:4], roi_relative=True,
                           interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, mean=[255.0 * m for m in mean],
                                        std=[255.0 * s for s in std], output_layout="HWC")

    return evaluation()


def eval_geometry(width: int, height: int, resize: int, crop: int) -> np.ndarray:
    """The region torchvision's Resize(resize) (short side; long side truncated) + CenterCrop(crop) (anchor
    rounded) keeps, relative to the image: (y0, x0, y1, x1). A crop larger than the resized image would be
    zero-padded by torchvision; here that side is stretched over the whole image instead."""
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_h, new_w = resize, int(resize * width / height)
    top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
    y0, y1 = (top / new_h, (top + crop) / new_h) if new_h >= crop else (0.0, 1.0)
    x0, x1 = (left / new_w, (left + crop) / new_w) if new_w >= crop else (0.0, 1.0)
    return np.array([y0, x0, y1, x1], dtype=np.float32)


class DaliEvalLoader:
    """Batches (MultiCropBatch, globals [n, 3, crop, crop] channels-last) of a contiguous, unpadded shard of
    an ImageFolder under the evaluation transform; the last batch may be smaller."""

    def __init__(self, cfg: DataConfig, directory: str, key: str, batch_size: int, rank: int, world: int,
                 device_id: int | None = None):
        from pipelines.sampling import shard_range

        _import_dali()
        self.cfg, self.batch_size, self.device_id = cfg, batch_size, device_id
        from pipelines.datasets import load_split

        self.samples, self.classes, _ = load_split(cfg, directory, key)  # class folders, or a flat val folder
        self.indices = list(shard_range(len(self.samples), rank, world))
        self.pipe = build_eval_pipeline(batch_size, cfg.eval_crop, cfg.mean, cfg.std, max(1, cfg.workers), device_id)
        self.pipe.build()
        self.pool = ThreadPoolExecutor(max(1, cfg.workers))
        self.reader = EncodedReader(cfg.max_decode_pixels)
        self.source = ImageSource(self.samples, decode=self.reader)

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def _read_or_none(self, index: int):
        """(bytes, width, height, index, label), or None for an unreadable file."""
        read = self.source.read_or_none(index)
        return None if read is None else (*read[0], index, read[1])

    def __iter__(self):
        """An unreadable image is left out and counted in batch.failed (never replaced by another one)."""
        for start in range(0, len(self.indices), self.batch_size):
            chunk = self.indices[start:start + self.batch_size]
            reads = [r for r in self.pool.map(self._read_or_none, chunk) if r is not None]
            failed = len(chunk) - len(reads)
            if not reads:
                yield MultiCropBatch(torch.zeros(0, 3, self.cfg.eval_crop, self.cfg.eval_crop), None,
                                     torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), failed)
                continue
            self.pipe.feed_input("jpegs", [r[0] for r in reads])
            self.pipe.feed_input("geometry", [eval_geometry(r[1], r[2], self.cfg.eval_resize, self.cfg.eval_crop) for r in reads])
            (out,) = self.pipe.run()
            images = _to_torch(out, self.device_id).permute(0, 3, 1, 2)
            yield MultiCropBatch(images, None, torch.tensor([r[3] for r in reads], dtype=torch.int64),
                                 torch.tensor([r[4] for r in reads], dtype=torch.int64), failed)


def build_dali_eval_loader(cfg: DataConfig, directory: str, key: str, batch_size: int, rank: int, world: int):
    """(loader, total samples, number of classes), like pipelines.reference.build_eval_loader."""
    device_id = current_device_id()
    loader = DaliEvalLoader(cfg, directory, key, batch_size, rank, world, device_id)
    return loader, len(loader.samples), len(loader.classes)
