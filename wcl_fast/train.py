"""WCL pre-training: `torchrun --nproc_per_node N -m wcl_fast.train --config configs/X.yaml [key=value ...]`.

One loop, top to bottom: config -> process group -> model (channels-last, SyncBN on CUDA, DDP) ->
LARS -> loader -> resume -> epochs of steps (autocast, objective loss, backward, LARS step) -> per-epoch
atomic checkpoints -> kNN monitor. The step never synchronises with the host: loss values are
accumulated on the device and read (`# sync point`) only every `train.log_interval` steps.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from wcl_fast import dist as wdist
from wcl_fast.cli import ArgumentParser, EXIT_USER
from wcl_fast.checkpoint import (CheckpointError, CheckpointWriteError, RunLock, atomic_save, describe_model,
                                 load_checkpoint, load_weights, remove_stale_temporaries, rng_state, set_rng_state)
from wcl_fast.config import Config, ConfigError, check_out_dir, check_paths, load_config, to_dict, to_yaml
from wcl_fast.log import RunLogger, format_duration, interval_line, provenance, use_progress_bar
from wcl_fast.model import build_model
from wcl_fast.objectives import runner as objectives
from wcl_fast.objectives.runner import KNN_LABEL_BLOCKS, compute_loss  # noqa: F401 (re-exported)
from wcl_fast.optim import base_learning_rate, build_optimizer, learning_rate

CHECKPOINT_NAME = "checkpoint.pt"
# keys a resumed run must share with its checkpoint: they change the model's tensors, the optimisation
# problem or the objective's state; a change would resume silently into another experiment
RESUME_KEYS = ("data.batch_size", "model.arch", "model.stem", "model.widths", "model.head_hidden", "model.head_out",
               "loss.objective", "loss.co2.form", "loss.clinfonce.form", "loss.momentum.queue_size")
# exit codes of main(): 0 finished or stopped by a signal with a checkpoint (resume=auto continues),
# 2 user error (config, paths, checkpoint), 3 non-finite training stopped, 4 a checkpoint write failed
EXIT_NONFINITE, EXIT_WRITE = 3, 4


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with NaN/inf gradients (train.max_bad_steps)."""


class StopRequest:
    """SIGINT / SIGTERM: checkpoint at the next step boundary, then exit 0.

    Clusters signal the whole process group (SLURM, timeout, container runtimes) and torchrun's agent
    forwards the signal it got to its workers, so one stop often arrives two or three times within a
    moment: every signal within `REPEAT_WINDOW_S` of the first is the same request. A signal after
    that aborts at once (KeyboardInterrupt), for a user who really wants out.

    `poll()` is called by every rank after every step and answers the same on all ranks at the same
    step: each rank's flag goes into an asynchronous all-reduce on a CPU (gloo) group, read one step
    later, so no rank waits on it and the answer is one step late at most."""

    REPEAT_WINDOW_S = 5.0

    def __init__(self, distributed: bool = False):
        self.requested = False
        self.first_signal: float | None = None
        self.signal_name = ""
        self._previous = {}
        self._group = torch.distributed.new_group(backend="gloo") if distributed else None
        self._flag = torch.zeros(1)
        self._work = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested and now - self.first_signal > self.REPEAT_WINDOW_S:
            raise KeyboardInterrupt  # a later, deliberate second signal: give up immediately
        if not self.requested:
            self.requested, self.first_signal = True, now
            self.signal_name = signal.Signals(signum).name

    def poll(self) -> bool:
        if self._group is None:
            return self.requested
        agreed = False
        if self._work is not None:
            self._work.wait()
            agreed = bool(self._flag.item() > 0)
        self._flag = torch.tensor([1.0 if self.requested else 0.0])
        self._work = torch.distributed.all_reduce(self._flag, group=self._group, async_op=True)
        return agreed

    def restore(self, wait: bool = True) -> None:
        if self._work is not None and wait:  # every rank left the loop at the same step: one reduction in flight each
            self._work.wait()
        self._work = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _nested(values: dict, key: str):
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            return None
        values = values[part]
    return values


def check_resumable(state: dict, cfg: Config, path: Path) -> None:
    """One CheckpointError if `state` is not a wcl-fast training checkpoint or was written with other
    values of RESUME_KEYS (all differences named)."""
    missing = [key for key in ("model", "optimizer", "config", "global_step") if key not in state]
    if missing:
        raise CheckpointError(f"train.resume: '{path}' is not a wcl-fast training checkpoint (no {', '.join(missing)}); "
                              f"set train.resume=none to start a new run")
    ours = to_dict(cfg)
    differ = [f"{key}={_nested(state['config'], key)!r} there, {_nested(ours, key)!r} here" for key in RESUME_KEYS
              if _nested(state["config"], key) is not None and _nested(state["config"], key) != _nested(ours, key)]
    if differ:
        raise CheckpointError(f"train.resume: checkpoint '{path}' was written with other settings ({'; '.join(differ)}); "
                              f"resume with the checkpoint's values or use a new train.out_dir")


def nonfinite_entries(tree, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a nested dict / list that hold NaN or inf (one host sync)."""
    names, tensors = [], []

    def walk(node, name):
        if torch.is_tensor(node):
            if node.is_floating_point() or node.is_complex():
                names.append(name)
                tensors.append(torch.isfinite(node).all())
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{name}.{key}" if name else str(key))
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{name}[{i}]")

    walk(tree, prefix)
    if not tensors:
        return []
    finite = torch.stack(tensors).tolist()  # sync point (checkpoints only)
    return [name for name, ok in zip(names, finite) if not ok]


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def resolve_resume(cfg: Config) -> Path | None:
    choice = cfg.train.resume
    if choice == "none":
        return None
    if choice == "auto":
        path = Path(cfg.train.out_dir) / CHECKPOINT_NAME
        return path if path.is_file() else None
    path = Path(choice)
    if not path.is_file():
        raise ConfigError(f"train.resume: '{choice}' does not exist; use auto, none or a checkpoint path")
    return path


def check_similarity_backend(cfg: Config, device: torch.device) -> None:
    """loss.similarity_backend must be able to run on this device (kernels.resolve_backend decides)."""
    if cfg.loss.multicrop_rule != "knn":
        return
    import kernels

    try:
        kernels.resolve_backend(cfg.loss.similarity_backend, device)
    except RuntimeError as exc:
        raise ConfigError(f"loss.similarity_backend={cfg.loss.similarity_backend}: {exc}; "
                          f"or use loss.similarity_backend=auto") from None


def train(cfg: Config, ctx: wdist.DistContext | None = None) -> dict:
    """Run (or resume) a training job; returns a summary dict (final losses, throughput, kNN)."""
    ctx = ctx or wdist.init_distributed()
    lock = None
    if ctx.is_main:  # one live run per folder; the lock dies with this process
        check_out_dir(cfg.train.out_dir, "train.out_dir")
        lock = RunLock(cfg.train.out_dir).acquire()
    try:
        return _train(cfg, ctx)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, ctx: wdist.DistContext) -> dict:
    device, main = ctx.device, ctx.is_main
    out_dir = Path(cfg.train.out_dir)
    resume_path = resolve_resume(cfg)
    torch.manual_seed(cfg.train.seed)
    logger = RunLogger(out_dir, main, cfg.train.tensorboard)
    from pipelines import build_loader, resolve_backend

    choice = resolve_backend(cfg)  # data.backend=auto -> the concrete loader, in cfg from here on
    origin = provenance(device, ctx.world_size, gather_names if ctx.distributed else None)  # collective under DDP
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        removed, size = remove_stale_temporaries(out_dir, (CHECKPOINT_NAME,))
        if removed:
            logger.info(f"removed {removed} temporary file(s) of interrupted checkpoint writes ({size / 2**20:.1f} MB)")
        origin_lines = "".join(f"# {key}: {value}\n" for key, value in origin.items())
        (out_dir / "config.yaml").write_text(f"# {choice.describe()}\n{origin_lines}{to_yaml(cfg)}")
        logger.info(f"wcl-fast {origin['wcl_fast']} (git {origin['git_commit']}), torch {origin['torch']} (CUDA {origin['cuda']}), "
                    f"DALI {origin['dali']}, FFCV {origin['ffcv']}; {', '.join(origin['devices'])}\n"
                    f"world size {ctx.world_size}, device {device}, precision {cfg.train.precision}\n"
                    f"--- resolved config (saved to {out_dir / 'config.yaml'}) ---\n{to_yaml(cfg)}---\n"
                    f"{choice.describe()}")
        if choice.warning:
            logger.info(choice.warning)

    check_similarity_backend(cfg, device)
    smallest = min([cfg.data.global_size] + ([cfg.data.local_size] if cfg.data.local_crops else []))
    if device.type == "cpu" and cfg.train.precision == "bf16" and smallest // (16 if cfg.model.stem == "imagenet" else 4) < 2:
        logger.info(f"warning: {smallest}px crops reach the last ResNet stage at 1x1; on CPU, bf16 weight gradients of "
                    f"its stride-2 conv are intermittently NaN there (torch CPU kernel issue). Use larger crops or "
                    f"train.precision=fp32.")

    loader = build_loader(cfg, "train", ctx.rank, ctx.world_size)
    steps_per_epoch = len(loader)
    total_steps = cfg.train.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    base_lr = base_learning_rate(cfg.optim, cfg.data.batch_size)

    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = build_model(cfg.model, two_heads=objectives.two_heads(cfg))
    guard = cfg.train.max_bad_steps > 0
    optimizer = build_optimizer(model, cfg.optim, skip_nonfinite=guard)
    dtype = autocast_dtype(cfg.train.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    start_epoch, start_step, global_step = 0, 0, 0
    last_good = None  # (path, epoch, step in epoch, global step) of the newest checkpoint known to be finite
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        check_resumable(state, cfg, resume_path)
        load_weights(model, state["model"], resume_path, describe_model(to_dict(cfg)["model"]),
                     describe_model(state["config"].get("model", {})))
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_epoch, start_step, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        last_good = (resume_path, start_epoch, start_step, global_step)
        if state.get("steps_per_epoch") not in (None, steps_per_epoch):
            raise ConfigError(f"train.resume: checkpoint '{resume_path}' has {state['steps_per_epoch']} steps per "
                              f"epoch, this run {steps_per_epoch}; resume with the same data and batch size")
        logger.info(f"resumed from {resume_path}: epoch {start_epoch}, step {start_step}, global step {global_step}")
    model.to(device, memory_format=memory_format)
    for buffers in optimizer.state.values():  # optimizer state follows the parameters' device
        for key, value in buffers.items():
            if torch.is_tensor(value):
                buffers[key] = value.to(device)
    if cfg.model.compile:  # compiles on the first step (minutes for ResNet-50); checkpoints keep eager key names
        model.net.compile(mode=cfg.model.compile)
    if ctx.distributed and device.type == "cuda" and cfg.model.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = model
    if ctx.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)

    objective = objectives.build_objective(cfg, model, ctx, loader.num_samples)
    if resume_path is not None:
        objective.load_state_dict(state.get("objective", {}))
    names = objective.term_names  # logged terms, 'loss' first
    autocast = objectives.autocast_factory(device, dtype)

    crash_at = crash_point()
    stop = StopRequest(ctx.distributed)
    stop.install()
    accum = torch.zeros(len(names) + 1, device=device)  # sums of the terms, finite steps since last log (device side)
    bad_steps = torch.zeros(2, device=device)  # skipped non-finite steps: total, current run in a row
    flags = objective.flags  # device-side counters of the objective (knn: unconverged labellings)
    failed_images = 0
    summary: dict = {"steps_per_epoch": steps_per_epoch}
    samples_per_step = cfg.data.batch_size

    def last_good_text() -> str:
        if last_good is None:
            return "no checkpoint of this run was written before that"
        path, epoch, step, g = last_good
        return f"the last good checkpoint is '{path}' (epoch {epoch}, step {step}, global step {g})"

    def save(epoch: int, step_in_epoch: int) -> None:
        """Write the checkpoint on rank 0, never from a state holding NaN/inf; every rank learns the outcome."""
        nonlocal last_good
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "objective": objective.state_dict()}
        bad = nonfinite_entries(state)
        failed = torch.tensor([float(bool(bad)), 0.0])
        error = None
        if main and not bad:
            state.update(epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step,
                         steps_per_epoch=steps_per_epoch, rng=rng_state(), config=to_dict(cfg),
                         world_size=ctx.world_size)
            try:
                atomic_save(state, out_dir / CHECKPOINT_NAME)
            except CheckpointWriteError as exc:
                error, failed[1] = exc, 1.0
        failed = wdist.all_reduce_mean(failed.to(device)).tolist()  # also the barrier after the write
        if failed[0] > 0:
            where = f"{len(bad)} tensors, first '{bad[0]}'" if bad else "on another rank"
            raise NonFiniteError(f"the training state holds NaN/inf values at global step {global_step} ({where}); "
                                 f"no checkpoint was written from it and {last_good_text()}. Lower optim.base_lr, "
                                 f"try train.precision=fp32, or check the data; resume=auto continues from there")
        if failed[1] > 0:
            raise error if error is not None else CheckpointWriteError("rank 0 could not write the checkpoint")
        last_good = (out_dir / CHECKPOINT_NAME, epoch, step_in_epoch, global_step)

    if start_step >= steps_per_epoch:
        start_epoch, start_step = start_epoch + 1, 0
    stopped = cfg.train.stop_at_step > 0 and global_step >= cfg.train.stop_at_step
    first_step = global_step
    logger.scalars(global_step, {"loader": choice.backend, "loader_requested": choice.requested,
                                 "loader_reason": choice.reason, **origin})
    show_bar = main and use_progress_bar(cfg.train.progress)  # off the terminal: one plain line per interval
    wall_start = time.perf_counter()
    last_log_time, data_wait, last_log_step = time.perf_counter(), 0.0, global_step
    ddp.train()
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            if stopped:
                break
            objective.on_epoch_start(epoch, start_step)
            batches = loader.epoch(epoch, start_step)
            bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch}", disable=not show_bar,
                       dynamic_ncols=True, leave=False)
            step_in_epoch = start_step
            while step_in_epoch < steps_per_epoch:
                wait_start = time.perf_counter()
                batch = next(batches)
                data_wait += time.perf_counter() - wait_start
                failed_images += batch.failed
                batch = batch.to(device, cfg.model.channels_last)
                lr = learning_rate(global_step, base_lr, warmup_steps, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                terms = objective.train_step(ddp, batch, global_step, total_steps, autocast, optimizer, scaler)

                if guard and optimizer.last_step_ok is not None:
                    bad = (~optimizer.last_step_ok).to(torch.float32)
                    bad_steps = torch.stack([bad_steps[0] + bad, (bad_steps[1] + bad) * bad])
                # logged means cover finite steps only; an interval with none logs NaN
                step_values = torch.stack([terms[name].detach().float() for name in names])  # [T]
                finite = torch.isfinite(step_values[0])
                accum += torch.cat([torch.where(finite, step_values, torch.zeros_like(step_values)),
                                    finite.to(torch.float32)[None]])
                global_step += 1
                step_in_epoch += 1
                bar.update(1)
                if crash_at is not None and crash_at == (ctx.rank, global_step):
                    os._exit(17)  # fault-injection hook of the elastic-restart test (see crash_point)
                signalled = stop.poll()  # the same answer on every rank at this step
                at_stop = signalled or (cfg.train.stop_at_step > 0 and global_step >= cfg.train.stop_at_step)
                if global_step % cfg.train.log_interval == 0 or step_in_epoch == steps_per_epoch or at_stop:
                    values = wdist.all_reduce_mean(accum).tolist()  # sync point
                    skipped_total, skipped_in_row = bad_steps.tolist()  # sync point (identical on all ranks: DDP grads)
                    count = values[len(names)]
                    if count == 0:  # every step of the interval was non-finite
                        values[:len(names)], count = [float("nan")] * len(names), 1.0
                    now = time.perf_counter()
                    elapsed = now - last_log_time
                    steps = global_step - last_log_step
                    record = {name: values[i] / count for i, name in enumerate(names)}
                    record.update({"lr": lr, "epoch": epoch, "samples_per_s": steps * samples_per_step / elapsed,
                                   "data_wait": data_wait / elapsed, "failed_images": failed_images,
                                   "skipped_steps": skipped_total})
                    logger.scalars(global_step, record)
                    seconds_per_step = elapsed / max(steps, 1)
                    eta_epoch = (steps_per_epoch - step_in_epoch) * seconds_per_step
                    eta_run = (total_steps - global_step) * seconds_per_step
                    if show_bar:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}",
                                        wait=f"{100 * record['data_wait']:.0f}%", run_eta=format_duration(eta_run))
                    else:
                        logger.info(interval_line(epoch, cfg.train.epochs, step_in_epoch, steps_per_epoch, record, names,
                                                  eta_epoch, eta_run))
                    if "unconverged" in flags:
                        record["knn_unconverged"] = float(flags["unconverged"])  # sync point
                        if record["knn_unconverged"] > 0:
                            logger.info(f"warning: {record['knn_unconverged']:.0f} knn labellings did not converge "
                                        f"within {KNN_LABEL_BLOCKS} blocks (components split, never merged)")
                        flags["unconverged"] = 0
                    if not math.isfinite(record["loss"]):
                        logger.info(f"warning: non-finite loss at step {global_step}")
                    summary.update(record)
                    accum.zero_()
                    last_log_time, data_wait, last_log_step = now, 0.0, global_step
                    if signalled:
                        logger.info(f"stop requested ({stop.signal_name or 'signal on another rank'}): writing a "
                                    f"checkpoint at global step {global_step} and exiting; train.resume=auto continues")
                    if guard and skipped_in_row >= cfg.train.max_bad_steps:
                        raise NonFiniteError(
                            f"{skipped_in_row:.0f} steps in a row had non-finite gradients or BatchNorm statistics (step {global_step}, "
                            f"{skipped_total:.0f} skipped in all); they changed no saved state, and "
                            f"{last_good_text()}. Lower optim.base_lr, try train.precision=fp32, or check the data")
                if at_stop:
                    stopped = True
                if stopped:
                    break
            bar.close()
            if stopped:
                save(epoch, step_in_epoch)
                break
            start_step = 0
            save(epoch + 1, 0)
            divergence = replica_divergence(model)
            logger.scalars(global_step, {"replica_divergence": divergence})
            if divergence != 0.0:
                logger.info(f"warning: parameters differ across ranks (max checksum difference {divergence:.3e})")
            if main:
                logger.info(f"epoch {epoch} done: loss {summary.get('loss', float('nan')):.4f}, "
                            f"{summary.get('samples_per_s', 0):.1f} samples/s, checkpoint {out_dir / CHECKPOINT_NAME}")
            if cfg.knn.every_epochs > 0 and (epoch + 1) % cfg.knn.every_epochs == 0 and epoch + 1 < cfg.train.epochs:
                run_knn(cfg, model, device, logger, global_step, summary)
    except BaseException:
        stop.restore(wait=False)  # other ranks may not reach the reduction in flight
        raise
    stop.restore()
    wall = time.perf_counter() - wall_start
    summary.update(global_step=global_step, wall_s=wall, failed_images=failed_images,
                   mean_samples_per_s=(global_step - first_step) * samples_per_step / max(wall, 1e-9))
    if cfg.knn.at_end and not stopped:
        run_knn(cfg, model, device, logger, global_step, summary)
    logger.close()
    return summary


def gather_names(name: str) -> list[str]:
    """Every rank's `name`, in rank order (a collective)."""
    names = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(names, name)
    return names


def crash_point() -> tuple[int, int] | None:
    """Testing hook: WCL_FAST_CRASH_AT="rank:step" kills that rank right after that global step, on the
    first attempt of a torchrun job only (TORCHELASTIC_RESTART_COUNT=0), to test elastic restarts."""
    spec = os.environ.get("WCL_FAST_CRASH_AT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    rank, step = spec.split(":")
    return int(rank), int(step)


def replica_divergence(model: torch.nn.Module) -> float:
    """Largest difference between ranks of per-parameter checksums (0.0 when replicas are in sync)."""
    if wdist.world_size() == 1:
        return 0.0
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()])  # [P]
        low, high = sums.clone(), sums.clone()
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    return float((high - low).abs().max().item())  # sync point (once per epoch)


def run_knn(cfg: Config, model, device, logger: RunLogger, step: int, summary: dict) -> None:
    from wcl_fast.knn import evaluate_knn

    result = evaluate_knn(model.net, cfg, device)
    summary["knn_top1"], summary["knn_top5"] = result["top1"], result["top5"]
    logger.scalars(step, {"knn_top1": result["top1"], "knn_top5": result["top5"], "knn_count": result["count"],
                          "knn_unreadable": result["skipped"]})
    logger.info(f"kNN monitor (k={cfg.knn.k}, T={cfg.knn.temperature}, {result['count']} test images): "
                f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%")


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m wcl_fast.train", description="Train WCL (Zheng et al., ICCV 2021)")
    parser.add_argument("--config", required=True, help="YAML experiment file, e.g. configs/imagenet_wcl_200ep.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=100 data.batch_size=1024")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        cfg = load_config(args.config, args.overrides)
        check_paths(cfg)
        resolve_resume(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER
    ctx = wdist.init_distributed()
    try:
        train(cfg, ctx)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    except CheckpointWriteError as exc:
        print(f"error: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_WRITE
    finally:
        wdist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
