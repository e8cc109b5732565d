"""The small datasets of the WCL paper's small-scale experiments, read from their standard files on
local disk, as (sample name, label) lists plus a decoder, like an ImageFolder scan:

- `imagefolder`: one sub-folder per class (ImageNet, your own photos).
- `cifar10` / `cifar100`: the python versions (`cifar-10-batches-py/`, `cifar-100-python/` from
  cifar-10-python.tar.gz / cifar-100-python.tar.gz) under the folder given as data.train_dir /
  data.val_dir; read with torchvision's dataset classes (download=False); train = the training
  batches, val = the test batch; CIFAR-100 uses the 100 fine labels.
- `stl10`: the binary version (`stl10_binary/` from stl10_binary.tar.gz) through torchvision's STL10;
  pre-training reads train + unlabeled (105,000 images; data.stl10_unlabeled=false: the 5,000
  labelled ones), evaluation the labelled train split and the test split.
- `tinyimagenet`: `tiny-imagenet-200/train` (an ImageFolder: <wnid>/images/*.JPEG) as data.train_dir and
  `tiny-imagenet-200/val` (images/ + val_annotations.txt: file, wnid, box) as data.val_dir; class ids
  follow the sorted training wnids, so validation labels agree with training labels.

torchvision's integrity check compares the MD5 of every file with the official archives'; here a file
only has to exist and parse (a damaged file fails to parse and is reported), so that small files in the
same format (tests) and the official files both load.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.images import IMAGE_EXTENSIONS, load_rgb_or_gray, scan_image_folder
from wcl_fast.config import ConfigError

ARRAY_DATASETS = ("cifar10", "cifar100", "stl10")
ARCHIVES = {"cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz"),
            "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz"),
            "stl10": ("stl10_binary", "stl10_binary.tar.gz")}


class ArrayImages:
    """Decoder of in-memory uint8 images [N, H, W, 3]: a sample name '<dataset>:<row>' -> PIL RGB image."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __call__(self, name: str) -> Image.Image:
        return Image.fromarray(self.images[int(name.rsplit(":", 1)[1])], mode="RGB")


def _torchvision_class(dataset: str):
    import torchvision.datasets as tvd

    base = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "stl10": tvd.STL10}[dataset]

    class Local(base):  # existence instead of the archives' MD5 (see the module docstring)
        def _check_integrity(self) -> bool:
            files = [name for name, _ in getattr(self, "train_list", []) + getattr(self, "test_list", [])]
            return all((Path(self.root) / self.base_folder / name).is_file() for name in files)

        def _load_meta(self) -> None:  # CIFAR: class names without the MD5 check
            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as handle:
                self.classes = pickle.load(handle, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    return Local


def _array_split(dataset: str, root: str, key: str, train: bool, pretraining: bool, stl10_unlabeled: bool):
    folder, archive = ARCHIVES[dataset]
    expected = Path(root) / folder
    if not expected.is_dir():
        raise ConfigError(f"{key}: '{root}' has no {folder}/ folder; extract {archive} there "
                          f"(tar xzf {archive} -C {root}) so that {expected} exists")
    cls = _torchvision_class(dataset)
    try:
        if dataset == "stl10":
            split = ("train+unlabeled" if pretraining and stl10_unlabeled else "train") if train else "test"
            data = cls(root, split=split, download=False)
            images = np.ascontiguousarray(data.data.transpose(0, 2, 3, 1))  # [N, 3, 96, 96] -> [N, 96, 96, 3]
            labels = [int(v) for v in data.labels]  # -1 = unlabeled
            classes = list(getattr(data, "classes", [])) or [str(c) for c in range(10)]
        else:
            data = cls(root, train=train, download=False)
            images, labels, classes = data.data, [int(v) for v in data.targets], list(data.classes)  # [N, 32, 32, 3]
    except Exception as exc:  # missing member file, truncated or foreign pickle / binary
        raise ConfigError(f"{key}: could not read {dataset} from '{expected}' ({type(exc).__name__}: {exc}); "
                          f"extract {archive} there again") from None
    if len(labels) != len(images) or not len(images):
        raise ConfigError(f"{key}: {dataset} files in '{expected}' hold {len(images)} images and {len(labels)} labels; "
                          f"extract {archive} there again")
    samples = [(f"{dataset}:{i}", label) for i, label in enumerate(labels)]
    return samples, classes, ArrayImages(images)


def _tiny_imagenet_val(root: str, key: str):
    folder = Path(root)
    annotations = folder / "val_annotations.txt"
    if not annotations.is_file():
        raise ConfigError(f"{key}: '{root}' has no val_annotations.txt; point it at tiny-imagenet-200/val "
                          f"(images/ and val_annotations.txt)")
    rows = []
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise ConfigError(f"{annotations} line {number}: expected 'file<TAB>wnid<TAB>box', got {line!r}")
        rows.append((parts[0], parts[1]))
    train = folder.parent / "train"
    classes = sorted(d.name for d in train.iterdir() if d.is_dir()) if train.is_dir() else sorted({w for _, w in rows})
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for name, wnid in rows:
        if wnid not in index:
            raise ConfigError(f"{annotations}: class {wnid} of {name} is not a training class ({train})")
        path = folder / "images" / name
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            samples.append((str(path), index[wnid]))
    if not samples:
        raise ConfigError(f"{key}: {annotations} lists no images")
    return samples, classes


def load_split(cfg, directory: str, key: str, pretraining: bool = False):
    """(samples [(name, label)], class names, decode) of the split at `directory` for `cfg.dataset`.

    key: 'data.train_dir' (the training split) or 'data.val_dir' (the evaluation split).
    pretraining: the split the self-supervised loader reads (STL-10: train + unlabeled)."""
    dataset = cfg.dataset
    train = key != "data.val_dir"
    if dataset in ARRAY_DATASETS:
        return _array_split(dataset, directory, key, train, pretraining, cfg.stl10_unlabeled)
    if dataset == "tinyimagenet" and not train:
        samples, classes = _tiny_imagenet_val(directory, key)
        return samples, classes, load_rgb_or_gray
    if not train and cfg.val_labels:
        samples, classes = flat_val_split(directory, cfg.val_labels, cfg.val_synsets, cfg.train_dir, key)
        return samples, classes, load_rgb_or_gray
    samples, classes = scan_image_folder(directory, key)
    return samples, classes, load_rgb_or_gray


def _read_synset_ids(path: str) -> list[str]:
    """WNIDs in ILSVRC2012 id order (id 1 first) from the devkit's meta.mat (its `synsets` table; the
    1,000 leaf classes are ids 1..1000) or from a text file with one WNID first on each line in id order."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"data.val_synsets: '{path}' does not exist; give the devkit's data/meta.mat or a file "
                          f"with one WNID per line in ILSVRC2012 id order")
    if file.suffix == ".mat":
        from scipy.io import loadmat

        try:
            synsets = loadmat(str(file), squeeze_me=True)["synsets"]
            ids = [int(s["ILSVRC2012_ID"]) for s in synsets]
            wnids = [str(s["WNID"]) for s in synsets]
        except Exception as exc:
            raise ConfigError(f"data.val_synsets: '{path}' is not the devkit's meta.mat ({type(exc).__name__}: "
                              f"{exc})") from None
        table = dict(zip(ids, wnids))
        return [table[i] for i in sorted(table)]
    return [line.split()[0] for line in file.read_text().splitlines() if line.strip()]


def flat_val_split(directory: str, labels: str, synsets: str, train_dir: str, key: str = "data.val_dir"):
    """(samples, classes) of a flat ImageNet validation folder (ILSVRC2012_val_00000001.JPEG, ...) with labels
    from data.val_labels: Kaggle's LOC_val_solution.csv (ImageId, PredictionString whose first token is the
    WNID) or the devkit's ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012 id per line, for the
    images in file-name order; the ids become WNIDs through data.val_synsets). Class ids follow the sorted
    WNIDs of data.train_dir's class folders, so validation labels agree with training labels."""
    folder, labels_file = Path(directory), Path(labels)
    if not folder.is_dir():
        raise ConfigError(f"{key}: '{directory}' is not a directory")
    if not labels_file.is_file():
        raise ConfigError(f"data.val_labels: '{labels}' does not exist; give LOC_val_solution.csv or "
                          f"ILSVRC2012_validation_ground_truth.txt")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ConfigError(f"{key}: '{directory}' holds no images (flat validation folder expected with data.val_labels)")
    text = labels_file.read_text().splitlines()
    if text and text[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        wnid_of = {}
        for number, line in enumerate(text[1:], 2):
            if line.strip():
                name, _, prediction = line.partition(",")
                if not prediction.split():
                    raise ConfigError(f"data.val_labels: {labels} line {number}: no synset in {line!r}")
                wnid_of[name.strip()] = prediction.split()[0]
    else:
        if not synsets:
            raise ConfigError(f"data.val_labels: '{labels}' holds ILSVRC2012 class ids; set data.val_synsets= to the "
                              f"devkit's data/meta.mat (or a WNID list in id order) to name them")
        order = _read_synset_ids(synsets)
        try:
            ids = [int(line) for line in text if line.strip()]
        except ValueError:
            raise ConfigError(f"data.val_labels: '{labels}' is neither LOC_val_solution.csv (header ImageId,"
                              f"PredictionString) nor a ground-truth file of integer ids") from None
        if len(ids) != len(images) or min(ids) < 1 or max(ids) > len(order):
            raise ConfigError(f"data.val_labels: '{labels}' has {len(ids)} ids in 1..{max(ids)} for {len(images)} images "
                              f"and {len(order)} synsets; the file, the folder and data.val_synsets must match")
        wnid_of = {image.stem: order[i - 1] for image, i in zip(images, ids)}
    train = Path(train_dir) if train_dir else None
    classes = sorted(d.name for d in train.iterdir() if d.is_dir()) if train and train.is_dir() \
        else sorted(set(wnid_of.values()))
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for image in images:
        wnid = wnid_of.get(image.stem)
        if wnid is None:
            raise ConfigError(f"data.val_labels: '{labels}' has no label for {image.name}")
        if wnid not in index:
            raise ConfigError(f"data.val_labels: class {wnid} of {image.name} is not a class folder of data.train_dir "
                              f"('{train_dir}')")
        samples.append((str(image), index[wnid]))
    return samples, classes
