"""Encoder export and official-checkpoint import.

    python -m wcl_fast.export --checkpoint runs/X/checkpoint.pt --out resnet50_wcl.pth
        writes the encoder as a torchvision ResNet state_dict:
        torchvision.models.resnet50().load_state_dict(torch.load(out), strict=False) reports only fc.* missing.
    python -m wcl_fast.export --official wcl-200.pth --out runs/official/checkpoint_model.pt
        converts a checkpoint of the reference code (github.com/mingkai-zheng/WCL: {'model': DDP state
        dict with keys module.net.*, module.head1.*, module.head2.*}) to this project's model layout.
"""
from __future__ import annotations

import sys
from pathlib import Path


from wcl_fast.checkpoint import CheckpointWriteError, atomic_save, encoder_weights, load_checkpoint
from wcl_fast.cli import ArgumentParser, command
from wcl_fast.config import ConfigError

OFFICIAL_PREFIXES = ("module.net.", "module.head1.", "module.head2.")


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
    args = parser.parse_args(argv)
    try:
        if args.checkpoint:
            state = load_checkpoint(args.checkpoint)
            out = encoder_weights(state, args.checkpoint)
            if state.get("config", {}).get("model", {}).get("stem") == "small":
                print("note: this encoder has the small-image stem; torchvision's conv1 shape differs", file=sys.stderr)
        else:
            out = {"model": import_official(load_checkpoint(args.official))}
    except (ValueError, KeyError) as exc:  # ConfigError / CheckpointError: the @command wrapper (exit 2)
        if isinstance(exc, ConfigError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        atomic_save(out, Path(args.out))
    except CheckpointWriteError as exc:
        print(f"error: {exc.strerror}", file=sys.stderr)
        return 4
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
