"""Cl-InfoNCE (Tsai et al., ICLR 2022, arXiv 2202.06670; docs/objectives.md §2).

Stage 1 clusters the data (by an auxiliary attribute from a CSV column, or by K-means on the
current head-1 embeddings of the whole training set under the evaluation transform); stage 2 is the
supervised contrastive loss (SupCon, Khosla et al., NeurIPS 2020, eq. 2) with the cluster id as label:
    l_a = -1/|P(a)| sum_{p in P(a)} log( exp(s_ap / tau) / sum_{k != a} exp(s_ak / tau) ),
anchors a = all view embeddings, P(a) = the other embeddings with a's cluster id (it always holds
the other view of a's image), scaled by tau / base_tau (0.07) as the reference code does.
The dual-head form keeps WCL's head 1 and uses the cluster-equality mask instead of the 1-NN
components on head 2 (wcl_loss_terms with labels = (clusters, clusters)).
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.nn.functional as F

from wcl_fast.config import ConfigError
from wcl_fast.objectives.rows import contrastive_rows, one_hot_columns
from wcl_fast import dist as wdist
from wcl_fast.objectives.base import Objective, register
from wcl_fast.objectives.wcl import wcl_loss_terms


def supcon_rows(anchors: torch.Tensor, anchor_labels: torch.Tensor, anchor_columns: torch.Tensor | None,
                keys: torch.Tensor, key_labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-anchor SupCon loss [M]: positives = keys with the anchor's label except the anchor's own
    column (anchor_columns [M], or None when the anchor is not among the keys), which is also left
    out of the denominator."""
    positive = anchor_labels[:, None] == key_labels[None, :]  # [M, K]
    excluded = None
    if anchor_columns is not None:
        excluded = one_hot_columns(anchor_columns, keys.shape[0])
        positive = positive & ~excluded
    return contrastive_rows(anchors, keys, positive, excluded, tau)


def clinfonce_loss(z1: torch.Tensor, z2: torch.Tensor, z1_all: torch.Tensor, z2_all: torch.Tensor,
                   clusters_all: torch.Tensor, offset: int = 0, tau: float = 0.1,
                   z_local: torch.Tensor | None = None, base_tau: float | None = 0.07) -> torch.Tensor:
    """Single-head Cl-InfoNCE for this rank's anchors.

    z1, z2 [b, D]: this rank's views (global rows offset..offset+b); z1_all, z2_all [N, D]: gathered;
    clusters_all [N]: cluster id of every sample of the global batch. Local crops [L*b, D] are extra
    anchors against the 2N global keys with every key of their cluster as a positive.
    """
    b, n = z1.shape[0], z1_all.shape[0]
    rows = torch.arange(b, device=z1.device) + offset
    keys = torch.cat([z1_all, z2_all])  # [2N, D]
    key_labels = torch.cat([clusters_all, clusters_all])  # [2N]
    mine = clusters_all[rows]
    out = [supcon_rows(torch.cat([z1, z2]), torch.cat([mine, mine]), torch.cat([rows, rows + n]), keys, key_labels, tau)]
    if z_local is not None and z_local.shape[0] > 0:
        out.append(supcon_rows(z_local, mine.repeat(z_local.shape[0] // b), None, keys, key_labels, tau))
    scale = tau / base_tau if base_tau else 1.0
    return scale * torch.cat(out).mean()


def load_cluster_csv(path: str, column: str, key_column: str, num_samples: int,
                     sample_paths: list[str] | None = None, root: str = "") -> torch.Tensor:
    """Cluster ids [num_samples] (int64, 0..C-1 in order of first appearance) from a CSV column.

    Rows are keyed by `index` (sample id) or `path` (relative to `root`, or absolute); key_column=''
    picks 'index' when present, else 'path'. Every training sample needs exactly one row.
    """
    where = f"loss.clinfonce.clusters_csv: '{path}'"
    if not Path(path).is_file():
        raise ConfigError(f"{where} does not exist; give a CSV with a header row, or '' for K-means clusters")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        key_column = key_column or ("index" if "index" in header else "path")
        for needed, key in ((column, "loss.clinfonce.cluster_column"), (key_column, "loss.clinfonce.key_column")):
            if needed not in header:
                raise ConfigError(f"{where} has no column '{needed}' ({key}); its columns: {', '.join(header) or 'none'}")
        rows = list(reader)
    if key_column == "index":
        lookup = None
    else:
        if sample_paths is None:
            raise ConfigError(f"{where}: the {key_column!r} key needs an image folder; use an 'index' column with this backend")
        lookup = {}
        for i, sample in enumerate(sample_paths):
            lookup[sample] = i
            lookup[str(Path(sample).relative_to(root)) if root else sample] = i
    table = torch.full((num_samples,), -1, dtype=torch.int64)
    ids: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        key = row[key_column]
        if lookup is None:
            try:
                sample = int(key)
            except ValueError:
                raise ConfigError(f"{where} line {line}: index {key!r} is not an integer") from None
            if not 0 <= sample < num_samples:
                raise ConfigError(f"{where} line {line}: index {sample} is outside 0..{num_samples - 1}")
        else:
            if key not in lookup:
                raise ConfigError(f"{where} line {line}: path {key!r} is not a training image of {root or 'the dataset'}")
            sample = lookup[key]
        table[sample] = ids.setdefault(row[column], len(ids))
    missing = (table < 0).nonzero().flatten()
    if missing.numel():
        first = int(missing[0])
        name = sample_paths[first] if sample_paths is not None else f"index {first}"
        raise ConfigError(f"{where} has no row for {missing.numel()} of {num_samples} training samples "
                          f"(first: {name}); every sample needs a cluster")
    return table


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0, chunk: int = 65536,
                     use_faiss: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K-means on the unit sphere (cosine similarity; Lloyd's iterations): x [n, d] L2-normalised ->
    (assignment [n] int64, centroids [k, d]). Initial centroids are k distinct rows chosen by a
    generator seeded with `seed`; an emptied cluster is re-seeded at the point with the lowest
    similarity to its centroid. faiss (when installed and use_faiss is not False) runs the same
    algorithm on its own kernels.
    """
    n = x.shape[0]
    if not 0 < k <= n:
        raise ConfigError(f"loss.clinfonce.kmeans_k={k} must be between 1 and the number of samples ({n})")
    if use_faiss is not False:
        try:
            import faiss  # noqa: F401
        except ImportError:
            faiss = None
        if faiss is not None:
            return _faiss_kmeans(x, k, iters, seed)
    x = x.float()
    generator = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()  # [k, d]
    assign = None
    for _ in range(iters):
        assign, best = _assign(x, centroids, chunk)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # [k, d]
        counts = torch.bincount(assign, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():  # re-seed empty clusters at the worst-fitting points
            worst = best.argsort()[: empty.numel()]
            sums[empty] = x[worst]
        centroids = F.normalize(sums, dim=1)
    assign, _ = _assign(x, centroids, chunk)
    return assign, centroids


def _assign(x, centroids, chunk):
    assign, best = [], []
    for start in range(0, x.shape[0], chunk):
        sims = x[start:start + chunk] @ centroids.t()  # [c, k]
        value, index = sims.max(dim=1)
        assign.append(index)
        best.append(value)
    return torch.cat(assign), torch.cat(best)


def _faiss_kmeans(x, k, iters, seed):
    import faiss
    import numpy as np

    data = np.ascontiguousarray(x.detach().float().cpu().numpy())
    km = faiss.Kmeans(data.shape[1], k, niter=iters, seed=seed, spherical=True, verbose=False,
                      gpu=x.device.type == "cuda" and hasattr(faiss, "StandardGpuResources"))
    km.train(data)
    _, index = km.index.search(data, 1)
    centroids = torch.from_numpy(km.centroids).to(x.device)
    return torch.from_numpy(index[:, 0].astype(np.int64)).to(x.device), centroids


@register("clinfonce")
class ClInfoNCEObjective(Objective):
    """Cluster ids per sample (int64 [num_samples] on the device) from a CSV or from K-means."""

    @classmethod
    def uses_head2(cls, cfg):
        return cfg.loss.clinfonce.form == "dual"

    def __init__(self, cfg, model, ctx, data):
        super().__init__(cfg, model, ctx, data)
        c = cfg.loss.clinfonce
        self.term_names = ("loss",) if c.form == "single" else ("loss", "nce", "cluster")
        self.table: torch.Tensor | None = None
        if c.clusters_csv:
            self.table = load_cluster_csv(c.clusters_csv, c.cluster_column, c.key_column, self.num_samples,
                                          data.paths(), cfg.data.train_dir).to(ctx.device)
        elif c.kmeans_k > self.num_samples:
            raise ConfigError(f"loss.clinfonce.kmeans_k={c.kmeans_k} exceeds the {self.num_samples} training samples; lower it")

    def on_epoch_start(self, epoch, start_step):
        c = self.cfg.loss.clinfonce
        if c.clusters_csv or (start_step > 0 and self.table is not None):
            return
        if self.table is None or epoch % c.kmeans_every == 0:
            self.table = self.kmeans_table(epoch)

    @torch.no_grad()
    def kmeans_table(self, epoch: int) -> torch.Tensor:
        """K-means of the head-1 embeddings of every training sample (evaluation transform, embedded by
        the trainer's TrainingSet.embed)."""
        cfg = self.cfg
        if self.data.embed is None:
            raise RuntimeError("K-means Cl-InfoNCE needs TrainingSet.embed (the trainer provides it)")
        z, index = self.data.embed(self.model)
        count = self.num_samples
        assert z.shape[0] <= count and index.unique().numel() == z.shape[0], "each training image embedded once"
        order = index.argsort()
        z, index = z[order], index[order]
        readable, _ = spherical_kmeans(z, cfg.loss.clinfonce.kmeans_k, cfg.loss.clinfonce.kmeans_iters,
                                       seed=cfg.train.seed * 1_000_003 + epoch)
        # unreadable images have no embedding; their ids never reach a training batch (the loaders
        # substitute the next readable sample and report its id), so cluster 0 is never read for them
        assign = torch.zeros(count, dtype=readable.dtype, device=readable.device)
        assign[index] = readable
        if self.ctx.world_size > 1:  # one table for every rank
            torch.distributed.broadcast(assign, src=0)
        return assign

    def losses(self, ddp, batch, step, total_steps, autocast):
        cfg = self.cfg
        with autocast():
            z_global, u_global, z_local, u_local = ddp(batch.globals, batch.locals)
        clusters = self.table[wdist.gather_rows(batch.index)]  # [N]
        z1, z2 = z_global.chunk(2)
        z1_all, z2_all = self._gather(z1, z2)
        offset = self.ctx.rank * z1.shape[0]
        if cfg.loss.clinfonce.form == "single":
            loss = clinfonce_loss(z1, z2, z1_all, z2_all, clusters, offset, cfg.loss.tau, z_local, cfg.loss.clinfonce.base_tau)
            return {"loss": loss}
        u1, u2 = u_global.chunk(2)
        u1_all, u2_all = self._gather(u1, u2)
        terms = wcl_loss_terms(z1, z2, u1, u2, z1_all, z2_all, u1_all, u2_all, offset=offset, tau=cfg.loss.tau,
                               z_local=z_local, u_local=u_local, labels=(clusters, clusters))
        return {"loss": terms.nce + cfg.loss.graph_weight * terms.graph, "nce": terms.nce, "cluster": terms.graph}

    def state_dict(self):
        return {"clusters": self.table}

    def load_state_dict(self, state):
        if not self.cfg.loss.clinfonce.clusters_csv and state.get("clusters") is not None:
            self.table = state["clusters"].to(self.ctx.device)
