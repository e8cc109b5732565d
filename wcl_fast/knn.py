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

from wcl_fast import dist as wdist
from wcl_fast.cli import command, config_arguments
from wcl_fast.evaluation import extract_all
from wcl_fast.runtime import memory_format


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

    args = config_arguments("python -m wcl_fast.knn", "Weighted kNN evaluation of a WCL encoder",
                            "key=value; checkpoint=PATH selects the weights (default: untrained)", argv)
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
    encoder.to(ctx.device, memory_format=memory_format(cfg.model.channels_last))
    result = evaluate_knn(encoder, cfg, ctx.device)
    if ctx.is_main:
        left_out = f" ({result['skipped']} unreadable left out)" if result["skipped"] else ""
        print(f"kNN (k={cfg.knn.k}, T={cfg.knn.temperature}) on {result['count']} images{left_out}: "
              f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
