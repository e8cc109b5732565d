"""Training-step benchmark: the bare encoder vs the full objective step on the same synthetic crops.

    python -m wcl_fast.bench_step --config configs/imagenet_wcl_multicrop_200ep.yaml data.batch_size=256 [key=value ...]
        [--steps 20] [--warmup 5] [--rounds 2] [--json out.json] [--scaling 1.0]
        [--plans "none|auto|layer1,layer2|all"] [--gpu-memory GiB]

data.batch_size is the batch of this one device. Side by side in one run (alternating rounds, best
round of each): (a) encoder forward + backward of the 2 global + L local crops (one pass per
resolution, as the trainer), (b) the full step of loss.objective (heads, gathers, 1-NN graph and
components for WCL, both losses, backward, LARS update, EMA/queue update where the objective has
one), and (c) that step without train.diagnostics (docs/diagnostics.md §6: their cost is (b) over (c), and
their work alone, Diagnostics.observe repeated on one step's graph and embeddings, as a share of (b)).
Prints samples/s, the overhead of (b) over (a), peak memory, FLOPs per step (torch's
FlopCounterMode), device operators per step (ATen calls that launch work, views excluded: on a GPU
about one kernel each, so (b) - (a) times a few microseconds is the launch-bound floor of the
overhead at small batches), achieved TFLOP/s and MFU on known GPUs, and a PROJECTED 8-GPU ImageNet epoch
(1,281,167 images / (samples/s x 8 x --scaling)); --scaling is the measured multi-GPU efficiency
(1.0 = perfect, an assumption unless you measured it). Table + JSON.

--plans (activation checkpointing, docs/memory.md §2): the full step under each plan ('|'-separated specs of
model.activation_checkpointing; auto = the plan chosen for --gpu-memory, else the device's memory), timed
in alternating rounds on the same model and reported as a ratio to no checkpointing (else the first plan), with
each plan's recomputed share of the FLOPs, its traced peak (wcl_fast.memory, this process's shapes) and,
on CUDA, the measured torch.cuda.max_memory_allocated beside it, or 'OOM'.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from pipelines.bench import COMPUTE_LIMIT_EPOCH_S, IMAGENET_TRAIN  # noqa: F401 (the epoch targets, 8 GPUs)
from wcl_fast.cli import ArgumentParser, at_least, command, output_file

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, steps, device):
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


_VIEW_OPS = frozenset({"detach", "t", "view", "_unsafe_view", "alias", "expand", "unsqueeze", "squeeze", "slice", "select",
                       "as_strided", "permute", "transpose", "split", "split_with_sizes", "chunk", "unbind", "reshape",
                       "lift_fresh", "_reshape_alias", "view_as", "narrow"})


def _op_count(fn) -> int:
    """ATen operators dispatched by fn() that do work (views and aliases excluded)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in _VIEW_OPS:
                Counter.count += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.count


def _setup(cfg, ctx):
    """The trainer's pieces for one device, seeded: (model, LARS at lr 0.1, autocast, a batch of random crops
    of data.batch_size images, the objective)."""
    from pipelines.batch import MultiCropBatch
    from wcl_fast import objectives
    from wcl_fast.model import build_model
    from wcl_fast.optim import build_optimizer
    from wcl_fast.runtime import autocast_dtype, memory_format

    device, b = ctx.device, cfg.data.batch_size
    torch.manual_seed(cfg.train.seed)
    fmt = memory_format(cfg.model.channels_last)
    model = build_model(cfg.model, two_heads=objectives.two_heads(cfg)).to(device, memory_format=fmt)
    optimizer = build_optimizer(model, cfg.optim, skip_nonfinite=cfg.train.max_bad_steps > 0)
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    autocast = objectives.autocast_factory(device, autocast_dtype(cfg.train.precision))
    globals_ = torch.randn(2 * b, 3, cfg.data.global_size, cfg.data.global_size, device=device).contiguous(memory_format=fmt)
    locals_ = None
    if cfg.data.local_crops:
        locals_ = torch.randn(cfg.data.local_crops * b, 3, cfg.data.local_size, cfg.data.local_size,
                              device=device).contiguous(memory_format=fmt)
    batch = MultiCropBatch(globals_, locals_, torch.arange(b, device=device), torch.zeros(b, dtype=torch.int64, device=device))
    objective = objectives.build_objective(cfg, model, ctx, max(b, cfg.loss.clinfonce.kmeans_k))
    if cfg.loss.objective == "clinfonce" and getattr(objective, "table", None) is None:
        k = min(cfg.loss.clinfonce.kmeans_k, b)
        objective.table = torch.randint(0, k, (max(b, cfg.loss.clinfonce.kmeans_k),), device=device)
    return model, optimizer, autocast, batch, objective


def run(cfg, steps: int, warmup: int, rounds: int, scaling: float) -> dict:
    from wcl_fast import dist as wdist
    from wcl_fast.train import train_step

    ctx = wdist.init_distributed()
    device = ctx.device
    b = cfg.data.batch_size
    model, optimizer, autocast, batch, objective = _setup(cfg, ctx)
    if cfg.model.compile:
        model.net.compile(mode=cfg.model.compile)
    globals_, locals_ = batch.globals, batch.locals
    counter = {"step": 0}

    def encoder_step():
        with autocast():
            h = model.net(globals_).float().square().mean()
            if locals_ is not None:
                h = h + model.net(locals_).float().square().mean()
        h.backward()
        model.zero_grad(set_to_none=True)

    diagnostics = objective.diagnostics  # train.diagnostics (docs/diagnostics.md): timed on and off

    def full_step():
        objective.diagnostics = diagnostics
        train_step(objective, model, batch, counter["step"], 10_000, autocast, optimizer)  # the trainer's step
        counter["step"] += 1

    def bare_step():  # the same step with train.diagnostics=false: no forward hook, no observe
        objective.diagnostics = None
        diagnostics.suspend()
        try:
            train_step(objective, model, batch, counter["step"], 10_000, autocast, optimizer)
        finally:
            diagnostics.resume()
        counter["step"] += 1

    variants = [("encoder", encoder_step), ("full", full_step)] + ([("no_diag", bare_step)] if diagnostics else [])
    results = {name: [] for name, _ in variants}
    peak = {}
    for name, fn in variants:  # warm-up (compilation, allocator)
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in variants:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            results[name].append(_timed(fn, steps, device))
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated(device))
    observe_s = None
    if diagnostics:  # observe() alone, on one step's graph and embeddings, repeated: its cost without the step's noise
        seen, observe = {}, diagnostics.observe

        def spy(batch_, graph):
            seen.update(graph=graph, outputs=diagnostics._outputs)
            observe(batch_, graph)

        diagnostics.observe = spy
        full_step()
        diagnostics.observe = observe

        def observe_only():
            diagnostics._outputs = seen["outputs"]
            observe(batch, seen["graph"])

        observe_s = min(_timed(observe_only, 5 * steps, device) for _ in range(rounds))
        diagnostics.reset()
    flops = {name: _flops(fn) for name, fn in variants}
    ops = {name: _op_count(fn) for name, fn in variants}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    card = next((key for key in PEAK_BF16_TFLOPS if key in name), None)
    rows = {}
    for key in results:
        seconds = min(results[key])
        tflops = flops[key] / seconds / 1e12
        rows[key] = {"s_per_step": seconds, "samples_per_s": b / seconds, "flops_per_step": flops[key], "ops_per_step": ops[key],
                     "tflops": tflops, "peak_memory_gb": peak.get(key, 0) / 2**30 if peak else None,
                     "mfu": tflops / PEAK_BF16_TFLOPS[card] if card and device.type == "cuda" else None}
    overhead = rows["full"]["s_per_step"] / rows["encoder"]["s_per_step"] - 1
    projected = IMAGENET_TRAIN / (rows["full"]["samples_per_s"] * 8 * scaling)
    result = {"device": name, "objective": cfg.loss.objective, "batch_per_device": b, "precision": cfg.train.precision,
              "crops": f"2x{cfg.data.global_size}" + (f" + {cfg.data.local_crops}x{cfg.data.local_size}" if cfg.data.local_crops else ""),
              "arch": cfg.model.arch, "steps": steps, "rounds": rounds, "encoder": rows["encoder"], "full": rows["full"],
              "overhead": overhead, "no_diag": rows.get("no_diag"),
              "diagnostics_overhead": rows["full"]["s_per_step"] / rows["no_diag"]["s_per_step"] - 1 if diagnostics else None,
              "diagnostics_observe_s": observe_s,
              "diagnostics_observe_share": observe_s / rows["full"]["s_per_step"] if diagnostics else None,
              "projected_8gpu_epoch_s": projected, "scaling_assumed": scaling,
              "compute_limit_epoch_s": COMPUTE_LIMIT_EPOCH_S.get(card) if card else None,
              "date": time.strftime("%Y-%m-%d")}
    return result


def run_plans(cfg, texts: list[str], steps: int, warmup: int, rounds: int, gpu_memory: float | None) -> dict:
    """The full step under each activation-checkpointing plan, side by side (see the module docstring)."""
    from wcl_fast import dist as wdist
    from wcl_fast import plan as wplan
    from wcl_fast.config import ConfigError, parse_checkpointing
    from wcl_fast.memory import GiB, trace_step
    from wcl_fast.train import train_step

    ctx = wdist.init_distributed()
    device = ctx.device
    b = cfg.data.batch_size
    budget = int((gpu_memory or 0) * GiB)
    if not budget and device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory
    plans = []
    for text in texts:
        if text == "auto":
            if not budget:
                raise ConfigError("--plans auto needs --gpu-memory on a machine without CUDA")
            plans.append(("auto", wplan.choose_plan(cfg, 1, budget).checkpointing))
        else:
            plans.append((text, parse_checkpointing(text, cfg.model.arch)))
    model, optimizer, autocast, batch, objective = _setup(cfg, ctx)
    counter = {"step": 0}

    def step():
        train_step(objective, model, batch, counter["step"], 10_000, autocast, optimizer)
        counter["step"] += 1

    times = {name: [] for name, _ in plans}
    peaks, oom = {}, set()
    for round_ in range(rounds + 1):  # round 0 is the warm-up
        for name, plan in plans:
            if name in oom:
                continue
            model.set_checkpointing(plan)
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                if round_ == 0:
                    for _ in range(warmup):
                        step()
                else:
                    times[name].append(_timed(step, steps, device))
                if device.type == "cuda":
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device))
            except torch.cuda.OutOfMemoryError:
                oom.add(name)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    rows = []
    plain = trace_step(cfg, 1)
    measured = {name: min(times[name]) for name, _ in plans if times[name] and name not in oom}
    # ratios to no checkpointing when that plan ran, else to the first plan that did
    empty = [name for name, plan in plans if not any(plan.values()) and name in measured]
    empty.sort(key=lambda name: name != "none")  # the plan written 'none' first, else auto's empty plan
    base = measured[empty[0]] if empty else next((measured[name] for name, _ in plans if name in measured), None)
    for name, plan in plans:
        traced = trace_step(cfg, 1, plan) if any(plan.values()) else plain
        seconds = measured.get(name)
        rows.append({"plan": name, "checkpointing": wplan.format_checkpointing(plan, cfg.model.arch),
                     "s_per_step": seconds, "ratio": seconds / base if seconds and base else None,
                     "recompute_share": traced.step_flops / plain.step_flops - 1, "traced_peak_gib": traced.peak / GiB,
                     "measured_peak_gib": peaks[name] / GiB if name in peaks and name not in oom else None,
                     "oom": name in oom})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {"device": name, "objective": cfg.loss.objective, "batch_per_device": b, "precision": cfg.train.precision,
            "crops": f"2x{cfg.data.global_size}" + (f" + {cfg.data.local_crops}x{cfg.data.local_size}" if cfg.data.local_crops else ""),
            "arch": cfg.model.arch, "steps": steps, "rounds": rounds, "plans": rows, "date": time.strftime("%Y-%m-%d")}


def format_plans(r: dict) -> str:
    lines = [f"checkpointing plans: {r['arch']} {r['objective']}, {r['crops']} crops, batch {r['batch_per_device']} per device, "
             f"{r['precision']}, {r['device']} (alternating rounds, best of {r['rounds']})",
             f"{'plan':<14}{'ms/step':>10}{'ratio':>8}{'recompute':>11}{'traced GiB':>12}{'measured GiB':>14}  checkpointing"]
    for row in r["plans"]:
        ms = f"{1e3 * row['s_per_step']:.1f}" if row["s_per_step"] else ("OOM" if row["oom"] else "-")
        ratio = f"{row['ratio']:.3f}" if row["ratio"] else "-"
        measured = f"{row['measured_peak_gib']:.2f}" if row["measured_peak_gib"] is not None else "-"
        lines.append(f"{row['plan'][:13]:<14}{ms:>10}{ratio:>8}{100 * row['recompute_share']:>10.1f}%"
                     f"{row['traced_peak_gib']:>12.2f}{measured:>14}  {row['checkpointing']}")
    return "\n".join(lines)


def format_table(r: dict) -> str:
    lines = [f"step bench: {r['arch']} {r['objective']}, {r['crops']} crops, batch {r['batch_per_device']} per device, "
             f"{r['precision']}, {r['device']}",
             f"{'':<10}{'samples/s':>11}{'ms/step':>10}{'GFLOP/step':>12}{'ops/step':>10}{'TFLOP/s':>9}{'MFU':>7}{'peak GB':>9}"]
    for key, label in (("encoder", "(a) enc."), ("full", "(b) full"), ("no_diag", "(c) -diag")):
        row = r.get(key)
        if row is None:
            continue
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
        mem = f"{row['peak_memory_gb']:.1f}" if row["peak_memory_gb"] is not None else "-"
        lines.append(f"{label:<10}{row['samples_per_s']:>11.1f}{1e3 * row['s_per_step']:>10.1f}"
                     f"{row['flops_per_step'] / 1e9:>12.1f}{row['ops_per_step']:>10}{row['tflops']:>9.2f}{mfu:>7}{mem:>9}")
    lines.append(f"overhead of the full step over the bare encoder: {100 * r['overhead']:+.1f}% "
                 f"({r['full']['ops_per_step'] - r['encoder']['ops_per_step']} more operators per step)")
    if r.get("diagnostics_overhead") is not None:
        lines.append(f"train.diagnostics: (b) over (c), the same step without them: {100 * r['diagnostics_overhead']:+.2f}% "
                     f"({r['full']['ops_per_step'] - r['no_diag']['ops_per_step']} more operators per step); their work "
                     f"alone (observe, repeated on one step's graph): {1e3 * r['diagnostics_observe_s']:.2f} ms, "
                     f"{100 * r['diagnostics_observe_share']:.2f}% of (b)")
    limit = f" (compute limit {r['compute_limit_epoch_s']:.0f} s)" if r["compute_limit_epoch_s"] else ""
    lines.append(f"PROJECTION, not a measurement: 8-device ImageNet epoch {r['projected_8gpu_epoch_s']:.0f} s at "
                 f"scaling {r['scaling_assumed']:.2f}{limit}")
    return "\n".join(lines)


@command
def main(argv=None) -> int:
    from wcl_fast.config import ConfigError, load_config

    parser = ArgumentParser(prog="python -m wcl_fast.bench_step", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=at_least(1), default=20)
    parser.add_argument("--warmup", type=at_least(0), default=5)
    parser.add_argument("--rounds", type=at_least(1), default=2)
    parser.add_argument("--scaling", type=at_least(0.0, float), default=1.0, help="multi-GPU efficiency used by the projection")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plans", default=None,
                        help="'|'-separated activation-checkpointing plans to time against each other (e.g. 'none|auto|all')")
    parser.add_argument("--gpu-memory", type=at_least(0.0, float), default=None, help="GiB the 'auto' plan is chosen for")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    output_file("--json", args.json)
    cfg = load_config(args.config, args.overrides)
    if not 0 < args.scaling <= 1:
        raise ConfigError(f"--scaling: the multi-GPU efficiency must be in (0, 1], got {args.scaling}")
    if args.plans:
        result = run_plans(cfg, [p.strip() for p in args.plans.split("|")], args.steps, args.warmup, args.rounds,
                           args.gpu_memory)
        print(format_plans(result))
        print(json.dumps(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    result = run(cfg, args.steps, args.warmup, args.rounds, args.scaling)
    print(format_table(result))
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
