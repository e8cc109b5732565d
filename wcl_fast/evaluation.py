"""Evaluation helpers shared by the kNN monitor, the linear probe, fine-tuning and the trainer: an encoder
loaded from any supported checkpoint, features of a whole split across ranks, gathered or each rank's
shard (each image counted once, unreadable images left out and counted), and top-1 / top-5 accuracy."""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from wcl_fast import dist as wdist
from wcl_fast.config import Config
from wcl_fast.runtime import autocast, autocast_dtype, memory_format


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, loader, device: torch.device, channels_last: bool = True,
                     precision: str = "fp32", normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Features [n, d] (fp32; L2-normalised unless normalize=False) and labels [n] of this rank's shard,
    and how many of its images were unreadable and left out (the evaluation loaders never substitute)."""
    was_training = encoder.training
    encoder.eval()
    feats, labels, skipped = [], [], 0
    dtype = autocast_dtype(precision)
    for batch in loader:
        skipped += batch.failed
        if batch.globals.shape[0] == 0:
            continue
        batch = batch.to(device, channels_last)
        with autocast(device, dtype):
            h = encoder(batch.globals)  # [B, d]
        feats.append(F.normalize(h.float(), dim=1) if normalize else h.float())
        labels.append(batch.label)
    encoder.train(was_training)
    if not feats:
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.int64, device=device), skipped
    return torch.cat(feats), torch.cat(labels), skipped


def extract_all(encoder: torch.nn.Module, loader, total: int, what: str, device: torch.device, channels_last: bool = True,
                precision: str = "fp32", normalize: bool = True,
                gather: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """extract_features over every rank's shard, gathered in rank order: (features, labels, unreadable
    images left out, summed over ranks); gather=False: this rank's shard only (the kNN monitor, which
    never holds a whole split). Checks that the shards covered the `total` samples exactly once and names
    the unreadable ones' count (`what`: e.g. "data.val_dir") when there are any."""
    feats, labels, skipped = extract_features(encoder, loader, device, channels_last, precision, normalize)
    rows = feats.shape[0]
    if wdist.world_size() > 1:
        counts = torch.tensor([rows, skipped], dtype=torch.int64, device=device)
        dist.all_reduce(counts)
        rows, skipped = counts.tolist()  # sync point (evaluation only)
    if gather:
        feats, labels = gather_variable(feats), gather_variable(labels)
    assert rows + skipped == total, "evaluation shards must cover each set exactly once"
    if skipped and wdist.rank() == 0:
        print(f"warning: {what}: {skipped} of {total} images are unreadable and were left out "
              f"(the warnings above name them); evaluated {rows}", file=sys.stderr, flush=True)
    if rows == 0:
        from wcl_fast.config import ConfigError

        raise ConfigError(f"{what}: none of its {total} images could be read")
    return feats, labels, skipped


def gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor in rank order; row counts may differ (no padded rows kept)."""
    world = wdist.world_size()
    if world == 1:
        return x
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]  # sync point (evaluation only)
    padded = torch.zeros((max(counts),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:c] for part, c in zip(parts, counts)])


def load_encoder(cfg: Config, device: torch.device, checkpoint: str | None = None) -> torch.nn.Module:
    """Encoder of `checkpoint` (default linear.checkpoint; "" = untrained), frozen, in eval mode."""
    from wcl_fast.checkpoint import load_encoder_checkpoint
    from wcl_fast.config import to_dict
    from wcl_fast.model import build_encoder

    encoder = build_encoder(cfg.model.arch, cfg.model.stem, cfg.model.widths)
    checkpoint = cfg.linear.checkpoint if checkpoint is None else checkpoint
    if checkpoint:  # a wcl-fast checkpoint, an exported or torchvision ResNet state dict, a reference-code file
        load_encoder_checkpoint(encoder, checkpoint, to_dict(cfg)["model"])
    for param in encoder.parameters():
        param.requires_grad_(False)
    return encoder.to(device, memory_format=memory_format(cfg.model.channels_last)).eval()


@torch.no_grad()
def encoder_features(encoder: torch.nn.Module, batch, cfg: Config) -> torch.Tensor:
    with autocast(batch.globals.device, autocast_dtype(cfg.train.precision)):
        return encoder(batch.globals).float()  # [B, d]


@torch.no_grad()
def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return 100.0 * hits[:, 0].float().mean().item(), 100.0 * hits.any(dim=1).float().mean().item()  # sync point
