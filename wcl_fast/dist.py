"""Process-group set-up and the row gather used by the objectives.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them the run is a single process. The backend
is nccl on CUDA and gloo on CPU.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistContext:
    """Initialise the default process group from torchrun's environment (if present)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _attempt_store(rank, world_size)
        if store is not None:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend=backend)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _attempt_store(rank: int, world: int):
    """Under torchrun: the rendezvous store, prefixed by run id and restart attempt.

    After an elastic restart the workers of the new attempt can otherwise read the process-group
    addresses that the previous attempt's (dead) workers left in a reused store and wait on them
    (gloo connectFullMesh hangs or times out); a per-attempt prefix makes every attempt's keys new.
    """
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    from datetime import timedelta

    use_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not use_agent_store and rank == 0, timeout=timedelta(minutes=30))
    prefix = f"wcl_fast/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}"
    return dist.PrefixStore(prefix, store)


# (world, rank) of a simulated run: the memory planner traces one rank of a `world`-process step in this
# process on fake tensors (wcl_fast/memory.py); gathers then only produce the gathered shapes
_SIMULATED: tuple[int, int] | None = None


@contextlib.contextmanager
def simulated(world: int, rank: int = 0):
    """Inside: world_size() / rank() report (world, rank) and gather_rows concatenates `x` with
    uninitialised blocks for the other ranks -- the shapes and memory of a `world`-process step, not its
    values. For tracing on fake tensors only (wcl_fast.memory); never inside a real process group."""
    global _SIMULATED
    previous, _SIMULATED = _SIMULATED, (world, rank)
    try:
        yield
    finally:
        _SIMULATED = previous


def world_size() -> int:
    if _SIMULATED is not None:
        return _SIMULATED[0]
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    if _SIMULATED is not None:
        return _SIMULATED[1]
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_rows(x: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
    """Concatenate every rank's rows in rank order: [b, ...] -> [world * b, ...].

    differentiable=False (WCL reference semantics): other ranks' rows are detached and this rank's
    block is `x` itself, so only local rows carry gradient. differentiable=True: gradients flow
    back to the owning rank (summed over all ranks' losses), giving the full-batch gradient.
    """
    world = world_size()
    if world == 1:
        return x
    if _SIMULATED is not None:  # shapes only (wcl_fast.memory)
        return torch.cat([x if r == rank() else torch.empty_like(x) for r in range(world)], dim=0)
    if differentiable:
        return _GatherRows.apply(x)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank()] = x
    return torch.cat(parts, dim=0)


class _GatherRows(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's block (all_reduce + slice)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = rank() * ctx.rows
        return grad[start:start + ctx.rows]


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (identity on one process)."""
    if world_size() == 1 or _SIMULATED is not None:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, optimizer, model_cfg, ctx: DistContext):
    """Put the model (channels-last unless model.channels_last is off) and the optimizer's state on this
    rank's device, compile the encoder (model.compile), swap every BatchNorm for wcl_fast.syncbn's
    SyncBatchNorm when distributed (model.sync_bn; statistics of the global batch without host reads, on
    CUDA and on the CPU) and wrap in DDP. Returns (model, ddp): the module whose state is checkpointed, and
    the one the step calls (the same module on one process)."""
    from wcl_fast.runtime import memory_format

    model.to(ctx.device, memory_format=memory_format(model_cfg.channels_last))
    for buffers in optimizer.state.values():  # optimizer state follows the parameters' device
        for key, value in buffers.items():
            if torch.is_tensor(value):
                buffers[key] = value.to(ctx.device)
    if model_cfg.compile:  # compiles on the first step (minutes for ResNet-50); checkpoints keep eager key names
        model.net.compile(mode=model_cfg.compile)
    if ctx.distributed and model_cfg.sync_bn:
        from wcl_fast.syncbn import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)  # the same Parameter and buffer objects
    ddp = model
    if ctx.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, gradient_as_bucket_view=True)
    return model, ddp


def gather_names(name: str) -> list[str]:
    """Every rank's `name`, in rank order (a collective)."""
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, name)
    return names


def replica_divergence(model: torch.nn.Module) -> float:
    """Largest difference between ranks of per-parameter checksums (0.0 when replicas are in sync)."""
    if world_size() == 1:
        return 0.0
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()])  # [P]
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return float((high - low).abs().max().item())  # sync point (once per epoch)
