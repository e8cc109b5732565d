"""Rank-0 logging: JSON lines, TensorBoard scalars and console lines that do not break the progress bar.

On a terminal the trainer shows a progress bar; when stdout or stderr is not a terminal (SLURM output
files, `| tee`, nohup, container logs) it prints one plain line per log interval instead, so a log
file holds no carriage-return redraws.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm


def end_torn_line(path: Path) -> int:
    """Cut a last line that has no newline (a write stopped by kill -9 or a full disk) off `path`, so every
    line of the file parses and the next record starts on its own line; returns the bytes removed."""
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as handle:
        handle.seek(-1, 2)
        if handle.read(1) == b"\n":
            return 0
        size = handle.seek(0, 2)
        start = max(0, size - (1 << 20))
        handle.seek(start)
        tail = handle.read()
        cut = start + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        handle.truncate(cut)
        return size - cut


class RunLogger:
    """Writes `log.jsonl` (one object per logged interval) and TensorBoard events under out_dir.

    Logging never stops training: a write that fails (a full disk, a quota, a vanished mount) is one
    warning and logging pauses; it is tried again with every later record and resumes (said once) when
    the disk has room; the checkpoints are written as before. A torn last line left by an earlier run is
    removed, with a warning, before the first append."""

    def __init__(self, out_dir: str | Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        self.paused: dict[str, str] = {}  # what is paused ('log.jsonl', 'TensorBoard') -> why
        self.lost = 0  # records that could not be written while paused
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "log.jsonl"
        try:
            cut = end_torn_line(self.path)
            if cut:
                self.info(f"warning: {self.path}: its last line was cut off mid-write by an earlier run ({cut} bytes); "
                          f"removed it so every line parses")
            self.jsonl = open(self.path, "a", buffering=1)
        except OSError as exc:
            self._pause("log.jsonl", exc)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
            except ImportError:
                self.info("warning: tensorboard is not installed; logging to log.jsonl only (pip install tensorboard)")
            except OSError as exc:
                self._pause("TensorBoard", exc)

    def info(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stderr)

    def _pause(self, what: str, exc: OSError) -> None:
        if what not in self.paused:
            self.paused[what] = exc.strerror or str(exc)
            self.info(f"warning: writing {what} failed ({self.paused[what]}); logging to it pauses and is retried with "
                      f"every record; training and checkpoints go on")

    def _resume(self, what: str) -> None:
        if self.paused.pop(what, None) is not None:
            self.info(f"{what}: logging resumed" + (f" ({self.lost} record(s) could not be written meanwhile)"
                                                    if what == "log.jsonl" and self.lost else ""))

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        line = json.dumps(record) + "\n"
        try:
            if "log.jsonl" in self.paused:
                end_torn_line(self.path)  # a record half written when the disk filled
            if self.jsonl is None:
                self.jsonl = open(self.path, "a", buffering=1)
            self.jsonl.write(line)
            self.jsonl.flush()
            self._resume("log.jsonl")
        except OSError as exc:
            self.lost += 1
            self._pause("log.jsonl", exc)
            self._reopen()
        if self.writer is not None:
            try:
                for key, value in values.items():
                    if isinstance(value, (int, float)):
                        self.writer.add_scalar(key, value, step)
                self.writer.flush()
                self._resume("TensorBoard")
            except OSError as exc:
                self._pause("TensorBoard", exc)

    def _reopen(self) -> None:
        """Drop a file object whose buffer holds a failed write (closing it would try the write again)."""
        handle, self.jsonl = self.jsonl, None
        if handle is not None:
            try:
                handle.close()
            except OSError:
                pass

    def close(self) -> None:
        if self.jsonl is not None:
            try:
                self.jsonl.close()
            except OSError as exc:
                self._pause("log.jsonl", exc)
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as exc:
                self._pause("TensorBoard", exc)


def use_progress_bar(enabled: bool, streams=None) -> bool:
    """The redrawing bar only when it is enabled and both stdout and stderr (where tqdm draws) are terminals."""
    streams = (sys.stdout, sys.stderr) if streams is None else streams
    return enabled and all(getattr(stream, "isatty", lambda: False)() for stream in streams)


def format_duration(seconds: float) -> str:
    """Compact duration for ETAs: 42s, 7m05s, 3h02m, 2d04h ('?' when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def interval_line(epoch: int, epochs: int, step_in_epoch: int, steps_per_epoch: int, record: dict, names,
                  eta_epoch_s: float, eta_run_s: float) -> str:
    """One plain log line per interval: epoch, step, loss terms, lr, samples/s, data-wait %, ETAs.

    e.g. `epoch 3/200 step 120/312 loss 5.4321 (nce 3.2100, graph 2.2221) lr 4.8000 1873.2 samples/s
    data-wait 1.2% ETA epoch 2m03s run 1d02h`"""
    terms = ", ".join(f"{name} {record[name]:.4f}" for name in names[1:])
    return (f"epoch {epoch}/{epochs} step {step_in_epoch}/{steps_per_epoch} loss {record['loss']:.4f} "
            f"{'(' + terms + ') ' if terms else ''}lr {record['lr']:.4f} {record['samples_per_s']:.1f} samples/s "
            f"data-wait {100 * record['data_wait']:.1f}% ETA epoch {format_duration(eta_epoch_s)} "
            f"run {format_duration(eta_run_s)}")


def diagnostics_suffix(record: dict) -> str:
    """The few diagnostics of an interval record the epoch line shows when they were logged
    (docs/diagnostics.md), e.g. `; weak labels: 21.5 components, precision 0.712; collapse 0.83; probe 64.1%`."""
    parts = []
    if "wl_components" in record:
        parts.append(f"weak labels: {record['wl_components']:.1f} components"
                     + (f", precision {record['wl_precision']:.3f}" if "wl_precision" in record else ""))
    if "collapse_z" in record:
        parts.append(f"collapse {record['collapse_z']:.2f}")
    if "probe_top1" in record:
        parts.append(f"probe {record['probe_top1']:.1f}%")
    return "".join(f"; {part}" for part in parts)


class StepMeter:
    """Interval metering of the training loop, and its logging. Between log steps everything stays on the
    device: the sums of the logged terms over the finite steps, the count of those steps, the skipped
    (non-finite) steps in all and in a row, and the sums of the `sources` (wcl_fast.diagnostics.Diagnostics,
    wcl_fast.probe.OnlineProbe: `names`, `sums` [2, E] of numerators and denominators, `reset()`), each
    logged as numerator sum / denominator sum (left out when that is 0). `log()` reads them in one reduction
    across ranks (# sync point), writes the record to log.jsonl / TensorBoard and shows it (progress-bar
    postfix on a terminal, one plain line otherwise). Data-wait is host time spent in next(batches)."""

    def __init__(self, logger: RunLogger, names, device, samples_per_step: int, epochs: int, steps_per_epoch: int,
                 global_step: int, sources=()):
        import torch

        self.sources = [source for source in sources if source is not None]
        self.logger, self.names, self.samples_per_step = logger, tuple(names), samples_per_step
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        # [sum of each term..., finite steps]: one tensor, so one all-reduce per interval
        self._sums = torch.zeros(len(self.names) + 1, device=device)
        self._skipped = torch.zeros(2, device=device)  # skipped steps: in all, in a row now
        self.skipped_total = self.skipped_in_row = 0.0  # their values at the last log
        self.failed_images = 0
        self.data_wait = 0.0
        self.last_time, self.last_step = time.perf_counter(), global_step

    def next_batch(self, batches):
        """The next batch, its wait counted as data-wait and its unreadable images counted."""
        start = time.perf_counter()
        batch = next(batches)
        self.data_wait += time.perf_counter() - start
        self.failed_images += batch.failed
        return batch

    def add(self, terms: dict, ok) -> None:
        """One step's terms (device tensors) and `ok` (device bool: the optimizer step was taken; None
        without the guard). A non-finite loss adds nothing to the means; an interval with none logs NaN."""
        import torch

        if ok is not None:
            bad = (~ok).to(torch.float32)
            self._skipped = torch.stack([self._skipped[0] + bad, (self._skipped[1] + bad) * bad])
        values = torch.stack([terms[name].detach().float() for name in self.names])  # [T]
        finite = torch.isfinite(values[0])
        self._sums += torch.cat([torch.where(finite, values, torch.zeros_like(values)), finite.to(torch.float32)[None]])

    def log(self, global_step: int, epoch: int, step_in_epoch: int, lr: float, bar=None, extra: dict | None = None) -> dict:
        """Read, log and show the interval ending at `global_step`; returns its record."""
        import torch

        from wcl_fast import dist as wdist

        packed = self._sums
        if self.sources:  # one reduction for the terms and every source's sums
            packed = torch.cat([self._sums.double()] + [source.sums.reshape(-1).double() for source in self.sources])
        values = wdist.all_reduce_mean(packed).tolist()  # sync point
        self.skipped_total, self.skipped_in_row = self._skipped.tolist()  # sync point (the same on all ranks)
        ratios = {}
        offset = len(self.names) + 1
        for source in self.sources:
            width = len(source.names)
            for i, name in enumerate(source.names):
                numerator, denominator = values[offset + i], values[offset + width + i]
                if denominator > 0:
                    ratios[name] = numerator / denominator
            offset += 2 * width
            source.reset()
        count = values[len(self.names)]
        if count == 0:  # every step of the interval was non-finite
            values[:len(self.names)], count = [float("nan")] * len(self.names), 1.0
        now = time.perf_counter()
        elapsed, steps = now - self.last_time, global_step - self.last_step
        record = {name: values[i] / count for i, name in enumerate(self.names)}
        record.update({"lr": lr, "epoch": epoch, "samples_per_s": steps * self.samples_per_step / elapsed,
                       "data_wait": self.data_wait / elapsed, "failed_images": self.failed_images,
                       "skipped_steps": self.skipped_total, **ratios})
        record.update(extra or {})  # the objective's own counters, e.g. knn_unconverged: logged with the rest
        self.logger.scalars(global_step, record)
        seconds_per_step = elapsed / max(steps, 1)
        eta_epoch = (self.steps_per_epoch - step_in_epoch) * seconds_per_step
        eta_run = (self.epochs * self.steps_per_epoch - global_step) * seconds_per_step
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}",
                            wait=f"{100 * record['data_wait']:.0f}%", run_eta=format_duration(eta_run))
        else:
            self.logger.info(interval_line(epoch, self.epochs, step_in_epoch, self.steps_per_epoch, record, self.names,
                                           eta_epoch, eta_run))
        if not math.isfinite(record["loss"]):
            self.logger.info(f"warning: non-finite loss at step {global_step}")
        self._sums.zero_()
        self.last_time, self.data_wait, self.last_step = now, 0.0, global_step
        return record


def _package_version(*names: str) -> str:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def git_commit() -> str:
    """The checkout's commit (with '-dirty' when tracked files differ from it), or 'unknown' (an installed
    copy outside git, or no git)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def provenance(device, world_size: int, gather=None) -> dict:
    """What produced a run: git commit, versions of wcl-fast, torch, CUDA, DALI and FFCV, the device of
    every rank (`gather(name) -> [name of rank 0, 1, ...]` under DDP; this rank's alone otherwise) as
    'name x count' entries, and the world size. Written into config.yaml and the first log.jsonl record."""
    import torch

    import wcl_fast

    names = gather(device_name(device)) if gather is not None else [device_name(device)]
    devices = [f"{name} x {names.count(name)}" for name in dict.fromkeys(names)]
    return {"git_commit": git_commit(), "wcl_fast": wcl_fast.__version__, "torch": torch.__version__,
            "cuda": torch.version.cuda or "none", "dali": _package_version("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali"),
            "ffcv": _package_version("ffcv"), "devices": devices, "world_size": world_size}
