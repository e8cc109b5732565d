"""The batch contract shared by every loader backend (docs/design.md)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MultiCropBatch:
    """One step's crops for this rank.

    globals: [2B, 3, H, W] float, normalised; rows [0, B) are view 1, [B, 2B) view 2 of the same images.
    locals:  [L*B, 3, h, w] float or None; crop-major: rows [l*B, (l+1)*B) are local crop l.
    index:   [B] int64 dataset sample ids (the sample actually decoded, after any substitution).
    label:   [B] int64 class ids (used by evaluation only).
    failed:  number of unreadable images replaced by another sample while building this batch.
    """

    globals: torch.Tensor
    locals: torch.Tensor | None
    index: torch.Tensor
    label: torch.Tensor
    failed: int = 0

    @property
    def batch_size(self) -> int:
        return self.index.shape[0]

    def to(self, device: torch.device, channels_last: bool = True) -> "MultiCropBatch":
        """Move to `device` (non-blocking from pinned memory) in channels-last layout."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def move(x):
            return None if x is None else x.to(device, non_blocking=True).contiguous(memory_format=fmt)

        return MultiCropBatch(move(self.globals), move(self.locals), self.index.to(device, non_blocking=True),
                              self.label.to(device, non_blocking=True), self.failed)

    def pin_memory(self) -> "MultiCropBatch":
        pin = (lambda x: None if x is None else x.pin_memory())
        return MultiCropBatch(pin(self.globals), pin(self.locals), self.index.pin_memory(),
                              self.label.pin_memory(), self.failed)


def current_device_id() -> int | None:
    """The index of the current CUDA device, or None without CUDA: where the loaders put their output."""
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def current_device() -> torch.device:
    """The current CUDA device, else the CPU."""
    index = current_device_id()
    return torch.device("cpu") if index is None else torch.device("cuda", index)


def collate_multicrop(items) -> MultiCropBatch:
    """Stack samples view-major: globals [2B,3,H,W], locals [L*B,3,h,w]."""
    num_local = len(items[0][1])
    globals_ = torch.stack([item[0][v] for v in range(2) for item in items])
    locals_ = torch.stack([item[1][l] for l in range(num_local) for item in items]) if num_local else None
    index = torch.tensor([item[2] for item in items], dtype=torch.int64)
    label = torch.tensor([item[3] for item in items], dtype=torch.int64)
    return MultiCropBatch(globals_, locals_, index, label, sum(item[4] for item in items))


def collate_eval(items) -> MultiCropBatch:
    """Single view: globals [B,3,H,W] of the readable images (B may be 0); failed = the unreadable ones."""
    kept = [item for item in items if item is not None]
    globals_ = torch.stack([item[0][0] for item in kept]) if kept else torch.zeros((0, 3, 1, 1))
    index = torch.tensor([item[2] for item in kept], dtype=torch.int64)
    label = torch.tensor([item[3] for item in kept], dtype=torch.int64)
    return MultiCropBatch(globals_, None, index, label, len(items) - len(kept) + sum(item[4] for item in kept))
