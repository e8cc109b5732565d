"""CIFAR-10, CIFAR-100, STL-10 and Tiny-ImageNet read from small files written here in each dataset's
exact on-disk layout (python pickles, STL-10's column-major binaries, Tiny-ImageNet's folders and
val_annotations.txt), then trained, resumed and evaluated through the same paths as ImageNet."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.datasets import load_split
from wcl_fast.config import ConfigError, DataConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


def _images(n, size, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_cifar(root: Path, classes: int, per_batch: int = 6, test: int = 8) -> dict:
    """cifar-10-batches-py (5 training batches + test_batch + batches.meta) or cifar-100-python (train,
    test, meta), pickled with protocol 2 and str keys as the official Python-2 files load."""
    hundred = classes == 100
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    label_key = "fine_labels" if hundred else "labels"
    names = (["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]) + ["test" if hundred else "test_batch"]
    written = {"train": ([], []), "test": ([], [])}
    for b, name in enumerate(names):
        split = "test" if name.startswith("test") else "train"
        n = test if split == "test" else per_batch * (5 if hundred else 1)
        images = _images(n, 32, seed=b)
        labels = [int(v) for v in np.random.default_rng(100 + b).integers(0, classes, n)]
        entry = {"batch_label": name, label_key: labels, "data": images.transpose(0, 3, 1, 2).reshape(n, 3072),
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        if hundred:
            entry["coarse_labels"] = [v // 5 for v in labels]
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written[split][0].append(images)
        written[split][1].extend(labels)
    meta = ({"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
            if hundred else {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch, "num_vis": 3072})
    (folder / ("meta" if hundred else "batches.meta")).write_bytes(pickle.dumps(meta, protocol=2))
    return {split: (np.concatenate(images), labels) for split, (images, labels) in written.items()}


def write_stl10(root: Path, train=6, test=4, unlabeled=5) -> dict:
    """stl10_binary: *_X.bin uint8 images stored channel by channel in column-major order, *_y.bin 1-based labels."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    out = {}
    for seed, (split, n) in enumerate((("train", train), ("test", test), ("unlabeled", unlabeled))):
        images = _images(n, 96, seed=10 + seed)
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 3, 2, 1).tobytes())  # [N, C, W, H] = column-major
        labels = [int(v) for v in np.random.default_rng(seed).integers(1, 11, n)]
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes(np.array(labels, dtype=np.uint8).tobytes())
        out[split] = (images, [v - 1 for v in labels])
    (folder / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse",
                                                       "monkey", "ship", "truck"]) + "\n")
    return out


def write_tiny_imagenet(root: Path, wnids=("n02", "n01", "n03"), per_class=4, val=6) -> Path:
    """tiny-imagenet-200: wnids.txt, train/<wnid>/images/*.JPEG + <wnid>_boxes.txt, val/images + val_annotations.txt."""
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(0)
    for wnid in wnids:
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{wnid}_{i}.JPEG")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n"
                                                                         for i in range(per_class)))
    lines = []
    for i in range(val):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(base / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[i % len(wnids)]}\t1\t2\t50\t60\n")
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    return base


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_files_read_with_exact_pixels_and_labels(tmp_path, name, classes):
    written = write_cifar(tmp_path, classes)
    cfg = DataConfig(dataset=name)
    for key, split in (("data.train_dir", "train"), ("data.val_dir", "test")):
        samples, class_names, decode = load_split(cfg, str(tmp_path), key)
        images, labels = written[split]
        assert [label for _, label in samples] == labels and len(class_names) == classes
        for row in (0, len(samples) - 1):
            assert np.array_equal(np.asarray(decode(samples[row][0])), images[row])
    assert class_names[3] == ("fine3" if classes == 100 else "class3")


def test_stl10_binaries_column_major_and_the_unlabeled_split(tmp_path):
    written = write_stl10(tmp_path)
    cfg = DataConfig(dataset="stl10")
    samples, classes, decode = load_split(cfg, str(tmp_path), "data.train_dir")  # evaluation: labelled only
    assert [label for _, label in samples] == written["train"][1] and classes[1] == "bird"
    assert np.array_equal(np.asarray(decode(samples[2][0])), written["train"][0][2])
    pre, _, decode = load_split(cfg, str(tmp_path), "data.train_dir", pretraining=True)
    assert len(pre) == 6 + 5 and [label for _, label in pre[6:]] == [-1] * 5
    assert np.array_equal(np.asarray(decode(pre[7][0])), written["unlabeled"][0][1])
    only, _, _ = load_split(DataConfig(dataset="stl10", stl10_unlabeled=False), str(tmp_path), "data.train_dir", True)
    assert len(only) == 6
    test, _, decode = load_split(cfg, str(tmp_path), "data.val_dir")
    assert [label for _, label in test] == written["test"][1]
    assert np.array_equal(np.asarray(decode(test[3][0])), written["test"][0][3])


def test_tiny_imagenet_validation_labels_follow_the_sorted_training_wnids(tmp_path):
    base = write_tiny_imagenet(tmp_path)
    cfg = DataConfig(dataset="tinyimagenet")
    train, classes, _ = load_split(cfg, str(base / "train"), "data.train_dir")
    assert classes == ["n01", "n02", "n03"] and len(train) == 12  # the boxes files are not images
    assert all(Path(path).parent.parent.name == classes[label] for path, label in train)
    val, val_classes, decode = load_split(cfg, str(base / "val"), "data.val_dir")
    assert val_classes == classes
    wnids = ("n02", "n01", "n03")
    assert [(Path(p).name, label) for p, label in val] == [(f"val_{i}.JPEG", classes.index(wnids[i % 3])) for i in range(6)]
    assert decode(val[0][0]).size == (64, 64)


@pytest.mark.parametrize("name,layout", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                                         ("stl10", "stl10_binary")])
def test_a_missing_or_damaged_dataset_is_one_line_saying_what_to_put_where(tmp_path, name, layout):
    with pytest.raises(ConfigError, match=rf"data.train_dir: '.*' has no {layout}/ folder; extract .*tar.gz there"):
        load_split(DataConfig(dataset=name), str(tmp_path), "data.train_dir")
    (tmp_path / layout).mkdir()
    with pytest.raises(ConfigError) as info:
        load_split(DataConfig(dataset=name), str(tmp_path), "data.train_dir")
    assert "\n" not in str(info.value) and layout in str(info.value) and "extract" in str(info.value)


def test_tiny_imagenet_without_annotations_and_fast_loaders_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="val_annotations.txt"):
        load_split(DataConfig(dataset="tinyimagenet"), str(tmp_path), "data.val_dir")
    for backend in ("dali", "ffcv"):
        with pytest.raises(ConfigError, match="data.dataset=cifar10 is read from its own files"):
            load_config(None, ["data.dataset=cifar10", f"data.backend={backend}"])
    from pipelines import choose_backend

    choice = choose_backend(DataConfig(dataset="cifar10"), cuda_available=True, dali_available=True)
    assert choice.backend == "reference" and choice.warning == ""


def test_small_dataset_configs_train_resume_and_evaluate_on_cifar_files(tmp_path, capsys):
    from wcl_fast.linear import train_linear
    from wcl_fast.train import train

    write_cifar(tmp_path / "cifar", 10, per_batch=4)  # 20 training images, 8 test images
    tiny = [f"data.train_dir={tmp_path / 'cifar'}", f"data.val_dir={tmp_path / 'cifar'}", "data.batch_size=8",
            "data.workers=0", "model.widths=[8, 16, 32, 64]", "model.head_hidden=32", "model.head_out=16",
            "train.precision=fp32", "train.epochs=2", "optim.warmup_epochs=0", "train.log_interval=1",
            "knn.k=5", "knn.batch_size=8", "knn.every_epochs=0", f"train.out_dir={tmp_path / 'run'}", "train.tensorboard=false"]
    for name in ("cifar10", "cifar100", "stl10", "tinyimagenet"):  # every shipped small-dataset config loads
        cfg = load_config(ROOT / "configs" / f"{name}_wcl.yaml")
        assert cfg.data.dataset == name and cfg.model.arch == "resnet18" and cfg.knn.at_end
    config = ROOT / "configs" / "cifar10_wcl.yaml"
    assert train(load_config(config, [*tiny, "train.stop_at_step=3"]))["global_step"] == 3
    summary = train(load_config(config, tiny))  # resume=auto in the config
    assert summary["global_step"] == 4 and summary["steps_per_epoch"] == 2
    assert "resumed from" in capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["knn_top1"] for r in log if "knn_top1" in r] == [summary["knn_top1"]]
    assert log[0]["loader"] == "reference" and "cifar10" in log[0]["loader_reason"]
    result = train_linear(load_config(config, [*tiny, f"linear.checkpoint={tmp_path / 'run' / 'checkpoint.pt'}",
                                               "linear.epochs=1", "linear.batch_size=8"]))
    assert result["val_count"] == 8 and 0 <= result["top1"] <= 100
