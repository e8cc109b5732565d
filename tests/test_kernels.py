"""kernels.nearest_neighbor and kernels.connected_components against loops and scipy."""
import numpy as np
import pytest
import torch

import kernels
import naive
from conftest import no_host_sync, normalized, requires_cuda


@pytest.mark.parametrize("m,n,d", [(1, 5, 3), (7, 7, 4), (33, 50, 8), (64, 129, 16)])
def test_nearest_neighbor_matches_loops(m, n, d):
    q, k = normalized(m, d, seed=m), normalized(n, d, seed=n + 100)
    qg = torch.randint(0, 4, (m,), generator=torch.Generator().manual_seed(1))
    kg = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(2))
    got = kernels.nearest_neighbor(q, k, qg, kg)
    assert got.dtype == torch.int64
    assert got.tolist() == naive.nearest_neighbor(q.numpy(), k.numpy(), qg.numpy(), kg.numpy()).tolist()
    # keys given without groups: nothing excluded
    assert kernels.nearest_neighbor(q, k).tolist() == naive.nearest_neighbor(q.numpy(), k.numpy(), None, None).tolist()


def test_nearest_neighbor_self_excluded_and_ties():
    x = normalized(40, 6, seed=3)
    assert kernels.nearest_neighbor(x).tolist() == naive.nearest_neighbor(x.numpy()).tolist()
    # exact duplicates: each copy's nearest neighbour is the other copy with the smallest index
    dup = torch.cat([x[:5], x[:5], x[:5]])
    got = kernels.nearest_neighbor(dup)
    assert got.tolist() == [5, 6, 7, 8, 9] + [0, 1, 2, 3, 4] * 2
    # all rows equal: every row picks the smallest other index
    same = torch.ones(6, 4) / 2
    assert kernels.nearest_neighbor(same).tolist() == [1, 0, 0, 0, 0, 0]


def test_nearest_neighbor_groups_all_excluded_and_chunking():
    x = normalized(10, 4, seed=5)
    groups = torch.zeros(10, dtype=torch.int64)
    assert kernels.nearest_neighbor(x, x, groups, groups).tolist() == [-1] * 10
    from kernels.nearest_neighbor import nearest_neighbor_torch

    big = normalized(300, 8, seed=6)
    assert torch.equal(nearest_neighbor_torch(big, chunk_rows=7), nearest_neighbor_torch(big))


def test_nearest_neighbor_half_precision_inputs():
    x = normalized(128, 32, seed=7).half()
    got = kernels.nearest_neighbor(x)
    assert got.tolist() == naive.nearest_neighbor(x.float().numpy()).tolist()


@pytest.mark.parametrize("n", [2, 3, 5, 17, 100, 1001, 4096])
def test_components_match_scipy_random(n):
    x = normalized(n, 8, seed=n)
    nn_idx = kernels.nearest_neighbor(x)
    labels = kernels.connected_components(nn_idx)
    assert labels.dtype == torch.int64
    assert naive.same_partition(labels.numpy(), naive.components(nn_idx.numpy()))


def test_components_adversarial_graphs():
    cases = {
        "long_chain": list(range(1, 300)) + [298],  # 0->1->...->299->298: one component
        "two_cycle_pairs": [1, 0, 3, 2, 5, 4],
        "star": [1] + [0] * 9,
        "three_cycle": [1, 2, 0, 0, 1],  # a 3-cycle (only possible with ties) plus tails
        "reverse_chain": [1] + [i - 1 for i in range(1, 64)],
        "two_long_chains": [1, 0] + [i - 1 for i in range(2, 50)] + [51, 50] + [i - 1 for i in range(52, 97)],
    }
    rng = np.random.default_rng(0)
    # random functional graphs (arbitrary cycle lengths)
    for t in range(5):
        size = int(rng.integers(2, 500))
        nxt = rng.integers(0, size, size)
        nxt[nxt == np.arange(size)] = (nxt[nxt == np.arange(size)] + 1) % size
        cases[f"random_{t}"] = nxt.tolist()
    for name, nn_list in cases.items():
        nn_idx = torch.tensor(nn_list)
        labels = kernels.connected_components(nn_idx).numpy()
        assert naive.same_partition(labels, naive.components(nn_list)), name


def test_components_duplicate_points():
    base = normalized(20, 5, seed=11)
    x = torch.cat([base, base, base[:7]])
    nn_idx = kernels.nearest_neighbor(x)
    labels = kernels.connected_components(nn_idx)
    assert naive.same_partition(labels.numpy(), naive.components(nn_idx.numpy()))


@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graph_labelling_has_no_host_sync_on_cuda(backend):
    x = normalized(8192, 128, seed=1, dtype=torch.bfloat16).cuda()
    kernels.nearest_neighbor(x, backend=backend)  # compile / warm up outside the check
    with no_host_sync():
        labels = kernels.connected_components(kernels.nearest_neighbor(x, backend=backend))
    nn_cpu = kernels.nearest_neighbor(x, backend=backend).cpu().numpy()
    assert naive.same_partition(labels.cpu().numpy(), naive.components(nn_cpu))


def test_components_at_32768_nodes_match_scipy():
    x = normalized(32768, 16, seed=32)
    nn_idx = kernels.nearest_neighbor(x)
    labels = kernels.connected_components(nn_idx)
    assert naive.same_partition(labels.numpy(), naive.components(nn_idx.numpy()))
