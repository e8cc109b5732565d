"""No host reads in the training step, checked on the CPU (docs/implementation.md, "No host reads in the step").

On CUDA an operator that reads device memory on the host (`.item()`, `bool(t)`, boolean-mask indexing,
`nonzero`, ...) stalls the step until the GPU has caught up. tests/test_train.py checks the step under
torch.cuda.set_sync_debug_mode('error'), which needs a GPU. This file checks the same property on the CPU:
while one full trainer step runs (wcl_fast.train.train_step, built as wcl_fast/bench_step.py builds it:
forward, loss, backward, the GradScaler as the trainer uses it, LARS with its NaN guard, the objective's
after-step update), HostReads records every operator that would read device memory on the host if its
tensors lived on a GPU, for every objective and precision, and with two gloo processes under DDP and the
sync-BN of wcl_fast/syncbn.py. The first step may create state; the second is checked.

What the CPU check cannot see: copies towards the host (`.cpu()` / `.to('cpu')` of a CPU tensor dispatch
nothing; `.cpu()`, `.tolist()` and `.numpy()` are caught at the Python level by HostCalls, `.to('cpu')` is
not) and host reads made inside a CUDA kernel's C++ code that the CPU kernel does not make (the listed
operators are flagged whatever their device for that reason). The CUDA test stays the final word on a GPU.

Host reads found by this file on the code before the sync-BN and GradScaler changes (per checked step,
batch 8; both ranks the same in the 2-process runs):
  - every objective under fp16 (8 cases): 1 aten._local_scalar_dense (GradScaler.step reads found_inf
    with .item() before calling the optimizer)
  - every other case, bf16 and fp32 (16 cases) and the 2-process wcl-knn / slr steps: none. On the CPU
    torch.nn.SyncBatchNorm could not run (CUDA-only, so wrap_model left plain BatchNorm on the CPU);
    on CUDA its forward masks the gathered per-rank counts (count_all[mask]: a boolean index, i.e. a
    nonzero on the host) in every BatchNorm layer.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import run_distributed
from wcl_fast.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "cpu_smoke.yaml"

# a narrow ResNet-18 on 32 px crops (local crops too: at 16 px the last stage is 1 x 1, where CPU bf16 weight
# gradients are intermittently NaN -- wcl_fast.train.warn_cpu_bf16), batch 8
COMMON = ["data.batch_size=8", "data.local_crops=2", "data.local_size=32", "model.widths=[8,16,32,64]",
          "model.head_hidden=32", "model.head_out=16", "loss.momentum.queue_size=64", "loss.clinfonce.kmeans_k=4"]
CASES = {
    "wcl-knn": ["loss.objective=wcl", "loss.multicrop_rule=knn"],
    "wcl-inherit": ["loss.objective=wcl", "loss.multicrop_rule=inherit"],
    "simclr": ["loss.objective=simclr"],
    "clinfonce-single": ["loss.objective=clinfonce", "loss.clinfonce.form=single"],
    "clinfonce-dual": ["loss.objective=clinfonce", "loss.clinfonce.form=dual"],
    "co2-batch": ["loss.objective=co2", "loss.co2.form=batch"],
    "co2-queue": ["loss.objective=co2", "loss.co2.form=queue"],
    "slr": ["loss.objective=slr"],
}

_VALUE_READS = frozenset({"_local_scalar_dense", "item", "equal", "allclose", "is_nonzero"})
_INDEXING = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})


def host_read(func, args, kwargs) -> str | None:
    """Why the ATen operator `func(*args, **kwargs)` would read device memory on the host if its tensors lived
    on a GPU (a short label), or None."""
    name = func.overloadpacket.__name__
    if name in _VALUE_READS:  # .item(), bool(t), int(t), float(t), torch.equal, torch.allclose
        return f"aten.{name}"
    if name in _INDEXING:  # boolean-mask indexing: the selected count decides the shape
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices):
            return f"aten.{name} (boolean index)"
        return None
    if name == "repeat_interleave":
        return None if kwargs.get("output_size") is not None else "aten.repeat_interleave (no output_size)"
    if name == "one_hot":  # num_classes=-1: the largest value on the host
        num_classes = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
        return "aten.one_hot (num_classes=-1)" if num_classes < 0 else None
    if name == "histc":  # min == max: the data's range on the host
        low = args[2] if len(args) > 2 else kwargs.get("min", 0)
        high = args[3] if len(args) > 3 else kwargs.get("max", 0)
        return "aten.histc (min == max)" if low == high else None
    if name == "_to_copy":  # a device tensor copied to the host
        target = kwargs.get("device")
        if target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu":
            return "aten._to_copy (to the host)"
        return None
    if name == "copy_":
        if args[0].device.type == "cpu" and args[1].device.type != "cpu":
            return "aten.copy_ (to the host)"
        return None
    # every other operator whose output shape or value depends on the data: nonzero, masked_select,
    # unique*, bincount, ... (ATen tags them; nonzero_static is not tagged)
    if torch.Tag.dynamic_output_shape in func.tags or torch.Tag.data_dependent_output in func.tags:
        return f"aten.{name}"
    return None


class HostReads:
    """Inside: `found` counts the operators of host_read (ATen level) and the Python calls that move a tensor
    to the host (.cpu(), .tolist(), .numpy(); the dispatcher sees none of them for a CPU tensor)."""

    def __init__(self):
        self.found: Counter = Counter()
        outer = self

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                reason = host_read(func, args, kwargs)
                if reason:
                    outer.found[reason] += 1
                return func(*args, **kwargs)

        class Calls(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in ("cpu", "tolist", "numpy"):
                    outer.found[f"Tensor.{name}"] += 1
                return func(*args, **(kwargs or {}))

        self._modes = (Calls(), Dispatch())

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False


def test_host_read_sees_the_usual_suspects():
    """The recorder itself: each line below would synchronise on CUDA, the last ones would not."""
    x = torch.randn(6)
    reads = HostReads()
    with reads:
        x.sum().item()
        bool(x[0] > 0)
        float(x.max())
        x[x > 0]
        x.nonzero()
        torch.equal(x, x)
        x.unique()
        torch.repeat_interleave(torch.tensor([1, 2]))
        x.tolist()
        x.cpu()
        torch.bincount(torch.tensor([1, 2]))
        x[torch.tensor([0, 2])] = 0.0  # an integer index: no read
        torch.where(x > 0, x, 0.0)
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
    assert reads.found == Counter({"aten._local_scalar_dense": 3, "aten.index (boolean index)": 1, "aten.nonzero": 1,
                                   "aten.equal": 1, "aten._unique2": 1, "aten.repeat_interleave (no output_size)": 1,
                                   "Tensor.tolist": 1, "Tensor.cpu": 1, "aten.bincount": 1}), reads.found


def trainer_step(overrides, precision: str, ctx=None):
    """The trainer's step on random crops (as wcl_fast/bench_step.py builds it), the model wrapped by
    wcl_fast.dist.wrap_model (channels-last; sync-BN and DDP when ctx is distributed), the GradScaler as the
    trainer makes it. Returns a function running one step."""
    from pipelines.batch import MultiCropBatch
    from wcl_fast import dist as wdist
    from wcl_fast import objectives
    from wcl_fast.model import build_model
    from wcl_fast.optim import build_optimizer
    from wcl_fast.runtime import autocast_dtype
    from wcl_fast.train import train_step

    cfg = load_config(SMOKE, [*COMMON, f"train.precision={precision}", *overrides])
    ctx = ctx or wdist.DistContext()
    device, b = ctx.device, cfg.data.batch_size
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, two_heads=objectives.two_heads(cfg))
    optimizer = build_optimizer(model, cfg.optim, skip_nonfinite=cfg.train.max_bad_steps > 0)
    model, ddp = wdist.wrap_model(model, optimizer, cfg.model, ctx)
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # as wcl_fast.train._train
    autocast = objectives.autocast_factory(device, autocast_dtype(precision))
    generator = torch.Generator().manual_seed(1000 + ctx.rank)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    globals_ = torch.randn(2 * b, 3, 32, 32, generator=generator).contiguous(memory_format=fmt)
    locals_ = torch.randn(2 * b, 3, 32, 32, generator=generator).contiguous(memory_format=fmt)
    batch = MultiCropBatch(globals_.to(device), locals_.to(device), torch.arange(b, device=device),
                           torch.zeros(b, dtype=torch.int64, device=device))
    objective = objectives.build_objective(cfg, model, ctx, max(b, cfg.loss.clinfonce.kmeans_k))
    if cfg.loss.objective == "clinfonce":
        k = min(cfg.loss.clinfonce.kmeans_k, b)
        objective.table = torch.randint(0, k, (max(b, cfg.loss.clinfonce.kmeans_k),), generator=torch.Generator()).to(device)
    ddp.train()
    counter = {"step": 0}

    def step():
        terms, ok = train_step(objective, ddp, batch, counter["step"], 100, autocast, optimizer, scaler)
        counter["step"] += 1
        return terms, ok

    step.model = model
    return step


def reads_of_second_step(overrides, precision: str, ctx=None) -> Counter:
    step = trainer_step(overrides, precision, ctx)
    step()  # state the first step creates (momentum buffers, the GradScaler's scale)
    with HostReads() as reads:
        terms, _ = step()
    assert all(torch.isfinite(t).all() for t in terms.values())
    return reads.found


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
def test_trainer_step_reads_nothing_on_the_host(case, precision):
    found = reads_of_second_step(CASES[case], precision)
    assert not found, f"{case} {precision}: host reads in one step: {dict(found)}"


# two processes: DDP (as wcl_fast.dist.wrap_model wraps it) with the sync-BN; (case, precision, extra overrides)
DISTRIBUTED = [("wcl-knn", "bf16", []), ("slr", "fp16", []),
               ("wcl-inherit", "fp32", ["model.activation_checkpointing=global:layer1,layer2"])]


def _distributed_steps(rank, world):
    from wcl_fast import dist as wdist
    from wcl_fast.syncbn import SyncBatchNorm

    ctx = wdist.DistContext(rank=rank, world_size=world)
    for case, precision, extra in DISTRIBUTED:
        step = trainer_step(CASES[case] + extra, precision, ctx)
        assert any(isinstance(m, SyncBatchNorm) for m in step.model.modules()), "wrap_model made no sync-BN"
        step()
        with HostReads() as reads:
            terms, _ = step()
        assert not reads.found, f"rank {rank} {case} {precision}: host reads in one step: {dict(reads.found)}"
        assert all(torch.isfinite(t).all() for t in terms.values()), (case, precision)


def test_two_process_steps_read_nothing_on_the_host():
    run_distributed(_distributed_steps, 2)
