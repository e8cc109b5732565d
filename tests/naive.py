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
    """docs/wcl.md §2-3 (inherit rule), one anchor at a time, float64."""
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
    """docs/wcl.md §3, `knn` rule, float64 loops: one image graph over all crops."""
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


# ---- related objectives (docs/objectives.md), float64 loops ----

def softmax(values: np.ndarray) -> np.ndarray:
    e = np.exp(values - values.max())
    return e / e.sum()


def nt_xent(z1, z2, tau=0.1, z_local=None) -> float:
    """SimCLR NT-Xent over 2N anchors (+ local crops with the WCL multi-crop rule)."""
    z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
    n = len(z1)
    keys = np.concatenate([z1, z2])
    rows = [ce_row(keys @ z1[i], tau, [n + i], {i}) for i in range(n)]
    rows += [ce_row(keys @ z2[i], tau, [i], {n + i}) for i in range(n)]
    if z_local is not None:
        for row, z in enumerate(np.asarray(z_local, np.float64)):
            i = row % n
            rows.append(0.5 * (ce_row(keys @ z, tau, [i], {n + i}) + ce_row(keys @ z, tau, [n + i], {i})))
    return float(np.mean(rows))


def supcon(z1, z2, clusters, tau=0.1, z_local=None, base_tau=None) -> float:
    """SupCon with cluster ids (Cl-InfoNCE): anchors all views, self excluded."""
    z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
    n = len(z1)
    keys = np.concatenate([z1, z2])
    labels = np.concatenate([clusters, clusters])
    rows = []
    for a in range(2 * n):
        positives = [j for j in range(2 * n) if j != a and labels[j] == labels[a]]
        rows.append(ce_row(keys @ keys[a], tau, positives, {a}))
    if z_local is not None:
        for row, z in enumerate(np.asarray(z_local, np.float64)):
            positives = [j for j in range(2 * n) if labels[j] == clusters[row % n]]
            rows.append(ce_row(keys @ z, tau, positives, set()))
    return float(np.mean(rows)) * (tau / base_tau if base_tau else 1.0)


def graph_with_labels(u1, u2, labels, tau=0.1) -> float:
    """WCL head 2 with given labels (dual-head Cl-InfoNCE): view v against U_v minus itself."""
    u1, u2 = np.asarray(u1, np.float64), np.asarray(u2, np.float64)
    n = len(u1)
    rows = []
    for u in (u1, u2):
        for i in range(n):
            positives = [j for j in range(n) if j != i and labels[j] == labels[i]]
            rows.append(ce_row(u @ u[i], tau, positives, {i}))
    return float(np.mean(rows))


def symmetric_kl(q, p, negatives, tau_con) -> float:
    """(KL(P||Q) + KL(Q||P)) / 2 of softmax(q.n / tau_con) and softmax(p.n / tau_con)."""
    Q = softmax(np.array([q @ n for n in negatives]) / tau_con)
    P = softmax(np.array([p @ n for n in negatives]) / tau_con)
    return 0.5 * (sum(P[k] * (np.log(P[k]) - np.log(Q[k])) for k in range(len(P)))
                  + sum(Q[k] * (np.log(Q[k]) - np.log(P[k])) for k in range(len(P))))


def co2_batch(z1, z2, tau, tau_con, alpha) -> tuple[float, float]:
    """(NT-Xent, consistency) of the batch form: negatives exclude both views of the query's image."""
    z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
    n = len(z1)
    keys = np.concatenate([z1, z2])
    reg = []
    for view, (anchors, positives) in enumerate(((z1, z2), (z2, z1))):
        for i in range(n):
            negatives = [keys[j] for j in range(2 * n) if j not in (i, n + i)]
            reg.append(symmetric_kl(anchors[i], positives[i], negatives, tau_con))
    return nt_xent(z1, z2, tau), float(np.mean(reg))


def co2_queue(q, k, queue, tau, tau_con) -> tuple[float, float]:
    q, k, queue = (np.asarray(x, np.float64) for x in (q, k, queue))
    nce, reg = [], []
    for i in range(len(q)):
        logits = np.concatenate([[q[i] @ k[i]], queue @ q[i]]) / tau
        nce.append(logsumexp(logits) - logits[0])
        reg.append(symmetric_kl(q[i], k[i], queue, tau_con))
    return float(np.mean(nce)), float(np.mean(reg))


def refinery(k, keys, self_columns, mu, tau, tau_prime) -> np.ndarray:
    k, keys = np.asarray(k, np.float64), np.asarray(keys, np.float64)
    out = np.zeros((len(k), len(keys)))
    for i in range(len(k)):
        cos = np.array([k[i] @ b / (np.linalg.norm(k[i]) * np.linalg.norm(b)) for b in keys])
        p = softmax(cos / (tau * tau_prime))
        others = [c for c in range(len(keys)) if c != self_columns[i]]
        q = np.zeros(len(keys))
        q[others] = softmax(cos[others] / (tau * tau_prime))
        z = 1 + mu * p.max() + mu * q.max()
        a, b = mu * p.max() / z, mu * q.max() / z
        onehot = np.zeros(len(keys))
        onehot[self_columns[i]] = 1
        out[i] = (1 - a - b) * onehot + a * p + b * q
    return out


def slr(q, q_mix, k, keys, self_columns, mu, tau, tau_prime, theta, partner, lam) -> float:
    """(1 - lam) L_c(q, onehot) + lam L_c(q_mix, y'), loops over queries and keys."""
    q, q_mix, keys = (np.asarray(x, np.float64) for x in (q, q_mix, keys))
    ybar = refinery(k, keys, self_columns, mu, tau, tau_prime)
    onehot, mix = [], []
    for i in range(len(q)):
        logits = keys @ q[i] / tau
        onehot.append(logsumexp(logits) - logits[self_columns[i]])
        target = theta[i] * ybar[i] + (1 - theta[i]) * ybar[partner[i]]
        logits = keys @ q_mix[i] / tau
        mix.append(-sum(target[c] * (logits[c] - logsumexp(logits)) for c in range(len(keys))))
    return (1 - lam) * float(np.mean(onehot)) + lam * float(np.mean(mix))


def spherical_kmeans(x, init_rows, iters) -> np.ndarray:
    """Lloyd's iterations on the sphere from the given initial rows; returns the final assignment."""
    x = np.asarray(x, np.float64)
    centroids = x[list(init_rows)].copy()
    for _ in range(iters):
        assign = np.array([int(np.argmax([c @ xi for c in centroids])) for xi in x])
        for c in range(len(centroids)):
            members = x[assign == c]
            if len(members):
                s = members.sum(axis=0)
                centroids[c] = s / np.linalg.norm(s)
    return np.array([int(np.argmax([c @ xi for c in centroids])) for xi in x])
