"""Loader backends behind one entry point, all producing `MultiCropBatch` (design.md)."""
from __future__ import annotations

import torch

from pipelines.batch import MultiCropBatch
from wcl_fast.config import Config, ConfigError

__all__ = ["MultiCropBatch", "build_loader"]


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
    raise ConfigError(f"data.backend: {cfg.data.backend!r} is not available; use reference or synthetic")
