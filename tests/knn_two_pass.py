"""The knn multi-crop rule in two passes (1-NN labels first, then the loss against the gathered keys), the
independent form the fused path of wcl_fast.objectives.wcl.knn_graph_rows_fused is tested against."""
from __future__ import annotations

import torch

import kernels
from wcl_fast.objectives.rows import contrastive_rows, nce_rows, one_hot_columns
from wcl_fast.objectives.wcl import WCLTerms, _knn_crops, _knn_labels


@torch.no_grad()
def knn_batch_labels(u1: torch.Tensor, u2: torch.Tensor, u_local: torch.Tensor | None,
                     fixed_blocks: int | None = None, u1_all: torch.Tensor | None = None,
                     u2_all: torch.Tensor | None = None):
    """Image labels [N] of the knn rule for the global batch, from this rank's crops.

    Every rank searches its own crops against all crops of the batch (keys of _knn_crops), and all
    ranks label the same image graph. fixed_blocks=K: no host sync; returns (labels, converged flag).
    """
    queries, query_image, keys, key_image, n = _knn_crops(u1, u2, u_local, u1_all, u2_all)
    nn_idx = kernels.nearest_neighbor(queries.detach(), keys.detach(), query_image, key_image)
    crops = u_local.shape[0] // u1.shape[0] if u_local is not None else 0
    return _knn_labels(nn_idx, u1.shape[0], crops, key_image, n, fixed_blocks)




def _knn_graph_rows(u1, u2, u1_all, u2_all, u_local, rows, image_labels, tau):
    """Head 2 of the knn rule: every crop against [U1; U2] (2N keys) minus its own column."""
    n = u1_all.shape[0]
    keys = torch.cat([u1_all, u2_all])  # [2N, D]
    key_labels = torch.cat([image_labels, image_labels])  # [2N]
    out = []
    for anchors, own in ((u1, rows), (u2, rows + n)):
        self_mask = one_hot_columns(own, 2 * n)
        positive = (image_labels[rows, None] == key_labels[None, :]) & ~self_mask
        out.append(contrastive_rows(anchors, keys, positive, self_mask, tau))
    if u_local is not None and u_local.shape[0] > 0:
        local_rows = rows.repeat(u_local.shape[0] // rows.shape[0])
        positive = image_labels[local_rows, None] == key_labels[None, :]
        out.append(contrastive_rows(u_local, keys, positive, None, tau))
    return out


def wcl_knn_two_pass(z1, z2, u1, u2, z1_all, z2_all, u1_all, u2_all, offset: int = 0, tau: float = 0.1,
                     z_local=None, u_local=None, image_labels=None, graph_tau: float | None = None) -> WCLTerms:
    """Both WCL terms under the knn rule with given image labels [N] (knn_batch_labels): head 1 as in
    wcl_loss_terms; head 2 anchors every crop against the 2N global keys minus its own column,
    positives = keys of images with the same label."""
    rows = torch.arange(z1.shape[0], device=z1.device) + offset
    nce = nce_rows(z1, z2, z1_all, z2_all, offset, tau, z_local).mean()
    tau = tau if graph_tau is None else graph_tau
    return WCLTerms(nce, torch.cat(_knn_graph_rows(u1, u2, u1_all, u2_all, u_local, rows, image_labels, tau)).mean())
