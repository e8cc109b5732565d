"""The WCL objective (Zheng et al., ICCV 2021, arXiv 2110.04770; docs/wcl.md §2-3).

Head 1 (instance discrimination, NT-Xent, SimCLR eq. 1):
    l_i = -log( exp(s_ip / tau) / sum_{a != i} exp(s_ia / tau) ),  p = the other view of i.
Head 2 (weak labels, swapped supervised contrastive loss, SupCon eq. 2 of Khosla et al. 2020):
    l_i = -1/|P(i)| sum_{p in P(i)} [ s_ip / tau - log sum_{a != i} exp(s_ia / tau) ],
    P(i) = { j != i : y_other_j == y_other_i },
with y_v the connected components of view v's 1-NN graph (kernels.nearest_neighbor +
kernels.connected_components), view 1 anchors using view 2's labels and vice versa.

All logits are computed in float32 and normalised with logsumexp whatever the autocast dtype (the
reference exponentiates without subtracting the max, which overflows in fp16).

Distributed form: rank r owns global rows [r*b, (r+1)*b); the caller passes the gathered key
matrices (see wcl_fast.dist.gather_rows) and `offset = r*b`. Each rank returns the mean over its own
anchors; the global loss is the mean over ranks.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

import kernels
from wcl_fast import dist as wdist
from wcl_fast.objectives.rows import contrastive_rows, nce_rows, one_hot_columns, rows_from_logits
from wcl_fast.config import Config
from wcl_fast.objectives.base import Objective, register


class WCLTerms(NamedTuple):
    nce: torch.Tensor  # head-1 term (scalar)
    graph: torch.Tensor  # head-2 term (scalar)


@torch.no_grad()
def weak_labels(u_all: torch.Tensor) -> torch.Tensor:
    """Weak labels [N] of one view: components of the undirected 1-NN graph of u_all [N, D] (self excluded)."""
    return kernels.connected_components(kernels.nearest_neighbor(u_all.detach()))


@torch.no_grad()
def weak_labels_sharded(u_local: torch.Tensor, u_all: torch.Tensor, offset: int) -> torch.Tensor:
    """Weak labels [N] computed cooperatively: this rank finds the 1-NN of its own rows
    (global ids offset..offset+b) among all N keys, the indices are all-gathered in rank order, and
    every rank labels the same graph, so all ranks hold identical labels (no rank-0 scatter).
    """
    return kernels.connected_components(nearest_sharded(u_local, u_all, offset))  # [N]


@torch.no_grad()
def nearest_sharded(u_local: torch.Tensor, u_all: torch.Tensor, offset: int) -> torch.Tensor:
    """The 1-NN graph [N] of weak_labels_sharded: each rank's rows searched among all N keys, gathered."""
    rows = torch.arange(u_local.shape[0], device=u_local.device) + offset
    columns = torch.arange(u_all.shape[0], device=u_all.device)
    local_nn = kernels.nearest_neighbor(u_local.detach(), u_all.detach(), rows, columns)  # [b]
    return wdist.gather_rows(local_nn)  # [N]


def _knn_crops(u1: torch.Tensor, u2: torch.Tensor, u_local: torch.Tensor | None,
               u1_all: torch.Tensor | None = None, u2_all: torch.Tensor | None = None):
    """This rank's crops as queries, every crop of the global batch as keys, for the knn rule.

    queries [(2+L)b, D] = [u1; u2; u_local] with their global image ids; keys view-major
    [U1_all; U2_all; L_all] (L_all: the gathered local crops, rank-major, crop-major inside a rank) with
    theirs, so the first 2N key columns are exactly head 2's loss keys [U1_all; U2_all].
    u1_all / u2_all: the already gathered global crops (default: gathered here, detached).
    Returns (queries, query_image, keys, key_image, N).
    """
    b, device = u1.shape[0], u1.device
    world, rank = wdist.world_size(), wdist.rank()
    u1_all = wdist.gather_rows(u1.detach()) if u1_all is None else u1_all
    u2_all = wdist.gather_rows(u2.detach()) if u2_all is None else u2_all
    n = u1_all.shape[0]
    crops = u_local.shape[0] // b if u_local is not None else 0
    rows = torch.arange(b, device=device) + rank * b
    ids = torch.arange(n, device=device)
    queries = torch.cat([u1, u2] + ([u_local] if crops else []))
    query_image = torch.cat([rows, rows] + ([rows.repeat(crops)] if crops else []))
    keys, key_image = [u1_all, u2_all], [ids, ids]
    if crops:
        keys.append(wdist.gather_rows(u_local.detach()))
        key_image.append((torch.arange(b, device=device).repeat(crops)[None, :]
                          + b * torch.arange(world, device=device)[:, None]).flatten())
    return queries, query_image, torch.cat(keys), torch.cat(key_image), n


def _knn_labels(nn_idx: torch.Tensor, b: int, crops: int, key_image: torch.Tensor, n: int,
                fixed_blocks: int | None, graph: dict | None = None):
    """Image labels from this rank's 1-NN indices: all ranks' indices are gathered (rank order) and
    every rank labels the same image graph (edges: query image - image of its 1-NN crop).
    graph: a dict that receives 'nn', the image of each global crop's 1-NN per view ([N] each)."""
    world = wdist.world_size()
    if world > 1:
        nn_idx = wdist.gather_rows(nn_idx)
    ids = torch.arange(b, device=nn_idx.device)
    per_rank = torch.cat([ids, ids] + ([ids.repeat(crops)] if crops else []))
    query_image = torch.cat([per_rank + r * b for r in range(world)])
    target = key_image[nn_idx]
    if graph is not None:  # rank-major blocks of (2 + crops) x b queries: view 1, view 2, the local crops
        blocks = target.view(world, 2 + crops, b)
        graph["nn"] = (blocks[:, 0].reshape(-1), blocks[:, 1].reshape(-1))
    return kernels.connected_components_edges(query_image, target, n, fixed_blocks=fixed_blocks)


def knn_graph_rows_fused(u1: torch.Tensor, u2: torch.Tensor, u_local: torch.Tensor | None,
                         u1_all: torch.Tensor, u2_all: torch.Tensor, tau: float,
                         fixed_blocks: int | None = None, backend: str = "auto", graph: dict | None = None):
    """Head 2 of the knn rule from ONE similarity pass (the "fused similarity matrix" path).

    kernels.similarity_nearest_neighbor computes, for this rank's crops [u1; u2; u_local] against all
    crops [U1_all; U2_all; L_all], the 1-NN of every crop among other images AND the logits against the
    first 2N keys [U1_all; U2_all] -- the loss keys -- so the Triton backend reads each key tile once
    for both. Labels follow from the gathered indices; the loss rows then equal _knn_graph_rows with
    those labels (the two-pass form of tests/knn_two_pass.py): global crops exclude their own column, positives = keys of same-label images.
    Returns (per-anchor losses [(2+L)b] fp32 in [u1, u2, local] order, labels [N], converged or None).
    graph: a dict that receives the weak-label graph for wcl_fast/diagnostics.py ('labels', 'nn').
    """
    queries, query_image, keys, key_image, n = _knn_crops(u1, u2, u_local, u1_all, u2_all)
    b = u1.shape[0]
    crops = u_local.shape[0] // b if u_local is not None else 0
    nn_idx, logits = kernels.similarity_nearest_neighbor(queries, keys, query_image, key_image, tau,
                                                         logit_columns=2 * n, backend=backend)
    with torch.no_grad():
        result = _knn_labels(nn_idx, b, crops, key_image, n, fixed_blocks, graph)
    labels, converged = result if fixed_blocks is not None else (result, None)
    if graph is not None:
        graph["labels"] = (labels,)
    rows = query_image[:b]
    own = one_hot_columns(torch.cat([rows, rows + n]), 2 * n)  # the global anchors' own columns
    self_mask = torch.cat([own, own.new_zeros(crops * b, 2 * n)])
    positive = (labels[query_image][:, None] == torch.cat([labels, labels])[None, :]) & ~self_mask
    return rows_from_logits(logits, positive, self_mask), labels, converged


def wcl_loss_terms(
    z1: torch.Tensor,
    z2: torch.Tensor,
    u1: torch.Tensor,
    u2: torch.Tensor,
    z1_all: torch.Tensor,
    z2_all: torch.Tensor,
    u1_all: torch.Tensor,
    u2_all: torch.Tensor,
    offset: int = 0,
    tau: float = 0.1,
    z_local: torch.Tensor | None = None,
    u_local: torch.Tensor | None = None,
    labels: tuple[torch.Tensor, torch.Tensor] | None = None,
    graph_tau: float | None = None,
) -> WCLTerms:
    """Both WCL terms for this rank's anchors.

    z1, z2, u1, u2: this rank's global-view embeddings [b, D] (rows offset..offset+b of the batch).
    z1_all .. u2_all: the gathered embeddings of all ranks [N, D] (this rank's block included).
    z_local, u_local: local-crop embeddings [L*b, D] (crop-major: crop l of sample i is row l*b+i),
    anchored with the `inherit` rule of docs/wcl.md §3; None for the 2-view recipe (the `knn` rule's head 2
    is knn_graph_rows_fused).
    labels: precomputed (y1, y2) [N]; default: computed here from u1_all / u2_all.
    graph_tau: head 2's temperature (None = tau, the paper's setting).
    Returns the head-1 and head-2 terms, each the mean over all of this rank's anchors.
    """
    b, n = z1.shape[0], z1_all.shape[0]
    device = z1.device
    rows = torch.arange(b, device=device) + offset  # global index of each local sample [b]
    y1, y2 = labels if labels is not None else (weak_labels(u1_all), weak_labels(u2_all))

    nce = nce_rows(z1, z2, z1_all, z2_all, offset, tau, z_local).mean()  # the same under both multi-crop rules
    tau = tau if graph_tau is None else graph_tau  # head 2 from here on
    has_local = z_local is not None and z_local.shape[0] > 0
    # Head 2, global anchors: view v against U_v without itself, positives from the other view's labels.
    self_mask = one_hot_columns(rows, n)  # [b, N]
    same2 = (y2[rows, None] == y2[None, :]) & ~self_mask  # [b, N]
    same1 = (y1[rows, None] == y1[None, :]) & ~self_mask
    graph_rows = [contrastive_rows(u1, u1_all, same2, self_mask, tau),
                  contrastive_rows(u2, u2_all, same1, self_mask, tau)]  # 2 x [b]

    if has_local:
        local_rows = rows.repeat(z_local.shape[0] // b)  # [L*b] global sample index of each local crop
        # inherit: labels of the image's global crops; the image's own column is a positive.
        pos_u1 = y2[local_rows, None] == y2[None, :]  # [L*b, N]
        pos_u2 = y1[local_rows, None] == y1[None, :]
        graph_rows.append(0.5 * (contrastive_rows(u_local, u1_all, pos_u1, None, tau)
                                 + contrastive_rows(u_local, u2_all, pos_u2, None, tau)))
    return WCLTerms(nce, torch.cat(graph_rows).mean())


def wcl_loss(z1: torch.Tensor, z2: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor,
             tau: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(nce_loss, graph_loss) of docs/wcl.md §2 for two views on one process; total = their sum.

    z1, z2: head-1 embeddings, u1, u2: head-2 embeddings, all L2-normalised, shape [N, D].
    """
    terms = wcl_loss_terms(z1, z2, u1, u2, z1, z2, u1, u2, offset=0, tau=tau)
    return terms.nce, terms.graph


# ---- the objective: gathering, the multi-crop rule, the terms ----

KNN_LABEL_BLOCKS = 2  # sync-free image-graph labelling: 2 blocks of ceil(log2 N) + 1 hook/compress rounds


def compute_loss(cfg: Config, z_global, u_global, z_local, u_local, rank: int, flags: dict | None = None,
                 graph: dict | None = None):
    """Gather the keys across ranks and evaluate the WCL terms for this rank's anchors.

    flags: optional dict; in knn mode its 'unconverged' entry (device tensor) counts labellings that
    did not converge within KNN_LABEL_BLOCKS (read at log intervals only).
    graph: optional dict that receives the weak-label graph the loss used, for wcl_fast/diagnostics.py:
    'labels' (inherit: (y1, y2); knn: (y,) of the image graph) and 'nn' (the two views' 1-NN, [N] each;
    knn: the image of each global crop's 1-NN). The same on every rank.
    """
    differentiable = cfg.loss.gather == "differentiable"
    z1, z2 = z_global.chunk(2)  # [b, D] each
    u1, u2 = u_global.chunk(2)
    gathered = [wdist.gather_rows(t, differentiable) for t in (z1, z2, u1, u2)]  # [N, D] each
    offset = rank * z1.shape[0]
    if cfg.loss.multicrop_rule == "knn" and z_local is not None:  # one pass: crops' 1-NN + head-2 logits
        graph_tau = cfg.loss.tau if cfg.loss.graph_tau is None else cfg.loss.graph_tau
        graph_rows, _, converged = knn_graph_rows_fused(u1, u2, u_local, gathered[2], gathered[3], graph_tau,
                                                        fixed_blocks=KNN_LABEL_BLOCKS,
                                                        backend=cfg.loss.similarity_backend, graph=graph)
        if flags is not None:
            flags["unconverged"] = flags.get("unconverged", 0) + (~converged).to(torch.float32)
        nce = nce_rows(z1, z2, gathered[0], gathered[1], offset, cfg.loss.tau, z_local).mean()
        return WCLTerms(nce, graph_rows.mean())
    # one path for one and many processes: each rank searches its own rows, every rank gets the same labels
    nn = (nearest_sharded(u1, gathered[2], offset), nearest_sharded(u2, gathered[3], offset))
    labels = (kernels.connected_components(nn[0]), kernels.connected_components(nn[1]))  # weak_labels_sharded's
    if graph is not None:
        graph.update(labels=labels, nn=nn)
    return wcl_loss_terms(z1, z2, u1, u2, *gathered, offset=offset, tau=cfg.loss.tau,
                          z_local=z_local, u_local=u_local, labels=labels, graph_tau=cfg.loss.graph_tau)


@register("wcl")
class WCLObjective(Objective):
    term_names = ("loss", "nce", "graph")

    @classmethod
    def uses_head2(cls, cfg):
        return True

    def losses(self, ddp, batch, step, total_steps, autocast):
        with autocast():
            z_global, u_global, z_local, u_local = ddp(batch.globals, batch.locals)
        self.graph = {}  # this step's weak-label graph, read by wcl_fast/diagnostics.py
        terms = compute_loss(self.cfg, z_global, u_global, z_local, u_local, self.ctx.rank, self.flags, self.graph)
        return {"loss": terms.nce + self.cfg.loss.graph_weight * terms.graph, "nce": terms.nce, "graph": terms.graph}
