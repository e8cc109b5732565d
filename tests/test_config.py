"""Typed config: values, overrides and one-line errors (also through the command line)."""
import subprocess
import sys
from pathlib import Path

import pytest

from wcl_fast.config import ConfigError, check_paths, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    load_config(path)


def test_reference_recipe_values():
    cfg = load_config(ROOT / "configs" / "imagenet_wcl_200ep.yaml")
    assert cfg.data.batch_size == 4096 and cfg.train.epochs == 200
    assert cfg.optim.lr_scale == 0.075 and cfg.optim.warmup_epochs == 10 and cfg.optim.weight_decay == 1e-6
    assert cfg.model.head_hidden == 4096 and cfg.model.head_out == 256 and cfg.loss.tau == 0.1
    parity = load_config(ROOT / "configs" / "official_parity.yaml")
    assert parity.model.forward == "per_view" and parity.optim.exclude_rule == "reference"
    assert parity.loss.gather == "detached" and parity.train.precision == "fp32"
    multi = load_config(ROOT / "configs" / "imagenet_wcl_multicrop_200ep.yaml")
    assert multi.data.local_crops == 6 and multi.data.local_size == 96


def test_overrides_and_types():
    cfg = load_config(None, ["train.epochs=30", "optim.base_lr=1", "data.global_scale=[0.2, 1]", "train.out_dir=123"])
    assert cfg.train.epochs == 30 and cfg.optim.base_lr == 1.0 and isinstance(cfg.optim.base_lr, float)
    assert cfg.data.global_scale == [0.2, 1.0] and cfg.train.out_dir == "123"


@pytest.mark.parametrize("override,fragment", [
    ("train.epoch=3", "unknown config key 'train.epoch'"),
    ("nosection.x=1", "unknown config key 'nosection'"),
    ("train.epochs=ten", "config key 'train.epochs': expected int"),
    ("train.epochs=1.5", "expected int"),
    ("model.arch=vgg16", "'vgg16' is not one of"),
    ("train.progress=maybe", "expected bool"),
    ("data.batch_size=0", "must be > 0"),
    ("data.local_scale=[0.5, 0.1]", "data.local_scale"),
    ("train", "not of the form key=value"),
])
def test_errors_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_missing_dataset_path_is_reported(tmp_path):
    cfg = load_config(None, [f"data.train_dir={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="data.train_dir"):
        check_paths(cfg)


def test_command_line_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wcl_fast.train", "--config", str(ROOT / "configs" / "cpu_smoke.yaml"),
                           "optim.lr=3"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown config key 'optim.lr'" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "wcl_fast.train", "--config", str(ROOT / "configs" / "cpu_demo.yaml"),
                           f"data.train_dir={tmp_path}/missing"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: data.train_dir")
    assert proc.stderr.strip().count("\n") == 0


def test_text_overrides_are_taken_literally():
    """A path may hold ' #', ': ' and spaces: YAML would cut '/runs/run #2' at the comment (and a run with
    train.resume=auto would then continue someone else's run in /runs/run)."""
    cfg = load_config(None, ["train.out_dir=/runs/run #2", "data.train_dir=/data/a: b/c d", "train.resume=none",
                             "optim.base_lr=null", "data.global_scale=[0.2, 1]", "train.epochs=17", "data.backend=synthetic"])
    assert cfg.train.out_dir == "/runs/run #2" and cfg.data.train_dir == "/data/a: b/c d"
    assert cfg.train.resume == "none" and cfg.optim.base_lr is None and cfg.data.global_scale == [0.2, 1.0]
    assert cfg.train.epochs == 17 and cfg.data.backend == "synthetic"
    with pytest.raises(ConfigError, match="'data.backend': 'dali #fast' is not one of"):
        load_config(None, ["data.backend=dali #fast"])


@pytest.mark.parametrize("text, key, lines", [
    ("train:\n  epochs: 3\n  seed: 1\n  epochs: 5\n", "epochs", (2, 4)),
    ("train:\n  precision: fp32\nmodel:\n  arch: resnet18\ntrain:\n  epochs: 2\n", "train", (1, 5)),
])
def test_a_duplicate_key_or_section_is_one_error_naming_both_lines(tmp_path, text, key, lines):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"'{key}' appears twice" in message and f"lines {lines[0]} and {lines[1]}" in message
    assert str(path) in message and "\n" not in message


def test_a_config_that_is_not_utf8_or_is_a_folder_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# réglages\ntrain:\n  epochs: 3\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xe9 on line 1\); save it as UTF-8"):
        load_config(path)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "wcl_fast.train", "--config", str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "UTF-8" in proc.stderr
