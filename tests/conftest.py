import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run under the interpreter on CPU (read at import time)
    os.environ.setdefault("TRITON_INTERPRET", "1")
# CUDA: the Triton kernel's fixed launch configuration (autotuning compiles every candidate for every
# input specialisation the tests create); tests/test_triton_kernel.py exercises the autotuner itself
os.environ.setdefault("WCL_TRITON_AUTOTUNE", "0")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The suite's torch thread count: every test runs with it, and the subprocesses of the bit-exact tests get
# it through OMP_NUM_THREADS. Importing FFCV directly (as some test modules do at collection) sets torch's
# count to 1, so it is put back after collection and after every test.
THREADS = torch.get_num_threads()


def pytest_collection_finish(session):
    torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _same_thread_count():
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def normalized(*shape, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1).to(dtype)


@contextlib.contextmanager
def no_host_sync():
    """Inside: any CUDA host synchronisation raises (torch.cuda.set_sync_debug_mode('error'))."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def write_colour_folder(root: Path, classes: int = 3, per_class: int = 30, sizes=(40, 120), seed: int = 0) -> Path:
    """An ImageFolder of colourful JPEGs of varied sizes (smooth colour fields + noise), class folders c0, c1, ..."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(sizes[0], sizes[1], 2))
            yy, xx = np.mgrid[0:h, 0:w]
            img = np.stack([(np.sin(xx / rng.uniform(3, 15) + rng.uniform(0, 6)) * 0.5 + 0.5) * 255 * rng.uniform(0.3, 1),
                            (np.cos(yy / rng.uniform(3, 15)) * 0.5 + 0.5) * 255 * rng.uniform(0.3, 1),
                            (xx + yy) / (h + w) * 255 * rng.uniform(0.3, 1)], -1)
            img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.jpg", quality=90)
    return root


def write_odd_images(folder: Path, names) -> Path:
    """The odd-file set of the loader and converter tests, the files `names` of: cmyk.jpg, gray.jpg,
    palette.png, alpha.png, png_as.jpg (a PNG named .jpg), tiny.jpg (1 x 1), thin.jpg (3 x 500), ok.jpg,
    truncated.jpg (the first half of ok.jpg), garbage.jpg (not an image)."""
    import io

    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    writers = {
        "cmyk.jpg": lambda path: rgb.convert("CMYK").save(path),
        "gray.jpg": lambda path: rgb.convert("L").save(path),
        "palette.png": lambda path: rgb.convert("P").save(path),
        "alpha.png": lambda path: rgb.convert("RGBA").save(path),
        "png_as.jpg": lambda path: rgb.convert("RGBA").save(path, format="PNG"),
        "tiny.jpg": lambda path: Image.new("RGB", (1, 1), (200, 10, 10)).save(path),
        "thin.jpg": lambda path: Image.new("RGB", (3, 500), (10, 200, 10)).save(path),
        "ok.jpg": lambda path: path.write_bytes(jpeg),
        "truncated.jpg": lambda path: path.write_bytes(jpeg[: len(jpeg) // 2]),
        "garbage.jpg": lambda path: path.write_bytes(b"not an image" * 10),
    }
    for name in names:
        writers[name](folder / name)
    return folder


def _distributed_entry(rank, fn, world, port, args):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 (for a gloo group or a c10d rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_distributed(fn, world: int, *args) -> None:
    """fn(rank, world, *args) in `world` spawned processes joined in a gloo group on 127.0.0.1; an
    exception in any of them fails the calling test with that process's traceback. fn must be a
    module-level function of a test module."""
    import torch.multiprocessing as mp

    mp.spawn(_distributed_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)
