"""Weighted kNN monitor (Wu et al., CVPR 2018, "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination", Sec. 3.4): k = 200 nearest training features by cosine similarity vote
with weight exp(s / T), T = 0.1 (docs/wcl.md §5).

Features are the encoder outputs h (before the heads) under the evaluation transform. Each rank
extracts an unpadded contiguous shard; shards are gathered so every sample counts exactly once.

Standalone: python -m wcl_fast.knn --config configs/X.yaml checkpoint=PATH [key=value ...]
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from wcl_fast import dist as wdist
from wcl_fast.cli import ArgumentParser, command


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, loader, device: torch.device, channels_last: bool = True,
                     precision: str = "fp32", normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Features [n, d] (fp32; L2-normalised unless normalize=False) and labels [n] of this rank's shard,
    and how many of its images were unreadable and left out (the evaluation loaders never substitute)."""
    was_training = encoder.training
    encoder.eval()
    feats, labels, skipped = [], [], 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    for batch in loader:
        skipped += batch.failed
        if batch.globals.shape[0] == 0:
            continue
        batch = batch.to(device, channels_last)
        with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            h = encoder(batch.globals)  # [B, d]
        feats.append(F.normalize(h.float(), dim=1) if normalize else h.float())
        labels.append(batch.label)
    encoder.train(was_training)
    if not feats:
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.int64, device=device), skipped
    return torch.cat(feats), torch.cat(labels), skipped


def extract_all(encoder: torch.nn.Module, loader, total: int, what: str, device: torch.device, channels_last: bool = True,
                precision: str = "fp32", normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """extract_features over every rank's shard, gathered in rank order: (features, labels, unreadable
    images left out). Checks that the shards covered the `total` samples exactly once and names the
    unreadable ones' count (`what`: e.g. "data.val_dir") when there are any."""
    feats, labels, skipped = extract_features(encoder, loader, device, channels_last, precision, normalize)
    if wdist.world_size() > 1:
        count = torch.tensor([float(skipped)], device=device)
        dist.all_reduce(count)
        skipped = int(count.item())  # sync point (evaluation only)
    feats, labels = gather_variable(feats), gather_variable(labels)
    assert feats.shape[0] + skipped == total, "evaluation shards must cover each set exactly once"
    if skipped and wdist.rank() == 0:
        print(f"warning: {what}: {skipped} of {total} images are unreadable and were left out "
              f"(the warnings above name them); evaluated {feats.shape[0]}", file=sys.stderr, flush=True)
    if feats.shape[0] == 0:
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


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores [m, C]: sum over the k most similar training features of exp(sim / T) per class."""
    k = min(k, train_features.shape[0])
    scores = []
    for start in range(0, test_features.shape[0], chunk):
        sims = test_features[start:start + chunk] @ train_features.t()  # [c, n]
        top_sims, top_idx = sims.topk(k, dim=1)  # [c, k]
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes, device=sims.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, k=200, temperature=0.1) -> dict:
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    correct = top == test_labels[:, None]
    return {"top1": 100.0 * correct[:, 0].float().mean().item(),  # sync point (evaluation only)
            "top5": 100.0 * correct.any(dim=1).float().mean().item(), "count": int(test_labels.shape[0])}


def evaluate_knn(encoder: torch.nn.Module, cfg, device: torch.device) -> dict:
    """kNN top-1/top-5 of `encoder` with data.train_dir as the memory bank and data.val_dir as the test set."""
    from pipelines import build_eval_loader, resolve_backend

    resolve_backend(cfg)  # data.backend=auto -> the concrete loader
    rank, world = wdist.rank(), wdist.world_size()
    pin = device.type == "cuda"
    train_loader, n_train, num_classes = build_eval_loader(cfg.data, cfg.data.train_dir, "data.train_dir",
                                                           cfg.knn.batch_size, rank, world, pin)
    val_loader, n_val, _ = build_eval_loader(cfg.data, cfg.data.val_dir, "data.val_dir",
                                             cfg.knn.batch_size, rank, world, pin)
    bank, bank_labels, _ = extract_all(encoder, train_loader, n_train, "data.train_dir", device, cfg.model.channels_last,
                                       cfg.train.precision)
    test, test_labels, skipped = extract_all(encoder, val_loader, n_val, "data.val_dir", device, cfg.model.channels_last,
                                             cfg.train.precision)
    result = knn_accuracy(bank, bank_labels, test, test_labels, num_classes, cfg.knn.k, cfg.knn.temperature)
    result["skipped"] = skipped  # unreadable test images, left out of `count`
    return result


@command
def main(argv=None) -> int:
    from pipelines import resolve_backend
    from wcl_fast.checkpoint import load_encoder_checkpoint
    from wcl_fast.config import check_paths, load_config, to_dict
    from wcl_fast.model import build_encoder

    parser = ArgumentParser(prog="python -m wcl_fast.knn", description="Weighted kNN evaluation of a WCL encoder")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value; checkpoint=PATH selects the weights (default: untrained)")
    args = parser.parse_args(argv)
    checkpoint = None
    overrides = []
    for item in args.overrides:
        if item.startswith("checkpoint="):
            checkpoint = item.split("=", 1)[1]
        else:
            overrides.append(item)
    cfg = load_config(args.config, overrides)
    check_paths(cfg, need_val=True)
    resolve_backend(cfg, report=True)
    ctx = wdist.init_distributed()
    torch.manual_seed(cfg.train.seed)
    encoder = build_encoder(cfg.model.arch, cfg.model.stem, cfg.model.widths)
    if checkpoint:  # a wcl-fast checkpoint, an exported or torchvision ResNet state dict, a reference-code file
        load_encoder_checkpoint(encoder, checkpoint, to_dict(cfg)["model"])
    encoder.to(ctx.device, memory_format=torch.channels_last if cfg.model.channels_last else torch.contiguous_format)
    result = evaluate_knn(encoder, cfg, ctx.device)
    if ctx.is_main:
        left_out = f" ({result['skipped']} unreadable left out)" if result["skipped"] else ""
        print(f"kNN (k={cfg.knn.k}, T={cfg.knn.temperature}) on {result['count']} images{left_out}: "
              f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
