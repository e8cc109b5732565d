"""EMA key encoder and key queue (MoCo, He et al., CVPR 2020): the state of the CO2 `queue` form
and of SLR. Both are part of the checkpoint, so a resumed run continues bit-exactly."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from wcl_fast.objectives.base import Objective


class KeyQueue:
    """FIFO of the last `size` keys [size, D] (fp32), initialised with random unit vectors."""

    def __init__(self, size: int, dim: int, device: torch.device, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.keys = F.normalize(torch.randn(size, dim, generator=generator), dim=1).to(device)
        # write position as a device tensor: advancing it (by 0 on a skipped step) never synchronises
        self.ptr = torch.zeros((), dtype=torch.int64, device=self.keys.device)

    @torch.no_grad()
    def push(self, keys: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """Enqueue `keys` [n, D]; `ok` (device bool, optional): False leaves the queue exactly as it was
        (the trainer's skipped non-finite step)."""
        size, count = self.keys.shape[0], keys.shape[0]
        if count >= size:
            keys, count = keys[-size:], size
        index = (torch.arange(count, device=self.keys.device) + self.ptr) % size
        keys = keys.detach().float()
        if ok is not None:
            keys = torch.where(ok, keys, self.keys[index])
        self.keys[index] = keys
        step = count if ok is None else ok.to(torch.int64) * count
        self.ptr = (self.ptr + step) % size

    def state_dict(self) -> dict:
        return {"keys": self.keys, "ptr": int(self.ptr)}  # sync point (checkpoints only)

    def load_state_dict(self, state: dict) -> None:
        if state["keys"].shape != self.keys.shape:
            raise ValueError(f"checkpoint queue has shape {tuple(state['keys'].shape)}, this run {tuple(self.keys.shape)}; "
                             f"resume with the same loss.momentum.queue_size and model.head_out")
        self.keys.copy_(state["keys"])
        self.ptr = torch.tensor(int(state["ptr"]), dtype=torch.int64, device=self.keys.device)


class EMAEncoder:
    """Key network: a copy of the online model (encoder + head 1, no head 2) updated after every step
    by key = ema * key + (1 - ema) * online. Runs in training mode (its BN uses batch statistics, as
    MoCo's key encoder), never receives gradients."""

    def __init__(self, online: torch.nn.Module, ema: float):
        head2 = getattr(online, "head2", None)
        online.head2 = None  # copy without head 2
        try:
            self.model = copy.deepcopy(online)
        finally:
            online.head2 = head2
        self.model.requires_grad_(False)
        self.model.train()
        self.ema = ema
        self._pairs = None

    def _params(self, online: torch.nn.Module):
        if self._pairs is None:
            mine = dict(self.model.named_parameters())
            names = [name for name, _ in online.named_parameters() if name in mine]
            self._pairs = ([mine[n] for n in names], names)
        return self._pairs

    @torch.no_grad()
    def update(self, online: torch.nn.Module, ok: torch.Tensor | None = None) -> None:
        """key <- lerp(key, online, 1 - ema); `ok` (device bool, optional): False leaves the keys as they were."""
        keys, names = self._params(online)
        source = dict(online.named_parameters())
        online_params = [source[n].detach() for n in names]
        if ok is None:
            torch._foreach_lerp_(keys, online_params, 1.0 - self.ema)
            return
        # a device-side weight: lerp with a tensor weight reads it on the host (aten._local_scalar_dense)
        # every step; key + w (online - key) with w a 0-dim tensor stays on the device
        steps = torch._foreach_sub(online_params, keys)
        torch._foreach_mul_(steps, ok.to(keys[0].dtype) * (1.0 - self.ema))
        torch._foreach_add_(keys, steps)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images)[0]

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


class MomentumObjective(Objective):
    """Shared by the queue form of CO2 and by SLR: EMA key encoder + key queue."""

    def __init__(self, cfg, model, ctx, data):
        super().__init__(cfg, model, ctx, data)
        m = cfg.loss.momentum
        self.keys = EMAEncoder(model, m.ema)
        self.queue = KeyQueue(m.queue_size, cfg.model.head_out, ctx.device, seed=cfg.train.seed + 17)
        self._pending: torch.Tensor | None = None

    def key_embeddings(self, globals_, autocast):
        with autocast():
            return self.keys.embed(globals_).float().chunk(2)  # k1, k2 [b, D]

    def pairs(self, z1, z2, k1, k2):
        """(query, positive key) pairs: view 1 -> key of view 2 (and view 2 -> key of view 1 when symmetric)."""
        return [(z1, k2), (z2, k1)] if self.cfg.loss.momentum.symmetric else [(z1, k2)]

    def guarded_buffers(self):
        return super().guarded_buffers() + list(self.keys.model.buffers())  # the key encoder's BN runs in train mode

    def after_step(self, ok=None):
        self.keys.update(self.model, ok)
        if self._pending is not None:
            self.queue.push(self._pending, ok)
            self._pending = None

    def state_dict(self):
        return {"key_model": self.keys.state_dict(), "queue": self.queue.state_dict()}

    def load_state_dict(self, state):
        if "key_model" not in state:
            raise ValueError("the checkpoint holds no key encoder / queue for this objective; resume with the "
                             "loss.objective it was written with")
        self.keys.load_state_dict(state["key_model"])
        self.queue.load_state_dict(state["queue"])
