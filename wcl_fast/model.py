"""Encoder and the two projection heads of WCL (Zheng et al., ICCV 2021, Sec. 3; docs/wcl.md §1).

F: torchvision ResNet without its classifier -> h [B, 2048] (ResNet-50) or [B, 512] (ResNet-18/34).
g (head1, instance discrimination) and phi (head2, weak labels): Linear BN ReLU Linear BN ReLU Linear.
Sub-module names (`linear1`, `bn1`, ...) follow the reference code so that its parameter-grouping
rule ("name contains 'bn' or 'bias'") selects the same parameters.

Activation checkpointing (`model.activation_checkpointing`; docs/memory.md §2): the encoder is cut into segments -- the stem (conv1 + bn1 + relu + maxpool) and every
residual block -- and a selected segment keeps only its input; its activations are recomputed in the
backward pass (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost";
torch.utils.checkpoint, https://pytorch.org/docs/stable/checkpoint.html, the non-reentrant variant).
Global and local crops have their own sets of segments. The recomputation is exact: the same
operators on the same inputs, so the same activations, gradients and BatchNorm statistics. Running
statistics are updated by the forward pass only: during a recomputation every BatchNorm of the
segment updates scratch copies of running_mean / running_var / num_batches_tracked, which are then
dropped (see _ScratchRunningStats for why track_running_stats=False cannot be used). A ResNet draws no
random numbers, so the RNG state is not stashed (preserve_rng_state=False). With a non-empty plan for
a resolution the encoder's forward runs here, stage by stage (torchvision's ResNet._forward_impl), not
through `self.net(...)`: `model.net.compile` and hooks on `model.net` itself then do not apply to that
resolution (hooks on its sub-modules do). State-dict keys are unchanged (no wrapper modules).
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from wcl_fast.config import ModelConfig, checkpoint_segments, parse_checkpointing

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


class ProjectionHead(nn.Module):
    """Linear(d_in, H) BN ReLU Linear(H, H) BN ReLU Linear(H, d_out), biases on (docs/wcl.md §1)."""

    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int):
        super().__init__()
        self.linear1 = nn.Linear(dim_in, dim_hidden)
        self.bn1 = nn.BatchNorm1d(dim_hidden)
        self.relu1 = nn.ReLU(inplace=True)
        self.linear2 = nn.Linear(dim_hidden, dim_hidden)
        self.bn2 = nn.BatchNorm1d(dim_hidden)
        self.relu2 = nn.ReLU(inplace=True)
        self.linear3 = nn.Linear(dim_hidden, dim_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.linear1(h)))  # [B, H]
        x = self.relu2(self.bn2(self.linear2(x)))  # [B, H]
        return self.linear3(x)  # [B, d_out]


def feature_dim(arch: str, widths=None) -> int:
    """Width of the encoder's output h: the last stage's width x the block expansion."""
    if not widths:
        return FEATURE_DIMS[arch]
    return widths[3] * (4 if arch == "resnet50" else 1)


def build_encoder(arch: str, stem: str = "imagenet", widths=None) -> nn.Module:
    """torchvision ResNet with fc = Identity (Kaiming fan_out init, BN weight 1 / bias 0).

    stem='small' swaps the 7x7/2 conv + max-pool for a 3x3/1 conv (CIFAR-style) for tiny images.
    widths: 4 stage widths instead of 64-128-256-512 (the same blocks, strides and parameter names,
    so the state dict keeps torchvision's keys; only the shapes change).
    """
    encoder = getattr(torchvision.models, arch)(weights=None)
    stem_width = 64
    if widths:
        stem_width = widths[0]
        block = type(encoder.layer1[0])
        encoder.inplanes = stem_width
        encoder.conv1 = nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        encoder.bn1 = nn.BatchNorm2d(stem_width)
        for i, width in enumerate(widths):
            layer = getattr(encoder, f"layer{i + 1}")
            setattr(encoder, f"layer{i + 1}", encoder._make_layer(block, width, len(layer), stride=1 if i == 0 else 2))
    if stem == "small":
        encoder.conv1 = nn.Conv2d(3, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(encoder.conv1.weight, mode="fan_out", nonlinearity="relu")
        encoder.maxpool = nn.Identity()
    if widths:  # torchvision's initialisation for the rebuilt stages
        for module in encoder.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
    encoder.fc = nn.Identity()
    return encoder


class _ScratchRunningStats:
    """Recomputation context of one checkpointed segment: inside, every BatchNorm (nn.BatchNorm*d and
    SyncBatchNorm, i.e. torch.nn.modules.batchnorm._BatchNorm) of the segment that tracks running
    statistics holds clones of running_mean, running_var and num_batches_tracked; on exit the original
    tensors are put back, so the recomputed forward leaves them as the first forward did.

    Setting track_running_stats=False instead would also skip the update, but BatchNorm then passes
    running_mean / running_var = None to F.batch_norm, whose autograd node saves two tensors fewer
    than in the original forward; the non-reentrant checkpoint matches saved tensors by position and
    stops with "A different number of tensors was saved" (torch 2.14). The clones keep the saved
    tensors' number, shapes and dtypes, and the outputs (batch statistics in training mode) are the same.
    Reusable: a second recomputation (backward with retain_graph) enters it again."""

    def __init__(self, modules: tuple[nn.Module, ...]):
        self.modules = modules
        self.saved: list = []

    def __enter__(self):
        for root in self.modules:
            for bn in root.modules():
                if isinstance(bn, _BatchNorm) and bn.track_running_stats and bn.running_mean is not None:
                    self.saved.append((bn, bn.running_mean, bn.running_var, bn.num_batches_tracked))
                    bn.running_mean = bn.running_mean.clone()
                    bn.running_var = bn.running_var.clone()
                    if bn.num_batches_tracked is not None:
                        bn.num_batches_tracked = bn.num_batches_tracked.clone()
        return self

    def __exit__(self, *exc):
        for bn, mean, var, count in reversed(self.saved):
            bn.running_mean, bn.running_var, bn.num_batches_tracked = mean, var, count
        self.saved = []
        return False


def _run(modules: tuple[nn.Module, ...], x: torch.Tensor) -> torch.Tensor:
    for module in modules:
        x = module(x)
    return x


def _segment(modules: tuple[nn.Module, ...], x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """One encoder segment, checkpointed when asked and when autograd would record it (grad enabled,
    and the input or a parameter of the segment requires grad); else called directly."""
    if checkpointed and torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for m in modules for p in m.parameters())):
        return checkpoint(partial(_run, modules), x, use_reentrant=False, preserve_rng_state=False,
                          context_fn=lambda: (nullcontext(), _ScratchRunningStats(modules)))
    return _run(modules, x)


class WCLModel(nn.Module):
    """Encoder F + head1 (g) + head2 (phi); forward maps crops to normalised z = g(h), u = phi(h).

    checkpointing: the activation-checkpointing plan, {'global': segments, 'local': segments} as
    wcl_fast.config.parse_checkpointing returns it (a missing key = none). None: parsed from
    cfg.activation_checkpointing, where 'auto' counts as 'none' -- auto is resolved by the trainer,
    which passes the plan it chose (here or through set_checkpointing)."""

    def __init__(self, cfg: ModelConfig, two_heads: bool = True, checkpointing: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.net = build_encoder(cfg.arch, cfg.stem, cfg.widths)
        dim = feature_dim(cfg.arch, cfg.widths)
        self.head1 = ProjectionHead(dim, cfg.head_hidden, cfg.head_out)
        # objectives without a second head (SimCLR, CO2, SLR, single-head Cl-InfoNCE) build none, so
        # that DDP never waits for gradients of unused parameters
        self.head2 = ProjectionHead(dim, cfg.head_hidden, cfg.head_out) if two_heads else None
        if checkpointing is None:
            text = cfg.activation_checkpointing
            checkpointing = parse_checkpointing("none" if "".join(text.split()) == "auto" else text, cfg.arch)
        self.set_checkpointing(checkpointing)

    def set_checkpointing(self, plan: dict) -> None:
        """Use the plan {'global': segments, 'local': segments} (segment names of
        wcl_fast.config.checkpoint_segments; a missing key = none) from the next forward on."""
        valid = checkpoint_segments(self.cfg.arch)
        unknown = set(plan) - {"global", "local"}
        if unknown:
            raise ValueError(f"checkpointing plan keys must be global / local, got {sorted(unknown)}")
        checked = {}
        for resolution in ("global", "local"):
            segments = frozenset(plan.get(resolution, ()))
            if not segments <= set(valid):
                raise ValueError(f"{sorted(segments - set(valid))} are not segments of {self.cfg.arch}: {valid}")
            checked[resolution] = segments
        self.checkpointing = checked

    def encode(self, images: torch.Tensor, resolution: str = "global") -> torch.Tensor:
        """The encoder F: images [B,3,H,W] -> h [B, d], its segments checkpointed as the plan of
        `resolution` ('global' | 'local') says."""
        segments = self.checkpointing[resolution]
        if not segments or not torch.is_grad_enabled():
            return self.net(images)
        net = self.net  # torchvision ResNet._forward_impl, segment by segment
        x = _segment((net.conv1, net.bn1, net.relu, net.maxpool), images, "stem" in segments)
        for stage in range(1, 5):
            for k, block in enumerate(getattr(net, f"layer{stage}")):
                x = _segment((block,), x, f"layer{stage}.{k}" in segments)
        x = net.avgpool(x)
        x = torch.flatten(x, 1)
        return net.fc(x)

    def embed(self, images: torch.Tensor, resolution: str = "global") -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward pass (one set of BN statistics): images [B,3,H,W] -> z [B,d], u [B,d] (None
        without head 2), L2-normalised. resolution ('global' | 'local') picks the checkpointing plan."""
        h = self.encode(images, resolution)  # [B, 2048]
        z = F.normalize(self.head1(h).float(), dim=1)  # [B, d_out]
        u = F.normalize(self.head2(h).float(), dim=1) if self.head2 is not None else None  # [B, d_out]
        return z, u

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None,
                extra: torch.Tensor | None = None):
        """global_crops [2B,3,H,W] (view-major), local_crops [L*B,3,h,w] (crop-major) or None.

        Returns z_global, u_global [2B, d] and z_local, u_local [L*B, d] (or None). One forward per
        resolution, or per view when cfg.forward == 'per_view' (the reference's BN statistics).
        All crops go through this single call so that DDP sees one forward per step.
        extra [E,3,H,W] (e.g. SLR's mixed queries, global resolution): embedded in its own pass of
        the same call; the head-1 embeddings [E, d] are appended as a fifth output.
        """
        outputs = self._crops(global_crops, local_crops)
        if extra is None:
            return outputs
        return outputs + (self.embed(extra, "global")[0],)

    def _cat(self, chunks):
        return (torch.cat([c[0] for c in chunks]),
                torch.cat([c[1] for c in chunks]) if self.head2 is not None else None)

    def _crops(self, global_crops, local_crops):
        if self.cfg.forward == "per_view":
            z_global, u_global = self._cat([self.embed(view, "global") for view in global_crops.chunk(2)])
        else:
            z_global, u_global = self.embed(global_crops, "global")
        if local_crops is None or local_crops.shape[0] == 0:
            return z_global, u_global, None, None
        if self.cfg.forward == "per_view":
            batch = global_crops.shape[0] // 2
            return (z_global, u_global) + self._cat([self.embed(view, "local") for view in local_crops.split(batch)])
        z_local, u_local = self.embed(local_crops, "local")
        return z_global, u_global, z_local, u_local


def build_model(cfg: ModelConfig, two_heads: bool = True, checkpointing: dict | None = None) -> WCLModel:
    """WCLModel; checkpointing: the activation-checkpointing plan (None: cfg.activation_checkpointing,
    with 'auto' as 'none' -- the trainer resolves auto)."""
    return WCLModel(cfg, two_heads, checkpointing)
