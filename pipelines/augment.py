"""Batched crop augmentations as tensor ops on the training device (used after FFCV's decode/crop).

Per crop, independently, with torchvision's float-tensor semantics (values in [0, 1], clamped after
each colour operation): ColorJitter with probability jitter_p (brightness, contrast, saturation
factors ~ U[max(0, 1-s), 1+s], hue ~ U[-h, h], applied in a random order per crop), grayscale
(ITU-R 601-2 luma) with gray_p, Gaussian blur with blur_p (sigma ~ U[0.1, 2.0], 13-tap separable
kernel, reflect padding, as torchvision.transforms.functional.gaussian_blur), horizontal flip with
flip_p, then normalisation. Every random choice comes from the given torch.Generator (on the CPU)
and reaches the device without a synchronising copy; the ops have no data-dependent shapes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)
BLUR_RADIUS = 6  # ceil(3 * max sigma 2.0)


def _dev(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def gray(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> luma [N, 1, H, W]."""
    return LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]


def brightness(x, factor):
    return (x * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def contrast(x, factor):
    mean = gray(x).mean(dim=(1, 2, 3), keepdim=True)
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def saturation(x, factor):
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * gray(x)).clamp(0, 1)


def hue(x, shift):
    """HSV hue rotation by shift (fraction of a turn) per sample, branch-free (sextant form)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    top = torch.maximum(torch.maximum(r, g), b)
    chroma = top - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    is_r = r == top
    is_g = (g == top) & ~is_r
    h = torch.where(is_r, (g - b) / safe, torch.where(is_g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = torch.remainder(h + 6.0 * shift.view(-1, 1, 1), 6.0)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + h, 6.0)
        out.append(top - chroma * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, dim=1).clamp(0, 1)


def gaussian_blur(x, sigma):
    """Per-sample sigma, 13-tap separable Gaussian, reflect padding: x [N, C, H, W], sigma [N]."""
    n, c, h, w = x.shape
    taps = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [N, K]
    kernel = kernel.repeat_interleave(c, dim=0)  # [N*C, K]
    y = F.pad(x.reshape(1, n * c, h, w), (BLUR_RADIUS,) * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def _apply_where(x, mask, op, arg):
    """x with op(x, arg) on the rows where mask [N] is True. On CUDA: computed for all rows and selected
    (no data-dependent shapes, no host sync); on the CPU only the selected rows are computed."""
    if x.device.type == "cuda":
        return torch.where(mask.view(-1, 1, 1, 1), op(x, arg), x)
    rows = mask.nonzero().flatten()
    if rows.numel():
        x = x.clone()
        x[rows] = op(x[rows], arg[rows])
    return x


def augment_views(views: list[torch.Tensor], recipe, mean, std, generator: torch.Generator) -> torch.Tensor:
    """uint8 crops [b, S, S, 3] per view -> augmented, normalised float [V*b, 3, S, S] (channels-last)."""
    x = torch.cat(views).permute(0, 3, 1, 2).float().div_(255.0)  # view-major, channels-last strides
    n, device = x.shape[0], x.device

    def draw(*shape):
        return _dev(torch.rand(*shape, generator=generator), device)

    b, c, s, h = recipe.jitter
    jitter_on = draw(n) < recipe.jitter_p
    u = draw(n, 4)
    factors = [max(0.0, 1 - b) + u[:, 0] * (1 + b - max(0.0, 1 - b)), max(0.0, 1 - c) + u[:, 1] * (1 + c - max(0.0, 1 - c)),
               max(0.0, 1 - s) + u[:, 2] * (1 + s - max(0.0, 1 - s)), -h + u[:, 3] * 2 * h]
    order = draw(n, 4).argsort(dim=1)  # a random permutation of the 4 operations per crop
    ops = (brightness, contrast, saturation, hue)
    for slot in range(4):
        for op_id, op in enumerate(ops):
            x = _apply_where(x, jitter_on & (order[:, slot] == op_id), op, factors[op_id])
    x = _apply_where(x, draw(n) < recipe.gray_p, lambda v, _: gray(v).expand_as(v).contiguous(), factors[0])
    sigma = recipe.blur_sigma[0] + draw(n) * (recipe.blur_sigma[1] - recipe.blur_sigma[0])
    x = _apply_where(x, draw(n) < recipe.blur_p, gaussian_blur, sigma)
    flip_on = (draw(n) < recipe.flip_p).view(-1, 1, 1, 1)
    x = torch.where(flip_on, x.flip(3), x)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous(memory_format=torch.channels_last)
