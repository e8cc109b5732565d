"""WCL pre-training: `torchrun --nproc_per_node N -m wcl_fast.train --config configs/X.yaml [key=value ...]`.

One loop, top to bottom: config -> loader -> model + LARS (+ resume) -> channels-last / SyncBN / DDP ->
epochs of steps (the objective's losses, backward, the LARS step, the objective's state update) ->
per-epoch atomic checkpoints -> kNN monitor. The step never synchronises with the host: loss values are
accumulated on the device (wcl_fast.log.StepMeter) and read (`# sync point`) every `train.log_interval`
steps only. Homes of the rest: resume and checkpoints in wcl_fast/checkpoint.py, model wrapping in
wcl_fast/dist.py, signals in wcl_fast/signals.py, the objectives in wcl_fast/objectives/.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from wcl_fast import dist as wdist
from wcl_fast.checkpoint import (CHECKPOINT_NAME, Checkpointer, CheckpointWriteError, NonFiniteError, RunLock,
                                 remove_stale_temporaries, resolve_resume, resume, resume_probe)
from wcl_fast.cli import command, config_arguments
from wcl_fast.config import Config, ConfigError, check_out_dir, check_paths, load_config, to_yaml
from wcl_fast.log import RunLogger, StepMeter, diagnostics_suffix, provenance, use_progress_bar
from wcl_fast.model import build_model
from wcl_fast import objectives
from wcl_fast.optim import LARS, base_learning_rate, build_optimizer, learning_rate
from wcl_fast.probe import OnlineProbe
from wcl_fast.runtime import autocast_dtype
from wcl_fast.signals import EXIT_DATA, StopRequest, end_loader_workers, final_line, requeue_slurm_job, run_program

# exit codes of main(): 0 finished or stopped by a signal with a checkpoint (resume=auto continues),
# 2 user error (config, paths, checkpoint), 3 non-finite training stopped, 4 a checkpoint write failed,
# 5 the device ran out of memory (the last checkpoint is intact; docs/memory.md), 6 the training data could
# not be read (a read past data.read_timeout, named; unreadable data; a loader worker killed), 128 + N
# aborted by a second signal N; 1 an unexpected error (its traceback, then one line). Every exit but 0 and 2
# ends the loader's worker processes and threads, however they are blocked (docs/running.md, faults).
EXIT_NONFINITE, EXIT_WRITE, EXIT_OOM = 3, 4, 5


class OutOfMemory(RuntimeError):
    """The device ran out of memory in a step or the monitor; its message is the one line main() prints."""


def device_memory(cfg: Config, device: torch.device) -> tuple[int, str]:
    """(bytes per GPU the memory plan may use, where that number comes from): train.gpu_memory when set,
    else the smallest total memory of the ranks' devices (every rank must choose the same plan), else
    0 (the CPU: no budget)."""
    from wcl_fast.memory import GiB

    if cfg.train.gpu_memory > 0:
        return int(cfg.train.gpu_memory * GiB), f"train.gpu_memory={cfg.train.gpu_memory:g}"
    if device.type != "cuda":
        return 0, "the CPU (no device memory to plan for; train.gpu_memory sets one)"
    props = torch.cuda.get_device_properties(device)
    total = torch.tensor([props.total_memory], dtype=torch.int64, device=device)
    if wdist.world_size() > 1:
        import torch.distributed as dist

        dist.all_reduce(total, op=dist.ReduceOp.MIN)
    return int(total.item()), props.name  # sync point (once, before training)


def memory_plan(cfg: Config, ctx: wdist.DistContext, logger: RunLogger):
    """The activation-checkpointing plan of model.activation_checkpointing (auto: chosen for the budget
    of device_memory) and, where there is a budget, its traced estimate, printed by rank 0 beside the
    device's memory before the first step. Returns (parsed plan, Plan or None)."""
    from wcl_fast import plan as wplan
    from wcl_fast.config import parse_checkpointing
    from wcl_fast.memory import GiB

    budget, source = device_memory(cfg, ctx.device)
    text = cfg.model.activation_checkpointing
    if budget <= 0:
        if text == "auto":
            logger.info(f"activation checkpointing auto: none on {source}")
        return parse_checkpointing("none" if text == "auto" else text, cfg.model.arch), None
    plan = wplan.resolve(cfg, ctx.world_size, budget)
    title = f"(model.activation_checkpointing={text})"
    logger.info(f"{wplan.format_plan(plan, cfg, title)}\n"
                f"device memory: {budget / GiB:.1f} GiB per GPU ({source})")
    if not plan.fits:
        logger.info(f"warning: the memory plan does not fit {budget / GiB:.1f} GiB per GPU; the run may end out of "
                    f"memory (exit code {EXIT_OOM})")
    logger.scalars(0, {"memory_plan": plan.text, "memory_estimate_gib": plan.total / GiB,
                       "memory_budget_gib": budget / GiB})
    return plan.checkpointing, plan


def out_of_memory_message(exc: BaseException, plan, cfg: Config, device: torch.device, where: str,
                          checkpoint: str) -> str:
    """One line: what was being allocated, the plan's estimate, the device's memory, the keys to change."""
    import re

    from wcl_fast.memory import GiB

    asked = re.search(r"Tried to allocate ([0-9.]+ [KMGT]?i?B)", str(exc))
    what = f"allocating {asked.group(1)}" if asked else str(exc).splitlines()[0][:160]
    if device.type == "cuda":
        have = f"{torch.cuda.get_device_properties(device).total_memory / GiB:.1f} GiB"
    else:
        have = "the host's memory"
    estimate = (f"the memory plan estimated {plan.total / GiB:.1f} GiB per GPU with activation checkpointing "
                f"'{plan.text}'" if plan is not None else
                f"no memory plan was traced (activation checkpointing '{cfg.model.activation_checkpointing}')")
    return (f"out of memory {where} while {what}; {estimate}, the device has {have}. Set "
            f"model.activation_checkpointing=auto with train.gpu_memory=<a few GiB less than the device> "
            f"(or =all), or lower data.batch_size (python -m wcl_fast.plan shows the plans); {checkpoint}")


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


def train_step(objective, ddp, batch, step: int, total_steps: int, autocast, optimizer, scaler=None):
    """One optimisation step: the objective's losses, backward, the optimizer step (through the fp16
    GradScaler when given and enabled), the objective's after-step update. Returns (terms, ok): the loss
    terms (device tensors) and, with the optimizer's NaN guard, a device bool saying whether the step was taken.

    A skipped step leaves no trace: parameters and momentum stay (LARS skip_nonfinite), the buffers the
    forward pass changed (BatchNorm statistics) are put back, the EMA keys and queue are not advanced.
    A step the GradScaler finds inf gradients in counts as skipped, and so does one whose forward pass
    left non-finite BatchNorm statistics (optimizer.precondition).

    fp16: GradScaler.step would read its inf flag on the host (`.item()`, a sync every step). With LARS the
    step runs GradScaler.unscale_ (the inf check and the unscaling on the device), hands the flag to LARS as
    its precondition (a device-side skip, with or without the NaN guard) and GradScaler.update (halve the
    scale on inf, grow it after growth_interval good steps, on the device): the parameters, momentum and
    scale of GradScaler.step's path, without the host read. Other optimizers go through GradScaler.step."""
    guard = getattr(optimizer, "skip_nonfinite", False)
    buffers = objectives.BufferGuard(objective.guarded_buffers()) if guard else None
    terms = objective.losses(ddp, batch, step, total_steps, autocast)
    optimizer.zero_grad(set_to_none=True)
    precondition = None
    if guard:
        optimizer.last_step_ok = None
        precondition = buffers.all_finite()  # e.g. a running_var that overflowed with finite grads
        optimizer.precondition = precondition
    if scaler is not None and scaler.is_enabled():
        scaler.scale(terms["loss"]).backward()
        if isinstance(optimizer, LARS):
            scaler.unscale_(optimizer)
            finite = torch.stack(list(scaler._found_inf_per_device(optimizer).values())).sum() == 0
            optimizer.precondition = finite if precondition is None else finite & precondition
            optimizer.step()
            optimizer.precondition = precondition  # the inf flag belongs to this step only
        else:
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
    objective.after_step(ok)
    observe = getattr(objective, "observe", None)  # objectives.Objective's; a stand-in objective may have none
    if observe is not None:
        observe(batch)  # device-side diagnostics of this step (docs/diagnostics.md)
    return terms, ok


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
    from pipelines import build_loader, resolve_backend

    device, out_dir = ctx.device, Path(cfg.train.out_dir)
    resume_path = resolve_resume(cfg)
    torch.manual_seed(cfg.train.seed)
    logger = RunLogger(out_dir, ctx.is_main, cfg.train.tensorboard)
    choice = resolve_backend(cfg)  # data.backend=auto -> the concrete loader, in cfg from here on
    origin = provenance(device, ctx.world_size, wdist.gather_names if ctx.distributed else None)  # collective
    if ctx.is_main:
        start_run_folder(cfg, ctx, logger, choice, origin)
    check_similarity_backend(cfg, device)
    warn_cpu_bf16(cfg, device, logger)

    loader = build_loader(cfg, "train", ctx.rank, ctx.world_size)
    steps_per_epoch = len(loader)
    total_steps = cfg.train.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    base_lr = base_learning_rate(cfg.optim, cfg.data.batch_size)

    if device.type == "cuda":  # fixed training shapes: cuDNN picks its fastest algorithms once (docs/memory.md §6)
        torch.backends.cudnn.benchmark = True
    checkpointing, plan = memory_plan(cfg, ctx, logger)
    model = build_model(cfg.model, two_heads=objectives.two_heads(cfg), checkpointing=checkpointing)
    guard = cfg.train.max_bad_steps > 0
    optimizer = build_optimizer(model, cfg.optim, skip_nonfinite=guard)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    state, start_epoch, start_step, global_step = None, 0, 0, 0
    if resume_path is not None:
        state, start_epoch, start_step, global_step = resume(resume_path, cfg, model, optimizer, scaler, steps_per_epoch,
                                                             getattr(loader, "identity", None))
        logger.info(f"resumed from {resume_path}: epoch {start_epoch}, step {start_step}, global step {global_step}")
    model, ddp = wdist.wrap_model(model, optimizer, cfg.model, ctx)
    objective = objectives.build_objective(cfg, model, ctx, training_set(cfg, ctx, loader.num_samples))
    if state is not None:
        objective.load_state_dict(state.get("objective", {}))
    probe = OnlineProbe.build(cfg, model, device)  # train.online_probe (wcl_fast/probe.py); None when off
    if probe is not None and state is not None:
        resume_probe(probe, state, resume_path, logger.info)
    autocast = objectives.autocast_factory(device, autocast_dtype(cfg.train.precision))
    checkpoints = Checkpointer(out_dir / CHECKPOINT_NAME, cfg, ctx, steps_per_epoch, model, optimizer, scaler, objective,
                               last_good=(resume_path, start_epoch, start_step, global_step) if state else None,
                               probe=probe, data_identity=getattr(loader, "identity", None))
    meter = StepMeter(logger, objective.term_names, device, cfg.data.batch_size, cfg.train.epochs, steps_per_epoch,
                      global_step, sources=(objective.diagnostics, probe))
    from pipelines.images import reads_in_flight

    stop = StopRequest(ctx.distributed, ctx.rank, every_s=60.0 * cfg.train.checkpoint_every_minutes,
                       reads=reads_in_flight, read_timeout=cfg.data.read_timeout, last_good=checkpoints.last_good_text)
    stop.install()
    by_signal = False

    if start_step >= steps_per_epoch:
        start_epoch, start_step = start_epoch + 1, 0
    stop_at = cfg.train.stop_at_step if cfg.train.stop_at_step > 0 else None
    stopped = stop_at is not None and global_step >= stop_at
    first_step, summary = global_step, {"steps_per_epoch": steps_per_epoch}
    logger.scalars(global_step, {"loader": choice.backend, "loader_requested": choice.requested,
                                 "loader_reason": choice.reason, **origin})
    where = "before the first step"  # named in an out-of-memory message
    show_bar = ctx.is_main and use_progress_bar(cfg.train.progress)  # off a terminal: one plain line per interval
    wall_start = time.perf_counter()
    ddp.train()
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            if stopped:
                break
            where = f"at the start of epoch {epoch} (the objective's epoch hook)"
            objective.on_epoch_start(epoch, start_step)
            batches = loader.epoch(epoch, start_step)
            bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch}", disable=not show_bar,
                       dynamic_ncols=True, leave=False)
            step_in_epoch = start_step
            while step_in_epoch < steps_per_epoch:
                where = f"in global step {global_step + 1}"
                batch = meter.next_batch(batches).to(device, cfg.model.channels_last)
                lr = learning_rate(global_step, base_lr, warmup_steps, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                terms, ok = train_step(objective, ddp, batch, global_step, total_steps, autocast, optimizer, scaler)
                if probe is not None:
                    probe.step(batch)  # on the detached features of this step's forward
                meter.add(terms, ok)
                global_step += 1
                step_in_epoch += 1
                bar.update(1)

                signalled = stop.poll(global_step)  # the same answer on every rank at this step
                by_signal = by_signal or signalled
                stopped = signalled or (stop_at is not None and global_step >= stop_at)
                if global_step % cfg.train.log_interval == 0 or step_in_epoch == steps_per_epoch or stopped:
                    record = meter.log(global_step, epoch, step_in_epoch, lr, bar if show_bar else None,
                                       objective.interval_values())  # sync point
                    summary.update(record)
                    if record.get("knn_unconverged", 0) > 0:
                        logger.info(f"warning: {record['knn_unconverged']:.0f} knn labellings did not converge within "
                                    f"{objectives.KNN_LABEL_BLOCKS} blocks (components split, never merged)")
                    if signalled:
                        logger.info(f"stop requested ({stop.signal_name or 'signal on another rank'}): writing a "
                                    f"checkpoint at global step {global_step} and exiting; train.resume=auto continues")
                    if guard and meter.skipped_in_row >= cfg.train.max_bad_steps:
                        raise NonFiniteError(
                            f"{meter.skipped_in_row:.0f} steps in a row had non-finite gradients or BatchNorm statistics "
                            f"(step {global_step}, {meter.skipped_total:.0f} skipped in all); they changed no saved "
                            f"state, and {checkpoints.last_good_text()}. Lower optim.base_lr, try "
                            f"train.precision=fp32, or check the data")
                if stopped:
                    break
                if stop.save_due and step_in_epoch < steps_per_epoch:  # train.checkpoint_every_minutes
                    checkpoints.save(epoch, step_in_epoch, global_step)
                    stop.saved()
            bar.close()
            if stopped:
                checkpoints.save(epoch, step_in_epoch, global_step)
                if by_signal and ctx.is_main and global_step < total_steps:
                    requeue_slurm_job(logger.info)  # under SLURM: the same job continues after its time limit
                break
            start_step = 0
            checkpoints.save(epoch + 1, 0, global_step)
            stop.saved()
            where = f"in the kNN monitor after epoch {epoch}"
            end_of_epoch(cfg, ctx, model, logger, epoch, global_step, summary, checkpoints.path, probe)
    except torch.cuda.OutOfMemoryError as exc:  # nothing is written: the last checkpoint stays as it was
        stop.restore(wait=False)
        raise OutOfMemory(out_of_memory_message(exc, plan, cfg, device, where, checkpoints.last_good_text())) from None
    except BaseException as exc:
        stop.restore(wait=False)  # other ranks may not reach the reduction in flight
        from pipelines.pil import loader_failure, DataStop

        failure = loader_failure(exc)  # unreadable data, a dead loader worker: one line, exit EXIT_DATA
        if failure is not None:
            raise DataStop(f"{failure}; {checkpoints.last_good_text()}") from None
        raise
    stop.restore()
    wall = time.perf_counter() - wall_start
    summary.update(global_step=global_step, wall_s=wall, failed_images=meter.failed_images,
                   mean_samples_per_s=(global_step - first_step) * cfg.data.batch_size / max(wall, 1e-9))
    if cfg.knn.at_end and not stopped:
        try:
            run_knn(cfg, model, device, logger, global_step, summary, probe)
        except torch.cuda.OutOfMemoryError as exc:
            raise OutOfMemory(out_of_memory_message(exc, plan, cfg, device, "in the final kNN monitor",
                                                    checkpoints.last_good_text())) from None
    logger.close()
    return summary


def training_set(cfg: Config, ctx, num_samples: int) -> objectives.TrainingSet:
    """What the objective may know of the training data: its size, its paths (ImageFolder loaders) and a
    function embedding it under the evaluation transform (K-means Cl-InfoNCE)."""

    def paths():
        if cfg.data.backend not in ("reference", "dali") or cfg.data.dataset != "imagefolder":
            return None
        from pipelines.images import scan_image_folder

        return [p for p, _ in scan_image_folder(cfg.data.train_dir)[0]]

    @torch.no_grad()
    def embed(model):
        from pipelines import build_train_eval_loader
        from wcl_fast.evaluation import gather_variable
        from wcl_fast.runtime import autocast

        loader, _ = build_train_eval_loader(cfg, cfg.knn.batch_size, ctx.rank, ctx.world_size)
        was_training, dtype = model.training, autocast_dtype(cfg.train.precision)
        model.eval()
        parts, index = [], []
        for batch in loader:
            if batch.globals.shape[0] == 0:  # only unreadable images (left out; training never draws them)
                continue
            batch = batch.to(ctx.device, cfg.model.channels_last)
            with autocast(ctx.device, dtype):
                parts.append(model.embed(batch.globals)[0].float())  # head 1 [B, D]
            index.append(batch.index)
        model.train(was_training)
        return gather_variable(torch.cat(parts)), gather_variable(torch.cat(index))

    return objectives.TrainingSet(num_samples, paths, embed)


def start_run_folder(cfg: Config, ctx, logger: RunLogger, choice, origin: dict) -> None:
    """Rank 0: create out_dir, remove temporaries of interrupted checkpoint writes, write config.yaml
    (headed by the loader choice and the provenance) and print the resolved config."""
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    removed, size = remove_stale_temporaries(out_dir, (CHECKPOINT_NAME,))
    if removed:
        logger.info(f"removed {removed} temporary file(s) of interrupted checkpoint writes ({size / 2**20:.1f} MB)")
    origin_lines = "".join(f"# {key}: {value}\n" for key, value in origin.items())
    (out_dir / "config.yaml").write_text(f"# {choice.describe()}\n{origin_lines}{to_yaml(cfg)}")
    logger.info(f"wcl-fast {origin['wcl_fast']} (git {origin['git_commit']}), torch {origin['torch']} (CUDA {origin['cuda']}), "
                f"DALI {origin['dali']}, FFCV {origin['ffcv']}; {', '.join(origin['devices'])}\n"
                f"world size {ctx.world_size}, device {ctx.device}, precision {cfg.train.precision}\n"
                f"--- resolved config (saved to {out_dir / 'config.yaml'}) ---\n{to_yaml(cfg)}---\n"
                f"{choice.describe()}")
    if choice.warning:
        logger.info(choice.warning)


def warn_cpu_bf16(cfg: Config, device: torch.device, logger: RunLogger) -> None:
    """CPU bf16 with crops that reach the last ResNet stage at 1 x 1: a torch CPU kernel issue (README)."""
    smallest = min([cfg.data.global_size] + ([cfg.data.local_size] if cfg.data.local_crops else []))
    if device.type == "cpu" and cfg.train.precision == "bf16" and smallest // (16 if cfg.model.stem == "imagenet" else 4) < 2:
        logger.info(f"warning: {smallest}px crops reach the last ResNet stage at 1x1; on CPU, bf16 weight gradients of "
                    f"its stride-2 conv are intermittently NaN there (torch CPU kernel issue). Use larger crops or "
                    f"train.precision=fp32.")


def end_of_epoch(cfg: Config, ctx, model, logger: RunLogger, epoch: int, global_step: int, summary: dict,
                 checkpoint: Path, probe=None) -> None:
    """After an epoch's checkpoint: the replica check across ranks, the epoch line, the periodic kNN monitor."""
    divergence = wdist.replica_divergence(model)
    logger.scalars(global_step, {"replica_divergence": divergence})
    if divergence != 0.0:
        logger.info(f"warning: parameters differ across ranks (max checksum difference {divergence:.3e})")
    if ctx.is_main:
        logger.info(f"epoch {epoch} done: loss {summary.get('loss', float('nan')):.4f}, "
                    f"{summary.get('samples_per_s', 0):.1f} samples/s, checkpoint {checkpoint}"
                    f"{diagnostics_suffix(summary)}")  # the last interval's weak labels, collapse, probe
    if cfg.knn.every_epochs > 0 and (epoch + 1) % cfg.knn.every_epochs == 0 and epoch + 1 < cfg.train.epochs:
        run_knn(cfg, model, ctx.device, logger, global_step, summary, probe)


def run_knn(cfg: Config, model, device, logger: RunLogger, step: int, summary: dict, probe=None) -> None:
    """The kNN monitor and, with train.online_probe, the probe's validation top-1 beside it."""
    from wcl_fast.knn import evaluate_knn

    result = evaluate_knn(model.net, cfg, device)
    summary["knn_top1"], summary["knn_top5"] = result["top1"], result["top5"]
    logger.scalars(step, {"knn_top1": result["top1"], "knn_top5": result["top5"], "knn_count": result["count"],
                          "knn_unreadable": result["skipped"]})
    logger.info(f"kNN monitor (k={cfg.knn.k}, T={cfg.knn.temperature}, {result['count']} test images): "
                f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%")
    if probe is not None:
        probed = probe.evaluate(cfg, model.net, device)
        summary["probe_val_top1"] = probed["top1"]
        logger.scalars(step, {"probe_val_top1": probed["top1"]})
        logger.info(f"online linear probe ({probed['count']} test images): top-1 {probed['top1']:.2f}%")


def parse_args(argv=None):
    return config_arguments("python -m wcl_fast.train", "Train WCL (Zheng et al., ICCV 2021)",
                            "key=value overrides, e.g. train.epochs=100 data.batch_size=1024", argv)


@command  # a ConfigError anywhere: one line, exit 2
def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    check_paths(cfg)
    resolve_resume(cfg)
    ctx = wdist.init_distributed()
    try:
        train(cfg, ctx)
    except BaseException as exc:
        end_loader_workers()  # none may outlive the run, or hold its exit: one may be blocked in a read
        code, line = exit_status(exc)
        if code is None:
            raise  # a user error (command: exit 2) or an unexpected one (run_program: the traceback, one line)
        final_line(line)
        return code
    return 0


def exit_status(exc: BaseException) -> tuple[int | None, str]:
    """(main()'s exit code, its one line) for an exception that ends training; (None, "") when it propagates."""
    from pipelines.images import DataStop

    if isinstance(exc, NonFiniteError):
        return EXIT_NONFINITE, str(exc)
    if isinstance(exc, CheckpointWriteError):
        return EXIT_WRITE, str(exc.strerror or exc)
    if isinstance(exc, OutOfMemory):
        return EXIT_OOM, str(exc)
    if isinstance(exc, DataStop):
        return EXIT_DATA, str(exc)
    if isinstance(exc, KeyboardInterrupt):  # Abort (a second signal), or SIGINT before the handlers were installed
        import signal

        signum = getattr(exc, "signum", signal.SIGINT)
        return 128 + signum, str(exc) or f"interrupted by {signal.Signals(signum).name} outside the training loop"
    import re

    lost = re.search(r"Connection (?:closed|reset) by peer(?: \[[^\]]*\]:\d+)?", str(exc)) if isinstance(exc, RuntimeError) else None
    if lost is not None and wdist.world_size() > 1:  # a collective whose peer process is gone: its own line says why
        return 1, (f"lost the connection to another rank, which ended first (its own error line says why): "
                   f"{lost.group(0)}; checkpoints are written whole, so the last one is intact")
    return None, ""


if __name__ == "__main__":
    run_program(main)
