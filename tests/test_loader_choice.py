"""data.backend=auto (which loader runs, why, and where that is recorded), the shipped configs' fast
path, and the trainer's console output off a terminal (one plain line per log interval, no redraws)."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import requires_cuda, write_colour_folder
from pipelines import choose_backend, resolve_backend
from wcl_fast.config import DataConfig, check_paths, load_config
from wcl_fast.log import format_duration, interval_line, use_progress_bar
from wcl_fast.train import train

ROOT = Path(__file__).resolve().parent.parent
IMAGENET_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if "imagenet" in p.name or p.stem == "official_parity")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_colour_folder(tmp_path_factory.mktemp("choice"), classes=2, per_class=16)


@pytest.mark.parametrize("cuda,dali,expected", [(True, True, "dali"), (True, False, "reference"),
                                                (False, True, "reference"), (False, False, "reference")])
def test_auto_choice_follows_cuda_and_dali(cuda, dali, expected):
    choice = choose_backend(DataConfig(), cuda_available=cuda, dali_available=dali)
    assert (choice.requested, choice.backend) == ("auto", expected)
    if expected == "dali":
        assert choice.warning == "" and "nvJPEG" in choice.reason and "mixed" in choice.reason
        return
    # the fallback says why, in one line, and how to get a fast loader
    assert choice.warning.startswith("warning: data.backend=auto chose the reference PIL loader")
    assert "\n" not in choice.warning and "pipelines.convert" in choice.warning and "data.beton" in choice.warning
    assert ("no CUDA GPU" in choice.warning) == (not cuda)
    assert ("pip install nvidia-dali" in choice.warning) == (not dali)
    if not cuda:
        assert "data.backend=dali" in choice.warning


def test_auto_prefers_ffcv_when_a_beton_is_set_and_keeps_explicit_backends():
    assert choose_backend(DataConfig(beton="train.beton"), cuda_available=True, dali_available=True).backend == "ffcv"
    for backend in ("reference", "dali", "ffcv", "synthetic"):
        choice = choose_backend(DataConfig(backend=backend), cuda_available=True, dali_available=True)
        assert (choice.backend, choice.warning) == (backend, "") and "explicitly" in choice.reason


def test_cuda_branch_of_the_choice_reaches_the_config(monkeypatch, folder):
    import pipelines

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pipelines, "_importable", lambda module: module == "nvidia.dali")
    cfg = load_config(None, [f"data.train_dir={folder}"])
    assert cfg.data.backend == "auto"
    check_paths(cfg)  # auto without data.beton needs data.train_dir, as dali and reference do
    choice = resolve_backend(cfg)
    assert cfg.data.backend == choice.backend == "dali"
    assert resolve_backend(cfg).reason == "data.backend set explicitly"  # resolving again keeps the choice
    monkeypatch.setattr(pipelines, "_importable", lambda module: False)  # CUDA without DALI
    cfg = load_config(None, [f"data.train_dir={folder}"])
    choice = resolve_backend(cfg)
    assert cfg.data.backend == choice.backend == "reference" and choice.reason == "auto: DALI not installed"


def test_check_paths_for_auto_with_a_beton(tmp_path):
    from wcl_fast.config import ConfigError

    with pytest.raises(ConfigError, match="data.beton: .*missing.beton"):
        check_paths(load_config(None, [f"data.beton={tmp_path / 'missing.beton'}"]))


def test_default_and_every_imagenet_config_use_auto_and_the_headline_multicrop_runs_knn():
    assert DataConfig().backend == "auto" and len(IMAGENET_CONFIGS) >= 10
    for path in IMAGENET_CONFIGS:
        assert load_config(path).data.backend == "auto", path.name
    headline = load_config(ROOT / "configs" / "imagenet_wcl_multicrop_200ep.yaml")
    inherit = load_config(ROOT / "configs" / "imagenet_wcl_multicrop_inherit_200ep.yaml")
    assert headline.data.local_crops == inherit.data.local_crops == 6
    assert (headline.loss.multicrop_rule, inherit.loss.multicrop_rule) == ("knn", "inherit")
    slurm = (ROOT / "scripts" / "slurm_train.sh").read_text()
    assert 'data.backend=${BACKEND:-dali}' in slurm and "pipelines.convert" in slurm


def test_trainer_records_the_choice_and_warns_off_the_fast_path(tmp_path, folder, capsys, monkeypatch):
    import pipelines

    monkeypatch.setattr(pipelines, "_importable", lambda module: False)
    cfg = load_config(ROOT / "configs" / "cpu_smoke.yaml",
                      ["data.backend=auto", f"data.train_dir={folder}", "data.batch_size=8", "data.local_crops=0",
                       "train.epochs=2", "train.stop_at_step=3", "train.log_interval=1", f"train.out_dir={tmp_path}",
                       "train.progress=true"])
    train(cfg)
    err = capsys.readouterr().err
    saved = (tmp_path / "config.yaml").read_text()
    assert saved.startswith("# loader: reference (auto: no CUDA GPU, DALI not installed)")
    assert load_config(tmp_path / "config.yaml").data.backend == "reference"
    first = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert first["loader"] == "reference" and first["loader_requested"] == "auto" and "no CUDA" in first["loader_reason"]
    assert "loader: reference (auto: no CUDA GPU" in err
    assert sum(line.startswith("warning: data.backend=auto chose the reference PIL loader") for line in err.splitlines()) == 1
    # not a terminal (captured): no progress-bar redraws, one plain line per log interval, with ETAs
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("epoch 0/2 step")]
    assert len(lines) == 3, err
    pattern = (r"epoch 0/2 step (\d)/4 loss \d+\.\d{4} \(nce \d+\.\d{4}, graph \d+\.\d{4}\) lr \d+\.\d{4} "
               r"\d+\.\d samples/s data-wait \d+\.\d% ETA epoch \S+ run \S+$")
    assert [int(re.match(pattern, line).group(1)) for line in lines] == [1, 2, 3], lines


def test_progress_bar_on_a_terminal_shows_the_run_eta(tmp_path, capsys, monkeypatch):
    import wcl_fast.train as trainer

    monkeypatch.setattr(trainer, "use_progress_bar", lambda enabled: enabled)  # as if on a terminal
    train(load_config(ROOT / "configs" / "cpu_smoke.yaml", ["train.stop_at_step=2", "train.log_interval=1",
                                                          f"train.out_dir={tmp_path}", "train.progress=true"]))
    err = capsys.readouterr().err
    assert "\r" in err and "run_eta=" in err and not re.search(r"^epoch 0/2 step", err, re.M)


class _Stream:
    def __init__(self, tty):
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_bar_only_when_both_streams_are_terminals():
    assert use_progress_bar(True, (_Stream(True), _Stream(True)))
    assert not use_progress_bar(False, (_Stream(True), _Stream(True)))
    assert not use_progress_bar(True, (_Stream(False), _Stream(True)))  # stdout to a file (SLURM, | tee)
    assert not use_progress_bar(True, (_Stream(True), _Stream(False)))
    assert not use_progress_bar(True, (object(), _Stream(True)))  # a stream without isatty


def test_interval_line_and_durations():
    assert [format_duration(s) for s in (0, 42.4, 59.6, 425, 3600 * 3 + 125, 86400 * 2 + 3600 * 4 + 59,
                                         float("nan"), float("inf"), -1)] == \
        ["0s", "42s", "1m00s", "7m05s", "3h02m", "2d04h", "?", "?", "?"]
    record = {"loss": 5.43214, "nce": 3.21, "graph": 2.22214, "lr": 4.8, "samples_per_s": 1873.24, "data_wait": 0.0123}
    assert interval_line(3, 200, 120, 312, record, ["loss", "nce", "graph"], 123.0, 93600.0) == (
        "epoch 3/200 step 120/312 loss 5.4321 (nce 3.2100, graph 2.2221) lr 4.8000 1873.2 samples/s "
        "data-wait 1.2% ETA epoch 2m03s run 1d02h")
    assert interval_line(0, 1, 1, 2, record, ["loss"], 1, 1).startswith("epoch 0/1 step 1/2 loss 5.4321 lr 4.8000")


def test_loader_bench_auto_row_names_its_choice(folder, tmp_path, capsys):
    from pipelines.bench import main, per_gpu_target

    out = tmp_path / "bench.json"
    assert main(["--data", str(folder), "--batch", "8", "--batches", "2", "--workers", "1", "--global-size", "32",
                 "--local-crops", "0", "--json", str(out), "--backend", "reference,auto"]) == 0
    rows = json.loads(out.read_text())["rows"]
    expected = choose_backend(DataConfig()).backend
    assert [r["backend"] for r in rows] == ["reference", "auto"] and rows[1]["chosen"] == expected
    for row in rows:  # 1 worker: per core = samples/s; cores per GPU = target / per-core rate
        assert row["samples_per_s_per_core"] == pytest.approx(row["samples_per_s"])
        assert row["cores_per_gpu"]["H100"] == pytest.approx(per_gpu_target("H100") / row["samples_per_s"])
    assert per_gpu_target("H100") == pytest.approx(1_281_167 / (95 * 8))
    assert f"auto->{expected}" in capsys.readouterr().out


def test_photo_bench_folder_is_camera_jpegs_of_imagenet_size(tmp_path):
    from PIL import Image

    from pipelines.bench import write_photo_images

    root = write_photo_images(tmp_path / "photos", count=6)
    files = sorted(root.glob("*/*.jpg"))
    assert len(files) == 6
    for path in files:
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and sorted(img.size) == [375, 500]
            pixels = np.asarray(img.convert("L"), dtype=np.float32)
        assert pixels.std() > 20  # photographic content, not a flat field
    assert len({p.read_bytes() for p in files}) == 6


@requires_cuda
def test_auto_on_a_gpu_runs_dali_on_the_gpu(folder):
    pytest.importorskip("nvidia.dali")
    from pipelines import build_loader

    cfg = load_config(ROOT / "configs" / "cpu_smoke.yaml", ["data.backend=auto", f"data.train_dir={folder}",
                                                            "data.batch_size=8", "data.workers=2"])
    assert resolve_backend(cfg).backend == "dali"
    batch = next(build_loader(cfg, "train", 0, 1).epoch(0))
    assert batch.globals.is_cuda and batch.globals.shape == (16, 3, 32, 32)
