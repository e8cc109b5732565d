"""Encoder and the two projection heads of WCL (Zheng et al., ICCV 2021, Sec. 3; docs/wcl.md §1).

F: torchvision ResNet without its classifier -> h [B, 2048] (ResNet-50) or [B, 512] (ResNet-18/34).
g (head1, instance discrimination) and phi (head2, weak labels): Linear BN ReLU Linear BN ReLU Linear.
Sub-module names (`linear1`, `bn1`, ...) follow the reference code so that its parameter-grouping
rule ("name contains 'bn' or 'bias'") selects the same parameters.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from wcl_fast.config import ModelConfig

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


class WCLModel(nn.Module):
    """Encoder F + head1 (g) + head2 (phi); forward maps crops to normalised z = g(h), u = phi(h)."""

    def __init__(self, cfg: ModelConfig, two_heads: bool = True):
        super().__init__()
        self.cfg = cfg
        self.net = build_encoder(cfg.arch, cfg.stem, cfg.widths)
        dim = feature_dim(cfg.arch, cfg.widths)
        self.head1 = ProjectionHead(dim, cfg.head_hidden, cfg.head_out)
        # objectives without a second head (SimCLR, CO2, SLR, single-head Cl-InfoNCE) build none, so
        # that DDP never waits for gradients of unused parameters
        self.head2 = ProjectionHead(dim, cfg.head_hidden, cfg.head_out) if two_heads else None

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward pass (one set of BN statistics): images [B,3,H,W] -> z [B,d], u [B,d] (None
        without head 2), L2-normalised."""
        h = self.net(images)  # [B, 2048]
        z = F.normalize(self.head1(h).float(), dim=1)  # [B, d_out]
        u = F.normalize(self.head2(h).float(), dim=1) if self.head2 is not None else None  # [B, d_out]
        return z, u

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None,
                extra: torch.Tensor | None = None):
        """global_crops [2B,3,H,W] (view-major), local_crops [L*B,3,h,w] (crop-major) or None.

        Returns z_global, u_global [2B, d] and z_local, u_local [L*B, d] (or None). One forward per
        resolution, or per view when cfg.forward == 'per_view' (the reference's BN statistics).
        All crops go through this single call so that DDP sees one forward per step.
        extra [E,3,H,W] (e.g. SLR's mixed queries): embedded in its own pass of the same call; the
        head-1 embeddings [E, d] are appended as a fifth output.
        """
        outputs = self._crops(global_crops, local_crops)
        if extra is None:
            return outputs
        return outputs + (self.embed(extra)[0],)

    def _cat(self, chunks):
        return (torch.cat([c[0] for c in chunks]),
                torch.cat([c[1] for c in chunks]) if self.head2 is not None else None)

    def _crops(self, global_crops, local_crops):
        if self.cfg.forward == "per_view":
            z_global, u_global = self._cat([self.embed(view) for view in global_crops.chunk(2)])
        else:
            z_global, u_global = self.embed(global_crops)
        if local_crops is None or local_crops.shape[0] == 0:
            return z_global, u_global, None, None
        if self.cfg.forward == "per_view":
            batch = global_crops.shape[0] // 2
            return (z_global, u_global) + self._cat([self.embed(view) for view in local_crops.split(batch)])
        z_local, u_local = self.embed(local_crops)
        return z_global, u_global, z_local, u_local


def build_model(cfg: ModelConfig, two_heads: bool = True) -> WCLModel:
    return WCLModel(cfg, two_heads)
