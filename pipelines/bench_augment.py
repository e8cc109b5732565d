"""Augmentation benchmark of the FFCV path on the GPU: the batched tensor ops (`torch.where` chain) against the
fused Triton kernel, per augmented batch.

    python -m pipelines.bench_augment [--batch 512] [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--repeats 10]
                                      [--json PATH]

One batch is what the FFCV loader hands over: `--batch` images, each with 2 global 224 px and 6 local 96 px
uint8 crops cut into one [batch, T] record (the views are slices of it), and the keyed per-crop choices of
the default recipes in the SimCLR phase (jitter 0.8 / gray 0.2 / blur 0.5 / flip 0.5). Rows:
  torch.where chain  pipelines.augment.apply_params(where=True), as augment_views(impl="torch") runs on
                     CUDA: every operation over the whole batch, selected per crop with torch.where
  fused triton       pipelines.augment_triton.augment_crops_triton, augment_views' CUDA default
Columns: device kernel launches and bytes written per batch, and the bytes relative to the floor (read the
uint8 crops once, write the output once); on CUDA also milliseconds (median of --repeats, CUDA events,
after a warm-up call). The chain is counted by a TorchDispatchMode (every aten operator that makes
device work, the bytes of its outputs; views and allocations are not work, the host-to-device copy of
the parameters is listed apart), the kernel by the launch hook of pipelines/augment_triton.py (its
launches and the bytes they store) plus the same dispatch mode for the torch calls around it. With
--device cpu everything runs on the "meta" device: shapes and launches only, no data, no kernel runs
(under TRITON_INTERPRET=1 a full batch would take hours), so the counts at batch 512 take seconds.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton's import (the CPU has no compiler)

GLOBAL, LOCAL, LOCAL_CROPS = 224, 96, 6
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NO_WORK = {"empty", "empty_strided", "empty_like", "lift_fresh", "set_", "_pin_memory", "is_pinned"}


class CountDeviceWork(TorchDispatchMode):
    """Counts the aten operators that produce device work (outputs on `device`, not views, not plain
    allocations) and the bytes of their outputs; host-to-device copies are counted apart."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device).type
        self.launches, self.bytes_written, self.h2d_copies, self.h2d_bytes = 0, 0, 0, 0
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if getattr(func, "is_view", False) or name in _NO_WORK:
            return out
        outputs = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
        outputs = [t for t in outputs if t.device.type == self.device]
        if not outputs:
            return out
        nbytes = sum(t.numel() * t.element_size() for t in outputs)
        inputs = [a for a in args if isinstance(a, torch.Tensor)]
        if name in ("_to_copy", "copy_") and any(a.device.type == "cpu" for a in inputs):
            self.h2d_copies += 1
            self.h2d_bytes += nbytes
            return out
        self.launches += 1
        self.bytes_written += nbytes
        self.ops[name] = self.ops.get(name, 0) + 1
        return out


def make_batch(batch: int, device: torch.device, seed: int = 0):
    """([global views], [local views], global params, local params): uint8 views sliced from one
    [batch, T] record tensor on `device` (random pixels unless on meta), params as the FFCV loader's."""
    from pipelines.augment import keyed_params
    from pipelines.reference import crop_recipes
    from wcl_fast.config import DataConfig

    cfg = DataConfig(local_crops=LOCAL_CROPS, global_size=GLOBAL, local_size=LOCAL)
    epoch = cfg.aug_switch_epoch  # the SimCLR phase: the stronger jitter
    global_recipe, local_recipe = crop_recipes(cfg, epoch)
    sizes = [GLOBAL] * 2 + [LOCAL] * LOCAL_CROPS
    spans = [s * s * 3 for s in sizes]
    if device.type == "meta":
        records = torch.empty(batch, sum(spans), dtype=torch.uint8, device=device)
    else:
        g = torch.Generator().manual_seed(seed)
        records = torch.randint(0, 256, (batch, sum(spans)), dtype=torch.uint8, generator=g).to(device)
    views, offset = [], 0
    for size, span in zip(sizes, spans):
        views.append(records[:, offset:offset + span].view(batch, size, size, 3))
        offset += span
    ids = list(range(batch))
    p_global = keyed_params(seed, epoch, ids, range(2), global_recipe)
    p_local = keyed_params(seed, epoch, ids, range(2, len(sizes)), local_recipe)
    return views[:2], views[2:], p_global, p_local, cfg


def run_chain(views, params, cfg, dtype):
    """augment_views(impl="torch") as on CUDA (where=True) for one resolution."""
    from pipelines import augment as A

    device = views[0].device
    x = torch.cat(views).permute(0, 3, 1, 2).float().div_(255.0)
    out = A.apply_params(x, A._dev(params, device), cfg.mean, cfg.std, where=True)
    return out if dtype == torch.float32 else out.to(dtype)


def run_fused(views, params, cfg, dtype):
    from pipelines.augment import BLUR_RADIUS
    from pipelines.augment_triton import augment_crops_triton

    return augment_crops_triton(views, params, cfg.mean, cfg.std, radius=BLUR_RADIUS, dtype=dtype)


def count(fn, batch_parts, device, dtype) -> dict:
    """Launches, bytes written and host-to-device copies of fn over both resolutions of one batch."""
    from pipelines import augment_triton as T

    g_views, l_views, p_global, p_local, cfg = batch_parts
    triton_launches = []
    T.LAUNCH_HOOKS.append(triton_launches.append)
    try:
        with CountDeviceWork(device) as mode:
            fn(g_views, p_global, cfg, dtype)
            fn(l_views, p_local, cfg, dtype)
    finally:
        T.LAUNCH_HOOKS.remove(triton_launches.append)
    return {"launches": mode.launches + len(triton_launches),
            "bytes_written": mode.bytes_written + sum(r["bytes_written"] for r in triton_launches),
            "h2d_copies": mode.h2d_copies, "h2d_bytes": mode.h2d_bytes,
            "aten_ops": dict(sorted(mode.ops.items(), key=lambda kv: -kv[1])),
            "triton_launches": [{k: r[k] for k in ("kernel", "grid", "writes")} for r in triton_launches]}


def time_ms(fn, batch_parts, dtype, repeats: int) -> float:
    g_views, l_views, p_global, p_local, cfg = batch_parts

    def once():
        fn(g_views, p_global, cfg, dtype)
        fn(l_views, p_local, cfg, dtype)

    once()  # compilation, allocator warm-up
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        once()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main(argv=None) -> int:
    """The command (a user error: one line, exit 2). wcl_fast.cli, the commands' convention, is imported here
    only: the pipelines library itself imports nothing of wcl_fast but its config."""
    from wcl_fast.cli import command

    return command(_main)(argv)


def _main(argv=None) -> int:
    from wcl_fast.cli import ArgumentParser, UsageError, at_least, output_file

    parser = ArgumentParser(prog="python -m pipelines.bench_augment", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=at_least(1), default=512, help="images per batch (each: 2 x 224 + 6 x 96 crops)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu: counts on the meta device only; cuda: counts, times and a value check")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="output dtype (the model's input)")
    parser.add_argument("--repeats", type=at_least(1), default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    output_file("--json", args.json)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here; use --device cpu (counts only)")
    dtype = DTYPES[args.dtype]
    device = torch.device("cuda" if args.device == "cuda" else "meta")
    parts = make_batch(args.batch, device)
    g_views, l_views = parts[0], parts[1]
    crops = {"global": [2 * args.batch, GLOBAL], "local": [LOCAL_CROPS * args.batch, LOCAL]}
    uint8_bytes = sum(v.numel() for v in g_views + l_views)
    output_bytes = uint8_bytes * dtype.itemsize
    floor = uint8_bytes + output_bytes
    rows = {"torch.where chain": count(run_chain, parts, device, dtype),
            "fused triton": count(run_fused, parts, device, dtype)}
    for row in rows.values():
        row["x_floor"] = row["bytes_written"] / floor
    blurred = [int((p[:, 14] > 0.5).sum()) for p in parts[2:4]]
    check = None
    if device.type == "cuda":
        for name, fn in (("torch.where chain", run_chain), ("fused triton", run_fused)):
            rows[name]["ms"] = time_ms(fn, parts, dtype, args.repeats)
        check = max(float((run_chain(v, p, parts[4], torch.float32) - run_fused(v, p, parts[4], torch.float32)).abs().max())
                    for v, p in ((g_views, parts[2]), (l_views, parts[3])))  # sync point (reporting only)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "meta device (counts only, no kernels run)"
    print(f"batch {args.batch}: {crops['global'][0]} x {GLOBAL} px + {crops['local'][0]} x {LOCAL} px crops, "
          f"{blurred[0] + blurred[1]} blurred; output {args.dtype}; {where}")
    print(f"floor (read the uint8 crops once + write the output once): {floor / 1e9:.3f} GB")
    header = f"{'path':<20}{'launches':>10}{'GB written':>12}{'x floor':>9}{'H2D copies':>12}" + \
             (f"{'ms':>9}" if device.type == "cuda" else "")
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        line = f"{name:<20}{row['launches']:>10}{row['bytes_written'] / 1e9:>12.3f}{row['x_floor']:>9.2f}{row['h2d_copies']:>12}"
        if "ms" in row:
            line += f"{row['ms']:>9.2f}"
        print(line)
    if check is not None:
        print(f"max |chain - fused| (fp32, normalised units): {check:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "batch": args.batch, "device": where, "dtype": args.dtype, "crops": crops, "blurred": blurred,
            "uint8_bytes": uint8_bytes, "output_bytes": output_bytes, "floor_bytes": floor, "rows": rows,
            "max_abs_difference": check}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
