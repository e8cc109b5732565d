"""Graph kernels for weak labels: 1-NN search and connected components.

Public, stable interface (other modules build on it):
    nearest_neighbor(queries, keys=None, query_groups=None, key_groups=None, backend="auto") -> idx [M] int64
    connected_components(nn_idx) -> labels [N] int64
    similarity_nearest_neighbor(queries, keys, query_groups, key_groups, tau, logit_columns, backend)
        -> (idx [M], logits [M, C] = queries @ keys[:C]^T / tau, differentiable)
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
           "similarity_nearest_neighbor", "triton_available"]

_BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """'triton' or 'torch' for tensors on `device`; RuntimeError when 'triton' cannot run there."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        return "triton" if cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
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
    if resolve_backend(backend, queries.device) == "triton":
        from kernels.nearest_neighbor_triton import nearest_neighbor_triton

        return nearest_neighbor_triton(queries, keys, query_groups, key_groups)
    return nearest_neighbor_torch(queries, keys, query_groups, key_groups)


def connected_components(nn_idx: torch.Tensor) -> torch.Tensor:
    """Connected-component labels [N] int64 of the undirected 1-NN graph {i - nn_idx[i]}."""
    return connected_components_torch(nn_idx)


class _FusedSimilarity(torch.autograd.Function):
    """Triton forward (1-NN over all keys + logits against the first C keys in one pass); the backward
    of logits = q k_C^T / tau is two matmuls: dq = g k_C / tau, dk_C = g^T q / tau (rows >= C: zero)."""

    @staticmethod
    def forward(ctx, queries, keys, query_groups, key_groups, tau, logit_columns):
        from kernels.nearest_neighbor_triton import nearest_neighbor_triton

        idx, logits = nearest_neighbor_triton(queries.detach(), keys.detach(), query_groups, key_groups,
                                              logits_tau=tau, logit_columns=logit_columns)
        ctx.save_for_backward(queries, keys)
        ctx.tau, ctx.columns = tau, logit_columns
        ctx.mark_non_differentiable(idx)
        return idx, logits

    @staticmethod
    def backward(ctx, _grad_idx, grad_logits):
        queries, keys = ctx.saved_tensors
        grad_q = grad_k = None
        with torch.autocast(device_type=queries.device.type, enabled=False):  # fp32 like the forward
            g = grad_logits.float() / ctx.tau  # [M, C]
            if ctx.needs_input_grad[0]:
                grad_q = (g @ keys[:ctx.columns].float()).to(queries.dtype)
            if ctx.needs_input_grad[1]:
                grad_k = torch.zeros_like(keys)
                grad_k[:ctx.columns] = (g.t() @ queries.float()).to(keys.dtype)
        return grad_q, grad_k, None, None, None, None


def similarity_nearest_neighbor(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_groups: torch.Tensor,
    key_groups: torch.Tensor,
    tau: float,
    logit_columns: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx [M] int64, logits [M, C] fp32): the 1-NN of every query among all keys of another group
    (nearest_neighbor's semantics) and the scaled similarities queries @ keys[:C]^T / tau (C =
    logit_columns, default all keys), differentiable with respect to queries and keys[:C].

    backend "triton": one kernel pass computes both ("fused similarity matrix"; the default on CUDA);
    "torch": a float32 matmul for the logits and nearest_neighbor_torch for the indices.
    """
    columns = keys.shape[0] if logit_columns is None else int(logit_columns)
    if resolve_backend(backend, queries.device) == "triton":
        dtype = queries.dtype if queries.dtype == keys.dtype else torch.float32
        return _FusedSimilarity.apply(queries.to(dtype), keys.to(dtype), query_groups, key_groups, float(tau), columns)
    idx = nearest_neighbor_torch(queries.detach(), keys.detach(), query_groups, key_groups)
    with torch.autocast(device_type=queries.device.type, enabled=False):
        logits = queries.float() @ keys[:columns].float().t() / tau
    return idx, logits
