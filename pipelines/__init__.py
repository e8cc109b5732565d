"""Loader backends behind one entry point, all producing `MultiCropBatch` (docs/design.md)."""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

import torch

from pipelines.batch import MultiCropBatch, current_device, current_device_id
from wcl_fast.config import Config, ConfigError

__all__ = ["LoaderChoice", "MultiCropBatch", "build_eval_loader", "build_loader", "build_train_eval_loader",
           "build_probe_loader", "choose_backend", "resolve_backend"]

DALI_INSTALL = "pip install nvidia-dali-cuda130 (CUDA 13; nvidia-dali-cuda120 for CUDA 12)"


@dataclass(frozen=True)
class LoaderChoice:
    """What `data.backend` resolved to, and why (printed by rank 0, saved in config.yaml and log.jsonl)."""

    requested: str  # the configured value: auto, reference, dali, ffcv or synthetic
    backend: str  # the loader that runs
    reason: str
    warning: str = ""  # auto fell back to the slow reference loader: why, and how to get a fast one

    def describe(self) -> str:
        return f"loader: {self.backend} ({self.reason})"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def choose_backend(data_cfg, cuda_available: bool | None = None, dali_available: bool | None = None) -> LoaderChoice:
    """Resolve `data.backend`. An explicit backend is kept. `auto` picks, in this order:
    ffcv when data.beton is set (the user converted the data for it); the shard loader when data.shards is set;
    the reference loader for the small
    datasets' own layouts (data.dataset other than imagefolder); DALI when CUDA and DALI are both
    available (nvJPEG decoding with device="mixed", augmentations in the DALI graph on the GPU);
    otherwise the reference PIL loader, with a warning saying why and how to get a fast loader."""
    requested = data_cfg.backend
    if requested != "auto":
        return LoaderChoice(requested, requested, "data.backend set explicitly")
    if data_cfg.beton:
        return LoaderChoice("auto", "ffcv", f"auto: data.beton is set ({data_cfg.beton})")
    if data_cfg.shards:
        decoder = shard_decoder(data_cfg, cuda_available, dali_available)
        return LoaderChoice("auto", "shards", f"auto: data.shards is set (WebDataset shards, streamed, decoded by "
                                              f"{'DALI' if decoder == 'dali' else 'PIL'}: data.shard_decoder; docs/data.md)")
    if data_cfg.dataset != "imagefolder":  # the small datasets' own layouts (pipelines/datasets.py)
        return LoaderChoice("auto", "reference", f"auto: data.dataset={data_cfg.dataset} is read from its own files")
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    dali = _importable("nvidia.dali") if dali_available is None else dali_available
    if cuda and dali:
        return LoaderChoice("auto", "dali", "auto: CUDA and DALI are available; nvJPEG decoding on the GPU "
                                            "(device=mixed), augmentations in the DALI graph on the GPU")
    ffcv_how = "data.beton=FILE for FFCV (write it once with python -m pipelines.convert)"
    if not cuda:
        why = "no CUDA GPU" + ("" if dali else ", DALI not installed")
        how = (f"on a GPU machine with DALI auto picks DALI; on this CPU use data.backend=dali (DALI's CPU decoder + "
               f"the fused CPU augmentation{'' if dali else '; ' + DALI_INSTALL}) or {ffcv_how}")
    else:
        why = "DALI not installed"
        how = f"{DALI_INSTALL}, or {ffcv_how}"
    reason = f"auto: {why}"
    warning = (f"warning: data.backend=auto chose the reference PIL loader ({why}); it is several times slower than "
               f"DALI or FFCV and cannot feed a GPU at full speed. For a fast loader: {how}")
    return LoaderChoice("auto", "reference", reason, warning)


def shard_decoder(data_cfg, cuda_available: bool | None = None, dali_available: bool | None = None) -> str:
    """data.shard_decoder resolved: 'dali' or 'pil' (auto: DALI where CUDA and DALI are both available)."""
    if data_cfg.shard_decoder != "auto":
        if data_cfg.shard_decoder == "dali" and not _importable("nvidia.dali"):
            raise ConfigError(f"data.shard_decoder=dali needs DALI: {DALI_INSTALL}; or data.shard_decoder=pil")
        return data_cfg.shard_decoder
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    dali = _importable("nvidia.dali") if dali_available is None else dali_available
    return "dali" if cuda and dali else "pil"


def resolve_backend(cfg: Config, report: bool = False) -> LoaderChoice:
    """Choose the loader for `cfg.data.backend` (see choose_backend) and write it into cfg in place, so
    every later step (and the saved config.yaml) sees the concrete backend. report: rank 0 (RANK unset
    or 0) prints the choice, and the warning when auto fell back to the reference loader, to stderr."""
    choice = choose_backend(cfg.data)
    cfg.data.backend = choice.backend
    if report and os.environ.get("RANK", "0") == "0":
        print(choice.describe(), file=sys.stderr)
        if choice.warning:
            print(choice.warning, file=sys.stderr)
    return choice


def build_loader(cfg: Config, split: str, rank: int, world: int):
    """Training loader (split='train'): object with len() = steps per epoch and `.epoch(e, start_step)`
    returning an iterator of MultiCropBatch for this rank.
    """
    if split != "train":
        raise ValueError(f"build_loader: unknown split {split!r}; evaluation uses pipelines.reference.build_eval_loader")
    if cfg.data.backend == "auto":
        resolve_backend(cfg)
    pin = torch.cuda.is_available()
    # on a GPU the fast loaders write the crops in the model's input dtype (autocast's): half the bytes, and
    # the same values the first convolution's autocast cast would give (round to nearest even)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32) if pin else torch.float32
    if cfg.data.backend == "reference":
        from pipelines.pil import build_train_loader

        return build_train_loader(cfg.data, cfg.train.seed, rank, world, pin)
    if cfg.data.backend == "shards":
        if shard_decoder(cfg.data) == "dali":
            from pipelines.dali_shards import DaliShardLoader

            return DaliShardLoader(cfg.data, cfg.train.seed, rank, world, current_device_id(), dtype=dtype)
        from pipelines.shards import build_shard_loader

        return build_shard_loader(cfg.data, cfg.train.seed, rank, world, pin)
    if cfg.data.backend == "synthetic":
        from pipelines.synthetic import build_synthetic_loader

        return build_synthetic_loader(cfg.data, cfg.train.seed, rank, world)
    if cfg.data.backend == "dali":
        from pipelines.dali import build_dali_loader

        return build_dali_loader(cfg.data, cfg.train.seed, rank, world, dtype)
    if cfg.data.backend == "ffcv":
        from pipelines.ffcv import FFCVMultiCropLoader

        device = current_device()
        return FFCVMultiCropLoader(cfg.data, cfg.train.seed, rank, world, device, dtype=dtype)
    raise ConfigError(f"data.backend: {cfg.data.backend!r} is not available; use reference, synthetic, dali, ffcv or shards")


def build_train_eval_loader(cfg: Config, batch_size: int, rank: int, world: int):
    """The training samples under the evaluation transform, this rank's contiguous unpadded shard in
    sample-id order (batch.index): used to embed the whole training set (Cl-InfoNCE K-means).
    Returns (loader, number of samples)."""
    pin = torch.cuda.is_available()
    if cfg.data.backend == "auto":
        resolve_backend(cfg)
    if cfg.data.backend in ("reference", "dali", "ffcv", "shards"):  # ffcv: data.beton in record (= sample id) order
        loader, count, _ = build_eval_loader(cfg.data, cfg.data.train_dir, "data.train_dir", batch_size, rank, world, pin,
                                             pretraining=True)  # the samples (and ids) training batches use
        return loader, count
    if cfg.data.backend == "synthetic":
        from torch.utils.data import DataLoader, Subset

        from pipelines.sampling import ignore_stop_signals, shard_range
        from pipelines.batch import collate_eval
        from pipelines.synthetic import SyntheticEvalDataset

        dataset = SyntheticEvalDataset(cfg.data, cfg.train.seed)
        shard = Subset(dataset, list(shard_range(len(dataset), rank, world)))
        return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=cfg.data.workers,
                          collate_fn=collate_eval, worker_init_fn=ignore_stop_signals), len(dataset)
    raise ConfigError(f"data.backend: {cfg.data.backend!r} has no evaluation view of the training set")


def build_eval_loader(data_cfg, directory: str, key: str, batch_size: int, rank: int, world: int, pin_memory: bool = False,
                      pretraining: bool = False):
    """Evaluation transform (Resize + CenterCrop) over this rank's unpadded shard of an ImageFolder with
    the configured backend (dali: pipelines.dali; otherwise the reference loader).
    Returns (loader, total samples, number of classes)."""
    if data_cfg.backend == "auto":
        from dataclasses import replace

        data_cfg = replace(data_cfg, backend=choose_backend(data_cfg).backend)
    if data_cfg.backend == "dali":
        from pipelines.dali import build_dali_eval_loader

        return build_dali_eval_loader(data_cfg, directory, key, batch_size, rank, world)
    shards = {"data.val_dir": data_cfg.val_shards, "data.train_dir": data_cfg.shards}.get(key, "")
    if data_cfg.backend == "shards" and shards:  # else (data.val_shards unset): the ImageFolder data.val_dir
        from pipelines.shards import build_shard_eval_loader

        return build_shard_eval_loader(data_cfg, shards, "data.val_shards" if key == "data.val_dir" else "data.shards",
                                       batch_size, rank, world)
    beton = {"data.val_dir": data_cfg.val_beton, "data.train_dir": data_cfg.beton}.get(key, "")
    if data_cfg.backend == "ffcv" and beton:  # else: the ImageFolder with the reference transform
        from pipelines.ffcv import FFCVEvalLoader

        device = current_device()
        beton_key = "data.val_beton" if key == "data.val_dir" else "data.beton"
        loader = FFCVEvalLoader(data_cfg, beton, batch_size, rank, world, device, beton_key)
        return loader, loader.count, len(loader.classes)
    from pipelines.pil import build_eval_loader as reference_eval_loader

    return reference_eval_loader(data_cfg, directory, key, batch_size, rank, world, pin_memory, pretraining)


class SubsetByKey(torch.utils.data.Dataset):
    """Maps sampler keys (epoch, position) onto (epoch, subset[position]) of the wrapped dataset."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        epoch, position = key
        return self.dataset[(epoch, self.indices[position])]


def build_probe_loader(data_cfg, seed: int, rank: int, world: int, batch_size: int, device: torch.device,
                       subset: list[int] | None = None):
    """The training loader of the linear probe and of fine-tuning on any backend: the probe view
    (pipelines.reference.probe_crop_params: RandomResizedCrop (0.08, 1) + flip) of the training images,
    or of the sample ids in `subset` (fine-tuning's labelled images). The loader has `.sampler` and
    `.epoch(e)` like the pre-training loaders."""
    if data_cfg.backend == "ffcv":  # RandomResizedCrop in FFCV's decoder, flip on the device
        from pipelines.ffcv import FFCVLinearLoader

        return FFCVLinearLoader(data_cfg, seed, rank, world, batch_size, subset=subset, device=device)
    if data_cfg.backend == "dali":  # the same crop choices, decoded and cut in DALI
        from pipelines.dali import DaliMultiCropLoader

        return DaliMultiCropLoader(data_cfg, seed, rank, world, device.index if device.type == "cuda" else None,
                                   linear=True, subset=subset, batch_size=batch_size)
    from pipelines.batch import collate_eval
    from pipelines.datasets import load_split
    from pipelines.images import ImageSource
    from pipelines.pil import LinearTrainDataset
    from pipelines.sampling import MultiCropLoader, StepSampler

    samples, _, decode = load_split(data_cfg, data_cfg.train_dir, "data.train_dir")
    dataset = LinearTrainDataset(ImageSource(samples, decode), data_cfg, seed)
    if subset is not None:
        dataset = SubsetByKey(dataset, subset)
    sampler = StepSampler(len(dataset), batch_size, rank, world, seed)
    return MultiCropLoader(dataset, sampler, data_cfg.workers, device.type == "cuda", collate=collate_eval)
