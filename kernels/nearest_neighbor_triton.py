"""Fused similarity + 1-NN Triton kernel (issue 3; WCL weak-label graph, Zheng et al. ICCV 2021 Sec. 3.2).

Each program owns BLOCK_M query rows, keeps them in registers and streams the keys in BLOCK_N
tiles: s = q . k (tl.dot, fp32 accumulation; fp32 inputs in IEEE precision, not TF32), masks keys
of the same group (and the ragged tail), and updates a running (max, argmax) per row. The N x N
similarity matrix is never written: memory is O((M + N) * D). Ties go to the smallest key index
(within a tile: the minimum index among the maxima; across tiles: a later tile must be strictly
greater), matching the torch reference. Optionally the same kernel writes the scaled logits
s / tau of every query against the first C keys into an [M, C] fp32 buffer ("fused similarity
matrix" path for the loss: kernels.similarity_nearest_neighbor, the WCL knn rule).

This module is imported only when the Triton backend is used: on CPU it needs TRITON_INTERPRET=1
set before import (the tests do this); on CUDA it compiles for the device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _nn_kernel(q_ptr, k_ptr, qg_ptr, kg_ptr, out_idx_ptr, out_max_ptr, logits_ptr,
               M, N, D, stride_qm, stride_km, stride_lm, inv_tau, N_LOGITS,
               HAS_GROUPS: tl.constexpr, WRITE_LOGITS: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    row_ok = rows < M
    dims = tl.arange(0, BLOCK_D)
    if HAS_GROUPS:
        q_group = tl.load(qg_ptr + rows, mask=row_ok, other=-1)  # [BM]
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_idx = tl.full([BLOCK_M], -1, dtype=tl.int64)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # [BN]
        col_ok = cols < N
        sim = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + dims
            d_ok = d < D
            q = tl.load(q_ptr + rows[:, None] * stride_qm + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            k = tl.load(k_ptr + cols[:, None] * stride_km + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if IEEE:
                sim += tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                sim += tl.dot(q, tl.trans(k))
        if WRITE_LOGITS:
            tl.store(logits_ptr + rows[:, None] * stride_lm + cols[None, :], sim * inv_tau,
                     mask=row_ok[:, None] & (cols < N_LOGITS)[None, :])
        valid = col_ok[None, :] & row_ok[:, None]
        if HAS_GROUPS:
            k_group = tl.load(kg_ptr + cols, mask=col_ok, other=-2)
            valid = valid & (q_group[:, None] != k_group[None, :])
        sim = tl.where(valid, sim, float("-inf"))
        tile_max = tl.max(sim, axis=1)  # [BM]
        big = tl.full([BLOCK_M, BLOCK_N], 2**62, dtype=tl.int64)
        candidates = tl.where((sim == tile_max[:, None]) & valid, cols[None, :].to(tl.int64), big)
        tile_idx = tl.min(candidates, axis=1)  # smallest index among the tile's maxima
        better = tile_max > best
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_max, best)
    tl.store(out_idx_ptr + rows, best_idx, mask=row_ok)
    tl.store(out_max_ptr + rows, best, mask=row_ok)


def nearest_neighbor_triton(queries: torch.Tensor, keys: torch.Tensor | None = None,
                            query_groups: torch.Tensor | None = None, key_groups: torch.Tensor | None = None,
                            logits_tau: float | None = None, block_m: int = 64, block_n: int = 64,
                            logit_columns: int | None = None):
    """Same contract as kernels.nearest_neighbor_torch (idx [M] int64, -1 where every key is excluded).

    With logits_tau set, returns (idx, logits [M, C] fp32 = queries @ keys[:C]^T / tau) from one pass,
    C = logit_columns (default: all N keys); the 1-NN search still covers all N keys.
    """
    if keys is None:
        keys = queries
        if query_groups is None and key_groups is None:
            query_groups = torch.arange(queries.shape[0], device=queries.device)
            key_groups = query_groups
    if (query_groups is None) != (key_groups is None):
        raise ValueError("pass both query_groups and key_groups, or neither")
    if queries.dtype != keys.dtype:
        raise ValueError(f"queries ({queries.dtype}) and keys ({keys.dtype}) must share a dtype")
    if queries.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {queries.dtype}; use float32, float16 or bfloat16")
    queries, keys = queries.contiguous(), keys.contiguous()
    m, dim = queries.shape
    n = keys.shape[0]
    device = queries.device
    out_idx = torch.empty(m, dtype=torch.int64, device=device)
    out_max = torch.empty(m, dtype=torch.float32, device=device)
    has_groups = query_groups is not None
    qg = query_groups.to(device=device, dtype=torch.int64).contiguous() if has_groups else out_idx
    kg = key_groups.to(device=device, dtype=torch.int64).contiguous() if has_groups else out_idx
    columns = n if logit_columns is None else int(logit_columns)
    if not 0 <= columns <= n:
        raise ValueError(f"logit_columns must be in [0, {n}], got {logit_columns}")
    logits = torch.empty(m, columns, dtype=torch.float32, device=device) if logits_tau is not None else out_max
    block_d = min(64, max(16, triton.next_power_of_2(dim)))
    grid = (triton.cdiv(m, block_m),)
    _nn_kernel[grid](queries, keys, qg, kg, out_idx, out_max, logits, m, n, dim,
                     queries.stride(0), keys.stride(0), logits.stride(0) if logits_tau is not None else 0,
                     1.0 / logits_tau if logits_tau is not None else 1.0, columns,
                     HAS_GROUPS=has_groups, WRITE_LOGITS=logits_tau is not None,
                     IEEE=queries.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    return (out_idx, logits) if logits_tau is not None else out_idx
