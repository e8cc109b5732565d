"""Synthetic multi-crop loader: deterministic images generated on the fly (no disk, no decode).

Sample i is a smooth random pattern of class i % classes (a class template plus an instance
pattern); each crop is a random shift, flip and brightness change of it plus pixel noise, drawn
from numpy.random.default_rng([seed, epoch, i]). Used for tests, step benchmarks and smoke runs.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from pipelines.sampling import MultiCropLoader, StepSampler
from pipelines.batch import collate_multicrop
from wcl_fast.config import DataConfig


def _pattern(rng: np.random.Generator, size: int) -> torch.Tensor:
    coarse = torch.from_numpy(rng.standard_normal((1, 3, 4, 4)).astype(np.float32))
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]  # [3, S, S]


class SyntheticMultiCropDataset(Dataset):
    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    def __len__(self) -> int:
        return self.cfg.synthetic_size

    def image(self, index: int, size: int) -> torch.Tensor:
        label = index % self.cfg.synthetic_classes
        template = _pattern(np.random.default_rng([self.seed, 1_000_000 + label]), size)
        instance = _pattern(np.random.default_rng([self.seed, 2_000_000 + index]), size)
        return template + 0.5 * instance  # [3, S, S]

    def _crop(self, base: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
        img = F.interpolate(base[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        img = torch.roll(img, shifts=(int(rng.integers(-size // 8, size // 8 + 1)),
                                      int(rng.integers(-size // 8, size // 8 + 1))), dims=(1, 2))
        if rng.random() < 0.5:
            img = img.flip(2)
        noise = torch.from_numpy(rng.standard_normal(img.shape).astype(np.float32))
        return img * float(rng.uniform(0.8, 1.2)) + 0.1 * noise

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        base = self.image(index, self.cfg.global_size)
        globals_ = [self._crop(base, self.cfg.global_size, rng) for _ in range(2)]
        locals_ = [self._crop(base, self.cfg.local_size, rng) for _ in range(self.cfg.local_crops)]
        return globals_, locals_, index, index % self.cfg.synthetic_classes, 0


def build_synthetic_loader(cfg: DataConfig, seed: int, rank: int, world: int) -> MultiCropLoader:
    dataset = SyntheticMultiCropDataset(cfg, seed)
    sampler = StepSampler(len(dataset), cfg.batch_size, rank, world, seed)
    return MultiCropLoader(dataset, sampler, cfg.workers, pin_memory=False, collate=collate_multicrop)


class SyntheticEvalDataset(Dataset):
    """The un-augmented image of each synthetic sample (the evaluation view), in index order."""

    def __init__(self, cfg: DataConfig, seed: int):
        self.source = SyntheticMultiCropDataset(cfg, seed)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        cfg = self.source.cfg
        return [self.source.image(index, cfg.global_size)], [], index, index % cfg.synthetic_classes, 0
