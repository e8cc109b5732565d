"""Objectives as the trainer sees them: each binds its pure loss function (wcl.py, simclr.py,
clinfonce.py, co2.py, slr.py) to the state it needs (cluster table, EMA key encoder, key queue).

Interface used by wcl_fast.train:
    objective = build_objective(cfg, model, ctx, num_samples)   # model: the unwrapped online model
    objective.on_epoch_start(epoch, start_step)                  # re-clustering hook
    terms = objective.losses(ddp, batch, global_step, total_steps, autocast)  # {'loss': total, ...}
    objective.after_step()                                       # EMA update, enqueue
    objective.state_dict() / load_state_dict(state)              # checkpointed with the model
`term_names` lists the logged terms ('loss' first). `two_heads(cfg)` says whether the model needs head 2.
"""
from __future__ import annotations

import contextlib

import torch

from wcl_fast import dist as wdist
from wcl_fast.config import Config, ConfigError
from wcl_fast.objectives.clinfonce import clinfonce_loss, load_cluster_csv, spherical_kmeans
from wcl_fast.objectives.co2 import co2_batch_consistency, co2_queue_terms, queue_infonce_rows
from wcl_fast.objectives.momentum import EMAEncoder, KeyQueue
from wcl_fast.objectives.slr import mixup_draw, momentum_mixup, mu_at, refinery_targets, slr_terms
from wcl_fast.objectives.wcl import WCLTerms, knn_graph_rows_fused, nce_rows, wcl_loss_terms, weak_labels_sharded

KNN_LABEL_BLOCKS = 2  # sync-free image-graph labelling: 2 blocks of ceil(log2 N) + 1 hook/compress rounds


def compute_loss(cfg: Config, z_global, u_global, z_local, u_local, rank: int, flags: dict | None = None):
    """Gather the keys across ranks and evaluate the WCL terms for this rank's anchors.

    flags: optional dict; in knn mode its 'unconverged' entry (device tensor) counts labellings that
    did not converge within KNN_LABEL_BLOCKS (read at log intervals only).
    """
    differentiable = cfg.loss.gather == "differentiable"
    z1, z2 = z_global.chunk(2)  # [b, D] each
    u1, u2 = u_global.chunk(2)
    gathered = [wdist.gather_rows(t, differentiable) for t in (z1, z2, u1, u2)]  # [N, D] each
    offset = rank * z1.shape[0]
    labels = None
    if cfg.loss.multicrop_rule == "knn" and z_local is not None:  # one pass: crops' 1-NN + head-2 logits
        graph_tau = cfg.loss.tau if cfg.loss.graph_tau is None else cfg.loss.graph_tau
        graph_rows, _, converged = knn_graph_rows_fused(u1, u2, u_local, gathered[2], gathered[3], graph_tau,
                                                        fixed_blocks=KNN_LABEL_BLOCKS,
                                                        backend=cfg.loss.similarity_backend)
        if flags is not None:
            flags["unconverged"] = flags.get("unconverged", 0) + (~converged).to(torch.float32)
        nce = nce_rows(z1, z2, gathered[0], gathered[1], offset, cfg.loss.tau, z_local).mean()
        return WCLTerms(nce, graph_rows.mean())
    if wdist.world_size() > 1:  # each rank searches its own rows; every rank gets the same labels
        labels = (weak_labels_sharded(u1, gathered[2], offset), weak_labels_sharded(u2, gathered[3], offset))
    return wcl_loss_terms(z1, z2, u1, u2, *gathered, offset=offset, tau=cfg.loss.tau,
                          z_local=z_local, u_local=u_local, labels=labels, graph_tau=cfg.loss.graph_tau)


def two_heads(cfg: Config) -> bool:
    """Whether the objective uses head 2 (phi): WCL and the dual-head Cl-InfoNCE."""
    return cfg.loss.objective == "wcl" or (cfg.loss.objective == "clinfonce" and cfg.loss.clinfonce.form == "dual")


class BufferGuard:
    """Snapshot of a list of tensors (one concatenation per dtype) that `restore_unless(ok)` puts back
    when the device flag `ok` is False -- without a host sync (torch.where + one fused copy)."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.groups = {}
        for t in tensors:
            self.groups.setdefault((t.dtype, t.device), []).append(t)
        self.saved = {key: torch.cat([t.reshape(-1) for t in group]) for key, group in self.groups.items()}

    @torch.no_grad()
    def all_finite(self) -> torch.Tensor | None:
        """Device bool: every floating-point tensor of the list is finite now (None for an empty list)."""
        flags = [torch.isfinite(torch.cat([t.reshape(-1) for t in group])).all()
                 for (dtype, _), group in self.groups.items() if dtype.is_floating_point]
        return torch.stack(flags).all() if flags else None

    @torch.no_grad()
    def restore_unless(self, ok: torch.Tensor) -> None:
        for key, group in self.groups.items():
            now = torch.cat([t.reshape(-1) for t in group])
            chosen = torch.where(ok, now, self.saved[key]).split([t.numel() for t in group])
            torch._foreach_copy_(group, [c.view(t.shape) for c, t in zip(chosen, group)])


class Objective:
    term_names: tuple[str, ...] = ("loss",)

    def __init__(self, cfg: Config, model: torch.nn.Module, ctx: wdist.DistContext, num_samples: int):
        self.cfg, self.model, self.ctx, self.num_samples = cfg, model, ctx, num_samples
        self.flags: dict = {}  # device-side counters read at log intervals (knn: unconverged labellings)

    def on_epoch_start(self, epoch: int, start_step: int) -> None:
        pass

    def losses(self, ddp, batch, step: int, total_steps: int, autocast) -> dict:
        raise NotImplementedError

    def after_step(self, ok: torch.Tensor | None = None) -> None:
        """State updates after the optimizer step; `ok` False (device bool): the step was skipped, leave
        the state as it was."""

    def guarded_buffers(self) -> list[torch.Tensor]:
        """Tensors a forward pass changes outside the optimizer: BatchNorm running statistics."""
        return list(self.model.buffers())

    def train_step(self, ddp, batch, step: int, total_steps: int, autocast, optimizer, scaler=None) -> dict:
        """One optimisation step -- losses, backward, optimizer (through the fp16 GradScaler when given),
        after_step -- shared by the trainer, the step bench and the CUDA no-host-sync test. Returns the terms.

        With the optimizer's NaN guard (skip_nonfinite) a skipped step leaves no trace: parameters and
        momentum stay (LARS), the buffers the forward pass updated are put back (BufferGuard), and the
        EMA keys and the queue are not advanced. A step the fp16 GradScaler skips for inf gradients
        counts as skipped too (optimizer.last_step_ok False), and so does a step whose forward pass left
        non-finite BatchNorm statistics (optimizer.precondition)."""
        guard = getattr(optimizer, "skip_nonfinite", False)
        buffers = BufferGuard(self.guarded_buffers()) if guard else None
        terms = self.losses(ddp, batch, step, total_steps, autocast)
        optimizer.zero_grad(set_to_none=True)
        if guard:
            optimizer.last_step_ok = None
            optimizer.precondition = buffers.all_finite()  # e.g. a running_var that overflowed with finite grads
        if scaler is not None:
            scaler.scale(terms["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            terms["loss"].backward()
            optimizer.step()
        ok = None
        if guard:
            if optimizer.last_step_ok is None:  # the GradScaler skipped optimizer.step (inf gradients)
                optimizer.last_step_ok = torch.zeros((), dtype=torch.bool, device=terms["loss"].device)
            ok = optimizer.last_step_ok
            buffers.restore_unless(ok)
        self.after_step(ok)
        return terms

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def _gather(self, *tensors):
        differentiable = self.cfg.loss.gather == "differentiable"
        return [wdist.gather_rows(t, differentiable) for t in tensors]


class WCLObjective(Objective):
    term_names = ("loss", "nce", "graph")

    def losses(self, ddp, batch, step, total_steps, autocast):
        with autocast():
            z_global, u_global, z_local, u_local = ddp(batch.globals, batch.locals)
        terms = compute_loss(self.cfg, z_global, u_global, z_local, u_local, self.ctx.rank, self.flags)
        return {"loss": terms.nce + self.cfg.loss.graph_weight * terms.graph, "nce": terms.nce, "graph": terms.graph}


class SimCLRObjective(Objective):
    term_names = ("loss",)

    def losses(self, ddp, batch, step, total_steps, autocast):
        with autocast():
            z_global, _, z_local, _ = ddp(batch.globals, batch.locals)
        z1, z2 = z_global.chunk(2)
        z1_all, z2_all = self._gather(z1, z2)
        loss = nce_rows(z1, z2, z1_all, z2_all, self.ctx.rank * z1.shape[0], self.cfg.loss.tau, z_local).mean()
        return {"loss": loss}


class ClInfoNCEObjective(Objective):
    """Cluster ids per sample (int64 [num_samples] on the device) from a CSV or from K-means."""

    def __init__(self, cfg, model, ctx, num_samples):
        super().__init__(cfg, model, ctx, num_samples)
        c = cfg.loss.clinfonce
        self.term_names = ("loss",) if c.form == "single" else ("loss", "nce", "cluster")
        self.table: torch.Tensor | None = None
        if c.clusters_csv:
            paths = None
            if cfg.data.backend in ("reference", "dali"):
                from pipelines.reference import scan_image_folder

                paths = [p for p, _ in scan_image_folder(cfg.data.train_dir)[0]]
            self.table = load_cluster_csv(c.clusters_csv, c.cluster_column, c.key_column, num_samples, paths,
                                          cfg.data.train_dir).to(ctx.device)
        elif c.kmeans_k > num_samples:
            raise ConfigError(f"loss.clinfonce.kmeans_k={c.kmeans_k} exceeds the {num_samples} training samples; lower it")

    def on_epoch_start(self, epoch, start_step):
        c = self.cfg.loss.clinfonce
        if c.clusters_csv or (start_step > 0 and self.table is not None):
            return
        if self.table is None or epoch % c.kmeans_every == 0:
            self.table = self.kmeans_table(epoch)

    @torch.no_grad()
    def kmeans_table(self, epoch: int) -> torch.Tensor:
        """K-means of the head-1 embeddings of every training sample (evaluation transform)."""
        from pipelines import build_train_eval_loader
        from wcl_fast.knn import gather_variable

        cfg, model, device = self.cfg, self.model, self.ctx.device
        loader, count = build_train_eval_loader(cfg, cfg.knn.batch_size, self.ctx.rank, self.ctx.world_size)
        was_training = model.training
        model.eval()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        parts, index = [], []
        for batch in loader:
            if batch.globals.shape[0] == 0:  # only unreadable images (left out; training never draws them)
                continue
            batch = batch.to(device, cfg.model.channels_last)
            with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                parts.append(model.embed(batch.globals)[0].float())
            index.append(batch.index)
        model.train(was_training)
        z, index = gather_variable(torch.cat(parts)), gather_variable(torch.cat(index))
        assert z.shape[0] <= count and index.unique().numel() == z.shape[0], "each training image embedded once"
        order = index.argsort()
        z, index = z[order], index[order]
        readable, _ = spherical_kmeans(z, cfg.loss.clinfonce.kmeans_k, cfg.loss.clinfonce.kmeans_iters,
                                       seed=cfg.train.seed * 1_000_003 + epoch)
        # unreadable images have no embedding; their ids never reach a training batch (the loaders
        # substitute the next readable sample and report its id), so cluster 0 is never read for them
        assign = torch.zeros(count, dtype=readable.dtype, device=readable.device)
        assign[index] = readable
        if self.ctx.world_size > 1:  # one table for every rank
            torch.distributed.broadcast(assign, src=0)
        return assign

    def losses(self, ddp, batch, step, total_steps, autocast):
        cfg = self.cfg
        with autocast():
            z_global, u_global, z_local, u_local = ddp(batch.globals, batch.locals)
        clusters = self.table[wdist.gather_rows(batch.index)]  # [N]
        z1, z2 = z_global.chunk(2)
        z1_all, z2_all = self._gather(z1, z2)
        offset = self.ctx.rank * z1.shape[0]
        if cfg.loss.clinfonce.form == "single":
            loss = clinfonce_loss(z1, z2, z1_all, z2_all, clusters, offset, cfg.loss.tau, z_local, cfg.loss.clinfonce.base_tau)
            return {"loss": loss}
        u1, u2 = u_global.chunk(2)
        u1_all, u2_all = self._gather(u1, u2)
        terms = wcl_loss_terms(z1, z2, u1, u2, z1_all, z2_all, u1_all, u2_all, offset=offset, tau=cfg.loss.tau,
                               z_local=z_local, u_local=u_local, labels=(clusters, clusters))
        return {"loss": terms.nce + cfg.loss.graph_weight * terms.graph, "nce": terms.nce, "cluster": terms.graph}

    def state_dict(self):
        return {"clusters": self.table}

    def load_state_dict(self, state):
        if not self.cfg.loss.clinfonce.clusters_csv and state.get("clusters") is not None:
            self.table = state["clusters"].to(self.ctx.device)


class MomentumObjective(Objective):
    """Shared by the queue form of CO2 and by SLR: EMA key encoder + key queue."""

    def __init__(self, cfg, model, ctx, num_samples):
        super().__init__(cfg, model, ctx, num_samples)
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


class CO2Objective(MomentumObjective):
    term_names = ("loss", "nce", "co2")

    def __init__(self, cfg, model, ctx, num_samples):
        if cfg.loss.co2.form == "queue":
            super().__init__(cfg, model, ctx, num_samples)
        else:  # batch form: no key encoder, no queue
            Objective.__init__(self, cfg, model, ctx, num_samples)

    def guarded_buffers(self):
        return super().guarded_buffers() if self.cfg.loss.co2.form == "queue" else Objective.guarded_buffers(self)

    def after_step(self, ok=None):
        if self.cfg.loss.co2.form == "queue":
            super().after_step(ok)

    def state_dict(self):
        return super().state_dict() if self.cfg.loss.co2.form == "queue" else {}

    def load_state_dict(self, state):
        if self.cfg.loss.co2.form == "queue":
            super().load_state_dict(state)

    def losses(self, ddp, batch, step, total_steps, autocast):
        cfg = self.cfg
        tau, c = cfg.loss.tau, cfg.loss.co2
        if c.form == "batch":
            with autocast():
                z_global, _, z_local, _ = ddp(batch.globals, batch.locals)
            z1, z2 = z_global.chunk(2)
            z1_all, z2_all = self._gather(z1, z2)
            offset = self.ctx.rank * z1.shape[0]
            nce = nce_rows(z1, z2, z1_all, z2_all, offset, tau, z_local).mean()
            reg = co2_batch_consistency(z1, z2, z1_all, z2_all, offset, c.tau_con)
        else:
            k1, k2 = self.key_embeddings(batch.globals, autocast)
            with autocast():
                z_global, _, z_local, _ = ddp(batch.globals, batch.locals)
            z1, z2 = z_global.chunk(2)
            queue = self.queue.keys
            nce_parts, reg_parts = [], []
            for q, k in self.pairs(z1, z2, k1, k2):
                n_rows, r_rows = co2_queue_terms(q, k, queue, tau, c.tau_con)
                nce_parts.append(n_rows)
                reg_parts.append(r_rows)
            if z_local is not None and z_local.shape[0] > 0:  # local crops: extra queries of view 2's key
                nce_parts.append(queue_infonce_rows(z_local, k2.repeat(z_local.shape[0] // k2.shape[0], 1), queue, tau))
            nce, reg = torch.cat(nce_parts).mean(), torch.cat(reg_parts).mean()
            self._pending = wdist.gather_rows(k2)
        return {"loss": nce + c.alpha * reg, "nce": nce, "co2": reg}


class SLRObjective(MomentumObjective):
    term_names = ("loss", "nce", "mix")

    def losses(self, ddp, batch, step, total_steps, autocast):
        cfg = self.cfg
        s, tau = cfg.loss.slr, cfg.loss.tau
        mu = mu_at(step, total_steps, s.mu_start, s.mu_end)
        k1, k2 = self.key_embeddings(batch.globals, autocast)
        x1, x2 = batch.globals.chunk(2)
        b = x1.shape[0]
        offset = self.ctx.rank * b
        columns = torch.arange(b, device=x1.device) + offset
        image_pairs = [(x1, x2), (x2, x1)] if cfg.loss.momentum.symmetric else [(x1, x2)]
        draws = [tuple(_to_device(t, x1.device) for t in mixup_draw(b, s.kappa, cfg.train.seed, step, self.ctx.rank, stream))
                 for stream in range(len(image_pairs))]
        mixed = torch.cat([momentum_mixup(xq, xk, theta, partner)
                           for (xq, xk), (theta, partner) in zip(image_pairs, draws)])
        with autocast():
            z_global, _, z_local, _, z_mix = ddp(batch.globals, batch.locals, mixed)
        z1, z2 = z_global.chunk(2)
        queue = self.queue.keys
        onehot_parts, mix_parts = [], []
        for j, ((q, k), q_mix, (theta, partner)) in enumerate(zip(self.pairs(z1, z2, k1, k2), z_mix.float().chunk(len(draws)), draws)):
            keys = torch.cat([wdist.gather_rows(k), queue])  # B = batch positive keys + queue [N + K, D]
            ybar = refinery_targets(k, keys, columns, mu, tau, s.tau_prime)
            extra = z_local if j == 0 else None
            extra_columns = columns.repeat(z_local.shape[0] // b) if extra is not None else None
            o_rows, m_rows = slr_terms(q, q_mix, keys, columns, ybar, theta, partner, tau, extra, extra_columns)
            onehot_parts.append(o_rows)
            mix_parts.append(m_rows)
        nce, mix = torch.cat(onehot_parts).mean(), torch.cat(mix_parts).mean()
        self._pending = wdist.gather_rows(k2)
        return {"loss": (1 - s.lam) * nce + s.lam * mix, "nce": nce, "mix": mix}


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without a synchronising copy (pinned memory, non-blocking on CUDA)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


OBJECTIVES = {"wcl": WCLObjective, "simclr": SimCLRObjective, "clinfonce": ClInfoNCEObjective,
              "co2": CO2Objective, "slr": SLRObjective}


def build_objective(cfg: Config, model: torch.nn.Module, ctx: wdist.DistContext, num_samples: int) -> Objective:
    return OBJECTIVES[cfg.loss.objective](cfg, model, ctx, num_samples)


def autocast_factory(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)
