"""CO2 consistency regulariser (Wei, Wang, Shen, Yuille, ICLR 2021, arXiv 2010.02217; docs/objectives.md §3).

For a query q, its positive p (no gradient) and negatives n_k:
    Q = softmax_k(q . n_k / tau_con),  P = softmax_k(p . n_k / tau_con)   (over the negatives only)
    L = L_InfoNCE + alpha * (KL(P || Q) + KL(Q || P)) / 2.
Two forms: `batch` on head 1 (negatives = every gathered global embedding except both views of the
query's image; L_InfoNCE = SimCLR NT-Xent) and `queue` (the paper's MoCo form: positive = the EMA
key of the other view, negatives = the key queue). Negatives carry no gradient in either form (in
the paper they are momentum keys); the regulariser's gradient reaches the encoder through q.
"""
from __future__ import annotations

import torch

from wcl_fast.objectives.wcl import _one_hot_columns


def consistency_rows(q: torch.Tensor, p: torch.Tensor, negatives: torch.Tensor, tau_con: float,
                     excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Per-query symmetric KL [M] between the negative-similarity distributions of q [M, D] and of
    its positive p [M, D] (detached) over negatives [K, D] (detached); excluded [M, K] bool removes
    columns (e.g. the query's own image) from both distributions."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        negatives = negatives.detach().float()
        lq = q.float() @ negatives.t() / tau_con  # [M, K]
        lp = p.detach().float() @ negatives.t() / tau_con
        if excluded is not None:
            lq = lq.masked_fill(excluded, float("-inf"))
            lp = lp.masked_fill(excluded, float("-inf"))
        log_q = torch.log_softmax(lq, dim=1)
        log_p = torch.log_softmax(lp, dim=1)
        diff = log_p - log_q
        if excluded is not None:
            diff = diff.masked_fill(excluded, 0.0)  # -inf - -inf; those entries have P = Q = 0
        kl_pq = (log_p.exp() * diff).sum(dim=1)
        kl_qp = (log_q.exp() * -diff).sum(dim=1)
        return 0.5 * (kl_pq + kl_qp)


def co2_batch_consistency(z1: torch.Tensor, z2: torch.Tensor, z1_all: torch.Tensor, z2_all: torch.Tensor,
                          offset: int, tau_con: float) -> torch.Tensor:
    """Batch form: mean over this rank's 2b global queries; the positive of view 1 is view 2 and vice
    versa; negatives = all 2N gathered global embeddings except the query image's two columns."""
    b, n = z1.shape[0], z1_all.shape[0]
    rows = torch.arange(b, device=z1.device) + offset
    negatives = torch.cat([z1_all, z2_all])  # [2N, D]
    excluded = _one_hot_columns(torch.cat([rows, rows]), 2 * n) | _one_hot_columns(torch.cat([rows + n, rows + n]), 2 * n)
    return consistency_rows(torch.cat([z1, z2]), torch.cat([z2, z1]), negatives, tau_con, excluded).mean()


def queue_infonce_rows(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo InfoNCE per query [M]: logits [q.k, q.queue] / tau, the positive key in column 0."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k = q.float(), k.detach().float()
        logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.detach().float().t()], dim=1) / tau  # [M, 1+K]
        return torch.logsumexp(logits, dim=1) - logits[:, 0]


def co2_queue_terms(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float,
                    tau_con: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper form for queries q [M, D] with positive keys k [M, D] and the queue [K, D]:
    (InfoNCE rows [M], consistency rows [M])."""
    return queue_infonce_rows(q, k, queue, tau), consistency_rows(q, k, queue, tau_con)
