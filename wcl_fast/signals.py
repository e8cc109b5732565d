"""SIGINT / SIGTERM / SIGUSR1 / SIGHUP during training: a checkpoint at the next step boundary, then exit 0
(under SLURM the job is requeued: docs/running.md); the periodic checkpoint inside long epochs; and how a
run ends when it cannot go on: a watchdog over reads that do not return (data.read_timeout) and over a
main thread that does not answer a second signal, and an exit that never waits on a loader worker process
or helper thread blocked in a read (docs/running.md, faults)."""
from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback

import torch

# the stop signals (SIGUSR1 is what `#SBATCH --signal=USR1@...`, submitit and Lightning send before a time limit;
# SIGHUP a closed terminal or an ssh session that went away) and the loader workers' end live with the loaders,
# which the trainer's exit paths call into
from pipelines.sampling import EXIT_WAIT_S, STOP_SIGNALS, end_loader_workers

EXIT_DATA = 6  # the training data could not be read: a read past data.read_timeout, unreadable data, a dead worker
ABORT_GRACE_S = 10.0  # after an aborting second signal: how long the main thread has to end before the watchdog ends the process
_ENDING = threading.Lock()  # one final line per process: held for good once the process is ending


class Abort(KeyboardInterrupt):
    """A stop signal repeated after StopRequest.REPEAT_WINDOW_S: give up at once, without a checkpoint
    (main() exits with 128 + the signal's number, as a shell reports a process that signal ended)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def final_line(text: str) -> None:
    """Print the run's one `error:` line on stderr (never twice at once: the watchdog's hard exit holds the lock
    for good, so a main thread that is also ending waits here for that exit instead of printing a second line)."""
    with _ENDING:
        print(f"error: {text}", file=sys.stderr, flush=True)


def end_process(code: int, line: str | None = None):
    """End this process now with `code`: `line` as the one `error:` line, the loader's worker processes killed,
    stdout and stderr flushed, then os._exit -- no atexit handler or thread join that a read which never
    returns could block. What must survive is already on disk: checkpoints are written atomically (a
    temporary file renamed into place), log.jsonl line by line."""
    _ENDING.acquire()  # for good: whoever ends the process prints the last line
    try:
        if line:
            print(f"error: {line}", file=sys.stderr, flush=True)
        end_loader_workers()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    finally:
        os._exit(code)


def run_program(main) -> None:
    """`python -m <command>`: sys.exit(main()), with every exit bounded. A non-zero code ends the process at
    once (end_process); an unexpected exception prints its traceback, then one line, and exits 1 the same way;
    code 0 (done, or stopped with a checkpoint) exits normally, the worker processes and threads shut down by
    their loaders, but within ABORT_GRACE_S + EXIT_WAIT_S: a worker or thread still blocked in a read then
    cannot hold the finished run (a daemon timer ends the process; the checkpoint is already on disk)."""
    try:
        code = main()
    except SystemExit:
        raise
    except BaseException as exc:  # a bug: its traceback, for the report, then the run's one line
        traceback.print_exc()
        what = str(exc).strip().splitlines()
        final_line(f"the run stopped on an unexpected {type(exc).__name__}{': ' + what[0] if what else ''} "
                   f"(traceback above); checkpoints are written whole, so the last one is intact")
        code = 1
    if code:
        end_process(code)
    timer = threading.Timer(ABORT_GRACE_S + EXIT_WAIT_S, os._exit, args=(0,))
    timer.daemon = True
    timer.start()
    sys.exit(0)


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

    def __init__(self, distributed: bool = False, rank: int = 0, every_s: float = 0.0, reads=None,
                 read_timeout: float = 0.0, last_good=None):
        """reads: a function listing the reads in flight [(file, seconds)] (pipelines.images.reads_in_flight);
        read_timeout: seconds after which one of them stops the run (data.read_timeout; 0: never);
        last_good: a function giving the text naming the last good checkpoint (Checkpointer.last_good_text)."""
        self.reads, self.read_timeout = reads, read_timeout
        self.last_good = last_good or (lambda: "no checkpoint of this run was written before that")
        self._watchdog = None  # (thread, stop event, wake-up read end, write end, the previous wake-up fd)
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
        if self._previous:
            self._start_watchdog()

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested and now - self.first_signal > self.REPEAT_WINDOW_S:
            # a later, deliberate second signal: give up immediately
            raise Abort(signum, self._abort_text(signum, now - self.first_signal))
        if not self.requested:
            self.requested, self.first_signal = True, now
            self.signal_name = signal.Signals(signum).name

    def _abort_text(self, signum: int, after_s: float, blocked: bool = False) -> str:
        name = signal.Signals(signum).name
        text = (f"aborted by a second {name}, {after_s:.0f} s after the first (whose stop waits for a step boundary "
                f"that had not come)")
        if blocked:
            text += (f"; the main thread did not stop within {ABORT_GRACE_S:.0f} s (blocked outside Python, e.g. "
                     f"waiting for another rank), so the process ended at once")
        return f"{text}{self._reading_text()}; no checkpoint was written now, and {self.last_good()}"

    def _reading_text(self) -> str:
        try:
            reads = self.reads() if self.reads is not None else []
        except Exception:  # only a detail of the line
            reads = []
        if not reads:
            return ""
        named = ", ".join(f"{what} (for {age:.0f} s)" for what, age in reads[:3])
        return f"; files being read: {named}{f' and {len(reads) - 3} more' if len(reads) > 3 else ''}"

    # ------------------------------------------------------------------ the watchdog

    def _start_watchdog(self) -> None:
        """A daemon thread that sees every signal as it arrives (signal.set_wakeup_fd: the interpreter writes the
        signal's number there even while the main thread is blocked outside Python, where no Python handler
        runs) and polls the reads in flight. It ends the process (end_process) when a read has not returned
        within read_timeout (exit EXIT_DATA), or when ABORT_GRACE_S after an aborting second signal the
        process is still there (exit 128 + the signal's number)."""
        if self._watchdog is not None or threading.current_thread() is not threading.main_thread():
            return
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        stop = threading.Event()
        thread = threading.Thread(target=self._watch, args=(read_end, stop), name="wcl-watchdog", daemon=True)
        self._watchdog = (thread, stop, read_end, write_end, previous)
        thread.start()

    def _watch(self, read_end: int, stop: threading.Event) -> None:
        stops = {int(sig) for sig in STOP_SIGNALS}
        first = aborted = None  # monotonic times of the first stop signal and of an aborting later one
        abort_signal = 0
        period = 1.0 if self.read_timeout <= 0 else min(1.0, self.read_timeout / 4)
        while not stop.is_set():
            ready, _, _ = select.select([read_end], [], [], period)
            now = time.monotonic()
            if ready:
                try:
                    arrived = os.read(read_end, 512)
                except (BlockingIOError, OSError):
                    arrived = b""
                for signum in arrived:
                    if signum not in stops:
                        continue
                    if first is None:
                        first = now
                    elif aborted is None and now - first > self.REPEAT_WINDOW_S:
                        aborted, abort_signal = now, signum
            if stop.is_set():
                return
            if aborted is not None and now - aborted >= ABORT_GRACE_S:
                end_process(128 + abort_signal, self._abort_text(abort_signal, aborted - first, blocked=True))
            if self.read_timeout > 0 and self.reads is not None:
                try:
                    stuck = [(what, age) for what, age in self.reads() if age >= self.read_timeout]
                except Exception:  # a loader torn down meanwhile: look again at the next period
                    stuck = []
                if stuck:
                    end_process(EXIT_DATA, self._timeout_text(stuck))

    def _timeout_text(self, stuck: list) -> str:
        named = ", ".join(what for what, _ in stuck[:3])
        more = f" and {len(stuck) - 3} more" if len(stuck) > 3 else ""
        return (f"reading {named}{more} has not returned after {stuck[0][1]:.0f} s (data.read_timeout="
                f"{self.read_timeout:g}): a hung network mount, or a file that blocks (a FIFO, a device) in place of "
                f"an image; the run stopped without writing a checkpoint, and {self.last_good()}; fix the storage or "
                f"remove the file, then train.resume=auto continues")

    def _stop_watchdog(self) -> None:
        if self._watchdog is None:
            return
        thread, stop, read_end, write_end, previous = self._watchdog
        self._watchdog = None
        stop.set()
        signal.set_wakeup_fd(previous)
        try:
            os.write(write_end, b"\0")  # wakes the select at once
        except OSError:
            pass
        thread.join(2.0)
        for fd in (read_end, write_end):
            os.close(fd)

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
        self._stop_watchdog()
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
