"""1-nearest-neighbour search under a group exclusion (torch reference path).

WCL (Zheng et al., ICCV 2021, arXiv 2110.04770, Sec. 3.2) builds its weak-label graph from the
1-NN of every embedding: nn(i) = argmax_{j, group(j) != group(i)} <q_i, k_j>. This module is the
torch implementation; it streams over query tiles so that an M x N similarity matrix is never held
in memory at once (peak extra memory is `chunk x N` floats).
"""
from __future__ import annotations

import torch


def _check_groups(name: str, groups: torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    if groups.dim() != 1 or groups.shape[0] != rows:
        raise ValueError(f"{name} must have shape [{rows}], got {list(groups.shape)}")
    return groups.to(device=device, dtype=torch.int64)


def nearest_neighbor_torch(
    queries: torch.Tensor,
    keys: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Index of the most similar key (dot product) whose group differs from the query's group.

    queries [M, D], keys [N, D] (rows L2-normalised by the caller). Defaults: keys = queries and
    group = row index (self excluded). When `keys` is given without groups nothing is excluded.
    Ties go to the smallest key index (torch.argmax returns the first maximal index). Similarities
    are accumulated in float32 whatever the input dtype. A query whose every key is excluded gets -1.
    Returns idx [M] int64 on the inputs' device; no host synchronisation.
    """
    if queries.dim() != 2:
        raise ValueError(f"queries must be [M, D], got {list(queries.shape)}")
    if keys is None:
        keys = queries
        if query_groups is None and key_groups is None:
            query_groups = torch.arange(queries.shape[0], device=queries.device)
            key_groups = query_groups
    if keys.dim() != 2 or keys.shape[1] != queries.shape[1]:
        raise ValueError(f"keys must be [N, {queries.shape[1]}], got {list(keys.shape)}")
    if (query_groups is None) != (key_groups is None):
        raise ValueError("pass both query_groups and key_groups, or neither")
    device = queries.device
    num_queries, num_keys = queries.shape[0], keys.shape[0]
    if query_groups is not None:
        query_groups = _check_groups("query_groups", query_groups, num_queries, device)
        key_groups = _check_groups("key_groups", key_groups, num_keys, device)
    if chunk_rows is None:  # keep a tile of about 64 Mi floats (256 MB)
        chunk_rows = max(1, (1 << 26) // max(num_keys, 1))
    keys_t = keys.float().t()  # [D, N]
    out = torch.empty(num_queries, dtype=torch.int64, device=device)
    for start in range(0, num_queries, chunk_rows):
        stop = min(start + chunk_rows, num_queries)
        sim = queries[start:stop].float() @ keys_t  # [m, N] float32
        if query_groups is not None:
            same = query_groups[start:stop, None] == key_groups[None, :]  # [m, N]
            sim.masked_fill_(same, float("-inf"))
        best = sim.argmax(dim=1)  # first maximal index on ties
        if query_groups is not None:
            all_excluded = same.all(dim=1)
            best = torch.where(all_excluded, torch.full_like(best, -1), best)
        out[start:stop] = best
    return out
