"""SIGINT / SIGTERM during training: a checkpoint at the next step boundary, then exit 0."""
from __future__ import annotations

import os
import signal
import time

import torch


class StopRequest:
    """SIGINT / SIGTERM: checkpoint at the next step boundary, then exit 0.

    Clusters signal the whole process group (SLURM, timeout, container runtimes) and torchrun's agent
    forwards the signal it got to its workers, so one stop often arrives two or three times within a
    moment: every signal within `REPEAT_WINDOW_S` of the first is the same request. A signal after
    that aborts at once (KeyboardInterrupt), for a user who really wants out.

    `poll()` is called by every rank after every step and answers the same on all ranks at the same
    step: each rank's flag goes into an asynchronous all-reduce on a CPU (gloo) group, read one step
    later, so no rank waits on it and the answer is one step late at most."""

    REPEAT_WINDOW_S = 5.0

    def __init__(self, distributed: bool = False, rank: int = 0):
        self.rank = rank
        self.crash_at = crash_point()  # the elastic-restart test's fault hook (None in real runs)
        self.requested = False
        self.first_signal: float | None = None
        self.signal_name = ""
        self._previous = {}
        self._group = torch.distributed.new_group(backend="gloo") if distributed else None
        self._flag = torch.zeros(1)
        self._work = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested and now - self.first_signal > self.REPEAT_WINDOW_S:
            raise KeyboardInterrupt  # a later, deliberate second signal: give up immediately
        if not self.requested:
            self.requested, self.first_signal = True, now
            self.signal_name = signal.Signals(signum).name

    def poll(self, global_step: int | None = None) -> bool:
        """Whether to stop after `global_step` (the same answer on every rank)."""
        if self.crash_at is not None and self.crash_at == (self.rank, global_step):
            os._exit(17)  # fault injection (see crash_point)
        if self._group is None:
            return self.requested
        agreed = False
        if self._work is not None:
            self._work.wait()
            agreed = bool(self._flag.item() > 0)
        self._flag = torch.tensor([1.0 if self.requested else 0.0])
        self._work = torch.distributed.all_reduce(self._flag, group=self._group, async_op=True)
        return agreed

    def restore(self, wait: bool = True) -> None:
        if self._work is not None and wait:  # every rank left the loop at the same step: one reduction in flight each
            self._work.wait()
        self._work = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def crash_point() -> tuple[int, int] | None:
    """Testing hook: WCL_FAST_CRASH_AT="rank:step" kills that rank right after that global step, on the
    first attempt of a torchrun job only (TORCHELASTIC_RESTART_COUNT=0), to test elastic restarts."""
    spec = os.environ.get("WCL_FAST_CRASH_AT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    rank, step = spec.split(":")
    return int(rank), int(step)
