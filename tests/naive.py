"""Independent float64 reference implementations (python loops, numpy, scipy) used by the tests."""
from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components


def logsumexp(values: np.ndarray) -> float:
    top = values.max()
    return float(top + np.log(np.exp(values - top).sum()))


def nearest_neighbor(queries, keys=None, query_groups=None, key_groups=None) -> np.ndarray:
    """Loop over queries; strict '>' keeps the smallest index on ties."""
    q = np.asarray(queries, dtype=np.float64)
    k = q if keys is None else np.asarray(keys, dtype=np.float64)
    if keys is None and query_groups is None:
        query_groups = key_groups = np.arange(len(q))
    out = np.full(len(q), -1, dtype=np.int64)
    for i in range(len(q)):
        best, best_j = -np.inf, -1
        for j in range(len(k)):
            if query_groups is not None and query_groups[i] == key_groups[j]:
                continue
            s = float(q[i] @ k[j])
            if s > best:
                best, best_j = s, j
        out[i] = best_j
    return out


def components(nn_idx) -> np.ndarray:
    nn_idx = np.asarray(nn_idx)
    n = len(nn_idx)
    graph = csr_matrix((np.ones(n), (np.arange(n), nn_idx)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def same_partition(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def ce_row(sims: np.ndarray, tau: float, positives, excluded) -> float:
    """-mean_{p in positives} [s_p / tau - log sum_{a not in excluded} exp(s_a / tau)]."""
    keep = np.array([a for a in range(len(sims)) if a not in excluded])
    lse = logsumexp(sims[keep] / tau)
    return -float(np.mean([sims[p] / tau - lse for p in positives]))


def wcl_terms(z1, z2, u1, u2, tau=0.1, z_local=None, u_local=None):
    """Spec wcl.md sections 2 and 3 (inherit rule), one anchor at a time, float64."""
    z1, z2, u1, u2 = (np.asarray(x, dtype=np.float64) for x in (z1, z2, u1, u2))
    n = len(z1)
    y1 = components(nearest_neighbor(u1))
    y2 = components(nearest_neighbor(u2))
    keys = np.concatenate([z1, z2])
    nce = []
    for i in range(n):
        nce.append(ce_row(keys @ z1[i], tau, [n + i], {i}))
    for i in range(n):
        nce.append(ce_row(keys @ z2[i], tau, [i], {n + i}))
    graph = []
    for anchors, keys_u, labels in ((u1, u1, y2), (u2, u2, y1)):
        for i in range(n):
            positives = [j for j in range(n) if j != i and labels[j] == labels[i]]
            graph.append(ce_row(keys_u @ anchors[i], tau, positives, {i}))
    if z_local is not None:
        z_local = np.asarray(z_local, dtype=np.float64)
        u_local = np.asarray(u_local, dtype=np.float64)
        for row in range(len(z_local)):
            i = row % n
            s = keys @ z_local[row]
            nce.append(0.5 * (ce_row(s, tau, [i], {n + i}) + ce_row(s, tau, [n + i], {i})))
            pos1 = [j for j in range(n) if y2[j] == y2[i]]
            pos2 = [j for j in range(n) if y1[j] == y1[i]]
            graph.append(0.5 * (ce_row(u1 @ u_local[row], tau, pos1, set())
                                + ce_row(u2 @ u_local[row], tau, pos2, set())))
    return float(np.mean(nce)), float(np.mean(graph))


def knn_rule_terms(z1, z2, u1, u2, z_local, u_local, tau=0.1):
    """Spec wcl.md section 3, `knn` rule, float64 loops: one image graph over all crops."""
    z1, z2, u1, u2, z_local, u_local = (np.asarray(x, dtype=np.float64) for x in (z1, z2, u1, u2, z_local, u_local))
    n = len(z1)
    crops = np.concatenate([u1, u2, u_local])
    image = np.concatenate([np.arange(n), np.arange(n), np.tile(np.arange(n), len(u_local) // n)])
    nn_crop = nearest_neighbor(crops, crops, image, image)
    edges = [(image[c], image[nn_crop[c]]) for c in range(len(crops))]
    graph = csr_matrix((np.ones(len(edges)), ([a for a, _ in edges], [b for _, b in edges])), shape=(n, n))
    labels = connected_components(graph, directed=False)[1]
    keys1 = np.concatenate([z1, z2])
    nce = [ce_row(keys1 @ z1[i], tau, [n + i], {i}) for i in range(n)]
    nce += [ce_row(keys1 @ z2[i], tau, [i], {n + i}) for i in range(n)]
    for row in range(len(z_local)):
        i = row % n
        s = keys1 @ z_local[row]
        nce.append(0.5 * (ce_row(s, tau, [i], {n + i}) + ce_row(s, tau, [n + i], {i})))
    keys2 = np.concatenate([u1, u2])
    key_label = np.concatenate([labels, labels])
    graph_rows = []
    for view, anchors in ((0, u1), (1, u2)):
        for i in range(n):
            own = view * n + i
            positives = [j for j in range(2 * n) if j != own and key_label[j] == labels[i]]
            graph_rows.append(ce_row(keys2 @ anchors[i], tau, positives, {own}))
    for row in range(len(u_local)):
        i = row % n
        positives = [j for j in range(2 * n) if key_label[j] == labels[i]]
        graph_rows.append(ce_row(keys2 @ u_local[row], tau, positives, set()))
    return float(np.mean(nce)), float(np.mean(graph_rows)), labels
