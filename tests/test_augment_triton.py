"""The fused Triton augmentation kernel (pipelines/augment_triton.py), under TRITON_INTERPRET=1 on the CPU
(tests/conftest.py), against the fused numba kernel pipelines.cpu_augment.augment_crops -- itself tested
against the batched tensor ops of pipelines/augment.py and those against torchvision -- with the tolerance
the numba kernel meets against the tensor ops (tests/test_cpu_augment.py): 1e-4 in normalised units
(float32 output); bfloat16 / float16 output adds the dtype's rounding to nearest (rtol 2^-8 / 2^-11, the
unit roundoff, and 1 % on the absolute tolerance). Non-square
crops, which the numba kernel does not take, are checked against the tensor ops (apply_params) instead.
Crops are small (5-24 px): the interpreter runs every program in Python. With CUDA the kernels run
compiled on the GPU instead, against the same CPU references."""
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("numba")

from conftest import requires_cuda  # noqa: E402
from pipelines import augment as A  # noqa: E402
from pipelines import augment_triton as T  # noqa: E402
from pipelines import cpu_augment as C  # noqa: E402
from pipelines import crop_params as P  # noqa: E402
from pipelines.reference import CropRecipe  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
ATOL = 1e-4  # numba kernel vs the tensor ops (tests/test_cpu_augment.py)
RTOL = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
HALF_ATOL = 1.01 * ATOL


def _crops(count, height, width, seed, views=1):
    """Smooth colour fields plus noise (contrast and hue see real structure), uint8 [count, H, W, 3] per view."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(views * count, 3, 4, 4, generator=g)
    img = torch.nn.functional.interpolate(base, size=(height, width), mode="bilinear", align_corners=False)
    img = (img * 255 + torch.randn(img.shape, generator=g) * 8).clamp(0, 255).round().to(torch.uint8)
    return list(img.permute(0, 2, 3, 1).contiguous().chunk(views))


def _params(count, seed, **recipe):
    r = CropRecipe(16, (0.08, 1.0), **{"jitter": (0.8, 0.8, 0.8, 0.2), **recipe})
    return A.draw_params(count, r, torch.Generator().manual_seed(seed))


def _triton(views, params, **kwargs):
    """The kernel on DEVICE, the result on the CPU."""
    out = T.augment_crops_triton([v.to(DEVICE) for v in views], params, MEAN, STD, **kwargs)
    assert out.is_contiguous(memory_format=torch.channels_last)
    return out.cpu()


def _check(views, params, dtype=torch.float32, quantize=False, radius=6):
    ours = _triton(views, params, quantize=quantize, radius=radius, dtype=dtype)
    ref = C.augment_crops(views, params.numpy(), MEAN, STD, quantize=quantize, radius=radius, threads=1)
    n, h, w = len(views) * views[0].shape[0], views[0].shape[1], views[0].shape[2]
    assert ours.shape == (n, 3, h, w) and ours.dtype == dtype
    torch.testing.assert_close(ours.float(), ref, rtol=RTOL[dtype], atol=ATOL if dtype == torch.float32 else HALF_ATOL)
    return ours, ref


IDENTITY = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue", "gray", "blur", "flip", "normalise"])
def test_every_operation_alone(op):
    """One operation per crop, the others off (jitter factors at their identity), two views of 3 crops."""
    views = _crops(3, 12, 12, seed=1, views=2)
    p = _params(6, seed=2, jitter_p=0.0, gray_p=0.0, blur_p=0.0, flip_p=0.0)
    if op in IDENTITY:
        p[:, P.P_JITTER] = 1.0
        drawn = p[:, P.P_FACTORS].clone()
        p[:, P.P_FACTORS] = torch.tensor(list(IDENTITY.values()))
        i = list(IDENTITY).index(op)
        p[:, P.P_FACTORS.start + i] = drawn[:, i]
    elif op != "normalise":
        p[:, {"gray": P.P_GRAY, "blur": P.P_BLUR, "flip": P.P_FLIP}[op]] = 1.0
    ours, _ = _check(views, p)
    if op == "flip":
        plain = _triton(views, p * torch.tensor([0.0 if i == P.P_FLIP else 1.0 for i in range(P.NUM_PARAMS)]))
        assert torch.equal(ours, plain.flip(3))


def test_every_order_of_the_four_jitter_operations():
    """All 24 orders, one crop each with drawn factors, against the numba kernel and against the tensor ops
    in their CUDA form (where=True: every operation on every crop, selected with torch.where)."""
    orders = list(itertools.permutations(range(4)))
    views = _crops(12, 10, 10, seed=3, views=2)
    p = _params(24, seed=4, jitter_p=1.0, gray_p=0.0, blur_p=0.0, flip_p=0.5)
    p[:, P.P_ORDER] = torch.tensor(orders, dtype=torch.float32)
    ours, _ = _check(views, p)
    x = torch.cat(views).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(ours, A.apply_params(x, p, MEAN, STD, where=True), rtol=0, atol=ATOL)


@pytest.mark.parametrize("jitter,gray,blur,flip", list(itertools.product((0.0, 1.0), repeat=4)))
def test_probability_edges(jitter, gray, blur, flip):
    """Every flag 0 for every crop, or 1 for every crop, in all 16 combinations."""
    views = _crops(4, 9, 9, seed=5)
    p = _params(4, seed=6, jitter_p=jitter, gray_p=gray, blur_p=blur, flip_p=flip)
    assert {float(v) for v in p[:, [P.P_JITTER, P.P_GRAY, P.P_BLUR, P.P_FLIP]].unique()} <= {0.0, 1.0}
    _check(views, p)


@pytest.mark.parametrize("size", [5, 8, 13, 24])
def test_square_sizes_against_the_numba_kernel(size):
    """Even and odd sizes; 5 px is shorter than the 13-tap window (reflect-101 indices clamped)."""
    views = _crops(4, size, size, seed=size, views=2)
    _check(views, _params(8, seed=size, jitter_p=0.8, gray_p=0.3, blur_p=0.6))


@pytest.mark.parametrize("size,block,rows", [(37, None, None), (13, 32, 4)])
def test_several_tiles_and_row_strips(size, block, rows, monkeypatch):
    """Crops of several colour tiles (the contrast mean summed across them) and several blur strips (the
    last one partial): 37 px with the default 1024-pixel tiles and 32-row strips; 13 px with 32 and 4."""
    if block is not None:
        monkeypatch.setattr(T, "COLOUR_BLOCK", block)
        monkeypatch.setattr(T, "BLUR_ROWS", rows)
    views = _crops(3, size, size, seed=size, views=2)
    _check(views, _params(6, seed=size, jitter_p=1.0, gray_p=0.0, blur_p=0.5))


@pytest.mark.parametrize("height,width", [(10, 17), (19, 8)])
def test_non_square_crops_against_the_tensor_ops(height, width):
    views = _crops(4, height, width, seed=height, views=2)
    p = _params(8, seed=width, jitter_p=0.8, gray_p=0.3, blur_p=0.6)
    ours = _triton(views, p)
    x = torch.cat(views).permute(0, 3, 1, 2).float() / 255
    for where in (False, True):
        torch.testing.assert_close(ours, A.apply_params(x, p, MEAN, STD, where=where), rtol=0, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_outputs(dtype):
    views = _crops(6, 11, 11, seed=7, views=2)
    ours, ref = _check(views, _params(12, seed=8, jitter_p=0.8, gray_p=0.2, blur_p=0.5), dtype=dtype)
    assert (ours == ref.to(dtype)).float().mean() > 0.97  # rounded to nearest, as torch's conversion


def test_quantised_mode_with_per_crop_windows():
    """The DALI host path's settings: floors after brightness / contrast / saturation, window 2 ceil(3 sigma)
    + 1 per crop. The same float32 operations as the numba kernel: equal except where a value lands within
    float32 rounding of an integer and floors one grey level apart (at most 1 % of the values)."""
    views = _crops(8, 14, 14, seed=9, views=2)
    p = _params(16, seed=10, jitter_p=1.0, gray_p=0.2, blur_p=0.7)
    ours = _triton(views, p, quantize=True, radius=0)
    ref = C.augment_crops(views, p.numpy(), MEAN, STD, quantize=True, radius=0, threads=1)
    diff = (ours - ref).abs()
    assert (diff > ATOL).float().mean() < 0.01 and diff.max() < 1.01 / 255 / min(STD), diff.max()
    assert T.window_radius(p, 0) == int(np.ceil(np.float32(3) * p[p[:, P.P_BLUR] > 0.5, P.P_SIGMA].numpy()).max())


def test_ffcv_record_slices_are_read_in_place_and_other_views_stacked():
    """FFCV hands over per-crop slices of [b, T] uint8 records (views at evenly spaced offsets): read in
    place; views in separate tensors are stacked first. Same values either way."""
    b, size = 5, 9
    crops = _crops(b, size, size, seed=11, views=3)
    span = size * size * 3
    records = torch.zeros(b, 7 + 3 * span + 5, dtype=torch.uint8)
    views = []
    for v, crop in enumerate(crops):
        records[:, 7 + v * span:7 + (v + 1) * span] = crop.reshape(b, -1)
        views.append(records[:, 7 + v * span:7 + (v + 1) * span].view(b, size, size, 3))
    assert not views[0].is_contiguous()
    base, offset, view_stride, crop_stride = T._source(views)
    assert base.data_ptr() == records.data_ptr() and (offset, view_stride, crop_stride) == (7, span, records.shape[1])
    p = _params(3 * b, seed=12, jitter_p=0.8, blur_p=0.5)
    in_place = _triton(views, p)
    if DEVICE == "cuda":  # the same slicing of records on the device
        on_device = records.to(DEVICE)
        offsets = [7 + v * span for v in range(3)]
        assert torch.equal(in_place, T.augment_crops_triton(
            [on_device[:, o:o + span].view(b, size, size, 3) for o in offsets], p, MEAN, STD).cpu())
    ref = C.augment_crops([v.contiguous() for v in views], p.numpy(), MEAN, STD, threads=1)  # (tested on slices too)
    torch.testing.assert_close(in_place, ref, rtol=0, atol=ATOL)
    separate = [c.clone() for c in crops]
    assert T._source(separate)[0].data_ptr() not in {c.data_ptr() for c in separate}  # a stacked copy
    assert torch.equal(in_place, _triton(separate, p))


def test_launches_and_bytes_written():
    """Two launches when a crop is blurred (one otherwise); they store the output once and 12 bytes a
    pixel of scratch for the blurred crops only. On the "meta" device the launches are counted, not run."""
    records = []
    T.LAUNCH_HOOKS.append(records.append)
    try:
        views = _crops(4, 8, 8, seed=13, views=2)
        p = _params(8, seed=14, blur_p=0.5)
        n_blur = int((p[:, P.P_BLUR] > 0.5).sum())
        assert 0 < n_blur < 8
        out = _triton(views, p, dtype=torch.bfloat16)
        assert [r["kernel"] for r in records] == ["_colour_kernel", "_blur_kernel"]
        assert sum(r["writes"]["output"] for r in records) == out.numel() * 2
        assert records[0]["writes"]["blur scratch"] == n_blur * 8 * 8 * 3 * 4
        records.clear()
        p[:, P.P_BLUR] = 0.0
        _triton(views, p)
        assert [r["kernel"] for r in records] == ["_colour_kernel"] and records[0]["bytes_written"] == out.numel() * 4
        records.clear()
        meta = torch.empty(2, 4, 224, 224, 3, dtype=torch.uint8, device="meta").unbind(0)
        out = T.augment_crops_triton(meta, _params(8, seed=15, blur_p=1.0), MEAN, STD)
        assert out.device.type == "meta" and out.shape == (8, 3, 224, 224) and len(records) == 2
    finally:
        T.LAUNCH_HOOKS.remove(records.append)


def test_augment_views_routes_to_the_kernel():
    """impl="triton" (the CUDA default) equals impl="fused" (the CPU default); dtype for every impl."""
    views = _crops(4, 10, 10, seed=16, views=2)
    r = CropRecipe(10, (0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2))
    kw = dict(generator=None, params=A.draw_params(8, r, torch.Generator().manual_seed(17)))
    on_device = [v.to(DEVICE) for v in views]
    triton_out = A.augment_views(on_device, r, MEAN, STD, impl="triton", **kw).cpu()
    fused = A.augment_views(views, r, MEAN, STD, impl="fused", **kw)
    torch.testing.assert_close(triton_out, fused, rtol=0, atol=ATOL)
    for impl in ("triton", "fused", "torch"):
        half = A.augment_views(on_device if impl == "triton" else views, r, MEAN, STD, impl=impl, dtype=torch.bfloat16,
                               **kw).cpu()
        assert half.dtype == torch.bfloat16 and half.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(half.float(), fused, rtol=RTOL[torch.bfloat16], atol=HALF_ATOL)
    with pytest.raises(ValueError, match="impl"):
        A.augment_views(views, r, MEAN, STD, impl="cuda", **kw)
    # the DALI loader's semantics (quantize=True, radius=0) into its preallocated channels-last buffer
    dali = dict(quantize=True, radius=0, **kw)
    out = torch.empty(8, 10, 10, 3, dtype=torch.float16, device=DEVICE).permute(0, 3, 1, 2)
    assert A.augment_views(on_device, r, MEAN, STD, impl="triton", out=out, **dali) is out
    fused = A.augment_views(views, r, MEAN, STD, impl="fused", **dali)
    diff = (out.cpu().float() - fused).abs()  # as the quantised test above, plus float16 rounding
    assert (diff > HALF_ATOL + RTOL[torch.float16] * fused.abs()).float().mean() < 0.01
    assert diff.max() < 1.01 / 255 / min(STD)
    with pytest.raises(ValueError, match="quantize"):
        A.augment_views(views, r, MEAN, STD, impl="torch", **dali)


def test_bad_inputs():
    views = _crops(2, 8, 8, seed=18)
    p = _params(2, seed=19)
    with pytest.raises(ValueError, match="params"):
        T.augment_crops_triton(views, p[:1], MEAN, STD)
    with pytest.raises(ValueError, match="uint8"):
        T.augment_crops_triton([views[0].float()], p, MEAN, STD)
    with pytest.raises(ValueError, match="dtype"):
        T.augment_crops_triton(views, p, MEAN, STD, dtype=torch.float64)
    with pytest.raises(ValueError, match="out"):  # NCHW-contiguous, not channels-last
        T.augment_crops_triton(views, p, MEAN, STD, out=torch.empty(2, 3, 8, 8))


def test_compiles_for_a100_and_h100_without_spills():
    """What the interpreter cannot check: both kernels compile for sm_80 and sm_90 (Triton's compiler and
    bundled ptxas, no GPU needed; a child process without TRITON_INTERPRET) and spill no registers."""
    code = ("import json, torch; from pipelines.augment_triton import aot_report; "
            "print(json.dumps(aot_report(80, torch.bfloat16) + aot_report(90, torch.float32)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.splitlines()[-1])
    assert len(rows) == 6
    for row in rows:
        assert row["stack_bytes"] == 0 and row["local_bytes"] == 0, row


def test_bench_counts_launches_and_bytes(tmp_path):
    from pipelines.bench_augment import main

    out = tmp_path / "bench.json"
    assert main(["--batch", "16", "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    chain, fused = report["rows"]["torch.where chain"], report["rows"]["fused triton"]
    assert fused["launches"] == 4 and chain["launches"] > 100 * fused["launches"]
    assert fused["bytes_written"] <= 2 * report["floor_bytes"] < chain["bytes_written"]
    for argv in (["--batch", "0"], ["--json", str(tmp_path / "no" / "such.json")]) + \
            ((["--device", "cuda"],) if not torch.cuda.is_available() else ()):
        assert main(argv) == 2  # a user error: one line, exit 2


@requires_cuda
def test_cuda_default_path_equals_the_tensor_ops():
    views = [v.cuda() for v in _crops(16, 96, 96, seed=20, views=2)]
    r = CropRecipe(96, (0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2))
    p = A.draw_params(32, r, torch.Generator().manual_seed(21))
    ours = A.augment_views(views, r, MEAN, STD, params=p)
    ref = A.augment_views(views, r, MEAN, STD, params=p, impl="torch")
    torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL)
