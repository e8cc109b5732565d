"""ImageFolder -> FFCV .beton (image, label, sample index), for data.backend=ffcv.

    python -m pipelines.convert --src /data/imagenet/train --out /data/imagenet/train_512.beton \
        [--max-resolution 512] [--jpeg-quality 90] [--write-mode jpg|raw|proportion] [--workers N] [--force]

1. Validates the source: class folders (sorted, ids as the reference loader / torchvision assign
   them), empty class folders and non-image files are reported; every image is fully decoded once
   (threads) and the unreadable ones (corrupt, truncated) are skipped with their reason. CMYK,
   grayscale, palette and alpha images are converted to RGB as the reference loader does; tiny
   images are kept.
2. Writes the readable images with FFCV's DatasetWriter into a temporary file next to --out and
   renames it only on success, so an interrupted conversion never leaves a file that looks complete.
   Fields: `image` (RGBImageField, longest side capped at --max-resolution), `label` (class id),
   `index` (the record's position 0..n-1, the sample id objectives such as Cl-InfoNCE use).
3. Writes <out>.json beside it: source, classes, the relative path of every record (record i is
   paths[i]), skipped files with reasons, settings, images/s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipelines.reference import IMAGE_EXTENSIONS, load_rgb
from wcl_fast.config import ConfigError


def scan_source(src: Path) -> tuple[list[tuple[str, int]], list[str], list[str], list[str]]:
    """(samples, classes, empty class folders, non-image files) of an ImageFolder."""
    if not src.is_dir():
        raise ConfigError(f"--src: '{src}' is not a directory; point it at an ImageFolder (one sub-folder per class)")
    classes = sorted(d.name for d in src.iterdir() if d.is_dir())
    if not classes:
        raise ConfigError(f"--src: '{src}' has no class sub-folders; expected {src}/<class>/<image>.jpg")
    samples, empty, other = [], [], []
    for label, name in enumerate(classes):
        found = 0
        for path in sorted((src / name).rglob("*")):
            if not path.is_file():
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                samples.append((str(path), label))
                found += 1
            else:
                other.append(str(path))
        if not found:
            empty.append(name)
    if not samples:
        raise ConfigError(f"--src: '{src}' has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    return samples, classes, empty, other


def _check(path: str) -> str | None:
    """None if the image decodes fully, else the reason."""
    try:
        load_rgb(path)
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


class _Records:
    """Indexed dataset for FFCV's writer: record i -> (RGB uint8 HWC, class id, i)."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return np.asarray(load_rgb(path)), label, i


def convert(src: str, out: str, max_resolution: int | None = 512, jpeg_quality: int = 90, write_mode: str = "jpg",
            workers: int = 1, force: bool = False, quiet: bool = False) -> dict:
    try:
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter
    except ImportError:
        raise ConfigError("FFCV is not installed: 'make install' installs it with its system libraries "
                          "(pkg-config libturbojpeg0-dev libopencv-dev), or pip install ffcv==1.0.2 after those") from None
    src_path, out_path = Path(src), Path(out)
    if out_path.exists() and not force:
        raise ConfigError(f"--out: '{out_path}' exists; pass --force to overwrite it")
    if write_mode not in ("jpg", "raw", "proportion"):
        raise ConfigError(f"--write-mode: {write_mode!r} is not one of jpg, raw, proportion")
    start = time.perf_counter()
    samples, classes, empty, other = scan_source(src_path)
    say = (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    say(f"convert: {len(samples)} images in {len(classes)} classes under {src_path}")
    if empty:
        say(f"warning: {len(empty)} empty class folders keep their class ids but have no records: {', '.join(empty[:10])}")
    if other:
        say(f"warning: {len(other)} non-image files are ignored, e.g. {other[0]}")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        reasons = list(pool.map(_check, [p for p, _ in samples], chunksize=64))
    skipped = [(path, reason) for (path, _), reason in zip(samples, reasons) if reason is not None]
    good = [s for s, reason in zip(samples, reasons) if reason is None]
    if not good:
        raise ConfigError(f"--src: none of the {len(samples)} images of '{src_path}' could be decoded")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
    fields = {"image": RGBImageField(write_mode="proportion" if write_mode == "proportion" else write_mode,
                                     max_resolution=max_resolution, jpeg_quality=jpeg_quality),
              "label": IntField(), "index": IntField()}
    write_start = time.perf_counter()
    try:
        writer = DatasetWriter(str(tmp), fields, num_workers=max(1, workers))
        writer.from_indexed_dataset(_Records(good), chunksize=64)  # tqdm bar: images/s and ETA
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    seconds = time.perf_counter() - write_start
    summary = {"source": str(src_path), "out": str(out_path), "classes": classes, "count": len(good),
               "paths": [str(Path(p).relative_to(src_path)) for p, _ in good],
               "skipped": [{"path": p, "reason": r} for p, r in skipped], "empty_classes": empty,
               "ignored_files": other, "max_resolution": max_resolution, "jpeg_quality": jpeg_quality,
               "write_mode": write_mode, "workers": workers, "write_images_per_s": len(good) / max(seconds, 1e-9),
               "total_s": time.perf_counter() - start}
    tmp_json = out_path.with_name(f".{out_path.name}.json.partial-{os.getpid()}")
    tmp_json.write_text(json.dumps(summary, indent=1))
    os.replace(tmp_json, out_path.with_name(out_path.name + ".json"))
    say(f"wrote {out_path}: {len(good)} records, {summary['write_images_per_s']:.0f} images/s with {workers} workers; "
        f"skipped {len(skipped)}" + "".join(f"\n  skipped {p}: {r}" for p, r in skipped[:20]))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--src", required=True, help="ImageFolder: one sub-folder per class")
    parser.add_argument("--out", required=True, help="the .beton file to write")
    parser.add_argument("--max-resolution", type=int, default=512, help="longest side cap (0 = keep)")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--write-mode", default="jpg", choices=["jpg", "raw", "proportion"])
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.out, args.max_resolution or None, args.jpeg_quality, args.write_mode, args.workers, args.force)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
