"""Training curves as a picture: `python -m wcl_fast.plot RUN_DIR [RUN_DIR ...] [--out curves.png]`.

Reads each run's `log.jsonl` (the trainer's interval records) and draws, against the global step,
the loss and its terms, the learning rate, samples/s, the data-wait fraction and the kNN monitor's
top-1, and the diagnostics (docs/diagnostics.md): the weak-label components, the weak labels' precision,
recall and purity against the classes with the two views' agreement, the embeddings' collapse statistic
and cosine similarities, and the online probe's top-1, into one PNG (matplotlib, Agg backend: no display
needed; a panel whose values a run did not log says so). Several runs are overlaid, one colour per run,
with a legend; a resumed run's repeated steps are drawn once (the last record wins).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from wcl_fast.cli import ArgumentParser, command
from wcl_fast.config import ConfigError

# (title, keys drawn in it: one line style per key); None: the loss and its terms
PANELS = (("loss terms", None), ("learning rate", ("lr",)), ("samples/s", ("samples_per_s",)),
          ("data-wait (%)", ("data_wait",)), ("kNN top-1 (%)", ("knn_top1",)),
          ("weak-label components", ("wl_components", "wl_mean_size", "wl_max_size")),
          ("weak labels vs classes", ("wl_precision", "wl_recall", "wl_purity", "wl_view_ari", "wl_edge_agreement")),
          ("embeddings: collapse, cosines", ("collapse_z", "collapse_u", "pos_cos_z", "neg_cos_z")),
          ("online probe top-1 (%)", ("probe_top1", "probe_val_top1")))
COLUMNS = 5  # panels per row
NOT_LOSS_TERMS = {"step", "time", "lr", "epoch", "samples_per_s", "data_wait", "failed_images", "skipped_steps",
                  "knn_top1", "knn_top5", "knn_count", "knn_unreadable", "replica_divergence", "knn_unconverged"}
DIAGNOSTIC_PREFIXES = ("wl_", "probe_", "collapse_", "pos_cos_", "neg_cos_")  # wcl_fast.diagnostics, wcl_fast.probe
MONITOR_KEYS = {"knn_top1", "probe_val_top1"}  # once per kNN monitor: drawn with markers


class PlotError(ConfigError):
    """A run folder without a readable log.jsonl; the message names it and what to do."""


def read_log(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/log.jsonl in step order (for a repeated step the last record wins per key)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} does not exist; pass the train.out_dir of a run (it holds log.jsonl)")
    merged: dict[tuple[int, str], dict] = {}
    bad, parsed = [], 0
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # e.g. a line cut off by a kill or a full disk: skipped, said below
            bad.append(number)
            continue
        parsed += 1
        if not isinstance(record, dict) or "step" not in record:
            continue
        # interval records and monitor records of the same step are kept apart, then merged per key
        kind = "knn" if "knn_top1" in record else "interval" if "loss" in record else "other"
        merged.setdefault((int(record["step"]), kind), {}).update(record)
    if bad and not parsed:
        raise PlotError(f"{path} holds no JSON records (line {bad[0]} is not JSON); is this a wcl-fast log?")
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        print(f"warning: {path}: skipped {len(bad)} line(s) that are not JSON (line {shown})", file=sys.stderr)
    return [merged[key] for key in sorted(merged)]


def loss_terms(records: list[dict]) -> list[str]:
    """The logged loss and its terms ('loss' first), as they appear in the interval records."""
    names: list[str] = []
    for record in records:
        if "loss" not in record:
            continue
        for key, value in record.items():
            if key not in NOT_LOSS_TERMS and not key.startswith(DIAGNOSTIC_PREFIXES) and isinstance(value, (int, float)) \
                    and key not in names:
                names.append(key)
    return sorted(names, key=lambda name: (name != "loss", names.index(name)))


def plot_runs(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """Draw the curves of `run_dirs` into the PNG `out`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(labels[i] if labels else Path(d).name or str(d), read_log(d)) for i, d in enumerate(run_dirs)]
    rows = -(-len(PANELS) // COLUMNS)
    fig, grid = plt.subplots(rows, COLUMNS, figsize=(4.2 * COLUMNS, 3.6 * rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(PANELS):]:
        ax.set_visible(False)
    styles = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))  # one per line of a panel
    for run_index, (label, records) in enumerate(runs):
        colour = f"C{run_index % 10}"
        for (title, keys), ax in zip(PANELS, axes):
            names = loss_terms(records) if keys is None else keys  # the loss and its terms, or the panel's keys
            for key_index, key in enumerate(names):
                points = [(r["step"], 100 * r[key] if key == "data_wait" else r[key])
                          for r in records if isinstance(r.get(key), (int, float))]
                if not points:
                    continue
                single = keys is not None and len(keys) == 1
                name = label if single else (f"{label}: {key}" if len(runs) > 1 else key)
                ax.plot(*zip(*points), linestyle=styles[key_index % len(styles)], color=colour, label=name,
                        marker="o" if key in MONITOR_KEYS else None)
    for (title, keys), ax in zip(PANELS, axes):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7 if len(ax.lines) <= 6 else 5)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


@command
def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m wcl_fast.plot", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (train.out_dir), each with a log.jsonl")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png of the first run)")
    parser.add_argument("--labels", default=None, help="comma-separated legend names, one per run")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.runs):
        raise ConfigError(f"--labels has {len(labels)} names for {len(args.runs)} runs; give one per run")
    out = plot_runs(args.runs, args.out or Path(args.runs[0]) / "curves.png", labels)  # PlotError: one line, exit 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
