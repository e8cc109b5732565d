"""WebDataset tar shards (data.shards): the shard list, its exact world-size-independent order, reads with retries,
and the streaming training loader (data.backend=shards). docs/data.md describes the format, keys and order.

The format is WebDataset's (https://github.com/webdataset/webdataset, "The WebDataset Format"): a POSIX tar file
whose consecutive members sharing a key (the member path up to the first dot of its file name) are one sample;
the rest of the name is the member's extension. A sample here is an image member (.jpg, .jpeg, .png or .webp)
and a label member (data.shard_label_key: "cls", a decimal class id, or "json:label", a field of a JSON member).

Sample ids are global and stable: shard k's sample at position p (its p-th key in the tar) has id
starts[k] + p, starts being the cumulative sample counts of the shards in the order data.shards lists them.

Order of epoch e (a pure function of seed, epoch and step; docs/data.md §2):
1. the shards are permuted (seeded by seed, epoch); each shard's samples are permuted (seeded by seed, epoch,
   shard index); concatenated, this is the epoch's sequence of T samples;
2. the sequence is cut into S = data.shard_streams logical streams of L = T // S consecutive samples each, so
   a stream is a run of whole shards (cut at its two ends);
3. global step s takes b = N / S consecutive samples from every stream (N = data.batch_size): rows
   [j b, (j + 1) b) of the global batch are stream j's samples [s b, (s + 1) b); steps per epoch = L // b;
4. rank r of W owns streams [r S / W, (r + 1) S / W), so it owns rows [r N / W, (r + 1) N / W), as every
   other loader: the global batch, its sample ids and their augmentations do not depend on W.
An unreadable sample is replaced by the next readable sample of its stream's share of that step (cyclically),
counted in batch.failed and named in a warning; a shard that cannot be read after data.shard_retries retries
stops the run with one line (DataStop: exit code 6).
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from pipelines.batch import collate_multicrop
from pipelines.images import DataStop, ReadsInFlight, UnreadableData, load_rgb_or_gray
from pipelines.sampling import ignore_stop_signals
from wcl_fast.config import ConfigError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MANIFEST_FORMAT = "wcl-fast-shards/1"
_ORDER_SALT = 0x5348  # "SH": keeps the shard order's random streams apart from the augmentations'


# ---------------------------------------------------------------------------------------------------- the list

def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion as WebDataset uses it: {000..012} (zero padding kept), {a,b,c}, nested
    (the braceexpand package, a dependency of wcl-fast)."""
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _join(base: str, name: str) -> str:
    if "://" in name or name.startswith("/"):
        return name
    return base.rsplit("/", 1)[0] + "/" + name if "/" in base else name


def _open_fs(url: str):
    try:
        import fsspec
    except ImportError:
        raise ConfigError("reading shards needs fsspec: pip install fsspec (and aiohttp for https://, s3fs for s3://, "
                          "gcsfs for gs://)") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        scheme = url.split("://", 1)[0]
        extra = {"http": "aiohttp", "https": "aiohttp", "s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(scheme, "")
        raise ConfigError(f"cannot read '{url}' ({exc}); " + (f"pip install {extra}" if extra else
                          "use a local path or an fsspec URL (https://, s3://, gs://)")) from None


def read_bytes(url: str, retries: int = 0, backoff: float = 0.5, reads: ReadsInFlight | None = None,
               what: str = "shard") -> bytes:
    """The whole file at `url` (a local path or an fsspec URL), retried `retries` times after transient errors,
    waiting backoff, 2 backoff, 4 backoff, ... seconds; a file that does not exist is not retried. Each try is
    a read in flight (the watchdog of data.read_timeout names it). Raises DataStop after the last try."""
    reads = reads or ReadsInFlight()
    fs, path = _open_fs(url)
    error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            with reads.reading(url, f"{what}, try {attempt + 1} of {retries + 1}"):
                return fs.cat_file(path)
        except FileNotFoundError as exc:
            error = exc
            break
        except Exception as exc:  # network, server (5xx), a truncated transfer: try again
            error = exc
    how = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    tries = f"after {attempt + 1} tries" if attempt else "(not found)" if isinstance(error, FileNotFoundError) else ""
    raise DataStop(f"{what} '{url}' could not be read {tries} ({how}); check the path or the storage".replace("  ", " "))


def _index_count(data: bytes) -> int | None:
    head = data.split(b"\n", 1)[0].split()
    if len(head) == 2 and head[0].startswith(b"v1") and head[1].isdigit():
        return int(head[1])
    return None


@dataclass
class ShardList:
    """The shards of data.shards (or data.val_shards) in their listed order, with their sample counts."""

    key: str  # the config key, for messages
    urls: list[str]
    counts: list[int]
    sha256: list[str] = field(default_factory=list)  # from a manifest; [] when unknown
    classes: list[str] = field(default_factory=list)  # from a manifest written by pipelines.convert

    def __post_init__(self):
        self.starts = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)]).astype(np.int64)

    @property
    def names(self) -> list[str]:
        return [url.rstrip("/").rsplit("/", 1)[-1] for url in self.urls]

    @property
    def total(self) -> int:
        return int(self.starts[-1])

    def identity(self) -> dict:
        """What a checkpoint records of the data: the shard names and counts in order and their hash."""
        text = json.dumps([[n, c] for n, c in zip(self.names, self.counts)], separators=(",", ":"))
        return {"hash": hashlib.sha256(text.encode()).hexdigest(), "names": self.names, "counts": list(self.counts)}

    def locate(self, sample_id: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.starts, sample_id, side="right")) - 1
        return shard, int(sample_id - self.starts[shard])


def identity_difference(there: dict, here: dict) -> str | None:
    """One phrase naming how two ShardList.identity() differ, or None when they are the same."""
    if there.get("hash") == here.get("hash"):
        return None
    a, b = list(zip(there["names"], there["counts"])), list(zip(here["names"], here["counts"]))
    if len(a) != len(b):
        gone, new = sorted(set(there["names"]) - set(here["names"])), sorted(set(here["names"]) - set(there["names"]))
        detail = (f"; missing here: {', '.join(gone[:3])}" if gone else "") + (f"; new here: {', '.join(new[:3])}" if new else "")
        return f"{len(a)} shards ({sum(there['counts'])} samples) there, {len(b)} ({sum(here['counts'])}) here{detail}"
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"shard {i} is '{a[i][0]}' ({a[i][1]} samples) there, '{b[i][0]}' ({b[i][1]} samples) here"


def resolve_shards(spec, key: str = "data.shards", retries: int = 2, backoff: float = 0.5) -> ShardList:
    """The ShardList of `spec`: a brace pattern ('train-{000000..001281}.tar'), a list of paths / patterns, or a
    manifest (.json, as pipelines.convert --format wds writes it: names relative to it, counts, sha256). Counts
    not in a manifest come from a DALI index beside each shard (x.idx for x.tar) or from the tar's headers."""
    if isinstance(spec, str):
        spec = spec.strip()
        if not spec:
            raise ConfigError(f"config key '{key}' is empty; set {key}=DIR/train-{{000000..000099}}.tar, a list of shard "
                              f"files or a manifest .json (python -m pipelines.convert --format wds writes one)")
        if spec.endswith(".json"):
            return _read_manifest(spec, key, retries, backoff)
        patterns = [spec]
    else:
        patterns = list(spec)
        if not patterns:
            raise ConfigError(f"config key '{key}' is an empty list; list the shard files or give a brace pattern")
    urls = [url for pattern in patterns for url in expand_braces(pattern)]
    if len(set(urls)) != len(urls):
        twice = next(u for u in urls if urls.count(u) > 1)
        raise ConfigError(f"{key}: '{twice}' is listed twice; list every shard once")
    counts = [_count(url, key, retries, backoff) for url in urls]
    return ShardList(key, urls, counts)


def _read_manifest(path: str, key: str, retries: int, backoff: float) -> ShardList:
    try:
        data = read_bytes(path, retries, backoff, what="manifest")
    except DataStop as exc:
        raise ConfigError(f"{key}: {exc}") from None
    try:
        manifest = json.loads(data)
        entries = manifest["shards"]
        urls = [_join(path, entry["name"]) for entry in entries]
        counts = [int(entry["count"]) for entry in entries]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{key}: '{path}' is not a shard manifest ({type(exc).__name__}: {exc}); expected JSON "
                          f"{{\"shards\": [{{\"name\": ..., \"count\": ..., \"sha256\": ...}}]}} as pipelines.convert "
                          f"--format wds writes it") from None
    if not urls:
        raise ConfigError(f"{key}: the manifest '{path}' lists no shards")
    return ShardList(key, urls, counts, [entry.get("sha256", "") for entry in entries], manifest.get("classes", []))


def _count(url: str, key: str, retries: int, backoff: float) -> int:
    """Samples in one shard: its DALI index's header when there is one, else its tar headers."""
    index = url[:-4] + ".idx" if url.endswith(".tar") else url + ".idx"
    fs, path = _open_fs(index)
    try:
        if fs.exists(path):
            count = _index_count(fs.cat_file(path)[:64])
            if count is not None:
                return count
    except Exception:
        pass
    try:
        data = read_bytes(url, retries, backoff, what="shard")
    except DataStop as exc:
        raise ConfigError(f"{key}: {exc}") from None
    samples, error = parse_tar(data)
    if error and not samples:
        raise ConfigError(f"{key}: '{url}' is not a tar file ({error}); list WebDataset .tar shards")
    return len(samples)


# ---------------------------------------------------------------------------------------------------- one shard

def split_member(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member by WebDataset's rule: the key is the path up to the first dot of the
    file name; None for a name without one (not part of any sample)."""
    folder, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext


def sample_members(archive: tarfile.TarFile):
    """(key, extension, member) of each regular member of an open tar that belongs to a sample, in tar order."""
    for member in archive:
        if member.isfile():
            split = split_member(member.name)
            if split is not None:
                yield split[0], split[1], member


def parse_tar(data: bytes) -> tuple[list[tuple[str, dict[str, bytes]]], str]:
    """([(key, {extension: bytes})] in tar order, "" or the error that ended the parse early): consecutive
    members with the same key form a sample. A damaged tar keeps the samples before the damage."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    error = ""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            for key, ext, member in sample_members(archive):
                payload = archive.extractfile(member).read()
                if len(payload) != member.size:
                    raise tarfile.ReadError(f"member '{member.name}' is truncated")
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = payload
    except (tarfile.TarError, OSError, EOFError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return samples, error


def parse_label(members: dict[str, bytes], label_key: str) -> int:
    """The class id of a sample under data.shard_label_key ('cls' or 'json:label'); raises when absent."""
    ext, _, field_name = label_key.partition(":")
    if ext not in members:
        raise ValueError(f"no .{ext} member")
    raw = members[ext]
    if field_name:
        value = json.loads(raw)
        for part in field_name.split("."):
            value = value[part]
        return int(value)
    return int(raw.decode().strip())


def image_member(members: dict[str, bytes]) -> tuple[str, bytes] | None:
    for ext in IMAGE_EXTS:
        for name in (ext, ext.upper()):
            if name in members:
                return ext, members[name]
    return None


# ---------------------------------------------------------------------------------------------------- the order

class ShardOrder:
    """The exact order of every epoch (module docstring): a pure function of (seed, epoch, step)."""

    def __init__(self, shards: ShardList, global_batch: int, streams: int, world: int, seed: int):
        if streams < 1:
            raise ConfigError(f"data.shard_streams must be >= 1, got {streams}")
        if streams % world:
            raise ConfigError(f"data.shard_streams={streams} is not divisible by the world size {world}: every process "
                              f"reads whole streams; set data.shard_streams to a multiple of {world} (it fixes the "
                              f"order, so keep it when resuming at another world size)")
        if global_batch % streams:
            raise ConfigError(f"data.batch_size={global_batch} is not divisible by data.shard_streams={streams}: every "
                              f"step takes the same number of samples from each stream; choose a multiple of {streams}")
        self.shards, self.streams, self.seed = shards, streams, seed
        self.share = global_batch // streams  # samples per stream per step
        self.stream_length = shards.total // streams
        self.steps_per_epoch = self.stream_length // self.share
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.batch_size={global_batch} exceeds what {streams} streams over {shards.total} "
                              f"samples give per epoch; lower data.batch_size or data.shard_streams")
        self._epoch = None

    def shard_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, _ORDER_SALT]).permutation(len(self.shards.counts))

    def within(self, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, _ORDER_SALT, 1, shard]).permutation(self.shards.counts[shard])

    def _epoch_tables(self, epoch: int):
        if self._epoch is None or self._epoch[0] != epoch:
            perm = self.shard_permutation(epoch)
            ends = np.cumsum(np.asarray(self.shards.counts, dtype=np.int64)[perm])
            self._epoch = (epoch, perm, ends, {})
        return self._epoch

    def positions(self, epoch: int, step: int, stream: int) -> list[tuple[int, int]]:
        """[(shard index, position in the shard)] of stream `stream`'s share of global step `step`."""
        _, perm, ends, within = self._epoch_tables(epoch)
        first = stream * self.stream_length + step * self.share
        p = np.arange(first, first + self.share, dtype=np.int64)
        slots = np.searchsorted(ends, p, side="right")
        q = p - np.where(slots > 0, ends[slots - 1], 0)
        found = []
        for slot, offset in zip(slots.tolist(), q.tolist()):
            shard = int(perm[slot])
            if shard not in within:
                within[shard] = self.within(epoch, shard)
            found.append((shard, int(within[shard][offset])))
        return found

    def stream_shards(self, epoch: int, stream: int, start_step: int = 0) -> list[tuple[int, int, int]]:
        """[(shard index, first step, last step)] of the shards stream `stream` reads from step start_step on."""
        _, perm, ends, _ = self._epoch_tables(epoch)
        base = stream * self.stream_length
        low, high = base + start_step * self.share, base + self.steps_per_epoch * self.share  # positions [low, high)
        if low >= high:
            return []
        found = []
        for slot in range(int(np.searchsorted(ends, low, side="right")), int(np.searchsorted(ends, high - 1, side="right")) + 1):
            begin = max(low, int(ends[slot - 1]) if slot else 0)
            end = min(high, int(ends[slot])) - 1
            found.append((int(perm[slot]), (begin - base) // self.share, (end - base) // self.share))
        return found

    def sample_ids(self, epoch: int, step: int, streams: range | None = None) -> list[int]:
        """The sample ids of global step `step`, stream-major (the global batch's rows), or of `streams` only."""
        streams = range(self.streams) if streams is None else streams
        return [int(self.shards.starts[k]) + q for j in streams for k, q in self.positions(epoch, step, j)]


def mixing(order: ShardOrder, epoch: int, steps: int) -> dict:
    """Distinct shards per global batch and the share of same-shard pairs among its samples, over `steps` steps,
    next to a uniform shuffle's expectation (sum over shards of (n_k / T)^2)."""
    distinct, pairs = [], []
    for step in range(min(steps, order.steps_per_epoch)):
        shards = np.array([order.shards.locate(i)[0] for i in order.sample_ids(epoch, step)])
        _, per = np.unique(shards, return_counts=True)
        n = len(shards)
        distinct.append(len(per))
        pairs.append(float((per * (per - 1)).sum()) / (n * (n - 1)))
    share = np.asarray(order.shards.counts, dtype=np.float64) / order.shards.total
    return {"distinct_shards_per_batch": float(np.mean(distinct)), "same_shard_pairs": float(np.mean(pairs)),
            "same_shard_pairs_uniform": float((share ** 2).sum()), "shards": len(order.shards.counts),
            "streams": order.streams}


# ---------------------------------------------------------------------------------------------------- reading

class ShardCache:
    """This rank's shards in memory, fetched by a pool of threads ahead of use (at most `ahead` shards beyond those
    in use), each read with retries and registered in `reads` (data.read_timeout)."""

    def __init__(self, shards: ShardList, threads: int, ahead: int, retries: int, backoff: float, reads: ReadsInFlight):
        self.shards, self.ahead, self.retries, self.backoff, self.reads = shards, ahead, retries, backoff, reads
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="shard-read")
        self.futures: dict[int, Future] = {}
        self.lock = threading.Lock()

    def _fetch(self, shard: int):
        url = self.shards.urls[shard]
        data = read_bytes(url, self.retries, self.backoff, self.reads)
        samples, error = parse_tar(data)
        return samples, error

    def want(self, shards) -> None:
        with self.lock:
            for shard in shards:
                if shard not in self.futures:
                    self.futures[shard] = self.pool.submit(self._fetch, shard)

    def get(self, shard: int):
        self.want([shard])
        return self.futures[shard].result()

    def drop(self, shard: int) -> None:
        with self.lock:
            future = self.futures.pop(shard, None)
        if future is not None:
            future.cancel()

    def clear(self) -> None:
        for shard in list(self.futures):
            self.drop(shard)

    def keep(self, shards) -> None:
        """Drops every shard but `shards` (those fetched ahead for the epoch that starts)."""
        for shard in list(self.futures):
            if shard not in shards:
                self.drop(shard)

    def close(self) -> None:
        self.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class Share:
    """One stream's share of one step, as the sampler hands it to the dataset (raw members, nothing decoded)."""

    epoch: int
    step: int
    stream: int
    samples: list  # [(sample id, where: "sample 'key' of shard 'url'", image bytes or None, label or None, why unreadable)]


class ShardSampler(Sampler):
    """Batch sampler of one rank: per step, its streams' Shares with the members read from the cached shards.
    It runs in the trainer's process (the DataLoader's), so shards are fetched once per rank."""

    def __init__(self, order: ShardOrder, rank: int, world: int, cache: ShardCache, label_key: str):
        per = order.streams // world
        self.order, self.cache, self.label_key = order, cache, label_key
        self.streams = range(rank * per, (rank + 1) * per)
        self.epoch, self.start_step = 0, 0
        self.warned: dict[int, str] = {}

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.order.steps_per_epoch - self.start_step

    def _plan(self, epoch: int, start: int):
        """(shards in the order this rank first needs them, {shard: first step}, {shard: last step})."""
        first, last = {}, {}
        for j in self.streams:
            for shard, begin, end in self.order.stream_shards(epoch, j, start):
                first[shard] = min(first.get(shard, begin), begin)
                last[shard] = max(last.get(shard, end), end)
        return sorted(first, key=first.get), first, last

    def __iter__(self):
        epoch, start = self.epoch, self.start_step
        needed, first, last = self._plan(epoch, start)
        self.cache.keep(set(needed))  # what the previous epoch fetched ahead for this one stays
        queue = 0  # needed[queue:]: not yet asked for
        following, next_queue = None, 0  # the next epoch's shards in order of first use, once this epoch's are asked for
        finished = False
        try:
            for step in range(start, self.order.steps_per_epoch):
                positions = {j: self.order.positions(epoch, step, j) for j in self.streams}
                now = sorted({k for found in positions.values() for k, _ in found}, key=first.get)
                self.cache.want(now)
                while queue < len(needed) and len(self.cache.futures) < len(now) + self.cache.ahead:
                    shard, queue = needed[queue], queue + 1
                    if last[shard] >= step:  # read ahead, in the order of first use
                        self.cache.want([shard])
                if queue == len(needed) and following is None:  # read ahead across the epoch's end as well
                    following = self._plan(epoch + 1, 0)[0]
                while following and next_queue < len(following) and len(self.cache.futures) < len(now) + self.cache.ahead:
                    self.cache.want([following[next_queue]])
                    next_queue += 1
                shares = [Share(epoch, step, j, [self._member(k, q) for k, q in positions[j]]) for j in self.streams]
                for k in now:
                    if last[k] <= step and k not in (following or ())[:next_queue]:
                        self.cache.drop(k)
                yield shares
            finished = True
        finally:
            if not finished:  # abandoned: nothing stays in flight
                self.cache.clear()
            else:  # only the next epoch's first shards, fetched ahead
                self.cache.keep(set((following or [])[:next_queue]))

    def _member(self, shard: int, position: int):
        samples, error = self.cache.get(shard)
        url = self.cache.shards.urls[shard]
        sample_id = int(self.cache.shards.starts[shard]) + position
        if position >= len(samples):
            why = error or f"the shard holds {len(samples)} samples, the shard list says {self.cache.shards.counts[shard]}"
            return sample_id, f"sample {position} of shard '{url}'", None, None, why
        key, members = samples[position]
        where = f"sample '{key}' of shard '{url}'"
        image = image_member(members)
        if image is None:
            return sample_id, where, None, None, f"no image member (.{', .'.join(IMAGE_EXTS)}) among .{', .'.join(members)}"
        try:
            label = parse_label(members, self.label_key)
        except Exception as exc:
            return sample_id, where, None, None, f"label (data.shard_label_key={self.label_key}): {type(exc).__name__}: {exc}"
        return sample_id, where, image[1], label, ""


class ShardMultiCropDataset(Dataset):
    """A Share -> its samples' crops as MultiCropDataset makes them from a file: the same draws, keyed by
    (seed, epoch, sample id, slot). An unreadable sample is replaced by the next readable one of the Share."""

    def __init__(self, cfg, seed: int):
        self.cfg, self.seed, self._warned = cfg, seed, 0

    def __len__(self) -> int:  # keys come from the batch sampler only
        return 0

    def views(self, img, epoch: int, sample_id: int):
        from pipelines.reference import augment, crop_recipes, to_normalized_tensor

        rng = np.random.default_rng([self.seed, epoch, sample_id])
        global_recipe, local_recipe = crop_recipes(self.cfg, epoch)
        mean, std = self.cfg.mean, self.cfg.std
        globals_ = [to_normalized_tensor(augment(img, global_recipe, rng), mean, std) for _ in range(2)]
        locals_ = [to_normalized_tensor(augment(img, local_recipe, rng), mean, std) for _ in range(self.cfg.local_crops)]
        return globals_, locals_

    def _decode(self, sample):
        sample_id, where, data, label, why = sample
        if data is None:
            raise ValueError(why)
        return load_rgb_or_gray(io.BytesIO(data)), label

    def __getitem__(self, share: Share):
        out, decoded = [], {}
        n = len(share.samples)
        for i, sample in enumerate(share.samples):
            for attempt in range(n):
                j = (i + attempt) % n
                if j not in decoded:
                    try:
                        decoded[j] = self._decode(share.samples[j])
                    except Exception as exc:
                        decoded[j] = None
                        self._warn(share, share.samples[j], exc)
                if decoded[j] is not None:
                    break
            else:
                raise UnreadableData(f"every sample of stream {share.stream}'s share of step {share.step} (epoch "
                                     f"{share.epoch}) is unreadable, e.g. {share.samples[0][1]}: {share.samples[0][4]}; "
                                     f"the shards are damaged; check them (sha256 in the manifest)")
            img, label = decoded[j]
            globals_, locals_ = self.views(img, share.epoch, sample[0])
            out.append((globals_, locals_, share.samples[j][0], label, attempt))
        return out

    def _warn(self, share: Share, sample, exc: Exception) -> None:
        if self._warned < 20:
            self._warned += 1
            print(f"warning: skipped unreadable {sample[1]} (id {sample[0]}; {type(exc).__name__}: {exc}); "
                  f"using the next readable sample of stream {share.stream}'s share instead", file=sys.stderr)


def collate_shares(items):  # -> pipelines.batch.MultiCropBatch
    return collate_multicrop([sample for share in items for sample in share])


class ShardSteps:
    """What every shard loader answers from its ShardOrder (`order`) and ShardList (`shards`): len() = steps per
    epoch, num_samples, identity (what the checkpoint records)."""

    def __len__(self) -> int:
        return self.order.steps_per_epoch

    @property
    def num_samples(self) -> int:
        return self.shards.total

    @property
    def identity(self) -> dict:
        return self.shards.identity()


class ShardLoader(ShardSteps):
    """The training loader of data.shards: `len()` steps per epoch, `.epoch(e, start_step)`, `.num_samples`,
    `.identity` (what the checkpoint records), `.order` (ShardOrder)."""

    def __init__(self, cfg, seed: int, rank: int, world: int, pin_memory: bool = False, shards: ShardList | None = None):
        self.shards = shards or resolve_shards(cfg.shards, "data.shards", cfg.shard_retries, cfg.shard_backoff)
        self.order = ShardOrder(self.shards, cfg.batch_size, cfg.shard_streams, world, seed)
        self.reads = ReadsInFlight()
        self.cache = ShardCache(self.shards, cfg.shard_read_threads, cfg.shard_read_ahead, cfg.shard_retries,
                                cfg.shard_backoff, self.reads)
        self.sampler = ShardSampler(self.order, rank, world, self.cache, cfg.shard_label_key)
        kwargs = dict(num_workers=cfg.workers, pin_memory=pin_memory, collate_fn=collate_shares,
                      batch_sampler=self.sampler, worker_init_fn=ignore_stop_signals)
        if cfg.workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=2)
        self.loader = DataLoader(ShardMultiCropDataset(cfg, seed), **kwargs)

    def epoch(self, epoch: int, start_step: int = 0):
        self.sampler.set_epoch(epoch, start_step)
        return iter(self.loader)

    def close(self) -> None:
        self.cache.close()


def build_shard_loader(cfg, seed: int, rank: int, world: int, pin_memory: bool = False) -> ShardLoader:
    return ShardLoader(cfg, seed, rank, world, pin_memory)


# ---------------------------------------------------------------------------------------------------- evaluation

class ShardEvalLoader:
    """The evaluation transform (Resize + CenterCrop, pipelines.pil.EvalDataset's) over this rank's contiguous,
    unpadded range of sample ids (pipelines.sampling.shard_range), in id order, read shard by shard (read ahead
    as in training). An unreadable sample is left out and counted (batch.failed), never replaced."""

    def __init__(self, cfg, shards: ShardList, batch_size: int, rank: int, world: int):
        from pipelines.sampling import shard_range

        self.cfg, self.shards, self.batch_size = cfg, shards, batch_size
        self.ids = shard_range(shards.total, rank, world)
        self.reads = ReadsInFlight()

    def __len__(self) -> int:
        return -(-len(self.ids) // self.batch_size)

    def __iter__(self):
        import torchvision.transforms.functional as TF

        from pipelines.batch import collate_eval
        from pipelines.reference import to_normalized_tensor

        if not len(self.ids):
            return
        first, last = self.shards.locate(self.ids.start)[0], self.shards.locate(self.ids.stop - 1)[0]
        cache = ShardCache(self.shards, self.cfg.shard_read_threads, self.cfg.shard_read_ahead, self.cfg.shard_retries,
                           self.cfg.shard_backoff, self.reads)
        items = []
        try:
            for shard in range(first, last + 1):
                cache.want(range(shard, min(last, shard + self.cfg.shard_read_ahead) + 1))
                samples, _ = cache.get(shard)
                begin = max(self.ids.start, int(self.shards.starts[shard]))
                end = min(self.ids.stop, int(self.shards.starts[shard + 1]))
                for sample_id in range(begin, end):
                    position = sample_id - int(self.shards.starts[shard])
                    try:
                        key, members = samples[position]
                        image = image_member(members)
                        if image is None:
                            raise ValueError(f"no image member among .{', .'.join(members)}")
                        label = parse_label(members, self.cfg.shard_label_key)
                        img = load_rgb_or_gray(io.BytesIO(image[1]))
                        img = TF.center_crop(TF.resize(img, self.cfg.eval_resize), self.cfg.eval_crop)
                        items.append(([to_normalized_tensor(img, self.cfg.mean, self.cfg.std)], [], sample_id, label, 0))
                    except Exception as exc:
                        print(f"warning: left unreadable sample {position} of shard '{self.shards.urls[shard]}' (id "
                              f"{sample_id}) out of the evaluation ({type(exc).__name__}: {exc})", file=sys.stderr)
                        items.append(None)
                    if len(items) == self.batch_size:
                        yield collate_eval(items)
                        items = []
                cache.drop(shard)
            if items:
                yield collate_eval(items)
        finally:
            cache.close()


def build_shard_eval_loader(cfg, spec, key: str, batch_size: int, rank: int, world: int):
    """(loader over this rank's range of `spec`'s samples, total samples, number of classes). The classes come
    from a manifest's list, else from the largest label found (which reads the labels of every shard once)."""
    shards = resolve_shards(spec, key, cfg.shard_retries, cfg.shard_backoff)
    if shards.classes:
        num_classes = len(shards.classes)
    else:
        highest = -1
        for url in shards.urls:
            samples, _ = parse_tar(read_bytes(url, cfg.shard_retries, cfg.shard_backoff))
            for _, members in samples:
                try:
                    highest = max(highest, parse_label(members, cfg.shard_label_key))
                except Exception:
                    pass
        num_classes = highest + 1
    return ShardEvalLoader(cfg, shards, batch_size, rank, world), shards.total, num_classes
