"""Sample order and sharding shared by every loader: the per-step sampler (one seeded permutation per epoch,
cut into global batches, rank slices, exact resume at a step), the contiguous evaluation shards, and the
worker-process DataLoader wrapper of the PIL loaders."""
from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import signal
import sys
import threading
import time

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


# SIGINT: Ctrl-C; SIGTERM: schedulers, torchrun; SIGUSR1: SLURM's --signal warning before the time limit;
# SIGHUP: a closed terminal. The trainer alone handles them (wcl_fast/signals.py, docs/running.md).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGHUP") if hasattr(signal, name))
EXIT_WAIT_S = 5.0  # how long an exit path waits for a loader's worker process or helper thread (it may be blocked in a read)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn of every worker process of the project's loaders.

    They ignore the stop signals (STOP_SIGNALS): clusters and Ctrl-C signal the whole process group, and a
    worker that died of it would fail the trainer before its checkpoint is written; the trainer alone handles
    them. In exchange they must never outlive it: the kernel kills a worker when the trainer ends, however it
    ends (kill -9, the OOM killer, a hard exit that leaves a worker blocked in a read), through
    prctl(PR_SET_PDEATHSIG, SIGKILL) on Linux (tied to the thread that started the workers: the trainer's main
    thread); on any other exit the trainer kills them itself (end_loader_workers). A forked worker also drops
    the trainer's signal wake-up descriptor (wcl_fast.signals.StopRequest's watchdog)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def loader_workers() -> list:
    """This process's live daemonic multiprocessing children: its DataLoader worker processes (torch starts them
    daemonic; the trainer starts no other). multiprocessing itself terminates daemonic children at exit, with
    SIGTERM, which these ignore."""
    return [p for p in multiprocessing.active_children() if p.daemon]


def end_loader_workers(wait_s: float = EXIT_WAIT_S) -> None:
    """SIGKILL this process's DataLoader worker processes and reap them (at most `wait_s` in all). They ignore
    the stop signals (ignore_stop_signals), hold nothing that needs writing, and one may be blocked in a read
    that never returns: the interpreter's exit would wait for it for ever (multiprocessing joins its children
    at exit; torch's shutdown sends them SIGTERM, which they ignore). From the main thread torch's SIGCHLD
    handler is set aside meanwhile, so these deaths raise nothing."""
    workers = loader_workers()
    if not workers:
        return
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if main else None
    try:
        for process in workers:
            try:
                process.kill()
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        for process in workers:
            process.join(max(0.0, deadline - time.monotonic()))
    finally:
        if main:
            signal.signal(signal.SIGCHLD, previous)


# At exit multiprocessing ends daemonic children with SIGTERM, which these workers ignore, and then waits for them
# for ever (a loader still referenced then, as by a script's global, has not shut its workers down): they are
# killed first (atexit runs this before multiprocessing's handler, registered when torch imported it).
atexit.register(end_loader_workers)


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
