"""Graph kernels for weak labels: 1-NN search and connected components.

Public, stable interface (other modules and issues build on it):
    nearest_neighbor(queries, keys=None, query_groups=None, key_groups=None, backend="auto") -> idx [M] int64
    connected_components(nn_idx) -> labels [N] int64
Backends of nearest_neighbor: "triton" (fused similarity + running argmax, kernels/nearest_neighbor_triton.py)
is the default on CUDA; "torch" (kernels/nearest_neighbor.py, the reference) everywhere else. Both
give the same indices; under bf16/fp16 inputs the two may differ only where the best and second-best
similarities are within float32 summation-order error (~1e-6) of each other.
"""
from __future__ import annotations

import os

import torch

from kernels.components import connected_components_edges, connected_components_torch
from kernels.nearest_neighbor import nearest_neighbor_torch

__all__ = ["nearest_neighbor", "connected_components", "connected_components_edges", "nearest_neighbor_torch", "connected_components_torch",
           "triton_available"]

_BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before the process starts")
    return backend


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
    if _resolve_backend(backend, queries) == "triton":
        from kernels.nearest_neighbor_triton import nearest_neighbor_triton

        return nearest_neighbor_triton(queries, keys, query_groups, key_groups)
    return nearest_neighbor_torch(queries, keys, query_groups, key_groups)


def connected_components(nn_idx: torch.Tensor) -> torch.Tensor:
    """Connected-component labels [N] int64 of the undirected 1-NN graph {i - nn_idx[i]}."""
    return connected_components_torch(nn_idx)
