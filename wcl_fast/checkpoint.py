"""Checkpoint files and run folders.

- `atomic_save`: serialise in memory, write to a temporary file in the same directory, fsync, rename;
  a crash never leaves a partial file under the real name, and a failed write (full disk, I/O error)
  raises `CheckpointWriteError` with one line while the previous file stays intact.
- `load_checkpoint` / `encoder_weights` / `load_weights`: read a checkpoint or a torchvision /
  reference-code state dict, with one-line `CheckpointError`s (a `ConfigError`: exit 2 in every command)
  that name the file and, for a model that does not fit, the first differing tensor and the keys.
- `RunLock`: one live run per output folder (a POSIX record lock that dies with its process).
"""
from __future__ import annotations

import errno
import fcntl
import io
import os
import random
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wcl_fast.config import ConfigError

TMP_SUFFIX = ".tmp"


class CheckpointError(ConfigError):
    """A checkpoint that is missing, unreadable or does not fit the model (a user error: exit 2)."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (no space, I/O error); the previous file under that name is intact."""


def temp_name_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_save(obj, path: str | os.PathLike, serialise=None) -> None:
    """torch.save (or serialise(obj) -> bytes) to `path` so that a crash never leaves a partial file
    under that name.

    The object is serialised into memory first, so that a failing write surfaces as the operating
    system's error (ENOSPC, EIO, EFBIG) instead of the zip writer's 'unexpected pos'."""
    path = Path(path)
    buffer = io.BytesIO()
    if serialise is None:
        torch.save(obj, buffer)
    else:
        buffer.write(serialise(obj))
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_name_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            reason += f" ({buffer.getbuffer().nbytes / 2**20:.0f} MB to write)"
        previous = f"the previous '{path.name}' there is intact" if path.is_file() else f"no earlier '{path.name}' exists"
        raise CheckpointWriteError(exc.errno, f"could not write checkpoint '{path}': {reason}; {previous}. "
                                              f"Free space or choose another folder, then resume") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder: str | os.PathLike, names=("checkpoint.pt",)) -> tuple[int, int]:
    """Delete the temporary files that interrupted `atomic_save` calls (killed processes) left in
    `folder`; call it only while holding the folder's RunLock. Returns (files, bytes) removed."""
    folder = Path(folder)
    count = size = 0
    if not folder.is_dir():
        return 0, 0
    prefixes = tuple(temp_name_prefix(Path(name)) for name in names)
    for entry in folder.iterdir():
        if entry.name.startswith(prefixes) and entry.name.endswith(TMP_SUFFIX) and entry.is_file():
            try:
                size += entry.stat().st_size
                entry.unlink()
                count += 1
            except OSError:
                pass
    return count, size


class RunLock:
    """Exclusive hold on a run folder: a POSIX record lock on `<folder>/.lock`.

    The kernel drops the lock when the holding process ends in any way (kill -9 included), so a
    resume is never blocked by a dead run; record locks are not inherited by forked DataLoader
    workers. The file holds the holder's pid, host and start time for the message of a second run."""

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike, key: str = "train.out_dir"):
        self.folder, self.key, self.fd = Path(folder), key, None

    def acquire(self) -> "RunLock":
        path = self.folder / self.NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):  # ENOLCK etc.: a filesystem without locks
                os.close(fd)
                return self
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"{self.key} '{self.folder}' is in use by a live run ({holder}); wait for it to end, "
                              f"stop it, or set {self.key} to another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the record lock
            self.fd = None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint (or any torch.save'd dict) on the CPU; one CheckpointError if it is missing,
    empty, truncated, not a PyTorch file or not a dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist (or is not a file); check the path")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes): an interrupted copy or write; copy it again")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file: RuntimeError, EOFError, UnpicklingError
        detail = str(exc).strip().splitlines()[0][:100] if str(exc).strip() else ""
        raise CheckpointError(f"checkpoint '{path}' could not be read ({type(exc).__name__}{': ' + detail if detail else ''}); "
                              f"it is truncated, damaged or not a PyTorch file") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(state).__name__}, not a dict of tensors")
    return state


def _strip(state: dict, prefix: str) -> dict:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def encoder_weights(state: dict, path: str | os.PathLike) -> dict:
    """The ResNet encoder's tensors in torchvision key layout (conv1.*, bn1.*, layerN.*) from any of:
    a wcl-fast training checkpoint ({'model': {'net.*', 'head1.*', ...}}), a wcl-fast model state dict,
    an exported / torchvision ResNet state dict (fc.* dropped), a reference-code checkpoint
    ({'model': {'module.net.*', ...}}), or any of these under 'state_dict' / 'model' with 'module.'."""
    for _ in range(2):  # unwrap {'model': ...} / {'state_dict': ...}
        inner = state.get("model", state.get("state_dict"))
        if isinstance(inner, dict) and not any(torch.is_tensor(v) for v in state.values()):
            state = inner
    tensors = {key: value for key, value in state.items() if torch.is_tensor(value)}
    for prefix in ("module.", "_orig_mod."):
        if tensors and all(key.startswith(prefix) for key in tensors):
            tensors = _strip(tensors, prefix)
    for prefix in ("net.", "encoder.", "backbone."):
        inner = _strip(tensors, prefix)
        if "conv1.weight" in inner:
            return inner
    if "conv1.weight" in tensors:
        return {key: value for key, value in tensors.items() if not key.startswith("fc.")}
    first = ", ".join(list(state)[:4]) or "nothing"
    raise CheckpointError(f"checkpoint '{path}' holds neither a wcl-fast model (net.*) nor a torchvision ResNet "
                          f"state dict (conv1.weight, layer1.*); its first keys: {first}")


def describe_model(model_cfg: dict) -> str:
    widths = model_cfg.get("widths") or []
    return (f"model.arch={model_cfg.get('arch')}, model.stem={model_cfg.get('stem')}"
            + (f", model.widths={widths}" if widths else ""))


def load_weights(module: torch.nn.Module, weights: dict, path: str | os.PathLike, wanted: str,
                 written: str | None = None) -> None:
    """module.load_state_dict(weights, strict) or one CheckpointError naming the first tensor whose shape
    differs (or the missing / unexpected keys), what this run asks (`wanted`) and, when the checkpoint
    says so, what it was written with (`written`)."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    shapes = [(key, tuple(weights[key].shape), tuple(value.shape)) for key, value in expected.items()
              if key in weights and tuple(weights[key].shape) != tuple(value.shape)]
    if not (missing or unexpected or shapes):
        module.load_state_dict(weights)
        return
    if shapes:
        key, have, want = shapes[0]
        what = f"'{key}' has shape {list(have)} there, this model needs {list(want)} ({len(shapes)} tensors differ)"
    elif missing:
        what = f"{len(missing)} tensors of this model are missing from it (first: '{missing[0]}')"
    else:
        what = f"it has {len(unexpected)} tensors this model lacks (first: '{unexpected[0]}')"
    origin = f"; the checkpoint was written with {written}" if written else ""
    raise CheckpointError(f"checkpoint '{path}' does not fit this run's model ({wanted}): {what}{origin}; "
                          f"set the model keys to match it or choose another checkpoint")


def load_encoder_checkpoint(encoder: torch.nn.Module, path: str | os.PathLike, model_cfg: dict) -> None:
    """Load the encoder of any checkpoint `encoder_weights` reads into `encoder` (built from model_cfg,
    the run's `model` section as a dict), or one CheckpointError naming the mismatch."""
    state = load_checkpoint(path)
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    written = describe_model(saved["model"]) if isinstance(saved.get("model"), dict) else None
    load_weights(encoder, encoder_weights(state, path), path, describe_model(model_cfg), written)


# ---- the training checkpoint: resume and save -------------------------------------------------------

CHECKPOINT_NAME = "checkpoint.pt"
# keys a resumed run must share with its checkpoint: they change the model's tensors, the optimisation
# problem or the objective's state; a change would resume silently into another experiment
RESUME_KEYS = ("data.batch_size", "model.arch", "model.stem", "model.widths", "model.head_hidden", "model.head_out",
               "loss.objective", "loss.co2.form", "loss.clinfonce.form", "loss.momentum.queue_size")


class NonFiniteError(RuntimeError):
    """Non-finite training: too many consecutive NaN/inf steps (train.max_bad_steps), or a state holding
    NaN/inf at a checkpoint."""


def resolve_resume(cfg) -> Path | None:
    """The checkpoint `train.resume` names: none -> None, auto -> out_dir/checkpoint.pt if it exists."""
    choice = cfg.train.resume
    if choice == "none":
        return None
    if choice == "auto":
        path = Path(cfg.train.out_dir) / CHECKPOINT_NAME
        return path if path.is_file() else None
    path = Path(choice)
    if not path.is_file():
        raise ConfigError(f"train.resume: '{choice}' does not exist; use auto, none or a checkpoint path")
    return path


def _nested(values: dict, key: str):
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            return None
        values = values[part]
    return values


def check_resumable(state: dict, cfg, path: Path) -> None:
    """One CheckpointError if `state` is not a wcl-fast training checkpoint or was written with other
    values of RESUME_KEYS (all differences named)."""
    from wcl_fast.config import to_dict

    missing = [key for key in ("model", "optimizer", "config", "global_step") if key not in state]
    if missing:
        raise CheckpointError(f"train.resume: '{path}' is not a wcl-fast training checkpoint (no {', '.join(missing)}); "
                              f"set train.resume=none to start a new run")
    ours = to_dict(cfg)
    differ = [f"{key}={_nested(state['config'], key)!r} there, {_nested(ours, key)!r} here" for key in RESUME_KEYS
              if _nested(state["config"], key) is not None and _nested(state["config"], key) != _nested(ours, key)]
    if differ:
        raise CheckpointError(f"train.resume: checkpoint '{path}' was written with other settings ({'; '.join(differ)}); "
                              f"resume with the checkpoint's values or use a new train.out_dir")


def nonfinite_entries(tree, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a nested dict / list that hold NaN or inf (one host sync)."""
    names, tensors = [], []

    def walk(node, name):
        if torch.is_tensor(node):
            if node.is_floating_point() or node.is_complex():
                names.append(name)
                tensors.append(torch.isfinite(node).all())
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{name}.{key}" if name else str(key))
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{name}[{i}]")

    walk(tree, prefix)
    if not tensors:
        return []
    finite = torch.stack(tensors).tolist()  # sync point (checkpoints only)
    return [name for name, ok in zip(names, finite) if not ok]


def resume(path: Path, cfg, model, optimizer, scaler, steps_per_epoch: int) -> tuple[dict, int, int, int]:
    """Load a training checkpoint into model, optimizer, scaler and the RNGs (checked first: the same
    settings, the same steps per epoch); returns (state, epoch, step in epoch, global step)."""
    from wcl_fast.config import to_dict

    state = load_checkpoint(path)
    check_resumable(state, cfg, path)
    load_weights(model, state["model"], path, describe_model(to_dict(cfg)["model"]),
                 describe_model(state["config"].get("model", {})))
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    if state.get("steps_per_epoch") not in (None, steps_per_epoch):
        raise ConfigError(f"train.resume: checkpoint '{path}' has {state['steps_per_epoch']} steps per "
                          f"epoch, this run {steps_per_epoch}; resume with the same data and batch size")
    return state, state["epoch"], state["step_in_epoch"], state["global_step"]


class Checkpointer:
    """Writes the training checkpoint (rank 0; atomically), never from a state holding NaN/inf, and
    remembers the last good one for the error messages. Every rank learns the outcome of a write."""

    def __init__(self, path: Path, cfg, ctx, steps_per_epoch: int, model, optimizer, scaler, objective,
                 last_good: tuple | None = None):
        self.path, self.cfg, self.ctx, self.steps_per_epoch = path, cfg, ctx, steps_per_epoch
        self.model, self.optimizer, self.scaler, self.objective = model, optimizer, scaler, objective
        self.last_good = last_good  # (path, epoch, step in epoch, global step) of the newest finite checkpoint

    def last_good_text(self) -> str:
        if self.last_good is None:
            return "no checkpoint of this run was written before that"
        path, epoch, step, g = self.last_good
        return f"the last good checkpoint is '{path}' (epoch {epoch}, step {step}, global step {g})"

    def save(self, epoch: int, step_in_epoch: int, global_step: int) -> None:
        from wcl_fast import dist as wdist
        from wcl_fast.config import to_dict

        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "objective": self.objective.state_dict()}
        bad = nonfinite_entries(state)
        failed = torch.tensor([float(bool(bad)), 0.0])
        error = None
        if self.ctx.is_main and not bad:
            state.update(epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step,
                         steps_per_epoch=self.steps_per_epoch, rng=rng_state(), config=to_dict(self.cfg),
                         world_size=self.ctx.world_size)
            try:
                atomic_save(state, self.path)
            except CheckpointWriteError as exc:
                error, failed[1] = exc, 1.0
        failed = wdist.all_reduce_mean(failed.to(self.ctx.device)).tolist()  # also the barrier after the write
        if failed[0] > 0:
            where = f"{len(bad)} tensors, first '{bad[0]}'" if bad else "on another rank"
            raise NonFiniteError(f"the training state holds NaN/inf values at global step {global_step} ({where}); "
                                 f"no checkpoint was written from it and {self.last_good_text()}. Lower optim.base_lr, "
                                 f"try train.precision=fp32, or check the data; resume=auto continues from there")
        if failed[1] > 0:
            raise error if error is not None else CheckpointWriteError("rank 0 could not write the checkpoint")
        self.last_good = (self.path, epoch, step_in_epoch, global_step)
