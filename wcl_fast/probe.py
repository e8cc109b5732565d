"""The online linear probe (`train.online_probe`; docs/diagnostics.md): a Linear(d, classes) layer on the
encoder features h of the training forward, detached, trained on the batches' class labels beside
pre-training with an optimizer of its own (`train.online_probe_optimizer`, `train.online_probe_lr`).

- Features: a forward pre-hook on head 1 takes its input h, inside the training forward only (a forward
  pre-hook and a forward hook on the model open and close the capture), the first 2B rows: both global
  views of the B images. No second encoder pass; head 1 runs outside the checkpointed encoder segments,
  so activation checkpointing and a compiled encoder change nothing here. Every objective has head 1.
- The encoder never sees the probe: h is detached, the probe's parameters are not in the pre-training
  optimizer, it is initialised to zeros and draws no random numbers, so the encoder, its gradients and the
  run's random streams are the same with the probe on or off.
- Labels < 0 (STL-10's unlabeled images) or >= classes are left out of its loss and accuracy.
- Logged per interval: probe_top1 (training top-1 of the step's views, before its update) and probe_loss,
  device-side sums read by wcl_fast.log.StepMeter; with the kNN monitor: probe_val_top1 on data.val_dir.
- Several processes: the probe's gradients are averaged over ranks (one all-reduce per step), so its
  replicas stay equal. Its parameters and optimizer state are in the checkpoint (`state_dict`).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from wcl_fast import dist as wdist
from wcl_fast.config import Config, ConfigError


def training_classes(cfg: Config) -> int:
    """How many classes the training set's labels count, from the dataset's layout (no decoding)."""
    data = cfg.data
    if data.backend == "synthetic":
        return data.synthetic_classes
    if data.dataset in ("cifar10", "stl10"):
        return 10
    if data.dataset == "cifar100":
        return 100
    if data.backend == "ffcv":
        from pipelines.ffcv import beton_classes, beton_labels, open_beton

        classes = beton_classes(data.beton)
        return len(classes) if classes else int(beton_labels(open_beton(data.beton, "data.beton", data), data).max()) + 1
    root = Path(data.train_dir)  # an ImageFolder (Tiny-ImageNet's train folder is one): its class folders
    return max(1, sum(1 for entry in root.iterdir() if entry.is_dir()))


class OnlineProbe:
    """See the module docstring. `step(batch)` after each training step; `names`, `sums`, `reset()` for
    wcl_fast.log.StepMeter; `evaluate(...)` at the kNN monitor; `state_dict` / `load_state_dict`."""

    names = ("probe_top1", "probe_loss")

    def __init__(self, feature_dim: int, num_classes: int, optimizer: str, lr: float, device: torch.device,
                 model: torch.nn.Module | None = None):
        self.num_classes = num_classes
        self.linear = torch.nn.Linear(feature_dim, num_classes).to(device)
        with torch.no_grad():  # zeros: no random draw, the run's random streams stay as they are
            self.linear.weight.zero_()
            self.linear.bias.zero_()
        if optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.linear.parameters(), lr=lr, momentum=0.9)
        else:  # capturable on CUDA: the step count and bias corrections stay on the device (no host read)
            self.optimizer = torch.optim.Adam(self.linear.parameters(), lr=lr, capturable=device.type == "cuda")
        self.sums = torch.zeros(2, len(self.names), dtype=torch.float64, device=device)
        self._want, self._parts, self._rows = 0, [], 0
        self._hooks = []
        if model is not None:
            self._hooks = [model.register_forward_pre_hook(self._open), model.head1.register_forward_pre_hook(self._take),
                           model.register_forward_hook(self._close)]

    @classmethod
    def build(cls, cfg: Config, model: torch.nn.Module, device: torch.device) -> "OnlineProbe | None":
        """The probe of train.online_probe on `model` (the unwrapped WCLModel), or None when it is off."""
        if not cfg.train.online_probe:
            return None
        from wcl_fast.model import feature_dim

        return cls(feature_dim(cfg.model.arch, cfg.model.widths), training_classes(cfg), cfg.train.online_probe_optimizer,
                   cfg.train.online_probe_lr, device, model)

    # ---- the capture of h: first 2B rows of head 1's inputs within one forward of the model ----

    def _open(self, module, args) -> None:
        self._want, self._parts, self._rows = args[0].shape[0], [], 0  # the global crops [2B, 3, H, W]

    def _take(self, module, args) -> None:
        if self._rows < self._want:
            self._parts.append(args[0].detach())
            self._rows += args[0].shape[0]

    def _close(self, module, args, output) -> None:
        self._want = 0

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def features(self) -> torch.Tensor | None:
        """h of the global crops of the last training forward [2B, d] (taken once), or None."""
        parts, self._parts, self._rows = self._parts, [], 0
        if not parts:
            return None
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    # ---- training ----

    def step(self, batch) -> None:
        """One update on the last training forward's features and the batch's labels (both views)."""
        h = self.features()
        if h is None:
            return
        b = batch.label.shape[0]
        self.update(h[:2 * b], batch.label.to(h.device).repeat(2))

    def update(self, h: torch.Tensor, labels: torch.Tensor) -> None:
        """One optimizer step of the probe on features h [M, d] (detached here) and labels [M]; adds its top-1
        and loss to `sums`. No host read; the gradient is averaged over ranks."""
        h = h.detach().float()
        rows_ok = torch.isfinite(h).all(dim=1)  # a skipped (non-finite) training step must not poison the probe
        h = torch.where(rows_ok[:, None], h, torch.zeros_like(h))
        valid = rows_ok & (labels >= 0) & (labels < self.num_classes)
        target = labels.clamp(0, self.num_classes - 1)
        logits = self.linear(h)
        per_row = F.cross_entropy(logits, target, reduction="none")
        weight = valid.to(per_row.dtype)
        count = weight.sum()
        loss = (per_row * weight).sum() / count.clamp_min(1.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        world = wdist.world_size()
        if world > 1:
            grads = [p.grad for p in self.linear.parameters()]
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= world
            torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])
        self.optimizer.step()
        with torch.no_grad():
            correct = ((logits.argmax(dim=1) == labels) & valid).sum().to(torch.float64)
            numerators = torch.stack([100.0 * correct, (per_row.detach() * weight).sum().to(torch.float64)])
            self.sums += torch.stack([numerators, count.to(torch.float64).expand(2)])

    def reset(self) -> None:
        self.sums.zero_()

    # ---- evaluation and state ----

    @torch.no_grad()
    def evaluate(self, cfg: Config, encoder: torch.nn.Module, device: torch.device) -> dict:
        """Top-1 (%) of the probe on data.val_dir under the evaluation transform (encoder in eval mode), over
        every rank's shard: {"top1", "count"}. The kNN monitor keeps its features to itself (L2-normalised),
        so this is a pass of its own over the validation split, not over the bank."""
        from pipelines import build_eval_loader
        from wcl_fast.evaluation import extract_all

        rank, world = wdist.rank(), wdist.world_size()
        loader, total, _ = build_eval_loader(cfg.data, cfg.data.val_dir, "data.val_dir", cfg.knn.batch_size, rank, world,
                                             device.type == "cuda")
        feats, labels, _ = extract_all(encoder, loader, total, "data.val_dir", device, cfg.model.channels_last,
                                       cfg.train.precision, normalize=False, gather=False)
        hits = torch.zeros(2, dtype=torch.float64, device=device)
        if feats.shape[0]:
            hits[0] = (self.linear(feats).argmax(dim=1) == labels).sum()
            hits[1] = labels.shape[0]
        if world > 1:
            torch.distributed.all_reduce(hits)
        correct, count = hits.tolist()  # sync point (evaluation only)
        return {"top1": 100.0 * correct / max(count, 1.0), "count": int(count)}

    def state_dict(self) -> dict:
        return {"linear": self.linear.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict, path) -> None:
        """The probe of a checkpoint (one ConfigError when its classes or width differ from this run's)."""
        weight = state["linear"]["weight"]
        if tuple(weight.shape) != tuple(self.linear.weight.shape):
            raise ConfigError(f"train.resume: the online probe in '{path}' maps {weight.shape[1]} features to "
                              f"{weight.shape[0]} classes, this run's {self.linear.weight.shape[1]} to "
                              f"{self.linear.weight.shape[0]}; resume with the same data and model, or set "
                              f"train.online_probe=false")
        self.linear.load_state_dict(state["linear"])
        self.optimizer.load_state_dict(state["optimizer"])
