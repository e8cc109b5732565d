"""The row primitive every objective is built from (docs/objectives.md): per-anchor cross-entropies over
rows of S = anchors keys^T / tau, with a positive mask and an excluded mask, in float32 with logsumexp
whatever the autocast dtype; and head 1's NT-Xent rows (SimCLR eq. 1, WCL's first term)."""
from __future__ import annotations

import torch


def contrastive_rows(
    anchors: torch.Tensor,
    keys: torch.Tensor,
    positive: torch.Tensor,
    excluded: torch.Tensor | None,
    tau: float,
) -> torch.Tensor:
    """Per-anchor loss -mean_{p in positive} log softmax_{a not excluded}(s / tau)[p].

    anchors [M, D], keys [K, D], positive [M, K] bool, excluded [M, K] bool or None (columns left
    out of the denominator, e.g. the anchor itself). Every row needs >= 1 positive. Returns [M] fp32.
    """
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        logits = anchors.float() @ keys.float().t() / tau  # [M, K] fp32
        return rows_from_logits(logits, positive, excluded)


def rows_from_logits(logits: torch.Tensor, positive: torch.Tensor, excluded: torch.Tensor | None) -> torch.Tensor:
    """contrastive_rows from precomputed fp32 logits [M, K] (s / tau)."""
    if excluded is not None:
        logits = logits.masked_fill(excluded, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # [M, K]
    picked = torch.where(positive, log_prob, torch.zeros_like(log_prob))
    return -picked.sum(dim=1) / positive.sum(dim=1).clamp_min(1)


def one_hot_columns(rows: torch.Tensor, num_columns: int) -> torch.Tensor:
    """Boolean [len(rows), num_columns] with True at (i, rows[i])."""
    mask = torch.zeros(rows.shape[0], num_columns, dtype=torch.bool, device=rows.device)
    mask[torch.arange(rows.shape[0], device=rows.device), rows] = True
    return mask


def nce_rows(z1: torch.Tensor, z2: torch.Tensor, z1_all: torch.Tensor, z2_all: torch.Tensor, offset: int,
             tau: float, z_local: torch.Tensor | None = None) -> torch.Tensor:
    """Per-anchor NT-Xent of head 1 (SimCLR eq. 1; WCL's first term), [2b (+ L*b)] fp32.

    Anchors [z1; z2] against keys [Z1; Z2] (2N columns) with the own column removed and the other view
    as the positive; local crops (crop-major [L*b, D]) take the image's two global crops as positives,
    each cross-entropy with the other positive removed from its denominator, averaged (docs/wcl.md §3).
    """
    b, n = z1.shape[0], z1_all.shape[0]
    rows = torch.arange(b, device=z1.device) + offset
    keys1 = torch.cat([z1_all, z2_all])  # [2N, D]
    own = torch.cat([rows, rows + n])  # [2b]
    other = torch.cat([rows + n, rows])  # [2b]
    out = [contrastive_rows(torch.cat([z1, z2]), keys1, one_hot_columns(other, 2 * n),
                            one_hot_columns(own, 2 * n), tau)]  # [2b]
    if z_local is not None and z_local.shape[0] > 0:
        out.append(local_nce_rows(z_local, keys1, rows, n, tau))
    return torch.cat(out)


def local_nce_rows(z_local, keys1, rows, n, tau):
    """Head 1 for local crops: positives are the image's two global crops, each CE with the other
    positive removed from its denominator, averaged (docs/wcl.md §3)."""
    local_rows = rows.repeat(z_local.shape[0] // rows.shape[0])  # [L*b]
    first = one_hot_columns(local_rows, 2 * n)  # column of the view-1 crop of the same image
    second = one_hot_columns(local_rows + n, 2 * n)  # column of the view-2 crop
    return 0.5 * (contrastive_rows(z_local, keys1, first, second, tau)
                  + contrastive_rows(z_local, keys1, second, first, tau))
