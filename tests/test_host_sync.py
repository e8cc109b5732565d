"""No host reads in the training step, checked on the CPU (docs/implementation.md, "No host reads in the step").

On CUDA an operator that reads device memory on the host (`.item()`, `bool(t)`, boolean-mask indexing,
`nonzero`, ...) stalls the step until the GPU has caught up. tests/test_train.py checks the step under
torch.cuda.set_sync_debug_mode('error'), which needs a GPU. This file checks the same property on the CPU:
while one full trainer step runs (wcl_fast.train.train_step, built as wcl_fast/bench_step.py builds it:
forward, loss, backward, the GradScaler as the trainer uses it, LARS with its NaN guard, the objective's
after-step update), HostReads records every operator that would read device memory on the host if its
tensors lived on a GPU, for every objective and precision, and with two gloo processes under DDP and the
sync-BN of wcl_fast/syncbn.py. The first step may create state; the second is checked.

What the CPU check cannot see: copies towards the host (`.cpu()` / `.to('cpu')` / `.numpy()` of a CPU tensor
dispatch no copy; `.cpu()`, `.tolist()` and `.numpy()` calls are caught at the Python level, `.to('cpu')` is
not, as on the CPU it cannot be told from a host-to-device copy) and host reads made inside an operator's
own CUDA code but not in its CPU code, and vice versa (F.one_hot checks its values on the host on the CPU
only). Operators known to read the host on CUDA are therefore flagged by name whatever their device. The
CUDA test under torch.cuda.set_sync_debug_mode stays the final word on a GPU.

Host reads this file found on the code before wcl_fast/syncbn.py and the fp16 change of train_step (per
checked step, batch 8; 2-process runs: per rank), i.e. the cases that fail there:
  - test_trainer_step_reads_nothing_on_the_host, every objective x fp16 (8 cases): 1 aten._local_scalar_dense
    (GradScaler.step reads its found_inf with .item() before it calls the optimizer); bf16 and fp32 (16
    cases): none
  - test_two_process_steps_read_nothing_on_the_host: slr fp16 1 aten._local_scalar_dense (wcl-knn bf16:
    none), and no sync-BN at all: wrap_model converted to torch.nn.SyncBatchNorm on CUDA only, which does not
    run on the CPU; on CUDA its forward drops empty ranks with a boolean index (count_all[mask]) in every
    BatchNorm layer
  - the sync-BN tests (no wcl_fast/syncbn.py). test_fp16_step_equals_gradscaler_step passes there: its
    reference is that code's path.
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


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread (two spin-wait against each other on a busy 2-core machine, 10-100x slower);
    conftest puts the suite's count back after each test."""
    torch.set_num_threads(1)
    yield


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
    size, local_size = cfg.data.global_size, cfg.data.local_size
    globals_ = torch.randn(2 * b, 3, size, size, generator=generator).contiguous(memory_format=fmt)
    locals_ = torch.randn(cfg.data.local_crops * b, 3, local_size, local_size, generator=generator).contiguous(memory_format=fmt)
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
DISTRIBUTED = [("wcl-knn", "bf16", ["model.activation_checkpointing=global:layer1,layer2"]), ("slr", "fp16", [])]


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
    """2 gloo processes, the model wrapped by wcl_fast.dist.wrap_model (sync-BN + DDP): the wcl knn step (bf16,
    with activation checkpointing: recomputed sync-BN layers) and the slr step (fp16, EMA key encoder with
    sync-BN, the queue) read nothing on the host on either rank."""
    run_distributed(_distributed_steps, 2)


# ---- wcl_fast/syncbn.py against BatchNorm on the concatenated batch ----

ROWS = (3, 5)  # rows of rank 0 and rank 1: uneven batches (the count is all-reduced too)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _reference_bn(shape, seed: int) -> torch.nn.Module:
    """A BatchNorm of the input's rank in float64, with non-trivial affine parameters and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    bn = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(shape[1]).double()
    with torch.no_grad():
        bn.weight.copy_(1 + 0.5 * torch.randn(shape[1], generator=generator, dtype=torch.float64))
        bn.bias.copy_(torch.randn(shape[1], generator=generator, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(shape[1], generator=generator, dtype=torch.float64))
        bn.running_var.copy_(1 + torch.rand(shape[1], generator=generator, dtype=torch.float64))
    return bn


def _syncbn_formulas(x_parts, momentum, running_mean, running_var):
    """torch.nn.SyncBatchNorm's statistics (float64): per-rank mean / biased variance / count combined over
    ranks (batch_norm_gather_stats_with_counts), normalisation with the biased variance, running variance
    updated with the unbiased one."""
    dims = [0] + list(range(2, x_parts[0].dim()))
    counts = torch.tensor([x.numel() / x.shape[1] for x in x_parts], dtype=torch.float64)[:, None]
    means = torch.stack([x.mean(dims) for x in x_parts])
    variances = torch.stack([x.var(dims, correction=0) for x in x_parts])
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
    return (mean, var, (1 - momentum) * running_mean + momentum * mean,
            (1 - momentum) * running_var + momentum * var * total / (total - 1))


def _syncbn_worker(rank, world):
    import copy

    from wcl_fast.syncbn import SyncBatchNorm, convert_sync_batchnorm

    mine = slice(sum(ROWS[:rank]), sum(ROWS[:rank + 1]))
    for shape, fmt in [((8, 6, 5, 4), torch.contiguous_format), ((8, 6, 5, 4), torch.channels_last), ((8, 6), None)]:
        reference = _reference_bn(shape, seed=len(shape))
        wrapped = torch.nn.Sequential(copy.deepcopy(reference))
        original = wrapped[0]
        convert_sync_batchnorm(wrapped)
        bn = wrapped[0]
        assert isinstance(bn, SyncBatchNorm) and bn.weight is original.weight and bn.running_var is original.running_var
        assert list(bn.state_dict()) == list(reference.state_dict())
        for step in range(2):  # the running statistics compound over steps
            generator = torch.Generator().manual_seed(10 * step + len(shape))
            x = 3 + 2 * torch.randn(shape, generator=generator, dtype=torch.float64)  # mean far from 0
            dy = torch.randn(shape, generator=generator, dtype=torch.float64)
            stats_before = (reference.running_mean.clone(), reference.running_var.clone())
            x_ref = x.clone().requires_grad_(True)
            reference.zero_grad()
            y_ref = reference(x_ref)
            y_ref.backward(dy)
            x_mine = x[mine].clone()
            if fmt is not None:
                x_mine = x_mine.contiguous(memory_format=fmt)
            x_mine.requires_grad_(True)
            bn.zero_grad()
            y = bn(x_mine)
            y.backward(dy[mine])
            if fmt is torch.channels_last:
                assert y.is_contiguous(memory_format=fmt) and x_mine.grad.is_contiguous(memory_format=fmt)
            grads = torch.cat([bn.weight.grad, bn.bias.grad])
            torch.distributed.all_reduce(grads)  # DDP's average times the world size: the global batch's gradient
            where = f"rank {rank} shape {shape} {fmt} step {step}"
            for name, got, expected in [("output", y, y_ref[mine]), ("input gradient", x_mine.grad, x_ref.grad[mine]),
                                        ("weight/bias gradient", grads, torch.cat([reference.weight.grad, reference.bias.grad])),
                                        ("running_mean", bn.running_mean, reference.running_mean),
                                        ("running_var", bn.running_var, reference.running_var)]:
                assert _relative(got, expected) <= 1e-6, (where, name, _relative(got, expected))
            assert int(bn.num_batches_tracked) == int(reference.num_batches_tracked) == step + 1
            parts = [x[: ROWS[0]], x[ROWS[0]:]]
            mean, var, running_mean, running_var = _syncbn_formulas(parts, 0.1, *stats_before)
            dims = [0] + list(range(2, x.dim()))
            assert _relative(mean, x.mean(dims)) <= 1e-12 and _relative(var, x.var(dims, correction=0)) <= 1e-12
            assert _relative(running_mean, reference.running_mean) <= 1e-12, where
            assert _relative(running_var, reference.running_var) <= 1e-12, where
        bn.eval()  # evaluation: the running statistics, no collective
        x = torch.randn(shape, dtype=torch.float64)
        reference.eval()
        assert _relative(bn(x[mine]), reference(x[mine])) <= 1e-12

    # float32 parameters under bf16 autocast, channels-last: bf16 output in the input's layout, statistics in
    # float32 (the reference: float64 BatchNorm of the same bf16 values)
    reference = _reference_bn((8, 6, 5, 4), seed=7).float()
    bn = convert_sync_batchnorm(copy.deepcopy(reference))
    generator = torch.Generator().manual_seed(3)
    x = (3 + 2 * torch.randn(8, 6, 5, 4, generator=generator)).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn(x[mine].requires_grad_(True))
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    exact = copy.deepcopy(reference).double()
    y_exact = exact(x.double())
    assert _relative(y, y_exact[mine]) <= 1e-2  # the bf16 rounding of the output
    assert _relative(bn.running_mean, exact.running_mean) <= 1e-6 and _relative(bn.running_var, exact.running_var) <= 1e-6


def _recompute_worker(rank, world):
    """Activation checkpointing re-runs the forward all_reduce of every recomputed sync-BN layer (the same
    on every rank) and changes nothing else: gradients and running statistics equal those without it."""
    from wcl_fast import objectives
    from wcl_fast.config import parse_checkpointing
    from wcl_fast.model import build_model
    from wcl_fast.syncbn import SyncBatchNorm, convert_sync_batchnorm

    cfg = load_config(SMOKE, COMMON)
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(8, 3, 32, 32, generator=generator).contiguous(memory_format=torch.channels_last)
    results = {}
    for plan in ("none", "global:all"):
        torch.manual_seed(0)
        model = build_model(cfg.model, two_heads=objectives.two_heads(cfg),
                            checkpointing=parse_checkpointing(plan, cfg.model.arch))
        model = convert_sync_batchnorm(model).to(memory_format=torch.channels_last)
        layers = sum(isinstance(m, SyncBatchNorm) for m in model.modules())
        encoder_layers = sum(isinstance(m, SyncBatchNorm) for m in model.net.modules())

        class Collectives(TorchDispatchMode):
            count = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket.__name__ == "allreduce_":
                    Collectives.count += 1
                return func(*args, **(kwargs or {}))

        with Collectives():
            z, u, _, _ = model(x)
            (z[:, 0].sum() + (u * u[:1]).sum()).backward()
        recomputed = encoder_layers if plan != "none" else 0
        assert Collectives.count == 2 * layers + recomputed, (plan, Collectives.count, layers, encoder_layers)
        results[plan] = ({n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers()))
    for a, b in zip(results["none"], results["global:all"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rank


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_global_batchnorm_in_a_one_process_group(device):
    """The sync-BN's autograd function itself in a 1-process group (gloo on the CPU, nccl on CUDA, where it runs
    torch's fused BatchNorm kernels): float64 reference BatchNorm2d for outputs, input / weight / bias gradients
    and running statistics; fp16 channels-last input with float32 parameters (the autocast case)."""
    import copy

    import torch.distributed as dist
    from wcl_fast.syncbn import _GlobalBatchNorm

    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for dtype, tolerance in [(torch.float32, 1e-5), (torch.float16, 2e-3)]:
            reference = _reference_bn((8, 6, 5, 4), seed=11)
            generator = torch.Generator().manual_seed(12)
            x = (3 + 2 * torch.randn(8, 6, 5, 4, generator=generator, dtype=torch.float64)).to(dtype).double()
            dy = torch.randn(8, 6, 5, 4, generator=generator, dtype=torch.float64)
            bn = copy.deepcopy(reference).float().to(device)
            x_mine = x.to(device, dtype).contiguous(memory_format=torch.channels_last).requires_grad_(True)
            y = _GlobalBatchNorm.apply(x_mine, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, 0.1, None)
            y.backward(dy.to(device, dtype).contiguous(memory_format=torch.channels_last))
            x_ref = x.clone().requires_grad_(True)
            y_ref = reference(x_ref)
            y_ref.backward(dy)
            assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last), (dtype, y.dtype)
            for name, got, expected in [("output", y, y_ref), ("input gradient", x_mine.grad, x_ref.grad),
                                        ("weight gradient", bn.weight.grad, reference.weight.grad),
                                        ("bias gradient", bn.bias.grad, reference.bias.grad),
                                        ("running_mean", bn.running_mean, reference.running_mean),
                                        ("running_var", bn.running_var, reference.running_var)]:
                assert _relative(got.cpu(), expected) <= tolerance, (device, dtype, name, _relative(got.cpu(), expected))
    finally:
        dist.destroy_process_group()


def _syncbn_checks(rank, world):
    _syncbn_worker(rank, world)
    _recompute_worker(rank, world)


def test_sync_batchnorm_equals_batchnorm_on_the_global_batch():
    """2 gloo processes with 3 and 5 rows: outputs, input gradients, the summed weight / bias gradients and
    the running statistics of wcl_fast.syncbn.SyncBatchNorm equal those of one float64 BatchNorm (2d,
    channels-last, 1d) on the concatenated 8 rows within 1e-6 relative, over two steps; the reference's
    statistics equal torch.nn.SyncBatchNorm's formulas (per-rank statistics combined with their counts);
    bf16 autocast keeps float32 statistics; activation checkpointing only adds the recomputed layers'
    forward all_reduce."""
    run_distributed(_syncbn_checks, 2)


# ---- fp16: the GradScaler's inf check folded into LARS's device-side guard ----

class _SmallObjective:
    """The objective interface of train_step on a small CNN with BatchNorm; the loss is inf at `inf_at`."""

    def __init__(self, model, inf_at):
        self.model, self.inf_at = model, inf_at

    def guarded_buffers(self):
        return list(self.model.buffers())

    def losses(self, ddp, batch, step, total_steps, autocast):
        with autocast():
            loss = ddp(batch).float().square().mean()
        if step in self.inf_at:
            loss = loss + float("inf") * sum(p.sum() for p in self.model.parameters())
        return {"loss": loss}

    def after_step(self, ok):
        pass


def _scaler_step_reference(objective, model, batch, step, total_steps, autocast, optimizer, scaler):
    """The step through torch's GradScaler.step (its .item() on found_inf decides whether LARS runs)."""
    from wcl_fast import objectives

    guard = optimizer.skip_nonfinite
    buffers = objectives.BufferGuard(objective.guarded_buffers()) if guard else None
    terms = objective.losses(model, batch, step, total_steps, autocast)
    optimizer.zero_grad(set_to_none=True)
    if guard:
        optimizer.last_step_ok = None
        optimizer.precondition = buffers.all_finite()
    scaler.scale(terms["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    ok = None
    if guard:
        ok = optimizer.last_step_ok if optimizer.last_step_ok is not None else torch.zeros((), dtype=torch.bool)
        buffers.restore_unless(ok)
    return terms, ok


@pytest.mark.parametrize("guard", [True, False], ids=["nan-guard", "no-guard"])
def test_fp16_step_equals_gradscaler_step(guard):
    """train_step's fp16 path (unscale_, LARS with the inf flag as its precondition, update) against torch's
    GradScaler.step path on the same inputs: 10 steps with an injected inf at step 6 and the scale's own
    overflows (init_scale 2^19, growth_interval 2): parameters, momentum, BatchNorm statistics, the scale and its growth tracker
    equal after every step, and the skipped steps are the same (counted as skipped with the NaN guard)."""
    import copy

    from wcl_fast import objectives
    from wcl_fast.optim import build_optimizer
    from wcl_fast.train import train_step

    cfg = load_config(SMOKE, [])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    runs = []
    for path in (train_step, _scaler_step_reference):
        net = copy.deepcopy(model)
        optimizer = build_optimizer(net, cfg.optim, skip_nonfinite=guard)
        for group in optimizer.param_groups:
            group["lr"] = 0.5
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 19, growth_interval=2)
        objective = _SmallObjective(net, inf_at={6})
        autocast = objectives.autocast_factory(torch.device("cpu"), torch.float16)
        generator = torch.Generator().manual_seed(5)
        record = []
        for step in range(10):
            batch = 10 * torch.randn(4, 3, 8, 8, generator=generator)
            _, ok = path(objective, net, batch, step, 100, autocast, optimizer, scaler)
            record.append({"ok": None if ok is None else bool(ok), "scale": scaler.get_scale(),
                           "growth": int(scaler._growth_tracker),
                           "state": {k: v.clone() for k, v in net.state_dict().items()},
                           # a step skipped before the first taken one: LARS has zero momentum, GradScaler.step none
                           "momentum": [optimizer.state[p]["momentum_buffer"].clone() if "momentum_buffer" in
                                        optimizer.state[p] else torch.zeros_like(p) for p in net.parameters()]})
        runs.append(record)
    mine, reference = runs
    scales = [2.0 ** 19] + [r["scale"] for r in reference]
    skipped = [step for step in range(10) if scales[step + 1] < scales[step]]  # GradScaler halves on inf
    assert 6 in skipped and len(skipped) >= 3, scales  # the injected inf and the scale's own overflows
    assert any(scales[step + 1] > scales[step] for step in range(10)), scales  # and growth between them
    for step, (a, b) in enumerate(zip(mine, reference)):
        assert (a["ok"], a["scale"], a["growth"]) == (b["ok"], b["scale"], b["growth"]), step
        assert a["state"].keys() == b["state"].keys() and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"]), step
        assert all(torch.equal(x, y) for x, y in zip(a["momentum"], b["momentum"])), step
    if guard:
        assert [r["ok"] for r in mine] == [step not in skipped for step in range(10)]
