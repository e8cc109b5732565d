"""Reference multi-crop loader (torchvision / PIL): the executable specification of the augmentations.

Augmentations (docs/wcl.md §4; MoCo v2, Chen et al. 2020, arXiv 2003.04297; SimCLR, Chen et
al. 2020, arXiv 2002.05709), applied independently to every crop in this order:
    RandomResizedCrop(size, scale) -> ColorJitter (p=0.8) -> Grayscale (p=0.2)
    -> GaussianBlur (p=0.5, PIL radius = sigma ~ U[0.1, 2.0]) -> HorizontalFlip (p=0.5)
    -> ToTensor -> Normalize(mean, std)
Phase "mocov2" (epoch < aug_switch_epoch): scale (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1).
Phase "simclr" (epoch >= aug_switch_epoch): scale (0.08, 1), jitter (0.8, 0.8, 0.8, 0.2).
Multi-crop: global crops use scale (0.14, 1), local crops `data.local_scale` (default (0.05, 0.14)).

Every random choice of a sample is drawn from numpy.random.default_rng([seed, epoch, index]), so a
batch is the same whatever the number of workers or ranks, and a resumed run sees the same crops.
"""
from __future__ import annotations

import functools
import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, Sampler

from pipelines.batch import MultiCropBatch
from wcl_fast.config import ConfigError, DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_SUBSTITUTIONS = 16  # an unreadable image is replaced by the next readable one, at most this far away


@dataclass(frozen=True)
class CropRecipe:
    """The random augmentation of one crop (all probabilities per crop)."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5


def augmentation_phase(cfg: DataConfig, epoch: int) -> str:
    return "mocov2" if epoch < cfg.aug_switch_epoch else "simclr"


def crop_recipes(cfg: DataConfig, epoch: int) -> tuple[CropRecipe, CropRecipe]:
    """(global recipe, local recipe) for `epoch` (docs/wcl.md §4)."""
    simclr = augmentation_phase(cfg, epoch) == "simclr"
    jitter = (0.8, 0.8, 0.8, 0.2) if simclr else (0.4, 0.4, 0.4, 0.1)
    if cfg.global_scale is not None:
        global_scale = tuple(cfg.global_scale)
    elif cfg.local_crops > 0:
        global_scale = (0.14, 1.0)
    else:
        global_scale = (0.08, 1.0) if simclr else (0.2, 1.0)
    return (CropRecipe(cfg.global_size, global_scale, jitter=jitter, blur_p=cfg.blur_p, flip_p=cfg.flip_p),
            CropRecipe(cfg.local_size, tuple(cfg.local_scale), jitter=jitter, blur_p=cfg.blur_p, flip_p=cfg.flip_p))


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering `scale` of the area with aspect ratio in `ratio`.

    The Inception-style sampler used by torchvision's RandomResizedCrop: 10 tries of area ~ U(scale)
    and log-aspect ~ U(log ratio); otherwise a central crop with the ratio clamped to `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, max(h, 1), max(w, 1)


@dataclass(frozen=True)
class CropParams:
    """Every random choice of one augmented crop (drawn by `draw_crop_params`, applied by `apply_crop`
    here and by the DALI pipeline, so both backends make the same choices for the same sample)."""

    box: tuple[int, int, int, int]  # top, left, h, w in pixels of the decoded image
    jitter: tuple[float, float, float, float] | None  # brightness, contrast, saturation factors, hue shift
    order: tuple[int, int, int, int]  # order of the 4 jitter operations (0 b, 1 c, 2 s, 3 h)
    gray: bool
    blur_sigma: float | None  # PIL GaussianBlur radius (= standard deviation) or None
    flip: bool


def draw_crop_params(rng: np.random.Generator, width: int, height: int, recipe: CropRecipe) -> CropParams:
    """Draw one crop's choices in a fixed order: box, jitter coin (+ 4 factors ~ torchvision ColorJitter,
    U[max(0, 1-s), 1+s] and hue U[-h, h], + a random order), grayscale coin, blur coin (+ sigma), flip coin."""
    box = random_resized_crop_box(rng, width, height, recipe.scale, recipe.ratio)
    jitter, order = None, (0, 1, 2, 3)
    if rng.random() < recipe.jitter_p:
        b, c, s, h = recipe.jitter
        jitter = (rng.uniform(max(0.0, 1 - b), 1 + b), rng.uniform(max(0.0, 1 - c), 1 + c),
                  rng.uniform(max(0.0, 1 - s), 1 + s), rng.uniform(-h, h))
        order = tuple(int(op) for op in rng.permutation(4))
    gray = rng.random() < recipe.gray_p
    blur_sigma = rng.uniform(*recipe.blur_sigma) if rng.random() < recipe.blur_p else None
    flip = rng.random() < recipe.flip_p
    return CropParams(box, jitter, order, gray, blur_sigma, flip)


def apply_crop(img: Image.Image, params: CropParams, size: int) -> Image.Image:
    """RandomResizedCrop (bilinear) -> ColorJitter -> Grayscale -> GaussianBlur -> HorizontalFlip (PIL)."""
    top, left, h, w = params.box
    crop = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    gray = crop.mode == "L"  # a one-channel image (load_rgb_or_gray): saturation, hue, grayscale are identities
    if params.jitter is not None:
        for op in params.order:
            if op == 0:
                crop = TF.adjust_brightness(crop, params.jitter[0])
            elif op == 1:
                crop = TF.adjust_contrast(crop, params.jitter[1])
            elif op == 2 and not gray:
                crop = TF.adjust_saturation(crop, params.jitter[2])
            elif op == 3 and not gray:
                crop = TF.adjust_hue(crop, params.jitter[3])
    if params.gray and not gray:
        crop = TF.rgb_to_grayscale(crop, num_output_channels=3)
    if params.blur_sigma is not None:
        crop = crop.filter(ImageFilter.GaussianBlur(radius=params.blur_sigma))
    if params.flip:
        crop = TF.hflip(crop)
    return crop


def augment(img: Image.Image, recipe: CropRecipe, rng: np.random.Generator) -> Image.Image:
    """One augmented crop (PIL, RGB, recipe.size x recipe.size) of an RGB image."""
    return apply_crop(img, draw_crop_params(rng, img.width, img.height, recipe), recipe.size)


@functools.lru_cache(maxsize=16)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[3, 256] float32: channel c's (v / 255 - mean[c]) / std[c] for every byte v, computed by the very
    float32 operations of torchvision's to_tensor + normalize, so a lookup gives their values bit for bit."""
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256)
    return TF.normalize(values.float().div(255), list(mean), list(std)).view(3, 256).numpy()


def to_normalized_tensor(img: Image.Image, mean, std) -> torch.Tensor:
    """PIL RGB (or one-channel "L", as three equal channels) -> float [3, H, W], (x / 255 - mean) / std:
    torchvision's to_tensor + normalize, by table lookup."""
    table = _normalize_table(tuple(map(float, mean)), tuple(map(float, std)))
    pixels = np.asarray(img)
    if pixels.ndim == 2:
        out = table[:, pixels]  # [3, H, W]
    else:
        out = np.stack([table[c][pixels[..., c]] for c in range(3)])
    return torch.from_numpy(out)


def scan_class_folder(folder: Path, warn=None) -> tuple[list[str], list[str]]:
    """(image paths, other files) under one class folder, sorted, symlinked files and folders followed.
    An entry with an image extension that is not a readable regular file (a symlink loop, a dangling link,
    a file without read permission) is kept as an image path: the decoder then fails on it and it is
    counted and named like every other unreadable image. Sub-folders that cannot be listed are named
    through `warn` (default: a warning on stderr) instead of vanishing."""
    warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr))
    images, other = [], []

    def unlistable(error: OSError) -> None:
        warn(f"cannot list '{error.filename}' ({error.strerror}); its images are not used")

    seen = set()
    for top, dirs, files in os.walk(folder, onerror=unlistable, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # reached twice through symlinks: each real folder is listed once
            dirs[:] = []
            continue
        seen.add(real)
        follow = []
        for name in dirs:
            path = os.path.join(top, name)
            target = os.path.realpath(path)
            if not os.path.isdir(path):  # a dangling or looping link: unreadable, named by the decoder
                (images if Path(name).suffix.lower() in IMAGE_EXTENSIONS else other).append(path)
            elif os.path.islink(path) and (real == target or real.startswith(target + os.sep)):
                warn(f"'{path}' links back to '{target}' (a folder loop); not followed")
            else:
                follow.append(name)
        dirs[:] = follow
        for name in files:
            path = os.path.join(top, name)
            (images if Path(name).suffix.lower() in IMAGE_EXTENSIONS else other).append(path)
    return sorted(images), sorted(other)


def scan_image_folder(root: str | Path, key: str = "data.train_dir") -> tuple[list[tuple[str, int]], list[str]]:
    """(samples [(path, class id)], class names) of an ImageFolder, sorted; clear errors when empty."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{key}: '{root}' is not a directory; point it at an ImageFolder (one sub-folder per class)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ConfigError(f"{key}: '{root}' has no class sub-folders; expected {root}/<class>/<image>.jpg")
    samples = [(path, label) for label, name in enumerate(classes) for path in scan_class_folder(root / name)[0]]
    if not samples:
        raise ConfigError(f"{key}: '{root}' has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    return samples, classes


def load_rgb(path, draft: tuple[int, int] | None = None, keep_gray: bool = False) -> Image.Image:
    """Decode an image (a path or a file object) fully as RGB (CMYK, grayscale, palette and alpha images are
    converted; 16-bit grayscale, which PIL's RGB conversion would clip to white, is scaled to 8 bits:
    v -> round(v / 257)). draft=(w, h): a JPEG may be decoded at 1/2, 1/4 or 1/8 scale, no smaller than that.
    keep_gray: an 8-bit (or scaled 16-bit) grayscale image stays one channel ("L"); `apply_crop` and
    `to_normalized_tensor` treat it as the RGB image with three equal channels, bit for bit, at a third of
    the work (see `load_rgb_or_gray`)."""
    with Image.open(path) as img:
        if draft is not None and img.format == "JPEG":
            img.draft("RGB", draft)
        img.load()
        if img.mode.startswith("I"):  # "I;16", "I;16B", ... and "I" (how PIL opens 16-bit PNGs)
            wide = np.asarray(img, dtype=np.float64)
            img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
        elif img.mode in ("P", "PA", "LA"):
            img = img.convert("RGBA")  # palette / alpha: resolve transparency before dropping alpha
        if keep_gray and img.mode == "L":
            return img.copy()  # detached from the file (the context closes it)
        return img.convert("RGB")


def load_rgb_or_gray(path) -> Image.Image:
    """The decoder of the PIL loaders: `load_rgb`, but a grayscale image stays one channel. Its crops,
    jitter, blur and tensors equal those of its RGB conversion exactly (tested), because every operation
    of the chain acts on three equal channels as on one: resize, brightness, contrast (its mean is that of
    the luma, which equals the gray value), blur and flip are per-channel; saturation, hue and grayscale
    leave a gray image unchanged (PIL's luma weights sum to exactly 1 in its fixed-point arithmetic)."""
    return load_rgb(path, keep_gray=True)


class ImageSource:
    """Reads samples of an ImageFolder; an unreadable file is replaced by the next readable sample.
    decode(path) returns what a reader needs (default: the RGB image) and raises when the file is unusable."""

    def __init__(self, samples: list[tuple[str, int]], decode=None):
        self.samples = samples
        self.decode = decode or load_rgb
        self._warned = 0

    def __len__(self) -> int:
        return len(self.samples)

    def _failed(self, path: str, exc: Exception, instead: str) -> None:
        if self._warned < 20:
            self._warned += 1
            print(f"warning: skipped unreadable image '{path}' ({type(exc).__name__}: {exc}); {instead}", file=sys.stderr)

    def read(self, index: int) -> tuple[Image.Image, int, int, int]:
        """(decoded image, actual index, label, number of unreadable files skipped): training, where a
        batch keeps its size."""
        for attempt in range(MAX_SUBSTITUTIONS):
            actual = (index + attempt) % len(self.samples)
            path, label = self.samples[actual]
            try:
                return self.decode(path), actual, label, attempt
            except Exception as exc:  # any decoder failure: count it, warn, and use the next sample
                self._failed(path, exc, "using the next sample instead")
        raise RuntimeError(f"{MAX_SUBSTITUTIONS} consecutive unreadable images from sample {index} "
                           f"('{self.samples[index][0]}'); check the dataset")

    def read_or_none(self, index: int):
        """(decoded image, label) of sample index, or None when it is unreadable: evaluation, where an
        unreadable image is left out and counted, never replaced by another one."""
        path, label = self.samples[index]
        try:
            return self.decode(path), label
        except Exception as exc:
            self._failed(path, exc, "left out of the evaluation")
            return None


class MultiCropDataset(Dataset):
    """Key (epoch, index) -> 2 global + L local augmented crops of one image (normalised tensors)."""

    def __init__(self, source: ImageSource, cfg: DataConfig, seed: int):
        self.source, self.cfg, self.seed = source, cfg, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        img, actual, label, failed = self.source.read(index)
        global_recipe, local_recipe = crop_recipes(self.cfg, epoch)
        mean, std = self.cfg.mean, self.cfg.std
        globals_ = [to_normalized_tensor(augment(img, global_recipe, rng), mean, std) for _ in range(2)]
        locals_ = [to_normalized_tensor(augment(img, local_recipe, rng), mean, std) for _ in range(self.cfg.local_crops)]
        return globals_, locals_, actual, label, failed


def collate_multicrop(items) -> MultiCropBatch:
    """Stack samples view-major: globals [2B,3,H,W], locals [L*B,3,h,w]."""
    num_local = len(items[0][1])
    globals_ = torch.stack([item[0][v] for v in range(2) for item in items])
    locals_ = torch.stack([item[1][l] for l in range(num_local) for item in items]) if num_local else None
    index = torch.tensor([item[2] for item in items], dtype=torch.int64)
    label = torch.tensor([item[3] for item in items], dtype=torch.int64)
    return MultiCropBatch(globals_, locals_, index, label, sum(item[4] for item in items))


class StepSampler(Sampler):
    """Per-step sample keys for one rank: a seeded global permutation cut into global batches.

    Step s of epoch e uses perm_e[s*N : (s+1)*N] (N = global batch) and rank r takes the slice
    [r*b, (r+1)*b) of it, so rank r owns rows [r*b, (r+1)*b) of the global batch and the global
    batch does not depend on the number of ranks. drop_last: steps_per_epoch = len // N.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int, world: int, seed: int, shuffle: bool = True):
        if global_batch % world:
            raise ConfigError(f"data.batch_size={global_batch} is not divisible by the world size {world}; "
                              f"choose a multiple of {world}")
        self.steps_per_epoch = num_samples // global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.batch_size={global_batch} exceeds the dataset size ({num_samples}); "
                              f"lower data.batch_size")
        self.num_samples, self.global_batch, self.rank, self.world = num_samples, global_batch, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self):
        perm = self.permutation(self.epoch).tolist()
        local = self.global_batch // self.world
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.global_batch + self.rank * local
            yield [(self.epoch, i) for i in perm[start:start + local]]

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: workers ignore SIGINT and SIGTERM.

    Clusters (SLURM, timeout, container runtimes) and Ctrl-C signal the whole process group; a worker
    that died of it would make the trainer fail with 'DataLoader worker killed by signal' before it
    could write its checkpoint. The trainer alone handles the signal (checkpoint, then exit); workers
    end when it closes the loader, or within seconds of its death (PyTorch's worker watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class MultiCropLoader:
    """Iterates MultiCropBatch for one epoch at a time (`loader.epoch(e, start_step)`)."""

    def __init__(self, dataset: Dataset, sampler: StepSampler, workers: int, pin_memory: bool, collate=collate_multicrop):
        self.sampler = sampler
        kwargs = dict(num_workers=workers, pin_memory=pin_memory, collate_fn=collate, batch_sampler=sampler,
                      worker_init_fn=ignore_stop_signals)
        if workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=4)
        self.loader = DataLoader(dataset, **kwargs)

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def num_samples(self) -> int:
        """Dataset size (sample ids are 0 .. num_samples - 1)."""
        return self.sampler.num_samples

    def epoch(self, epoch: int, start_step: int = 0):
        self.sampler.set_epoch(epoch, start_step)
        return iter(self.loader)


class EvalDataset(Dataset):
    """Resize(short side = resize) + CenterCrop(crop), normalised: the evaluation transform. An unreadable
    image is left out (None; collate_eval counts it in batch.failed), never replaced by another one, so
    each readable image is evaluated exactly once and the counts are the images actually evaluated."""

    def __init__(self, source: ImageSource, cfg: DataConfig):
        self.source, self.cfg = source, cfg

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        read = self.source.read_or_none(index)
        if read is None:
            return None
        img, label = read
        img = TF.center_crop(TF.resize(img, self.cfg.eval_resize), self.cfg.eval_crop)
        return [to_normalized_tensor(img, self.cfg.mean, self.cfg.std)], [], index, label, 0


def collate_eval(items) -> MultiCropBatch:
    """Single view: globals [B,3,H,W] of the readable images (B may be 0); failed = the unreadable ones."""
    kept = [item for item in items if item is not None]
    globals_ = torch.stack([item[0][0] for item in kept]) if kept else torch.zeros((0, 3, 1, 1))
    index = torch.tensor([item[2] for item in kept], dtype=torch.int64)
    label = torch.tensor([item[3] for item in kept], dtype=torch.int64)
    return MultiCropBatch(globals_, None, index, label, len(items) - len(kept) + sum(item[4] for item in kept))


def shard_range(num_samples: int, rank: int, world: int) -> range:
    """Contiguous, unpadded shard of [0, num_samples) for `rank` (sizes differ by at most one)."""
    base, extra = divmod(num_samples, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def build_train_loader(cfg: DataConfig, seed: int, rank: int, world: int, pin_memory: bool) -> MultiCropLoader:
    from pipelines.datasets import load_split

    samples, _, decode = load_split(cfg, cfg.train_dir, "data.train_dir", pretraining=True)
    dataset = MultiCropDataset(ImageSource(samples, decode), cfg, seed)
    sampler = StepSampler(len(dataset), cfg.batch_size, rank, world, seed)
    return MultiCropLoader(dataset, sampler, cfg.workers, pin_memory)


def build_eval_loader(cfg: DataConfig, directory: str, key: str, batch_size: int, rank: int, world: int,
                      pin_memory: bool, pretraining: bool = False) -> tuple[DataLoader, int, int]:
    """(loader over this rank's unpadded shard, total samples, number of classes)."""
    from pipelines.datasets import load_split

    samples, classes, decode = load_split(cfg, directory, key, pretraining)  # pretraining: the pre-training samples
    dataset = EvalDataset(ImageSource(samples, decode), cfg)
    shard = torch.utils.data.Subset(dataset, list(shard_range(len(dataset), rank, world)))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=cfg.workers,
                        pin_memory=pin_memory, collate_fn=collate_eval, worker_init_fn=ignore_stop_signals)
    return loader, len(dataset), len(classes)
