"""Image files: ImageFolder scanning (links followed, loops named, unreadable entries kept so that they
are skipped by name) and decoding to RGB (or one-channel gray, exactly equivalent for the PIL loaders),
with unreadable files replaced (training) or left out (evaluation) and counted."""
from __future__ import annotations

import ctypes
import io
import multiprocessing
import os
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from wcl_fast.config import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_SUBSTITUTIONS = 16  # an unreadable image is replaced by the next readable one, at most this far away


class DataStop(RuntimeError):
    """The training data cannot be read any more (every file of a stretch unreadable, a loader worker process
    killed, a read that does not return): the run stops with this one line (wcl_fast.train: exit code 6,
    docs/running.md). torch's DataLoader raises a worker's exception again in the trainer as
    type(exc)(its text followed by the worker's traceback), whose last line is '<module>.<class>: <the
    original text>': that original line is kept."""

    def __init__(self, message: str):
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


class UnreadableData(DataStop):
    """MAX_SUBSTITUTIONS consecutive samples could not be read (a dataset deleted or unmounted mid-run)."""


_TRACKERS: "weakref.WeakSet[ReadsInFlight]" = weakref.WeakSet()
_SLOT_BYTES = 1024  # per worker process: the path being read (utf-8, cut at this length)


class ReadsInFlight:
    """The files being read right now, and since when, as the trainer's process sees them: reads by threads
    of this process (DALI's readers, FFCV's batches, data.workers=0) and, with `worker_slots`, reads by the
    DataLoader worker processes forked after it was made (one shared slot per worker id). `reads_in_flight()`
    lists those of every live instance: wcl_fast.signals' watchdog stops the run when one has not returned
    within data.read_timeout (a hung network mount, a FIFO in place of an image), naming them."""

    def __init__(self, worker_slots: int = 0):
        self._lock = threading.RLock()  # re-entrant: a signal handler (StopRequest's) may list them mid-update
        self._local: dict[int, tuple[str, float]] = {}
        self._next = 0
        self._slots = worker_slots
        if worker_slots:  # shared memory, inherited by the worker processes (raw: one writer per slot)
            self._paths = multiprocessing.RawArray(ctypes.c_char, worker_slots * _SLOT_BYTES)
            self._starts = multiprocessing.RawArray(ctypes.c_double, worker_slots)
        _TRACKERS.add(self)

    def __getstate__(self):  # a worker process started by spawn / forkserver gets the shared slots only
        state = dict(self.__dict__, _local={})
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def _worker_slot(self) -> int | None:
        if not self._slots:
            return None
        from torch.utils.data import get_worker_info

        info = get_worker_info()  # None outside a DataLoader worker process
        return info.id if info is not None and info.id < self._slots else None

    @contextmanager
    def reading(self, path, detail: str = "", grace: float = 0.0):
        """Marks `path` (and what of it: `detail`) as being read inside the block; `grace` seconds of it are not
        counted (work known to come with this read). time.monotonic is CLOCK_MONOTONIC on Linux, one clock
        for every process of the machine."""
        what = f"'{path}'" + (f" ({detail})" if detail else "")
        slot = self._worker_slot()
        if slot is not None:
            data = os.fsencode(what)[:_SLOT_BYTES - 1]
            self._paths[slot * _SLOT_BYTES:slot * _SLOT_BYTES + len(data) + 1] = data + b"\0"
            self._starts[slot] = time.monotonic() + grace
            try:
                yield
            finally:
                self._starts[slot] = 0.0
            return
        with self._lock:
            token, self._next = self._next, self._next + 1
            self._local[token] = (what, time.monotonic() + grace)
        try:
            yield
        finally:
            with self._lock:
                del self._local[token]

    def in_flight(self) -> list[tuple[str, float]]:
        """[("'path' (detail)", seconds since its read started)], oldest first."""
        now = time.monotonic()
        with self._lock:
            found = [(what, max(0.0, now - start)) for what, start in self._local.values()]
        for slot in range(self._slots):
            start = self._starts[slot]
            if start > 0.0:
                raw = self._paths[slot * _SLOT_BYTES:(slot + 1) * _SLOT_BYTES]
                found.append((os.fsdecode(raw.split(b"\0", 1)[0]), max(0.0, now - start)))
        return sorted(found, key=lambda item: -item[1])


def reads_in_flight() -> list[tuple[str, float]]:
    """Every read in flight that this process can see ([(what, seconds)], oldest first; see ReadsInFlight)."""
    trackers = []
    for _ in range(5):  # a loader built meanwhile by another thread changes the set: look again
        try:
            trackers = list(_TRACKERS)
            break
        except RuntimeError:
            continue
    found = [item for tracker in trackers for item in tracker.in_flight()]
    return sorted(found, key=lambda item: -item[1])


def scan_class_folder(folder: Path, warn=None) -> tuple[list[str], list[str]]:
    """(image paths, other files) under one class folder, sorted, symlinked files and folders followed.
    An entry with an image extension that is not a readable regular file (a symlink loop, a dangling link,
    a file without read permission) is kept as an image path: the decoder then fails on it and it is
    counted and named like every other unreadable image. Sub-folders that cannot be listed are named
    through `warn` (default: a warning on stderr) instead of vanishing."""
    warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr))
    images, other = [], []

    def unlistable(error: OSError) -> None:
        warn(f"cannot list '{error.filename}' ({error.strerror}); its images are not used")

    seen = set()
    for top, dirs, files in os.walk(folder, onerror=unlistable, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # reached twice through symlinks: each real folder is listed once
            dirs[:] = []
            continue
        seen.add(real)
        follow = []
        for name in dirs:
            path = os.path.join(top, name)
            target = os.path.realpath(path)
            if not os.path.isdir(path):  # a dangling or looping link: unreadable, named by the decoder
                (images if Path(name).suffix.lower() in IMAGE_EXTENSIONS else other).append(path)
            elif os.path.islink(path) and (real == target or real.startswith(target + os.sep)):
                warn(f"'{path}' links back to '{target}' (a folder loop); not followed")
            else:
                follow.append(name)
        dirs[:] = follow
        for name in files:
            path = os.path.join(top, name)
            (images if Path(name).suffix.lower() in IMAGE_EXTENSIONS else other).append(path)
    return sorted(images), sorted(other)


def scan_image_folder(root: str | Path, key: str = "data.train_dir") -> tuple[list[tuple[str, int]], list[str]]:
    """(samples [(path, class id)], class names) of an ImageFolder, sorted; clear errors when empty."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{key}: '{root}' is not a directory; point it at an ImageFolder (one sub-folder per class)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ConfigError(f"{key}: '{root}' has no class sub-folders; expected {root}/<class>/<image>.jpg")
    samples = [(path, label) for label, name in enumerate(classes) for path in scan_class_folder(root / name)[0]]
    if not samples:
        raise ConfigError(f"{key}: '{root}' has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    return samples, classes


def load_rgb(path, draft: tuple[int, int] | None = None, keep_gray: bool = False) -> Image.Image:
    """Decode an image (a path or a file object) fully as RGB (CMYK, grayscale, palette and alpha images are
    converted; 16-bit grayscale, which PIL's RGB conversion would clip to white, is scaled to 8 bits:
    v -> round(v / 257)). draft=(w, h): a JPEG may be decoded at 1/2, 1/4 or 1/8 scale, no smaller than that.
    keep_gray: an 8-bit (or scaled 16-bit) grayscale image stays one channel ("L"); `apply_crop` and
    `to_normalized_tensor` treat it as the RGB image with three equal channels, bit for bit, at a third of
    the work (see `load_rgb_or_gray`)."""
    with Image.open(path) as img:
        if draft is not None and img.format == "JPEG":
            img.draft("RGB", draft)
        img.load()
        if img.mode.startswith("I"):  # "I;16", "I;16B", ... and "I" (how PIL opens 16-bit PNGs)
            wide = np.asarray(img, dtype=np.float64)
            img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
        elif img.mode in ("P", "PA", "LA"):
            img = img.convert("RGBA")  # palette / alpha: resolve transparency before dropping alpha
        if keep_gray and img.mode == "L":
            return img.copy()  # detached from the file (the context closes it)
        return img.convert("RGB")


def decode_rgb_array(path) -> np.ndarray:
    """`load_rgb(path)` as an RGB uint8 array [H, W, 3] (the converter's decoder), faster for the common file:
    a complete three-channel JPEG (PIL opens it as "RGB" and it ends with its EOI marker) is decoded by
    OpenCV straight into an array. Both PIL and OpenCV decode with libjpeg-turbo's defaults (accurate
    integer IDCT, smooth chroma upsampling), so the pixels are the same (tested on 4:4:4 / 4:2:2 / 4:2:0,
    progressive and odd sizes); OpenCV is told to ignore EXIF orientation, as PIL does. This skips PIL's
    image object and its two copies (RGB conversion, array export), about a third of the decode time.
    Every other file (CMYK, grayscale, palette, PNG, a truncated or padded JPEG, one OpenCV refuses) goes
    through `load_rgb`, so what fails there fails the same way."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9":
        try:
            with Image.open(io.BytesIO(data)) as img:
                size = img.size if img.format == "JPEG" and img.mode == "RGB" else None
        except Exception:
            size = None
        if size is not None:
            import cv2

            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
            if bgr is not None and bgr.shape == (size[1], size[0], 3):
                return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return np.asarray(load_rgb(io.BytesIO(data)))


def load_rgb_or_gray(path) -> Image.Image:
    """The decoder of the PIL loaders: `load_rgb`, but a grayscale image stays one channel. Its crops,
    jitter, blur and tensors equal those of its RGB conversion exactly (tested), because every operation
    of the chain acts on three equal channels as on one: resize, brightness, contrast (its mean is that of
    the luma, which equals the gray value), blur and flip are per-channel; saturation, hue and grayscale
    leave a gray image unchanged (PIL's luma weights sum to exactly 1 in its fixed-point arithmetic)."""
    return load_rgb(path, keep_gray=True)


class ImageSource:
    """Reads samples of an ImageFolder; an unreadable file is replaced by the next readable sample.
    decode(path) returns what a reader needs (default: the RGB image) and raises when the file is unusable."""

    def __init__(self, samples: list[tuple[str, int]], decode=None, reads: ReadsInFlight | None = None):
        self.samples = samples
        self.decode = decode or load_rgb
        self.reads = reads or ReadsInFlight()  # every decode call is a read in flight (data.read_timeout)
        self._warned = 0

    def _decode(self, path):
        with self.reads.reading(path):
            return self.decode(path)

    def __len__(self) -> int:
        return len(self.samples)

    def _failed(self, path: str, exc: Exception, instead: str) -> None:
        if self._warned < 20:
            self._warned += 1
            print(f"warning: skipped unreadable image '{path}' ({type(exc).__name__}: {exc}); {instead}", file=sys.stderr)

    def read(self, index: int) -> tuple[Image.Image, int, int, int]:
        """(decoded image, actual index, label, number of unreadable files skipped): training, where a
        batch keeps its size."""
        for attempt in range(MAX_SUBSTITUTIONS):
            actual = (index + attempt) % len(self.samples)
            path, label = self.samples[actual]
            try:
                return self._decode(path), actual, label, attempt
            except Exception as exc:  # any decoder failure: count it, warn, and use the next sample
                self._failed(path, exc, "using the next sample instead")
        last = self.samples[(index + MAX_SUBSTITUTIONS - 1) % len(self.samples)][0]
        raise UnreadableData(f"{MAX_SUBSTITUTIONS} consecutive unreadable images, from sample {index} "
                             f"('{self.samples[index][0]}') to '{last}': the dataset is damaged, or was deleted or "
                             f"unmounted while the run read it; check the folder")

    def read_or_none(self, index: int):
        """(decoded image, label) of sample index, or None when it is unreadable: evaluation, where an
        unreadable image is left out and counted, never replaced by another one."""
        path, label = self.samples[index]
        try:
            return self._decode(path), label
        except Exception as exc:
            self._failed(path, exc, "left out of the evaluation")
            return None
