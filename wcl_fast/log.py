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


class RunLogger:
    """Writes `log.jsonl` (one object per logged interval) and TensorBoard events under out_dir."""

    def __init__(self, out_dir: str | Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "log.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
            except ImportError:
                self.info("warning: tensorboard is not installed; logging to log.jsonl only (pip install tensorboard)")

    def info(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stderr)

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


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
