"""The fused CPU augmentation kernel (pipelines/cpu_augment.py): against the batched tensor ops of
pipelines/augment.py (themselves tested against torchvision in test_ffcv.py) and against a float64
numpy implementation of the DALI graph's quantised semantics; threading, strided FFCV-style inputs, errors."""
import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from pipelines import augment as A  # noqa: E402
from pipelines import cpu_augment as C  # noqa: E402
from pipelines.reference import CropRecipe  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _views(count, size, seed, smooth=False):
    g = torch.Generator().manual_seed(seed)
    if not smooth:
        return [torch.randint(0, 256, (count, size, size, 3), dtype=torch.uint8, generator=g) for _ in range(2)]
    base = torch.rand(2 * count, 3, 4, 4, generator=g)  # colour fields: contrast / hue see real structure
    img = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    img = (img * 255 + torch.randn(img.shape, generator=g) * 8).clamp(0, 255).round().to(torch.uint8)
    return list(img.permute(0, 2, 3, 1).contiguous().chunk(2))


@pytest.mark.parametrize("size", [13, 32, 96])
@pytest.mark.parametrize("recipe", [dict(), dict(jitter_p=1.0, blur_p=1.0, gray_p=0.0), dict(gray_p=1.0, blur_p=0.0),
                                    dict(jitter_p=0.0, blur_p=0.0, gray_p=0.0)],
                         ids=["recipe", "jitter+blur", "gray", "none"])
def test_fused_equals_the_batched_tensor_ops(size, recipe):
    views = _views(24, size, seed=size, smooth=True)
    r = CropRecipe(size, (0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), **recipe)
    ours = A.augment_views(views, r, MEAN, STD, torch.Generator().manual_seed(4), impl="fused", threads=2)
    ref = A.augment_views(views, r, MEAN, STD, torch.Generator().manual_seed(4), impl="torch")
    assert ours.shape == (48, 3, size, size) and ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_strided_crops_threads_and_errors():
    """FFCV hands over per-crop slices of [b, T] records: read in place; any thread count, same result."""
    g = torch.Generator().manual_seed(0)
    records = torch.randint(0, 256, (10, 5 * 5 * 3 + 16 * 16 * 3 + 7), dtype=torch.uint8, generator=g)
    view = records[:, 75:75 + 768].view(10, 16, 16, 3)
    assert not view.is_contiguous()
    p = A.draw_params(10, CropRecipe(16, (0.2, 1.0), jitter_p=1.0, blur_p=0.5), torch.Generator().manual_seed(1)).numpy()
    one = C.augment_crops([view], p, MEAN, STD, threads=1)
    assert torch.equal(one, C.augment_crops([view.contiguous()], p, MEAN, STD, threads=3))
    ref = A.apply_params(view.permute(0, 3, 1, 2).float() / 255, torch.from_numpy(p), MEAN, STD)
    torch.testing.assert_close(one, ref, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="params"):
        C.augment_crops([view], p[:5], MEAN, STD)
    with pytest.raises(ValueError, match="uint8"):
        C.augment_crops([view.float()], p, MEAN, STD)


def _naive_quantised(img, p, mean, std):
    """float64 numpy: the DALI graph's semantics (floor after brightness / contrast / saturation, HSV hue
    via colorsys-style sextants, window 2 ceil(3 sigma) + 1 with reflect-101 border, flip, normalise)."""
    import colorsys

    x = img.astype(np.float64)
    luma = np.array([0.299, 0.587, 0.114])
    if p[C.P_JITTER] > 0.5:
        for op in p[C.P_ORDER].astype(int):
            f = p[C.P_FACTORS][op]
            if op == 0:
                x = np.floor(np.clip(x * f, 0, 255))
            elif op == 1:
                x = np.floor(np.clip(f * x + (1 - f) * (x @ luma).mean(), 0, 255))
            elif op == 2:
                x = np.floor(np.clip(f * x + (1 - f) * (x @ luma)[..., None], 0, 255))
            else:
                flat = x.reshape(-1, 3) / 255.0
                out = np.empty_like(flat)
                for i, (r, g, b) in enumerate(flat):
                    h, s, v = colorsys.rgb_to_hsv(r, g, b)
                    out[i] = colorsys.hsv_to_rgb((h + f) % 1.0, s, v)
                x = out.reshape(x.shape) * 255.0
    if p[C.P_GRAY] > 0.5:
        x = np.repeat((x @ luma)[..., None], 3, axis=-1)
    if p[C.P_BLUR] > 0.5:
        sigma = float(p[C.P_SIGMA])
        rad = int(np.ceil(3 * sigma))
        taps = np.exp(-0.5 * (np.arange(-rad, rad + 1) / sigma) ** 2)
        taps /= taps.sum()
        h, w = x.shape[:2]
        padded = np.pad(x, ((0, 0), (rad, rad), (0, 0)), mode="reflect")
        x = sum(taps[t] * padded[:, t:t + w] for t in range(2 * rad + 1))
        padded = np.pad(x, ((rad, rad), (0, 0), (0, 0)), mode="reflect")
        x = sum(taps[t] * padded[t:t + h] for t in range(2 * rad + 1))
    if p[C.P_FLIP] > 0.5:
        x = x[:, ::-1]
    return (x / 255.0 - np.array(mean)) / np.array(std)


def test_quantised_mode_matches_a_float64_reference():
    views = _views(12, 24, seed=9, smooth=True)
    recipe = CropRecipe(24, (0.2, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=1.0, gray_p=0.2, blur_p=0.5)
    p = A.draw_params(24, recipe, torch.Generator().manual_seed(2)).numpy()
    ours = C.augment_crops(views, p, MEAN, STD, quantize=True, radius=0, threads=2)
    crops = torch.cat(views).numpy()
    for i in range(24):
        ref = _naive_quantised(crops[i], p[i], MEAN, STD)
        diff = np.abs(ours[i].permute(1, 2, 0).numpy() - ref)
        # a float32 value landing just below an integer floors one grey level lower than in float64
        assert (diff > 1e-3).mean() < 0.01 and diff.max() < 3 * (1 / 255) / min(STD), (i, diff.max())
        assert diff.mean() < 1e-3, i
    # without the jitter nothing is floored: the blur window (2 ceil(3 sigma) + 1 taps), grey and flip exactly
    recipe = CropRecipe(24, (0.2, 1.0), jitter_p=0.0, gray_p=0.3, blur_p=1.0, blur_sigma=(0.1, 2.0))
    p = A.draw_params(24, recipe, torch.Generator().manual_seed(3)).numpy()
    ours = C.augment_crops(views, p, MEAN, STD, quantize=True, radius=0, threads=2)
    for i in range(24):
        ref = _naive_quantised(crops[i], p[i], MEAN, STD)
        np.testing.assert_allclose(ours[i].permute(1, 2, 0).numpy(), ref, rtol=0, atol=2e-5)


def test_dali_host_augmentation_matches_the_graph(tmp_path):
    """data.dali_augment=host (DALI decode + uint8 crops, fused kernel) vs graph (all in DALI, float
    resize): the same drawn choices, pixels equal up to the resize rounding."""
    pytest.importorskip("nvidia.dali")
    from conftest import write_colour_folder
    from pipelines import dali as D
    from wcl_fast.config import DataConfig

    write_colour_folder(tmp_path, classes=2, per_class=12, sizes=(50, 110))
    cfg = DataConfig(train_dir=str(tmp_path), batch_size=24, workers=2, global_size=40, local_crops=2, local_size=20,
                     aug_switch_epoch=0)
    host = next(D.DaliMultiCropLoader(cfg, seed=1, rank=0, world=1, augment="host").epoch(3))
    graph = next(D.DaliMultiCropLoader(cfg, seed=1, rank=0, world=1, augment="graph").epoch(3))
    assert torch.equal(host.index, graph.index)
    for ours, theirs in ((host.globals, graph.globals), (host.locals, graph.locals)):
        assert ours.is_contiguous(memory_format=torch.channels_last)
        per_crop = (ours - theirs).abs().flatten(1).mean(1)
        assert per_crop.max() < 0.03, per_crop.max()  # about 1.5 grey levels at most, on average per crop
        assert (ours - theirs).abs().mean() < 0.01
