"""Typed experiment configuration: dataclasses + YAML + `key=value` overrides.

Every key is declared here with its type and default. Loading is strict: an unknown key, a value of
the wrong type or an invalid choice raises `ConfigError` with one line naming the key and what to do.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A user-facing configuration error; its message is one line: what, where, what to do."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: `1e-5`, `5E-1` and `1.0e6` are numbers.

    PyYAML resolves scalars by the YAML 1.1 rules, whose float pattern needs a dot and a signed
    exponent (`1.0e-5`); `1e-5` then loads as the string '1e-5'. This resolver adds the YAML 1.2
    core-schema float pattern (exponent without a dot, sign optional)."""


_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
                       r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_Loader.yaml_implicit_resolvers = {key: [(tag, rx) for tag, rx in value if tag != "tag:yaml.org,2002:float"]
                                   for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


class DuplicateKey(ValueError):
    """A mapping of a YAML document names the same key twice: (key, first line, second line), 1-based."""

    def __init__(self, key, first: int, second: int):
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second


def _construct_mapping(loader, node, deep=False):
    """PyYAML keeps the last of two equal keys silently (a second `train:` section replaces the first
    whole); here they are an error naming the key and both lines."""
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # PyYAML reports unhashable keys itself
        line = key_node.start_mark.line + 1
        if key in seen:
            raise DuplicateKey(key, seen[key], line)
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str):
    """yaml.safe_load with YAML 1.2 floats and no duplicate keys (see _Loader, DuplicateKey)."""
    return yaml.load(text, Loader=_Loader)


@dataclass
class DataConfig:
    # auto: ffcv when data.beton is set, else DALI (nvJPEG + GPU augmentations) when CUDA and DALI are
    # available, else reference with a warning (pipelines.choose_backend). dali / ffcv: pipelines/dali.py,
    # pipelines/ffcv.py; reference: the PIL worker loader; synthetic: decode-free crops for tests.
    backend: Literal["auto", "reference", "synthetic", "dali", "ffcv", "shards"] = "auto"
    # imagefolder: train_dir / val_dir hold one sub-folder per class. cifar10 / cifar100 / stl10: both name the
    # folder holding the extracted python / binary archive; tinyimagenet: tiny-imagenet-200/train and /val
    # (pipelines/datasets.py). The small datasets are read by the reference loader.
    dataset: Literal["imagefolder", "cifar10", "cifar100", "stl10", "tinyimagenet"] = "imagefolder"
    stl10_unlabeled: bool = True  # dataset stl10: pre-train on train + the 100,000 unlabeled images
    train_dir: str = ""  # ImageFolder: one sub-folder per class
    beton: str = ""  # backend ffcv: the training .beton (python -m pipelines.convert)
    # WebDataset tar shards (backend shards; auto picks it when this is set; docs/data.md): a brace pattern
    # (/data/train-{000000..001281}.tar), a list of files / patterns, or a manifest .json (python -m pipelines.convert
    # --format wds writes one); local paths or fsspec URLs (https://, s3://, gs://). val_shards: the evaluation split.
    shards: Union[str, list[str]] = ""
    val_shards: Union[str, list[str]] = ""
    shard_label_key: str = "cls"  # the label member: cls (a decimal class id) or json:label (a field of a .json member)
    # logical streams of the shard order: fixed for a run (it defines the order); world sizes must divide it and
    # data.batch_size be a multiple of it. Each global batch takes batch_size / shard_streams samples from every stream
    shard_streams: int = 64
    shard_read_ahead: int = 2  # shards per process fetched ahead of those in use (memory: about this many shards more)
    shard_read_threads: int = 4  # threads per process fetching shards
    shard_retries: int = 3  # retries of a failed shard read (transient errors), waiting shard_backoff x 1, 2, 4, ... s
    shard_backoff: float = 0.5
    # who decodes the shards' images: dali (the DALI graph of backend dali: nvJPEG on a GPU, DALI's CPU decoder
    # without one), pil (the reference loader's workers), auto (dali where CUDA and DALI are both available)
    shard_decoder: Literal["auto", "pil", "dali"] = "auto"
    val_beton: str = ""  # backend ffcv: the validation .beton for evaluation ("" = read data.val_dir)
    # backend ffcv: the names of the RGB image field and the integer label field in the .beton files (any
    # writer's; ffcv-imagenet's and pipelines.convert's are image / label); the sample id is the record position
    beton_image_field: str = "image"
    beton_label_field: str = "label"
    # backend dali: the DALI graph decodes and cuts the crops (nvJPEG on a GPU); the colour/blur/flip
    # augmentations then run in the fused kernel of pipelines.augment.augment_views: auto = the Triton kernel
    # on a GPU, the numba kernel on the CPU; host = the numba kernel on the host in any case. graph: an older
    # name, now the same as auto (docs/loaders.md).
    dali_augment: Literal["auto", "graph", "host"] = "auto"
    os_cache: bool = True  # backend ffcv: read through the OS page cache (False: FFCV's own process cache)
    val_dir: str = ""  # ImageFolder used as the kNN / evaluation test split
    # a flat validation folder (ILSVRC2012_val_*.JPEG) takes its labels from LOC_val_solution.csv or the devkit's
    # ILSVRC2012_validation_ground_truth.txt (that one with val_synsets: the devkit's data/meta.mat)
    val_labels: str = ""
    val_synsets: str = ""
    batch_size: int = 4096  # global batch (all ranks together)
    workers: int = 8  # loader worker processes per rank
    global_size: int = 224
    local_crops: int = 0  # 0: the 2 x global recipe; 6: the 2 x 224 + 6 x 96 multi-crop recipe
    local_size: int = 96
    # None: MoCo-v2 phase (0.2, 1) before aug_switch_epoch, SimCLR phase (0.08, 1) after;
    # (0.14, 1) in both phases when local_crops > 0 (docs/wcl.md §4).
    global_scale: Optional[list[float]] = None
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.14])
    aug_switch_epoch: int = 10  # epochs < this use MoCo-v2 augmentations, >= this SimCLR ones
    flip_p: float = 0.5  # horizontal-flip probability of every crop (0 for data such as digits)
    # Gaussian-blur probability of every crop (sigma ~ U[0.1, 2]; docs/wcl.md §4); SimCLR's CIFAR-10 recipe
    # uses 0 (Chen et al. 2020, appendix B.9)
    blur_p: float = 0.5
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    eval_resize: int = 256  # kNN / evaluation transform: Resize(eval_resize) + CenterCrop(eval_crop)
    eval_crop: int = 224
    # backend dali: an image with more pixels than this is downscaled on the host (JPEG: DCT-scaled decode)
    # to fit, before DALI decodes it, so DALI holds at most 3 x this many bytes per decoded image; each
    # such image is named in a warning. 0 = no cap.
    max_decode_pixels: int = 36_000_000
    # seconds a read of one file (FFCV: of one batch) may take before the run stops with one line naming the
    # files in flight and exit code 6 (a hung network mount, a FIFO in place of an image; docs/running.md). 0 = never.
    read_timeout: float = 300.0
    synthetic_size: int = 512  # number of samples of the synthetic backend
    synthetic_classes: int = 10


@dataclass
class ModelConfig:
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet50"
    stem: Literal["imagenet", "small"] = "imagenet"  # small: 3x3 stride-1 conv, no max-pool
    # stage widths of the ResNet (4 numbers; the encoder's output is widths[3] x the block expansion);
    # [] = torchvision's 64-128-256-512. E.g. [16, 32, 64, 128]: a narrow ResNet-18 for small images on a CPU.
    widths: list[int] = field(default_factory=list)
    head_hidden: int = 4096
    head_out: int = 256
    # per_resolution: one forward for both global views (BN statistics over 2B);
    # per_view: one forward per view as in the reference code (BN statistics per view).
    forward: Literal["per_resolution", "per_view"] = "per_resolution"
    sync_bn: bool = True  # BatchNorm over the global batch when distributed (wcl_fast/syncbn.py; CPU and CUDA)
    channels_last: bool = True
    # torch.compile of the encoder (nn.Module.compile: state-dict keys unchanged); '' = eager
    compile: Literal["", "default", "reduce-overhead", "max-autotune"] = ""
    # activation checkpointing of encoder segments (recomputed in the backward pass, exact: the same
    # losses, gradients and BatchNorm statistics; docs/memory.md §2).
    # none | auto (the trainer picks a plan) | a spec: parts separated by ';', each [global:|local:]items
    # (no prefix: both resolutions), items comma-separated: stem, layerN (each block of stage N),
    # layerN.K (block K of stage N), all (stem + every block). E.g. "layer1,layer2" or
    # "global:all;local:stem,layer1.0". See parse_checkpointing.
    activation_checkpointing: str = "none"


# Blocks of each ResNet stage (He et al. 2016, Table 1); model.widths changes widths, never these counts.
BLOCKS_PER_STAGE = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}
_CHECKPOINTING_KEY = "config key 'model.activation_checkpointing'"
_RESOLUTIONS = ("global", "local")
_WHITESPACE = re.compile(r"\s+")
_LAYER_ITEM = re.compile(r"layer([0-9]+)(?:\.([0-9]+))?")


def checkpoint_segments(arch: str) -> list[str]:
    """The checkpointable segments of the encoder in forward order: 'stem' (conv1 + bn1 + relu +
    maxpool), then 'layerN.K' for every block K of every stage N."""
    return ["stem"] + [f"layer{n}.{k}" for n, blocks in enumerate(BLOCKS_PER_STAGE[arch], 1) for k in range(blocks)]


def _checkpointing_forms(arch: str) -> str:
    blocks = ", ".join(map(str, BLOCKS_PER_STAGE[arch]))
    return (f"use stem, layer1..layer4, layerN.K (K < blocks of stage N; {arch}: {blocks}) or all, comma-separated, "
            f"optionally after global: or local:, parts separated by ; (or the whole value none / auto)")


def _checkpointing_item(item: str, arch: str, text: str) -> list[str]:
    if item == "all":
        return checkpoint_segments(arch)
    if item == "stem":
        return ["stem"]
    blocks = BLOCKS_PER_STAGE[arch]
    match = _LAYER_ITEM.fullmatch(item)
    if match is None or not 1 <= int(match.group(1)) <= len(blocks):
        what = "an empty item" if not item else f"{item} is not a segment of {arch}"
        raise ConfigError(f"{_CHECKPOINTING_KEY}: {what} in {text!r}; {_checkpointing_forms(arch)}")
    stage = int(match.group(1))
    if match.group(2) is None:
        return [f"layer{stage}.{k}" for k in range(blocks[stage - 1])]
    block = int(match.group(2))
    if block >= blocks[stage - 1]:
        raise ConfigError(f"{_CHECKPOINTING_KEY}: {item} is not a segment of {arch} (layer{stage} has blocks "
                          f"0..{blocks[stage - 1] - 1}) in {text!r}; {_checkpointing_forms(arch)}")
    return [f"layer{stage}.{block}"]


def parse_checkpointing(text: str, arch: str) -> dict[str, frozenset[str]]:
    """Parse a model.activation_checkpointing spec into {'global': segments, 'local': segments}, the
    names of checkpoint_segments(arch) whose activations are recomputed in the backward pass of that
    resolution's forward. 'none' -> both empty. 'auto' is the trainer's to resolve: ValueError here.
    A malformed spec raises ConfigError (one line naming the key, the bad item and the valid forms)."""
    compact = _WHITESPACE.sub("", text)
    if compact == "auto":
        raise ValueError("model.activation_checkpointing=auto is resolved by the trainer into a plan; "
                         "parse_checkpointing takes none or a spec")
    if not compact:
        raise ConfigError(f"{_CHECKPOINTING_KEY} is empty; set none (no checkpointing), auto or a spec: "
                          f"{_checkpointing_forms(arch)}")
    plan: dict[str, set[str]] = {resolution: set() for resolution in _RESOLUTIONS}
    if compact == "none":
        return {resolution: frozenset() for resolution in _RESOLUTIONS}
    for part in compact.split(";"):
        prefix, sep, items = part.rpartition(":")
        if sep and prefix not in _RESOLUTIONS:
            raise ConfigError(f"{_CHECKPOINTING_KEY}: bad prefix {prefix + sep!r} in {text!r}; use global:, local: or "
                              f"no prefix (both resolutions), e.g. global:layer1;local:stem")
        segments = [name for item in items.split(",") for name in _checkpointing_item(item, arch, text)]
        for resolution in ([prefix] if sep else _RESOLUTIONS):
            plan[resolution].update(segments)
    return {resolution: frozenset(segments) for resolution, segments in plan.items()}


def _format_segments(segments: frozenset[str], arch: str) -> str:
    if set(segments) == set(checkpoint_segments(arch)):
        return "all"
    items = ["stem"] if "stem" in segments else []
    for stage, blocks in enumerate(BLOCKS_PER_STAGE[arch], 1):
        names = [f"layer{stage}.{k}" for k in range(blocks)]
        if all(name in segments for name in names):
            items.append(f"layer{stage}")
        else:
            items.extend(name for name in names if name in segments)
    return ",".join(items)


def format_checkpointing(plan: dict, arch: str) -> str:
    """The canonical text of a parsed plan (parse_checkpointing(format_checkpointing(p), arch) == p):
    'none' when nothing is checkpointed; 'all' for every segment, 'layerN' for a whole stage; the same
    segments at both resolutions written once without a prefix, else 'global:...;local:...' (an empty
    resolution left out). A missing resolution key counts as empty; an unknown key or segment is a ValueError."""
    valid = set(checkpoint_segments(arch))
    unknown = set(plan) - set(_RESOLUTIONS)
    if unknown:
        raise ValueError(f"checkpointing plan keys must be global / local, got {sorted(unknown)}")
    sets = {resolution: frozenset(plan.get(resolution, ())) for resolution in _RESOLUTIONS}
    for segments in sets.values():
        if not segments <= valid:
            raise ValueError(f"{sorted(segments - valid)} are not segments of {arch}: {checkpoint_segments(arch)}")
    if not sets["global"] and not sets["local"]:
        return "none"
    if sets["global"] == sets["local"]:
        return _format_segments(sets["global"], arch)
    return ";".join(f"{resolution}:{_format_segments(sets[resolution], arch)}"
                    for resolution in _RESOLUTIONS if sets[resolution])


@dataclass
class ClInfoNCEConfig:
    """Cl-InfoNCE (Tsai et al., ICLR 2022; docs/objectives.md §2): SupCon with cluster ids as labels."""

    form: Literal["single", "dual"] = "single"  # single: SupCon on head 1; dual: WCL head 1 + cluster mask on head 2
    clusters_csv: str = ""  # CSV with a header; "" = K-means on the current head-1 embeddings
    cluster_column: str = "cluster"  # column holding the auxiliary attribute (any value; equal = same cluster)
    key_column: str = ""  # "" = 'index' if the CSV has it, else 'path' (relative to data.train_dir or absolute)
    kmeans_k: int = 2500  # ImageNet-100 setting
    kmeans_every: int = 1  # recompute the clusters every this many epochs (at the epoch's start)
    kmeans_iters: int = 20
    base_tau: float = 0.07  # the loss is scaled by tau / base_tau as in the reference code (SupCon)


@dataclass
class MomentumConfig:
    """EMA key encoder and key queue (MoCo, He et al. 2020) used by co2.form=queue and by SLR."""

    ema: float = 0.99  # key = ema * key + (1 - ema) * online, after every step
    queue_size: int = 65536
    symmetric: bool = True  # both views act as queries (False: view 1 queries, view 2 keys, as MoCo v2)


@dataclass
class CO2Config:
    """CO2 consistency regulariser (Wei et al., ICLR 2021; docs/objectives.md §3)."""

    form: Literal["batch", "queue"] = "batch"  # batch: negatives from the gathered batch; queue: EMA keys + queue
    alpha: float = 10.0
    tau_con: float = 0.04


@dataclass
class SLRConfig:
    """SLR / SANE self-labelling refinery + momentum mixup (Zhou et al., NeurIPS 2021; docs/objectives.md §4)."""

    tau_prime: float = 1.0  # refinery temperature factor: targets use tau * tau_prime
    kappa: float = 0.1  # mixup theta ~ Beta(kappa, kappa)
    mu_start: float = 0.5  # mu ramps (cosine) from mu_start to mu_end over training
    mu_end: float = 10.0
    lam: float = 0.5  # L = (1 - lam) L_c(onehot) + lam L_c(mixed)


@dataclass
class LossConfig:
    objective: Literal["wcl", "simclr", "clinfonce", "co2", "slr"] = "wcl"
    tau: float = 0.1
    graph_tau: Optional[float] = None  # WCL head 2's temperature (None = loss.tau, as the paper)
    graph_weight: float = 1.0
    # detached: other ranks' rows carry no gradient (reference semantics);
    # differentiable: gradient flows through the gather (full-batch gradient).
    gather: Literal["detached", "differentiable"] = "detached"
    # inherit: local crops take the global crops' labels; knn: one image graph over all crops
    # (docs/wcl.md §3). Used only when data.local_crops > 0.
    multicrop_rule: Literal["inherit", "knn"] = "inherit"
    # knn rule: who computes the crops' 1-NN and head 2's logits in one pass
    # (kernels.similarity_nearest_neighbor). auto: the fused Triton kernel on CUDA, torch elsewhere;
    # triton on CPU needs TRITON_INTERPRET=1 (tests only).
    similarity_backend: Literal["auto", "torch", "triton"] = "auto"
    clinfonce: ClInfoNCEConfig = field(default_factory=ClInfoNCEConfig)
    co2: CO2Config = field(default_factory=CO2Config)
    momentum: MomentumConfig = field(default_factory=MomentumConfig)
    slr: SLRConfig = field(default_factory=SLRConfig)


@dataclass
class OptimConfig:
    base_lr: Optional[float] = None  # None: lr_scale * sqrt(global batch) (4.8 at 4096)
    lr_scale: float = 0.075
    momentum: float = 0.9
    weight_decay: float = 1e-6
    trust_coefficient: float = 0.001
    eps: float = 0.0
    # reference: names containing 'bn' or 'bias' skip weight decay and LARS (misses downsample BN);
    # norm_bias: every normalisation-layer parameter and every bias skips them.
    exclude_rule: Literal["reference", "norm_bias"] = "reference"
    # native: multi-tensor torch._foreach LARS; apex: the same LARS scaling, momentum update by NVIDIA
    # apex's FusedSGD kernels (optional accelerator; apex is not on PyPI: build it from source)
    impl: Literal["native", "apex"] = "native"
    warmup_epochs: float = 10.0


@dataclass
class TrainConfig:
    epochs: int = 200
    seed: int = 0
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    out_dir: str = "runs/wcl"
    resume: str = "auto"  # auto | none | path/to/checkpoint.pt
    log_interval: int = 20  # steps between logged lines (the only host sync points)
    stop_at_step: int = 0  # > 0: stop (with a checkpoint) after this global step; schedule unchanged
    progress: bool = True
    tensorboard: bool = True
    # NaN/inf guard: a step with non-finite gradients is skipped on the device and counted; this many
    # skipped steps in a row stop the run (0 disables the guard).
    max_bad_steps: int = 20
    # > 0: also write the resumable checkpoint inside an epoch once this many minutes have passed since the
    # last one (a hard kill or a node failure then loses at most that much); 0: at epoch ends and on signals only
    checkpoint_every_minutes: float = 0.0
    # GiB of memory per GPU that model.activation_checkpointing=auto plans for (python -m wcl_fast.plan;
    # docs/memory.md); 0 = what the device reports
    gpu_memory: float = 0.0
    # per log interval, computed on the device in every step (docs/diagnostics.md): the weak-label graph's
    # components and view agreement, weak labels against the classes where the batches carry labels, embedding
    # collapse and view similarities
    diagnostics: bool = True
    # a linear classifier on the detached encoder features h, trained on the training labels beside pre-training
    # with its own optimizer (docs/diagnostics.md); logs probe_top1 per interval and probe_val_top1 with the kNN
    # monitor; the encoder is the same with it on or off
    online_probe: bool = False
    online_probe_optimizer: Literal["adam", "sgd"] = "adam"  # sgd: momentum 0.9
    online_probe_lr: float = 1.0e-3


@dataclass
class KnnConfig:
    k: int = 200
    temperature: float = 0.1
    every_epochs: int = 0  # > 0: run the kNN monitor every this many epochs
    at_end: bool = False  # run the kNN monitor after the last epoch
    batch_size: int = 256  # per-rank feature-extraction batch


@dataclass
class LinearConfig:
    """Linear evaluation (docs/wcl.md §5): frozen encoder, Linear(d, classes) ~ N(0, 0.01)."""

    checkpoint: str = ""  # wcl-fast checkpoint.pt ("" = untrained encoder, for baselines)
    epochs: int = 80
    batch_size: int = 4096  # global
    lr_scale: float = 0.2  # lr = lr_scale * batch / 256, cosine to 0 per iteration
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    # True: features of the evaluation transform are computed once and the layer trains on them
    # (fast probes on small datasets; no RandomResizedCrop/flip). False: the reference protocol.
    cache_features: bool = False
    out_dir: str = "runs/linear"


@dataclass
class FinetuneConfig:
    """Semi-supervised fine-tuning (docs/wcl.md §5): encoder + new linear layer on a label subset."""

    checkpoint: str = ""  # wcl-fast checkpoint.pt ("" = untrained encoder, for baselines)
    subset_file: str = ""  # one image path per line (e.g. the SimCLR 1% / 10% lists); "" = seeded subset
    label_fraction: float = 0.01  # class-balanced fraction per class when no subset_file is given
    epochs: int = 60  # SimCLR: 60 epochs for 1 %, 30 for 10 %
    batch_size: int = 256  # global
    lr_scale: float = 0.05  # lr = lr_scale * batch / 256, cosine to 0 per iteration
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0


@dataclass
class CompareConfig:
    """Settings of `python -m wcl_fast.compare` (docs/objectives.md).

    overrides: per-objective `key=value` overrides, each written "objective:key=value" (for example
    "slr:optim.lr_scale=0.15"); they apply to that objective's runs only, after the config file and
    before the command line's overrides (which apply to every objective).
    """

    overrides: list[str] = field(default_factory=list)


def parse_objective_override(text: str) -> tuple[str, str]:
    """Split "objective:key=value" into (objective, "key=value"), with one clear error when malformed."""
    objectives = typing.get_args(typing.get_type_hints(LossConfig)["objective"])
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or "=" not in rest or name not in objectives:
        raise ConfigError(f"config key 'compare.overrides': '{text}' is not of the form objective:key=value with "
                          f"objective one of {', '.join(objectives)} (e.g. slr:optim.lr_scale=0.15)")
    return name, rest.strip()


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value, tp):
    """Check `value` against annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _apply(obj, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section; give it a mapping of keys")
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def _field_type(keys: list[str]):
    """The annotation of the config key `keys` (e.g. ['train', 'out_dir'] -> str), or None if there is none."""
    cls = Config
    for depth, key in enumerate(keys):
        hints = typing.get_type_hints(cls)
        if key not in hints:
            return None
        tp = hints[key]
        if depth == len(keys) - 1:
            return tp
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return None
        cls = tp
    return None


def _is_text(tp) -> bool:
    """str, a Literal of strings or an Optional of those: a value taken literally from the command line."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return len(args) == 1 and _is_text(args[0])
    if origin is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return tp is str


def _parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.epochs=100)")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    tp = _field_type(keys)
    if tp is not None and _is_text(tp) and not (raw in ("null", "~") and type(None) in typing.get_args(tp)):
        return keys, raw  # literally: paths may hold ' #', ': ', spaces, quotes
    if tp == Union[str, list[str]] and not raw.lstrip().startswith("["):
        return keys, raw  # a path or brace pattern ('{a,b}' is not YAML's mapping); a YAML list when it starts with [
    try:
        value = parse_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    except DuplicateKey as dup:
        raise ConfigError(f"override '{text}': the key '{dup.key}' appears twice in its value") from None
    return keys, value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from defaults, then the YAML file at `path`, then `key=value` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file '{path}' is a folder; pass a YAML file, e.g. --config configs/<experiment>.yaml")
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass --config configs/<experiment>.yaml")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[:exc.start].count(b"\n") + 1
            raise ConfigError(f"config file '{path}' is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                              f"save it as UTF-8") from None
        try:
            values = parse_yaml(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file '{path}'{where} is not valid YAML; fix its syntax") from None
        except DuplicateKey as dup:
            raise ConfigError(f"config file '{path}': the key '{dup.key}' appears twice in one section (lines "
                              f"{dup.first} and {dup.second}); keep one") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections (data:, model:, ...)")
        _apply(cfg, values, "")
    for text in overrides:
        keys, value = _parse_override(text)
        nested: dict = value  # type: ignore[assignment]
        for key in reversed(keys):
            nested = {key: nested}
        _apply(cfg, nested, "")
    _check_values(cfg)
    return cfg


def _check_values(cfg: Config) -> None:
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.global_size": cfg.data.global_size,
        "data.local_size": cfg.data.local_size,
        "train.epochs": cfg.train.epochs,
        "train.log_interval": cfg.train.log_interval,
        "loss.tau": cfg.loss.tau,
        "knn.k": cfg.knn.k,
        "knn.temperature": cfg.knn.temperature,
        "knn.batch_size": cfg.knn.batch_size,
        "data.eval_resize": cfg.data.eval_resize,
        "data.eval_crop": cfg.data.eval_crop,
        "data.synthetic_size": cfg.data.synthetic_size,
        "data.synthetic_classes": cfg.data.synthetic_classes,
        "model.head_hidden": cfg.model.head_hidden,
        "model.head_out": cfg.model.head_out,
        "optim.lr_scale": cfg.optim.lr_scale,
        "optim.trust_coefficient": cfg.optim.trust_coefficient,
        "linear.epochs": cfg.linear.epochs,
        "linear.batch_size": cfg.linear.batch_size,
        "linear.lr_scale": cfg.linear.lr_scale,
        "finetune.epochs": cfg.finetune.epochs,
        "finetune.batch_size": cfg.finetune.batch_size,
        "finetune.lr_scale": cfg.finetune.lr_scale,
        "finetune.label_fraction": cfg.finetune.label_fraction,
        "train.online_probe_lr": cfg.train.online_probe_lr,
    }
    if cfg.optim.base_lr is not None:
        positive["optim.base_lr"] = cfg.optim.base_lr
    for key, value in positive.items():
        if not value > 0:  # also catches NaN
            raise ConfigError(f"config key '{key}' must be > 0, got {value}")
    for key, value in {"optim.weight_decay": cfg.optim.weight_decay, "optim.eps": cfg.optim.eps,
                       "loss.graph_weight": cfg.loss.graph_weight,
                       "linear.weight_decay": cfg.linear.weight_decay,
                       "finetune.weight_decay": cfg.finetune.weight_decay}.items():
        if not value >= 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {value}")
    for key, value in {"optim.momentum": cfg.optim.momentum, "linear.momentum": cfg.linear.momentum,
                       "finetune.momentum": cfg.finetune.momentum}.items():
        if not 0 <= value < 1:
            raise ConfigError(f"config key '{key}' must be in [0, 1), got {value}")
    for key, value in {"data.flip_p": cfg.data.flip_p, "data.blur_p": cfg.data.blur_p, "finetune.label_fraction": cfg.finetune.label_fraction}.items():
        if not 0 <= value <= 1:
            raise ConfigError(f"config key '{key}' must be in [0, 1], got {value}")
    for key in ("mean", "std"):
        values = getattr(cfg.data, key)
        if len(values) != 3:
            raise ConfigError(f"config key 'data.{key}' must list 3 numbers (R, G, B), got {values}")
    if not all(v > 0 for v in cfg.data.std):
        raise ConfigError(f"config key 'data.std' must hold 3 numbers > 0 (it divides the pixels), got {cfg.data.std}")
    for key, value in {"data.workers": cfg.data.workers, "data.local_crops": cfg.data.local_crops,
                       "data.max_decode_pixels": cfg.data.max_decode_pixels, "data.read_timeout": cfg.data.read_timeout,
                       "train.stop_at_step": cfg.train.stop_at_step, "train.max_bad_steps": cfg.train.max_bad_steps,
                       "train.gpu_memory": cfg.train.gpu_memory,
                       "train.checkpoint_every_minutes": cfg.train.checkpoint_every_minutes, "optim.warmup_epochs": cfg.optim.warmup_epochs,
                       "knn.every_epochs": cfg.knn.every_epochs}.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {value}")
    for key, scale in {"data.global_scale": cfg.data.global_scale, "data.local_scale": cfg.data.local_scale}.items():
        if scale is not None and (len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1):
            raise ConfigError(f"config key '{key}' must be [low, high] with 0 < low <= high <= 1, got {scale}")
    if cfg.data.dataset != "imagefolder" and cfg.data.backend in ("dali", "ffcv"):
        raise ConfigError(f"data.dataset={cfg.data.dataset} is read from its own files by the reference loader; set "
                          f"data.backend=reference (or auto), or use it as an ImageFolder (data.dataset=imagefolder) "
                          f"for data.backend={cfg.data.backend}")
    for key, value in {"data.shard_streams": cfg.data.shard_streams, "data.shard_read_threads": cfg.data.shard_read_threads}.items():
        if value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
    for key, value in {"data.shard_read_ahead": cfg.data.shard_read_ahead, "data.shard_retries": cfg.data.shard_retries,
                       "data.shard_backoff": cfg.data.shard_backoff}.items():
        if not value >= 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {value}")
    if not re.fullmatch(r"[A-Za-z0-9_]+(?::[A-Za-z0-9_.]+)?", cfg.data.shard_label_key):
        raise ConfigError(f"config key 'data.shard_label_key': {cfg.data.shard_label_key!r} is not a member extension "
                          f"(cls) or an extension and a JSON field (json:label)")
    if cfg.data.backend == "shards" and not cfg.data.shards:
        raise ConfigError("data.backend=shards needs data.shards: a brace pattern (train-{000000..000099}.tar), a list "
                          "of shard files or a manifest .json (python -m pipelines.convert --format wds writes one)")
    if cfg.model.widths and (len(cfg.model.widths) != 4 or min(cfg.model.widths) <= 0):
        raise ConfigError(f"config key 'model.widths' must list 4 positive stage widths (or be []), got {cfg.model.widths}")
    if _WHITESPACE.sub("", cfg.model.activation_checkpointing) not in ("none", "auto"):
        parse_checkpointing(cfg.model.activation_checkpointing, cfg.model.arch)  # ConfigError when malformed
    if cfg.loss.graph_tau is not None and cfg.loss.graph_tau <= 0:
        raise ConfigError(f"config key 'loss.graph_tau' must be > 0 (or null = loss.tau), got {cfg.loss.graph_tau}")
    for key, value in {"loss.clinfonce.kmeans_k": cfg.loss.clinfonce.kmeans_k,
                       "loss.clinfonce.kmeans_every": cfg.loss.clinfonce.kmeans_every,
                       "loss.clinfonce.kmeans_iters": cfg.loss.clinfonce.kmeans_iters,
                       "loss.clinfonce.base_tau": cfg.loss.clinfonce.base_tau, "loss.co2.tau_con": cfg.loss.co2.tau_con,
                       "loss.momentum.queue_size": cfg.loss.momentum.queue_size,
                       "loss.slr.tau_prime": cfg.loss.slr.tau_prime, "loss.slr.kappa": cfg.loss.slr.kappa}.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {value}")
    for key, value in {"loss.momentum.ema": cfg.loss.momentum.ema, "loss.slr.lam": cfg.loss.slr.lam}.items():
        if not 0 <= value <= 1:
            raise ConfigError(f"config key '{key}' must be in [0, 1], got {value}")
    if cfg.loss.co2.alpha < 0 or cfg.loss.slr.mu_start < 0 or cfg.loss.slr.mu_end < 0:
        raise ConfigError("config keys 'loss.co2.alpha', 'loss.slr.mu_start', 'loss.slr.mu_end' must be >= 0")
    if cfg.loss.objective != "wcl" and cfg.loss.multicrop_rule == "knn":
        raise ConfigError(f"loss.multicrop_rule=knn is a WCL rule; loss.objective={cfg.loss.objective} "
                          f"uses local crops as extra anchors only; set loss.multicrop_rule=inherit")
    for text in cfg.compare.overrides:
        parse_objective_override(text)
    if cfg.optim.warmup_epochs > cfg.train.epochs:
        raise ConfigError(f"optim.warmup_epochs ({cfg.optim.warmup_epochs}) exceeds train.epochs ({cfg.train.epochs})")


def check_paths(cfg: Config, need_val: bool | None = None) -> None:
    """Stop before any work if a dataset path the run needs is missing."""
    backend = cfg.data.backend
    if backend == "auto":  # the paths auto's choices need: ffcv with data.beton, dali / reference data.train_dir
        backend = "ffcv" if cfg.data.beton else "shards" if cfg.data.shards else "reference"
    if backend == "synthetic":
        return
    if backend == "shards":  # the shard lists are read (counts, manifest) when the loader is built
        need_val = (cfg.knn.at_end or cfg.knn.every_epochs > 0) if need_val is None else need_val
        if need_val and not cfg.data.val_shards and not cfg.data.val_dir:
            raise ConfigError("the kNN monitor needs an evaluation split: set data.val_shards (shards) or data.val_dir "
                              "(an ImageFolder), or knn.at_end=false")
        if need_val and cfg.data.val_dir and not cfg.data.val_shards and not Path(cfg.data.val_dir).is_dir():
            raise ConfigError(f"data.val_dir: '{cfg.data.val_dir}' is not a directory; set data.val_dir= or data.val_shards=")
        return
    if backend == "ffcv" and not Path(cfg.data.beton).is_file():
        raise ConfigError(f"data.beton: '{cfg.data.beton}' is not a file; write one with python -m pipelines.convert "
                          f"--src /path/to/train --out train.beton and set data.beton=train.beton")
    need_val = (cfg.knn.at_end or cfg.knn.every_epochs > 0) if need_val is None else need_val
    # ffcv reads data.beton (training, kNN memory bank) and data.val_beton when set (else data.val_dir)
    ffcv = backend == "ffcv"
    if ffcv and cfg.data.val_beton and not Path(cfg.data.val_beton).is_file():
        raise ConfigError(f"data.val_beton: '{cfg.data.val_beton}' is not a file; write it with python -m pipelines.convert")
    if ffcv:  # an empty, truncated or foreign file stops here, not at the first batch or the final kNN
        from pipelines.ffcv import open_beton

        for key, path in (("data.beton", cfg.data.beton), ("data.val_beton", cfg.data.val_beton)):
            if path:
                open_beton(path, key, cfg.data)
    keys = ([] if ffcv else [("data.train_dir", cfg.data.train_dir)]) + \
        ([("data.val_dir", cfg.data.val_dir)] if need_val and not (ffcv and cfg.data.val_beton) else [])
    for key, value in keys:
        if not value:
            raise ConfigError(f"config key '{key}' is empty; set {key}=/path/to/imagefolder (one sub-folder per class)")
        if not Path(value).is_dir():
            raise ConfigError(f"{key}: '{value}' is not a directory; set {key}= to an ImageFolder (one sub-folder per class)")
    if need_val and cfg.data.dataset == "imagefolder" and cfg.data.val_dir and not (ffcv and cfg.data.val_beton):
        check_val_layout(cfg.data)


def check_val_layout(data: DataConfig) -> None:
    """A flat validation folder needs data.val_labels (checked by reading them now, not at the end of
    training); class sub-folders need nothing."""
    if data.val_labels:
        from pipelines.datasets import flat_val_split

        flat_val_split(data.val_dir, data.val_labels, data.val_synsets, data.train_dir)
        return
    entries = list(Path(data.val_dir).iterdir())
    if entries and not any(entry.is_dir() for entry in entries):
        raise ConfigError(f"data.val_dir: '{data.val_dir}' is a flat folder of images without class sub-folders; set "
                          f"data.val_labels=LOC_val_solution.csv (Kaggle) or data.val_labels=ILSVRC2012_validation_"
                          f"ground_truth.txt data.val_synsets=meta.mat (devkit)")


def check_out_dir(value: str, key: str) -> None:
    """An output folder must be a directory this process can create and write into."""
    if not value:
        raise ConfigError(f"config key '{key}' is empty; set {key}=/path/to/a/folder for the run's files")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: '{value}' exists and is not a directory; set {key} to a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot create '{value}' ({exc.strerror}); set {key} to a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: '{value}' is not writable by this user; set {key} to a writable folder")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(values: dict) -> Config:
    cfg = Config()
    _apply(cfg, values, "")
    return cfg
