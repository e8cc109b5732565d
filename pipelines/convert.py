"""ImageFolder -> FFCV .beton (image, label), for data.backend=ffcv and for stock FFCV code; or -> WebDataset shards.

    python -m pipelines.convert --src /data/imagenet/train --out /data/imagenet/train_512.beton \
        [--max-resolution 512] [--jpeg-quality 90] [--write-mode jpg|raw|proportion] [--workers N] [--force]
        [--compress-probability 0.5] [--index-field]
    python -m pipelines.convert --src /data/imagenet/val --out val.beton --val-labels LOC_val_solution.csv \
        --train-dir /data/imagenet/train      # a flat ILSVRC2012 validation folder (devkit: + --val-synsets meta.mat)
    python -m pipelines.convert --format wds --src /data/imagenet/train --out /data/imagenet/train-wds --shard-size 1000
        # WebDataset tar shards, DALI .idx files and manifest.json (pipelines/wds_write.py, docs/data.md)

1. Validates the source: class folders (sorted, ids as the reference loader / torchvision assign
   them), empty class folders and non-image files are reported. Every image is decoded once, in FFCV's
   writer workers; unreadable ones (corrupt, truncated) are flagged there, and only then is the file
   written again without them; they are skipped with their reason. CMYK,
   grayscale, palette and alpha images are converted to RGB as the reference loader does; tiny
   images are kept.
2. Writes the readable images with FFCV's DatasetWriter into a temporary file next to --out and
   renames it only on success, so an interrupted conversion never leaves a file that looks complete.
   Fields: `image` (RGBImageField, longest side capped at --max-resolution) and `label` (class id), so
   that stock FFCV code reads (image, label); the project's loaders take the sample id from the record
   position. --index-field adds `index` (the record's position 0..n-1) for code that wants it stored.
3. Writes <out>.json beside it: source, classes, the relative path of every record (record i is
   paths[i]), skipped files with reasons, settings, images/s.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from pipelines.images import IMAGE_EXTENSIONS, decode_rgb_array, load_rgb, scan_class_folder
from wcl_fast.config import ConfigError


def scan_source(src: Path) -> tuple[list[tuple[str, int]], list[str], list[str], list[str]]:
    """(samples, classes, empty class folders, non-image files) of an ImageFolder."""
    if not src.is_dir():
        raise ConfigError(f"--src: '{src}' is not a directory; point it at an ImageFolder (one sub-folder per class)")
    classes = sorted(d.name for d in src.iterdir() if d.is_dir())
    if not classes:
        raise ConfigError(f"--src: '{src}' has no class sub-folders; expected {src}/<class>/<image>.jpg")
    samples, empty, other = [], [], []
    for label, name in enumerate(classes):  # links followed, loops named, unreadable entries kept (then skipped by name)
        images, others = scan_class_folder(src / name)
        samples += [(path, label) for path in images]
        other += others
        if not images:
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


_SLOT = None  # in a writer worker: its position in _WatchedWriter's table of current records


def fit_resolution(image: np.ndarray, max_resolution: int | None) -> np.ndarray:
    """The longest side capped at max_resolution as FFCV's writer caps it (OpenCV area filter, sides
    truncated), except that no side drops below 1 px: FFCV would give a 2 x 10000 image capped at 512 a
    0-px side, and OpenCV then fails inside the writer. Images within the cap are returned unchanged,
    so FFCV does not resize again."""
    height, width = image.shape[:2]
    if not max_resolution or max(height, width) <= max_resolution:
        return image
    import cv2

    ratio = max_resolution / max(height, width)
    size = (max(1, int(ratio * width)), max(1, int(ratio * height)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


class _Records:
    """Indexed dataset for FFCV's writer: record i -> (RGB uint8 HWC, class id[, i]). In a watched writer
    worker it first notes i as the record this worker is on."""

    def __init__(self, samples: list[tuple[str, int]], max_resolution: int | None, current=None, index_field=False):
        import multiprocessing

        self.samples, self.max_resolution, self.current = samples, max_resolution, current
        self.index_field = index_field
        # 1 where the record's file did not decode: shared with FFCV's (forked) writer workers
        self.unreadable = multiprocessing.RawArray("b", len(samples))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        if self.current is not None and _SLOT is not None:
            self.current[_SLOT] = i
        path, label = self.samples[i]
        try:
            decoded = decode_rgb_array(path)
        except Exception:  # an unreadable file: a 1 x 1 placeholder now; convert() writes again without it
            self.unreadable[i] = 1
            decoded = np.zeros((1, 1, 3), dtype=np.uint8)
        image = fit_resolution(decoded, self.max_resolution)
        return (image, label, i) if self.index_field else (image, label)


class WriterFailed(ConfigError):
    """A writer worker died; names the record (source file) it was on."""


class _WatchedWriter:
    """FFCV's DatasetWriter with its worker processes watched. FFCV's parent waits until its workers have
    written every record and never looks at them, so a worker that dies (an exception, a signal, the OOM
    killer) leaves it waiting forever. Here every worker process FFCV starts is recorded, notes the record
    it is on, and reports an exception as one line instead of a traceback; a thread polls the workers'
    exit codes and, at the first failure, interrupts the main thread's wait (SIGUSR1 to it), stops the
    other workers and raises WriterFailed naming the file."""

    def __init__(self, workers: int):
        import multiprocessing

        self.workers = workers
        self.current = multiprocessing.RawArray("q", [-1] * workers)  # record each worker is on
        self.errors = multiprocessing.SimpleQueue()  # (slot, "Type: message") from failing workers
        self.processes = []
        self.failure = None

    def _process_class(self, base):
        watch = self

        class Watched(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.slot = len(watch.processes)
                watch.processes.append(self)

            def run(self):
                global _SLOT
                _SLOT = self.slot
                try:
                    super().run()
                except BaseException as exc:  # one line to the parent, no traceback; the exit code says failed
                    watch.errors.put((self.slot, f"{type(exc).__name__}: {exc}"))
                    os._exit(1)

        return Watched

    def _watch(self, done, main_thread: int):
        import signal

        while not done.wait(0.2):
            for proc in list(self.processes):
                code = proc.exitcode
                if code not in (None, 0):
                    self.failure = (proc, code)
                    signal.pthread_kill(main_thread, signal.SIGUSR1)
                    return

    def write(self, path: str, fields: dict, records: _Records, samples: list[tuple[str, int]]) -> None:
        import signal
        import threading

        import ffcv.writer as ffcv_writer

        class _Interrupted(Exception):
            pass

        def interrupt(signum, frame):
            raise _Interrupted

        original = ffcv_writer.Process
        ffcv_writer.Process = self._process_class(original)
        previous = signal.signal(signal.SIGUSR1, interrupt)
        done = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(done, threading.get_ident()), daemon=True)
        writer = ffcv_writer.DatasetWriter(path, fields, num_workers=self.workers)
        finished = False
        try:
            watcher.start()
            writer.from_indexed_dataset(records, chunksize=64)  # tqdm bar: images/s and ETA
            finished = True
        except _Interrupted:
            print(file=sys.stderr, flush=True)  # end FFCV's progress bar's line: the error is a line of its own
            raise self._describe(samples) from None
        finally:
            done.set()
            watcher.join()
            signal.signal(signal.SIGUSR1, previous)
            ffcv_writer.Process = original
            for proc in self.processes:
                if proc.is_alive():
                    proc.terminate()
                proc.join()
            shared = getattr(writer, "metadata_sm", None)
            if not finished and hasattr(shared, "unlink"):  # FFCV releases its shared block only on success
                shared.close()
                shared.unlink()

    def _describe(self, samples) -> WriterFailed:
        proc, code = self.failure
        reason = None
        while not self.errors.empty():
            slot, text = self.errors.get()
            if slot == proc.slot:
                reason = text
        record = self.current[proc.slot]
        what = (f"record {record}, '{samples[record][0]}'" if 0 <= record < len(samples) else "before its first record")
        how = " ".join(reason.split()) if reason else (f"killed by signal {-code}" if code < 0 else f"exit code {code}")
        return WriterFailed(f"FFCV's writer failed on {what}: {how}; nothing was written. Remove or re-save that "
                            f"file and run the conversion again")


def flat_source(src: Path, val_labels: str, val_synsets: str, train_dir: str):
    """scan_source for a flat ILSVRC2012 validation folder: labels from LOC_val_solution.csv or the devkit's
    ground truth (+ meta.mat), class ids of the sorted training folders (as data.val_labels reads it)."""
    from pipelines.datasets import flat_val_split

    if not train_dir:
        raise ConfigError("--val-labels needs --train-dir: the class ids are those of the training folders")
    samples, classes = flat_val_split(str(src), val_labels, val_synsets, train_dir, key="--src")
    other = [str(p) for p in sorted(src.iterdir()) if p.is_file() and p.suffix.lower() not in IMAGE_EXTENSIONS]
    counts = {label for _, label in samples}
    return samples, classes, [name for i, name in enumerate(classes) if i not in counts], other


def convert(src: str, out: str, max_resolution: int | None = 512, jpeg_quality: int = 90, write_mode: str = "jpg",
            workers: int = 1, force: bool = False, quiet: bool = False, index_field: bool = False,
            compress_probability: float = 0.5, val_labels: str = "", val_synsets: str = "", train_dir: str = "") -> dict:
    from pipelines.ffcv import keep_torch_threads

    try:
        with keep_torch_threads():
            from ffcv.fields import IntField, RGBImageField
    except ImportError:
        raise ConfigError("FFCV is not installed: 'make install' installs it with its system libraries "
                          "(pkg-config libturbojpeg0-dev libopencv-dev), or pip install ffcv==1.0.2 after those") from None
    src_path, out_path = Path(src), Path(out)
    if out_path.exists() and not force:
        raise ConfigError(f"--out: '{out_path}' exists; pass --force to overwrite it")
    if write_mode not in ("jpg", "raw", "proportion"):
        raise ConfigError(f"--write-mode: {write_mode!r} is not one of jpg, raw, proportion")
    start = time.perf_counter()
    samples, classes, empty, other, say = _source(src_path, val_labels, val_synsets, train_dir, quiet)
    if empty:
        say(f"warning: {len(empty)} empty class folders keep their class ids but have no records: {', '.join(empty[:10])}")
    if other:
        say(f"warning: {len(other)} non-image files are ignored, e.g. {other[0]}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
    fields = {"image": RGBImageField(write_mode="proportion" if write_mode == "proportion" else write_mode,
                                     max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                                     compress_probability=compress_probability),
              "label": IntField(), **({"index": IntField()} if index_field else {})}
    write_start = time.perf_counter()
    good, unreadable = samples, set()
    try:
        # Each image is decoded once, inside FFCV's writer workers (FFCV's progress bar). A file that does
        # not decode is written as a placeholder and flagged; only then is the file written again
        # without the flagged ones (a second pass happens only when the folder has unreadable files).
        for attempt in range(3):
            watched = _WatchedWriter(max(1, workers))
            records = _Records(good, max_resolution, watched.current, index_field)
            watched.write(str(tmp), fields, records, good)
            flagged = {good[i][0] for i in range(len(good)) if records.unreadable[i]}
            if not flagged:
                break
            unreadable |= flagged
            good = [s for s in good if s[0] not in flagged]
            if not good:
                raise ConfigError(f"--src: none of the {len(samples)} images of '{src_path}' could be decoded")
            say(f"{len(flagged)} unreadable images: writing the {len(good)} others again")
        else:
            raise ConfigError(f"--src: images of '{src_path}' kept failing to decode; check the disk")
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    seconds = time.perf_counter() - write_start
    skipped = [(path, _check(path) or "unreadable in the writer") for path, _ in samples if path in unreadable]
    summary = {"source": str(src_path), "out": str(out_path), "classes": classes, "count": len(good),
               "paths": [str(Path(p).relative_to(src_path)) for p, _ in good],
               "skipped": [{"path": p, "reason": r} for p, r in skipped], "empty_classes": empty,
               "ignored_files": other, "max_resolution": max_resolution, "jpeg_quality": jpeg_quality,
               "compress_probability": compress_probability if write_mode == "proportion" else None,
               "write_mode": write_mode, "fields": list(fields), "workers": workers, "write_images_per_s": len(good) / max(seconds, 1e-9),
               "total_s": time.perf_counter() - start}
    tmp_json = out_path.with_name(f".{out_path.name}.json.partial-{os.getpid()}")
    tmp_json.write_text(json.dumps(summary, indent=1))
    os.replace(tmp_json, out_path.with_name(out_path.name + ".json"))
    say(f"wrote {out_path}: {len(good)} records, {summary['write_images_per_s']:.0f} images/s with {workers} workers; "
        f"skipped {len(skipped)}" + "".join(f"\n  skipped {p}: {r}" for p, r in skipped[:20]))
    return summary


def _source(src_path: Path, val_labels: str, val_synsets: str, train_dir: str, quiet: bool, target: str = ""):
    """Both converters' input, (samples, classes, empty class folders, ignored files, say): an ImageFolder, or a
    flat validation folder with its labels; `say` prints progress on stderr unless quiet, starting with the count."""
    if val_labels:
        samples, classes, empty, other = flat_source(src_path, val_labels, val_synsets, train_dir)
    else:
        samples, classes, empty, other = scan_source(src_path)
    say = (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    say(f"convert: {len(samples)} images in {len(classes)} classes under {src_path}{target}")
    return samples, classes, empty, other, say


def convert_to_shards(src: str, out: str, shard_size: int, prefix: str = "shard", shuffle_seed: int | None = 0,
                      workers: int = 1, force: bool = False, quiet: bool = False, val_labels: str = "",
                      val_synsets: str = "", train_dir: str = "") -> dict:
    """--format wds: the same inputs as convert() (an ImageFolder, or a flat validation folder with its labels)
    written as WebDataset shards with DALI index files and a manifest (pipelines/wds_write.py)."""
    from pipelines.wds_write import convert_wds

    src_path = Path(src)
    samples, classes, empty, other, say = _source(src_path, val_labels, val_synsets, train_dir, quiet,
                                                  f" -> WebDataset shards of {shard_size}")
    return convert_wds(samples, classes, src_path, out, shard_size, prefix, shuffle_seed, workers, force, say, empty, other)


def main(argv=None) -> int:
    """The command (a user error: one line, exit 2). wcl_fast.cli, the commands' convention, is imported here
    only: the pipelines library itself imports nothing of wcl_fast but its config."""
    from wcl_fast.cli import command

    return command(_main)(argv)


def _main(argv=None) -> int:
    from wcl_fast.cli import ArgumentParser, at_least, between

    parser = ArgumentParser(prog="python -m pipelines.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--src", required=True, help="ImageFolder: one sub-folder per class")
    parser.add_argument("--out", required=True, help="the .beton file to write (--format wds: the folder of shards)")
    parser.add_argument("--format", default="beton", choices=["beton", "wds"],
                        help="beton: one FFCV file; wds: WebDataset tar shards + DALI .idx files + manifest.json")
    parser.add_argument("--shard-size", type=at_least(1), default=1000, help="--format wds: samples per shard")
    parser.add_argument("--prefix", default="shard", help="--format wds: shard names <prefix>-000000.tar, ...")
    parser.add_argument("--shuffle-seed", type=int, default=0,
                        help="--format wds: the seed of the written order (classes mixed across shards); -1 keeps the "
                             "folder's order")
    parser.add_argument("--max-resolution", type=at_least(0), default=512, help="longest side cap (0 = keep)")
    parser.add_argument("--jpeg-quality", type=between(1, 100), default=90)
    parser.add_argument("--write-mode", default="jpg", choices=["jpg", "raw", "proportion"])
    parser.add_argument("--compress-probability", type=float, default=0.5,
                        help="proportion mode: the share of images stored as JPEG, the rest raw (ffcv-imagenet: 0.5)")
    parser.add_argument("--workers", type=at_least(1), default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    parser.add_argument("--val-labels", default="", help="a flat validation folder's labels: LOC_val_solution.csv "
                        "or ILSVRC2012_validation_ground_truth.txt (then --val-synsets meta.mat)")
    parser.add_argument("--val-synsets", default="", help="with the devkit's ground truth: its data/meta.mat")
    parser.add_argument("--train-dir", default="", help="with --val-labels: the training ImageFolder (class ids)")
    parser.add_argument("--index-field", action="store_true",
                        help="also store each record's position as a field 'index' (wcl-fast does not need it)")
    args = parser.parse_args(argv)
    if not 0 <= args.compress_probability <= 1:
        raise ConfigError(f"--compress-probability must be in [0, 1], got {args.compress_probability}")
    if args.format == "wds":
        convert_to_shards(args.src, args.out, args.shard_size, args.prefix, None if args.shuffle_seed < 0 else args.shuffle_seed,
                          args.workers, args.force, val_labels=args.val_labels, val_synsets=args.val_synsets,
                          train_dir=args.train_dir)
        return 0
    convert(args.src, args.out, args.max_resolution or None, args.jpeg_quality, args.write_mode, args.workers, args.force,
            index_field=args.index_field, compress_probability=args.compress_probability,
            val_labels=args.val_labels, val_synsets=args.val_synsets, train_dir=args.train_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
