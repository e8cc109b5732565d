"""Loader benchmark: samples/s and per-crop cost of each backend for one crop recipe, side by side.

    python -m pipelines.bench [--backend reference,auto,dali,shards,shards-http] [--data DIR|photos] [--batch 64]
                              [--batches 6] [--workers 2] [--global-size 224 --local-crops 6 --local-size 96]
                              [--http-latency-ms 30] [--json out.json]

Without --data it writes 256 synthetic colour JPEGs of ImageNet's typical size (500 x 375) once to
data/bench_jpeg; `--data photos` writes 256 JPEGs of the same size cut from real camera photographs
that installed packages ship (scikit-learn's china.jpg and flower.jpg, matplotlib's grace_hopper.jpg)
to data/bench_photos: photographs cost more to decode than smooth synthetic fields. `auto` measures the
loader data.backend=auto picks on this machine (pipelines.choose_backend). Besides samples/s, each row
gives samples/s per CPU core (over min(workers, cores)) and the cores per GPU that rate needs to feed
one GPU of an 8-GPU node at the compute-limited ImageNet epoch (95 s on H100, 190 s on A100 for
2 x 224 + 6 x 96 crops). The ffcv rows read <data>.beton (converted once, jpg, max resolution 512); ffcv8 is
the same FFCV pipeline decoding the JPEG again for every crop (the cost of 8 decoders); the -crop
rows stop after FFCV's decode + crop stage (no tensor augmentations). Augmentations run where each
loader runs them by default (GPU: pipelines.augment.augment_views after DALI's decode and resize /
batched tensor ops after FFCV's; CPU: the fused kernel of pipelines/cpu_augment.py); dali-host forces
data.dali_augment=host (the fused CPU kernel, also with a GPU), ffcv-torch the tensor ops on any device.
The dali rows also give the operator count of the DALI graph (decode + one resize per crop slot, the
same for any batch size). Every backend gets the same folder, batch, recipe and number of workers/threads;
one warm-up batch is excluded. Prints a table and JSON. The shards rows read the same images as WebDataset
shards (<data>.wds, written once by pipelines.convert --format wds, 32 images per shard, 8 streams; docs/data.md)
through the shard loader (PIL decoding in the workers, as the reference row; shards-dali: DALI's graph, as the
dali row); shards-http reads them from a local HTTP server on 127.0.0.1 that waits --http-latency-ms (30)
before every answer; each reports how many shards each batch draws from and the share of same-shard pairs
against a uniform shuffle, and its ratio to the folder row of the same decoder (reference, dali).
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.batch import current_device, current_device_id

BACKENDS = ("reference", "auto", "dali", "dali-host", "ffcv", "ffcv-torch", "ffcv8", "ffcv-crop", "ffcv8-crop", "shards",
            "shards-http", "shards-dali")
SHARD_SIZE = 32  # images per shard of the bench's shards (<data>.wds): 8 shards of the 256 bench images
SHARD_STREAMS = 8  # data.shard_streams of the shard rows (the batch must be a multiple)
HTTP_LATENCY_S = 0.03  # --http-latency-ms: added to every request of the shards-http row


def write_bench_images(root: Path, count: int = 256, size=(500, 375)) -> Path:
    from PIL import Image

    marker = root / "COMPLETE"
    if marker.is_file():
        return root
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(count):
        folder = root / f"class{i % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        img = np.stack([(np.sin(xx / rng.uniform(5, 40) + rng.uniform(0, 6)) * 0.5 + 0.5) * 255,
                        (np.cos(yy / rng.uniform(5, 40)) * 0.5 + 0.5) * 255,
                        (xx + yy) / (h + w) * 255], -1) * rng.uniform(0.4, 1.0, 3)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:04d}.jpg", quality=90)
    marker.write_text(f"{count}\n")
    return root


IMAGENET_TRAIN = 1_281_167
COMPUTE_LIMIT_EPOCH_S = {"A100": 190.0, "H100": 95.0, "H200": 95.0}  # 2 x 224 + 6 x 96 crops, 8 GPUs, ResNet-50
PHOTO_SOURCES = (("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
                 ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"))


def per_gpu_target(card: str) -> float:
    """Samples/s one GPU must receive for an 8-GPU ImageNet epoch at the compute limit of `card`."""
    return IMAGENET_TRAIN / (COMPUTE_LIMIT_EPOCH_S[card] * 8)


def write_photo_images(root: Path, count: int = 256, size=(500, 375)) -> Path:
    """`count` camera-photo JPEGs of ImageNet's typical size: random crops (scale 1-1.4, landscape or
    portrait, flips, +-10 % channel gains) of the photographs in PHOTO_SOURCES, saved at quality 90."""
    import importlib

    from PIL import Image

    marker = root / "COMPLETE"
    if marker.is_file():
        return root
    photos = []
    for package, relative in PHOTO_SOURCES:
        try:
            path = Path(importlib.import_module(package).__file__).parent / relative
        except ImportError:
            continue
        if path.is_file():
            photos.append(np.asarray(Image.open(path).convert("RGB")))
    if not photos:
        raise SystemExit("error: --data photos needs scikit-learn or matplotlib (they ship the photographs); "
                         "pip install matplotlib, or pass --data DIR with a folder of your own JPEGs")
    rng = np.random.default_rng(0)
    for i in range(count):
        photo = Image.fromarray(photos[i % len(photos)])
        w, h = size if rng.random() < 0.75 else size[::-1]
        scale = max(w / photo.width, h / photo.height) * rng.uniform(1.0, 1.4)
        photo = photo.resize((int(np.ceil(photo.width * scale)), int(np.ceil(photo.height * scale))), Image.BILINEAR)
        left, top = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        crop = np.asarray(photo.crop((left, top, left + w, top + h)), dtype=np.float32) * rng.uniform(0.9, 1.1, 3)
        crop = np.clip(crop, 0, 255).astype(np.uint8)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        folder = root / f"class{i % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{i:04d}.jpg", quality=90)
    marker.write_text(f"{count}\n")
    return root


def build(backend: str, cfg, http_latency_s: float = HTTP_LATENCY_S):
    if backend == "reference":
        from pipelines.pil import build_train_loader

        return build_train_loader(cfg, 0, 0, 1, pin_memory=torch.cuda.is_available())
    if backend in ("dali", "dali-host"):  # dali-host: DALI's crops augmented by the fused CPU kernel, also on a GPU
        from pipelines.dali import DaliMultiCropLoader

        device_id = current_device_id()
        return DaliMultiCropLoader(cfg, 0, 0, 1, device_id, augment="host" if backend == "dali-host" else None)
    if backend.startswith("ffcv"):  # ffcv8: decoding once per crop (8 decodes); -crop: no tensor augmentations
        from dataclasses import replace

        from pipelines.ffcv import FFCVMultiCropLoader

        beton = Path(cfg.train_dir).with_suffix(".beton")
        if not beton.is_file():
            from pipelines.convert import convert

            convert(cfg.train_dir, str(beton), workers=cfg.workers, quiet=True)
        device = current_device()
        return FFCVMultiCropLoader(replace(cfg, backend="ffcv", beton=str(beton)), 0, 0, 1, device,
                                   decode_each_crop=backend.startswith("ffcv8"), augment=not backend.endswith("-crop"),
                                   augment_impl="torch" if backend == "ffcv-torch" else "auto")
    if backend.startswith("shards"):  # the same images as WebDataset shards; -http: from a slow local server
        from dataclasses import replace

        from pipelines.shards import ShardLoader

        folder = Path(cfg.train_dir).with_suffix(".wds")
        if not (folder / "manifest.json").is_file():
            from pipelines.convert import convert_to_shards

            convert_to_shards(cfg.train_dir, str(folder), SHARD_SIZE, workers=max(1, cfg.workers), quiet=True)
        manifest = str(folder / "manifest.json")
        if backend == "shards-http":
            manifest = f"{_serve(folder, http_latency_s)}/manifest.json"
        shard_cfg = replace(cfg, backend="shards", shards=manifest, shard_streams=SHARD_STREAMS)
        if backend == "shards-dali":  # decoded by DALI's graph (pipelines/dali_shards.py), as the dali row
            from pipelines.dali_shards import DaliShardLoader

            return DaliShardLoader(shard_cfg, 0, 0, 1, current_device_id())
        return ShardLoader(shard_cfg, 0, 0, 1, pin_memory=torch.cuda.is_available())
    raise SystemExit(f"error: --backend: unknown {backend!r}; choose from {', '.join(BACKENDS)}")


def _serve(folder: Path, latency_s: float) -> str:
    """A local HTTP server (127.0.0.1, a daemon thread, one thread per request) of `folder` that waits
    latency_s before answering each request, as an object store's first byte does; returns its base URL."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Slow(SimpleHTTPRequestHandler):
        def handle_one_request(self):
            time.sleep(latency_s)
            super().handle_one_request()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Slow, directory=str(folder)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def measure(backend: str, cfg, batches: int, http_latency_s: float = HTTP_LATENCY_S) -> dict:
    chosen = None
    if backend == "auto":  # what data.backend=auto picks on this machine
        from pipelines import choose_backend

        chosen = choose_backend(cfg).backend
    start = time.perf_counter()
    loader = build(chosen or backend, cfg, http_latency_s)
    build_s = time.perf_counter() - start
    steps = len(loader)
    it, epoch, done = loader.epoch(0), 0, 0
    times = []
    while done < batches + 1:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            epoch += 1
            it = loader.epoch(epoch)
            continue
        if batch.globals.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        done += 1
    if hasattr(it, "close"):
        it.close()  # the loader's helper threads finish before the next backend is measured
    operators = getattr(loader, "operator_count", None)  # the DALI graph's
    order = getattr(loader, "order", None)  # the shard rows: how well the batches mix shards
    if hasattr(loader, "close"):
        loader.close()
    del it, loader
    gc.collect()
    measured = sum(times[1:])  # the first batch (worker start-up, graph build) is excluded
    samples = batches * cfg.batch_size
    crops = samples * (2 + cfg.local_crops)
    cores = max(1, min(cfg.workers, os.cpu_count() or 1))
    per_core = samples / measured / cores
    row = {"backend": backend, "samples_per_s": samples / measured, "us_per_crop": 1e6 * measured / crops,
            "batches": batches, "batch_size": cfg.batch_size, "build_s": build_s, "first_batch_s": times[0],
            "steps_per_epoch": steps, "cores": cores, "samples_per_s_per_core": per_core,
            "cores_per_gpu": {card: per_gpu_target(card) / per_core for card in ("H100", "A100")}}
    if chosen is not None:
        row["chosen"] = chosen
    if operators is not None:
        row["dali_operators"] = operators
    if order is not None:
        from pipelines.shards import mixing

        row["mixing"] = mixing(order, 0, order.steps_per_epoch)
    return row


def main(argv=None) -> int:
    """The command (a user error: one line, exit 2). wcl_fast.cli, the commands' convention, is imported here
    only: the pipelines library itself imports nothing of wcl_fast but its config."""
    from wcl_fast.cli import command

    return command(_main)(argv)


def _main(argv=None) -> int:
    from wcl_fast.cli import ArgumentParser, at_least, output_file

    from wcl_fast.config import ConfigError, DataConfig

    parser = ArgumentParser(prog="python -m pipelines.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="reference,dali,ffcv", help=f"comma-separated, from {', '.join(BACKENDS)}")
    parser.add_argument("--data", default=None, help="ImageFolder to read, or 'photos' (default: synthetic JPEGs in "
                                                     "data/bench_jpeg)")
    parser.add_argument("--batch", type=at_least(1), default=64)
    parser.add_argument("--batches", type=at_least(1), default=6)
    parser.add_argument("--workers", type=at_least(0), default=min(8, os.cpu_count() or 1))
    parser.add_argument("--global-size", type=at_least(1), default=224)
    parser.add_argument("--local-crops", type=at_least(0), default=6)
    parser.add_argument("--local-size", type=at_least(1), default=96)
    parser.add_argument("--http-latency-ms", type=at_least(0.0, float), default=1e3 * HTTP_LATENCY_S,
                        help="added to every request of the shards-http row's local server")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    output_file("--json", args.json)
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise ConfigError(f"--backend: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(BACKENDS)}")
    if args.data not in (None, "photos") and not Path(args.data).is_dir():
        raise ConfigError(f"--data: '{args.data}' is not a folder; give an ImageFolder (one sub-folder per class), "
                          f"'photos', or nothing for synthetic JPEGs")
    if args.data == "photos":
        data = write_photo_images(Path("data") / "bench_photos")
    else:
        data = Path(args.data) if args.data else write_bench_images(Path("data") / "bench_jpeg")
    cfg = DataConfig(train_dir=str(data), batch_size=args.batch, workers=args.workers, global_size=args.global_size,
                     local_crops=args.local_crops, local_size=args.local_size)
    rows = []
    for backend in backends:
        try:
            rows.append(measure(backend, cfg, args.batches, args.http_latency_ms / 1e3))
        except Exception as exc:  # e.g. DALI not installed: report and continue with the others
            print(f"{backend}: not measured ({type(exc).__name__}: {exc})", file=sys.stderr)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    recipe = f"2x{args.global_size}" + (f" + {args.local_crops}x{args.local_size}" if args.local_crops else "")
    print(f"loader bench: {recipe} crops, batch {args.batch}, {args.workers} workers/threads, {device}, {data}")
    print(f"{'backend':<16}{'samples/s':>11}{'per core':>10}{'us/crop':>10}{'vs reference':>14}"
          f"{'cores/GPU H100':>16}{'A100':>7}")
    ref = next((r["samples_per_s"] for r in rows if r["backend"] == "reference"), None)
    for row in rows:
        ratio = f"{row['samples_per_s'] / ref:.2f}x" if ref else "-"
        row["vs_reference"] = row["samples_per_s"] / ref if ref else None
        name = f"auto->{row['chosen']}" if "chosen" in row else row["backend"]
        print(f"{name:<16}{row['samples_per_s']:>11.1f}{row['samples_per_s_per_core']:>10.1f}{row['us_per_crop']:>10.0f}"
              f"{ratio:>14}{row['cores_per_gpu']['H100']:>16.1f}{row['cores_per_gpu']['A100']:>7.1f}")
    for row in rows:
        if "dali_operators" in row:
            crops = 2 + args.local_crops
            print(f"{row['backend']}: DALI graph: {row['dali_operators']} operators (decoder + {crops} crop slots of "
                  f"ROI input and resize; the same for any batch size)")
    for row in rows:
        if "mixing" in row:
            m = row["mixing"]
            print(f"{row['backend']}: each batch draws from {m['distinct_shards_per_batch']:.1f} of {m['shards']} shards "
                  f"({m['streams']} streams); same-shard pairs {100 * m['same_shard_pairs']:.2f}% "
                  f"(uniform shuffle {100 * m['same_shard_pairs_uniform']:.2f}%)")
    rates = {r["backend"]: r["samples_per_s"] for r in rows}
    for row in rows:
        folder_row = "dali" if row["backend"] == "shards-dali" else "reference"
        if row["backend"].startswith("shards") and folder_row in rates:
            row["vs_folder"] = row["samples_per_s"] / rates[folder_row]
            latency = f", {args.http_latency_ms:g} ms per request" if row["backend"] == "shards-http" else ""
            print(f"{row['backend']}: {row['vs_folder']:.2f}x the folder ({folder_row}) row{latency}")
    print(f"cores/GPU: CPU cores at this per-core rate to feed one GPU of an 8-GPU node at the compute-limited "
          f"ImageNet epoch ({per_gpu_target('H100'):.0f} samples/s per H100, {per_gpu_target('A100'):.0f} per A100); "
          f"on a GPU, DALI's mixed decoder (nvJPEG) and the fused augmentation kernel move most of that work onto the GPU")
    result = {"recipe": recipe, "device": device, "workers": args.workers, "data": str(data), "rows": rows}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
