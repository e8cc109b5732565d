"""Ahead-of-time compilation report of the Triton 1-NN kernel for NVIDIA GPUs, no GPU needed.

`python -m kernels.aot [--arch 80 90] [--dtypes bf16 fp16 fp32]` compiles every launch configuration of
kernels/nearest_neighbor_triton.py (the autotuner's candidates) for the given compute capabilities with
Triton's own compiler and its bundled ptxas, and prints (and writes as JSON) per configuration:
registers per thread, stack bytes (register spills: 0 is what a fast kernel needs), shared memory, and
whether the similarity tile runs on tensor cores (wgmma on sm_90, mma.sync on sm_80) or on FMA units.
It checks what the CPU interpreter cannot: that the kernel compiles for the device at all, and that no
configuration spills. It measures no time: speed needs a GPU (python -m kernels.bench).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

from wcl_fast.cli import ArgumentParser, command

_DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _tools_dir() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin")


def compile_configs(jobs: list[dict]) -> list[dict]:
    """compile_config(**job) for every job. Under TRITON_INTERPRET=1 Triton's language is patched for
    the interpreter and cannot compile, so the jobs then run in a child process without it."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return [compile_config(**job) for job in jobs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "kernels.aot", "--jobs-stdin"], input=json.dumps(jobs), env=env,
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode != 0:
        raise RuntimeError(f"kernels.aot child process failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


def compile_config(dtype: str, arch: int, block_m: int, block_n: int, num_warps: int, num_stages: int,
                   dim: int = 256, has_groups: bool = True, write_logits: bool = True,
                   block_d: int | None = None) -> dict:
    """Compile the kernel for sm_<arch> with one launch configuration; returns its resource usage
    (in this process: it must not run under TRITON_INTERPRET=1, see compile_configs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from kernels.nearest_neighbor_triton import _nn_kernel, kernel_constants

    pointer = _DTYPES[dtype]
    signature = {"q_ptr": pointer, "k_ptr": pointer, "qg_ptr": "*i32", "kg_ptr": "*i32", "out_idx_ptr": "*i64",
                 "out_max_ptr": "*fp32", "logits_ptr": "*fp32", "M": "i32", "N": "i32", "D": "i32",
                 "stride_qm": "i32", "stride_km": "i32", "stride_lm": "i32", "inv_tau": "fp32", "N_LOGITS": "i32"}
    constants = kernel_constants(dtype, dim, has_groups, write_logits)
    constants.update(BLOCK_M=block_m, BLOCK_N=block_n)
    if block_d is not None:
        constants.update(BLOCK_D=block_d, ONE_CHUNK=dim <= block_d)
    signature.update({name: "constexpr" for name in constants})
    # what the JIT infers at a typical launch (torch allocations, N and D multiples of 16): every
    # pointer and integer argument divisible by 16 (this enables vectorised, pipelined loads)
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature) if name != "inv_tau" and
               signature[name] != "constexpr"}
    kernel = _nn_kernel
    if not isinstance(kernel, JITFunction):  # the interpreter's wrapper (TRITON_INTERPRET=1): compile its source
        kernel = JITFunction(kernel.fn)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([os.path.join(_tools_dir(), "cuobjdump"), "--dump-resource-usage", handle.name],
                               capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(handle.name)
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    ptx = compiled.asm["ptx"]
    return {"dtype": dtype, "arch": arch, "d": dim, "block_m": block_m, "block_n": block_n, "block_d": constants["BLOCK_D"],
            "num_warps": num_warps, "num_stages": num_stages, "groups": has_groups, "logits": write_logits,
            "regs": int(fields["REG"]), "stack_bytes": int(fields["STACK"]), "local_bytes": int(fields["LOCAL"]),
            "shared_bytes": int(compiled.metadata.shared),
            "tensor_cores": "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "none")}


def report(archs, dtypes, dims, write_logits=(False, True)) -> list[dict]:
    from kernels.nearest_neighbor_triton import configs_for

    names = ("block_m", "block_n", "num_warps", "num_stages")
    jobs = [{"dtype": dtype, "arch": arch, "dim": dim, "write_logits": logits, **dict(zip(names, config))}
            for arch in archs for dtype in dtypes for dim in dims for logits in write_logits
            for config in configs_for(dtype == "fp32")]
    return compile_configs(jobs)


@command
def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m kernels.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80: A100, 90: H100/H200)")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(_DTYPES))
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--json", default="kernels_aot.json")
    parser.add_argument("--jobs-stdin", action="store_true", help=argparse.SUPPRESS)  # compile_configs' child
    args = parser.parse_args(argv)
    if args.jobs_stdin:
        print(json.dumps([compile_config(**job) for job in json.load(sys.stdin)]))
        return 0
    rows = report(args.arch, args.dtypes, args.dims)
    header = (f"{'sm':>3}{'dtype':>6}{'D':>5}{'logits':>7}{'BM':>5}{'BN':>5}{'BD':>5}{'warps':>6}{'stages':>7}"
              f"{'regs':>6}{'spill B':>8}{'smem KiB':>9}  tensor cores")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['arch']:>3}{r['dtype']:>6}{r['d']:>5}{str(r['logits']):>7}{r['block_m']:>5}{r['block_n']:>5}{r['block_d']:>5}"
              f"{r['num_warps']:>6}{r['num_stages']:>7}{r['regs']:>6}{r['stack_bytes']:>8}{r['shared_bytes'] / 1024:>9.1f}  {r['tensor_cores']}")
    with open(args.json, "w") as handle:
        json.dump({"rows": rows}, handle, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
