"""Equal-budget comparison of the objectives (docs/objectives.md):

    python -m wcl_fast.compare --config configs/cpu_compare.yaml [--objectives simclr,wcl,...] [key=value ...]

Trains every objective with the same data, model, crops, batch, epochs, optimiser and seed (only
`loss.objective` changes; each objective's own settings come from the config's loss.* sections, and
`compare.overrides` entries "objective:key=value" change one objective's runs only, printed with the table),
then evaluates the encoder with the weighted kNN monitor; with --seeds N (default 3) every objective
(and the untrained floor) runs for seeds train.seed .. train.seed + N - 1. Prints one table (mean +- sd
over seeds of kNN top-1/top-5; the online probe's top-1 on the test images where train.online_probe is on;
WCL's weak-label precision against the classes in the last log interval (docs/diagnostics.md); samples/s,
wall time, final loss) with the untrained encoder as the
floor and one sentence on WCL vs SimCLR at the same tau (paired by seed), and writes
<out>/compare.json (per-seed values too), <out>/compare.png (mean, sd and every seed of kNN top-1) and
<out>/curves.png (the first seed's training curves, one colour per objective). With the default config it runs
on the demo's MNIST digits (written by wcl_fast.demo when missing).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from wcl_fast.cli import ArgumentParser, at_least, command
from wcl_fast.log import format_duration

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "cpu_compare.yaml"
ALL = ("simclr", "wcl", "clinfonce", "co2", "slr")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, sd


def summarise(name: str, runs: list[dict]) -> dict:
    """One table row from the per-seed results of one objective: mean and sd of every number."""
    row = {"objective": name, "seeds": [r["seed"] for r in runs], "runs": runs}
    for key in ("knn_top1", "knn_top5", "probe_top1", "wl_precision", "samples_per_s", "wall_s", "loss"):
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key], row[f"{key}_sd"] = _mean_sd(values) if values else (None, None)
    return row


def objective_overrides(entries: list[str]) -> dict[str, list[str]]:
    """compare.overrides ("objective:key=value" each) grouped by objective, in the order given."""
    from wcl_fast.config import parse_objective_override

    grouped: dict[str, list[str]] = {}
    for text in entries:
        name, override = parse_objective_override(text)
        grouped.setdefault(name, []).append(override)
    return grouped


def run(cfg_path: str, objectives: list[str], overrides: list[str], out: Path, data: str | None, seeds: int = 3) -> dict:
    from wcl_fast import dist as wdist
    from wcl_fast.config import ConfigError, check_paths, load_config
    from wcl_fast.knn import evaluate_knn
    from wcl_fast.model import build_model
    from wcl_fast.plot import plot_runs
    from wcl_fast.train import train

    started = time.perf_counter()
    extra = [] if data is None else [f"data.train_dir={Path(data) / 'train'}", f"data.val_dir={Path(data) / 'test'}"]
    base = load_config(cfg_path, [*extra, *overrides, "knn.at_end=true"])
    seed_list = [base.train.seed + i for i in range(seeds)]
    per_name = objective_overrides(base.compare.overrides)
    # every objective's config is built (and so checked) before any data is written or anything trains,
    # also for objectives with compare.overrides left out by --objectives; order: the file, then that
    # objective's compare.overrides, then the command line's overrides
    configs: dict[str, dict] = {}
    for name in dict.fromkeys([*objectives, *per_name]):
        try:
            configs[name] = {seed: load_config(cfg_path, [*extra, *per_name.get(name, []), *overrides, "knn.at_end=true",
                                                          f"loss.objective={name}", f"train.seed={seed}",
                                                          f"train.out_dir={out / name / f'seed{seed}'}",
                                                          "train.resume=none"])
                             for seed in seed_list}
        except ConfigError as exc:
            if name not in per_name:
                raise
            entries = ", ".join(f"{name}:{values}" for values in per_name[name])
            raise ConfigError(f"compare.overrides entries '{entries}': {exc}") from None
    if data is not None:
        from wcl_fast.demo import write_mnist_imagefolder

        write_mnist_imagefolder(data)
    check_paths(base)
    ctx = wdist.init_distributed()
    per_objective: dict[str, list[dict]] = {"untrained": []}
    for seed in seed_list:  # the floor: each seed's initial weights, eval-mode BN (initial statistics)
        torch.manual_seed(seed)
        untrained = build_model(base.model).to(ctx.device)
        floor = evaluate_knn(untrained.net, base, ctx.device)
        per_objective["untrained"].append({"seed": seed, "knn_top1": floor["top1"], "knn_top5": floor["top5"]})
    for name in objectives:
        per_objective[name] = []
        for seed in seed_list:
            start = time.perf_counter()
            summary = train(configs[name][seed], ctx)
            wall_s = time.perf_counter() - start
            per_objective[name].append({"seed": seed, "knn_top1": summary["knn_top1"], "knn_top5": summary["knn_top5"],
                                        "probe_top1": summary.get("probe_val_top1"),  # online probe, test images
                                        "wl_precision": summary.get("wl_precision"),  # WCL's weak labels, last interval
                                        "samples_per_s": summary["mean_samples_per_s"], "wall_s": wall_s,
                                        "loss": summary.get("loss")})
            if ctx.is_main:
                done = sum(map(len, per_objective.values())) - len(seed_list)  # trained runs (not the floor)
                print(f"[compare] {name} seed {seed}: kNN top-1 {summary['knn_top1']:.2f}% ({wall_s:.0f} s, "
                      f"{summary['mean_samples_per_s']:.0f} samples/s; {done} of {len(objectives) * len(seed_list)} "
                      f"runs done, {format_duration(time.perf_counter() - started)} elapsed)", flush=True)
    rows = [summarise(name, runs) for name, runs in per_objective.items()]
    result = {"config": str(cfg_path), "overrides": overrides,
              "objective_overrides": {name: per_name[name] for name in objectives if name in per_name}, "epochs": base.train.epochs,
              "batch_size": base.data.batch_size, "arch": base.model.arch, "seeds": seed_list, "tau": base.loss.tau,
              "knn": {"k": base.knn.k, "temperature": base.knn.temperature, "count": floor["count"]},
              "device": str(ctx.device), "world_size": ctx.world_size, "threads": torch.get_num_threads(),
              "wall_s": time.perf_counter() - started, "rows": rows}
    result["verdict"] = verdict(result)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(result, indent=2))
        print(format_table(result))
        if result["verdict"]:
            print(result["verdict"])
        chart = write_chart(result, out / "compare.png")
        curves = plot_runs([out / name / f"seed{seed_list[0]}" for name in objectives], out / "curves.png",
                           labels=list(objectives))
        print(f"wrote {out / 'compare.json'}, {curves}" + (f" and {chart}" if chart else " (matplotlib missing: no chart)"))
    wdist.cleanup()
    return result


def verdict(result: dict) -> str:
    """One plain sentence: WCL against SimCLR at the same tau on the mean over seeds, with the spread."""
    rows = {row["objective"]: row for row in result["rows"]}
    if "wcl" not in rows or "simclr" not in rows:
        return ""
    wcl, simclr = rows["wcl"], rows["simclr"]
    diffs = [a["knn_top1"] - b["knn_top1"] for a, b in zip(wcl["runs"], simclr["runs"])]  # paired by seed
    mean, sd = _mean_sd(diffs)
    wins = sum(d > 0 for d in diffs)
    relation = ">=" if wcl["knn_top1"] >= simclr["knn_top1"] else "<"
    return (f"WCL {relation} SimCLR at matched tau {result['tau']} on the mean kNN top-1: {wcl['knn_top1']:.2f} vs "
            f"{simclr['knn_top1']:.2f} ({mean:+.2f} +- {sd:.2f} points paired by seed; WCL ahead in {wins} of "
            f"{len(diffs)} seeds)")


def format_table(result: dict) -> str:
    seeds = result["seeds"]
    head = (f"equal budget: {result['arch']}, {result['epochs']} epochs, batch {result['batch_size']}, "
            f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}), mean +- sd; "
            f"kNN k={result['knn']['k']} T={result['knn']['temperature']} on {result['knn']['count']} test images")
    lines = [head]
    for name, values in result.get("objective_overrides", {}).items():
        lines.append(f"  {name} only (compare.overrides): {' '.join(values)}")
    # columns that apply: the online probe (train.online_probe) and WCL's weak-label precision, when logged
    extra = [(key, title, spec) for key, title, spec in (("probe_top1", "probe top-1", ".2f"), ("wl_precision", "wl precision", ".3f"))
             if any(row.get(key) is not None for row in result["rows"])]
    lines += [f"{'objective':<12}{'kNN top-1':>16}{'kNN top-5':>16}" + "".join(f"{title:>16}" for _, title, _ in extra)
              + f"{'samples/s':>11}{'wall s':>9}{'final loss':>12}"]
    for row in result["rows"]:
        def fmt(key, spec, sd=True):
            value = row.get(key)
            if value is None:
                return "-"
            return format(value, spec) + (f" +- {row[key + '_sd']:{spec}}" if sd and len(seeds) > 1 else "")

        lines.append(f"{row['objective']:<12}{fmt('knn_top1', '.2f'):>16}{fmt('knn_top5', '.2f'):>16}"
                     + "".join(f"{fmt(key, spec):>16}" for key, _, spec in extra)
                     + f"{fmt('samples_per_s', '.1f', False):>11}{fmt('wall_s', '.0f', False):>9}"
                     f"{fmt('loss', '.4f', False):>12}")
    if result.get("wall_s") is not None:
        lines.append(f"whole comparison: {format_duration(result['wall_s'])} ({result['device']}, {result['threads']} threads)")
    return "\n".join(lines)


def write_chart(result: dict, path: Path) -> Path | None:
    """Bar chart of the mean kNN top-1 per objective, error bars = sd over seeds, dots = the seeds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    names = [row["objective"] for row in rows]
    means = [row["knn_top1"] for row in rows]
    sds = [row["knn_top1_sd"] or 0.0 for row in rows]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.8))
    bars = ax.bar(names, means, yerr=sds, capsize=4, color=["#999999"] + ["#3465a4"] * (len(names) - 1), alpha=0.85)
    ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], label_type="center", color="white", fontsize=8)
    every = []
    for x, row in enumerate(rows):
        values = [r["knn_top1"] for r in row["runs"]]
        every += values
        ax.scatter([x] * len(values), values, color="black", s=10, zorder=3)
    ax.set_ylim(max(0.0, min(every) - 8), min(100.0, max(every) + 4))
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title(f"{result['arch']}, {result['epochs']} epochs, batch {result['batch_size']}, "
                 f"{len(result['seeds'])} seeds (mean, sd, each seed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@command
def main(argv=None) -> int:
    from wcl_fast.config import ConfigError, load_config

    parser = ArgumentParser(prog="python -m wcl_fast.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--objectives", default=",".join(ALL), help=f"comma-separated subset of {', '.join(ALL)}")
    parser.add_argument("--out", default="runs/compare", help="folder for the runs, compare.json and compare.png")
    parser.add_argument("--data", default=None, help="demo MNIST folder to write/use (default: data/mnist_jpeg "
                        "when the config leaves data.train_dir empty)")
    parser.add_argument("--seeds", type=at_least(1), default=3, help="train.seed, train.seed + 1, ...: mean +- sd over them")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every objective (after compare.overrides)")
    args = parser.parse_args(argv)
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    unknown = [o for o in objectives if o not in ALL]
    if unknown or not objectives:
        raise ConfigError(f"--objectives: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(ALL)}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out: '{args.out}' is a file; give a folder for the runs and the tables")
    data = args.data
    if data is None and not load_config(args.config, args.overrides).data.train_dir:
        data = str(Path("data") / "mnist_jpeg")
    run(args.config, objectives, args.overrides, Path(args.out), data, args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
