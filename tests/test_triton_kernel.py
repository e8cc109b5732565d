"""The fused Triton 1-NN kernel against the torch reference (interpreter on CPU, compiled on CUDA)."""
import pytest
import torch

import kernels
import naive
from conftest import normalized, requires_cuda

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kernels.triton_available(), reason="needs triton")


def _both(*args):
    return (kernels.nearest_neighbor(*args, backend="triton"), kernels.nearest_neighbor(*args, backend="torch"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,d", [(1, 1, 3), (5, 9, 3), (63, 65, 17), (130, 70, 40), (64, 129, 256)])
def test_triton_matches_torch_random(m, n, d, dtype):
    q = normalized(m, d, seed=m, dtype=dtype).to(DEVICE)
    k = normalized(n, d, seed=n + 1, dtype=dtype).to(DEVICE)
    got, ref = _both(q, k)
    assert torch.equal(got, ref)
    qg = torch.randint(0, 5, (m,), generator=torch.Generator().manual_seed(m)).to(DEVICE)
    kg = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(n)).to(DEVICE)
    got, ref = _both(q, k, qg, kg)
    assert torch.equal(got, ref)
    if m == n:
        got, ref = _both(q)
        assert torch.equal(got, ref)


def test_triton_ties_duplicates_and_equal_rows():
    x = normalized(37, 8, seed=2)
    dup = torch.cat([x, x, x[:5]]).to(DEVICE)
    got, ref = _both(dup)
    assert torch.equal(got, ref)
    assert got.cpu().tolist() == naive.nearest_neighbor(dup.cpu().numpy()).tolist()
    same = (torch.ones(150, 16) / 4).to(DEVICE)  # every similarity equal: smallest other index
    got, ref = _both(same)
    assert torch.equal(got, ref) and got[0].item() == 1 and (got[1:] == 0).all()


def test_triton_all_excluded_rows_and_image_groups():
    x = normalized(24, 8, seed=4).to(DEVICE)
    groups = torch.zeros(24, dtype=torch.int64, device=DEVICE)
    got, _ = _both(x, x, groups, groups)
    assert (got == -1).all()
    # 8 crops per image: no crop may pick a crop of its own image
    image = torch.arange(24, device=DEVICE) // 8
    got, ref = _both(x, x, image, image)
    assert torch.equal(got, ref) and (image[got] != image).all()


def test_triton_fused_logits_output():
    from kernels.nearest_neighbor_triton import nearest_neighbor_triton

    q, k = normalized(70, 32, seed=5).to(DEVICE), normalized(90, 32, seed=6).to(DEVICE)
    idx, logits = nearest_neighbor_triton(q, k, logits_tau=0.1)
    torch.testing.assert_close(logits, q @ k.t() / 0.1, rtol=1e-5, atol=1e-5)
    assert torch.equal(idx, kernels.nearest_neighbor(q, k, backend="torch"))


def test_logit_columns_subset():
    from kernels.nearest_neighbor_triton import nearest_neighbor_triton

    q, k = normalized(33, 16, seed=7).to(DEVICE), normalized(100, 16, seed=8).to(DEVICE)
    groups_q = torch.arange(33, device=DEVICE) % 7
    groups_k = torch.arange(100, device=DEVICE) % 7
    idx, logits = nearest_neighbor_triton(q, k, groups_q, groups_k, logits_tau=0.2, logit_columns=70)
    assert logits.shape == (33, 70)
    torch.testing.assert_close(logits, q @ k[:70].t() / 0.2, rtol=1e-5, atol=1e-5)
    assert torch.equal(idx, kernels.nearest_neighbor(q, k, groups_q, groups_k, backend="torch"))  # all 100 searched
    with pytest.raises(ValueError, match="logit_columns"):
        nearest_neighbor_triton(q, k, logits_tau=0.2, logit_columns=101)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_similarity_nearest_neighbor_triton_equals_torch_with_gradients(dtype):
    """The fused path: indices, logits and the gradients of a loss on the logits (custom backward)."""
    m, n, c, d = 40, 90, 60, 24
    q0, k0 = normalized(m, d, seed=11, dtype=dtype).to(DEVICE), normalized(n, d, seed=12, dtype=dtype).to(DEVICE)
    qg = torch.arange(m, device=DEVICE) // 4
    kg = torch.arange(n, device=DEVICE) // 6
    weights = torch.randn(m, c, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    out = {}
    for backend in ("triton", "torch"):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        idx, logits = kernels.similarity_nearest_neighbor(q, k, qg, kg, 0.1, logit_columns=c, backend=backend)
        (torch.log_softmax(logits, 1) * weights).sum().backward()
        out[backend] = (idx, logits.detach(), q.grad.float(), k.grad.float())
    (i1, l1, gq1, gk1), (i2, l2, gq2, gk2) = out["triton"], out["torch"]
    assert torch.equal(i1, i2)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-4)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gq1, gq2, **tol)
    torch.testing.assert_close(gk1, gk2, **tol)
    assert (gk1[c:] == 0).all()  # keys past the logit columns only take part in the 1-NN search


def test_wcl_knn_rule_on_the_fused_kernel_equals_torch():
    from wcl_fast.objectives.wcl import knn_graph_rows_fused

    n, crops, d = 10, 3, 16
    base = [normalized(n, d, seed=s + 30) for s in range(2)] + [normalized(crops * n, d, seed=35)]
    results = {}
    for backend in ("triton", "torch"):
        u1, u2, ul = (t.clone().to(DEVICE).requires_grad_() for t in base)
        rows, labels, _ = knn_graph_rows_fused(u1, u2, ul, u1, u2, 0.1, backend=backend)
        rows.mean().backward()
        results[backend] = (rows.detach(), labels, [t.grad for t in (u1, u2, ul)])
    assert torch.equal(results["triton"][1], results["torch"][1])
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results["triton"][2], results["torch"][2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.nearest_neighbor(torch.randn(4, 3), backend="triton")


@requires_cuda
def test_triton_bf16_on_cuda_matches_within_near_tie_tolerance():
    q = normalized(4096, 256, seed=9, dtype=torch.bfloat16).cuda()
    got, ref = _both(q)
    sims = q.float() @ q.float().t()
    sims.fill_diagonal_(float("-inf"))
    best = sims.max(dim=1).values
    picked = sims.gather(1, got[:, None])[:, 0]
    assert torch.all(best - picked <= 1e-5)  # any disagreement is a near-tie
    assert (got == ref).float().mean().item() > 0.999


def test_kernel_bench_writes_table_and_json(tmp_path, capsys):
    import json

    from kernels.bench import main

    out = tmp_path / "bench.json"
    assert main(["--sizes", "128", "--dims", "32", "--dtypes", "fp32", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["path"] for r in rows} >= {"gemm", "reference", "torch", "triton"}
    assert all(r["ms"] > 0 for r in rows)
    assert "x GEMM" in capsys.readouterr().out


def test_group_ids_are_compared_as_int32_and_checked_on_the_device():
    x = normalized(40, 8, seed=11).to(DEVICE)
    image = torch.arange(40, device=DEVICE) // 4
    got, ref = _both(x, x, image + (2**31 - 11), image + (2**31 - 11))  # the largest ids that fit
    assert torch.equal(got, ref) and torch.equal(got, kernels.nearest_neighbor(x, x, image, image, backend="torch"))
    if DEVICE == "cpu":  # on CUDA the check is a device-side assert (no host synchronisation)
        with pytest.raises(RuntimeError, match="group ids must fit in int32"):
            kernels.nearest_neighbor(x, x, image + 2**40, image + 2**40, backend="triton")


@requires_cuda
def test_autotuned_launch_gives_the_fixed_configurations_results(monkeypatch):
    from kernels.nearest_neighbor_triton import _nn_kernel_tuned, nearest_neighbor_triton

    q = normalized(2048, 256, seed=12, dtype=torch.bfloat16).cuda()
    image = torch.arange(2048, device="cuda") // 8
    fixed_idx, fixed_logits = nearest_neighbor_triton(q, q, image, image, logits_tau=0.1, logit_columns=512)
    monkeypatch.setenv("WCL_TRITON_AUTOTUNE", "1")
    tuned_idx, tuned_logits = nearest_neighbor_triton(q, q, image, image, logits_tau=0.1, logit_columns=512)
    assert _nn_kernel_tuned.best_config is not None
    # the D chunk is fixed, so the candidates differ at most in the tensor cores' internal summation
    torch.testing.assert_close(tuned_logits, fixed_logits, rtol=0, atol=1e-4)
    sims = q.float() @ q.float().t()
    sims[image[:, None] == image[None, :]] = float("-inf")
    picked = lambda idx: sims.gather(1, idx[:, None])[:, 0]  # noqa: E731
    assert torch.all((picked(tuned_idx) - picked(fixed_idx)).abs() <= 1e-5)  # any difference is a near-tie
    assert (tuned_idx == fixed_idx).float().mean().item() > 0.999
