"""FFCV multi-crop loader (data.backend=ffcv) over a .beton written by `python -m pipelines.convert`.

Decode once, crop many: `MultiCropDecoder` is a custom FFCV operation (numba-compiled by FFCV's
pipeline compiler) that decodes each JPEG once (libjpeg-turbo through FFCV's `imdecode`) into a
scratch buffer and cuts the 2 global + L local random-resized crops from it with FFCV's
`resize_crop` (OpenCV area/linear resize), writing them into one flat uint8 record per sample.
Crop boxes follow torchvision's RandomResizedCrop sampler (FFCV's `get_random_crop`: 10 tries of
area ~ U(scale) and log-aspect ~ U(log ratio), else a central crop); the numba generator is seeded
per sample from the key (seed, epoch, sample id) (pipelines/keyed_random.py), and the colour / grey /
blur / flip choices are keyed uniforms of (seed, epoch, sample id, crop slot): every random choice of a
sample depends on (seed, epoch, index) only -- not on its batch, the batch size, the world size or the
resume point -- as in the reference and DALI loaders. The compiled decoder learns the epoch from a
one-element array ("epoch cell") that the loader writes before each epoch and the decoder reads
through its address (FFCV hands a decoder the batch's sample ids, not the epoch).

Everything after the crop runs as batched tensor ops on the training device (pipelines/augment.py):
ColorJitter (p 0.8, random order), grayscale (0.2), Gaussian blur (0.5), flip, normalisation,
channels-last; without a GPU the same choices go through the fused CPU kernel (pipelines/cpu_augment.py). Sample order is the trainer's StepSampler (global permutation per epoch, rank
slices, drop_last), through a custom FFCV TraversalOrder.

Differences from the reference loader (documented, tested for statistics): the crop is resized
with OpenCV (FFCV) instead of PIL bilinear, the random draws come from the keyed generators above
instead of numpy's default_rng([seed, epoch, index]) (same law, other numbers), the .beton holds images re-encoded at
--max-resolution, and the augmentation phase switch (MoCo-v2 -> SimCLR crop scale) rebuilds the
FFCV pipeline once (one numba compilation).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipelines.batch import MultiCropBatch
from pipelines.images import ReadsInFlight
from pipelines.sampling import StepSampler
from pipelines.reference import PROBE_STREAM, crop_recipes
from wcl_fast.config import ConfigError, DataConfig

COMPILE_GRACE_S = 120.0  # FFCV compiles its pipeline (numba) while the first batch is awaited: not a read timeout


@contextlib.contextmanager
def keep_torch_threads():
    """FFCV sets torch's intra-op thread count to its loader's worker count -- to 1 when it is imported, again
    in every Loader() and at every iter(loader) -- which would silently change the trainer's CPU math (its
    speed, and on the CPU its exact results). Inside this block, the caller's count is kept."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _import_ffcv():
    try:
        with keep_torch_threads():
            import ffcv  # noqa: F401
    except ImportError:
        raise ConfigError("data.backend=ffcv needs FFCV: 'make install' installs it with its system libraries, "
                          "or apt-get install pkg-config libturbojpeg0-dev libopencv-dev && pip install ffcv==1.0.2") from None


def ffcv_workers(cfg: DataConfig) -> int:
    """data.workers for FFCV's Loader, capped at numba's thread count (FFCV runs its workers as numba
    threads; more than NUMBA_NUM_THREADS, by default the machine's cores, would stop the loader)."""
    import warnings

    import numba

    cap = numba.config.NUMBA_NUM_THREADS
    if cfg.workers > cap:
        warnings.warn(f"data.workers={cfg.workers} exceeds the {cap} threads FFCV can run here (numba's "
                      f"NUMBA_NUM_THREADS); using {cap}", stacklevel=2)
    return max(1, min(cfg.workers, cap))


@functools.lru_cache(maxsize=None)
def _compiled_helpers():
    """(read_int64(address), crop_seed(seed, epoch, sample id)) as numba functions for the decoder."""
    import numba
    from numba import types
    from numba.extending import intrinsic

    from pipelines.keyed_random import mix

    @intrinsic
    def read_int64(typingctx, address):
        """The int64 stored at `address` (the loader's epoch cell, kept alive by the loader)."""
        def codegen(context, builder, signature, args):
            pointer = builder.inttoptr(args[0], context.get_value_type(types.int64).as_pointer())
            return builder.load(pointer)
        return types.int64(types.int64), codegen

    mix_c = numba.njit(mix)

    @numba.njit
    def crop_seed(seed, epoch, sample):
        h = mix_c(mix_c(mix_c(np.uint64(seed)) ^ np.uint64(epoch)) ^ np.uint64(sample))
        return np.int64(h >> np.uint64(33))  # 31 bits: np.random.seed takes an unsigned 32-bit value

    return read_int64, crop_seed


def make_decoder(sizes: list[int], scales: list[tuple[float, float]], seed: int, epoch_cell: np.ndarray,
                 decode_each_crop: bool = False):
    """A MultiCropDecoder operation instance (built lazily: FFCV is an optional dependency).
    epoch_cell: int64 [1] array holding the epoch being decoded (written by the loader before each
    epoch; it must outlive the decoder). decode_each_crop=True decodes the JPEG again for every crop:
    the cost of 8 separate decoders, kept only as the baseline of `python -m pipelines.bench --backend ffcv8`."""
    if epoch_cell.dtype != np.int64 or epoch_cell.shape != (1,) or not epoch_cell.flags.c_contiguous:
        raise ValueError("epoch_cell must be a contiguous int64 array of shape (1,)")
    from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder, get_random_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    class MultiCropDecoder(SimpleRGBImageDecoder):
        """RGBImageField -> uint8 [sum_c size_c^2 * 3] per sample: every crop of one decode, HWC each."""

        def __init__(self):
            super().__init__()
            self.sizes = np.array(sizes, dtype=np.int64)
            self.offsets = np.concatenate([[0], np.cumsum(self.sizes * self.sizes * 3)]).astype(np.int64)
            self.scales = np.array(scales, dtype=np.float64)  # [C, 2]
            self.seed = int(seed)
            self.epoch_cell = epoch_cell  # referenced here so it lives as long as the compiled code

        def declare_state_and_memory(self, previous_state):
            widths, heights = self.metadata["width"], self.metadata["height"]
            max_pixels = np.uint64(widths.max()) * np.uint64(heights.max()) * np.uint64(3)
            shape = (int(self.offsets[-1]),)
            dtype = np.dtype("<u1")
            return (replace(previous_state, jit_mode=True, shape=shape, dtype=dtype),
                    (AllocationQuery(shape, dtype), AllocationQuery((max_pixels,), dtype)))

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            get_crop_c = Compiler.compile(get_random_crop)
            sizes, offsets, scales, seed = self.sizes, self.offsets, self.scales, self.seed
            read_int64, crop_seed = _compiled_helpers()
            epoch_address = self.epoch_cell.ctypes.data
            redecode = decode_each_crop
            ratio = np.array([3.0 / 4.0, 4.0 / 3.0])
            num_crops = len(sizes)

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                epoch = read_int64(epoch_address)
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    np.random.seed(crop_seed(seed, epoch, source_ix))  # this thread's generator, keyed by the sample
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:  # decode once
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        image = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                    else:
                        image = image_data.reshape(height, width, 3)
                    out = destination[dst_ix]
                    for c in range(num_crops):  # ... crop many
                        if redecode and c > 0 and field["mode"] == jpg:
                            imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        i, j, h, w = get_crop_c(height, width, scales[c], ratio)
                        size = sizes[c]
                        view = out[offsets[c]:offsets[c + 1]].reshape(size, size, 3)
                        resize_crop_c(image, i, i + h, j, j + w, view)
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return MultiCropDecoder()


def make_order(sampler: StepSampler, ids: list[int] | None = None):
    """A TraversalOrder that yields this rank's samples of an epoch in StepSampler order (from start_step);
    ids maps sampler positions to record ids (a fine-tuning label subset)."""
    from ffcv.traversal_order.base import TraversalOrder

    class StepOrder(TraversalOrder):
        def __init__(self):  # FFCV calls order(loader); TraversalOrder.__init__ runs then
            self.start_step = 0

        def __call__(self, loader):
            TraversalOrder.__init__(self, loader)
            return self

        def sample_order(self, epoch: int):
            sampler.set_epoch(epoch, self.start_step)
            order = [index for keys in sampler for _, index in keys]
            return np.array([ids[i] for i in order] if ids is not None else order, dtype=np.uint64)

    return StepOrder()


def open_beton(path: str, key: str = "data.beton", cfg: DataConfig | None = None):
    """FFCV's Reader of a .beton, after checking the file's layout, so that a missing, empty, truncated
    or foreign file is one error naming the key and the file (FFCV itself asserts, or reads past the end
    of the file at the first batch). Layout (FFCV 1.0): a header (format version, field count, record
    count, position of the allocation table), the field descriptors, the per-record metadata, the
    records' data, and last the allocation table of (record, position, size) entries."""
    _import_ffcv()
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType

    fix = "write it again with python -m pipelines.convert --src <imagefolder> --out <file>.beton"
    if not path or not Path(path).is_file():
        raise ConfigError(f"{key}: '{path}' is not a file; {fix}")
    size = Path(path).stat().st_size

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{key}: '{path}' is not a usable .beton ({what}); {fix}")

    if size < HeaderType.itemsize:
        raise bad("an empty file" if size == 0 else f"{size} bytes, shorter than FFCV's header")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise bad(f"format version {int(header['version'])} where FFCV 1.0 writes {CURRENT_VERSION}: "
                  f"not a .beton, or from another FFCV version")
    records, fields, table = int(header["num_samples"]), int(header["num_fields"]), int(header["alloc_table_ptr"])
    if records == 0:
        raise bad("it holds no records")
    if not 0 < fields <= 256 or table == 0:
        raise bad(f"{fields} fields, allocation table at byte {table}: not a finished .beton (an interrupted write?)")
    if table < HeaderType.itemsize + fields * FieldDescType.itemsize or table >= size \
            or (size - table) % ALLOC_TABLE_TYPE.itemsize:
        raise bad(f"truncated: its allocation table starts at byte {table} of {size}")
    try:
        reader = Reader(path)
    except Exception as exc:  # unknown field types, unreadable descriptors
        raise bad(f"FFCV cannot read it: {type(exc).__name__}: {exc}") from None
    entries = reader.alloc_table
    if reader.metadata.shape[0] != records or (len(entries) and int((entries["ptr"] + entries["size"]).max()) > table):
        raise bad(f"truncated: it declares {records} records whose data run past its end")
    if cfg is not None:
        beton_fields(reader, path, key, cfg)
    return reader


def beton_fields(reader, path: str, key: str, cfg: DataConfig) -> None:
    """data.beton_image_field must be an RGB image field of the .beton and data.beton_label_field an
    integer field; one error naming the file and its fields otherwise."""
    from ffcv.fields import IntField, RGBImageField

    kinds = {name: type(handler).__name__ for name, handler in reader.handlers.items()}
    have = ", ".join(f"{name} ({kind})" for name, kind in kinds.items())
    for option, name, kind in (("data.beton_image_field", cfg.beton_image_field, RGBImageField),
                               ("data.beton_label_field", cfg.beton_label_field, IntField)):
        if not isinstance(reader.handlers.get(name), kind):
            candidates = [n for n, h in reader.handlers.items() if isinstance(h, kind)]
            hint = f"set {option}={candidates[0]}" if candidates else f"write the file with a {kind.__name__}"
            raise ConfigError(f"{key}: '{path}' has no {kind.__name__} named '{name}' ({option}); its fields: "
                              f"{have}; {hint}")


def beton_labels(reader, cfg: DataConfig) -> np.ndarray:
    """The label field's values in record order (from the file's metadata, no decoding)."""
    return np.asarray(reader.metadata[f"f{reader.field_names.index(cfg.beton_label_field)}"])


@functools.lru_cache(maxsize=None)
def _record_id_decoder_class():
    from ffcv.fields.basics import IntDecoder

    class RecordIdDecoder(IntDecoder):
        """Decodes nothing: writes each sample's record position (its id) -- FFCV hands every decoder the
        batch's record positions -- so a .beton needs no stored index field."""

        def generate_code(self):
            def decoder(indices, destination, metadata, storage_state):
                for ix, sample_id in enumerate(indices):
                    destination[ix] = sample_id
                return destination[:len(indices)]

            return decoder

    return RecordIdDecoder


def loader_pipelines(reader, cfg: DataConfig, image_ops: list) -> tuple[dict, list[str]]:
    """FFCV Loader pipelines that yield (image, label, record id) from any .beton with an image and a
    label field (other fields are not read), and the order of the names in FFCV's output tuples."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import ToTensor

    image, label = cfg.beton_image_field, cfg.beton_label_field
    pipelines = {name: None for name in reader.field_names}  # None: the field is not decoded
    pipelines[image] = image_ops
    pipelines[label] = [IntDecoder(), ToTensor()]
    pipelines["__record__"] = PipelineSpec(label, decoder=_record_id_decoder_class()(), transforms=[ToTensor()])
    order = [name for name in reader.field_names if pipelines[name] is not None] + ["__record__"]
    return pipelines, order


def _batches(loader, order: list[str], cfg: DataConfig):
    """(image, label, record id) of each batch of an FFCV loader built with loader_pipelines (FFCV's
    thread-count change at iter() undone)."""
    with keep_torch_threads():
        batches = iter(loader)
    for batch in batches:
        named = dict(zip(order, batch))
        yield named[cfg.beton_image_field], named[cfg.beton_label_field], named["__record__"]


class HostSlotCopy:
    """Copies FFCV's host batches to the device without racing FFCV's reuse of its host slots.

    FFCV's threads write each batch into one of a few host buffers and write the next batch into a buffer
    once the consumer has asked for it; a non-blocking copy from that buffer may still be queued behind
    the training step on the compute stream by then. Here the copy runs on a stream of its own (the compute
    stream waits for it on the device, no host sync), and `wait()` -- called before the next batch is
    requested -- waits on the host for that copy alone (an event of the copy stream, not the compute
    queue). On the CPU it is a plain copy."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.done = None

    def __call__(self, host) -> torch.Tensor:
        host = torch.as_tensor(host)
        if not self.cuda:
            return host.to(self.device)
        with torch.cuda.stream(self.stream):
            out = host.to(self.device, non_blocking=True)
        self.done = torch.cuda.Event()
        self.done.record(self.stream)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(self.done)
        out.record_stream(compute)  # the allocator keeps it until the compute stream is done with it
        return out

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()
            self.done = None

    def each(self, batches):
        """(records on the device, label, index) of FFCV's (records, label, index) batches; the next batch is
        requested from FFCV only once this one's copy has read its host slot."""
        for records, label, index in batches:
            yield self(records), label, index
            self.wait()


class FFCVMultiCropLoader:
    """Same interface as the other backends: len() = steps per epoch, .epoch(e, start_step), .num_samples."""

    def __init__(self, cfg: DataConfig, seed: int, rank: int, world: int, device: torch.device | None = None,
                 decode_each_crop: bool = False, augment: bool = True, augment_impl: str = "auto",
                 dtype: torch.dtype = torch.float32):
        """augment=False skips the tensor augmentations (crops only, un-normalised): loader benchmarks.
        augment_impl: pipelines.augment.augment_views' impl (auto: the fused Triton kernel on a GPU, the fused
        numba kernel on the CPU; torch: tensor ops everywhere). dtype: of the augmented crops (the model's
        input dtype: the autocast dtype on a GPU)."""
        _import_ffcv()
        self.decode_each_crop, self.augment, self.augment_impl = decode_each_crop, augment, augment_impl
        self.dtype = dtype
        self.cfg, self.seed, self.rank = cfg, seed, rank
        self.device = device or torch.device("cpu")
        self._reader = open_beton(cfg.beton, "data.beton", cfg)
        self.num_records = int(self._reader.num_samples)
        self.sampler = StepSampler(self.num_records, cfg.batch_size, rank, world, seed)
        self.local_batch = cfg.batch_size // world
        self.sizes = [cfg.global_size] * 2 + [cfg.local_size] * cfg.local_crops
        self._loader, self._scales = None, None
        self._epoch_cell = np.zeros(1, dtype=np.int64)  # read by the compiled decoder (make_decoder)
        self.workers = ffcv_workers(cfg)
        self.reads = ReadsInFlight()  # each wait for a batch of FFCV's threads (data.read_timeout)
        self._fresh = True  # the next batch is the first of a newly built FFCV loader (it compiles its pipeline)

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def num_samples(self) -> int:
        return self.num_records

    def _ffcv_loader(self, epoch: int):
        from ffcv.loader import Loader

        global_recipe, local_recipe = crop_recipes(self.cfg, epoch)
        scales = [global_recipe.scale] * 2 + [local_recipe.scale] * self.cfg.local_crops
        if self._loader is None or scales != self._scales:  # phase switch: rebuild (one compilation)
            self._order = make_order(self.sampler)
            decoder = make_decoder(self.sizes, scales, self.seed, self._epoch_cell, self.decode_each_crop)
            pipelines, self._fields = loader_pipelines(self._reader, self.cfg, [decoder])
            with keep_torch_threads():
                self._loader = Loader(self.cfg.beton, batch_size=self.local_batch, num_workers=self.workers,
                                      order=self._order, drop_last=True, os_cache=self.cfg.os_cache,
                                      pipelines=pipelines, batches_ahead=2)
            self._scales = scales
            self._fresh = True
        return self._loader

    def epoch(self, epoch: int, start_step: int = 0):
        from pipelines.augment import augment_views, keyed_params

        loader = self._ffcv_loader(epoch)
        self._order.start_step = start_step
        loader.next_epoch = epoch
        self._epoch_cell[0] = epoch  # before FFCV starts decoding this epoch's batches
        global_recipe, local_recipe = crop_recipes(self.cfg, epoch)
        b = self.local_batch
        batches = self._timed(_batches(loader, self._fields, self.cfg), epoch, start_step)
        for records, label, index in HostSlotCopy(self.device).each(batches):
            # records: [b, T] uint8 on the device
            views, offset = [], 0
            for size in self.sizes:
                span = size * size * 3
                views.append(records[:, offset:offset + span].view(b, size, size, 3))
                offset += span
            if not self.augment:
                crops = [torch.cat(views[:2]).permute(0, 3, 1, 2)] + ([torch.cat(views[2:]).permute(0, 3, 1, 2)]
                                                                       if self.cfg.local_crops else [None])
                yield MultiCropBatch(crops[0], crops[1], torch.as_tensor(index).view(-1).long(),
                                     torch.as_tensor(label).view(-1).long(), 0)
                continue
            ids = np.asarray(index).reshape(-1)
            kw = dict(impl=self.augment_impl, threads=self.workers)
            if self.dtype != torch.float32:
                kw["dtype"] = self.dtype
            globals_ = augment_views(views[:2], global_recipe, self.cfg.mean, self.cfg.std,
                                     params=keyed_params(self.seed, epoch, ids, range(2), global_recipe), **kw)
            locals_ = (augment_views(views[2:], local_recipe, self.cfg.mean, self.cfg.std,
                                     params=keyed_params(self.seed, epoch, ids, range(2, len(self.sizes)), local_recipe),
                                     **kw) if self.cfg.local_crops else None)
            yield MultiCropBatch(globals_, locals_, torch.as_tensor(index).view(-1).long(),
                                 torch.as_tensor(label).view(-1).long(), 0)


    def _timed(self, batches, epoch: int, start_step: int):
        """FFCV's batches, each wait for one a read in flight (pipelines.images.ReadsInFlight): FFCV's threads read
        the .beton through a memory map, where a hung mount blocks a page fault in a thread that names nothing,
        so what the watchdog names after data.read_timeout is the .beton and the records of the batch awaited.
        The first batch of a newly built loader also waits for numba's compilation of FFCV's pipeline: it gets
        COMPILE_GRACE_S more."""
        batches, step = iter(batches), start_step
        perm = self.sampler.permutation(epoch)
        local = self.local_batch
        while True:
            start = step * self.cfg.batch_size + self.rank * local
            ids = perm[start:start + local].tolist()
            shown = ", ".join(map(str, ids[:4])) + (f", ... ({len(ids)} records)" if len(ids) > 4 else "")
            grace, self._fresh = (COMPILE_GRACE_S if self._fresh else 0.0), False
            with self.reads.reading(self.cfg.beton, f"records {shown} of step {step} of epoch {epoch}", grace):
                batch = next(batches, None)
            if batch is None:
                return
            yield batch
            step += 1


def _normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [b, H, W, 3] -> normalised float [b, 3, H, W], channels-last."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


def beton_classes(beton: str) -> list[str] | None:
    side = Path(beton + ".json")
    if side.is_file():
        import json

        return json.loads(side.read_text())["classes"]
    return None


def center_crop_box(height, width, _scale, ratio):
    """The central square of side ratio * (short side), at least 1 px (FFCV's own center crop rounds a
    1 x 1 image's side down to 0 and OpenCV then aborts the process). Compiled by FFCV's pipeline compiler."""
    side = max(1, int(ratio * min(height, width)))
    return (height - side) // 2, (width - side) // 2, side, side


@functools.lru_cache(maxsize=None)
def _center_crop_decoder_class():
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder

    class CenterCropDecoder(CenterCropRGBImageDecoder):
        """FFCV's center-crop decoder (crop, then resize to the output size) with center_crop_box."""

        @property
        def get_crop_generator(self):
            return center_crop_box

    return CenterCropDecoder


class FFCVEvalLoader:
    """Evaluation transform over a .beton, this rank's contiguous unpadded shard in record order: the
    central square of side eval_crop / eval_resize of the short side (FFCV's CenterCropRGBImageDecoder:
    crop, then resize to eval_crop; the reference resizes first, then crops the same region), normalised."""

    def __init__(self, cfg: DataConfig, beton: str, batch_size: int, rank: int, world: int,
                 device: torch.device | None = None, key: str = "data.val_beton"):
        _import_ffcv()
        from ffcv.loader import Loader, OrderOption

        from pipelines.sampling import shard_range

        self.cfg, self.device = cfg, device or torch.device("cpu")
        reader = open_beton(beton, key, cfg)  # header + metadata once: count and labels
        self.count = int(reader.num_samples)
        shard = list(shard_range(self.count, rank, world))
        self.batches = (len(shard) + batch_size - 1) // batch_size
        crop = (cfg.eval_crop, cfg.eval_crop)
        pipelines, self._fields = loader_pipelines(
            reader, cfg, [_center_crop_decoder_class()(crop, ratio=cfg.eval_crop / cfg.eval_resize)])
        with keep_torch_threads():
            self.loader = Loader(beton, batch_size=batch_size, num_workers=ffcv_workers(cfg), order=OrderOption.SEQUENTIAL,
                                 indices=shard, drop_last=False, os_cache=cfg.os_cache, pipelines=pipelines)
        labels = beton_labels(reader, cfg)
        self.classes = beton_classes(beton) or [str(c) for c in range(int(labels.max()) + 1)]

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        for images, label, index in HostSlotCopy(self.device).each(_batches(self.loader, self._fields, self.cfg)):
            yield MultiCropBatch(_normalise(images, self.cfg.mean, self.cfg.std), None,
                                 torch.as_tensor(index).view(-1).long(), torch.as_tensor(label).view(-1).long(), 0)


class FFCVLinearLoader:
    """The linear-probe / fine-tuning training view over a .beton: RandomResizedCrop (0.08, 1) + flip,
    StepSampler order. The crop is cut by the multi-crop decoder with one crop slot, its box seeded and
    its flip drawn from keys of (seed stream 7, epoch, sample id): like the DALI and reference views,
    a sample's view depends on (seed, epoch, index) only (FFCV's stock RandomResizedCrop decoder draws
    from an unseeded per-thread generator, so its crops would differ on every run)."""

    STREAM = PROBE_STREAM  # decorrelates the probe's draws from pre-training's (as the reference's generator)

    def __init__(self, cfg: DataConfig, seed: int, rank: int, world: int, batch_size: int,
                 subset: list[int] | None = None, device: torch.device | None = None):
        _import_ffcv()
        from ffcv.loader import Loader

        from pipelines.keyed_random import keys

        self.cfg, self.seed, self.rank = cfg, seed, rank
        self.stream_seed = int(keys(seed, self.STREAM).view(np.int64)[0])
        self.device = device or torch.device("cpu")
        reader = open_beton(cfg.beton, "data.beton", cfg)
        count = len(subset) if subset is not None else int(reader.num_samples)
        self.sampler = StepSampler(count, batch_size, rank, world, seed)
        self._order = make_order(self.sampler, subset)
        self._epoch_cell = np.zeros(1, dtype=np.int64)
        self.size = cfg.global_size
        decoder = make_decoder([self.size], [(0.08, 1.0)], self.stream_seed, self._epoch_cell)
        pipelines, self._fields = loader_pipelines(reader, cfg, [decoder])
        with keep_torch_threads():
            self.loader = Loader(cfg.beton, batch_size=batch_size // world, num_workers=ffcv_workers(cfg), order=self._order,
                                 drop_last=True, os_cache=cfg.os_cache, pipelines=pipelines)

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0):
        from pipelines.keyed_random import keys, uniforms

        self._order.start_step = start_step
        self.loader.next_epoch = epoch
        self._epoch_cell[0] = epoch
        for records, label, index in HostSlotCopy(self.device).each(_batches(self.loader, self._fields, self.cfg)):
            b = records.shape[0]
            images = records.view(b, self.size, self.size, 3)
            ids = np.asarray(index).reshape(-1)
            flip = torch.from_numpy(uniforms(keys(self.stream_seed, epoch, ids), 1)[:, 0] < 0.5)
            flip = flip.to(images.device).view(-1, 1, 1, 1)
            x = _normalise(images, self.cfg.mean, self.cfg.std)
            yield MultiCropBatch(torch.where(flip, x.flip(3), x).contiguous(memory_format=torch.channels_last), None,
                                 torch.as_tensor(index).view(-1).long(), torch.as_tensor(label).view(-1).long(), 0)


def beton_samples(beton: str, cfg: DataConfig | None = None, need_paths: bool = False
                  ) -> tuple[list[tuple[str, int]], list[str], str]:
    """(samples [(source path, label)] in record order, class names, source folder) of a .beton: paths and
    class names from its sidecar JSON (written by pipelines.convert); a file without one (another tool's)
    gets 'record <i>' names and class names '0', '1', ... unless need_paths asks for the real paths."""
    import json

    cfg = cfg or DataConfig()
    reader = open_beton(beton, "data.beton", cfg)
    labels = beton_labels(reader, cfg).tolist()
    side = Path(beton + ".json")
    if not side.is_file():
        if need_paths:
            raise ConfigError(f"data.beton: '{beton}' has no sidecar '{side}' mapping records to image paths, which "
                              f"finetune.subset_file needs; use finetune.label_fraction, or write the file with "
                              f"python -m pipelines.convert")
        return ([(f"record {i}", int(l)) for i, l in enumerate(labels)], [str(c) for c in range(max(labels) + 1)], "")
    info = json.loads(side.read_text())
    return [(str(Path(info["source"]) / p), int(l)) for p, l in zip(info["paths"], labels)], info["classes"], info["source"]
