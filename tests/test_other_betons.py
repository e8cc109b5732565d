""".beton files written by other tools: FFCV's own DatasetWriter over torchvision's ImageFolder, the way
ffcv-imagenet's write_imagenet.py writes ImageNet (fields `image` and `label` only; proportion mode,
compress probability 0.5, JPEG quality 90, max resolution 500), and in raw and jpg modes. The sample id
is the record position, read by the loaders without a stored field."""
import json

import numpy as np
import pytest
import torch

from conftest import write_colour_folder
from wcl_fast.config import ConfigError, DataConfig

pytest.importorskip("ffcv")

ROOT_CONFIG = "configs/cpu_smoke.yaml"


def _stock_beton(path, folder, mode, names=("image", "label")):
    """FFCV's DatasetWriter over torchvision's ImageFolder, as ffcv-imagenet's write_imagenet.py does."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    from pipelines.ffcv import keep_torch_threads

    with keep_torch_threads():
        fields = {names[0]: RGBImageField(write_mode=mode, max_resolution=500, compress_probability=0.5,
                                          jpeg_quality=90),
                  names[1]: IntField()}
        DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(ImageFolder(str(folder)))
    return path


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    from torchvision.datasets import ImageFolder

    base = tmp_path_factory.mktemp("stock")
    folder = write_colour_folder(base / "train", classes=3, per_class=8, sizes=(36, 60))
    files = {mode: _stock_beton(base / f"{mode}.ffcv", folder, mode) for mode in ("proportion", "raw", "jpg")}
    return folder, files, ImageFolder(str(folder)).targets


def _eval(beton, cfg=None, batch=5):
    from pipelines.ffcv import FFCVEvalLoader

    cfg = cfg or DataConfig(backend="ffcv", beton=str(beton), workers=1, eval_resize=36, eval_crop=32)
    loader = FFCVEvalLoader(cfg, str(beton), batch, 0, 1)
    batches = list(loader)
    return (loader, torch.cat([b.globals for b in batches]), torch.cat([b.index for b in batches]),
            torch.cat([b.label for b in batches]))


@pytest.mark.parametrize("mode", ["proportion", "raw", "jpg"])
def test_evaluation_reads_record_positions_and_labels_of_a_stock_file(stock, mode):
    _, files, targets = stock
    loader, images, index, label = _eval(files[mode])
    assert loader.count == len(targets) == 24
    assert index.tolist() == list(range(24))  # the record position, with no stored field
    assert label.tolist() == targets
    assert images.shape == (24, 3, 32, 32) and torch.isfinite(images).all()


def test_a_stock_raw_file_gives_the_pixels_of_the_project_converter(stock, tmp_path):
    from pipelines.convert import convert

    folder, files, _ = stock
    ours = tmp_path / "ours.beton"
    convert(str(folder), str(ours), write_mode="raw", workers=1, quiet=True)
    _, theirs_images, theirs_index, _ = _eval(files["raw"])
    _, ours_images, ours_index, _ = _eval(ours)
    assert torch.equal(theirs_index, ours_index)
    assert torch.equal(theirs_images, ours_images)  # raw pixels below the cap: identical records


def test_training_batches_carry_record_positions_and_their_labels(stock):
    from pipelines.ffcv import FFCVLinearLoader, FFCVMultiCropLoader

    _, files, targets = stock
    cfg = DataConfig(backend="ffcv", beton=str(files["proportion"]), batch_size=8, workers=1, global_size=24,
                     local_crops=2, local_size=12)
    loader = FFCVMultiCropLoader(cfg, 0, 0, 1)
    seen = []
    for batch in loader.epoch(0):
        assert batch.globals.shape == (16, 3, 24, 24) and batch.locals.shape == (16, 3, 12, 12)
        assert batch.label.tolist() == [targets[i] for i in batch.index.tolist()]
        seen += batch.index.tolist()
    assert sorted(seen) == list(range(24))  # one epoch: every record once (24 = 3 batches of 8)
    again = [b.index.tolist() for b in FFCVMultiCropLoader(cfg, 0, 0, 1).epoch(0)]
    assert sum(again, []) == seen  # the trainer's sampler order, exactly
    linear = FFCVLinearLoader(cfg, 0, 0, 1, 8)
    for batch in linear.epoch(0):
        assert batch.label.tolist() == [targets[i] for i in batch.index.tolist()]


def test_fields_are_checked_with_one_line_and_configurable(stock, tmp_path):
    from pipelines.ffcv import open_beton

    folder, _, targets = stock
    odd = _stock_beton(tmp_path / "odd.ffcv", folder, "jpg", names=("img", "target"))
    with pytest.raises(ConfigError) as error:
        open_beton(str(odd), "data.val_beton", DataConfig())
    message = str(error.value)
    assert "no RGBImageField named 'image'" in message and "img (RGBImageField), target (IntField)" in message
    assert "set data.beton_image_field=img" in message and "\n" not in message
    cfg = DataConfig(backend="ffcv", beton=str(odd), workers=1, eval_resize=36, eval_crop=32,
                     beton_image_field="img", beton_label_field="target")
    _, _, index, label = _eval(odd, cfg)
    assert index.tolist() == list(range(24)) and label.tolist() == targets


def test_the_trainer_and_its_knn_run_on_stock_files(stock, tmp_path, capsys):
    from wcl_fast.train import main as train_main

    _, files, _ = stock
    out = tmp_path / "run"
    code = train_main(["--config", ROOT_CONFIG, "data.backend=ffcv", f"data.beton={files['proportion']}",
                       f"data.val_beton={files['jpg']}", f"train.out_dir={out}", "data.batch_size=8",
                       "data.workers=1", "data.local_crops=0", "train.epochs=1", "knn.at_end=true", "knn.k=3",
                       "data.eval_resize=36", "data.eval_crop=32"])
    assert code == 0, capsys.readouterr().err[-2000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    knn = [r for r in records if "knn_top1" in r]
    assert knn and knn[-1]["knn_count"] == 24 and knn[-1]["knn_unreadable"] == 0
    assert np.isfinite(knn[-1]["knn_top1"])


def test_linear_probe_and_finetuning_run_on_a_stock_file(stock):
    from wcl_fast.config import load_config
    from wcl_fast.finetune import finetune
    from wcl_fast.linear import train_linear

    _, files, targets = stock
    beton = str(files["proportion"])
    overrides = ["data.backend=ffcv", f"data.beton={beton}", f"data.val_beton={files['raw']}", "data.workers=1",
                 "data.global_size=24", "data.eval_resize=36", "data.eval_crop=32", "model.arch=resnet18",
                 "train.precision=fp32", "linear.epochs=1", "linear.batch_size=8", "finetune.epochs=1",
                 "finetune.batch_size=8", "finetune.label_fraction=0.5"]
    assert train_linear(load_config(None, overrides))["val_count"] == 24
    tuned = finetune(load_config(None, overrides))
    assert tuned["val_count"] == 24 and tuned["labelled"] == 12  # 4 of 8 per class
    with pytest.raises(ConfigError, match="no sidecar .* finetune.subset_file needs"):
        finetune(load_config(None, overrides + ["finetune.subset_file=some.txt"]))
