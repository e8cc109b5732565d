"""The related objectives inside the trainer: they train, log their terms, and resume bit-exactly
(EMA key encoder, key queue and K-means cluster table are checkpointed)."""
import json
from pathlib import Path

import pytest
import yaml
import torch

from wcl_fast.config import ConfigError, load_config
from wcl_fast.train import train

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "cpu_smoke.yaml"

OBJECTIVES = {
    "simclr": ["loss.objective=simclr"],
    "clinfonce-single-kmeans": ["loss.objective=clinfonce", "loss.clinfonce.kmeans_k=6", "loss.tau=0.2"],
    "clinfonce-dual-kmeans": ["loss.objective=clinfonce", "loss.clinfonce.form=dual", "loss.clinfonce.kmeans_k=6"],
    "co2-batch": ["loss.objective=co2"],
    "co2-queue": ["loss.objective=co2", "loss.co2.form=queue", "loss.momentum.queue_size=80"],
    "slr": ["loss.objective=slr", "loss.momentum.queue_size=80", "loss.tau=0.2"],
    "slr-asymmetric": ["loss.objective=slr", "loss.momentum.queue_size=80", "loss.momentum.symmetric=false"],
}


def _cfg(out_dir, *overrides):
    return load_config(SMOKE, [f"train.out_dir={out_dir}", "train.log_interval=1", *overrides])


def _log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def _flat(state, prefix=""):
    """Every tensor of a nested state dict, by dotted key."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif torch.is_tensor(value):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = torch.tensor(value)
    return out


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_objective_trains_and_logs_its_terms(tmp_path, name):
    summary = train(_cfg(tmp_path, "train.epochs=2", *OBJECTIVES[name]))
    records = [r for r in _log(tmp_path) if "loss" in r]
    assert len(records) == 8 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    two_heads = name.startswith("clinfonce-dual")
    assert any(k.startswith("head2.") for k in state["model"]) == two_heads
    if name in ("co2-queue", "slr", "slr-asymmetric"):
        assert state["objective"]["queue"]["keys"].shape == (80, 32)
        assert state["objective"]["queue"]["ptr"] == (8 * 32) % 80  # one global batch of keys per step
        online = state["model"]["net.conv1.weight"]
        key = state["objective"]["key_model"]["net.conv1.weight"]
        assert not torch.equal(online, key)  # the key encoder lags behind (EMA)
    if name.startswith("clinfonce"):
        clusters = state["objective"]["clusters"]
        assert clusters.shape == (128,) and int(clusters.max()) < 6
    for term in {"co2-batch": ["nce", "co2"], "co2-queue": ["nce", "co2"], "slr": ["nce", "mix"],
                 "clinfonce-dual-kmeans": ["nce", "cluster"]}.get(name, []):
        assert term in records[-1] and term in summary


@pytest.mark.parametrize("name", ["slr", "co2-queue", "clinfonce-dual-kmeans"])
def test_objective_state_resumes_exactly(tmp_path, name):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    extra = OBJECTIVES[name]
    train(_cfg(straight, "train.epochs=2", *extra))
    train(_cfg(interrupted, "train.epochs=2", "train.stop_at_step=3", *extra))
    train(_cfg(interrupted, "train.epochs=2", "train.resume=auto", *extra))
    a = {r["step"]: r["loss"] for r in _log(straight) if "loss" in r}
    b = {r["step"]: r["loss"] for r in _log(interrupted) if "loss" in r}
    assert sorted(a) == sorted(b) == list(range(1, 9)) and all(a[s] == b[s] for s in a), (a, b)
    final_a = torch.load(straight / "checkpoint.pt", weights_only=False)
    final_b = torch.load(interrupted / "checkpoint.pt", weights_only=False)
    for part in ("model", "objective"):
        flat_a, flat_b = _flat(final_a[part]), _flat(final_b[part])
        assert flat_a.keys() == flat_b.keys() and flat_a
        for key in flat_a:
            assert torch.equal(flat_a[key], flat_b[key]), (part, key)


def test_resume_with_another_objective_is_refused(tmp_path):
    train(_cfg(tmp_path, "train.epochs=1", "train.stop_at_step=1"))
    with pytest.raises(ConfigError, match="loss.objective='wcl' there, 'simclr' here"):
        train(_cfg(tmp_path, "train.epochs=1", "train.resume=auto", "loss.objective=simclr"))


def test_clinfonce_csv_clusters_through_the_trainer(tmp_path):
    table = tmp_path / "clusters.csv"
    table.write_text("index,attr\n" + "".join(f"{i},{'abc'[i % 3]}\n" for i in range(128)))
    train(_cfg(tmp_path / "run", "train.epochs=1", "loss.objective=clinfonce", f"loss.clinfonce.clusters_csv={table}",
               "loss.clinfonce.cluster_column=attr"))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["objective"]["clusters"].tolist() == [i % 3 for i in range(128)]
    with pytest.raises(ConfigError, match="no column 'nope'"):
        train(_cfg(tmp_path / "bad", "train.epochs=1", "loss.objective=clinfonce",
                   f"loss.clinfonce.clusters_csv={table}", "loss.clinfonce.cluster_column=nope"))


def test_knn_rule_is_refused_for_other_objectives():
    with pytest.raises(ConfigError, match="multicrop_rule"):
        load_config(SMOKE, ["loss.objective=slr", "loss.multicrop_rule=knn"])


def test_compare_prints_table_json_and_chart(tmp_path, capsys):
    """wcl_fast.compare on a tiny real image folder: one row per objective plus the untrained floor."""
    import numpy as np
    from PIL import Image

    from wcl_fast.compare import main

    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 5)):
        for label, colour in enumerate([(220, 30, 30), (30, 200, 40)]):
            folder = tmp_path / "data" / split / f"c{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    out = tmp_path / "out"
    code = main(["--config", str(ROOT / "configs" / "cpu_compare.yaml"), "--objectives", "simclr,wcl,slr", "--seeds", "2",
                 "--out", str(out), f"data.train_dir={tmp_path / 'data' / 'train'}",
                 f"data.val_dir={tmp_path / 'data' / 'val'}", "data.batch_size=8", "data.workers=0",
                 "train.epochs=1", "model.head_hidden=32", "model.head_out=16", "loss.momentum.queue_size=16",
                 "knn.k=5", "knn.batch_size=8", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
                 "compare.overrides=[slr:optim.lr_scale=0.5, slr:loss.slr.lam=0.25]"])
    assert code == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["objective_overrides"] == {"slr": ["optim.lr_scale=0.5", "loss.slr.lam=0.25"]}
    for name, lr_scale, lam in (("simclr", 0.075, 0.5), ("wcl", 0.075, 0.5), ("slr", 0.5, 0.25)):  # slr's runs only
        for seed in (0, 1):
            saved = yaml.safe_load((out / name / f"seed{seed}" / "config.yaml").read_text())
            assert (saved["optim"]["lr_scale"], saved["loss"]["slr"]["lam"]) == (lr_scale, lam), (name, seed)
    printed = capsys.readouterr().out
    assert "slr only (compare.overrides): optim.lr_scale=0.5 loss.slr.lam=0.25" in printed
    assert "[compare] slr seed 1: kNN top-1" in printed and "6 of 6 runs done" in printed
    assert "whole comparison: " in printed and result["wall_s"] > 0
    assert [r["objective"] for r in result["rows"]] == ["untrained", "simclr", "wcl", "slr"]
    assert result["knn"]["count"] == 10 and result["seeds"] == [0, 1]
    for row in result["rows"]:
        values = [run["knn_top1"] for run in row["runs"]]
        assert [run["seed"] for run in row["runs"]] == [0, 1]
        for value in values:  # 10 test images: multiples of 10 %
            assert 0 <= value <= 100 and value * 10 / 100 == pytest.approx(round(value / 10))
        mean = sum(values) / 2
        assert row["knn_top1"] == pytest.approx(mean)
        assert row["knn_top1_sd"] == pytest.approx(((values[0] - mean) ** 2 + (values[1] - mean) ** 2) ** 0.5)
    for name in ("simclr", "wcl", "slr"):  # every seed trained into its own folder
        assert all((out / name / f"seed{seed}" / "log.jsonl").is_file() for seed in (0, 1))
    rows = {r["objective"]: r for r in result["rows"]}
    relation = ">=" if rows["wcl"]["knn_top1"] >= rows["simclr"]["knn_top1"] else "<"
    assert result["verdict"].startswith(f"WCL {relation} SimCLR at matched tau")
    assert (out / "compare.png").stat().st_size > 1000 and (out / "curves.png").stat().st_size > 1000
    assert main(["--seeds", "0"]) == 2
    assert main(["--objectives", "moco"]) == 2
