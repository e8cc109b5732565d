"""The objective interface the trainer uses, the registry of methods, and what the trainer hands them.

    objective = build_objective(cfg, model, ctx, TrainingSet(...))   # model: the unwrapped online model
    objective.on_epoch_start(epoch, start_step)                       # e.g. re-clustering
    terms = objective.losses(ddp, batch, global_step, total_steps, autocast)  # {'loss': total, ...}
    objective.after_step(ok)                                          # EMA update, enqueue (not on a skipped step)
    objective.observe(batch)                                          # device-side diagnostics of the step
    objective.interval_values()                                       # own counters for the log (sync point)
    objective.state_dict() / load_state_dict(state)                   # checkpointed with the model
The step itself (losses, backward, optimizer, after_step, observe) is wcl_fast.train.train_step. A method is one
module of this package: its pure loss functions and its Objective subclass, registered with
@register("name"); `loss.objective` picks it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from wcl_fast import dist as wdist
from wcl_fast.config import Config, ConfigError
from wcl_fast.runtime import autocast

OBJECTIVES: dict[str, type] = {}


def register(name: str):
    """Class decorator: the Objective subclass of `loss.objective: name`."""
    def add(cls):
        cls.name = name
        OBJECTIVES[name] = cls
        return cls
    return add


@dataclass
class TrainingSet:
    """What an objective may know of the training data, handed over by the trainer (objectives import
    neither loaders nor evaluation code).
    num_samples: sample ids are 0 .. num_samples - 1.
    paths(): the sample paths in id order, or None (a .beton or an array dataset): cluster CSVs keyed by path.
    embed(model) -> (head-1 embeddings [M, D] fp32, their sample ids [M], on every rank): the whole
        training set under the evaluation transform (K-means Cl-InfoNCE); unreadable images are left out."""

    num_samples: int
    paths: Callable[[], list[str] | None] = lambda: None
    embed: Callable | None = None


class BufferGuard:
    """Snapshot of a list of tensors (one concatenation per dtype) that `restore_unless(ok)` puts back
    when the device flag `ok` is False -- without a host sync (torch.where + one fused copy)."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.groups = {}
        for t in tensors:
            self.groups.setdefault((t.dtype, t.device), []).append(t)
        self.saved = {key: torch.cat([t.reshape(-1) for t in group]) for key, group in self.groups.items()}

    @torch.no_grad()
    def all_finite(self) -> torch.Tensor | None:
        """Device bool: every floating-point tensor of the list is finite now (None for an empty list)."""
        flags = [torch.isfinite(torch.cat([t.reshape(-1) for t in group])).all()
                 for (dtype, _), group in self.groups.items() if dtype.is_floating_point]
        return torch.stack(flags).all() if flags else None

    @torch.no_grad()
    def restore_unless(self, ok: torch.Tensor) -> None:
        for key, group in self.groups.items():
            now = torch.cat([t.reshape(-1) for t in group])
            chosen = torch.where(ok, now, self.saved[key]).split([t.numel() for t in group])
            torch._foreach_copy_(group, [c.view(t.shape) for c, t in zip(chosen, group)])


class Objective:
    """The trainer's view of a method: `losses` (the forward pass and the loss terms), the state it
    keeps between steps (`after_step`, `state_dict`), its epoch hook and its log counters."""

    name = ""  # set by @register
    term_names: tuple[str, ...] = ("loss",)  # the logged terms, 'loss' (the total) first

    @classmethod
    def uses_head2(cls, cfg: Config) -> bool:
        """Whether the model needs head 2 (phi)."""
        return False

    def __init__(self, cfg: Config, model: torch.nn.Module, ctx: wdist.DistContext, data: TrainingSet):
        self.cfg, self.model, self.ctx, self.data = cfg, model, ctx, data
        self.num_samples = data.num_samples
        self.flags: dict = {}  # device-side counters read at log intervals (knn: unconverged labellings)
        self.graph: dict = {}  # the last step's weak-label graph, where the method has one (wcl: 'labels', 'nn')
        self.diagnostics = None  # wcl_fast.diagnostics.Diagnostics, set by build_objective (train.diagnostics)

    def on_epoch_start(self, epoch: int, start_step: int) -> None:
        pass

    def losses(self, ddp, batch, step: int, total_steps: int, autocast) -> dict:
        raise NotImplementedError

    def after_step(self, ok: torch.Tensor | None = None) -> None:
        """State updates after the optimizer step; `ok` False (device bool): the step was skipped, leave
        the state as it was."""

    def observe(self, batch) -> None:
        """After the step: its weak-label graph, embeddings and the batch's class labels into the device-side
        diagnostics (docs/diagnostics.md); labels are read there only, never by the loss. No host read."""
        if self.diagnostics is not None:
            self.diagnostics.observe(batch, self.graph)

    def interval_values(self) -> dict:
        """The objective's own counters for the log record of an interval, reset for the next one
        (# sync point; read at log steps only). knn rule: labellings that did not converge."""
        if "unconverged" not in self.flags:
            return {}
        value = float(self.flags["unconverged"])  # sync point
        self.flags["unconverged"] = 0
        return {"knn_unconverged": value}

    def guarded_buffers(self) -> list[torch.Tensor]:
        """Tensors a forward pass changes outside the optimizer: BatchNorm running statistics."""
        return list(self.model.buffers())

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def _gather(self, *tensors):
        differentiable = self.cfg.loss.gather == "differentiable"
        return [wdist.gather_rows(t, differentiable) for t in tensors]


def objective_class(cfg: Config) -> type:
    import wcl_fast.objectives  # noqa: F401 (the method modules register themselves)

    if cfg.loss.objective not in OBJECTIVES:
        raise ConfigError(f"loss.objective: {cfg.loss.objective!r} is not one of {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[cfg.loss.objective]


def two_heads(cfg: Config) -> bool:
    """Whether the configured objective uses head 2 (phi)."""
    return objective_class(cfg).uses_head2(cfg)


def build_objective(cfg: Config, model: torch.nn.Module, ctx: wdist.DistContext, data: TrainingSet | int) -> Objective:
    """The objective of `loss.objective`; data: a TrainingSet, or just the number of samples."""
    data = TrainingSet(data) if isinstance(data, int) else data
    objective = objective_class(cfg)(cfg, model, ctx, data)
    if cfg.train.diagnostics:  # its forward hook goes on after the objective's own copies (an EMA key encoder)
        from wcl_fast.diagnostics import Diagnostics

        objective.diagnostics = Diagnostics(model, ctx.device)
    return objective


def autocast_factory(device: torch.device, dtype: torch.dtype | None):
    return lambda: autocast(device, dtype)
