"""Checkpoint files and run folders.

- `atomic_save`: serialise in memory, write to a temporary file in the same directory, fsync, rename;
  a crash never leaves a partial file under the real name, and a failed write (full disk, I/O error)
  raises `CheckpointWriteError` with one line while the previous file stays intact.
- `load_checkpoint` / `encoder_weights` / `load_weights`: read a checkpoint, a torchvision / reference-code
  state dict or a .safetensors file, with one-line `CheckpointError`s (a `ConfigError`: exit 2 in every
  command) that name the file and, for a model that does not fit, the first differing tensor and the keys.
  Reading never runs code from the file: `torch.load(weights_only=True)`, plus, for checkpoints of earlier
  versions, exactly the numpy globals their pickled RNG state needs (docs/running.md, "Safe loading").
- `RunLock`: one live run per output folder (a POSIX record lock that dies with its process).
"""
from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import pickle
import pickletools
import random
import re
import shlex
import socket
import tempfile
import time
import warnings
import zipfile
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
    """The host RNGs as tensors and plain values (python's state is a tuple of ints; numpy's as in
    `numpy_rng_state`), so that the checkpoint loads with torch.load(weights_only=True)."""
    state = {"python": random.getstate(), "numpy": numpy_rng_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def numpy_rng_state() -> dict:
    """np.random's global generator (MT19937: 624 key words, position, cached Gaussian) without numpy
    objects: the key as an int64 tensor (uint32 values), the rest as Python numbers."""
    state = np.random.get_state(legacy=False)
    return {"bit_generator": state["bit_generator"], "key": torch.from_numpy(state["state"]["key"].astype(np.int64)),
            "pos": int(state["state"]["pos"]), "has_gauss": int(state["has_gauss"]), "gauss": float(state["gauss"])}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    if isinstance(saved, dict):  # numpy_rng_state(); earlier checkpoints hold np.random.get_state()'s tuple
        saved = {"bit_generator": saved["bit_generator"], "has_gauss": saved["has_gauss"], "gauss": saved["gauss"],
                 "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]}}
    np.random.set_state(saved)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- reading files: weights only --------------------------------------------------------------------------

# Checkpoints of earlier wcl-fast versions pickled np.random.get_state(): ('MT19937', a uint32 ndarray, ints,
# a float). Unpickling that array needs these numpy globals and nothing else; they are allowed only while
# reading such a file (never globally), next to torch's own weights-only allowlist. numpy < 2 writes the
# reconstructor as numpy.core.multiarray._reconstruct, numpy >= 2 as numpy._core.multiarray._reconstruct.
LEGACY_RNG_GLOBALS = ("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray",
                      "numpy.dtype", "numpy.dtypes.UInt32DType")


def _legacy_rng_allowlist() -> list:
    reconstruct = np.zeros(1).__reduce__()[0]  # the function numpy pickles arrays with, whatever its module
    uint32 = type(np.dtype(np.uint32))  # the class a uint32 dtype is rebuilt as (numpy.dtypes.UInt32DType)
    return [(reconstruct, LEGACY_RNG_GLOBALS[0]), (reconstruct, LEGACY_RNG_GLOBALS[1]), (np.ndarray, LEGACY_RNG_GLOBALS[2]),
            (np.dtype, LEGACY_RNG_GLOBALS[3]), (uint32, LEGACY_RNG_GLOBALS[4])]


def _refused_global(message: str) -> str | None:
    """The global torch's weights-only unpickler refused, from its message ('Unsupported global: GLOBAL
    posix.system ...', '... GLOBAL posix.system whose module posix is blocked'); builtins are named bare."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    if match is None:
        return None
    return match[1] if "." in match[1] else f"builtins.{match[1]}"


def pickle_globals(path: Path) -> list[str]:
    """The globals ('module.name') the pickles of a torch.save file name, in order, read without unpickling
    (pickletools' opcode stream); best effort, for naming what a refused file asks for."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                streams = [io.BytesIO(archive.read(name)) for name in archive.namelist() if name.endswith("data.pkl")]
        else:
            streams = [open(path, "rb")]  # read as far as the pickles go, not the tensor data after them
    except (OSError, zipfile.BadZipFile):
        return []
    found = []
    for stream in streams:
        for _ in range(4):  # the legacy (non-zip) format: magic number, protocol, system info, then the object
            memo, strings = {}, []
            try:
                for opcode, arg, _ in pickletools.genops(stream):
                    if opcode.name == "GLOBAL":
                        found.append(arg.replace(" ", "."))
                    elif opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                        strings.append(arg)
                    elif opcode.name == "MEMOIZE" and strings:
                        memo[len(memo)] = strings[-1]
                    elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and strings:
                        memo[arg] = strings[-1]
                    elif opcode.name in ("GET", "BINGET", "LONG_BINGET") and arg in memo:
                        strings.append(memo[arg])
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
            except Exception:  # not a pickle (any more): the tensor data of the legacy format
                break
        stream.close()
    return list(dict.fromkeys(found))


def conversion_command(path: Path) -> tuple[str, Path]:
    """The explicit step a user who trusts `path` runs to keep only its tensors (the model's state dict)
    in a file wcl-fast reads with weights only; returns (shell command, the file it writes)."""
    out = path.with_name(f"{path.stem}.weights.pt")
    code = (f"import torch; s = torch.load({json.dumps(str(path))}, map_location=\"cpu\", weights_only=False); "
            f's = s.get("model", s.get("state_dict", s)); '
            f"torch.save({{k: v for k, v in s.items() if torch.is_tensor(v)}}, {json.dumps(str(out))})")
    return f"python -c {shlex.quote(code)}", out


def refusal(path: Path, asked: str) -> CheckpointError:
    command, out = conversion_command(path)
    return CheckpointError(f"checkpoint '{path}' asks to run '{asked}' when loaded; wcl-fast loads weights only and "
                           f"did not run it. If you trust the file, keep only its model tensors with: {command} and use "
                           f"'{out}' (knn, linear, finetune and export read it; a run cannot resume from it)")


def _reason(exc: Exception) -> str:
    """The cause in torch's long weights-only message (its last line before the documentation link)."""
    text = str(exc).split("Check the documentation of torch.load")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1].removeprefix("WeightsUnpickler error:").strip() if lines else ""


def _asked_global(path: Path, exc: Exception) -> str | None:
    """The global a refused pickle asks for: from torch's message or, where torch stops at an opcode it does
    not read (protocol 4's FRAME, STACK_GLOBAL), the first global outside torch's own of a static scan."""
    asked = _refused_global(_reason(exc))
    if asked is None:
        torch_own = ("torch.", "collections.OrderedDict", "_codecs.encode")  # tensors, state dicts, protocol-2 bytes
        outside = [name for name in pickle_globals(path)
                   if not name.startswith(torch_own) and name not in LEGACY_RNG_GLOBALS]
        asked = outside[0] if outside else None
    return asked


def _torch_load(path: Path):
    with warnings.catch_warnings():  # a pickle protocol other than torch's: the refusal (or error) says enough
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


def _weights_only_load(path: Path):
    """torch.load with weights_only=True; for a checkpoint of an earlier version, the same with the numpy
    globals of its RNG state allowed too. A pickle that asks for anything else: one CheckpointError naming
    it (nothing of it runs); one torch cannot read otherwise: torch's error."""
    try:
        return _torch_load(path)
    except pickle.UnpicklingError as exc:
        asked = _asked_global(path, exc)
        if asked is None:
            raise
        if asked not in LEGACY_RNG_GLOBALS:
            raise refusal(path, asked) from None
    try:
        with torch.serialization.safe_globals(_legacy_rng_allowlist()):
            return _torch_load(path)
    except pickle.UnpicklingError as exc:
        asked = _asked_global(path, exc)
        if asked is None:
            raise
        raise refusal(path, asked) from None


def is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header ('{'); torch.save
    files start with 'PK' (zip) or a pickle's 0x80."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100 * 2**20


def _load_safetensors(path: Path) -> dict:
    """The tensors of a .safetensors file (export --format safetensors), with the model section of the
    run that wrote it (its metadata) as state['config']['model'] for the mismatch messages."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(path, device="cpu")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    try:
        model = json.loads(metadata.get("wcl_fast.model", "null"))
    except ValueError:
        model = None
    if isinstance(model, dict):
        state["config"] = {"model": model}
    return state


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint (a torch.save'd dict or a .safetensors file) on the CPU without running code from
    it; one CheckpointError if it is missing, empty, truncated, not a PyTorch / safetensors file, not a
    dict, or asks to run anything (named)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist (or is not a file); check the path")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes): an interrupted copy or write; copy it again")
    safetensors = False
    try:
        safetensors = is_safetensors(path)
        state = _load_safetensors(path) if safetensors else _weights_only_load(path)
    except CheckpointError:
        raise
    except Exception as exc:  # torch raises many types for a damaged file: RuntimeError, EOFError, UnpicklingError
        text = _reason(exc) if isinstance(exc, pickle.UnpicklingError) else str(exc).strip()
        detail = text.splitlines()[0][:100] if text else ""
        kind = "safetensors" if safetensors else "PyTorch"
        raise CheckpointError(f"checkpoint '{path}' could not be read ({type(exc).__name__}{': ' + detail if detail else ''}); "
                              f"it is truncated, damaged or not a {kind} file") from None
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


def check_same_data(state: dict, data_identity: dict | None, path: Path) -> None:
    """One CheckpointError naming the difference when the checkpoint was written on other shards (data.shards:
    the shard names and counts in order, recorded as `data_identity` with their hash)."""
    there = state.get("data_identity")
    if not there or not data_identity or there.get("hash") == data_identity.get("hash"):
        return
    from pipelines.shards import identity_difference

    raise CheckpointError(f"train.resume: checkpoint '{path}' was written on other shards ({identity_difference(there, data_identity)}); "
                          f"resume with the same data.shards (their order fixes the sample order) or use a new train.out_dir")


def resume(path: Path, cfg, model, optimizer, scaler, steps_per_epoch: int,
           data_identity: dict | None = None) -> tuple[dict, int, int, int]:
    """Load a training checkpoint into model, optimizer, scaler and the RNGs (checked first: the same
    settings, the same data (data.shards), the same steps per epoch); returns (state, epoch, step in epoch,
    global step)."""
    from wcl_fast.config import to_dict

    state = load_checkpoint(path)
    check_resumable(state, cfg, path)
    check_same_data(state, data_identity, path)
    load_weights(model, state["model"], path, describe_model(to_dict(cfg)["model"]),
                 describe_model(state["config"].get("model", {})))
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    if state.get("steps_per_epoch") not in (None, steps_per_epoch):
        raise ConfigError(f"train.resume: checkpoint '{path}' has {state['steps_per_epoch']} steps per "
                          f"epoch, this run {steps_per_epoch}; resume with the same data and batch size")
    return state, state["epoch"], state["step_in_epoch"], state["global_step"]


def resume_probe(probe, state: dict, path: Path, info) -> None:
    """The online probe's parameters and optimizer state from a training checkpoint; one written without a
    probe leaves it untrained, said through `info`."""
    if state.get("probe") is None:
        info(f"the checkpoint '{path}' holds no online-probe state (written with train.online_probe=false); "
             f"the probe starts untrained")
        return
    probe.load_state_dict(state["probe"], path)


class Checkpointer:
    """Writes the training checkpoint (rank 0; atomically), never from a state holding NaN/inf, and
    remembers the last good one for the error messages. Every rank learns the outcome of a write."""

    def __init__(self, path: Path, cfg, ctx, steps_per_epoch: int, model, optimizer, scaler, objective,
                 last_good: tuple | None = None, probe=None, data_identity: dict | None = None):
        self.path, self.cfg, self.ctx, self.steps_per_epoch = path, cfg, ctx, steps_per_epoch
        self.model, self.optimizer, self.scaler, self.objective = model, optimizer, scaler, objective
        self.probe = probe  # wcl_fast.probe.OnlineProbe (train.online_probe) or None
        self.data_identity = data_identity  # data.shards: the shard names, counts and their hash (check_same_data)
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
        if self.probe is not None:
            state["probe"] = self.probe.state_dict()
        bad = nonfinite_entries(state)
        failed = torch.tensor([float(bool(bad)), 0.0])
        error = None
        if self.ctx.is_main and not bad:
            state.update(epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step,
                         steps_per_epoch=self.steps_per_epoch, rng=rng_state(), config=to_dict(self.cfg),
                         world_size=self.ctx.world_size)
            if self.data_identity is not None:
                state["data_identity"] = self.data_identity
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
