"""DALI multi-crop loader (NVIDIA DALI, https://docs.nvidia.com/deeplearning/dali/): each image is decoded
once (`device="mixed"`, nvJPEG, when a GPU is used; the CPU decoder with `device_id=None`) and all
2 global + L local crops are cut from that decode and augmented inside the DALI graph (on the GPU
when there is one): resize of the random crop box, ColorJitter (brightness, contrast, saturation,
hue, in the drawn order), grayscale, Gaussian blur, flip, normalisation, channels-last output.

Every random choice is drawn on the host by `pipelines.reference.draw_crop_params` from
numpy.random.default_rng([seed, epoch, index]) -- the same choices the reference loader makes for the
same sample -- and handed to the graph as per-sample arguments. So DALI and the reference loader cut
the same boxes, a batch does not depend on threads, and a resumed run sees the same crops. Sample
order is the trainer's StepSampler: one seeded global permutation per epoch (no shuffle buffer), cut
into global batches, rank r taking rows [r*b, (r+1)*b) (drop_last: len // batch steps per epoch).

data.dali_augment=host (the default without a GPU): the graph stops after the uint8 crop resize and
the same augmentations run in the fused CPU kernel of pipelines/cpu_augment.py (quantised like the
graph), on a helper thread while DALI works on the next batch.

Deviations from the PIL reference (numerics only): DALI's hue shift is a rotation in YIQ space (PIL
rotates H in HSV); bilinear resize with antialiasing and the Gaussian window (2*ceil(3 sigma)+1)
differ from PIL's kernels by rounding; EXIF orientation is ignored by both.

Unreadable files (not an image, truncated JPEG without its end marker) are detected on the host before
decoding, replaced by the next readable sample in training (left out in evaluation), counted in
`batch.failed` and named in a warning. Images over data.max_decode_pixels are downscaled on the host
before DALI sees them (EncodedReader), which bounds DALI's memory per decoded image.
"""
from __future__ import annotations

import io
import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from pipelines.batch import MultiCropBatch, current_device_id
# the per-crop parameter vector fed to the graph (or to the fused CPU kernel)
from pipelines.crop_params import NUM_PARAMS, P_BLUR, P_FACTORS, P_FLIP, P_GRAY, P_JITTER, P_ORDER, P_ROI, P_SIGMA
from pipelines.images import ImageSource, scan_image_folder
from pipelines.sampling import StepSampler
from pipelines.reference import crop_recipes, draw_crop_params, probe_crop_params
from wcl_fast.config import ConfigError, DataConfig

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's "L" conversion


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


def build_pipeline(batch_size: int, num_crops: int, sizes: list[int], mean, std, num_threads: int,
                   device_id: int | None, seed: int, augment: bool = True):
    """The DALI graph: inputs 'jpegs' and 'params{c}' (one per crop), outputs one [B,H,W,3] float per crop.
    augment=False: the graph stops after the resize of each crop box (uint8 [B,H,W,3] per crop)."""
    from nvidia.dali import fn, math as dmath, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  enable_conditionals=True, exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
    def multicrop():
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                   adjust_orientation=False)
        outputs = []
        for c in range(num_crops):
            p = fn.external_source(name=f"params{c}", dtype=types.FLOAT, ndim=1)
            if not augment:
                outputs.append(fn.resize(images, size=[sizes[c], sizes[c]], roi_start=p[0:2], roi_end=p[2:4],
                                         roi_relative=True, interp_type=types.INTERP_LINEAR, antialias=True))
                continue
            img = fn.resize(images, size=[sizes[c], sizes[c]], roi_start=p[0:2], roi_end=p[2:4], roi_relative=True,
                            interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)
            img = _color_jitter(img, p, fn, dmath, types, gpu)
            if p[P_GRAY] > 0.5:
                img = fn.hsv(img, saturation=0.0, dtype=types.FLOAT)
            if p[P_BLUR] > 0.5:
                img = fn.gaussian_blur(img, sigma=p[P_SIGMA])
            out = fn.crop_mirror_normalize(img, mirror=fn.cast(p[P_FLIP], dtype=types.INT32), dtype=types.FLOAT,
                                           mean=[255.0 * m for m in mean], std=[255.0 * s for s in std],
                                           output_layout="HWC")
            outputs.append(out)
        return tuple(outputs)

    return multicrop()


def _color_jitter(img, p, fn, dmath, types, gpu):
    """torchvision ColorJitter on float [0, 255] HWC images, operations in the drawn order; each step
    clamps to [0, 255] like PIL's uint8 enhancers (values are not rounded in between)."""
    for slot in range(4):
        op = p[P_ORDER.start + slot]
        if p[P_JITTER] > 0.5:
            if op < 0.5:  # brightness: blend with black
                factor = p[P_FACTORS.start]
                img = dmath.floor(dmath.clamp(img * (factor.gpu() if gpu else factor), 0.0, 255.0))
            elif op < 1.5:  # contrast: blend with the mean luma of the image
                factor = p[P_FACTORS.start + 1]
                channel_mean = fn.reductions.mean(img, axes=[0, 1])  # [3]
                luma = channel_mean[0] * LUMA[0] + channel_mean[1] * LUMA[1] + channel_mean[2] * LUMA[2]
                factor = factor.gpu() if gpu else factor
                img = dmath.floor(dmath.clamp(img * factor + luma * (1.0 - factor), 0.0, 255.0))
            elif op < 2.5:  # saturation: blend with the luma image (= scaling chroma at fixed Y)
                img = dmath.floor(dmath.clamp(fn.hsv(img, saturation=p[P_FACTORS.start + 2], dtype=types.FLOAT), 0.0, 255.0))
            else:  # hue: shift of H in HSV space by hue * 360 degrees (as PIL / torchvision)
                shift = p[P_FACTORS.start + 3]
                img = _hsv_hue_shift(img, shift.gpu() if gpu else shift, fn, dmath)
    return img


def _hsv_hue_shift(img, shift, fn, dmath):
    """Exact HSV hue rotation without branches. In sextant units h in [0, 6):
    h = ((g - b) / C) mod 6 if r is the max, (b - r) / C + 2 if g, (r - g) / C + 4 if b (C = max - min);
    h' = (h + 6 shift) mod 6; channel n (R: 5, G: 3, B: 1): V - C * clamp(min(k, 4 - k), 0, 1),
    k = (n + h') mod 6. S and V are unchanged; grey pixels (C = 0) stay grey."""
    r, g, b = img[:, :, 0], img[:, :, 1], img[:, :, 2]
    top = dmath.max(dmath.max(r, g), b)
    chroma = top - dmath.min(dmath.min(r, g), b)
    safe = chroma + (chroma == 0.0)  # avoids 0 / 0; those pixels have chroma 0 and come out grey
    is_r = r == top
    is_g = (g == top) * (1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    hue = is_r * ((g - b) / safe) + is_g * ((b - r) / safe + 2.0) + is_b * ((r - g) / safe + 4.0)
    hue = hue + 6.0 * shift
    hue = hue - 6.0 * dmath.floor(hue / 6.0)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = n + hue
        k = k - 6.0 * dmath.floor(k / 6.0)
        channels.append(top - chroma * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0))
    return fn.reshape(fn.stack(*channels, axis=2), layout="HWC")


class DaliMultiCropLoader:
    """Same interface as pipelines.reference.MultiCropLoader: len() = steps per epoch,
    .epoch(e, start_step) -> iterator of MultiCropBatch for this rank, .num_samples."""

    def __init__(self, cfg: DataConfig, seed: int, rank: int, world: int, device_id: int | None = None,
                 linear: bool = False, subset: list[int] | None = None, batch_size: int | None = None,
                 augment: str | None = None):
        """linear=True: the linear-probe / fine-tuning training view instead (one RandomResizedCrop
        (0.08, 1) + flip per image, drawn like pipelines.pil.LinearTrainDataset). subset: sample ids
        the sampler ranges over (fine-tuning label subsets). batch_size: global batch (default data.batch_size)."""
        _import_dali()
        self.cfg, self.seed, self.linear = cfg, seed, linear
        self.samples, _ = scan_image_folder(cfg.train_dir, "data.train_dir")
        self.reader = EncodedReader(cfg.max_decode_pixels)
        self.source = ImageSource(self.samples, decode=self.reader)
        self.subset = subset
        batch_size = batch_size or cfg.batch_size
        self.sampler = StepSampler(len(subset) if subset is not None else len(self.samples), batch_size, rank, world, seed)
        self.local_batch = batch_size // world
        self.num_global = 1 if linear else 2
        self.num_crops = 1 if linear else 2 + cfg.local_crops
        sizes = [cfg.global_size] * self.num_global + [cfg.local_size] * (self.num_crops - self.num_global)
        self.device_id = device_id
        augment = augment or cfg.dali_augment
        if augment == "auto":
            augment = "graph" if device_id is not None else "host"
        if augment not in ("graph", "host"):
            raise ConfigError(f"data.dali_augment: {augment!r} is not one of 'auto', 'graph', 'host'")
        self.augment = augment
        self.pipe = build_pipeline(self.local_batch, self.num_crops, sizes, cfg.mean, cfg.std,
                                   max(1, cfg.workers), device_id, seed, augment=augment == "graph")
        self.pipe.build()
        self.pool = ThreadPoolExecutor(max(1, cfg.workers))  # file reads
        self.prefetch = ThreadPoolExecutor(1)  # prepares the next batch (never waits on itself)
        self.finisher = ThreadPoolExecutor(1)  # host augmentation
        self.failed_total = 0

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def _read(self, index: int):
        """(bytes, width, height, actual index, label, substitutions) with unreadable files skipped."""
        (data, width, height), actual, label, skipped = self.source.read(index)
        return data, width, height, actual, label, skipped

    def _prepare(self, keys: list[tuple[int, int]]):
        epoch = keys[0][0]
        if self.subset is not None:
            keys = [(e, self.subset[position]) for e, position in keys]
        global_recipe, local_recipe = crop_recipes(self.cfg, epoch)
        recipes = [global_recipe] * 2 + [local_recipe] * self.cfg.local_crops
        reads = list(self.pool.map(self._read, [index for _, index in keys]))
        jpegs, params = [], [[] for _ in range(self.num_crops)]
        index, label, failed = [], [], 0
        for (data, width, height, actual, lab, subs), (_, requested) in zip(reads, keys):
            jpegs.append(data)
            if self.linear:
                params[0].append(crop_param_vector(probe_crop_params(self.seed, epoch, requested, width, height),
                                                   width, height))
            else:
                rng = np.random.default_rng([self.seed, epoch, requested])
                for c, recipe in enumerate(recipes):
                    params[c].append(crop_param_vector(draw_crop_params(rng, width, height, recipe), width, height))
            index.append(actual)
            label.append(lab)
            failed += subs
        return jpegs, params, index, label, failed

    def _run(self, prepared):
        """Runs the DALI graph on a prepared batch; returns a function that finishes the MultiCropBatch
        (host augmentation: called on another thread while DALI runs the next batch)."""
        jpegs, params, index, label, failed = prepared
        self.pipe.feed_input("jpegs", jpegs)
        for c in range(self.num_crops):
            self.pipe.feed_input(f"params{c}", params[c])
        try:
            outputs = self.pipe.run()
        except Exception as exc:
            raise RuntimeError(f"DALI failed on a batch of {len(jpegs)} images (first sample index {index[0]}): "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        self.failed_total += failed

        def batch(globals_, locals_):
            return MultiCropBatch(globals_, locals_, torch.tensor(index, dtype=torch.int64),
                                  torch.tensor(label, dtype=torch.int64), failed)

        if self.augment == "host":  # DALI's uint8 crops -> the fused CPU kernel (as_array copies them out of
            # DALI's buffers, so the next run cannot overwrite them)
            crops = [(out.as_cpu() if self.device_id is not None else out).as_array() for out in outputs]
            return lambda: batch(*self._host_augment(crops, params))
        crops = [_to_torch(out, self.device_id) for out in outputs]  # [b, H, W, 3] each
        globals_ = torch.cat(crops[:self.num_global]).permute(0, 3, 1, 2)  # view-major, channels-last strides
        locals_ = (torch.cat(crops[self.num_global:]).permute(0, 3, 1, 2)
                   if self.num_crops > self.num_global else None)
        return lambda: batch(globals_, locals_)

    def _host_augment(self, crops: list[np.ndarray], params):
        """The graph's colour / grayscale / blur (window 2 ceil(3 sigma) + 1) / flip / normalisation, with
        the jitter floored after brightness, contrast and saturation, on DALI's uint8 crops."""
        from pipelines.cpu_augment import augment_crops

        groups = [range(self.num_global), range(self.num_global, self.num_crops)]
        result = []
        for group in groups:
            if not len(group):
                result.append(None)
                continue
            p = np.concatenate([np.stack(params[c]) for c in group])
            out = augment_crops([crops[c] for c in group], p, self.cfg.mean, self.cfg.std, quantize=True, radius=0,
                                threads=max(1, self.cfg.workers))
            result.append(out.to(torch.device("cuda", self.device_id)) if self.device_id is not None else out)
        return result[0], result[1]

    def epoch(self, epoch: int, start_step: int = 0):
        self.sampler.set_epoch(epoch, start_step)
        steps = list(iter(self.sampler))
        if not steps:
            return
        pending = self.prefetch.submit(self._prepare, steps[0])
        finishing = None  # host augmentation of the previous batch, overlapping DALI's work on this one
        try:
            for s in range(len(steps)):
                prepared = pending.result()
                if s + 1 < len(steps):  # read and draw the next batch while DALI works on this one
                    pending = self.prefetch.submit(self._prepare, steps[s + 1])
                finish = self._run(prepared)
                if self.augment != "host":
                    yield finish()
                    continue
                previous, finishing = finishing, self.finisher.submit(finish)
                if previous is not None:
                    yield previous.result()
            if finishing is not None:
                yield finishing.result()
                finishing = None
        finally:  # an abandoned epoch leaves no work running on the helper threads
            for future in (pending, finishing):
                if future is not None and not future.cancel():
                    future.exception()


def _to_torch(tensor_list, device_id: int | None) -> torch.Tensor:
    if device_id is None:
        return torch.from_numpy(tensor_list.as_array())
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=torch.float32, device=torch.device("cuda", device_id))
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device_id))
    return out


def build_dali_loader(cfg: DataConfig, seed: int, rank: int, world: int) -> DaliMultiCropLoader:
    device_id = current_device_id()
    return DaliMultiCropLoader(cfg, seed, rank, world, device_id)


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
