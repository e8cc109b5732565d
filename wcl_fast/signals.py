"""SIGINT / SIGTERM / SIGUSR1 / SIGHUP during training: a checkpoint at the next step boundary, then exit 0
(under SLURM the job is requeued: docs/running.md); and the periodic checkpoint inside long epochs."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import torch


# the stop signals: SIGUSR1 is what `#SBATCH --signal=USR1@...` (and submitit, Lightning) send before a time
# limit; SIGHUP a closed terminal or an ssh session that went away
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGHUP") if hasattr(signal, name))


class StopRequest:
    """SIGINT / SIGTERM / SIGUSR1 / SIGHUP: checkpoint at the next step boundary, then exit 0.

    Clusters signal the whole process group (SLURM, timeout, container runtimes) and torchrun's agent
    forwards the signal it got to its workers, so one stop often arrives two or three times within a
    moment: every signal within `REPEAT_WINDOW_S` of the first is the same request. A signal after
    that aborts at once (KeyboardInterrupt), for a user who really wants out.

    `poll()` is called by every rank after every step and answers the same on all ranks at the same
    step: each rank's flag goes into an asynchronous all-reduce on a CPU (gloo) group, read one step
    later, so no rank waits on it and the answer is one step late at most.

    The same reduction carries the periodic checkpoint (`every_s` seconds, train.checkpoint_every_minutes):
    when any rank's timer has run out, `save_due` is True on every rank at the same step; `saved()`
    restarts the timers."""

    REPEAT_WINDOW_S = 5.0

    def __init__(self, distributed: bool = False, rank: int = 0, every_s: float = 0.0):
        self.rank = rank
        self.every_s = every_s
        self.last_save = time.monotonic()
        self.save_due = False
        self.crash_at = crash_point()  # the elastic-restart test's fault hook (None in real runs)
        self.requested = False
        self.first_signal: float | None = None
        self.signal_name = ""
        self._previous = {}
        self._group = torch.distributed.new_group(backend="gloo") if distributed else None
        self._flag = torch.zeros(2)
        self._work = None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
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
        timer = self.every_s > 0 and time.monotonic() - self.last_save >= self.every_s
        if self._group is None:
            self.save_due = timer
            return self.requested
        agreed, self.save_due = False, False
        if self._work is not None:
            self._work.wait()
            stop, save = self._flag.tolist()  # a CPU tensor of the gloo group: no device sync
            agreed, self.save_due = stop > 0, save > 0
        self._flag = torch.tensor([1.0 if self.requested else 0.0, 1.0 if timer else 0.0])
        self._work = torch.distributed.all_reduce(self._flag, group=self._group, async_op=True)
        return agreed

    def saved(self) -> None:
        """A periodic checkpoint was written: the timer starts again (on every rank at the same step)."""
        self.last_save, self.save_due = time.monotonic(), False

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


def slurm_job() -> str | None:
    """The id `scontrol requeue` takes for this SLURM job (job arrays: ARRAYJOB_TASK), or None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeue_slurm_job(info) -> bool:
    """`scontrol requeue JOB` once (rank 0, after the stop's checkpoint is on disk), so a run stopped before
    its end by the time limit's signal continues as the same job with train.resume=auto; one line through
    `info` says what happened or, when scontrol is missing or fails, how to resubmit. Outside SLURM: nothing."""
    job = slurm_job()
    if job is None:
        return False
    scontrol = shutil.which("scontrol")
    resubmit = "resubmit the same sbatch command (train.resume=auto continues from the checkpoint)"
    if scontrol is None:
        info(f"SLURM job {job}: scontrol is not on PATH, so the job was not requeued; {resubmit}")
        return False
    try:
        proc = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        info(f"SLURM job {job}: scontrol requeue failed ({exc}); {resubmit}")
        return False
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        info(f"SLURM job {job}: scontrol requeue failed ({why[-1] if why else f'exit {proc.returncode}'}); {resubmit}")
        return False
    info(f"SLURM job {job}: requeued (scontrol requeue {job}); it continues from this checkpoint when it starts again")
    return True
