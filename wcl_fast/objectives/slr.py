"""SLR / SANE: self-labelling refinery + momentum mixup (Zhou, Xiong, Yuan, Hoi, NeurIPS 2021,
arXiv 2106.14749; docs/objectives.md §4).

Query x_i, positive key x~_i through the EMA target g; keys B = the global batch's positive keys
(through g) followed by the queue. With c(i) the column of i's own key:
    p_i = softmax_k( cos(g(x~_i), b_k) / (tau tau') ),  q_i = the same with column c(i) removed,
    ybar_i = (1 - a - b) onehot_c(i) + a p_i + b q_i,  a = mu max(p_i) / z,  b = mu max(q_i) / z,
    z = 1 + mu max(p_i) + mu max(q_i),
    mixup: x'_i = theta_i x_i + (1 - theta_i) x~_k(i),  y'_i = theta_i ybar_i + (1 - theta_i) ybar_k(i),
           theta_i ~ Beta(kappa, kappa), k(i) != i another instance of the batch,
    L = (1 - lam) L_c(x, onehot) + lam L_c(x', y'),  L_c(x, y) = -sum_k y_k log softmax_k(f(x) . b_k / tau),
and mu ramps from mu_start to mu_end with a half cosine over training.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from wcl_fast.objectives.rows import one_hot_columns
from wcl_fast import dist as wdist
from wcl_fast.objectives.base import register
from wcl_fast.objectives.momentum import MomentumObjective


def mu_at(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine ramp: start at step 0, end at total_steps."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return end - (end - start) * (1 + math.cos(math.pi * progress)) / 2


@torch.no_grad()
def refinery_targets(k: torch.Tensor, keys: torch.Tensor, self_columns: torch.Tensor, mu: float,
                     tau: float, tau_prime: float) -> torch.Tensor:
    """Refined soft targets ybar [M, C] (fp32, rows sum to 1) for positive keys k [M, D] against the
    keys B [C, D] (both L2-normalised, so dot products are cosines); self_columns [M]."""
    with torch.autocast(device_type=k.device.type, enabled=False):
        logits = k.float() @ keys.float().t() / (tau * tau_prime)  # [M, C]
        own = one_hot_columns(self_columns, keys.shape[0])
        p = torch.softmax(logits, dim=1)
        q = torch.softmax(logits.masked_fill(own, float("-inf")), dim=1)
        max_p = p.max(dim=1, keepdim=True).values
        max_q = q.max(dim=1, keepdim=True).values
        z = 1 + mu * max_p + mu * max_q
        a, b = mu * max_p / z, mu * max_q / z
        return (1 - a - b) * own.float() + a * p + b * q


def soft_contrastive_rows(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """L_c per query [M]: cross-entropy of soft targets [M, C] against softmax(queries . keys / tau)."""
    with torch.autocast(device_type=queries.device.type, enabled=False):
        logits = queries.float() @ keys.detach().float().t() / tau
        return -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1)


def mixup_draw(batch: int, kappa: float, seed: int, step: int, rank: int, stream: int = 0):
    """(theta [batch] ~ Beta(kappa, kappa), partner [batch] with partner[i] != i), drawn from a numpy
    generator keyed by (seed, step, rank, stream) so that a resumed run draws the same values."""
    rng = np.random.default_rng([seed, step, rank, stream, 0x51A])
    theta = rng.beta(kappa, kappa, size=batch)
    order = rng.permutation(batch)
    partner = np.empty(batch, dtype=np.int64)
    partner[order] = order[(np.arange(batch) + 1) % batch] if batch > 1 else order  # one cycle: no fixed point
    return torch.from_numpy(theta.astype(np.float32)), torch.from_numpy(partner)


def momentum_mixup(x: torch.Tensor, x_key: torch.Tensor, theta: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """x'_i = theta_i x_i + (1 - theta_i) x_key[partner_i]: images [M, C, H, W] (or any [M, ...])."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    t = theta.to(x.dtype).view(shape)
    return t * x + (1 - t) * x_key[partner]


def mix_targets(y: torch.Tensor, theta: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """y'_i = theta_i y_i + (1 - theta_i) y_partner(i)."""
    t = theta.to(y.dtype)[:, None]
    return t * y + (1 - t) * y[partner]


def slr_terms(q: torch.Tensor, q_mix: torch.Tensor, keys: torch.Tensor, self_columns: torch.Tensor,
              ybar: torch.Tensor, theta: torch.Tensor, partner: torch.Tensor, tau: float,
              q_extra: torch.Tensor | None = None, extra_columns: torch.Tensor | None = None):
    """(onehot rows, mix rows) for queries q [M, D], mixed queries q_mix [M, D] (embeddings of the
    mixed images), keys B [C, D], self_columns [M], refined targets ybar [M, C]. q_extra [E, D]
    (local crops) add onehot rows with positives extra_columns [E]."""
    onehot = one_hot_columns(self_columns, keys.shape[0]).float()
    rows = [soft_contrastive_rows(q, keys, onehot, tau)]
    if q_extra is not None and q_extra.shape[0] > 0:
        rows.append(soft_contrastive_rows(q_extra, keys, one_hot_columns(extra_columns, keys.shape[0]).float(), tau))
    mix = soft_contrastive_rows(q_mix, keys, mix_targets(ybar, theta, partner), tau)
    return torch.cat(rows), mix


@register("slr")
class SLRObjective(MomentumObjective):
    term_names = ("loss", "nce", "mix")

    def losses(self, ddp, batch, step, total_steps, autocast):
        cfg = self.cfg
        s, tau = cfg.loss.slr, cfg.loss.tau
        mu = mu_at(step, total_steps, s.mu_start, s.mu_end)
        k1, k2 = self.key_embeddings(batch.globals, autocast)
        x1, x2 = batch.globals.chunk(2)
        b = x1.shape[0]
        offset = self.ctx.rank * b
        columns = torch.arange(b, device=x1.device) + offset
        image_pairs = [(x1, x2), (x2, x1)] if cfg.loss.momentum.symmetric else [(x1, x2)]
        draws = [tuple(_to_device(t, x1.device) for t in mixup_draw(b, s.kappa, cfg.train.seed, step, self.ctx.rank, stream))
                 for stream in range(len(image_pairs))]
        mixed = torch.cat([momentum_mixup(xq, xk, theta, partner)
                           for (xq, xk), (theta, partner) in zip(image_pairs, draws)])
        with autocast():
            z_global, _, z_local, _, z_mix = ddp(batch.globals, batch.locals, mixed)
        z1, z2 = z_global.chunk(2)
        queue = self.queue.keys
        onehot_parts, mix_parts = [], []
        for j, ((q, k), q_mix, (theta, partner)) in enumerate(zip(self.pairs(z1, z2, k1, k2), z_mix.float().chunk(len(draws)), draws)):
            keys = torch.cat([wdist.gather_rows(k), queue])  # B = batch positive keys + queue [N + K, D]
            ybar = refinery_targets(k, keys, columns, mu, tau, s.tau_prime)
            extra = z_local if j == 0 else None
            extra_columns = columns.repeat(z_local.shape[0] // b) if extra is not None else None
            o_rows, m_rows = slr_terms(q, q_mix, keys, columns, ybar, theta, partner, tau, extra, extra_columns)
            onehot_parts.append(o_rows)
            mix_parts.append(m_rows)
        nce, mix = torch.cat(onehot_parts).mean(), torch.cat(mix_parts).mean()
        self._pending = wdist.gather_rows(k2)
        return {"loss": (1 - s.lam) * nce + s.lam * mix, "nce": nce, "mix": mix}


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without a synchronising copy (pinned memory, non-blocking on CUDA)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
