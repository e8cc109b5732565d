"""DALI loader (pipelines/dali.py) on the CPU (device_id=None): contract, parity with the reference
loader crop by crop, sharding, odd and corrupt files, the trainer on data.backend=dali; GPU decode
when CUDA is present."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from conftest import write_colour_folder, write_odd_images  # noqa: E402
from pipelines import dali as D  # noqa: E402
from pipelines import pil as P  # noqa: E402
from pipelines import reference as R  # noqa: E402
from pipelines.batch import collate_multicrop  # noqa: E402
from pipelines.images import ImageSource  # noqa: E402
from pipelines.sampling import StepSampler  # noqa: E402
from wcl_fast.config import DataConfig, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """3 classes x 30 colourful JPEGs of varied sizes (smooth colour fields + noise)."""
    return write_colour_folder(tmp_path_factory.mktemp("colour"))


def _cfg(root, **kw):
    values = dict(train_dir=str(root), batch_size=30, workers=2, global_size=32, local_crops=2, local_size=16)
    values.update(kw)
    return DataConfig(**values)


@pytest.mark.parametrize("augment", ["graph", "host"])
def test_batch_contract_and_determinism(colour_folder, augment):
    cfg = _cfg(colour_folder, dali_augment=augment)
    loader = D.DaliMultiCropLoader(cfg, seed=3, rank=0, world=1)
    assert loader.augment == augment
    assert len(loader) == 3 and loader.num_samples == 90
    batch = next(loader.epoch(0))
    assert batch.globals.shape == (60, 3, 32, 32) and batch.locals.shape == (60, 3, 16, 16)
    assert batch.globals.dtype == torch.float32 and batch.globals.is_contiguous(memory_format=torch.channels_last)
    low = min((0 - m) / s for m, s in zip(cfg.mean, cfg.std))
    high = max((1 - m) / s for m, s in zip(cfg.mean, cfg.std))
    assert batch.globals.min() >= low - 1e-4 and batch.globals.max() <= high + 1e-4
    perm = StepSampler(90, 30, 0, 1, 3).permutation(0)[:30]
    assert batch.index.tolist() == perm.tolist()  # the trainer's global permutation, no shuffle buffer
    assert batch.label.tolist() == [loader.samples[i][1] for i in perm.tolist()]
    again = next(D.DaliMultiCropLoader(cfg, seed=3, rank=0, world=1).epoch(0))
    assert torch.equal(batch.globals, again.globals) and torch.equal(batch.locals, again.locals)
    resumed = next(loader.epoch(0, start_step=1))  # a resumed epoch starts at its step
    second = list(loader.epoch(0))[1]
    assert torch.equal(resumed.globals, second.globals)
    assert not torch.equal(batch.globals[:30], batch.globals[30:])  # the two views differ


@pytest.mark.parametrize("augment", ["graph", "host"])
@pytest.mark.parametrize("switch", [100, 0], ids=["mocov2-phase", "simclr-phase"])
def test_crops_match_the_reference_loader(colour_folder, switch, augment):
    """Same drawn choices as the reference; pixels agree up to kernel rounding (PIL uint8 vs DALI float),
    with the augmentations in the DALI graph and in the fused CPU kernel."""
    cfg = _cfg(colour_folder, aug_switch_epoch=switch, batch_size=90, dali_augment=augment)
    loader = D.DaliMultiCropLoader(cfg, seed=0, rank=0, world=1)
    batch = next(loader.epoch(1))
    dataset = P.MultiCropDataset(ImageSource(loader.samples), cfg, seed=0)
    ref = collate_multicrop([dataset[(1, i)] for i in batch.index.tolist()])
    for ours, theirs in ((batch.globals, ref.globals), (batch.locals, ref.locals)):  # 180 + 180 crops
        per_crop = (ours - theirs).abs().flatten(1).mean(1)
        assert per_crop.max() < 0.08, per_crop.max()  # < 4/255 grey levels on average in every crop
        np.testing.assert_allclose(ours.mean((0, 2, 3)), theirs.mean((0, 2, 3)), atol=0.01)
        np.testing.assert_allclose(ours.std((0, 2, 3)), theirs.std((0, 2, 3)), rtol=0.02)
    # a wrong choice would show: e.g. not flipping the flipped crops
    flipped = [p.flip for i in batch.index.tolist() for p in _params(cfg, 1, i, loader)[:1]]
    assert 0.3 < np.mean(flipped) < 0.7


def _params(cfg, epoch, index, loader):
    path = loader.samples[index][0]
    width, height = Image.open(path).size
    rng = np.random.default_rng([0, epoch, index])
    recipes = R.crop_recipes(cfg, epoch)
    return [R.draw_crop_params(rng, width, height, recipes[0 if c < 2 else 1]) for c in range(2 + cfg.local_crops)]


def test_crop_statistics_and_frequencies(colour_folder):
    """Area fraction and aspect ratio within the configured ranges; grayscale and flip near p, from
    the DALI output itself (grey crops have equal channels)."""
    cfg = _cfg(colour_folder, batch_size=90, local_crops=0, global_scale=[0.2, 1.0])
    loader = D.DaliMultiCropLoader(cfg, seed=0, rank=0, world=1)
    crops, grey = 0, 0
    for epoch in range(3):  # 540 crops
        batch = next(loader.epoch(epoch))
        pixels = batch.globals * torch.tensor(cfg.std)[:, None, None] + torch.tensor(cfg.mean)[:, None, None]
        spread = (pixels.max(1).values - pixels.min(1).values).flatten(1).max(1).values
        grey += int((spread < 2 / 255).sum())
        crops += pixels.shape[0]
        for i in batch.index.tolist():
            width, height = Image.open(loader.samples[i][0]).size
            for p in _params(cfg, epoch, i, loader):
                top, left, h, w = p.box
                assert 0.2 * 0.9 <= h * w / (width * height) <= 1.0 and 3 / 4 * 0.85 <= w / h <= 4 / 3 * 1.15
    assert abs(grey / crops - 0.2) < 0.06, grey / crops


def test_two_shards_cover_each_epoch_once(colour_folder):
    cfg = _cfg(colour_folder, batch_size=20, local_crops=0)
    seen = []
    for rank in range(2):
        loader = D.DaliMultiCropLoader(cfg, seed=1, rank=rank, world=2)
        assert len(loader) == 4  # 90 // 20, drop_last
        seen.append([i for batch in loader.epoch(2) for i in batch.index.tolist()])
    assert len(seen[0]) == len(seen[1]) == 40 and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(StepSampler(90, 20, 0, 1, 1).permutation(2)[:80].tolist())


def test_odd_and_corrupt_files_are_decoded_or_skipped(tmp_path, capsys):
    write_odd_images(tmp_path / "a", ["cmyk.jpg", "gray.jpg", "palette.png", "alpha.png", "tiny.jpg", "ok.jpg",
                                      "truncated.jpg", "garbage.jpg"])
    cfg = DataConfig(train_dir=str(tmp_path), batch_size=8, workers=1, global_size=16, local_crops=1, local_size=8)
    loader = D.DaliMultiCropLoader(cfg, seed=0, rank=0, world=1)
    batch = next(loader.epoch(0))
    assert batch.failed == 2 and torch.isfinite(batch.globals).all()
    names = {Path(loader.samples[i][0]).name for i in batch.index.tolist()}
    assert names <= {"cmyk.jpg", "gray.jpg", "palette.png", "alpha.png", "tiny.jpg", "ok.jpg"}
    err = capsys.readouterr().err
    assert "garbage.jpg" in err and "truncated.jpg" in err
    dataset = P.MultiCropDataset(ImageSource(loader.samples), cfg, seed=0)
    requested = loader.sampler.permutation(0)[:8].tolist()
    compared = 0
    for row, (want, got) in enumerate(zip(requested, batch.index.tolist())):
        if want != got:  # a substituted sample: its crops are drawn for the requested index
            continue
        ref = dataset[(0, got)][0][0]  # decoded like PIL (CMYK, palette, alpha, grey, 1 x 1 included)
        assert (batch.globals[row] - ref).abs().mean() < 0.08, Path(loader.samples[got][0]).name
        compared += 1
    assert compared == 6


def test_trainer_runs_on_the_dali_backend(colour_folder, tmp_path):
    from wcl_fast.train import train

    cfg = load_config(ROOT / "configs" / "cpu_smoke.yaml", [
        "data.backend=dali", f"data.train_dir={colour_folder}", "data.batch_size=30", "data.workers=2",
        f"train.out_dir={tmp_path}", "train.log_interval=1", "train.epochs=1"])
    summary = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert summary["global_step"] == 3 and len(losses) == 3 and all(np.isfinite(losses))
    assert summary["failed_images"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_matches_the_cpu_pipeline(colour_folder):
    cfg = _cfg(colour_folder)
    cpu = next(D.DaliMultiCropLoader(cfg, seed=0, rank=0, world=1, device_id=None).epoch(0))
    gpu = next(D.DaliMultiCropLoader(cfg, seed=0, rank=0, world=1, device_id=torch.cuda.current_device()).epoch(0))
    assert gpu.globals.is_cuda and gpu.globals.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cpu.index, gpu.index)
    per_crop = (cpu.globals - gpu.globals.cpu()).abs().flatten(1).mean(1)
    assert per_crop.max() < 0.08  # nvJPEG vs libjpeg-turbo IDCT rounding, GPU kernels


def test_loader_bench_prints_table_and_json(colour_folder, tmp_path, capsys):
    from pipelines.bench import main

    out = tmp_path / "bench.json"
    assert main(["--data", str(colour_folder), "--batch", "10", "--batches", "2", "--workers", "1",
                 "--global-size", "32", "--local-crops", "2", "--local-size", "16", "--json", str(out),
                 "--backend", "reference,dali"]) == 0
    result = json.loads(out.read_text())
    assert [r["backend"] for r in result["rows"]] == ["reference", "dali"]
    assert all(r["samples_per_s"] > 0 for r in result["rows"]) and result["rows"][0]["vs_reference"] == 1.0
    assert "vs reference" in capsys.readouterr().out


def test_eval_transform_matches_the_reference_and_shards_exactly(colour_folder):
    from pipelines import build_eval_loader

    cfg = _cfg(colour_folder, backend="dali", eval_resize=36, eval_crop=32)
    ref_cfg = replace(cfg, backend="reference", workers=0)
    seen = []
    for rank in range(2):
        ours, total, classes = build_eval_loader(cfg, str(colour_folder), "data.val_dir", 16, rank, 2)
        theirs, _, _ = build_eval_loader(ref_cfg, str(colour_folder), "data.val_dir", 16, rank, 2)
        assert (total, classes) == (90, 3) and len(ours) == 3  # 45 per rank: 16 + 16 + 13, no padding
        for a, b in zip(ours, theirs):
            assert torch.equal(a.index, b.index) and torch.equal(a.label, b.label)
            assert a.globals.shape == b.globals.shape and a.globals.is_contiguous(memory_format=torch.channels_last)
            per_image = (a.globals - b.globals).abs().flatten(1).mean(1)
            assert per_image.max() < 0.03, per_image.max()  # same geometry; bilinear rounding only
            seen += a.index.tolist()
    assert sorted(seen) == list(range(90))


def test_knn_monitor_runs_on_dali_eval(colour_folder):
    from wcl_fast.knn import evaluate_knn
    from wcl_fast.model import build_model

    cfg = load_config(ROOT / "configs" / "cpu_smoke.yaml", [
        "data.backend=dali", f"data.train_dir={colour_folder}", f"data.val_dir={colour_folder}", "data.eval_resize=32",
        "data.eval_crop=32", "knn.k=5", "knn.batch_size=32"])
    ref_cfg = load_config(ROOT / "configs" / "cpu_smoke.yaml", [
        "data.backend=reference", f"data.train_dir={colour_folder}", f"data.val_dir={colour_folder}",
        "data.eval_resize=32", "data.eval_crop=32", "knn.k=5", "knn.batch_size=32", "data.workers=0"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ours = evaluate_knn(model.net, cfg, torch.device("cpu"))
    theirs = evaluate_knn(model.net, ref_cfg, torch.device("cpu"))
    assert ours["count"] == theirs["count"] == 90
    assert abs(ours["top1"] - theirs["top1"]) <= 100 * 3 / 90  # at most a few images decided differently


def test_linear_training_view_matches_the_reference_and_runs(colour_folder, tmp_path):
    """The linear-probe / fine-tuning training view in DALI: the same RandomResizedCrop + flip choices
    as pipelines.pil.LinearTrainDataset; linear probe and fine-tuning run on data.backend=dali."""
    from wcl_fast.finetune import finetune
    from pipelines.pil import LinearTrainDataset
    from wcl_fast.linear import train_linear

    cfg = _cfg(colour_folder, batch_size=30)
    loader = D.DaliMultiCropLoader(cfg, seed=2, rank=0, world=1, linear=True)
    batch = next(loader.epoch(1))
    assert batch.globals.shape == (30, 3, 32, 32) and batch.locals is None
    reference = LinearTrainDataset(ImageSource(loader.samples), cfg, seed=2)
    ref = torch.stack([reference[(1, i)][0][0] for i in batch.index.tolist()])
    per_image = (batch.globals - ref).abs().flatten(1).mean(1)
    assert per_image.max() < 0.05, per_image.max()
    subset = [3, 10, 20, 33, 47, 50, 61, 75, 80, 89]
    sub = D.DaliMultiCropLoader(cfg, seed=2, rank=0, world=1, linear=True, subset=subset, batch_size=5)
    assert sorted(i for b in sub.epoch(0) for i in b.index.tolist()) == subset

    overrides = ["data.backend=dali", f"data.train_dir={colour_folder}", f"data.val_dir={colour_folder}",
                 "data.workers=1", "data.global_size=32", "data.eval_resize=32", "data.eval_crop=32",
                 "model.arch=resnet18", "train.precision=fp32", "linear.epochs=1", "linear.batch_size=30",
                 "knn.batch_size=32", "finetune.epochs=1", "finetune.batch_size=9", "finetune.label_fraction=0.1"]
    result = train_linear(load_config(None, overrides))
    assert result["val_count"] == 90 and 0 <= result["top1"] <= 100
    tuned = finetune(load_config(None, overrides))
    assert tuned["val_count"] == 90
