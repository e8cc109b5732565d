"""Memory plan of a training run, readable before the run (docs/memory.md).

    python -m wcl_fast.plan --config configs/X.yaml [--gpus 8] [--gpu-memory GB] [--json PATH|-] [key=value ...]

Per GPU: the saved activations per resolution and ResNet stage, parameters, gradients, LARS state,
autocast's weight copies, the heads and the loss (the knn rule's graph over all crops included), the
loader's device buffers, an allowance for workspaces and fragmentation, the total against the budget,
the activation-checkpointing plan and its recomputation as a share of the step's FLOPs. Every figure
but the loader's and the allowance comes from tracing the trainer's own step (wcl_fast.memory).

`model.activation_checkpointing: auto` (the trainer calls `choose_plan`) takes the segments in order of
saved bytes freed per recomputed FLOP (the stem and layer1 at 224 px first, layer4 last) and checkpoints
the shortest such prefix whose traced step fits the budget (`train.gpu_memory`, else the device's memory).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from wcl_fast.config import (Config, ConfigError, checkpoint_segments, format_checkpointing, load_config,
                             parse_checkpointing)
from wcl_fast.memory import GiB, STAGES, StepTrace, stage_of, trace_step

# What tracing cannot see, stated (docs/memory.md): the CUDA context, cuDNN / cuBLAS workspaces and NCCL's
# buffers (a fixed amount), and the caching allocator's rounding and fragmentation (a share of the peak).
ALLOWANCE_FIXED = 3.0 * GiB
ALLOWANCE_SHARE = 0.10
# the loader's device buffers beyond the batch being trained on (docs/memory.md): batches prepared ahead
PREFETCHED_BATCHES = {"dali": 2, "ffcv": 1, "reference": 0, "synthetic": 0, "auto": 2}
DECODED_IMAGE_BYTES = 0.5 * (1 << 20)  # an ImageNet JPEG decoded (about 400 x 350 x 3 bytes), DALI's nvJPEG output
IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000


def loader_device_bytes(cfg: Config, batch_per_gpu: int, crop_bytes: int) -> int:
    """Device bytes the loader holds besides the batch in the step: `PREFETCHED_BATCHES` more batches of
    crops and, for DALI (GPU decoding), one batch of decoded images."""
    backend = cfg.data.backend
    extra = PREFETCHED_BATCHES.get(backend, 0) * crop_bytes
    if backend in ("dali", "auto"):
        extra += int(batch_per_gpu * DECODED_IMAGE_BYTES)
    return int(extra)


def allowance_bytes(peak: int) -> int:
    return int(ALLOWANCE_FIXED + ALLOWANCE_SHARE * peak)


@dataclass
class Plan:
    """A checkpointing plan with its traced step and everything the table prints."""

    checkpointing: dict
    trace: StepTrace  # the traced step under this plan
    plain: StepTrace  # the same step without checkpointing (the activation breakdown)
    budget: int  # bytes per GPU (0 = none given)
    gpus: int
    loader: int
    allowance: int
    kept: dict = field(default_factory=dict)  # (resolution, stage) -> activation bytes kept under the plan
    nearest: dict | None = None  # when nothing fits: the largest per-GPU batch that does
    arch: str = "resnet50"

    @property
    def text(self) -> str:
        """The plan in model.activation_checkpointing syntax."""
        return format_checkpointing(self.checkpointing, self.arch)

    @property
    def total(self) -> int:
        return self.trace.peak + self.loader + self.allowance

    @property
    def fits(self) -> bool:
        return self.budget <= 0 or self.total <= self.budget

    @property
    def recompute_share(self) -> float:
        """Extra FLOPs of the step under the plan over the step without checkpointing (both traced)."""
        return max(0.0, self.trace.step_flops / self.plain.step_flops - 1.0) if self.plain.step_flops else 0.0


def analytic(plain: StepTrace, plan: dict) -> tuple[int, int, dict]:
    """(activation bytes kept, largest recomputed segment, kept bytes per (resolution, stage)) when the
    segments of `plan` are checkpointed, from the storages of the plain trace: a storage stays if any
    segment that saved it is not checkpointed (or it was saved outside the encoder); a checkpointed
    segment keeps its input; recomputing a segment rematerialises what it saved, one segment at a time."""
    chosen = {(res, seg) for res, segs in plan.items() for seg in segs}
    kept, kept_by = set(), {}
    for index, savers in plain.storage_savers.items():
        if any(s not in chosen for s in savers):
            kept.add(index)
            first = min(savers, key=lambda s: s not in chosen)  # attributed to a saver that keeps it
            kept_by[index] = first
    for key in chosen:
        index, nbytes = plain.segment_inputs.get(key, (None, 0))
        if index is not None and nbytes and index not in kept:
            kept.add(index)
            kept_by[index] = key
    by_stage: dict = {}
    for index in kept:
        res, seg = kept_by[index]
        stage = (res, stage_of(seg) if seg not in ("pool", "heads") else ("layer4" if seg == "pool" else "heads"))
        by_stage[stage] = by_stage.get(stage, 0) + plain.storage_bytes[index]
    own: dict = {}
    for index, savers in plain.storage_savers.items():
        for s in savers:
            if s in chosen:
                own[s] = own.get(s, 0) + plain.storage_bytes[index]
    transient = max(own.values(), default=0)
    return sum(plain.storage_bytes[i] for i in kept), transient, by_stage


def ordered_segments(plain: StepTrace, arch: str) -> list[tuple[str, str]]:
    """Every (resolution, segment), most saved bytes freed per recomputed forward FLOP first."""
    scored = []
    for res in plain.crops:
        for seg in checkpoint_segments(arch):
            alone = {res: frozenset({seg})}
            kept, _, _ = analytic(plain, alone)
            freed = plain.activation_total - kept
            flops = plain.forward_flops.get((res, seg), 0.0)
            scored.append((freed / max(flops, 1.0), res, seg))
    scored.sort(key=lambda item: -item[0])
    return [(res, seg) for _, res, seg in scored]


def _as_plan(pairs) -> dict:
    plan = {"global": set(), "local": set()}
    for res, seg in pairs:
        plan[res].add(seg)
    return {res: frozenset(segs) for res, segs in plan.items()}


def _estimate(plain: StepTrace, plan: dict) -> int:
    kept, transient, _ = analytic(plain, plan)
    return plain.peak - plain.activation_total + kept + transient


def build_plan(cfg: Config, gpus: int, budget: int, checkpointing: dict, plain: StepTrace | None = None,
               trace: StepTrace | None = None) -> Plan:
    plain = plain or trace_step(cfg, gpus)
    empty = not any(checkpointing.values())
    trace = trace or (plain if empty else trace_step(cfg, gpus, checkpointing))
    loader = loader_device_bytes(cfg, plain.batch_per_gpu, plain.batch)
    _, _, kept = analytic(plain, checkpointing)
    return Plan(checkpointing, trace, plain, budget, gpus, loader, allowance_bytes(trace.peak), kept, arch=cfg.model.arch)


def choose_plan(cfg: Config, gpus: int, budget: int, plain: StepTrace | None = None) -> Plan:
    """model.activation_checkpointing=auto: no checkpointing when the plain step fits `budget` (bytes per
    GPU), else the shortest prefix of `ordered_segments` whose traced step fits; when even checkpointing
    everything does not fit, that plan with `nearest` set (the largest per-GPU batch that fits)."""
    arch = cfg.model.arch
    plain = plain or trace_step(cfg, gpus)
    none = build_plan(cfg, gpus, budget, _as_plan([]), plain, plain)
    if none.fits or budget <= 0:
        return none
    order = ordered_segments(plain, arch)
    loader = none.loader

    def fits_estimate(plan):
        peak = _estimate(plain, plan)
        return peak + loader + allowance_bytes(peak) <= budget

    # the analytic estimate (no trace) is an upper bound: start there, then bisect on traced steps
    # (memory falls as the prefix grows) for the shortest prefix that fits
    high = next((n for n in range(1, len(order) + 1) if fits_estimate(_as_plan(order[:n]))), len(order))
    traced: dict[int, Plan] = {}

    def plan_of(n: int) -> Plan:
        if n not in traced:
            traced[n] = build_plan(cfg, gpus, budget, _as_plan(order[:n]), plain)
        return traced[n]

    while not plan_of(high).fits and high < len(order):
        high += 1
    if not plan_of(high).fits:
        plan = plan_of(high)
        plan.nearest = nearest_batch(cfg, gpus, budget, plan.checkpointing)
        return plan
    low = 1
    while low < high:
        mid = (low + high) // 2
        if plan_of(mid).fits:
            high = mid
        else:
            low = mid + 1
    return plan_of(high)


def nearest_batch(cfg: Config, gpus: int, budget: int, checkpointing: dict) -> dict | None:
    """The largest per-GPU batch (a multiple of 8) whose step fits `budget` with `checkpointing`, from two
    traces (the step's memory is affine in the batch), checked by a third; None when not even 8 fits."""
    import copy

    def traced_total(per_gpu):
        small = copy.deepcopy(cfg)
        small.data.batch_size = per_gpu * gpus
        plan = build_plan(small, gpus, budget, checkpointing)
        return plan.total

    b = cfg.data.batch_size // gpus
    low, high = max(8, b // 8), max(16, b // 4)
    t_low, t_high = traced_total(low), traced_total(high)
    slope = (t_high - t_low) / (high - low)
    per_gpu = int((budget - (t_low - slope * low)) / slope) // 8 * 8 if slope > 0 else b
    per_gpu = min(per_gpu, b - 8)
    while per_gpu >= 8 and traced_total(per_gpu) > budget:
        per_gpu -= 8
    if per_gpu < 8:
        return None
    from wcl_fast.optim import base_learning_rate

    batch = per_gpu * gpus
    return {"batch_per_gpu": per_gpu, "data.batch_size": batch,
            "base_lr": base_learning_rate(cfg.optim, batch),
            "lr_rule": ("optim.base_lr (fixed)" if cfg.optim.base_lr is not None
                        else f"optim.lr_scale x sqrt(batch) = {cfg.optim.lr_scale} x sqrt({batch})")}


def resolve(cfg: Config, gpus: int, budget: int) -> Plan:
    """The plan of cfg.model.activation_checkpointing: `auto` chooses (choose_plan), anything else is traced."""
    text = cfg.model.activation_checkpointing
    if text == "auto":
        return choose_plan(cfg, gpus, budget)
    try:
        checkpointing = parse_checkpointing(text, cfg.model.arch)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return build_plan(cfg, gpus, budget, checkpointing)


# ---- printing ----

def _g(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f}"


def to_dict(plan: Plan, cfg: Config) -> dict:
    """The --json record (keys in docs/memory.md)."""
    trace, plain = plan.trace, plan.plain
    stages = {}
    for res, (crops, side) in plain.crops.items():
        row = {stage: plain.stage_table().get(res, {}).get(stage, 0) / GiB for stage in STAGES}
        kept = {stage: plan.kept.get((res, stage), 0) / GiB for stage in STAGES}
        stages[res] = {"crops": crops, "pixels": side, "saved_gib": row, "saved_total_gib": sum(row.values()),
                       "kept_gib": kept, "kept_total_gib": sum(kept.values())}
    heads = plain.activations.get(("heads", "heads"), 0) / GiB
    knn = knn_monitor_bytes(cfg, plan.gpus)
    return {
        "config_batch": cfg.data.batch_size, "gpus": plan.gpus, "batch_per_gpu": trace.batch_per_gpu,
        "precision": cfg.train.precision, "arch": cfg.model.arch, "objective": cfg.loss.objective,
        "multicrop_rule": cfg.loss.multicrop_rule if cfg.data.local_crops else None,
        "activations": stages, "heads_saved_gib": heads,
        "parameters_gib": trace.parameters / GiB, "gradients_gib": trace.gradients / GiB,
        "optimizer_state_gib": trace.optimizer_state / GiB, "weight_copies_gib": plain.weight_copies / GiB,
        "buffers_gib": trace.buffers / GiB, "objective_state_gib": trace.objective_state / GiB,
        "loss_saved_gib": plain.loss_saved / GiB, "loss_transient_gib": plain.loss_transient / GiB,
        "batch_gib": trace.batch / GiB, "loader_gib": plan.loader / GiB,
        "allowance_gib": plan.allowance / GiB, "peak_gib": trace.peak / GiB, "peak_phase": trace.peak_phase,
        "total_gib": plan.total / GiB, "budget_gib": plan.budget / GiB if plan.budget > 0 else None,
        "fits": plan.fits if plan.budget > 0 else None, "plan": plan.text,
        "recompute_share": plan.recompute_share, "step_tflop": trace.step_flops / 1e12,
        "plain_step_tflop": plain.step_flops / 1e12, "knn_monitor_gib": knn / GiB if knn is not None else None,
        "nearest_fit": plan.nearest,
    }


def knn_monitor_bytes(cfg: Config, gpus: int, num_train: int = IMAGENET_TRAIN, num_val: int = IMAGENET_VAL) -> int | None:
    """Per-GPU bytes of the sharded kNN monitor (wcl_fast.knn.knn_memory_bytes) for ImageNet-1k sizes."""
    from wcl_fast.knn import QUERY_CHUNK, knn_memory_bytes
    from wcl_fast.model import feature_dim

    return knn_memory_bytes(num_train, num_val, feature_dim(cfg.model.arch, cfg.model.widths), gpus, cfg.knn.k,
                            QUERY_CHUNK, 1000)


def format_plan(plan: Plan, cfg: Config, title: str = "") -> str:
    record = to_dict(plan, cfg)
    lines = [f"memory plan{(' ' + title) if title else ''}: {cfg.model.arch} {cfg.loss.objective}, "
             f"{plan.trace.batch_per_gpu} images per GPU x {plan.gpus} GPUs, {cfg.train.precision}, "
             f"{' + '.join(f'{n} x {s} px' for n, s in plan.plain.crops.values())} crops per GPU",
             f"{'saved activations (GiB)':<26}" + "".join(f"{s:>8}" for s in STAGES) + f"{'total':>8}{'kept':>8}"]
    for res, row in record["activations"].items():
        lines.append(f"  {res + ' ' + str(row['pixels']) + ' px':<24}" + "".join(f"{row['saved_gib'][s]:>8.2f}" for s in STAGES)
                     + f"{row['saved_total_gib']:>8.2f}{row['kept_total_gib']:>8.2f}")
    items = [("heads (saved)", record["heads_saved_gib"]), ("parameters (fp32)", record["parameters_gib"]),
             ("gradients", record["gradients_gib"]), ("LARS momentum", record["optimizer_state_gib"]),
             ("autocast weight copies", record["weight_copies_gib"]), ("BatchNorm buffers", record["buffers_gib"]),
             ("objective state (EMA, queue)", record["objective_state_gib"]),
             ("loss: saved for backward", record["loss_saved_gib"]), ("loss: transient", record["loss_transient_gib"]),
             ("batch on the device", record["batch_gib"])]
    lines += [f"  {name:<30}{value:>8.2f} GiB" for name, value in items]
    lines.append(f"  {'traced peak':<30}{record['peak_gib']:>8.2f} GiB   (in {record['peak_phase']}; "
                 f"torch.cuda.max_memory_allocated)")
    lines.append(f"  {'loader buffers (estimate)':<30}{record['loader_gib']:>8.2f} GiB   ({cfg.data.backend})")
    lines.append(f"  {'allowance':<30}{record['allowance_gib']:>8.2f} GiB   (3 GiB context, workspaces, NCCL + 10% of the peak)")
    budget = f" of {record['budget_gib']:.1f} GiB: {'fits' if record['fits'] else 'DOES NOT FIT'}" if record["budget_gib"] else ""
    lines.append(f"  {'total':<30}{record['total_gib']:>8.2f} GiB{budget}")
    lines.append(f"  checkpointing: {record['plan']}  (recomputes {100 * record['recompute_share']:.1f}% of the step's "
                 f"{record['plain_step_tflop']:.1f} TFLOP)")
    if record["knn_monitor_gib"] is not None and cfg.knn.every_epochs + int(cfg.knn.at_end) > 0:
        lines.append(f"  kNN monitor (ImageNet-1k, sharded): {record['knn_monitor_gib']:.2f} GiB per GPU, between epochs")
    if plan.nearest:
        n = plan.nearest
        lines.append(f"  nothing fits at this batch; the nearest that does: {n['batch_per_gpu']} per GPU, "
                     f"data.batch_size={n['data.batch_size']} (learning rate {n['lr_rule']} = {n['base_lr']:.3g})")
    elif plan.budget > 0 and not plan.fits:
        lines.append("  nothing fits, not even 8 images per GPU with every segment checkpointed")
    return "\n".join(lines)


# the cards of the README's table: nominal size -> GiB as torch reports such a card (total_memory)
CARDS = {"80 GB (H100, A100 80GB)": 79.1, "40 GB (A100 40GB)": 39.4, "32 GB (V100 32GB)": 31.7, "24 GB (A10, L4)": 22.0}


def table(paths: list[str], gpus: int, overrides: list[str]):
    """Markdown lines, yielded as they are ready: config x card -> the auto plan, its total against the card,
    its recomputed share; where nothing fits, the nearest batch that does."""
    yield "| config | " + " | ".join(CARDS) + " |"
    yield "|" + "---|" * (len(CARDS) + 1)
    for path in paths:
        cfg = load_config(path, overrides)
        plain = trace_step(cfg, gpus)
        cells = []
        for memory in CARDS.values():
            plan = choose_plan(cfg, gpus, int(memory * GiB), plain)
            if plan.fits:
                cells.append(f"`{plan.text}`: {plan.total / GiB:.1f} GiB, +{100 * plan.recompute_share:.1f}% FLOPs")
            elif plan.nearest:
                n = plan.nearest
                cells.append(f"does not fit ({plan.total / GiB:.1f} GiB with `all`); nearest: {n['batch_per_gpu']} per GPU, "
                             f"batch {n['data.batch_size']}, lr {n['base_lr']:.2f}")
            else:
                cells.append(f"does not fit ({plan.total / GiB:.1f} GiB with `all`)")
        yield f"| `{Path(path).name}` ({cfg.data.batch_size // gpus} per GPU) | " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    from wcl_fast.cli import ArgumentParser, at_least, command, output_file

    @command
    def run(argv):
        parser = ArgumentParser(prog="python -m wcl_fast.plan", description=__doc__.split("\n")[0])
        parser.add_argument("--config", default=None)
        parser.add_argument("--table", nargs="+", default=None, metavar="CONFIG",
                            help="print the README's table (auto plans of these configs on 80/40/32/24 GB cards) instead")
        parser.add_argument("--gpus", type=at_least(1), default=8, help="processes (GPUs) the batch is split over")
        parser.add_argument("--gpu-memory", type=at_least(0.0, float), default=None,
                            help="GiB per GPU (default: train.gpu_memory, else no budget)")
        parser.add_argument("--json", default=None, help="also write the plan as JSON to this file ('-': stdout only)")
        parser.add_argument("overrides", nargs="*")
        args, rest = parser.parse_known_args(argv)
        if args.table:  # overrides follow the config paths on the command line
            configs = [a for a in args.table + rest if a.endswith((".yaml", ".yml"))]
            overrides = [a for a in args.table + rest if "=" in a and not a.endswith((".yaml", ".yml"))]
            for line in table(configs, args.gpus, overrides):
                print(line, flush=True)
            return 0
        if rest:
            args = parser.parse_args(argv)  # argparse's own error for what it does not know
        if args.config is None:
            raise ConfigError("python -m wcl_fast.plan: give --config configs/X.yaml (or --table CONFIG ...)")
        if args.json not in (None, "-"):
            output_file("--json", args.json)
        cfg = load_config(args.config, args.overrides)
        if cfg.data.batch_size % args.gpus:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} does not split over --gpus {args.gpus}; "
                              f"choose a multiple of {args.gpus}")
        memory = args.gpu_memory if args.gpu_memory is not None else cfg.train.gpu_memory
        plan = resolve(cfg, args.gpus, int(memory * GiB))
        if args.json == "-":
            print(json.dumps(to_dict(plan, cfg)))
            return 0
        print(format_plan(plan, cfg, f"for {args.config}"))
        if args.json:
            Path(args.json).write_text(json.dumps(to_dict(plan, cfg), indent=2))
        return 0

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
