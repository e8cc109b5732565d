"""Linear evaluation: separable data reaches ~100 %, and 2 processes count an odd validation set exactly."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wcl_fast.config import load_config
from wcl_fast.linear import train_linear

ROOT = Path(__file__).resolve().parent.parent
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 50, 230)]


@pytest.fixture(scope="module")
def colour_folders(tmp_path_factory):
    """3 classes of noisy solid-colour images: 16 per class to train, 7 per class (21, odd) to validate."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 7)):
        for label, colour in enumerate(COLOURS):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def _overrides(root):
    return [f"data.train_dir={root / 'train'}", f"data.val_dir={root / 'val'}", "data.workers=0", "data.global_size=32",
            "data.eval_resize=32", "data.eval_crop=32", "model.arch=resnet18", "train.precision=fp32",
            "linear.cache_features=true", "linear.epochs=30", "linear.batch_size=16", "knn.batch_size=8"]


def test_probe_on_separable_classes_reaches_100_percent(colour_folders):
    cfg = load_config(None, _overrides(colour_folders))
    result = train_linear(cfg)
    assert result["val_count"] == 21
    assert result["top1"] == pytest.approx(100.0) and result["best_top1"] == pytest.approx(100.0)


def test_two_processes_count_an_odd_validation_set_exactly(colour_folders):
    args = ["--config", str(ROOT / "configs" / "cpu_smoke.yaml"), *_overrides(colour_folders), "data.backend=reference",
            "linear.epochs=3"]
    single = subprocess.run([sys.executable, "-m", "wcl_fast.linear", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "wcl_fast.linear", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert single.returncode == 0 and double.returncode == 0, double.stderr[-2000:]
    pattern = r"linear probe \((\d+) validation images\): final epoch top-1 ([\d.]+)%"
    (count_1, top1_1), (count_2, top1_2) = (re.search(pattern, p.stdout).groups() for p in (single, double))
    assert count_1 == count_2 == "21"
    assert top1_1 == top1_2  # cached features: every rank takes the single-process steps
