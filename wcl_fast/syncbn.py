"""BatchNorm over the global batch of a process group, on any backend (gloo on the CPU, nccl on CUDA),
without host reads (docs/implementation.md, "No host reads in the step").

Training mode under an initialised process group of more than one process: the statistics are those of
the concatenated batch of every rank (Ioffe & Szegedy 2015, arXiv 1502.03167, Alg. 1 over the global
mini-batch), the semantics of torch.nn.SyncBatchNorm. Per channel, with N the global count of values:
    forward:  one all_reduce of [sum x, sum x^2, count] (float64, 2C + 1 numbers)
              mean = sum x / N,  var = sum x^2 / N - mean^2 (biased: normalisation)
              y = (x - mean) / sqrt(var + eps) * weight + bias
              running_mean <- (1 - m) running_mean + m mean
              running_var  <- (1 - m) running_var + m var N / (N - 1)   (unbiased)
              m = momentum (None: 1 / num_batches_tracked, the cumulative average)
    backward: one all_reduce of [sum dy, sum dy (x - mean)] (2C numbers; that is sum dy x_hat up to the
              factor 1 / sqrt(var + eps), the same on every rank), x_hat = (x - mean) / sqrt(var + eps)
              dx = weight / sqrt(var + eps) (dy - sum dy / N - x_hat sum(dy x_hat) / N)
              dweight = sum dy x_hat, dbias = sum dy over this rank's rows (DDP averages them over
              ranks like every other parameter gradient, as for torch.nn.SyncBatchNorm)
so outputs, input gradients and running statistics equal those of one BatchNorm on the concatenated
batch. torch.nn.SyncBatchNorm computes the same from all-gathered per-rank (mean, invstd, count), but
drops ranks without rows through a boolean mask (a host read in every layer) and runs on CUDA only.
The local statistics are float32 (float64 for float64 inputs) whatever the autocast dtype: on CUDA from
the fused kernels torch.nn.SyncBatchNorm uses (batch_norm_stats / _elemt / _backward_reduce /
_backward_elemt, which write no float32 copy of the activations), elsewhere from torch.var_mean and plain
ops. The output and the input gradient have the input's dtype and memory format (channels-last kept).
Evaluation mode, or no process group of more than one process: plain BatchNorm (F.batch_norm).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


def _world(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fused(x: torch.Tensor) -> bool:
    """CUDA: torch's fused BatchNorm-statistics kernels (those torch.nn.SyncBatchNorm runs); elsewhere the
    same formulas in plain ops."""
    return x.is_cuda


def _layout(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """(the reduced dimensions, the view of a per-channel [C] vector) of an [N, C, ...] input."""
    return [0] + list(range(2, x.dim())), [1, -1] + [1] * (x.dim() - 2)


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous(memory_format=torch.channels_last) or t.is_contiguous() else t.contiguous()


class _GlobalBatchNorm(torch.autograd.Function):
    """y = BatchNorm(x) with the statistics of every rank's rows (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        x = _dense(x)
        dtype, channels = _stats_dtype(x), x.shape[1]
        dims, shape = _layout(x)
        count = x.numel() // channels if channels else 0
        with torch.autocast(x.device.type, enabled=False):
            if count == 0:  # no rows here: nothing to add, but the collective still runs
                mean = var = torch.zeros(channels, dtype=dtype, device=x.device)
            elif _fused(x):
                mean, invstd = torch.batch_norm_stats(x, 0.0)  # Welford; invstd = 1 / sqrt(biased variance)
                var = invstd.double().pow(-2)
            else:
                var, mean = torch.var_mean(x.to(dtype), dims, correction=0)
            mean, var = mean.double(), var.double()
            packed = torch.cat([mean * count, (var + mean * mean) * count, mean.new_full((1,), float(count))])
            dist.all_reduce(packed, group=group)  # [sum x, sum x^2, count] of the global batch
            total = packed[-1:]
            mean = packed[:channels] / total
            var = (packed[channels:-1] / total - mean * mean).clamp_min(0.0)  # biased
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype) * momentum)
                running_var.mul_(1 - momentum).add_((var * total / (total - 1)).to(running_var.dtype) * momentum)
            mean, invstd = mean.to(dtype), torch.rsqrt(var.to(dtype) + eps)
            if count == 0:
                y = torch.empty_like(x)
            elif _fused(x):
                y = torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
            else:
                scale = invstd if weight is None else invstd * weight.to(dtype)
                y = (x.to(dtype) - mean.view(shape)) * scale.view(shape)
                if bias is not None:
                    y = y.add_(bias.to(dtype).view(shape))
                y = y.to(x.dtype)
        ctx.save_for_backward(x, weight, mean, invstd, total)
        ctx.group = group
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, total = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        need_weight = ctx.needs_input_grad[1] and weight is not None
        need_bias = ctx.needs_input_grad[2]
        dx = dweight = dbias = None
        dy = _dense(dy)
        dims, shape = _layout(x)
        with torch.autocast(x.device.type, enabled=False):
            if x.numel() == 0:
                sum_dy = sum_dy_xmu = torch.zeros(x.shape[1], dtype=mean.dtype, device=x.device)
            elif _fused(x):
                sum_dy, sum_dy_xmu, dweight, dbias = torch.batch_norm_backward_reduce(
                    dy, x, mean, invstd, weight, need_x, need_weight, need_bias)
            else:
                dys, xmu = dy.to(mean.dtype), x.to(mean.dtype) - mean.view(shape)
                sum_dy, sum_dy_xmu = dys.sum(dims), (dys * xmu).sum(dims)  # [C] each, this rank's rows
                if need_weight:
                    dweight = (sum_dy_xmu * invstd).to(weight.dtype)
                if need_bias:
                    dbias = sum_dy.clone()
            if need_x:
                packed = torch.cat([sum_dy, sum_dy_xmu])
                dist.all_reduce(packed, group=ctx.group)  # [sum dy, sum dy (x - mean)] of the global batch
                sum_dy, sum_dy_xmu = packed.chunk(2)
                if x.numel() == 0:
                    dx = torch.zeros_like(x)
                elif _fused(x):
                    w = weight.to(mean.dtype) if weight is not None and weight.dtype != mean.dtype else weight
                    dx = torch.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu,
                                                         total.to(torch.int32))
                else:
                    scale = invstd if weight is None else invstd * weight.to(mean.dtype)
                    mean_dy, mean_dy_xmu = sum_dy / total.to(mean.dtype), sum_dy_xmu / total.to(mean.dtype)
                    dx = dys - mean_dy.view(shape) - xmu * (invstd * invstd * mean_dy_xmu).view(shape)
                    dx = (dx * scale.view(shape)).to(x.dtype)
        return (dx, dweight if need_weight else None, dbias if need_bias else None, None, None, None, None, None)


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch in training mode under a process group of more than one process;
    plain BatchNorm otherwise. Any input of 2 or more dimensions [N, C, ...] (BatchNorm1d / 2d / 3d).
    A subclass of _BatchNorm, so that code handling BatchNorm layers (activation checkpointing's scratch
    running statistics in wcl_fast/model.py, the parameter groups of wcl_fast/optim.py) treats it as one."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions [N, C, ...], got {input.dim()}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if not self.training or _world(group) < 2:
            return super().forward(input)
        self._check_input_dim(input)
        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as _BatchNorm (a device tensor here)
                momentum = 1.0 / self.num_batches_tracked.double()
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        return _GlobalBatchNorm.apply(input, self.weight, self.bias, running_mean, running_var, self.eps,
                                      momentum if momentum is not None else 0.0, group)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every nn.BatchNorm1d / 2d / 3d of `module` (or `module` itself) replaced by a SyncBatchNorm holding
    the same Parameter and buffer objects under the same names (optimizer references and state-dict keys
    stay valid) and the same training flag. Returns the module (a new one only when `module` is a BatchNorm)."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        converted = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats, process_group, device="meta")
        for name in ("weight", "bias"):
            setattr(converted, name, getattr(module, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            converted._buffers[name] = module._buffers.get(name)
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        replaced = convert_sync_batchnorm(child, process_group)
        if replaced is not child:
            setattr(module, name, replaced)
    return module
