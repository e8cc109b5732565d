"""Batched crop augmentations as tensor ops on the training device (used after FFCV's decode/crop).

Per crop, independently, with torchvision's float-tensor semantics (values in [0, 1], clamped after
each colour operation): ColorJitter with probability jitter_p (brightness, contrast, saturation
factors ~ U[max(0, 1-s), 1+s], hue ~ U[-h, h], applied in a random order per crop), grayscale
(ITU-R 601-2 luma) with gray_p, Gaussian blur with blur_p (sigma ~ U[0.1, 2.0], 13-tap separable
kernel, reflect padding, as torchvision.transforms.functional.gaussian_blur), horizontal flip with
flip_p, then normalisation. Every random choice comes from the given torch.Generator (on the CPU) as
one [n, NUM_PARAMS] vector per crop (draw_params) and reaches the device in one copy without a host
sync; the ops have no data-dependent shapes on CUDA. On the CPU, augment_views hands the same vector
to the fused numba kernel of pipelines/cpu_augment.py (equal within 1e-4, several times faster).
"""
from __future__ import annotations


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


def draw_params(n: int, recipe, generator: torch.Generator) -> torch.Tensor:
    """The random choices of n crops as the [n, NUM_PARAMS] float32 vector of pipelines/cpu_augment.py
    (CPU), drawn from `generator` in a fixed order: jitter coin, 4 factors, operation order, gray coin,
    blur sigma, blur coin, flip coin."""
    from pipelines import cpu_augment as C

    def draw(*shape):
        return torch.rand(*shape, generator=generator)

    b, c, s, h = recipe.jitter
    p = torch.zeros(n, C.NUM_PARAMS)
    p[:, C.P_JITTER] = (draw(n) < recipe.jitter_p).float()
    u = draw(n, 4)
    lo = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
    hi = torch.tensor([1 + b, 1 + c, 1 + s, h])
    p[:, C.P_FACTORS] = lo + u * (hi - lo)
    p[:, C.P_ORDER] = draw(n, 4).argsort(dim=1).float()  # a random permutation of the 4 operations per crop
    p[:, C.P_GRAY] = (draw(n) < recipe.gray_p).float()
    p[:, C.P_SIGMA] = recipe.blur_sigma[0] + draw(n) * (recipe.blur_sigma[1] - recipe.blur_sigma[0])
    p[:, C.P_BLUR] = (draw(n) < recipe.blur_p).float()
    p[:, C.P_FLIP] = (draw(n) < recipe.flip_p).float()
    return p


def apply_params(x: torch.Tensor, p: torch.Tensor, mean, std) -> torch.Tensor:
    """Batched tensor ops: float [n, 3, S, S] in [0, 1] and params [n, NUM_PARAMS] on x's device ->
    augmented, normalised, channels-last."""
    from pipelines import cpu_augment as C

    device = x.device
    jitter_on = p[:, C.P_JITTER] > 0.5
    factors = p[:, C.P_FACTORS].unbind(1)
    order = p[:, C.P_ORDER].round().long()
    ops = (brightness, contrast, saturation, hue)
    for slot in range(4):
        for op_id, op in enumerate(ops):
            x = _apply_where(x, jitter_on & (order[:, slot] == op_id), op, factors[op_id])
    x = _apply_where(x, p[:, C.P_GRAY] > 0.5, lambda v, _: gray(v).expand_as(v).contiguous(), factors[0])
    x = _apply_where(x, p[:, C.P_BLUR] > 0.5, gaussian_blur, p[:, C.P_SIGMA].contiguous())
    x = torch.where((p[:, C.P_FLIP] > 0.5).view(-1, 1, 1, 1), x.flip(3), x)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


def augment_views(views: list[torch.Tensor], recipe, mean, std, generator: torch.Generator, impl: str = "auto",
                  threads: int | None = None) -> torch.Tensor:
    """uint8 crops [b, S, S, 3] per view -> augmented, normalised float [V*b, 3, S, S] (channels-last),
    view-major. impl "torch": batched tensor ops on the views' device (the GPU path); "fused": the
    numba kernel of pipelines/cpu_augment.py (CPU tensors only); "auto": fused on the CPU when numba is
    installed, torch otherwise. Both make the same random choices from `generator`."""
    from pipelines import cpu_augment as C

    device = views[0].device
    p = draw_params(sum(v.shape[0] for v in views), recipe, generator)
    if impl == "auto":
        impl = "fused" if device.type == "cpu" and C.available() else "torch"
    if impl == "fused":
        return C.augment_crops(views, p.numpy(), mean, std, quantize=False, radius=BLUR_RADIUS, threads=threads)
    if impl != "torch":
        raise ValueError(f"impl: unknown {impl!r}; choose auto, torch or fused")
    x = torch.cat(views).permute(0, 3, 1, 2).float().div_(255.0)  # view-major, channels-last strides
    return apply_params(x, _dev(p, device), mean, std)
