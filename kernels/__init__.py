"""Graph kernels for weak labels: 1-NN search and connected components.

Public, stable interface (other modules and issues build on it):
    nearest_neighbor(queries, keys=None, query_groups=None, key_groups=None) -> idx [M] int64
    connected_components(nn_idx) -> labels [N] int64
Each dispatches to a backend; today the torch reference runs on every device.
"""
from __future__ import annotations

import torch

from kernels.components import connected_components_torch
from kernels.nearest_neighbor import nearest_neighbor_torch

__all__ = ["nearest_neighbor", "connected_components", "nearest_neighbor_torch", "connected_components_torch"]

_BACKENDS = ("auto", "torch")


def nearest_neighbor(
    queries: torch.Tensor,
    keys: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """For each query, the index of the most similar key of another group (ties: smallest index).

    See `kernels.nearest_neighbor.nearest_neighbor_torch` for the exact semantics.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    return nearest_neighbor_torch(queries, keys, query_groups, key_groups)


def connected_components(nn_idx: torch.Tensor) -> torch.Tensor:
    """Connected-component labels [N] int64 of the undirected 1-NN graph {i - nn_idx[i]}."""
    return connected_components_torch(nn_idx)
