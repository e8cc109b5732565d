"""End-to-end trainer checks on CPU: loss decreases, exact resume, 2-process torchrun, AMP, SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import free_port, no_host_sync
from wcl_fast.config import load_config
from wcl_fast.train import train, train_step

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "cpu_smoke.yaml"


def _cfg(out_dir, *overrides):
    return load_config(SMOKE, [f"train.out_dir={out_dir}", "train.log_interval=1", *overrides])


def _log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def _losses(out_dir):
    return {r["step"]: r["loss"] for r in _log(out_dir) if "loss" in r}


def test_loss_decreases_within_20_steps(tmp_path):
    train(_cfg(tmp_path, "train.epochs=5", "data.local_crops=0"))  # 4 steps per epoch -> 20 steps
    losses = _losses(tmp_path)
    assert len(losses) == 20
    first = sum(losses[s] for s in (1, 2, 3)) / 3
    last = sum(losses[s] for s in (18, 19, 20)) / 3
    assert last < first - 0.5, (first, last)


def test_config_and_first_record_carry_provenance(tmp_path):
    import wcl_fast

    train(_cfg(tmp_path, "train.epochs=1", "data.local_crops=0"))
    first = _log(tmp_path)[0]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert first["git_commit"].split("-dirty")[0] == (head or "unknown")
    assert (first["wcl_fast"], first["torch"], first["world_size"]) == (wcl_fast.__version__, torch.__version__, 1)
    assert first["cuda"] == (torch.version.cuda or "none") and first["devices"][0].endswith(" x 1")
    for key in ("dali", "ffcv"):
        assert first[key]  # a version, or "not installed"
    header = [line for line in (tmp_path / "config.yaml").read_text().splitlines() if line.startswith("# ")]
    assert f"# git_commit: {first['git_commit']}" in header and f"# torch: {torch.__version__}" in header
    assert "# world_size: 1" in header


def test_resume_continues_exactly(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(_cfg(straight, "train.epochs=2"))
    summary = train(_cfg(interrupted, "train.epochs=2", "train.stop_at_step=3"))  # stops mid-epoch 0
    assert summary["global_step"] == 3
    state = torch.load(interrupted / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 3, 3)
    train(_cfg(interrupted, "train.epochs=2", "train.resume=auto"))
    a, b = _losses(straight), _losses(interrupted)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[s] == b[s] for s in a), (a, b)
    final_a = torch.load(straight / "checkpoint.pt", weights_only=False)
    final_b = torch.load(interrupted / "checkpoint.pt", weights_only=False)
    for key, value in final_a["model"].items():
        assert torch.equal(value, final_b["model"][key]), key
    for sa, sb in zip(final_a["optimizer"]["state"].values(), final_b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


@pytest.mark.parametrize("precision,rule", [("bf16", "inherit"), ("fp16", "inherit"), ("bf16", "knn"),
                                            ("fp32", "knn-triton")])
def test_mixed_precision_steps_are_finite(tmp_path, precision, rule):
    # local crops of 32 px: with 16 px the last stage's stride-2 conv sees a 1 x 1 input, where CPU bf16
    # weight gradients are intermittently NaN in torch 2.14 (upstream; see wcl_fast.train's warning)
    # knn-triton: the knn rule on the fused Triton similarity + 1-NN kernel (interpreter on the CPU)
    extra = ["loss.similarity_backend=triton"] if rule.endswith("triton") else []
    summary = train(_cfg(tmp_path, "train.epochs=1", f"train.precision={precision}",
                         f"loss.multicrop_rule={rule.split('-')[0]}", "data.local_size=32", *extra))
    assert summary["global_step"] == 4 and all(torch.isfinite(torch.tensor(l)) for l in _losses(tmp_path).values()), _log(tmp_path)


def test_triton_similarity_backend_on_cpu_needs_the_interpreter(tmp_path, monkeypatch):
    from wcl_fast.config import ConfigError

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="loss.similarity_backend=triton.*TRITON_INTERPRET=1"):
        train(_cfg(tmp_path, "loss.multicrop_rule=knn", "loss.similarity_backend=triton"))


@pytest.mark.parametrize("objective", [
    [],
    ["loss.objective=slr", "loss.momentum.queue_size=96"],  # EMA keys, queue, mixed queries in the DDP call
    ["loss.objective=clinfonce", "loss.clinfonce.kmeans_k=5"],  # K-means over both ranks' shards, broadcast
], ids=["wcl", "slr", "clinfonce"])
def test_two_process_torchrun_keeps_replicas_identical(tmp_path, objective):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "wcl_fast.train", "--config", str(SMOKE), f"train.out_dir={tmp_path}", "train.epochs=2",
         "data.workers=1", "train.log_interval=1", *objective],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _log(tmp_path)
    divergence = [r["replica_divergence"] for r in records if "replica_divergence" in r]
    assert divergence == [0.0, 0.0]
    assert records[0]["world_size"] == 2 and sum(int(d.rsplit(" x ", 1)[1]) for d in records[0]["devices"]) == 2
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8 and all(l == l for l in losses)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["world_size"] == 2 and state["global_step"] == 8


def test_sigterm_writes_a_checkpoint_and_resume_finishes(tmp_path):
    cmd = [sys.executable, "-m", "wcl_fast.train", "--config", str(SMOKE), f"train.out_dir={tmp_path}",
           "train.epochs=50", "train.log_interval=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((tmp_path / "log.jsonl").exists() and len(_losses(tmp_path)) >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "stop requested" in err
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert 2 <= state["global_step"] < 200
    logged = _losses(tmp_path)
    assert max(logged) == state["global_step"]  # the checkpoint holds the last finished step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rule", ["inherit", "knn"])
def test_training_step_has_no_host_sync_on_cuda(rule):
    """Forward, WCL loss (1-NN graph + components), backward and LARS under sync-debug 'error'."""
    from wcl_fast.model import build_model
    from wcl_fast.optim import build_optimizer
    from wcl_fast.objectives.wcl import compute_loss

    cfg = load_config(SMOKE, ["data.batch_size=64", "data.local_crops=2", f"loss.multicrop_rule={rule}"])
    device = torch.device("cuda")
    model = build_model(cfg.model).to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim, skip_nonfinite=True)  # the trainer default (NaN guard)
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    globals_ = torch.randn(128, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    locals_ = torch.randn(128, 3, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs = model(globals_, locals_)
        terms = compute_loss(cfg, *outputs, rank=0)
        optimizer.zero_grad(set_to_none=True)
        (terms.nce + terms.graph).backward()
        optimizer.step()
        return terms

    step()  # warm-up: kernel compilation and allocator growth happen outside the check
    with no_host_sync():
        for _ in range(3):
            terms = step()
    assert torch.isfinite(terms.nce).item() and torch.isfinite(terms.graph).item()


def _inject_nan(monkeypatch, bad_steps):
    """Make the loss NaN (so every gradient is NaN) at the given 0-based global steps."""
    import wcl_fast.objectives.wcl as wcl_module

    real = wcl_module.compute_loss
    calls = {"n": 0}

    def patched(*args, **kwargs):
        terms = real(*args, **kwargs)
        step = calls["n"]
        calls["n"] += 1
        if bad_steps(step):
            return type(terms)(terms.nce * float("nan"), terms.graph)
        return terms

    monkeypatch.setattr(wcl_module, "compute_loss", patched)


def test_nan_step_is_skipped_and_counted(tmp_path, monkeypatch):
    _inject_nan(monkeypatch, lambda step: step == 2)
    summary = train(_cfg(tmp_path, "train.epochs=1", "data.local_crops=0"))
    assert summary["skipped_steps"] == 1.0
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    losses = _losses(tmp_path)
    assert losses[3] != losses[3] and all(losses[s] == losses[s] for s in (1, 2, 4))  # step 3 logged as NaN


def test_consecutive_nan_steps_stop_the_run_and_keep_the_checkpoint(tmp_path, monkeypatch):
    from wcl_fast.train import NonFiniteError

    _inject_nan(monkeypatch, lambda step: step >= 4)  # epoch 0 (4 steps) is fine, then every step fails
    with pytest.raises(NonFiniteError, match="3 steps in a row had non-finite gradients or BatchNorm statistics"):
        train(_cfg(tmp_path, "train.epochs=3", "data.local_crops=0", "train.max_bad_steps=3"))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["global_step"]) == (1, 4)


def test_compiled_encoder_steps_agree_with_eager(tmp_path):
    """model.compile=default (torch.compile, inductor on the CPU) gives the eager losses and weights.
    SimCLR keeps the loss continuous: WCL's 1-NN labels may flip on rounding-level differences."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    common = ["train.epochs=1", "data.local_crops=0", "train.stop_at_step=3", "loss.objective=simclr", "train.max_bad_steps=0",
              "optim.base_lr=0.05"]
    train(_cfg(eager, *common))
    from torch._dynamo.utils import counters

    counters.clear()
    train(_cfg(compiled, *common, "model.compile=default"))
    assert counters["stats"]["unique_graphs"] >= 1  # the encoder really ran compiled
    a, b = _losses(eager), _losses(compiled)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert b[1] == pytest.approx(a[1], rel=1e-5)  # the same forward
    assert b[2] == pytest.approx(a[2], rel=1e-3)  # after one LARS step
    state_a = torch.load(eager / "checkpoint.pt", weights_only=False)["model"]
    state_b = torch.load(compiled / "checkpoint.pt", weights_only=False)["model"]
    assert state_a.keys() == state_b.keys()  # no _orig_mod prefixes
    for key, value in state_a.items():
        if value.is_floating_point():
            # backward sums reorder under inductor: ~0.5 % gradient differences in early layers, carried by 3 steps
            assert (state_b[key] - value).norm() <= 5e-2 * value.norm() + 1e-6, key


def test_two_torchrun_nodes_over_c10d_rendezvous(tmp_path):
    """Multi-node launch as on a cluster: two torchrun agents ("nodes", 1 process each) meet at a c10d
    rendezvous on 127.0.0.1 and train with identical replicas."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "wcl-test",
         "-m", "wcl_fast.train", "--config", str(SMOKE), f"train.out_dir={tmp_path}", "train.epochs=1",
         "data.workers=0", "train.log_interval=1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [o[1][-2000:] for o in outputs]
    records = _log(tmp_path)
    assert [r["replica_divergence"] for r in records if "replica_divergence" in r] == [0.0]
    assert len([r for r in records if "loss" in r]) == 4
    assert "world size 2" in "".join(o[0] + o[1] for o in outputs)


def test_elastic_restart_resumes_and_loses_nothing(tmp_path):
    """torchrun --max-restarts 1 + resume=auto: a worker killed mid-epoch restarts the group, which
    resumes from the last checkpoint and ends with exactly the parameters of an uninterrupted run."""
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def launch(out_dir, extra_env):
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "--max-restarts", "3", "-m", "wcl_fast.train", "--config", str(SMOKE), f"train.out_dir={out_dir}",
             "train.epochs=2", "data.workers=0", "train.resume=auto", "train.log_interval=1"],
            cwd=ROOT, env={**env, **extra_env}, capture_output=True, text=True, timeout=240)

    straight = launch(tmp_path / "straight", {})
    crashed = launch(tmp_path / "crashed", {"WCL_FAST_CRASH_AT": "1:6"})  # rank 1 dies after step 6 (epoch 1)
    if crashed.returncode != 0 and "connectFullMesh" in crashed.stderr:
        # gloo's TCP mesh can time out on a heavily loaded machine (seen only with other jobs running):
        # an environment failure of the launch, not of the restart semantics; run the scenario once more
        crashed = launch(tmp_path / "crashed_again", {"WCL_FAST_CRASH_AT": "1:6"})
        tmp_path = tmp_path / "retry"
        (tmp_path).mkdir()
        (tmp_path / "crashed").symlink_to(tmp_path.parent / "crashed_again")
        (tmp_path / "straight").symlink_to(tmp_path.parent / "straight")
    assert straight.returncode == 0 and crashed.returncode == 0, crashed.stderr[-3000:]
    assert "resumed from" in crashed.stdout + crashed.stderr
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "crashed" / "checkpoint.pt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 8
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    steps = [r["step"] for r in _log(tmp_path / "crashed") if "loss" in r]
    # step 6 died before its log line; a restart replays epoch 1 (steps 5..8) from the epoch-0 checkpoint
    # (a restart that fails to rendezvous on a loaded machine is retried: up to 3 restarts)
    assert steps[:6] == [1, 2, 3, 4, 5, 5] and steps[-4:] == [5, 6, 7, 8], steps


def test_slurm_script_is_valid_bash_and_uses_c10d():
    script = (ROOT / "scripts" / "slurm_train.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "slurm_train.sh")]).returncode == 0
    assert "--rdzv_backend c10d" in script and "train.resume=auto" in script and "--max-restarts" in script


@pytest.mark.parametrize("objective", ["wcl", "slr"])
def test_step_bench_reports_both_paths(tmp_path, objective):
    from wcl_fast.bench_step import main

    out = tmp_path / "step.json"
    assert main(["--config", str(SMOKE), "--steps", "2", "--warmup", "1", "--rounds", "1", "--json", str(out),
                 f"loss.objective={objective}", "data.batch_size=16", "loss.momentum.queue_size=64"]) == 0
    result = json.loads(out.read_text())
    assert result["objective"] == objective and result["batch_per_device"] == 16
    enc, full = result["encoder"], result["full"]
    assert enc["samples_per_s"] > 0 and full["samples_per_s"] > 0
    assert result["overhead"] == pytest.approx(full["s_per_step"] / enc["s_per_step"] - 1)
    assert full["flops_per_step"] >= enc["flops_per_step"] > 0  # the full step adds the heads' work
    assert full["ops_per_step"] > enc["ops_per_step"] > 100  # heads, loss, graph, optimizer on top
    assert result["projected_8gpu_epoch_s"] == pytest.approx(1_281_167 / (full["samples_per_s"] * 8))
    bare = result["no_diag"]  # the same step with train.diagnostics off: fewer operators, the ratio reported
    assert enc["ops_per_step"] < bare["ops_per_step"] < full["ops_per_step"]
    assert result["diagnostics_overhead"] == pytest.approx(full["s_per_step"] / bare["s_per_step"] - 1)
    assert 0 < result["diagnostics_observe_s"] < full["s_per_step"]
    assert result["diagnostics_observe_share"] == pytest.approx(result["diagnostics_observe_s"] / full["s_per_step"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("objective", [["loss.objective=simclr"], ["loss.objective=co2"],
                                       ["loss.objective=co2", "loss.co2.form=queue", "loss.momentum.queue_size=256"],
                                       ["loss.objective=slr", "loss.momentum.queue_size=256"],
                                       ["loss.objective=clinfonce", "loss.clinfonce.form=dual", "loss.clinfonce.kmeans_k=8"]],
                         ids=["simclr", "co2-batch", "co2-queue", "slr", "clinfonce-dual"])
def test_objective_steps_have_no_host_sync_on_cuda(objective):
    """Every objective's step (forward, loss, backward, LARS, EMA/queue update) under sync-debug 'error'."""
    from pipelines.batch import MultiCropBatch
    from wcl_fast import dist as wdist
    from wcl_fast.model import build_model
    from wcl_fast import objectives
    from wcl_fast.optim import build_optimizer

    cfg = load_config(SMOKE, ["data.batch_size=64", "data.local_crops=2", *objective])
    device = torch.device("cuda")
    model = build_model(cfg.model, two_heads=objectives.two_heads(cfg)).to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim, skip_nonfinite=True)
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    ctx = wdist.DistContext(device=device)
    objective_state = objectives.build_objective(cfg, model, ctx, 64)
    if cfg.loss.objective == "clinfonce":
        objective_state.table = torch.randint(0, 8, (64,), device=device)
    batch = MultiCropBatch(torch.randn(128, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last),
                           torch.randn(128, 3, 16, 16, device=device).contiguous(memory_format=torch.channels_last),
                           torch.arange(64, device=device), torch.zeros(64, dtype=torch.int64, device=device))
    autocast = objectives.autocast_factory(device, torch.bfloat16)
    state = {"step": 0}

    def step():  # the trainer's own step
        terms, _ = train_step(objective_state, model, batch, state["step"], 100, autocast, optimizer)
        state["step"] += 1
        return terms

    step()
    with no_host_sync():
        for _ in range(3):
            terms = step()
    assert torch.isfinite(terms["loss"]).item()
