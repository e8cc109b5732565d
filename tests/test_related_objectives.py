"""SimCLR, Cl-InfoNCE, CO2 and SLR (docs/objectives.md) against float64 loop references (tests/naive.py)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import naive
from wcl_fast.config import ConfigError
from wcl_fast.objectives.clinfonce import clinfonce_loss, load_cluster_csv, spherical_kmeans
from wcl_fast.objectives.co2 import co2_batch_consistency, co2_queue_terms
from wcl_fast.objectives.momentum import EMAEncoder, KeyQueue
from wcl_fast.objectives.simclr import simclr_loss
from wcl_fast.objectives.slr import (mix_targets, mixup_draw, momentum_mixup, mu_at, refinery_targets,
                                     slr_terms)
from wcl_fast.objectives.rows import contrastive_rows, nce_rows
from wcl_fast.objectives.wcl import wcl_loss_terms


def normalized(n, d, generator):
    return F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=1).float()


def _views(n, d, seed, locals_=0):
    g = torch.Generator().manual_seed(seed)
    out = [normalized(n, d, g) for _ in range(2)]
    return out + ([normalized(locals_ * n, d, g)] if locals_ else [None])


@pytest.mark.parametrize("n,d,tau,locals_", [(5, 8, 0.1, 0), (12, 16, 0.2, 2), (33, 4, 0.5, 1)])
def test_simclr_matches_loops(n, d, tau, locals_):
    z1, z2, zl = _views(n, d, n, locals_)
    got = simclr_loss(z1, z2, tau=tau, z_local=zl)
    assert got.item() == pytest.approx(naive.nt_xent(z1, z2, tau, zl), rel=1e-5)


@pytest.mark.parametrize("n,d,tau,k,locals_,base", [(6, 8, 0.1, 2, 0, None), (16, 16, 0.2, 5, 2, 0.07), (25, 4, 0.5, 25, 1, None)])
def test_clinfonce_matches_loops(n, d, tau, k, locals_, base):
    z1, z2, zl = _views(n, d, 100 + n, locals_)
    clusters = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(n))
    got = clinfonce_loss(z1, z2, z1, z2, clusters, tau=tau, z_local=zl, base_tau=base)
    assert got.item() == pytest.approx(naive.supcon(z1, z2, clusters.numpy(), tau, zl, base), rel=1e-5)


def test_clinfonce_with_instance_clusters_is_simclr():
    """Cluster id = instance id: every cluster has size 1, the other view is still the positive."""
    z1, z2, _ = _views(20, 8, 3)
    ids = torch.arange(20)
    assert clinfonce_loss(z1, z2, z1, z2, ids, tau=0.2, base_tau=None).item() == pytest.approx(
        simclr_loss(z1, z2, tau=0.2).item(), rel=1e-6)
    # the reference's tau / 0.07 factor is the only difference with base_tau set
    assert clinfonce_loss(z1, z2, z1, z2, ids, tau=0.2, base_tau=0.07).item() == pytest.approx(
        simclr_loss(z1, z2, tau=0.2).item() * 0.2 / 0.07, rel=1e-6)


def test_clinfonce_dual_head_uses_the_cluster_mask():
    z1, z2, _ = _views(14, 8, 4)
    u1, u2, _ = _views(14, 8, 5)
    clusters = torch.randint(0, 4, (14,), generator=torch.Generator().manual_seed(1))
    terms = wcl_loss_terms(z1, z2, u1, u2, z1, z2, u1, u2, tau=0.1, labels=(clusters, clusters))
    assert terms.nce.item() == pytest.approx(naive.nt_xent(z1, z2, 0.1), rel=1e-5)
    assert terms.graph.item() == pytest.approx(naive.graph_with_labels(u1, u2, clusters.numpy(), 0.1), rel=1e-5)


@pytest.mark.parametrize("n,d,tau_con", [(4, 8, 0.04), (10, 16, 0.5), (23, 4, 1.0)])
def test_co2_batch_matches_loops(n, d, tau_con):
    z1, z2, _ = _views(n, d, 200 + n)
    nce_ref, reg_ref = naive.co2_batch(z1, z2, 0.1, tau_con, 1.0)
    got = co2_batch_consistency(z1, z2, z1, z2, 0, tau_con)
    assert got.item() == pytest.approx(reg_ref, rel=1e-4, abs=1e-7)
    assert nce_rows(z1, z2, z1, z2, 0, 0.1).mean().item() == pytest.approx(nce_ref, rel=1e-5)


@pytest.mark.parametrize("m,k,d", [(3, 7, 8), (12, 40, 16)])
def test_co2_queue_matches_loops(m, k, d):
    g = torch.Generator().manual_seed(m)
    q, key, queue = normalized(m, d, g), normalized(m, d, g), normalized(k, d, g)
    nce, reg = co2_queue_terms(q, key, queue, 0.2, 0.05)
    ref_nce, ref_reg = naive.co2_queue(q, key, queue, 0.2, 0.05)
    assert nce.mean().item() == pytest.approx(ref_nce, rel=1e-5)
    assert reg.mean().item() == pytest.approx(ref_reg, rel=1e-4, abs=1e-7)


def test_co2_alpha_zero_is_infonce_and_alpha_changes_gradient():
    z1, z2, _ = _views(16, 8, 9)

    def grads(alpha):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        nce = nce_rows(a, b, a, b, 0, 0.1).mean()
        loss = nce + alpha * co2_batch_consistency(a, b, a, b, 0, 0.04)
        loss.backward()
        return loss.detach(), nce.detach(), a.grad

    loss0, nce0, grad0 = grads(0.0)
    assert loss0.item() == nce0.item() == pytest.approx(naive.nt_xent(z1, z2, 0.1), rel=1e-5)
    loss1, _, grad1 = grads(10.0)
    assert loss1.item() > loss0.item()
    assert (grad1 - grad0).abs().max().item() > 1e-4  # the regulariser carries gradient
    # and its gradient matches a float64 finite difference of the loop reference
    a = z1.double().clone().requires_grad_()
    reg = co2_batch_consistency(a, z2.double(), a, z2.double(), 0, 0.5)
    reg.backward()
    eps, (i, j) = 1e-6, (2, 3)
    plus, minus = z1.double().clone(), z1.double().clone()
    plus[i, j] += eps
    minus[i, j] -= eps

    def ref_reg(x):  # positives and negatives are constants (detached) in the loss
        out = []
        keys = torch.cat([z1.double(), z2.double()]).numpy()
        for view, (anchors, positives) in enumerate(((x, z2.double()), (z2.double(), z1.double()))):
            for r in range(16):
                negs = [keys[c] for c in range(32) if c not in (r, 16 + r)]
                out.append(naive.symmetric_kl(anchors[r].numpy(), positives[r].numpy(), negs, 0.5))
        return float(np.mean(out))

    numeric = (ref_reg(plus) - ref_reg(minus)) / (2 * eps)
    assert a.grad[i, j].item() == pytest.approx(numeric, rel=1e-4, abs=1e-8)


def test_mu_ramp():
    assert mu_at(0, 100, 0.5, 10) == pytest.approx(0.5)
    assert mu_at(100, 100, 0.5, 10) == pytest.approx(10)
    assert mu_at(50, 100, 0.5, 10) == pytest.approx(5.25)


@pytest.mark.parametrize("m,batch_keys,queue,mu,tp", [(4, 8, 5, 0.5, 1.0), (6, 12, 20, 10.0, 0.5)])
def test_refinery_targets_match_loops(m, batch_keys, queue, mu, tp):
    g = torch.Generator().manual_seed(m)
    keys = normalized(batch_keys + queue, 8, g)
    offset = 2
    cols = torch.arange(m) + offset
    k = keys[cols]  # a query's positive key is its own column of B
    got = refinery_targets(k, keys, cols, mu, 0.2, tp)
    ref = naive.refinery(k, keys, cols.numpy(), mu, 0.2, tp)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got.sum(1).numpy(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("m,extra_keys,mu,lam", [(5, 7, 0.5, 0.5), (8, 20, 4.0, 0.3)])
def test_slr_matches_loops(m, extra_keys, mu, lam):
    g = torch.Generator().manual_seed(10 + m)
    keys = normalized(2 * m + extra_keys, 16, g)
    cols = torch.arange(m) + m  # this rank owns columns m..2m-1 of the batch keys
    k = keys[cols]
    q, q_mix = normalized(m, 16, g), normalized(m, 16, g)
    theta, partner = mixup_draw(m, 0.1, 0, 3, 0)
    ybar = refinery_targets(k, keys, cols, mu, 0.2, 1.0)
    onehot, mix = slr_terms(q, q_mix, keys, cols, ybar, theta, partner, 0.2)
    got = (1 - lam) * onehot.mean() + lam * mix.mean()
    ref = naive.slr(q, q_mix, k, keys, cols.numpy(), mu, 0.2, 1.0, theta.numpy(), partner.numpy(), lam)
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_slr_with_mu_and_lambda_zero_is_infonce():
    g = torch.Generator().manual_seed(1)
    keys, q = normalized(30, 8, g), normalized(6, 8, g)
    cols = torch.arange(6) + 6
    ybar = refinery_targets(keys[cols], keys, cols, 0.0, 0.2, 1.0)
    assert torch.equal(ybar, F.one_hot(cols, 30).float())
    theta, partner = mixup_draw(6, 0.1, 0, 0, 0)
    onehot, _ = slr_terms(q, q, keys, cols, ybar, theta, partner, 0.2)
    positive = F.one_hot(cols, 30).bool()
    np.testing.assert_allclose(onehot.numpy(), contrastive_rows(q, keys, positive, None, 0.2).numpy(), rtol=1e-6)
    for i in range(6):  # and plain InfoNCE by loops
        logits = keys.double().numpy() @ q[i].double().numpy() / 0.2
        assert onehot[i].item() == pytest.approx(naive.logsumexp(logits) - logits[cols[i]], rel=1e-5)


def test_mixup_theta_one_is_identity_and_draws_are_valid():
    g = torch.Generator().manual_seed(0)
    x, xk = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    y = torch.softmax(torch.randn(6, 10, generator=g), 1)
    theta, partner = mixup_draw(6, 0.1, 0, 5, 0)
    ones = torch.ones(6)
    assert torch.equal(momentum_mixup(x, xk, ones, partner), x)
    assert torch.equal(mix_targets(y, ones, partner), y)
    half = torch.full((6,), 0.5)
    assert torch.allclose(momentum_mixup(x, xk, half, partner), 0.5 * x + 0.5 * xk[partner])
    for step in range(20):
        theta, partner = mixup_draw(17, 0.1, 0, step, 1)
        assert sorted(partner.tolist()) == list(range(17)) and (partner != torch.arange(17)).all()
        assert ((theta >= 0) & (theta <= 1)).all()
    a, b = mixup_draw(8, 0.1, 4, 9, 0), mixup_draw(8, 0.1, 4, 9, 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # resumable: a function of (seed, step, rank)
    thetas = torch.cat([mixup_draw(64, 0.1, 0, s, 0)[0] for s in range(50)])
    assert ((thetas < 0.05) | (thetas > 0.95)).float().mean() > 0.6  # Beta(0.1, 0.1) is U-shaped


def test_queue_is_a_fifo():
    queue = KeyQueue(5, 2, torch.device("cpu"))
    expected = queue.keys.clone()
    ptr = 0
    for step in range(4):
        keys = torch.full((3, 2), float(step)) + torch.arange(3.0)[:, None]
        queue.push(keys)
        for r in range(3):  # naive FIFO: overwrite the oldest slot, cyclically
            expected[ptr] = float(step) + r
            ptr = (ptr + 1) % 5
    assert torch.equal(queue.keys, expected) and queue.ptr == ptr
    queue.push(torch.arange(14.0).view(7, 2))  # more keys than slots: the newest 5 stay
    assert sorted(queue.keys[:, 0].tolist()) == [4.0, 6.0, 8.0, 10.0, 12.0]


def test_ema_update_formula():
    from wcl_fast.config import ModelConfig
    from wcl_fast.model import build_model

    online = build_model(ModelConfig(arch="resnet18", head_hidden=16, head_out=8), two_heads=True)
    ema = EMAEncoder(online, 0.9)
    assert ema.model.head2 is None and online.head2 is not None
    before = {n: p.clone() for n, p in ema.model.named_parameters()}
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    ema.update(online)
    source = dict(online.named_parameters())
    for name, p in ema.model.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * source[name], rtol=1e-6, atol=1e-6)
        assert not p.requires_grad


def test_torch_kmeans_matches_loops_and_recovers_blobs():
    g = torch.Generator().manual_seed(0)
    centers = normalized(5, 16, g)
    x = F.normalize(centers.repeat_interleave(40, 0) + 0.15 * torch.randn(200, 16, generator=g), dim=1)
    assign, centroids = spherical_kmeans(x, 5, iters=10, seed=3, use_faiss=False)
    init = torch.randperm(200, generator=torch.Generator().manual_seed(3))[:5]
    ref = naive.spherical_kmeans(x.numpy(), init.tolist(), 10)
    assert naive.same_partition(assign.numpy(), ref)
    x2 = F.normalize(torch.randn(300, 8, generator=g), dim=1)
    init2 = torch.randperm(300, generator=torch.Generator().manual_seed(1))[:7]
    a2, _ = spherical_kmeans(x2, 7, iters=5, seed=1, use_faiss=False)
    assert naive.same_partition(a2.numpy(), naive.spherical_kmeans(x2.numpy(), init2.tolist(), 5))
    truth = np.repeat(np.arange(5), 40)
    best, _ = min((spherical_kmeans(x, 5, 10, seed=s, use_faiss=False) for s in range(5)),
                  key=lambda r: -(r[1][r[0]] * x).sum().item())
    assert naive.same_partition(best.numpy(), truth)
    with pytest.raises(ConfigError, match="kmeans_k"):
        spherical_kmeans(x, 201, use_faiss=False)


def test_cluster_csv(tmp_path):
    root = tmp_path / "train"
    paths = []
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            (root / cls / f"{i}.jpg").write_bytes(b"")
            paths.append(str(root / cls / f"{i}.jpg"))
    by_path = tmp_path / "attrs.csv"
    by_path.write_text("path,tag\na/0.jpg,dog\na/1.jpg,cat\nb/0.jpg,dog\n" + f"{paths[3]},bird\n")
    table = load_cluster_csv(str(by_path), "tag", "", 4, paths, str(root))
    assert table.tolist() == [0, 1, 0, 2]
    by_index = tmp_path / "idx.csv"
    by_index.write_text("index,tag\n3,x\n0,y\n1,x\n2,z\n")
    assert load_cluster_csv(str(by_index), "tag", "", 4).tolist() == [1, 0, 2, 0]
    with pytest.raises(ConfigError, match="no row for 1 of 4 training samples"):
        by_index.write_text("index,tag\n3,x\n0,y\n1,x\n")
        load_cluster_csv(str(by_index), "tag", "", 4)
    with pytest.raises(ConfigError, match="no column 'colour'"):
        load_cluster_csv(str(by_path), "colour", "", 4, paths, str(root))
    with pytest.raises(ConfigError, match="not a training image"):
        by_path.write_text("path,tag\nc/0.jpg,dog\n")
        load_cluster_csv(str(by_path), "tag", "", 4, paths, str(root))
