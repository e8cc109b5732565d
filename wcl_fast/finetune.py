"""Semi-supervised fine-tuning on a label subset (docs/wcl.md §5; SimCLR protocol, Chen et al. 2020).

    torchrun --nproc_per_node 8 -m wcl_fast.finetune --config configs/X.yaml finetune.checkpoint=PATH \\
        finetune.subset_file=1percent.txt        # or finetune.label_fraction=0.01 for a seeded subset

The encoder (train mode, BN statistics updated) and a new Linear(d, classes) are trained together on
the labelled subset with RandomResizedCrop + flip, Nesterov SGD and per-iteration cosine decay;
top-1/top-5 are reported over the exact validation set.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wcl_fast.optim import learning_rate
from wcl_fast import dist as wdist
from pipelines import resolve_backend
from wcl_fast.cli import command, config_arguments
from wcl_fast.config import Config, ConfigError, check_paths, load_config


def read_subset_file(path: str, samples: list[tuple[str, int]], train_dir: str) -> list[int]:
    """Dataset indices named by a subset file (one path per line: relative to train_dir, or a file name
    that is unique in the folder, as in the SimCLR ImageNet lists)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"finetune.subset_file: '{path}' does not exist; give a file with one image path per line")
    by_relative = {str(Path(p).relative_to(train_dir)): i for i, (p, _) in enumerate(samples)}
    names = [Path(p).name for p, _ in samples]
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    by_name = {name: i for i, name in enumerate(names) if counts[name] == 1}  # ambiguous names never match
    wanted = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    indices, missing = [], []
    for entry in wanted:
        index = by_relative.get(entry, by_name.get(Path(entry).name))
        (missing.append(entry) if index is None else indices.append(index))
    if missing:
        raise ConfigError(f"finetune.subset_file: {len(missing)} of {len(wanted)} listed images are not in "
                          f"data.train_dir '{train_dir}' or match several files by name (first: '{missing[0]}'); "
                          f"check the list and the folder")
    return sorted(set(indices))


def balanced_subset(labels: list[int], fraction: float, seed: int) -> list[int]:
    """Seeded class-balanced subset: round(fraction * class size) (at least 1) images of every class."""
    rng = np.random.default_rng([seed, 1234])
    labels = np.asarray(labels)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, int(round(fraction * len(members))))
        chosen.extend(rng.choice(members, size=count, replace=False).tolist())
    return sorted(chosen)


def finetune(cfg: Config, ctx: wdist.DistContext | None = None) -> dict:
    from pipelines import build_eval_loader, build_probe_loader
    from pipelines.datasets import load_split
    from wcl_fast.evaluation import accuracy, extract_all, load_encoder

    ctx = ctx or wdist.init_distributed()
    resolve_backend(cfg)  # data.backend=auto -> the concrete loader
    device, ft = ctx.device, cfg.finetune
    torch.manual_seed(cfg.train.seed)
    if cfg.data.backend == "ffcv":  # records of data.beton, paths from its sidecar
        from pipelines.ffcv import beton_samples

        samples, classes, root = beton_samples(cfg.data.beton, cfg.data, need_paths=bool(ft.subset_file))
    else:
        samples, classes, _ = load_split(cfg.data, cfg.data.train_dir, "data.train_dir")
        root = cfg.data.train_dir
    if ft.subset_file:
        subset = read_subset_file(ft.subset_file, samples, root)
    else:
        subset = balanced_subset([label for _, label in samples], ft.label_fraction, cfg.train.seed)
    encoder = load_encoder(cfg, device, checkpoint=ft.checkpoint)
    for param in encoder.parameters():
        param.requires_grad_(True)
    with torch.no_grad():
        dim = encoder(torch.zeros(2, 3, cfg.data.global_size, cfg.data.global_size, device=device)).shape[1]
    model = torch.nn.Sequential(encoder, torch.nn.Linear(dim, len(classes))).to(device)
    torch.nn.init.normal_(model[1].weight, std=0.01)
    torch.nn.init.zeros_(model[1].bias)
    if ctx.distributed:
        from wcl_fast.syncbn import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)  # the global batch's statistics, no host read (CPU and CUDA)
    net = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
           if ctx.distributed else model)
    pin = device.type == "cuda"
    loader = build_probe_loader(cfg.data, cfg.train.seed, ctx.rank, ctx.world_size, ft.batch_size, device, subset)
    lr = ft.lr_scale * ft.batch_size / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=ft.momentum, nesterov=ft.nesterov,
                                weight_decay=ft.weight_decay)
    total, step = ft.epochs * len(loader), 0
    for epoch in range(ft.epochs):
        net.train()
        for batch in loader.epoch(epoch):
            batch = batch.to(device, cfg.model.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, lr, 0, total)  # cosine to 0, no warmup
            loss = F.cross_entropy(net(batch.globals), batch.label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    model.eval()
    val_loader, n_val, _ = build_eval_loader(cfg.data, cfg.data.val_dir, "data.val_dir", cfg.knn.batch_size,
                                             ctx.rank, ctx.world_size, pin)
    logits, labels, _ = extract_all(model, val_loader, n_val, "data.val_dir", device, cfg.model.channels_last,
                                    normalize=False)  # the classifier's outputs, in fp32 as before
    n_val = logits.shape[0]  # the images actually evaluated
    top1, top5 = accuracy(logits, labels)
    return {"top1": top1, "top5": top5, "labelled": len(subset), "val_count": n_val}


@command
def main(argv=None) -> int:
    args = config_arguments("python -m wcl_fast.finetune", "Semi-supervised fine-tuning",
                            "key=value, e.g. finetune.checkpoint=... finetune.label_fraction=0.1", argv)
    cfg = load_config(args.config, args.overrides)
    check_paths(cfg, need_val=True)
    resolve_backend(cfg, report=True)
    ctx = wdist.init_distributed()
    result = finetune(cfg, ctx)
    if ctx.is_main:
        print(f"fine-tuned on {result['labelled']} labelled images; {result['val_count']} validation images: "
              f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
