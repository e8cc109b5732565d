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
