"""ImageFolder (or a flat ILSVRC2012 validation folder) -> WebDataset tar shards with DALI index files and a
manifest: `python -m pipelines.convert --format wds --out DIR --shard-size N` (docs/data.md).

Each sample is two members, '<key>.<ext>' (the image file's own bytes: .jpg, .jpeg, .png or .webp; any other
image format re-encoded losslessly as .png) and '<key>.cls' (the class id in decimal), where key is the
sample's 8-digit position in the dataset's written order. The samples are written in a seeded random order
(--shuffle-seed; the shard loader permutes shards and samples within shards, so the classes must already be
mixed across shards). Beside every shard, '<shard>.idx' in the format of DALI's wds2idx (v1.2: a header
'v1.2 <samples>', then per sample its members as '<ext> <data offset> <size> <member name>'), and at the end
'manifest.json': the shards' names, sample counts and sha256, the classes, the skipped files.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from wcl_fast.config import ConfigError

KEEP_AS_IS = {".jpg": "jpg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
    return info, io.BytesIO(data)


def _payload(path: str) -> tuple[str, bytes]:
    """(extension, bytes) of one image member; raises when the file does not decode fully (as the reference
    loader would read it)."""
    from PIL import Image

    from pipelines.images import load_rgb

    load_rgb(path)  # unreadable -> raises: the file is skipped and named
    ext = KEEP_AS_IS.get(Path(path).suffix.lower())
    with open(path, "rb") as f:
        data = f.read()
    if ext is not None:
        with Image.open(io.BytesIO(data)) as img:  # a PNG named .jpg is stored as .png: decoders go by extension
            real = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(img.format)
        if real is not None and (real == ext or (real == "jpg" and ext == "jpeg")):
            return ext, data
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(data)) as img:
        img.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def _check_and_read(item):
    path = item
    try:
        return _payload(path), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def index_lines(tar_path: Path) -> list[str]:
    """DALI's wds2idx (v1.2) index of a tar file: the header line, then one line per sample (consecutive
    members with one key), each member as '<ext> <data offset> <size> <name>'."""
    from pipelines.shards import sample_members

    groups: list[list] = []
    last = None
    with tarfile.open(tar_path, mode="r:") as archive:
        for key, ext, member in sample_members(archive):
            entry = f"{ext} {member.offset_data} {member.size} {member.name}"
            if key != last:
                groups.append([])
                last = key
            groups[-1].append(entry)
    return [f"v1.2 {len(groups)}"] + [" ".join(group) for group in groups]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_wds(samples: list[tuple[str, int]], classes: list[str], src: Path, out: str, shard_size: int,
                prefix: str = "shard", shuffle_seed: int | None = 0, workers: int = 1, force: bool = False,
                say=None, empty=(), other=()) -> dict:
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {shard_size}")
    out_dir = Path(out)
    manifest_path = out_dir / "manifest.json"
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out: '{out_dir}' exists and is not a directory; --format wds writes a folder of shards")
    if manifest_path.exists() and not force:
        raise ConfigError(f"--out: '{out_dir}' already holds shards (manifest.json); pass --force to overwrite them")
    out_dir.mkdir(parents=True, exist_ok=True)
    order = list(range(len(samples)))
    if shuffle_seed is not None:
        order = np.random.default_rng([shuffle_seed, 0x5752]).permutation(len(samples)).tolist()
    start = time.perf_counter()
    shards, skipped, written = [], [], 0
    archive, tmp, names, in_shard = None, None, [], 0

    def close_shard():
        nonlocal archive, tmp
        if archive is None:
            return
        archive.close()
        final = out_dir / names[-1]
        os.replace(tmp, final)
        lines = index_lines(final)
        idx = final.with_suffix(".idx")
        idx.write_text("\n".join(lines) + "\n")
        shards.append({"name": final.name, "count": len(lines) - 1, "sha256": _sha256(final), "index": idx.name,
                       "bytes": final.stat().st_size})
        archive, tmp = None, None

    def results():
        paths = [samples[i][0] for i in order]
        if workers > 1:
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(workers) as pool:
                yield from pool.imap(_check_and_read, paths, chunksize=16)
        else:
            yield from map(_check_and_read, paths)

    try:
        for position, (result, error) in zip(order, results()):
            path, label = samples[position]
            if result is None:
                skipped.append({"path": path, "reason": error})
                continue
            if archive is not None and in_shard == shard_size:
                close_shard()
            if archive is None:
                names.append(f"{prefix}-{len(shards):06d}.tar")
                tmp = out_dir / f".{names[-1]}.partial-{os.getpid()}"
                archive = tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT)
                in_shard = 0
            ext, data = result
            key = f"{written:08d}"
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())):
                info, stream = _member(name, payload)
                archive.addfile(info, stream)
            written += 1
            in_shard += 1
        close_shard()
    finally:
        if archive is not None:
            archive.close()
        if tmp is not None and Path(tmp).exists():
            Path(tmp).unlink()
    if not written:
        raise ConfigError(f"--src: none of the {len(samples)} images of '{src}' could be decoded")
    seconds = time.perf_counter() - start
    manifest = {"format": "wcl-fast-shards/1", "source": str(src), "classes": classes, "count": written,
                "label_key": "cls", "shard_size": shard_size, "shuffle_seed": shuffle_seed, "shards": shards,
                "skipped": skipped, "empty_classes": list(empty), "ignored_files": list(other),
                "images_per_s": written / max(seconds, 1e-9)}
    tmp_manifest = out_dir / f".manifest.json.partial-{os.getpid()}"
    tmp_manifest.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp_manifest, manifest_path)
    say(f"wrote {len(shards)} shards ({written} samples, {shard_size} per shard) and {manifest_path}; "
        f"{manifest['images_per_s']:.0f} images/s; skipped {len(skipped)}"
        + "".join(f"\n  skipped {s['path']}: {s['reason']}" for s in skipped[:20]))
    return manifest
