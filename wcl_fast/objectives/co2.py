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

from wcl_fast.objectives.rows import one_hot_columns
from wcl_fast import dist as wdist
from wcl_fast.objectives.base import Objective, register
from wcl_fast.objectives.momentum import MomentumObjective
from wcl_fast.objectives.rows import nce_rows


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
    excluded = one_hot_columns(torch.cat([rows, rows]), 2 * n) | one_hot_columns(torch.cat([rows + n, rows + n]), 2 * n)
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


@register("co2")
class CO2Objective(MomentumObjective):
    term_names = ("loss", "nce", "co2")

    def __init__(self, cfg, model, ctx, data):
        if cfg.loss.co2.form == "queue":
            super().__init__(cfg, model, ctx, data)
        else:  # batch form: no key encoder, no queue
            Objective.__init__(self, cfg, model, ctx, data)

    def guarded_buffers(self):
        return super().guarded_buffers() if self.cfg.loss.co2.form == "queue" else Objective.guarded_buffers(self)

    def after_step(self, ok=None):
        if self.cfg.loss.co2.form == "queue":
            super().after_step(ok)

    def state_dict(self):
        return super().state_dict() if self.cfg.loss.co2.form == "queue" else {}

    def load_state_dict(self, state):
        if self.cfg.loss.co2.form == "queue":
            super().load_state_dict(state)

    def losses(self, ddp, batch, step, total_steps, autocast):
        cfg = self.cfg
        tau, c = cfg.loss.tau, cfg.loss.co2
        if c.form == "batch":
            with autocast():
                z_global, _, z_local, _ = ddp(batch.globals, batch.locals)
            z1, z2 = z_global.chunk(2)
            z1_all, z2_all = self._gather(z1, z2)
            offset = self.ctx.rank * z1.shape[0]
            nce = nce_rows(z1, z2, z1_all, z2_all, offset, tau, z_local).mean()
            reg = co2_batch_consistency(z1, z2, z1_all, z2_all, offset, c.tau_con)
        else:
            k1, k2 = self.key_embeddings(batch.globals, autocast)
            with autocast():
                z_global, _, z_local, _ = ddp(batch.globals, batch.locals)
            z1, z2 = z_global.chunk(2)
            queue = self.queue.keys
            nce_parts, reg_parts = [], []
            for q, k in self.pairs(z1, z2, k1, k2):
                n_rows, r_rows = co2_queue_terms(q, k, queue, tau, c.tau_con)
                nce_parts.append(n_rows)
                reg_parts.append(r_rows)
            if z_local is not None and z_local.shape[0] > 0:  # local crops: extra queries of view 2's key
                nce_parts.append(queue_infonce_rows(z_local, k2.repeat(z_local.shape[0] // k2.shape[0], 1), queue, tau))
            nce, reg = torch.cat(nce_parts).mean(), torch.cat(reg_parts).mean()
            self._pending = wdist.gather_rows(k2)
        return {"loss": nce + c.alpha * reg, "nce": nce, "co2": reg}
