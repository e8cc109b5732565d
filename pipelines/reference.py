"""The executable specification of the augmentations (torchvision / PIL). The reference loader built on it
is pipelines/pil.py; image files: pipelines/images.py; sample order and sharding: pipelines/sampling.py.

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
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from wcl_fast.config import DataConfig

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


PROBE_STREAM = 7  # 4th key of the probe view's generator: its draws are independent of pre-training's


def probe_crop_params(seed: int, epoch: int, index: int, width: int, height: int) -> CropParams:
    """The training view of the linear probe and of fine-tuning (docs/wcl.md §5): a RandomResizedCrop box
    with scale (0.08, 1), then a flip coin, from default_rng([seed, epoch, index, PROBE_STREAM]); no
    colour, grayscale or blur. The DALI and FFCV probe loaders make the same choices."""
    rng = np.random.default_rng([seed, epoch, index, PROBE_STREAM])
    box = random_resized_crop_box(rng, width, height, (0.08, 1.0), (3 / 4, 4 / 3))
    return CropParams(box, None, (0, 1, 2, 3), False, None, bool(rng.random() < 0.5))
