"""LARS over SGD momentum, parameter groups and the learning-rate schedule (docs/wcl.md §4).

LARS (You et al., 2017, arXiv 1708.03888) as in the WCL reference: for every adapted parameter
    g <- grad + wd * w                          (weight decay first)
    g <- eta * ||w|| / (||g|| + eps) * g       (when ||w|| > 0 and ||g|| > 0; else unchanged)
then SGD with momentum:  m <- mu * m + g;  w <- w - lr * m.
Excluded parameters (BN / bias) get neither weight decay nor the trust ratio.
Implemented with multi-tensor `torch._foreach_*` ops: no per-parameter Python arithmetic on
tensors and no host synchronisation.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from wcl_fast.config import OptimConfig

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def excluded_parameter_names(model: nn.Module, rule: str) -> set[str]:
    """Names of parameters that get no weight decay and no LARS scaling.

    rule 'reference': the reference code's test `'bn' in name or 'bias' in name` (it misses the
    downsample BatchNorm weights, named `...downsample.1.weight`).
    rule 'norm_bias': every parameter of a normalisation layer, and every bias.
    """
    if rule == "reference":
        return {name for name, _ in model.named_parameters() if "bn" in name or "bias" in name}
    if rule == "norm_bias":
        names = set()
        for module_name, module in model.named_modules():
            for param_name, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{param_name}" if module_name else param_name
                if isinstance(module, _NORM_TYPES) or param_name == "bias":
                    names.add(full)
        return names
    raise ValueError(f"unknown exclude rule {rule!r}; use 'reference' or 'norm_bias'")


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two groups: adapted (weight decay + LARS) and excluded (plain SGD momentum)."""
    excluded = excluded_parameter_names(model, cfg.exclude_rule)
    adapted, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if name in excluded else adapted).append(param)
    return [
        {"params": adapted, "weight_decay": cfg.weight_decay, "lars": True, "name": "lars"},
        {"params": plain, "weight_decay": 0.0, "lars": False, "name": "no_decay"},
    ]


def scaled_gradients(group: dict, params: list, grads: list) -> list:
    """g <- grad + wd * w, then g <- eta ||w|| / (||g|| + eps) * g for LARS groups (multi-tensor)."""
    if group["weight_decay"] != 0:
        grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
    if group["lars"]:
        param_norms = torch.stack(torch._foreach_norm(params))  # [P]
        grad_norms = torch.stack(torch._foreach_norm(grads))  # [P]
        ratios = group["trust_coefficient"] * param_norms / (grad_norms + group["eps"])
        ratios = torch.where((param_norms > 0) & (grad_norms > 0), ratios, torch.ones_like(ratios))
        grads = torch._foreach_mul(grads, list(ratios.unbind()))
    return grads


def zero_nonfinite_(grads: list[torch.Tensor]) -> int:
    """NaN/inf -> 0 in place in every gradient; returns the number of kernels launched. Gradients that
    are views of one base tensor (DDP's gradient buckets with gradient_as_bucket_view=True) are cleaned
    with one call on the base (a few per step instead of one per parameter: the NaN guard runs every
    step). Finite values are untouched, so on a finite step this changes nothing; anything else the
    base holds (bucket padding) is not read by the update."""
    bases: dict[int, torch.Tensor] = {}
    for g in grads:
        base = g._base if g._base is not None else g
        bases.setdefault(id(base), base)
    for base in bases.values():
        base.nan_to_num_(0.0, 0.0, 0.0)
    return len(bases)


class LARS(torch.optim.Optimizer):
    """SGD momentum with layer-wise trust ratio on the weight-decayed gradient (see module docstring)."""

    def __init__(self, params, lr: float = 0.0, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 0.0, skip_nonfinite: bool = False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, lars=True,
                        trust_coefficient=trust_coefficient, eps=eps)
        super().__init__(params, defaults)
        # skip_nonfinite: a step whose gradients hold NaN/inf leaves parameters and momentum untouched,
        # decided on the device (no host sync); `last_step_ok` holds that decision as a bool tensor.
        self.skip_nonfinite = skip_nonfinite
        self.last_step_ok: torch.Tensor | None = None
        # optional device bool set by the caller before step(): False skips the step as non-finite
        # gradients do (the objective's check that the forward pass left finite BatchNorm statistics; the
        # fp16 GradScaler's inf check, see wcl_fast.train.train_step). Honoured with or without skip_nonfinite.
        self.precondition: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ok = None
        if self.skip_nonfinite or self.precondition is not None:
            all_grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            if all_grads:
                ok = self.precondition
                if self.skip_nonfinite:
                    finite = torch.isfinite(torch.stack(torch._foreach_norm(all_grads))).all()
                    ok = finite if ok is None else finite & ok
                zero_nonfinite_(all_grads)  # a skipped step then multiplies zeros, not NaN, by 0
            self.last_step_ok = ok
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            grads = scaled_gradients(group, params, grads)
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buffers.append(state["momentum_buffer"])
            if ok is None:
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, grads)
                torch._foreach_add_(params, buffers, alpha=-group["lr"])
            else:  # a skipped step: grads -> 0, momentum factor -> 1, lr -> 0
                keep = ok.to(params[0].dtype)
                grads = torch._foreach_mul(grads, keep)
                torch._foreach_mul_(buffers, torch.where(ok, group["momentum"], 1.0).to(params[0].dtype))
                torch._foreach_add_(buffers, grads)
                torch._foreach_add_(params, torch._foreach_mul(buffers, -group["lr"] * keep))
        return loss


class ApexLARS(LARS):
    """LARS whose momentum/parameter update runs in NVIDIA apex's FusedSGD (multi-tensor CUDA kernels).

    The weight decay and trust ratio are computed exactly as in `LARS` (foreach ops); the scaled
    gradients are then handed to FusedSGD(momentum=mu, dampening=0, nesterov=False, weight_decay=0),
    whose update m <- mu m + g, w <- w - lr m is the native one. With the NaN guard a skipped step
    is decided with one host read per step (FusedSGD cannot take a device-side flag).
    """

    def __init__(self, params, **kwargs):
        from apex.optimizers import FusedSGD

        super().__init__(params, **kwargs)
        self.fused = FusedSGD([{"params": g["params"], "lr": g["lr"]} for g in self.param_groups],
                              lr=0.0, momentum=self.defaults["momentum"], weight_decay=0.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        all_grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if (self.skip_nonfinite or self.precondition is not None) and all_grads:
            ok = self.precondition
            if self.skip_nonfinite:
                finite = torch.isfinite(torch.stack(torch._foreach_norm(all_grads))).all()
                ok = finite if ok is None else finite & ok
            self.last_step_ok = ok
            if not bool(ok):  # sync point (apex path only)
                return loss
        for group, fused_group in zip(self.param_groups, self.fused.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            grads = scaled_gradients(group, params, grads)
            for p, g in zip(params, grads):
                p.grad = g
            fused_group["lr"] = group["lr"]
        self.fused.step()
        return loss

    def state_dict(self):
        state = super().state_dict()
        state["fused"] = self.fused.state_dict()
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        fused = state_dict.pop("fused", None)
        super().load_state_dict(state_dict)
        if fused is not None:
            self.fused.load_state_dict(fused)


def apex_available() -> bool:
    try:
        import apex.optimizers  # noqa: F401
    except ImportError:
        return False
    return True


def build_optimizer(model: nn.Module, cfg: OptimConfig, skip_nonfinite: bool = False) -> LARS:
    kwargs = dict(lr=0.0, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient, eps=cfg.eps,
                  skip_nonfinite=skip_nonfinite)
    if cfg.impl == "apex":
        from wcl_fast.config import ConfigError

        if not apex_available():
            raise ConfigError("optim.impl=apex needs NVIDIA apex, which is not on the package index: build it with "
                              "'git clone https://github.com/NVIDIA/apex && cd apex && pip install -v --no-build-isolation "
                              "--config-settings \"--build-option=--cpp_ext\" --config-settings \"--build-option=--cuda_ext\" .', "
                              "or use optim.impl=native (same LARS semantics)")
        return ApexLARS(parameter_groups(model, cfg), **kwargs)
    return LARS(parameter_groups(model, cfg), **kwargs)


def base_learning_rate(cfg: OptimConfig, global_batch: int) -> float:
    """lr_scale * sqrt(global batch) (0.075 * sqrt(4096) = 4.8), unless base_lr is set."""
    return cfg.base_lr if cfg.base_lr is not None else cfg.lr_scale * math.sqrt(global_batch)


def learning_rate(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Per-iteration schedule: linear warmup from 0 over warmup_steps, then cosine to 0.

    lr(t) = base * t / W for t < W, else base * 0.5 * (1 + cos(pi * (t - W) / (T - W))).
    """
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))
