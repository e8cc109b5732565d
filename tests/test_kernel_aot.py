"""Ahead-of-time compilation of the Triton 1-NN kernel for A100 (sm_80) and H100/H200 (sm_90) on a
machine without a GPU: Triton's compiler and bundled ptxas/cuobjdump. The interpreter tests check the
kernel's values; these check what only the device compiler sees: it compiles for both architectures,
no launch candidate spills registers, and the similarity tile runs on tensor cores for 16-bit inputs."""
import pytest

import kernels

pytestmark = pytest.mark.skipif(not kernels.triton_available(), reason="needs triton")


NAMES = ("block_m", "block_n", "num_warps", "num_stages")


def _compile(dtype, arch, configs, **kwargs):
    from kernels.aot import compile_configs

    return compile_configs([{"dtype": dtype, "arch": arch, **dict(zip(NAMES, c)), **kwargs} for c in configs])


@pytest.mark.parametrize("arch,tensor_cores", [(80, "mma.sync"), (90, "wgmma")])
def test_every_bf16_candidate_compiles_without_spills_on_tensor_cores(arch, tensor_cores):
    from kernels.nearest_neighbor_triton import HALF_CONFIGS

    for row in _compile("bf16", arch, HALF_CONFIGS, dim=256, write_logits=True):
        assert row["block_d"] == 256  # the query tile is loaded once and stays on chip
        assert row["stack_bytes"] == 0 and row["local_bytes"] == 0, row
        assert row["tensor_cores"] == tensor_cores, row
    # the smallest tile of the search alone fits an A100's shared memory (163 KiB)
    assert _compile("bf16", arch, HALF_CONFIGS[:1], dim=256, write_logits=False)[0]["shared_bytes"] <= 163 * 1024


def test_fp32_candidates_compile_without_spills_in_ieee_precision():
    from kernels.nearest_neighbor_triton import FP32_CONFIGS

    for arch in (80, 90):
        for row in _compile("fp32", arch, FP32_CONFIGS, dim=256, write_logits=True):
            assert row["stack_bytes"] == 0 and row["local_bytes"] == 0, row
            assert row["tensor_cores"] == "none", row  # IEEE fp32: FMA units, not TF32


def test_aot_report_cli_writes_json(tmp_path, capsys):
    import json

    from kernels.aot import main

    out = tmp_path / "aot.json"
    assert main(["--arch", "90", "--dtypes", "fp16", "--dims", "128", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    from kernels.nearest_neighbor_triton import HALF_CONFIGS

    assert len(rows) == 2 * len(HALF_CONFIGS)
    assert {r["tensor_cores"] for r in rows} == {"wgmma"}
    assert "spill B" in capsys.readouterr().out
