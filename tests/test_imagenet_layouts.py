"""The raw ILSVRC2012 validation layout: a flat folder of ILSVRC2012_val_*.JPEG with labels from Kaggle's
LOC_val_solution.csv or from the devkit's ILSVRC2012_validation_ground_truth.txt + data/meta.mat, written
here the way those files are published. Class ids follow the sorted training WNIDs."""
import numpy as np
import pytest
import torch
from PIL import Image

from wcl_fast.config import ConfigError, DataConfig, check_paths, load_config

SMOKE = "configs/cpu_smoke.yaml"
WNIDS = ["n01440764", "n01443537", "n01484850"]  # sorted: class ids 0, 1, 2
DEVKIT_IDS = {"n01484850": 1, "n01440764": 2, "n01443537": 3}  # ILSVRC2012 ids do not follow the sorted order
TRUTH = ["n01443537", "n01484850", "n01440764", "n01440764", "n01484850", "n01443537"]  # val_00000001..6


@pytest.fixture()
def imagenet(tmp_path):
    rng = np.random.default_rng(0)
    for wnid in WNIDS:
        (tmp_path / "train" / wnid).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)).save(
                tmp_path / "train" / wnid / f"{wnid}_{i}.JPEG")
    val = tmp_path / "val"
    val.mkdir()
    for number in range(1, 7):
        Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)).save(val / f"ILSVRC2012_val_{number:08d}.JPEG")
    # Kaggle: ImageId,PredictionString ("wnid xmin ymin xmax ymax" repeated), rows not in file order
    rows = [f"ILSVRC2012_val_{n:08d},{w} 10 20 30 40 {w} 1 2 3 4" for n, w in enumerate(TRUTH, 1)]
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(reversed(rows)) + "\n")
    # devkit: one ILSVRC2012 id per line for val_00000001, 2, ...; meta.mat's synsets table names the ids
    (tmp_path / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{DEVKIT_IDS[w]}\n" for w in TRUTH))
    from scipy.io import savemat

    table = np.zeros(4, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    for row, (wnid, ident) in enumerate(sorted(DEVKIT_IDS.items(), key=lambda item: item[1])):
        table[row] = (ident, wnid, f"class {wnid}", 0)
    table[3] = (1001, "n00001740", "entity", 3)  # the devkit also lists non-leaf synsets after the 1,000 classes
    savemat(tmp_path / "meta.mat", {"synsets": table})
    return tmp_path


def _expected(root):
    return [(str(root / "val" / f"ILSVRC2012_val_{n:08d}.JPEG"), WNIDS.index(w)) for n, w in enumerate(TRUTH, 1)]


@pytest.mark.parametrize("labels", ["kaggle", "devkit"])
def test_flat_validation_labels_follow_the_training_classes(imagenet, labels):
    from pipelines.datasets import load_split

    extra = {"kaggle": dict(val_labels=str(imagenet / "LOC_val_solution.csv")),
             "devkit": dict(val_labels=str(imagenet / "ILSVRC2012_validation_ground_truth.txt"),
                            val_synsets=str(imagenet / "meta.mat"))}[labels]
    cfg = DataConfig(train_dir=str(imagenet / "train"), val_dir=str(imagenet / "val"), **extra)
    samples, classes, _ = load_split(cfg, cfg.val_dir, "data.val_dir")
    assert classes == WNIDS and samples == _expected(imagenet)
    train, train_classes, _ = load_split(cfg, cfg.train_dir, "data.train_dir")
    assert train_classes == classes


def test_knn_and_the_linear_probe_evaluate_a_flat_folder(imagenet, capsys):
    from wcl_fast.knn import main as knn_main

    args = ["--config", SMOKE, "data.backend=reference", f"data.train_dir={imagenet / 'train'}",
            f"data.val_dir={imagenet / 'val'}", f"data.val_labels={imagenet / 'LOC_val_solution.csv'}",
            "data.eval_resize=36", "data.eval_crop=32", "knn.k=3", "knn.batch_size=4"]
    assert knn_main(args) == 0
    assert "on 6 images" in capsys.readouterr().out
    from wcl_fast.linear import train_linear

    cfg = load_config(SMOKE, args[2:] + ["linear.epochs=1", "linear.batch_size=3", "data.workers=0",
                                         "train.out_dir=" + str(imagenet / "probe")])
    assert train_linear(cfg)["val_count"] == 6


def test_a_flat_folder_without_labels_stops_before_any_work(imagenet, capsys):
    from wcl_fast.train import main as train_main

    code = train_main(["--config", SMOKE, "data.backend=reference", f"data.train_dir={imagenet / 'train'}",
                       f"data.val_dir={imagenet / 'val'}", f"train.out_dir={imagenet / 'run'}", "knn.at_end=true"])
    err = capsys.readouterr().err
    assert code == 2 and "is a flat folder of images without class sub-folders; set data.val_labels=" in err
    assert not (imagenet / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("change,message", [
    (lambda root: (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 1 2 3 4\n"),
     "has no label for ILSVRC2012_val_00000002"),
    (lambda root: (root / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"ILSVRC2012_val_{n:08d},n09999999 1 2 3 4\n" for n in range(1, 7))),
     "class n09999999 of ILSVRC2012_val_00000001.JPEG is not a class folder of data.train_dir"),
])
def test_bad_label_files_are_one_line_naming_what_is_wrong(imagenet, change, message):
    change(imagenet)
    cfg = load_config(SMOKE, ["data.backend=reference", f"data.train_dir={imagenet / 'train'}",
                              f"data.val_dir={imagenet / 'val'}", f"data.val_labels={imagenet / 'LOC_val_solution.csv'}"])
    with pytest.raises(ConfigError, match=message):
        check_paths(cfg, need_val=True)


def test_ground_truth_ids_need_the_synset_table(imagenet):
    cfg = load_config(SMOKE, ["data.backend=reference", f"data.train_dir={imagenet / 'train'}",
                              f"data.val_dir={imagenet / 'val'}",
                              f"data.val_labels={imagenet / 'ILSVRC2012_validation_ground_truth.txt'}"])
    with pytest.raises(ConfigError, match="set data.val_synsets="):
        check_paths(cfg, need_val=True)


def test_dali_reads_the_same_flat_labels(imagenet):
    pytest.importorskip("nvidia.dali")
    from pipelines.dali import DaliEvalLoader

    cfg = DataConfig(train_dir=str(imagenet / "train"), val_dir=str(imagenet / "val"), workers=1, eval_resize=36,
                     eval_crop=32, val_labels=str(imagenet / "LOC_val_solution.csv"))
    loader = DaliEvalLoader(cfg, cfg.val_dir, "data.val_dir", 4, 0, 1, None)
    assert loader.samples == _expected(imagenet) and loader.classes == WNIDS
    labels = torch.cat([b.label for b in loader]).tolist()
    assert labels == [label for _, label in _expected(imagenet)]


def test_the_converter_writes_a_flat_validation_folder_with_its_labels(imagenet, capsys):
    """python -m pipelines.convert --val-labels: records in file order with the training-folder class ids,
    the same labels an FFCV reader gets; without --train-dir one line and exit 2."""
    pytest.importorskip("ffcv")
    from pipelines.convert import main as convert_main
    from pipelines.ffcv import beton_labels, open_beton

    out = imagenet / "val.beton"
    args = ["--src", str(imagenet / "val"), "--out", str(out), "--workers", "1",
            "--val-labels", str(imagenet / "ILSVRC2012_validation_ground_truth.txt"), "--val-synsets", str(imagenet / "meta.mat")]
    assert convert_main(args) == 2 and "--train-dir" in capsys.readouterr().err
    assert convert_main(args + ["--train-dir", str(imagenet / "train")]) == 0
    assert beton_labels(open_beton(str(out)), DataConfig()).tolist() == [label for _, label in _expected(imagenet)]
