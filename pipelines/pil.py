"""The reference loader (data.backend=reference): PIL decoding and the augmentations of pipelines/reference.py
in DataLoader worker processes; the training, linear-probe and evaluation datasets and their builders."""
from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader, Dataset

from pipelines.batch import collate_eval
from pipelines.images import ImageSource
from pipelines.reference import apply_crop, augment, crop_recipes, probe_crop_params, to_normalized_tensor
from pipelines.sampling import MultiCropLoader, StepSampler, ignore_stop_signals, shard_range
from wcl_fast.config import DataConfig


class MultiCropDataset(Dataset):
    """Key (epoch, index) -> 2 global + L local augmented crops of one image (normalised tensors)."""

    def __init__(self, source: ImageSource, cfg: DataConfig, seed: int):
        self.source, self.cfg, self.seed = source, cfg, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        img, actual, label, failed = self.source.read(index)
        global_recipe, local_recipe = crop_recipes(self.cfg, epoch)
        mean, std = self.cfg.mean, self.cfg.std
        globals_ = [to_normalized_tensor(augment(img, global_recipe, rng), mean, std) for _ in range(2)]
        locals_ = [to_normalized_tensor(augment(img, local_recipe, rng), mean, std) for _ in range(self.cfg.local_crops)]
        return globals_, locals_, actual, label, failed


class LinearTrainDataset(Dataset):
    """Key (epoch, index) -> the probe's training view of one image (`probe_crop_params`), normalised."""

    def __init__(self, source: ImageSource, cfg: DataConfig, seed: int):
        self.source, self.cfg, self.seed = source, cfg, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        epoch, index = key
        img, actual, label, failed = self.source.read(index)
        crop = apply_crop(img, probe_crop_params(self.seed, epoch, index, img.width, img.height), self.cfg.global_size)
        return [to_normalized_tensor(crop, self.cfg.mean, self.cfg.std)], [], actual, label, failed


class EvalDataset(Dataset):
    """Resize(short side = resize) + CenterCrop(crop), normalised: the evaluation transform. An unreadable
    image is left out (None; collate_eval counts it in batch.failed), never replaced by another one, so
    each readable image is evaluated exactly once and the counts are the images actually evaluated."""

    def __init__(self, source: ImageSource, cfg: DataConfig):
        self.source, self.cfg = source, cfg

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        read = self.source.read_or_none(index)
        if read is None:
            return None
        img, label = read
        img = TF.center_crop(TF.resize(img, self.cfg.eval_resize), self.cfg.eval_crop)
        return [to_normalized_tensor(img, self.cfg.mean, self.cfg.std)], [], index, label, 0


def build_train_loader(cfg: DataConfig, seed: int, rank: int, world: int, pin_memory: bool) -> MultiCropLoader:
    from pipelines.datasets import load_split

    samples, _, decode = load_split(cfg, cfg.train_dir, "data.train_dir", pretraining=True)
    dataset = MultiCropDataset(ImageSource(samples, decode), cfg, seed)
    sampler = StepSampler(len(dataset), cfg.batch_size, rank, world, seed)
    return MultiCropLoader(dataset, sampler, cfg.workers, pin_memory)


def build_eval_loader(cfg: DataConfig, directory: str, key: str, batch_size: int, rank: int, world: int,
                      pin_memory: bool, pretraining: bool = False) -> tuple[DataLoader, int, int]:
    """(loader over this rank's unpadded shard, total samples, number of classes)."""
    from pipelines.datasets import load_split

    samples, classes, decode = load_split(cfg, directory, key, pretraining)  # pretraining: the pre-training samples
    dataset = EvalDataset(ImageSource(samples, decode), cfg)
    shard = torch.utils.data.Subset(dataset, list(shard_range(len(dataset), rank, world)))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=cfg.workers,
                        pin_memory=pin_memory, collate_fn=collate_eval, worker_init_fn=ignore_stop_signals)
    return loader, len(dataset), len(classes)
