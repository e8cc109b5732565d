"""Loader backends behind one entry point, all producing `MultiCropBatch` (design.md)."""
from __future__ import annotations

import torch

from pipelines.batch import MultiCropBatch
from wcl_fast.config import Config, ConfigError

__all__ = ["MultiCropBatch", "build_eval_loader", "build_loader", "build_train_eval_loader"]


def build_loader(cfg: Config, split: str, rank: int, world: int):
    """Training loader (split='train'): object with len() = steps per epoch and `.epoch(e, start_step)`
    returning an iterator of MultiCropBatch for this rank.
    """
    if split != "train":
        raise ValueError(f"build_loader: unknown split {split!r}; evaluation uses pipelines.reference.build_eval_loader")
    pin = torch.cuda.is_available()
    if cfg.data.backend == "reference":
        from pipelines.reference import build_train_loader

        return build_train_loader(cfg.data, cfg.train.seed, rank, world, pin)
    if cfg.data.backend == "synthetic":
        from pipelines.synthetic import build_synthetic_loader

        return build_synthetic_loader(cfg.data, cfg.train.seed, rank, world)
    if cfg.data.backend == "dali":
        from pipelines.dali import build_dali_loader

        return build_dali_loader(cfg.data, cfg.train.seed, rank, world)
    if cfg.data.backend == "ffcv":
        from pipelines.ffcv import FFCVMultiCropLoader

        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return FFCVMultiCropLoader(cfg.data, cfg.train.seed, rank, world, device)
    raise ConfigError(f"data.backend: {cfg.data.backend!r} is not available; use reference, synthetic, dali or ffcv")


def build_train_eval_loader(cfg: Config, batch_size: int, rank: int, world: int):
    """The training samples under the evaluation transform, this rank's contiguous unpadded shard in
    sample-id order (batch.index): used to embed the whole training set (Cl-InfoNCE K-means).
    Returns (loader, number of samples)."""
    pin = torch.cuda.is_available()
    if cfg.data.backend in ("reference", "dali", "ffcv"):  # ffcv: data.beton in record (= sample id) order
        loader, count, _ = build_eval_loader(cfg.data, cfg.data.train_dir, "data.train_dir", batch_size, rank, world, pin)
        return loader, count
    if cfg.data.backend == "synthetic":
        from torch.utils.data import DataLoader, Subset

        from pipelines.reference import collate_eval, shard_range
        from pipelines.synthetic import SyntheticEvalDataset

        dataset = SyntheticEvalDataset(cfg.data, cfg.train.seed)
        shard = Subset(dataset, list(shard_range(len(dataset), rank, world)))
        return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=cfg.data.workers,
                          collate_fn=collate_eval), len(dataset)
    raise ConfigError(f"data.backend: {cfg.data.backend!r} has no evaluation view of the training set")


def build_eval_loader(data_cfg, directory: str, key: str, batch_size: int, rank: int, world: int, pin_memory: bool = False):
    """Evaluation transform (Resize + CenterCrop) over this rank's unpadded shard of an ImageFolder with
    the configured backend (dali: pipelines.dali; otherwise the reference loader).
    Returns (loader, total samples, number of classes)."""
    if data_cfg.backend == "dali":
        from pipelines.dali import build_dali_eval_loader

        return build_dali_eval_loader(data_cfg, directory, key, batch_size, rank, world)
    beton = {"data.val_dir": data_cfg.val_beton, "data.train_dir": data_cfg.beton}.get(key, "")
    if data_cfg.backend == "ffcv" and beton:  # else: the ImageFolder with the reference transform
        from pipelines.ffcv import FFCVEvalLoader

        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        loader = FFCVEvalLoader(data_cfg, beton, batch_size, rank, world, device)
        return loader, loader.count, len(loader.classes)
    from pipelines.reference import build_eval_loader as reference_eval_loader

    return reference_eval_loader(data_cfg, directory, key, batch_size, rank, world, pin_memory)
