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
