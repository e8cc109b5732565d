"""Sample order and sharding shared by every loader: the per-step sampler (one seeded permutation per epoch,
cut into global batches, rank slices, exact resume at a step), the contiguous evaluation shards, and the
worker-process DataLoader wrapper of the PIL loaders."""
from __future__ import annotations

import signal

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipelines.batch import collate_multicrop
from wcl_fast.config import ConfigError


class StepSampler(Sampler):
    """Per-step sample keys for one rank: a seeded global permutation cut into global batches.

    Step s of epoch e uses perm_e[s*N : (s+1)*N] (N = global batch) and rank r takes the slice
    [r*b, (r+1)*b) of it, so rank r owns rows [r*b, (r+1)*b) of the global batch and the global
    batch does not depend on the number of ranks. drop_last: steps_per_epoch = len // N.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int, world: int, seed: int, shuffle: bool = True):
        if global_batch % world:
            raise ConfigError(f"data.batch_size={global_batch} is not divisible by the world size {world}; "
                              f"choose a multiple of {world}")
        self.steps_per_epoch = num_samples // global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.batch_size={global_batch} exceeds the dataset size ({num_samples}); "
                              f"lower data.batch_size")
        self.num_samples, self.global_batch, self.rank, self.world = num_samples, global_batch, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self):
        perm = self.permutation(self.epoch).tolist()
        local = self.global_batch // self.world
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.global_batch + self.rank * local
            yield [(self.epoch, i) for i in perm[start:start + local]]

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: workers ignore SIGINT and SIGTERM.

    Clusters (SLURM, timeout, container runtimes) and Ctrl-C signal the whole process group; a worker
    that died of it would make the trainer fail with 'DataLoader worker killed by signal' before it
    could write its checkpoint. The trainer alone handles the signal (checkpoint, then exit); workers
    end when it closes the loader, or within seconds of its death (PyTorch's worker watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class MultiCropLoader:
    """Iterates MultiCropBatch for one epoch at a time (`loader.epoch(e, start_step)`)."""

    def __init__(self, dataset: Dataset, sampler: StepSampler, workers: int, pin_memory: bool, collate=collate_multicrop):
        self.sampler = sampler
        kwargs = dict(num_workers=workers, pin_memory=pin_memory, collate_fn=collate, batch_sampler=sampler,
                      worker_init_fn=ignore_stop_signals)
        if workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=4)
        self.loader = DataLoader(dataset, **kwargs)

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def num_samples(self) -> int:
        """Dataset size (sample ids are 0 .. num_samples - 1)."""
        return self.sampler.num_samples

    def epoch(self, epoch: int, start_step: int = 0):
        self.sampler.set_epoch(epoch, start_step)
        return iter(self.loader)


def shard_range(num_samples: int, rank: int, world: int) -> range:
    """Contiguous, unpadded shard of [0, num_samples) for `rank` (sizes differ by at most one)."""
    base, extra = divmod(num_samples, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
