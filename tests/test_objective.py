"""WCL loss against the float64 loop reference (tests/naive.py), swap semantics, fp16, DDP."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import naive
from conftest import free_port, normalized
from wcl_fast.objectives.rows import contrastive_rows
from wcl_fast.objectives.wcl import wcl_loss, wcl_loss_terms, weak_labels


@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.1), (5, 4, 0.1), (16, 8, 0.2), (31, 16, 0.1), (64, 32, 0.5)])
def test_wcl_loss_matches_naive(n, d, tau):
    z1, z2, u1, u2 = (normalized(n, d, seed=s) for s in range(4 * n, 4 * n + 4))
    nce, graph = wcl_loss(z1, z2, u1, u2, tau=tau)
    ref_nce, ref_graph = naive.wcl_terms(z1.numpy(), z2.numpy(), u1.numpy(), u2.numpy(), tau)
    assert nce.dtype == torch.float32 and nce.dim() == 0
    assert nce.item() == pytest.approx(ref_nce, rel=1e-5)
    assert graph.item() == pytest.approx(ref_graph, rel=1e-5)


def test_graph_loss_uses_the_other_views_labels():
    # view 1 forms pairs {0,1},{2,3},...; view 2 pairs {1,2},{3,4},...,{N-1,0}: different partitions.
    n, d = 8, 16
    base = normalized(n, d, seed=1) * 0.05
    centers = normalized(n, d, seed=2)
    u1 = torch.nn.functional.normalize(centers[torch.arange(n) // 2] + base, dim=1)
    u2 = torch.nn.functional.normalize(centers[((torch.arange(n) + 1) % n) // 2] + base, dim=1)
    y1, y2 = weak_labels(u1), weak_labels(u2)
    assert not naive.same_partition(y1.numpy(), y2.numpy())
    z1, z2 = normalized(n, d, seed=3), normalized(n, d, seed=4)
    _, graph = wcl_loss(z1, z2, u1, u2)
    swapped = wcl_loss_terms(z1, z2, u1, u2, z1, z2, u1, u2, labels=(y1, y2)).graph
    unswapped = wcl_loss_terms(z1, z2, u1, u2, z1, z2, u1, u2, labels=(y2, y1)).graph
    assert graph.item() == pytest.approx(swapped.item(), rel=1e-6)
    assert abs(graph.item() - unswapped.item()) > 1e-3
    assert graph.item() == pytest.approx(naive.wcl_terms(z1.numpy(), z2.numpy(), u1.numpy(), u2.numpy())[1], rel=1e-5)


@pytest.mark.parametrize("n,locals_", [(6, 2), (12, 6)])
def test_multicrop_inherit_matches_naive(n, locals_):
    d = 8
    z1, z2, u1, u2 = (normalized(n, d, seed=s) for s in range(4))
    z_local, u_local = normalized(locals_ * n, d, seed=10), normalized(locals_ * n, d, seed=11)
    terms = wcl_loss_terms(z1, z2, u1, u2, z1, z2, u1, u2, tau=0.1, z_local=z_local, u_local=u_local)
    ref = naive.wcl_terms(z1.numpy(), z2.numpy(), u1.numpy(), u2.numpy(), 0.1, z_local.numpy(), u_local.numpy())
    assert terms.nce.item() == pytest.approx(ref[0], rel=1e-5)
    assert terms.graph.item() == pytest.approx(ref[1], rel=1e-5)


def test_fp16_inputs_do_not_overflow():
    # all 2048 keys nearly identical: sum_a exp(s/tau) ~ 2048 * e^10 = 4.5e7 overflows fp16 (max 65504)
    n, d = 2048, 16
    base = normalized(1, d, seed=0)
    noise = normalized(n, d, seed=1) * 1e-2
    u = torch.nn.functional.normalize(base + noise, dim=1)
    z1, z2, u1, u2 = u.half(), u.half(), u.half(), u.half()
    naive_sum = torch.exp((u1 @ u1.t()) / 0.1).sum(1)  # what the reference computes, in fp16
    assert torch.isinf(naive_sum).any()
    nce, graph = wcl_loss(z1, z2, u1, u2)
    ref_nce, ref_graph = wcl_loss(z1.double(), z2.double(), u1.double(), u2.double())
    assert torch.isfinite(nce) and torch.isfinite(graph)
    assert nce.item() == pytest.approx(ref_nce.item(), rel=1e-4)
    assert graph.item() == pytest.approx(ref_graph.item(), rel=1e-4)


def test_bf16_autocast_keeps_fp32_logits():
    z = normalized(32, 16, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = contrastive_rows(z, z, torch.eye(32, dtype=torch.bool).roll(1, 1), torch.eye(32, dtype=torch.bool), 0.1)
    assert rows.dtype == torch.float32
    plain = contrastive_rows(z, z, torch.eye(32, dtype=torch.bool).roll(1, 1), torch.eye(32, dtype=torch.bool), 0.1)
    assert torch.allclose(rows, plain)


def test_gradients_flow_to_both_heads():
    n, d = 10, 8
    z1, z2, u1, u2 = (normalized(n, d, seed=s).requires_grad_() for s in range(4))
    nce, graph = wcl_loss(z1, z2, u1, u2)
    (nce + graph).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (z1, z2, u1, u2))


# ---------------------------------------------------------------- distributed (2 gloo processes)

def _rank_worker(rank, world, port, inputs, differentiable, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from wcl_fast.dist import all_reduce_mean, gather_rows

    b = inputs[0].shape[0] // world
    z1, z2, u1, u2 = (x[rank * b:(rank + 1) * b].clone().requires_grad_() for x in inputs[:4])
    crops = inputs[4].shape[0] // inputs[0].shape[0]
    z_local, u_local = (torch.cat([c[rank * b:(rank + 1) * b] for c in x.chunk(crops)]) for x in inputs[4:])
    gathered = [gather_rows(t, differentiable) for t in (z1, z2, u1, u2)]
    terms = wcl_loss_terms(z1, z2, u1, u2, *gathered, offset=rank * b, z_local=z_local, u_local=u_local)
    loss = terms.nce + terms.graph
    loss.backward()
    mean = all_reduce_mean(torch.stack([terms.nce.detach(), terms.graph.detach()]))
    from wcl_fast.objectives.wcl import weak_labels_sharded

    sharded = weak_labels_sharded(u1, gathered[2], rank * b).numpy().copy()
    from knn_two_pass import knn_batch_labels, wcl_knn_two_pass

    knn_labels = knn_batch_labels(u1.detach(), u2.detach(), u_local)
    knn_terms = wcl_knn_two_pass(z1, z2, u1, u2, *gathered, offset=rank * b, z_local=z_local, u_local=u_local,
                               image_labels=knn_labels)
    from wcl_fast.objectives.wcl import knn_graph_rows_fused

    fused_rows, fused_labels, _ = knn_graph_rows_fused(u1, u2, u_local, gathered[2], gathered[3], 0.1)
    assert torch.equal(fused_labels, knn_labels)  # the same search, the same labels on every rank
    knn_mean = all_reduce_mean(torch.stack([knn_terms.nce.detach(), knn_terms.graph.detach(), fused_rows.mean().detach()]))
    queue.put((rank, mean.tolist(), [t.grad.numpy().copy() for t in (z1, z2, u1, u2)],
               (sharded, knn_labels.numpy().copy(), knn_mean.tolist())))
    dist.destroy_process_group()


def _run_two_ranks(inputs, differentiable):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_worker, args=(r, 2, port, inputs, differentiable, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (m, g, labels)) for r, m, g, labels in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def _inputs(n=12, d=8, local_crops=2):
    base = [normalized(n, d, seed=s) for s in range(4)]
    # local crops for 2 ranks: crop-major over the global batch, [L*n, d]
    return base + [normalized(local_crops * n, d, seed=20), normalized(local_crops * n, d, seed=21)]


def test_two_processes_give_the_single_process_loss_and_gradients():
    inputs = _inputs()
    n = inputs[0].shape[0]
    z1, z2, u1, u2, zl, ul = inputs
    # Single process, crop-major local rows reordered as rank 0's then rank 1's rows are: same set of anchors.
    full = [t.clone().requires_grad_() for t in (z1, z2, u1, u2)]
    terms = wcl_loss_terms(*full, *full, offset=0, z_local=zl, u_local=ul)
    (terms.nce + terms.graph).backward()
    results = _run_two_ranks(inputs, differentiable=True)
    single_labels = weak_labels(u1).numpy()
    from knn_two_pass import knn_batch_labels, wcl_knn_two_pass

    single_knn = knn_batch_labels(u1, u2, ul)
    knn_terms = wcl_knn_two_pass(z1, z2, u1, u2, z1, z2, u1, u2, z_local=zl, u_local=ul, image_labels=single_knn)
    for rank in range(2):
        mean, grads, (sharded_labels, knn_labels, knn_mean) = results[rank]
        assert naive.same_partition(knn_labels, single_knn.numpy())
        assert knn_mean[0] == pytest.approx(knn_terms.nce.item(), rel=1e-5)
        assert knn_mean[1] == pytest.approx(knn_terms.graph.item(), rel=1e-5)
        assert knn_mean[2] == pytest.approx(knn_terms.graph.item(), rel=1e-5)  # one-pass (fused) form
        # sharded 1-NN search: every rank holds the single-process partition (identical label ids)
        assert sharded_labels.tolist() == single_labels.tolist()
        assert mean[0] == pytest.approx(terms.nce.item(), rel=1e-5)
        assert mean[1] == pytest.approx(terms.graph.item(), rel=1e-5)
        # differentiable gather: each rank's rows get world x the full-batch gradient of the mean loss
        b = n // 2
        for got, ref in zip(grads, full):
            torch.testing.assert_close(torch.from_numpy(got), 2 * ref.grad[rank * b:(rank + 1) * b], rtol=1e-4, atol=1e-6)


def test_detached_gather_matches_reference_semantics():
    inputs = _inputs()
    n = inputs[0].shape[0]
    b = n // 2
    results = _run_two_ranks(inputs, differentiable=False)
    z1, z2, u1, u2, zl, ul = inputs
    for rank in range(2):
        # single-process emulation: other rank's rows are constants, only this rank's block has gradient
        local = [t[rank * b:(rank + 1) * b].clone().requires_grad_() for t in (z1, z2, u1, u2)]
        gathered = []
        for full, mine in zip((z1, z2, u1, u2), local):
            parts = list(full.detach().split(b))
            parts[rank] = mine
            gathered.append(torch.cat(parts))
        z_local = torch.cat([c[rank * b:(rank + 1) * b] for c in zl.chunk(2)])
        u_local = torch.cat([c[rank * b:(rank + 1) * b] for c in ul.chunk(2)])
        terms = wcl_loss_terms(*local, *gathered, offset=rank * b, z_local=z_local, u_local=u_local)
        (terms.nce + terms.graph).backward()
        _, grads, _ = results[rank]
        for got, ref in zip(grads, local):
            torch.testing.assert_close(torch.from_numpy(got), ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n,crops", [(5, 2), (12, 6)])
def test_knn_multicrop_rule_matches_naive(n, crops):
    from knn_two_pass import knn_batch_labels, wcl_knn_two_pass

    d = 8
    z1, z2, u1, u2 = (normalized(n, d, seed=s + 40) for s in range(4))
    z_local, u_local = normalized(crops * n, d, seed=50), normalized(crops * n, d, seed=51)
    labels = knn_batch_labels(u1, u2, u_local)
    ref_nce, ref_graph, ref_labels = naive.knn_rule_terms(z1.numpy(), z2.numpy(), u1.numpy(), u2.numpy(),
                                                          z_local.numpy(), u_local.numpy())
    assert naive.same_partition(labels.numpy(), ref_labels)
    terms = wcl_knn_two_pass(z1, z2, u1, u2, z1, z2, u1, u2, z_local=z_local, u_local=u_local,
                           image_labels=labels)
    assert terms.nce.item() == pytest.approx(ref_nce, rel=1e-5)
    assert terms.graph.item() == pytest.approx(ref_graph, rel=1e-5)


@pytest.mark.parametrize("n,crops", [(5, 2), (12, 6)])
def test_knn_one_pass_form_matches_naive_and_the_two_pass_form(n, crops):
    """knn_graph_rows_fused (1-NN + logits from one similarity pass; the trainer's knn path) equals the
    float64 loops and, gradient included, the two-pass form (tests/knn_two_pass.py)."""
    from knn_two_pass import knn_batch_labels, wcl_knn_two_pass
    from wcl_fast.objectives.wcl import knn_graph_rows_fused

    d = 8
    z1, z2, u1, u2 = (normalized(n, d, seed=s + 60) for s in range(4))
    z_local, u_local = normalized(crops * n, d, seed=70), normalized(crops * n, d, seed=71)
    _, ref_graph, ref_labels = naive.knn_rule_terms(z1.numpy(), z2.numpy(), u1.numpy(), u2.numpy(),
                                                    z_local.numpy(), u_local.numpy())
    leaves = [t.clone().requires_grad_() for t in (u1, u2, u_local)]
    rows, labels, converged = knn_graph_rows_fused(*leaves, leaves[0], leaves[1], 0.1, fixed_blocks=2, backend="torch")
    assert rows.shape == ((2 + crops) * n,) and bool(converged)
    assert naive.same_partition(labels.numpy(), ref_labels)
    assert rows.mean().item() == pytest.approx(ref_graph, rel=1e-5)
    rows.mean().backward()
    two_pass = [t.clone().requires_grad_() for t in (u1, u2, u_local)]
    terms = wcl_knn_two_pass(z1, z2, two_pass[0], two_pass[1], z1, z2, two_pass[0], two_pass[1], z_local=z_local,
                           u_local=two_pass[2], image_labels=knn_batch_labels(u1, u2, u_local))
    terms.graph.backward()
    for ours, theirs in zip(leaves, two_pass):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7)


def test_edge_components_match_scipy_on_random_and_adversarial_graphs():
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    from kernels import connected_components_edges

    rng = np.random.default_rng(0)
    graphs = []
    for _ in range(20):
        n = int(rng.integers(1, 400))
        e = int(rng.integers(0, 2 * n))
        graphs.append((n, rng.integers(0, n, e), rng.integers(0, n, e)))
    n = 2000
    perm = rng.permutation(n)
    graphs.append((n, perm[:-1], perm[1:]))  # a long path with shuffled ids
    graphs.append((n, np.arange(n - 1), np.arange(1, n)))  # a long ordered path
    for n, src, dst in graphs:
        labels = connected_components_edges(torch.tensor(src, dtype=torch.int64), torch.tensor(dst, dtype=torch.int64), n)
        ref = connected_components(csr_matrix((np.ones(len(src)), (src, dst)), shape=(n, n)), directed=False)[1]
        assert naive.same_partition(labels.numpy(), ref)


def test_sync_free_edge_components_report_convergence():
    from kernels import connected_components_edges

    n = 4096
    path = torch.randperm(n, generator=torch.Generator().manual_seed(0))  # a path with shuffled ids
    labels, converged = connected_components_edges(path[:-1], path[1:], n, check_every=1, fixed_blocks=1)
    assert not bool(converged) and len(set(labels.tolist())) > 1  # one round cannot label a long path
    exact = connected_components_edges(path[:-1], path[1:], n)
    assert len(set(exact.tolist())) == 1
    x = normalized(n, 16, seed=1).view(n // 4, 4, 16)  # 1024 images x 4 crops (2 global, 2 local)
    from knn_two_pass import knn_batch_labels

    u1, u2, u_local = x[:, 0], x[:, 1], torch.cat([x[:, 2], x[:, 3]])
    fixed, ok = knn_batch_labels(u1, u2, u_local, fixed_blocks=2)
    assert bool(ok)
    assert torch.equal(fixed, knn_batch_labels(u1, u2, u_local))
