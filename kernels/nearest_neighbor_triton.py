"""Fused similarity + 1-NN Triton kernel (WCL weak-label graph, Zheng et al. ICCV 2021 Sec. 3.2).

Each program owns BLOCK_M query rows and streams the keys in BLOCK_N tiles: s = q . k (tl.dot, fp32
accumulation; fp32 inputs in IEEE precision, not TF32), masks keys of the same group (and the ragged
tail), and updates a running (max, argmax) per row. The N x N similarity matrix is never written:
memory is O((M + N) * D). When D fits one BLOCK_D chunk (D <= 256 for 16-bit inputs, the WCL head
dimensions) the query tile is loaded once and stays on chip for the whole key stream; larger D loops
over chunks. Ties go to the smallest key index (within a tile: the reduction's leftmost maximum;
across tiles: a later tile must be strictly greater), matching the torch reference. Optionally the
same kernel writes the scaled logits s / tau of every query against the first C keys into an [M, C]
fp32 buffer ("fused similarity matrix" path for the loss: kernels.similarity_nearest_neighbor).

On CUDA the launch configuration (BLOCK_M, BLOCK_N, warps, pipeline stages) is autotuned once per
(M, N, D, dtype, variant) among CUDA_CONFIGS (WCL_TRITON_AUTOTUNE=0: the first candidate, no tuning);
BLOCK_D is fixed by dtype and D, so every candidate sums the dot products in the same order. `python -m kernels.aot` compiles every candidate for sm_80/sm_90
without a GPU and reports registers, spills, shared memory and tensor-core use.

This module is imported only when the Triton backend is used: on CPU it needs TRITON_INTERPRET=1
set before import (the tests do this); on CUDA it compiles for the device.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# (BLOCK_M, BLOCK_N, num_warps, num_stages): the autotuner's candidates on CUDA. Chosen with
# `python -m kernels.aot`: for sm_80 and sm_90 at D = 128 and 256 none of them spills registers (the
# largest 16-bit tile needs 192-256 KiB of shared memory at D = 256 and is skipped where it does not fit).
# The first of each list is the fixed configuration used with WCL_TRITON_AUTOTUNE=0 (the tests: each
# candidate costs a compilation per input specialisation).
HALF_CONFIGS = ((64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 8, 3))
FP32_CONFIGS = ((64, 64, 8, 2), (32, 64, 4, 2), (128, 64, 8, 2))
CUDA_CONFIGS = HALF_CONFIGS + tuple(c for c in FP32_CONFIGS if c not in HALF_CONFIGS)
INTERPRETER_BLOCKS = (64, 64)  # fixed blocks under TRITON_INTERPRET=1 (no autotuning there)


@triton.jit
def _nn_kernel(q_ptr, k_ptr, qg_ptr, kg_ptr, out_idx_ptr, out_max_ptr, logits_ptr,
               M, N, D, stride_qm, stride_km, stride_lm, inv_tau, N_LOGITS,
               HAS_GROUPS: tl.constexpr, WRITE_LOGITS: tl.constexpr, IEEE: tl.constexpr, ONE_CHUNK: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] int32
    row_ok = rows < M
    dims = tl.arange(0, BLOCK_D)
    if HAS_GROUPS:
        q_group = tl.load(qg_ptr + rows, mask=row_ok, other=-1)  # [BM] int32
    if ONE_CHUNK:  # the query tile stays on chip for the whole key stream
        q_tile = tl.load(q_ptr + rows[:, None] * stride_qm + dims[None, :],
                         mask=row_ok[:, None] & (dims < D)[None, :], other=0.0)
    if WRITE_LOGITS:
        logit_rows = logits_ptr + rows.to(tl.int64) * stride_lm  # [BM] row pointers (M * C may pass 2^31)
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_idx = tl.full([BLOCK_M], -1, dtype=tl.int32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # [BN] int32
        col_ok = cols < N
        if ONE_CHUNK:
            k_tile = tl.load(k_ptr + cols[:, None] * stride_km + dims[None, :],
                             mask=col_ok[:, None] & (dims < D)[None, :], other=0.0)
            if IEEE:
                sim = tl.dot(q_tile, tl.trans(k_tile), input_precision="ieee")
            else:
                sim = tl.dot(q_tile, tl.trans(k_tile))
        else:
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
            tl.store(logit_rows[:, None] + cols[None, :], sim * inv_tau, mask=row_ok[:, None] & (cols < N_LOGITS)[None, :])
        valid = col_ok[None, :]
        if HAS_GROUPS:
            k_group = tl.load(kg_ptr + cols, mask=col_ok, other=-2)
            valid = valid & (q_group[:, None] != k_group[None, :])
        sim = tl.where(valid, sim, float("-inf"))
        # one reduction gives the tile's maximum and its leftmost position
        tile_max, tile_pos = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_max > best  # strict: an equal maximum in a later tile keeps the smaller index
        best_idx = tl.where(better, start + tile_pos, best_idx)
        best = tl.where(better, tile_max, best)
    tl.store(out_idx_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
    tl.store(out_max_ptr + rows, best, mask=row_ok)


def configs_for(ieee: bool) -> tuple:
    return FP32_CONFIGS if ieee else HALF_CONFIGS


def _prune(configs, named_args, **kwargs):
    wanted = configs_for(bool(kwargs.get("IEEE")))
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]


_nn_kernel_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in CUDA_CONFIGS],
    key=["M", "N", "D", "HAS_GROUPS", "WRITE_LOGITS", "IEEE", "BLOCK_D"],
    prune_configs_by={"early_config_prune": _prune},
)(_nn_kernel)


def block_d_for(dtype: str | torch.dtype, dim: int) -> int:
    """The D chunk: the whole (padded) dimension up to 256 for 16-bit inputs, 32 for fp32 (whose IEEE
    dot runs on FMA units; larger chunks spill registers, see kernels.aot)."""
    wide = dtype in ("fp32", torch.float32)
    return min(32 if wide else 256, max(16, triton.next_power_of_2(dim)))


def kernel_constants(dtype: str | torch.dtype, dim: int, has_groups: bool, write_logits: bool) -> dict:
    """The kernel's constexpr arguments other than the launch blocks (shared with kernels.aot)."""
    block_d = block_d_for(dtype, dim)
    return {"HAS_GROUPS": has_groups, "WRITE_LOGITS": write_logits, "IEEE": dtype in ("fp32", torch.float32),
            "ONE_CHUNK": dim <= block_d, "BLOCK_D": block_d}


def nearest_neighbor_triton(queries: torch.Tensor, keys: torch.Tensor | None = None,
                            query_groups: torch.Tensor | None = None, key_groups: torch.Tensor | None = None,
                            logits_tau: float | None = None, block_m: int | None = None, block_n: int | None = None,
                            logit_columns: int | None = None):
    """Same contract as kernels.nearest_neighbor_torch (idx [M] int64, -1 where every key is excluded).

    With logits_tau set, returns (idx, logits [M, C] fp32 = queries @ keys[:C]^T / tau) from one pass,
    C = logit_columns (default: all N keys); the 1-NN search still covers all N keys.
    block_m/block_n force a launch configuration; by default it is autotuned on CUDA and
    INTERPRETER_BLOCKS under the interpreter.
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
    if max(m, n) * max(dim, 1) >= 2**31:
        raise ValueError(f"inputs of {max(m, n)} x {dim} elements exceed the kernel's 32-bit offsets")
    device = queries.device
    out_idx = torch.empty(m, dtype=torch.int64, device=device)
    out_max = torch.empty(m, dtype=torch.float32, device=device)
    has_groups = query_groups is not None
    if has_groups:  # compared per tile as int32; checked on the device (no host synchronisation)
        qg = query_groups.reshape(-1).to(device=device)
        kg = key_groups.reshape(-1).to(device=device)
        for ids in (qg, kg):
            if ids.numel() and ids.dtype not in (torch.int32, torch.int16, torch.int8, torch.uint8):
                torch._assert_async(((ids > -2**31) & (ids < 2**31)).all(),
                                    "nearest_neighbor_triton: group ids must fit in int32")
        qg, kg = qg.to(torch.int32).contiguous(), kg.to(torch.int32).contiguous()
    else:
        qg = kg = torch.empty(1, dtype=torch.int32, device=device)
    columns = n if logit_columns is None else int(logit_columns)
    if not 0 <= columns <= n:
        raise ValueError(f"logit_columns must be in [0, {n}], got {logit_columns}")
    write_logits = logits_tau is not None
    logits = torch.empty(m, columns, dtype=torch.float32, device=device) if write_logits else out_max
    constants = kernel_constants(queries.dtype, dim, has_groups, write_logits)
    args = (queries, keys, qg, kg, out_idx, out_max, logits, m, n, dim, queries.stride(0), keys.stride(0),
            logits.stride(0) if write_logits else 0, 1.0 / logits_tau if write_logits else 1.0, columns)
    forced = block_m is not None or block_n is not None
    if device.type == "cuda" and not forced and os.environ.get("WCL_TRITON_AUTOTUNE", "1") != "0":
        _nn_kernel_tuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](*args, **constants)
    elif device.type == "cuda":
        default_m, default_n, warps, stages = configs_for(constants["IEEE"])[0]
        block_m, block_n = block_m or default_m, block_n or default_n
        _nn_kernel[(triton.cdiv(m, block_m),)](*args, **constants, BLOCK_M=block_m, BLOCK_N=block_n,
                                                num_warps=warps, num_stages=stages)
    else:
        block_m = block_m or INTERPRETER_BLOCKS[0]
        block_n = block_n or INTERPRETER_BLOCKS[1]
        _nn_kernel[(triton.cdiv(m, block_m),)](*args, **constants, BLOCK_M=block_m, BLOCK_N=block_n)
    return (out_idx, logits) if write_logits else out_idx
