"""Equal-budget comparison of the objectives (spec objectives.md):

    python -m wcl_fast.compare --config configs/cpu_compare.yaml [--objectives simclr,wcl,...] [key=value ...]

Trains every objective with the same data, model, crops, batch, epochs, optimiser and seed (only
`loss.objective` changes; each objective's own settings come from the config's loss.* sections),
then evaluates the encoder with the weighted kNN monitor. Prints one table (kNN top-1/top-5,
samples/s, wall time, final loss) with the untrained encoder as the floor, and writes
<out>/compare.json and <out>/compare.png (bar chart of kNN top-1). With the default config it runs
on the demo's MNIST digits (written by wcl_fast.demo when missing).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "cpu_compare.yaml"
ALL = ("simclr", "wcl", "clinfonce", "co2", "slr")


def run(cfg_path: str, objectives: list[str], overrides: list[str], out: Path, data: str | None) -> dict:
    from wcl_fast import dist as wdist
    from wcl_fast.config import check_paths, load_config
    from wcl_fast.knn import evaluate_knn
    from wcl_fast.model import build_model
    from wcl_fast.train import train

    extra = []
    if data is not None:
        from wcl_fast.demo import write_mnist_imagefolder

        write_mnist_imagefolder(data)
        extra = [f"data.train_dir={Path(data) / 'train'}", f"data.val_dir={Path(data) / 'test'}"]
    base = load_config(cfg_path, [*extra, *overrides, "knn.at_end=true"])
    check_paths(base)
    ctx = wdist.init_distributed()
    rows = []
    torch.manual_seed(base.train.seed)
    untrained = build_model(base.model).to(ctx.device)
    floor = evaluate_knn(untrained.net, base, ctx.device)
    rows.append({"objective": "untrained", "knn_top1": floor["top1"], "knn_top5": floor["top5"],
                 "samples_per_s": None, "wall_s": None, "loss": None})
    for name in objectives:
        cfg = load_config(cfg_path, [*extra, *overrides, "knn.at_end=true", f"loss.objective={name}",
                                     f"train.out_dir={out / name}", "train.resume=none"])
        start = time.perf_counter()
        summary = train(cfg, ctx)
        rows.append({"objective": name, "knn_top1": summary["knn_top1"], "knn_top5": summary["knn_top5"],
                     "samples_per_s": summary["mean_samples_per_s"], "wall_s": time.perf_counter() - start,
                     "loss": summary.get("loss")})
        if ctx.is_main:
            print(f"[compare] {name}: kNN top-1 {summary['knn_top1']:.2f}%", flush=True)
    result = {"config": str(cfg_path), "overrides": overrides, "epochs": base.train.epochs,
              "batch_size": base.data.batch_size, "arch": base.model.arch, "seed": base.train.seed,
              "knn": {"k": base.knn.k, "temperature": base.knn.temperature, "count": floor["count"]},
              "device": str(ctx.device), "world_size": ctx.world_size, "rows": rows}
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(result, indent=2))
        print(format_table(result))
        chart = write_chart(result, out / "compare.png")
        print(f"wrote {out / 'compare.json'}" + (f" and {chart}" if chart else " (matplotlib missing: no chart)"))
    wdist.cleanup()
    return result


def format_table(result: dict) -> str:
    head = (f"equal budget: {result['arch']}, {result['epochs']} epochs, batch {result['batch_size']}, seed {result['seed']}, "
            f"kNN k={result['knn']['k']} T={result['knn']['temperature']} on {result['knn']['count']} test images")
    lines = [head, f"{'objective':<12}{'kNN top-1':>11}{'kNN top-5':>11}{'samples/s':>11}{'wall s':>9}{'final loss':>12}"]
    for row in result["rows"]:
        def fmt(value, spec):
            return format(value, spec) if value is not None else "-"

        lines.append(f"{row['objective']:<12}{fmt(row['knn_top1'], '.2f'):>10}%{fmt(row['knn_top5'], '.2f'):>10}%"
                     f"{fmt(row['samples_per_s'], '.1f'):>11}{fmt(row['wall_s'], '.0f'):>9}{fmt(row['loss'], '.4f'):>12}")
    return "\n".join(lines)


def write_chart(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [row["objective"] for row in result["rows"]]
    values = [row["knn_top1"] for row in result["rows"]]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.5))
    bars = ax.bar(names, values, color=["#999999"] + ["#3465a4"] * (len(names) - 1))
    ax.bar_label(bars, fmt="%.1f")
    low = min(values)
    ax.set_ylim(max(0.0, low - 10), min(100.0, max(values) + 5))
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title(f"{result['arch']}, {result['epochs']} epochs, batch {result['batch_size']} (equal budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    from wcl_fast.config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m wcl_fast.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--objectives", default=",".join(ALL), help=f"comma-separated subset of {', '.join(ALL)}")
    parser.add_argument("--out", default="runs/compare", help="folder for the runs, compare.json and compare.png")
    parser.add_argument("--data", default=None, help="demo MNIST folder to write/use (default: data/mnist_jpeg "
                        "when the config leaves data.train_dir empty)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every objective")
    args = parser.parse_args(argv)
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    unknown = [o for o in objectives if o not in ALL]
    if unknown or not objectives:
        print(f"error: --objectives: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(ALL)}", file=sys.stderr)
        return 2
    try:
        from wcl_fast.config import load_config

        data = args.data
        if data is None and not load_config(args.config, args.overrides).data.train_dir:
            data = str(Path("data") / "mnist_jpeg")
        run(args.config, objectives, args.overrides, Path(args.out), data)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
