"""DALI loader (pipelines/dali.py) on the CPU (device_id=None): contract, parity with the reference
loader crop by crop, sharding, odd and corrupt files, the trainer on data.backend=dali; the graph's size
(decode + resize only, flat in the batch size), the batched draws equal to the per-sample ones, the
pipelined executor's exits (early close, a new epoch, a DALI error, SIGTERM) and exact resume; GPU decode
when CUDA is present."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
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


@pytest.mark.parametrize("augment", ["auto", "graph", "host"])
def test_batch_contract_and_determinism(colour_folder, augment):
    cfg = _cfg(colour_folder, dali_augment=augment)
    loader = D.DaliMultiCropLoader(cfg, seed=3, rank=0, world=1)
    assert loader.augment == ("host" if augment == "host" else "auto")  # graph: the former in-graph mode = auto
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


@pytest.mark.parametrize("augment", ["auto", "host"])
@pytest.mark.parametrize("switch", [100, 0], ids=["mocov2-phase", "simclr-phase"])
def test_crops_match_the_reference_loader(colour_folder, switch, augment):
    """Same drawn choices as the reference; pixels agree up to kernel rounding (PIL uint8 vs DALI's resize
    and the fused kernels), through augment_views (auto) and the fused CPU kernel (host)."""
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("augment", ["auto", "host"])
def test_gpu_epochs_close_early_resume_exactly_and_give_the_model_dtype(colour_folder, augment):
    """On a GPU (nvJPEG, DALI's output copied stream-ordered, the fused kernel on the stream): the graph is the
    CPU's, an epoch closed after one batch leaves nothing behind, a resumed epoch equals the tail of the full
    one, and dtype=bfloat16 is the float32 output rounded."""
    cfg = _cfg(colour_folder, batch_size=20, dali_augment=augment)
    device = torch.cuda.current_device()
    loader = D.DaliMultiCropLoader(cfg, seed=2, rank=0, world=1, device_id=device)
    assert loader.operator_count == D.DaliMultiCropLoader(cfg, seed=2, rank=0, world=1).operator_count == 2 + 4 * 4
    full = _in_thread(lambda: [b.globals.cpu() for b in loader.epoch(1)])
    it = loader.epoch(1)
    next(it)
    _in_thread(it.close, timeout=60)
    assert all(torch.equal(a, b.globals.cpu()) for a, b in zip(full[2:], _in_thread(lambda: list(loader.epoch(1, 2)))))
    half = D.DaliMultiCropLoader(cfg, seed=2, rank=0, world=1, device_id=device, dtype=torch.bfloat16)
    batch = next(half.epoch(1))
    assert batch.globals.dtype == torch.bfloat16 and batch.globals.is_cuda
    assert batch.globals.is_contiguous(memory_format=torch.channels_last)
    assert (batch.globals.float().cpu() - full[0]).abs().max() < 0.05  # bfloat16 rounding of values up to ~2.6


def test_loader_bench_prints_table_and_json(colour_folder, tmp_path, capsys):
    from pipelines.bench import main

    out = tmp_path / "bench.json"
    assert main(["--data", str(colour_folder), "--batch", "10", "--batches", "2", "--workers", "1",
                 "--global-size", "32", "--local-crops", "2", "--local-size", "16", "--json", str(out),
                 "--backend", "reference,dali"]) == 0
    result = json.loads(out.read_text())
    assert [r["backend"] for r in result["rows"]] == ["reference", "dali"]
    assert all(r["samples_per_s"] > 0 for r in result["rows"]) and result["rows"][0]["vs_reference"] == 1.0
    assert result["rows"][1]["dali_operators"] == 2 + 4 * 4 and "dali_operators" not in result["rows"][0]
    out = capsys.readouterr().out
    assert "vs reference" in out and "DALI graph: 18 operators" in out


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


def test_graph_only_decodes_and_resizes_and_its_size_is_flat_in_the_batch():
    """The DALI graph: the decoder, then per crop slot its ROI input and one resize; the operator count does
    not depend on the batch size and grows by the same 4 operators per slot (the in-graph augmentations of
    2 x 224 + 6 x 96 crops were 3,770 operators, 2,640 of them arithmetic)."""
    def count(batch, crops, kinds=False):
        pipe = D.build_pipeline(batch, [32] * 2 + [16] * (crops - 2), 1, None, 0)
        pipe.build()
        if kinds:
            return sorted({type(op._op).__name__ for op in pipe._ops})
        return D.operator_count(pipe)

    assert count(4, 8) == count(16, 8) == count(512, 8) == 2 + 4 * 8
    assert count(4, 2) == count(16, 2) == 2 + 4 * 2
    assert count(4, 3) - count(4, 2) == count(16, 8) - count(16, 7) == 4
    assert count(4, 8, kinds=True) == ["ExternalSource", "Image", "Resize", "_TensorSubscript"]  # no arithmetic


def _odd_sizes(n, rng):
    """Image sizes of every kind the box sampler meets: ImageNet-like, tiny, 1-pixel-wide, extreme panoramas
    (every try misses: the centred fallback, and more draws than the batched generator plans for)."""
    width = rng.integers(1, 1500, n)
    height = rng.integers(1, 1500, n)
    width[::5], height[::5] = 500, 375
    width[1::17], height[1::17] = 1, 1
    width[2::19], height[2::19] = 2, 10000
    width[3::23], height[3::23] = 10000, 3
    width[4::29] = 1
    return width, height


@pytest.mark.parametrize("local_crops,switch,seed", [(6, 100, 0), (6, 0, 5), (0, 100, 2 ** 40 + 17), (2, 0, 123456789)])
def test_batched_draws_equal_the_per_sample_draws(local_crops, switch, seed):
    """draw_crop_vectors (numpy's SeedSequence / PCG64 / Generator computed over the batch) gives exactly the
    vectors of default_rng([seed, epoch, index]) + draw_crop_params per sample, on 1,500 samples."""
    rng = np.random.default_rng(seed % 1000)
    n = 1500
    index = rng.permutation(1_300_000)[:n]
    width, height = _odd_sizes(n, rng)
    cfg = DataConfig(local_crops=local_crops, aug_switch_epoch=switch, blur_p=0.5 if seed % 2 else 1.0)
    for epoch in (0, 7):
        global_recipe, local_recipe = R.crop_recipes(cfg, epoch)
        recipes = [global_recipe] * 2 + [local_recipe] * local_crops
        batched = D.draw_crop_vectors(seed, epoch, index, width, height, recipes)
        one_by_one = np.stack([D.sample_crop_vectors(seed, epoch, int(i), int(w), int(h), recipes)
                               for i, w, h in zip(index, width, height)], axis=1)
        assert batched.shape == (2 + local_crops, n, D.NUM_PARAMS) and batched.dtype == np.float32
        assert np.array_equal(batched, one_by_one)
    probe = D.draw_crop_vectors(seed, 3, index, width, height, None)  # the linear-probe view
    assert np.array_equal(probe[0], np.stack([D.crop_param_vector(R.probe_crop_params(seed, 3, int(i), int(w), int(h)),
                                                                  int(w), int(h)) for i, w, h in zip(index, width, height)]))


def test_batch_generator_follows_numpy_method_by_method():
    """The batched generator against numpy.random.default_rng([seed, epoch, index]) per row on 4,000 rows:
    random, integers(0, high) (high 1 draws nothing; 32-bit draws share a 64-bit output), permutation(4)
    (rejections included), uniform, in an interleaved order, and the stream position after them."""
    n = 4000
    rng = np.random.default_rng(11)
    index = rng.permutation(10 ** 6)[:n]
    high_a, high_b = rng.integers(1, 3000, n), rng.integers(1, 4, n)
    high_b[::3] = 1
    gen = D._BatchGenerator(np.stack([np.full(n, 9), np.full(n, 4), index], axis=1).astype(np.uint32), 4)
    every = np.ones(n, bool)
    first = gen.doubles(1)[:, 0]
    gen.advance(1)
    draw_a, draw_b = high_a > 1, high_b > 1
    halves = gen.halves(2)
    a = gen.lemire(halves[:, 0], high_a - 1, draw_a)
    b = gen.lemire(np.where(draw_a, halves[:, 1], halves[:, 0]), high_b - 1, draw_b)
    gen.take_halves(draw_a.astype(np.int64) + draw_b)
    order = gen.permutation4(every)
    second = 0.3 + (1.7 - 0.3) * gen.doubles(1)[:, 0]
    gen.advance(1)
    again = gen.permutation4(index % 2 == 0)
    last = gen.halves(1)[:, 0]
    assert not gen.diverged.any()
    for i in range(n):
        numpy = np.random.default_rng([9, 4, int(index[i])])
        assert numpy.random() == first[i]
        assert numpy.integers(0, high_a[i]) == a[i] and numpy.integers(0, high_b[i]) == b[i]
        assert numpy.permutation(4).tolist() == order[i].tolist()
        assert numpy.uniform(0.3, 1.7) == second[i]
        assert (numpy.permutation(4) if index[i] % 2 == 0 else np.arange(4)).tolist() == again[i].tolist()
        assert numpy.integers(0, 2 ** 32, dtype=np.uint64) == last[i]  # the next 32-bit draw as it is


def test_batched_draws_redraw_diverged_samples_one_by_one(monkeypatch):
    """A sample whose draws leave the batched path (a Lemire rejection, a long run of permutation rejections:
    rare) is drawn again one by one: forced here on every third sample, the vectors stay exact."""
    original = D._BatchGenerator.lemire

    def lemire(self, value, span, draw):  # flags every third sample and spoils its draw
        out = original(self, value, span, draw)
        self.diverged[::3] = True
        out[::3] += 1
        return out

    monkeypatch.setattr(D._BatchGenerator, "lemire", lemire)
    rng = np.random.default_rng(1)
    width, height = _odd_sizes(90, rng)
    recipes = list(R.crop_recipes(DataConfig(local_crops=2), 0))
    recipes = recipes[:1] * 2 + recipes[1:] * 2
    got = D._batched_crop_vectors(4, 1, np.arange(90), width, height, recipes)
    want = np.stack([D.sample_crop_vectors(4, 1, i, int(w), int(h), recipes) for i, (w, h) in
                     enumerate(zip(width, height))], axis=1)
    assert np.array_equal(got, want)


def test_batched_draws_take_a_fraction_of_the_per_sample_time():
    """The host preparation of a 512-image batch of 2 + 6 crops (file reads excluded): a few milliseconds
    batched against about 0.1 to 0.2 s one sample at a time on a 2-core machine (docs/loaders.md)."""
    cfg = DataConfig(local_crops=6)
    global_recipe, local_recipe = R.crop_recipes(cfg, 1)
    recipes = [global_recipe] * 2 + [local_recipe] * 6
    rng = np.random.default_rng(0)
    width, height = (rng.uniform(0.6, 1.6, 512) * 500).astype(int), (rng.uniform(0.6, 1.6, 512) * 375).astype(int)
    D.draw_crop_vectors(0, 1, np.arange(512), width, height, recipes)  # the once-per-process check

    def best(fn, repeats=3):
        times = []
        for r in range(repeats):
            start = time.perf_counter()
            fn(r)
            times.append(time.perf_counter() - start)
        return min(times)

    batched = best(lambda r: D.draw_crop_vectors(0, 1, np.arange(512) + 512 * r, width, height, recipes))
    single = best(lambda r: [D.sample_crop_vectors(0, 1, 512 * r + i, int(w), int(h), recipes)
                             for i, (w, h) in enumerate(zip(width, height))], repeats=2)
    assert batched < single / 4, (batched, single)


def test_augmented_crops_equal_the_host_kernels(colour_folder):
    """auto (through augment_views) and host (the fused CPU kernel) make the same pixels from the same uint8
    crops: the DALI semantics, quantised jitter and the 2 ceil(3 sigma) + 1 blur window; the old value
    `graph` is auto; dtype gives the model's input dtype."""
    cfg = _cfg(colour_folder, aug_switch_epoch=0)
    host = next(D.DaliMultiCropLoader(cfg, seed=4, rank=0, world=1, augment="host").epoch(2))
    for augment in ("auto", "graph"):
        ours = next(D.DaliMultiCropLoader(cfg, seed=4, rank=0, world=1, augment=augment).epoch(2))
        assert torch.equal(ours.index, host.index)
        assert torch.equal(ours.globals, host.globals) and torch.equal(ours.locals, host.locals)
    half = next(D.DaliMultiCropLoader(cfg, seed=4, rank=0, world=1, dtype=torch.bfloat16).epoch(2))
    assert half.globals.dtype == half.locals.dtype == torch.bfloat16
    assert half.globals.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(half.globals, host.globals.to(torch.bfloat16))


def test_augment_views_gets_the_dali_semantics_and_the_output_buffer(colour_folder, monkeypatch):
    """Once augment_views takes quantize / radius / dtype / out, the loader passes DALI's semantics and one
    preallocated channels-last tensor per resolution, and returns that tensor."""
    from pipelines import augment as A
    from pipelines.cpu_augment import augment_crops

    calls = []

    def augment_views(views, recipe, mean, std, generator=None, impl="auto", threads=None, params=None,
                      quantize=False, radius=6, dtype=torch.float32, out=None):
        calls.append((len(views), quantize, radius, dtype, out))
        result = augment_crops(views, params.numpy(), mean, std, quantize=quantize, radius=radius, threads=threads)
        return out.copy_(result)

    monkeypatch.setattr(A, "augment_views", augment_views)
    monkeypatch.setattr(D, "_augment_views_keywords", lambda: frozenset({"quantize", "radius", "dtype", "out"}))
    cfg = _cfg(colour_folder)
    batch = next(D.DaliMultiCropLoader(cfg, seed=1, rank=0, world=1, dtype=torch.float16).epoch(0))
    # the first batch's two resolutions (the loader may already be preparing the next batch)
    assert len(calls) % 2 == 0 and set(c[:4] for c in calls) == {(2, True, 0, torch.float16)}
    assert calls[0][4].shape == (60, 3, 32, 32) and calls[0][4].is_contiguous(memory_format=torch.channels_last)
    assert batch.globals.data_ptr() == calls[0][4].data_ptr() and batch.locals.data_ptr() == calls[1][4].data_ptr()
    host = next(D.DaliMultiCropLoader(cfg, seed=1, rank=0, world=1, augment="host").epoch(0))
    assert torch.equal(batch.globals, host.globals.to(torch.float16))


def _in_thread(fn, timeout=120):
    """fn() on a thread; fails the test if it has not returned within `timeout` seconds (a hang)."""
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 -- re-raised below
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"did not return within {timeout} s"
    if "error" in result:
        raise result["error"]
    return result.get("value")


@pytest.mark.parametrize("augment", ["auto", "host"])
def test_early_close_new_epochs_and_resume_are_exact(colour_folder, augment):
    """An epoch closed after any batch (a stop signal), dropped without close, or replaced by a new epoch
    leaves nothing behind in DALI or on the helper threads: the next epoch's batches are exactly those of a
    fresh loader, and an epoch resumed at step s equals steps s.. of the full epoch."""
    cfg = _cfg(colour_folder, batch_size=20, dali_augment=augment)  # 4 steps
    full = _in_thread(lambda: list(D.DaliMultiCropLoader(cfg, seed=6, rank=0, world=1).epoch(1)))
    assert len(full) == 4
    loader = D.DaliMultiCropLoader(cfg, seed=6, rank=0, world=1)

    def same(batches, start=0):
        return all(torch.equal(a.globals, b.globals) and torch.equal(a.locals, b.locals) and torch.equal(a.index, b.index)
                   for a, b in zip(batches, full[start:]))

    for taken in (0, 1, 3):
        it = loader.epoch(1)
        for _ in range(taken):
            next(it)
        start = time.perf_counter()
        _in_thread(it.close, timeout=60)
        assert time.perf_counter() - start < 30
    it = loader.epoch(0)
    next(it)
    del it  # dropped: closed by the garbage collector
    abandoned = loader.epoch(0)
    next(abandoned)
    replacement = loader.epoch(1)  # a new epoch ends the previous iterator
    with pytest.raises(StopIteration):
        next(abandoned)
    assert same(_in_thread(lambda: list(replacement)))
    for step in (1, 3):
        assert same(_in_thread(lambda: list(loader.epoch(1, start_step=step))), start=step)
    loader.close()


def test_a_dali_decode_error_is_one_line_naming_the_file_and_the_next_epoch_runs(tmp_path):
    """A JPEG whose header parses and which ends with its marker but which DALI cannot decode (Huffman
    tables wiped) stops the epoch with one line naming the file; the pipeline is rebuilt for the next."""
    folder = tmp_path / "a"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
    good = (folder / "3.jpg").read_bytes()
    data = bytearray(good)
    at = data.find(b"\xff\xc4")
    while at >= 0:
        length = int.from_bytes(data[at + 2:at + 4], "big")
        data[at + 4:at + 2 + length] = bytes(length - 2)
        at = data.find(b"\xff\xc4", at + 2 + length)
    (folder / "3.jpg").write_bytes(bytes(data))
    cfg = DataConfig(train_dir=str(tmp_path), batch_size=4, workers=1, global_size=16, local_crops=1, local_size=8)
    loader = D.DaliMultiCropLoader(cfg, seed=0, rank=0, world=1)
    with pytest.raises(RuntimeError) as error:
        _in_thread(lambda: list(loader.epoch(0)))
    message = str(error.value)
    assert "\n" not in message and f"'{folder / '3.jpg'}'" in message and message.startswith("DALI failed on")
    (folder / "3.jpg").write_bytes(good)
    assert len(_in_thread(lambda: list(loader.epoch(1)))) == 2


def test_sigterm_during_dali_training_checkpoints_and_resumes_exactly(colour_folder, tmp_path):
    """SIGTERM to a run on data.backend=dali: the step in progress finishes, the checkpoint is written, the
    process exits 0 without hanging on DALI's pipelined executor; resuming gives the state of a run that
    never stopped (the same crops after the resume)."""
    from conftest import THREADS

    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONPATH=str(ROOT))

    def args(out):
        return ["--config", str(ROOT / "configs" / "cpu_smoke.yaml"), f"train.out_dir={out}", "data.backend=dali",
                f"data.train_dir={colour_folder}", "data.workers=2", "data.batch_size=10", "data.local_crops=1",
                "train.epochs=50", "train.log_interval=1"]

    def steps(out):
        path = out / "log.jsonl"
        return [] if not path.exists() else [json.loads(line)["step"] for line in path.read_text().splitlines()
                                             if line.strip() and "loss" in json.loads(line)]

    run, straight = tmp_path / "run", tmp_path / "straight"
    proc = subprocess.Popen([sys.executable, "-m", "wcl_fast.train", *args(run)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(steps(run)) < 2:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "stop requested (SIGTERM)" in err and "Traceback" not in err, err[-3000:]
    stopped_at = torch.load(run / "checkpoint.pt", weights_only=False)["global_step"]
    target = stopped_at + 4  # across an epoch boundary (9 steps per epoch) for most stop points
    runs = [subprocess.Popen([sys.executable, "-m", "wcl_fast.train", *args(out), *extra, f"train.stop_at_step={target}"],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for out, extra in ((run, ["train.resume=auto"]), (straight, []))]  # side by side
    for done in runs:
        _, err = done.communicate(timeout=600)
        assert done.returncode == 0, err[-3000:]
    a, b = (torch.load(out / "checkpoint.pt", weights_only=False) for out in (run, straight))
    assert a["global_step"] == b["global_step"] == target
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
