"""Encoder export and official-checkpoint import.

    python -m wcl_fast.export --checkpoint runs/X/checkpoint.pt --out resnet50_wcl.pth [--format torchvision]
        writes the encoder as a torchvision ResNet state_dict:
        torchvision.models.resnet50().load_state_dict(torch.load(out), strict=False) reports only fc.* missing.
    ... --format timm --out resnet50_wcl_timm.pth
        the same tensors (timm's ResNet uses torchvision's names):
        timm.create_model('resnet50', num_classes=0).load_state_dict(torch.load(out)) loads strictly.
    ... --format safetensors --out resnet50_wcl.safetensors
        the same tensors as a safetensors file (no pickle: loading it cannot run code); prints its sha256
        and writes resnet50_wcl.safetensors.sha256 beside it (sha256sum -c format). knn, linear and
        finetune read it as their checkpoint; torchvision: load_state_dict(safetensors.torch.load_file(out),
        strict=False).
    ... --format detectron2 --out resnet50_wcl.pkl
        the pickled dict detectron2's DetectionCheckpointer reads (numpy arrays in detectron2's ResNet
        names, matching_heuristics): MODEL.WEIGHTS resnet50_wcl.pkl with MODEL.RESNETS.STRIDE_IN_1X1
        False, INPUT.FORMAT RGB and torchvision's pixel mean / std (see the README).
    python -m wcl_fast.export --official wcl-200.pth --out runs/official/checkpoint_model.pt
        converts a checkpoint of the reference code (github.com/mingkai-zheng/WCL: {'model': DDP state
        dict with keys module.net.*, module.head1.*, module.head2.*}) to this project's model layout.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
import sys
from pathlib import Path

import torch

from wcl_fast.checkpoint import CheckpointWriteError, atomic_save, encoder_weights, load_checkpoint
from wcl_fast.cli import ArgumentParser, command
from wcl_fast.config import ConfigError

OFFICIAL_PREFIXES = ("module.net.", "module.head1.", "module.head2.")
FORMATS = ("torchvision", "timm", "safetensors", "detectron2")


def detectron2_key(key: str) -> str | None:
    """The name detectron2's ResNet backbone gives a torchvision ResNet tensor (None: not loaded there).
    detectron2 (modeling/backbone/resnet.py) calls the stem's convolution stem.conv1 and the stages
    res2..res5 (torchvision's layer1..layer4); every convolution carries its BatchNorm as .norm, and a
    block's projection is .shortcut (torchvision: downsample.0 / downsample.1)."""
    if key.endswith("num_batches_tracked") or key.startswith("fc."):
        return None
    head, _, leaf = key.rpartition(".")
    if head == "conv1":
        return f"stem.conv1.{leaf}"
    if head == "bn1":
        return f"stem.conv1.norm.{leaf}"
    match = re.fullmatch(r"layer([1-4])\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)", head)
    if match is None:
        raise ValueError(f"'{key}' is not a torchvision ResNet tensor name")
    stage, block, part = int(match[1]) + 1, match[2], match[3]
    part = {"downsample.0": "shortcut", "downsample.1": "shortcut.norm"}.get(part) or \
        (f"conv{part[2:]}.norm" if part.startswith("bn") else part)
    return f"res{stage}.{block}.{part}.{leaf}"


def detectron2_checkpoint(encoder: dict) -> dict:
    """The pickled dict detectron2's DetectionCheckpointer reads from a .pkl file: numpy arrays under
    'model' in detectron2's names, and matching_heuristics so that it matches them to its modules."""
    model = {}
    for key, value in encoder.items():
        name = detectron2_key(key)
        if name is not None:
            model[name] = value.detach().cpu().numpy()
    return {"model": model, "__author__": "wcl-fast", "matching_heuristics": True}


def safetensors_bytes(encoder: dict, model_cfg: dict | None) -> bytes:
    """The encoder's tensors as a safetensors file (contiguous copies: a channels-last run's weights are
    not contiguous, and safetensors refuses tensors that share memory), the run's model section in the
    metadata (read back by wcl_fast.checkpoint for its mismatch messages)."""
    from safetensors.torch import save

    tensors = {key: value.detach().clone(memory_format=torch.contiguous_format) for key, value in encoder.items()}
    metadata = {"format": "pt", "layout": "torchvision"}
    if isinstance(model_cfg, dict):
        metadata["wcl_fast.model"] = json.dumps(model_cfg, default=str)
    return save(tensors, metadata)


def write_sha256(data: bytes, out: Path) -> str:
    """sha256 of `data` (the file written to `out`), also written to `<out>.sha256` in sha256sum's format
    ('<hex>  <name>'; `sha256sum -c` checks it from the same folder)."""
    digest = hashlib.sha256(data).hexdigest()
    atomic_save(f"{digest}  {out.name}\n".encode(), out.with_name(out.name + ".sha256"), lambda text: text)
    return digest


def encoder_state_dict(model_state: dict) -> dict:
    """torchvision ResNet keys (conv1.*, bn1.*, layerN.*) of a WCLModel state dict (keys net.*)."""
    encoder = {key[len("net."):]: value for key, value in model_state.items() if key.startswith("net.")}
    if not encoder:
        raise ValueError("the state dict has no 'net.*' keys: not a wcl-fast model")
    return encoder


def import_official(state: dict) -> dict:
    """WCLModel state dict from the reference code's checkpoint (whole file dict or its 'model' entry)."""
    model_state = state.get("model", state)
    unknown = [key for key in model_state if not key.startswith(OFFICIAL_PREFIXES)]
    if unknown:
        raise ValueError(f"not the official WCL layout: {len(unknown)} keys outside {', '.join(OFFICIAL_PREFIXES)} "
                         f"(first: {unknown[0]!r})")
    return {key[len("module."):]: value for key, value in model_state.items()}


@command
def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m wcl_fast.export", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a wcl-fast checkpoint.pt to export as a torchvision state dict")
    source.add_argument("--official", help="a reference-code checkpoint to convert to the wcl-fast layout")
    parser.add_argument("--out", required=True)
    parser.add_argument("--format", default="torchvision", choices=FORMATS,
                        help="with --checkpoint: the layout to write (timm: torchvision's names; detectron2: a .pkl)")
    args = parser.parse_args(argv)
    if args.format == "detectron2" and not args.out.endswith(".pkl"):
        raise ConfigError(f"--out: '{args.out}' must end in .pkl for --format detectron2 (detectron2 reads its "
                          f"pickled layout only from .pkl files)")
    if args.format == "safetensors" and not args.out.endswith(".safetensors"):
        raise ConfigError(f"--out: '{args.out}' must end in .safetensors for --format safetensors")
    if args.official and args.format != "torchvision":
        raise ConfigError("--format applies to --checkpoint exports; --official converts to the wcl-fast layout")
    try:
        if args.checkpoint:
            state = load_checkpoint(args.checkpoint)
            out = encoder_weights(state, args.checkpoint)
            model_cfg = state.get("config", {}).get("model") if isinstance(state.get("config"), dict) else None
            if (model_cfg or {}).get("stem") == "small":
                print(f"note: this encoder has the small-image stem; {args.format}'s ResNet conv1 shape differs",
                      file=sys.stderr)
            if args.format == "detectron2":
                out = detectron2_checkpoint(out)
            if args.format == "safetensors":
                out = safetensors_bytes(out, model_cfg)
        else:
            out = {"model": import_official(load_checkpoint(args.official))}
    except (ValueError, KeyError) as exc:  # ConfigError / CheckpointError: the @command wrapper (exit 2)
        if isinstance(exc, ConfigError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serialise = {"detectron2": pickle.dumps, "safetensors": lambda data: data}.get(args.format)
    try:
        atomic_save(out, Path(args.out), serialise)
        digest = write_sha256(out, Path(args.out)) if args.format == "safetensors" else None
    except CheckpointWriteError as exc:
        print(f"error: {exc.strerror}", file=sys.stderr)
        return 4
    print(f"wrote {args.out}" + (f" (sha256 {digest}, also in {args.out}.sha256)" if digest else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
