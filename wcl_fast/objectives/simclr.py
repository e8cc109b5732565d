"""SimCLR (Chen et al., ICML 2020, arXiv 2002.05709): NT-Xent on head 1 alone, the baseline WCL
improves on (docs/objectives.md §1). Eq. 1 of SimCLR:
    l_i = -log( exp(s_ip / tau) / sum_{a != i} exp(s_ia / tau) ),  p = the other view of image i,
averaged over all 2N view embeddings; local crops (multi-crop) take the image's two global crops
as positives exactly as in WCL's head 1 (docs/wcl.md §3).
"""
from __future__ import annotations

import torch

from wcl_fast.objectives.rows import nce_rows
from wcl_fast.objectives.base import Objective, register


def simclr_loss(z1: torch.Tensor, z2: torch.Tensor, z1_all: torch.Tensor | None = None,
                z2_all: torch.Tensor | None = None, offset: int = 0, tau: float = 0.1,
                z_local: torch.Tensor | None = None) -> torch.Tensor:
    """Mean NT-Xent over this rank's anchors. z1, z2 [b, D] (this rank's rows offset..offset+b);
    z1_all, z2_all [N, D] the gathered keys (default: z1, z2 on one process); z_local [L*b, D]."""
    z1_all = z1 if z1_all is None else z1_all
    z2_all = z2 if z2_all is None else z2_all
    return nce_rows(z1, z2, z1_all, z2_all, offset, tau, z_local).mean()


@register("simclr")
class SimCLRObjective(Objective):
    term_names = ("loss",)

    def losses(self, ddp, batch, step, total_steps, autocast):
        with autocast():
            z_global, _, z_local, _ = ddp(batch.globals, batch.locals)
        z1, z2 = z_global.chunk(2)
        z1_all, z2_all = self._gather(z1, z2)
        loss = nce_rows(z1, z2, z1_all, z2_all, self.ctx.rank * z1.shape[0], self.cfg.loss.tau, z_local).mean()
        return {"loss": loss}
