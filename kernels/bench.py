"""Benchmark of the weak-label graph kernels: `python -m kernels.bench [--json FILE]`.

Rows, each timed as the median of --repeats runs (CUDA events on a GPU):
  reference   dense S = U U^T - 2I, topk(1), copy to the CPU, scipy connected_components (the WCL code)
  torch       kernels.nearest_neighbor(backend="torch") + kernels.connected_components, on the device
  triton      kernels.nearest_neighbor(backend="triton") + kernels.connected_components, on the device
  gemm        a plain U @ U^T of the same shape and dtype: the ceiling the fused 1-NN is compared to
  nn+logits   the knn rule's step without fusion: 1-NN (auto backend) + a separate fp32 matmul of the
              logits against the first N/4 keys (the 2 global of 8 crops: head 2's loss keys)
  fused       kernels.similarity_nearest_neighbor(backend="triton"): both from one pass of the kernel
Columns: time (ms), achieved TFLOP/s (2 N^2 D / time), time relative to the GEMM, peak device memory.
On a CPU the Triton kernel runs under TRITON_INTERPRET=1 and only at the smallest size.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the Triton kernel's import

import kernels  # noqa: E402
from wcl_fast.cli import ArgumentParser, at_least, command, output_file  # noqa: E402


def _timer(device: torch.device, fn, repeats: int) -> tuple[float, float | None]:
    """(median seconds, peak device MiB above the starting allocation, CUDA only) of fn; the warm-up
    call (compilation, autotuning with its scratch buffers) is outside both."""
    fn()
    base = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if base is not None else None
    return statistics.median(times), peak


def reference_labels(u: torch.Tensor):
    """The reference code's path: dense similarity, self removed, topk, host copy, scipy."""
    import numpy as np
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    n = u.shape[0]
    sim = u @ u.t() - 2 * torch.eye(n, device=u.device, dtype=u.dtype)
    nn_idx = sim.topk(1, dim=1).indices[:, 0].cpu().numpy()
    rows = np.arange(n)
    graph = csr_matrix((np.ones(2 * n), (np.concatenate([rows, nn_idx]), np.concatenate([nn_idx, rows]))), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def run(sizes, dims, dtypes, repeats, device):
    """Yields the rows of one (N, D, dtype) shape at a time."""
    for n in sizes:
        for d in dims:
            for dtype_name in dtypes:
                dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
                generator = torch.Generator(device=device).manual_seed(0)
                u = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=generator), dim=1).to(dtype)
                paths = {
                    "gemm": lambda: u @ u.t(),
                    "reference": lambda: reference_labels(u),
                    "torch": lambda: kernels.connected_components(kernels.nearest_neighbor(u, backend="torch")),
                }
                if kernels.triton_available() and (device.type == "cuda" or (n <= 512 and dtype != torch.bfloat16)):
                    paths["triton"] = lambda: kernels.connected_components(kernels.nearest_neighbor(u, backend="triton"))
                    ids, columns = torch.arange(n, device=device), n // 4
                    paths["nn+logits"] = lambda: (kernels.nearest_neighbor(u), u.float() @ u[:columns].float().t() / 0.1)
                    paths["fused"] = lambda: kernels.similarity_nearest_neighbor(u, u, ids, ids, 0.1, columns,
                                                                                 backend="triton")
                if device.type == "cpu" and dtype != torch.float32:
                    paths.pop("gemm")  # CPU half-precision GEMM is not a meaningful ceiling
                    paths.pop("reference")
                results = {}
                for name, fn in paths.items():
                    interpreted = name in ("triton", "fused") and device.type != "cuda"
                    results[name] = _timer(device, fn, 1 if interpreted else repeats)
                gemm_time = results.get("gemm", (None,))[0]
                yield [{"path": name, "n": n, "d": d, "dtype": dtype_name, "ms": 1e3 * seconds,
                        "tflops": 2 * n * n * d / seconds / 1e12,
                        "vs_gemm": seconds / gemm_time if gemm_time else None, "peak_mib": peak}
                       for name, (seconds, peak) in results.items()]


def run_training_shape(queries: int, keys: int, dim: int, repeats: int, device):
    """The knn rule's pass at one rank's training shape (wcl_fast/objectives/wcl.py knn_graph_rows_fused):
    `queries` crops of this rank (2 + L per image) against `keys` crops of the global batch, image groups of
    2 + L crops, logits against the first keys / (2 + L) * 2 columns (the global crops), fp32. Rows: gemm
    (queries x keys), nn+logits (unfused: 1-NN, then the logits' matmul), fused (one Triton pass)."""
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(queries, dim, device=device, generator=generator), dim=1)
    k = torch.nn.functional.normalize(torch.randn(keys, dim, device=device, generator=generator), dim=1)
    crops = 8
    query_groups = torch.arange(queries, device=device) % max(1, queries // crops)
    key_groups = torch.arange(keys, device=device) % max(1, keys // crops)
    columns = 2 * keys // crops
    paths = {"gemm": lambda: q @ k.t(),
             "nn+logits": lambda: (kernels.nearest_neighbor(q, k, query_groups, key_groups),
                                   q @ k[:columns].t() / 0.1)}
    if kernels.triton_available():
        paths["fused"] = lambda: kernels.similarity_nearest_neighbor(q, k, query_groups, key_groups, 0.1, columns,
                                                                     backend="triton")
    results = {}
    for name, fn in paths.items():
        interpreted = name == "fused" and device.type != "cuda"
        results[name] = _timer(device, fn, 1 if interpreted else repeats)
    gemm_time = results["gemm"][0]
    return [{"path": name, "n": queries, "keys": keys, "d": dim, "dtype": "fp32", "ms": 1e3 * seconds,
             "tflops": 2 * queries * keys * dim / seconds / 1e12, "vs_gemm": seconds / gemm_time, "peak_mib": peak}
            for name, (seconds, peak) in results.items()]


HEADER = f"{'path':<10}{'N':>7}{'D':>5}{'dtype':>6}{'ms':>11}{'TFLOP/s':>9}{'x GEMM':>8}{'peak MiB':>10}"


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        vs = f"{r['vs_gemm']:.2f}" if r["vs_gemm"] is not None else "-"
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(f"{r['path']:<10}{r['n']:>7}{r['d']:>5}{r['dtype']:>6}{r['ms']:>11.3f}{r['tflops']:>9.3f}{vs:>8}{peak:>10}")


@command
def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    parser = ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
    # largest first on a GPU: the target shape (32768, 256, bf16) is measured before any timeout
    parser.add_argument("--sizes", type=at_least(1), nargs="+", default=[32768, 8192, 4096] if cuda else [512, 2048, 4096])
    parser.add_argument("--dims", type=at_least(1), nargs="+", default=[256, 128] if cuda else [128, 256])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"] if cuda else ["fp32", "bf16"],
                        choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=at_least(1), default=10 if cuda else 3)
    parser.add_argument("--json", default="kernels_bench.json", help="where to write the rows as JSON")
    parser.add_argument("--training-shape", type=at_least(1), nargs=2, metavar=("QUERIES", "KEYS"), default=None,
                        help="instead: the knn rule's fused pass at one rank's shape, e.g. 4096 32768 (512 images "
                             "x 8 crops per GPU against 4,096 x 8 crops), fp32, first of --dims")
    args = parser.parse_args(argv)
    output_file("--json", args.json)
    device = torch.device("cuda" if cuda else "cpu")
    hardware = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    print(f"kernels.bench on {hardware}; torch {torch.__version__}; median of {args.repeats} "
          f"({'CUDA events' if cuda else 'wall clock'}){'; Triton under the interpreter (N <= 512, no bf16: the interpreter bf16 tl.dot is broken)' if not cuda else ''}")
    print(HEADER)
    print("-" * len(HEADER))
    rows = []
    if args.training_shape:
        shapes = iter([run_training_shape(*args.training_shape, args.dims[0], args.repeats, device)])
    else:
        shapes = run(args.sizes, args.dims, args.dtypes, args.repeats, device)
    for shape_rows in shapes:
        print_rows(shape_rows)
        rows += shape_rows
        with open(args.json, "w") as handle:  # rewritten after every shape: a timeout keeps what was measured
            json.dump({"hardware": hardware, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                       "command": " ".join([sys.executable, "-m", "kernels.bench", *(argv or sys.argv[1:])]),
                       "rows": rows}, handle, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
