"""Batched crop augmentations as tensor ops on the training device (used after FFCV's decode/crop).

Per crop, independently, with torchvision's float-tensor semantics (values in [0, 1], clamped after
each colour operation): ColorJitter with probability jitter_p (brightness, contrast, saturation
factors ~ U[max(0, 1-s), 1+s], hue ~ U[-h, h], applied in a random order per crop), grayscale
(ITU-R 601-2 luma) with gray_p, Gaussian blur with blur_p (sigma ~ U[0.1, 2.0], 13-tap separable
kernel, reflect padding, as torchvision.transforms.functional.gaussian_blur), horizontal flip with
flip_p, then normalisation. Every random choice is one [n, NUM_PARAMS] vector per crop, made on the
CPU either from a torch.Generator (draw_params) or from keyed uniforms of (seed, epoch, sample index,
crop slot) (keyed_params: what the FFCV loader uses), and reaches the device in one copy without a host
sync. augment_views hands the same vector, on CUDA, to the fused Triton kernel of
pipelines/augment_triton.py (two launches per call; docs/loaders.md, "Fused GPU augmentation") and, on
the CPU, to the fused numba kernel of pipelines/cpu_augment.py (both equal to these tensor ops within
1e-4). The tensor ops themselves (apply_params) are the reference the kernels are tested against; with
where=True (the default on CUDA) they run as on a GPU, every operation over the whole batch and
selected per crop with torch.where, without data-dependent shapes.
"""
from __future__ import annotations

import numpy as np
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


def _apply_where(x, mask, op, arg, where: bool | None = None):
    """x with op(x, arg) on the rows where mask [N] is True. where=True (default on CUDA): computed for all
    rows and selected (no data-dependent shapes, no host sync); else only the selected rows are computed."""
    if (x.device.type == "cuda") if where is None else where:
        return torch.where(mask.view(-1, 1, 1, 1), op(x, arg), x)
    rows = mask.nonzero().flatten()
    if rows.numel():
        x = x.clone()
        x[rows] = op(x[rows], arg[rows])
    return x


NUM_DRAWS = 13  # uniforms per crop: jitter coin, 4 factors, 4 order keys, gray coin, sigma, blur coin, flip coin


def params_from_uniforms(u: torch.Tensor, recipe) -> torch.Tensor:
    """[n, NUM_DRAWS] uniforms in [0, 1) -> the [n, NUM_PARAMS] float32 parameter vectors of
    pipelines/cpu_augment.py: columns 0 jitter coin, 1-4 factors, 5-8 keys whose argsort is the
    operation order, 9 gray coin, 10 blur sigma, 11 blur coin, 12 flip coin."""
    from pipelines import crop_params as P

    n = u.shape[0]
    b, c, s, h = recipe.jitter
    p = torch.zeros(n, P.NUM_PARAMS)
    p[:, P.P_JITTER] = (u[:, 0] < recipe.jitter_p).float()
    lo = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
    hi = torch.tensor([1 + b, 1 + c, 1 + s, h])
    p[:, P.P_FACTORS] = lo + u[:, 1:5] * (hi - lo)
    p[:, P.P_ORDER] = u[:, 5:9].argsort(dim=1).float()  # a random permutation of the 4 operations per crop
    p[:, P.P_GRAY] = (u[:, 9] < recipe.gray_p).float()
    p[:, P.P_SIGMA] = recipe.blur_sigma[0] + u[:, 10] * (recipe.blur_sigma[1] - recipe.blur_sigma[0])
    p[:, P.P_BLUR] = (u[:, 11] < recipe.blur_p).float()
    p[:, P.P_FLIP] = (u[:, 12] < recipe.flip_p).float()
    return p


def draw_params(n: int, recipe, generator: torch.Generator) -> torch.Tensor:
    """The random choices of n crops ([n, NUM_PARAMS], see params_from_uniforms) drawn from `generator`
    in a fixed order: jitter coins, factors, order keys, gray coins, sigmas, blur coins, flip coins."""
    def draw(*shape):
        return torch.rand(*shape, generator=generator)

    u = torch.empty(n, NUM_DRAWS)
    u[:, 0] = draw(n)
    u[:, 1:5] = draw(n, 4)
    u[:, 5:9] = draw(n, 4)
    u[:, 9] = draw(n)
    u[:, 10] = draw(n)
    u[:, 11] = draw(n)
    u[:, 12] = draw(n)
    return params_from_uniforms(u, recipe)


def keyed_params(seed: int, epoch: int, index, slots, recipe) -> torch.Tensor:
    """The choices of crop slots `slots` of samples `index` (view-major: all samples of slots[0], then
    slots[1], ...) from keyed uniforms of (seed, epoch, index, slot): a sample's crops do not depend on
    its batch, rank or position (pipelines/keyed_random.py)."""
    from pipelines.keyed_random import keys, uniforms

    index = np.asarray(index, dtype=np.int64).reshape(1, -1)
    slot = np.asarray(list(slots), dtype=np.int64).reshape(-1, 1)
    u = uniforms(keys(seed, epoch, index, slot), NUM_DRAWS)  # [len(slots) * b, NUM_DRAWS], view-major
    return params_from_uniforms(torch.from_numpy(u).float(), recipe)


def apply_params(x: torch.Tensor, p: torch.Tensor, mean, std, where: bool | None = None) -> torch.Tensor:
    """Batched tensor ops: float [n, 3, H, W] in [0, 1] and params [n, NUM_PARAMS] on x's device ->
    augmented, normalised, channels-last. where: see _apply_where (None: True on CUDA)."""
    from pipelines import crop_params as P

    device = x.device
    jitter_on = p[:, P.P_JITTER] > 0.5
    factors = p[:, P.P_FACTORS].unbind(1)
    order = p[:, P.P_ORDER].round().long()
    ops = (brightness, contrast, saturation, hue)
    for slot in range(4):
        for op_id, op in enumerate(ops):
            x = _apply_where(x, jitter_on & (order[:, slot] == op_id), op, factors[op_id], where)
    x = _apply_where(x, p[:, P.P_GRAY] > 0.5, lambda v, _: gray(v).expand_as(v).contiguous(), factors[0], where)
    x = _apply_where(x, p[:, P.P_BLUR] > 0.5, gaussian_blur, p[:, P.P_SIGMA].contiguous(), where)
    x = torch.where((p[:, P.P_FLIP] > 0.5).view(-1, 1, 1, 1), x.flip(3), x)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


def augment_views(views: list[torch.Tensor], recipe, mean, std, generator: torch.Generator | None = None,
                  impl: str = "auto", threads: int | None = None, params: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32, quantize: bool = False, radius: int = BLUR_RADIUS,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 crops [b, S, S, 3] per view -> augmented, normalised `dtype` (float32, bfloat16 or float16)
    [V*b, 3, S, S] (channels-last), view-major. impl "triton": the fused Triton kernel of
    pipelines/augment_triton.py (CUDA; CPU tensors under TRITON_INTERPRET=1); "torch": batched tensor ops
    on the views' device (the reference); "fused": the numba kernel of pipelines/cpu_augment.py (CPU
    tensors only); "auto": triton on CUDA when Triton is installed, fused on the CPU when numba is, torch
    otherwise. All make the same random choices: `params` ([V*b, NUM_PARAMS], e.g. keyed_params) or,
    without them, draw_params from `generator`. quantize / radius: the fused kernels' options (floors
    after brightness, contrast and saturation; blur window 2 radius + 1, or 2 ceil(3 sigma) + 1 per crop
    with radius=0: the DALI graph's semantics with quantize=True, radius=0); the tensor ops have only the
    defaults. out: a channels-last [V*b, 3, S, S] tensor to write (its dtype is the output's)."""
    from pipelines import cpu_augment as C
    from pipelines import crop_params as P

    device = views[0].device
    n = sum(v.shape[0] for v in views)
    if params is None:
        if generator is None:
            raise ValueError("augment_views needs a generator or params")
        params = draw_params(n, recipe, generator)
    elif tuple(params.shape) != (n, P.NUM_PARAMS):
        raise ValueError(f"params: expected shape ({n}, {P.NUM_PARAMS}), got {tuple(params.shape)}")
    p = params
    if out is not None:
        dtype = out.dtype
    if impl == "auto":
        if device.type == "cuda":
            impl = "triton" if _triton_available() else "torch"
        else:
            impl = "fused" if device.type == "cpu" and C.available() else "torch"
    if impl == "triton":
        from pipelines.augment_triton import augment_crops_triton

        return augment_crops_triton(views, p, mean, std, quantize=quantize, radius=radius, dtype=dtype, out=out)
    if impl == "fused":
        result = C.augment_crops(views, p.numpy(), mean, std, quantize=quantize, radius=radius, threads=threads)
    elif impl == "torch":
        if quantize or radius != BLUR_RADIUS:
            raise ValueError(f"impl='torch' has no quantize and only the {2 * BLUR_RADIUS + 1}-tap blur window; "
                             "use impl='fused' or 'triton'")
        x = torch.cat(views).permute(0, 3, 1, 2).float().div_(255.0)  # view-major, channels-last strides
        result = apply_params(x, _dev(p, device), mean, std)
    else:
        raise ValueError(f"impl: unknown {impl!r}; choose auto, triton, torch or fused")
    if out is not None:
        if tuple(out.shape) != tuple(result.shape):
            raise ValueError(f"out: expected shape {tuple(result.shape)}, got {tuple(out.shape)}")
        return out.copy_(result)
    return result if dtype == torch.float32 else result.to(dtype)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
