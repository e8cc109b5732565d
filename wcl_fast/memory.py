"""What one training step holds in device memory, measured by tracing the trainer's own step
(docs/memory.md).

The step runs on fake tensors (torch._subclasses.FakeTensorMode: shapes, dtypes, strides and storages,
no data, no kernels) for rank 0 of a `world`-process run (wcl_fast.dist.simulated: gathers produce the
gathered shapes), with the real model, objective, autocast and LARS (wcl_fast.train.train_step):

- saved activations: saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks) during the forward
  pass and the loss; every storage counted once and attributed to the resolution and ResNet segment
  that saved it first (stem, layerN.K, pool, heads, loss); parameters, the batch and autocast's
  low-precision weight copies are told apart from activations;
- the step's peak: every storage an operator creates is counted while it lives (a TorchDispatchMode and
  weak references to the storages), over two steps so gradients and the optimizer state exist, as in
  every step after the first;
- FLOPs: torch.utils.flop_counter's formulas (FlopCounterMode's) over the same trace, per segment for
  the forward.

Tracing runs on the CPU's dispatch path with the target's autocast dtype: the saved bytes of the
ResNet and the heads are the same under CPU and CUDA autocast (checked in tests/test_memory.py on fake
CUDA tensors), the torch 1-NN path bounds the fused Triton kernel's memory from above (its similarity
tiles), BatchNorm stands for SyncBatchNorm (the same saved tensors per image) and, with more than one
process, gradients are allocated once and kept, as DDP's bucket views (gradient_as_bucket_view) are.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from wcl_fast.config import Config

GiB = float(1 << 30)
MiB = float(1 << 20)
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def stage_of(segment: str) -> str:
    """'layer2.3' -> 'layer2'; 'stem' -> 'stem'."""
    return segment.split(".")[0]


def _fakeify(module: nn.Module, device: torch.device) -> None:
    """Replace every parameter and buffer of a meta-device module by a fake tensor on `device` with the
    same shape, dtype and strides (called inside the FakeTensorMode)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                fake = torch.empty_strided(param.shape, param.stride(), dtype=param.dtype, device=device)
                sub._parameters[name] = nn.Parameter(fake, requires_grad=param.requires_grad)
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                sub._buffers[name] = torch.empty_strided(buf.shape, buf.stride(), dtype=buf.dtype, device=device)


class LiveStorages(TorchDispatchMode):
    """Counts the bytes of every storage that an operator creates, from its creation until it is freed
    (weak references), and the high-water mark; `add` counts tensors made before the mode (parameters,
    the batch). The phase of the step at the peak: setup, forward, loss, backward, optimizer.

    With count_flops, also the FLOPs of every operator by torch.utils.flop_counter's formulas (what
    FlopCounterMode counts; that mode itself is not used here: its module tracker keeps the tensors
    that activation checkpointing recomputes alive until the autograd graph is freed)."""

    def __init__(self, count_flops: bool = False):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.flop_registry = flop_registry if count_flops else {}
        self.flops = 0
        self.live = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0
        self.peak_phase = "setup"
        self.phase = "setup"

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self.live:
            return
        nbytes = storage.nbytes()
        self.live[storage] = nbytes
        self.current += nbytes
        weakref.finalize(storage, self._free, nbytes)
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self.current_phase()

    def current_phase(self) -> str:
        return "backward" if torch._C._current_graph_task_id() != -1 else self.phase

    def reset_peak(self) -> None:
        self.peak, self.peak_phase = self.current, self.current_phase()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.flop_registry.get(func.overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.add(leaf)
        return out


@dataclass
class StepTrace:
    """One rank's memory and FLOPs of a training step (bytes; FLOPs as torch's FlopCounterMode counts
    them: 2 per multiply-add)."""

    batch_per_gpu: int
    crops: dict  # resolution -> (images through the encoder per GPU and step, pixels per side)
    peak: int  # high-water mark of live storages over the step (what torch.cuda.max_memory_allocated counts)
    peak_phase: str
    parameters: int
    gradients: int
    optimizer_state: int
    buffers: int  # BatchNorm running statistics
    objective_state: int  # EMA key encoder, key queue, cluster table
    batch: int  # the step's crops on the device
    weight_copies: int  # autocast's low-precision copies of conv / linear weights, kept until backward
    activations: dict  # (resolution, segment) -> saved bytes, segments stem, layerN.K, pool, heads
    loss_saved: int  # tensors the loss saves for backward (logits, masks, the graph's labels)
    loss_transient: int  # the loss's peak above what it keeps (similarity tiles, the graph's rounds)
    step_flops: float  # forward + loss + backward + optimizer of one step
    forward_flops: dict  # (resolution, segment) -> forward FLOPs
    # storage-level detail for planning checkpointing without another trace: storage id -> bytes, the
    # segments that saved each storage, and each segment's input storage
    storage_bytes: dict = field(default_factory=dict, repr=False)
    storage_savers: dict = field(default_factory=dict, repr=False)
    segment_inputs: dict = field(default_factory=dict, repr=False)

    @property
    def activation_total(self) -> int:
        return sum(self.activations.values())

    def stage_table(self) -> dict:
        """resolution -> stage -> saved bytes (segments summed per ResNet stage; 'heads' kept)."""
        table: dict = {}
        for (resolution, segment), nbytes in self.activations.items():
            row = table.setdefault(resolution, {})
            key = stage_of(segment) if segment != "pool" else "layer4"
            row[key] = row.get(key, 0) + nbytes
        return table


def _segment_names(net) -> list[tuple[str, nn.Module]]:
    names = []
    for i in range(1, 5):
        for k, block in enumerate(getattr(net, f"layer{i}")):
            names.append((f"layer{i}.{k}", block))
    return names


class _Records:
    """Storages seen by the trace, numbered on first sight (weak keys: the trace must not keep a
    storage alive), with their bytes, kind (param, batch, copy, activation) and the segments that saved them."""

    def __init__(self):
        self.ids = WeakIdKeyDictionary()
        self.info: list[dict] = []
        self.params = WeakIdKeyDictionary()
        self.batch = WeakIdKeyDictionary()
        self.copies = WeakIdKeyDictionary()

    def record(self, tensor: torch.Tensor) -> int:
        storage = tensor.untyped_storage()
        index = self.ids.get(storage)
        if index is None:
            kind = ("param" if storage in self.params else "batch" if storage in self.batch
                    else "copy" if storage in self.copies else "activation")
            index = len(self.info)
            self.ids[storage] = index
            self.info.append({"bytes": storage.nbytes(), "kind": kind, "first": None, "savers": set()})
        return index


class _Attribution:
    """Forward hooks that name the resolution and segment running now, record each segment's forward
    FLOPs (from the LiveStorages' running count) and its input storage."""

    def __init__(self, model, cfg: Config, flop_counter, records: _Records):
        self.model, self.cfg, self.counter, self.records = model, cfg, flop_counter, records
        self.resolution, self.segment = None, None
        self.active = False
        self.flops: dict = {}
        self.images: dict = {}  # resolution -> images through the encoder (all passes)
        self.inputs: dict = {}  # (resolution, segment) -> storage record index
        self._mark = 0.0
        self.handles = []
        net = model.net
        # conv1 starts every encoder pass, checkpointed or not (model.net itself is bypassed by a plan)
        self.handles.append(net.conv1.register_forward_pre_hook(self._net_start))
        for name, block in _segment_names(net):
            self.handles.append(block.register_forward_pre_hook(lambda m, a, name=name: self._enter(name, a)))
        self.handles.append(net.avgpool.register_forward_pre_hook(lambda m, a: self._enter("pool", a)))
        for head in (model.head1, model.head2):
            if head is not None:
                self.handles.append(head.register_forward_pre_hook(lambda m, a: self._enter("heads", a)))
        self.handles.append(model.register_forward_hook(lambda m, a, o: self._enter("loss", None)))

    def _net_start(self, module, args):
        side = args[0].shape[-1]
        self._enter(None, None)
        self.resolution = "local" if side == self.cfg.data.local_size and side != self.cfg.data.global_size else "global"
        if self.active:
            self.images[self.resolution] = self.images.get(self.resolution, 0) + args[0].shape[0]
        self._enter("stem", args)

    def key(self) -> tuple[str, str]:
        segment = self.segment or "loss"
        if segment in ("heads", "loss"):
            return (segment, segment)
        return (self.resolution or "global", segment)

    def _enter(self, segment, args):
        if not self.active:
            return
        now = float(self.counter.flops)
        if self.segment is not None:
            key = self.key()
            self.flops[key] = self.flops.get(key, 0.0) + now - self._mark
        self._mark = now
        self.segment = segment
        if segment is not None and segment not in ("heads", "loss", "pool") and args:
            self.inputs.setdefault(self.key(), self.records.record(args[0]))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _fake_deepcopy(plain_deepcopy):
    """copy.deepcopy for modules of fake tensors: Tensor.__deepcopy__ would give the copies a fake mode
    of their own (torch cannot mix them), so parameters and buffers are cloned in the current mode first
    (the EMA key encoder of wcl_fast/objectives/momentum.py is such a copy)."""

    def deepcopy(obj, memo=None, *args):
        memo = {} if memo is None else memo
        if isinstance(obj, nn.Module):
            for t in [*obj.parameters(), *obj.buffers()]:
                if id(t) not in memo:
                    clone = t.detach().clone()
                    memo[id(t)] = nn.Parameter(clone, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else clone
        return plain_deepcopy(obj, memo, *args)

    return deepcopy


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def trace_step(cfg: Config, world: int, checkpointing: dict | None = None, fake: bool = True) -> StepTrace:
    """See _trace_step; the caller's random number generators are left as they were."""
    with torch.random.fork_rng(devices=[]):
        return _trace_step(cfg, world, checkpointing, fake)


def _trace_step(cfg: Config, world: int, checkpointing: dict | None = None, fake: bool = True) -> StepTrace:
    """Trace two training steps of `cfg` for one rank of `world` processes (per-rank batch
    data.batch_size / world) on fake tensors; `checkpointing`: a parsed model.activation_checkpointing
    plan (None = none). fake=False runs the same steps on real CPU tensors (small configs: the same
    accounting over real storages). Returns the second step's StepTrace."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pipelines.batch import MultiCropBatch
    from wcl_fast import dist as wdist
    from wcl_fast import objectives
    from wcl_fast.model import build_model
    from wcl_fast.optim import build_optimizer
    from wcl_fast.runtime import autocast_dtype, memory_format
    from wcl_fast.train import train_step

    if cfg.data.batch_size % world:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by {world} GPUs")
    b = cfg.data.batch_size // world
    cfg = copy.deepcopy(cfg)
    cfg.model.compile = ""
    cfg.loss.similarity_backend = "torch"  # the traced path: see the module docstring
    device = torch.device("cpu")
    fmt = memory_format(cfg.model.channels_last)
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta") if fake else contextlib.nullcontext():
        model = build_model(cfg.model, two_heads=objectives.two_heads(cfg), checkpointing=checkpointing or {})
    model = model.to(memory_format=fmt)
    autocast = objectives.autocast_factory(device, autocast_dtype(cfg.train.precision))
    ctx = wdist.DistContext(rank=0, world_size=world, device=device)
    num_samples = max(cfg.data.batch_size, cfg.loss.clinfonce.kmeans_k if cfg.loss.objective == "clinfonce" else 0)
    tracker, records = LiveStorages(count_flops=True), _Records()

    # the tracker counts from the first fake parameter on, so whatever the objective keeps (EMA encoder,
    # queue, cluster table) is live at the measured step's start
    with FakeTensorMode() if fake else contextlib.nullcontext(), wdist.simulated(world, 0), tracker:
        if fake:
            _fakeify(model, device)
        optimizer = build_optimizer(model, cfg.optim, skip_nonfinite=cfg.train.max_bad_steps > 0)
        with _patched(copy, "deepcopy", _fake_deepcopy(copy.deepcopy)) if fake else contextlib.nullcontext():
            objective = objectives.build_objective(cfg, model, ctx, num_samples)
        if cfg.loss.objective == "clinfonce" and getattr(objective, "table", None) is None:
            objective.table = torch.zeros(num_samples, dtype=torch.int64)  # a cluster table as K-means leaves it
        # on a GPU the fast loaders hand over the crops in the autocast dtype (pipelines.build_loader)
        fast = fake and cfg.data.backend in ("auto", "dali", "ffcv")
        crop_dtype = (autocast_dtype(cfg.train.precision) or torch.float32) if fast else torch.float32
        globals_ = torch.randn(2 * b, 3, cfg.data.global_size, cfg.data.global_size,
                               dtype=crop_dtype).contiguous(memory_format=fmt)
        locals_ = None
        if cfg.data.local_crops:
            locals_ = torch.randn(cfg.data.local_crops * b, 3, cfg.data.local_size, cfg.data.local_size,
                                  dtype=crop_dtype).contiguous(memory_format=fmt)
        crops = [t for t in (globals_, locals_) if t is not None]
        batch = MultiCropBatch(globals_, locals_, torch.arange(b), torch.zeros(b, dtype=torch.int64))
        for p in model.parameters():
            records.params[p.untyped_storage()] = True
        for t in crops:
            records.batch[t.untyped_storage()] = True

        if world > 1:  # DDP's gradient buckets (gradient_as_bucket_view): allocated once, zeroed, never freed
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)

            def zero_grad(set_to_none=True):
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.zero_()
        else:
            zero_grad = optimizer.zero_grad
        plain_step = optimizer.step

        def step(*args, **kwargs):
            tracker.phase = "optimizer"
            return plain_step(*args, **kwargs)

        attribution = _Attribution(model, cfg, tracker, records)

        class CopyWatch(TorchDispatchMode):  # autocast's low-precision copies of parameters
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.Tensor) \
                        and args[0].untyped_storage() in records.params:
                    records.copies[out.untyped_storage()] = True
                return out

        def pack(tensor):
            if attribution.active:
                entry = records.info[records.record(tensor)]
                key = attribution.key()
                if entry["first"] is None:
                    entry["first"] = key
                entry["savers"].add(key)
            return tensor

        handles = [model.register_forward_pre_hook(lambda m, a: setattr(tracker, "phase", "forward")),
                   model.register_forward_hook(lambda m, a, o: setattr(tracker, "phase", "loss"))]
        loss_marks: dict = {}
        plain_backward = torch.Tensor.backward

        def backward(tensor, *args, **kwargs):  # the loss phase ends where backward starts
            attribution.active = False
            loss_marks.setdefault("kept", tracker.current)
            loss_marks.setdefault("peak", tracker.peak)
            return plain_backward(tensor, *args, **kwargs)

        measured: dict = {}
        with _patched(optimizer, "zero_grad", zero_grad), _patched(optimizer, "step", step), \
                _patched(torch.Tensor, "backward", backward):
            for index in range(2):
                with contextlib.ExitStack() as stack:
                    if index == 1:  # the measured step: everything that lives across steps counted first
                        persistent = [*model.parameters(), *model.buffers(), *crops,
                                      *(p.grad for p in model.parameters() if p.grad is not None),
                                      *(v for s_ in optimizer.state.values() for v in s_.values() if torch.is_tensor(v))]
                        for t in persistent:
                            tracker.add(t)
                        tracker.phase = "setup"
                        tracker.reset_peak()
                        measured["start"] = tracker.current
                        tracker.flops = 0
                        stack.enter_context(CopyWatch())
                        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
                        attribution.active = True
                        loss_marks.clear()
                    train_step(objective, model, batch, index, 10_000, autocast, optimizer, None)
                    attribution.active = False
        for handle in handles:
            handle.remove()
        attribution.remove()

        def nbytes(tensors):
            return sum(t.untyped_storage().nbytes() for t in tensors)

        params = nbytes(model.parameters())
        grads = nbytes(p.grad for p in model.parameters() if p.grad is not None)
        opt_state = nbytes(v for s_ in optimizer.state.values() for v in s_.values() if torch.is_tensor(v))
        buffers = nbytes(model.buffers())
        batch_bytes = nbytes(crops)

    activations: dict = {}
    storage_bytes, storage_savers = {}, {}
    copies = loss_saved = 0
    for index, entry in enumerate(records.info):
        if entry["first"] is None or entry["kind"] in ("param", "batch"):
            continue
        if entry["kind"] == "copy":
            copies += entry["bytes"]
        elif entry["first"][0] == "loss":
            loss_saved += entry["bytes"]
        else:
            activations[entry["first"]] = activations.get(entry["first"], 0) + entry["bytes"]
            storage_bytes[index] = entry["bytes"]
            storage_savers[index] = entry["savers"]
    segment_inputs = {key: (index, records.info[index]["bytes"] if records.info[index]["kind"] == "activation" else 0)
                      for key, index in attribution.inputs.items()}
    sides = {"global": cfg.data.global_size, "local": cfg.data.local_size}
    crop_counts = {res: (count, sides[res]) for res, count in attribution.images.items()}  # e.g. SLR's mixed queries too
    return StepTrace(
        batch_per_gpu=b, crops=crop_counts, peak=tracker.peak, peak_phase=tracker.peak_phase, parameters=params,
        gradients=grads, optimizer_state=opt_state, buffers=buffers,
        objective_state=max(0, measured["start"] - params - grads - opt_state - buffers - batch_bytes),
        batch=batch_bytes, weight_copies=copies, activations=activations, loss_saved=loss_saved,
        loss_transient=max(0, loss_marks.get("peak", 0) - loss_marks.get("kept", 0)),
        step_flops=float(tracker.flops), forward_flops=dict(attribution.flops),
        storage_bytes=storage_bytes, storage_savers=storage_savers, segment_inputs=segment_inputs)
