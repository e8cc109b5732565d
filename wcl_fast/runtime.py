"""How tensors run: the autocast dtype of `train.precision` and the memory format of `model.channels_last`,
one definition each for the trainer, the evaluation commands and the benches."""
from __future__ import annotations

import contextlib

import torch


def autocast_dtype(precision: str) -> torch.dtype | None:
    """bf16 / fp16 -> the autocast dtype; fp32 -> None (no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for `dtype` on `device`'s type; a no-op context for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format
