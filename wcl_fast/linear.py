"""Linear evaluation of a WCL encoder (docs/wcl.md §5; protocol of the reference linear_eval.py).

    torchrun --nproc_per_node 8 -m wcl_fast.linear --config configs/linear_imagenet.yaml linear.checkpoint=PATH

Frozen encoder in eval mode; Linear(d, classes) initialised N(0, 0.01), bias 0; SGD Nesterov momentum
0.9, weight decay 0, lr = 0.2 * batch / 256 with per-iteration cosine decay; train transform
RandomResizedCrop(size) + horizontal flip, evaluation Resize + CenterCrop. Every epoch the exact
validation set is evaluated (each image once across ranks, no padding); the final epoch's top-1/top-5
is the result, the best epoch is reported too, labelled as such.
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from pipelines import resolve_backend
from wcl_fast import dist as wdist
from wcl_fast.cli import command, config_arguments
from wcl_fast.config import Config, check_out_dir, check_paths, load_config
from wcl_fast.evaluation import accuracy, encoder_features, extract_all, load_encoder
from wcl_fast.optim import learning_rate


def train_linear(cfg: Config, ctx: wdist.DistContext | None = None) -> dict:
    """Train the linear classifier; returns final and best-epoch top-1/top-5 on the validation set."""
    from pipelines import build_eval_loader, build_probe_loader
    from pipelines.sampling import StepSampler

    ctx = ctx or wdist.init_distributed()
    resolve_backend(cfg)  # data.backend=auto -> the concrete loader
    device, lin = ctx.device, cfg.linear
    torch.manual_seed(cfg.train.seed)
    encoder = load_encoder(cfg, device)
    pin = device.type == "cuda"
    val_loader, n_val, num_classes = build_eval_loader(cfg.data, cfg.data.val_dir, "data.val_dir", cfg.knn.batch_size,
                                                       ctx.rank, ctx.world_size, pin)
    val_feats, val_labels, _ = extract_all(encoder, val_loader, n_val, "data.val_dir", device, cfg.model.channels_last,
                                           cfg.train.precision, normalize=False)
    n_val = val_feats.shape[0]  # the images actually evaluated
    dim = val_feats.shape[1]
    classifier = torch.nn.Linear(dim, num_classes).to(device)
    torch.nn.init.normal_(classifier.weight, std=0.01)
    torch.nn.init.zeros_(classifier.bias)
    lr = lin.lr_scale * lin.batch_size / 256
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=lin.momentum, nesterov=lin.nesterov,
                                weight_decay=lin.weight_decay)
    if lin.cache_features:
        # every rank holds all cached features and takes identical steps: no DDP needed
        train_loader, n_train, _ = build_eval_loader(cfg.data, cfg.data.train_dir, "data.train_dir", cfg.knn.batch_size,
                                                     ctx.rank, ctx.world_size, pin)
        feats, labels, _ = extract_all(encoder, train_loader, n_train, "data.train_dir", device, cfg.model.channels_last,
                                       cfg.train.precision, normalize=False)
        sampler = StepSampler(feats.shape[0], lin.batch_size, 0, 1, cfg.train.seed)  # rows of the readable images
        model = classifier
    else:
        loader = build_probe_loader(cfg.data, cfg.train.seed, ctx.rank, ctx.world_size, lin.batch_size, device)
        sampler = loader.sampler
        model = (torch.nn.parallel.DistributedDataParallel(classifier, device_ids=[device.index] if pin else None)
                 if ctx.distributed else classifier)
    steps_per_epoch = sampler.steps_per_epoch
    total = lin.epochs * steps_per_epoch
    history = []
    step = 0
    start = time.perf_counter()
    for epoch in range(lin.epochs):
        sampler.set_epoch(epoch)
        if lin.cache_features:
            batches = ((feats[idx], labels[idx]) for idx in (torch.tensor([i for _, i in keys]) for keys in sampler))
        else:
            batches = ((encoder_features(encoder, batch, cfg), batch.label)
                       for batch in (b.to(device, cfg.model.channels_last) for b in loader.epoch(epoch)))
        for x, y in batches:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, lr, 0, total)  # cosine to 0, no warmup
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        with torch.no_grad():
            top1, top5 = accuracy(classifier(val_feats), val_labels)
        history.append((top1, top5))
        if ctx.is_main:
            print(f"linear epoch {epoch}: val top-1 {top1:.2f}%  top-5 {top5:.2f}%  (last batch loss {loss.item():.4f})",
                  flush=True)
    best = max(range(len(history)), key=lambda e: history[e][0])
    return {"top1": history[-1][0], "top5": history[-1][1], "best_epoch": best, "best_top1": history[best][0],
            "best_top5": history[best][1], "val_count": n_val, "wall_s": time.perf_counter() - start}


@command
def main(argv=None) -> int:
    args = config_arguments("python -m wcl_fast.linear", "Linear evaluation of a WCL encoder",
                            "key=value, e.g. linear.checkpoint=runs/X/checkpoint.pt", argv)
    cfg = load_config(args.config, args.overrides)
    check_paths(cfg, need_val=True)
    check_out_dir(cfg.linear.out_dir, "linear.out_dir")
    resolve_backend(cfg, report=True)
    ctx = wdist.init_distributed()
    result = train_linear(cfg, ctx)
    if ctx.is_main:
        print(f"linear probe ({result['val_count']} validation images): final epoch top-1 {result['top1']:.2f}% "
              f"top-5 {result['top5']:.2f}%; best epoch {result['best_epoch']} top-1 {result['best_top1']:.2f}% "
              f"(best-epoch numbers are what the reference code reports)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
