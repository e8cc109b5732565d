"""The memory plan against measurement (docs/memory.md): the traced step's saved bytes against a real CPU
step's, fake against real peaks, the recomputation share, auto's choice, the command, the OOM exit."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wcl_fast.config import load_config, parse_checkpointing
from wcl_fast.memory import trace_step
from wcl_fast.plan import build_plan, choose_plan, resolve

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "cpu_smoke.yaml"
# a real ResNet-50 with both heads, bf16 autocast, the knn multi-crop rule: small crops so a CPU step is quick
R50 = ["model.arch=resnet50", "model.head_hidden=256", "model.head_out=64", "data.global_size=64", "data.local_size=32",
       "data.local_crops=2", "loss.multicrop_rule=knn", "train.precision=bf16", "model.channels_last=true"]


def _cfg(*overrides):
    return load_config(SMOKE, list(overrides))


def measured_saved_bytes(cfg, batch: int) -> int:
    """Bytes of every tensor a real CPU training step saves for backward (storages counted once by address,
    parameters and the input crops left out), measured with saved-tensor hooks around the trainer's own
    step -- independently of wcl_fast.memory."""
    from pipelines.batch import MultiCropBatch
    from wcl_fast import dist as wdist, objectives
    from wcl_fast.model import build_model
    from wcl_fast.optim import build_optimizer
    from wcl_fast.runtime import autocast_dtype, memory_format
    from wcl_fast.train import train_step

    torch.manual_seed(0)
    fmt = memory_format(cfg.model.channels_last)
    model = build_model(cfg.model, two_heads=objectives.two_heads(cfg)).to(memory_format=fmt)
    optimizer = build_optimizer(model, cfg.optim, skip_nonfinite=True)
    objective = objectives.build_objective(cfg, model, wdist.DistContext(), 4 * batch)
    g = torch.randn(2 * batch, 3, cfg.data.global_size, cfg.data.global_size).contiguous(memory_format=fmt)
    loc = torch.randn(cfg.data.local_crops * batch, 3, cfg.data.local_size, cfg.data.local_size).contiguous(memory_format=fmt)
    crops = MultiCropBatch(g, loc if cfg.data.local_crops else None, torch.arange(batch), torch.zeros(batch, dtype=torch.int64))
    autocast = objectives.autocast_factory(torch.device("cpu"), autocast_dtype(cfg.train.precision))
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {g.untyped_storage().data_ptr(),
                                                                           loc.untyped_storage().data_ptr()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(objective, model, crops, 0, 100, autocast, optimizer)
    return sum(seen.values())


def traced_saved_bytes(trace) -> int:
    return trace.activation_total + trace.loss_saved + trace.weight_copies


def test_plan_agrees_with_a_real_step_within_5_percent():
    """Per-image slope of the saved bytes between two batch sizes: plan (fake trace) vs a real CPU step."""
    cfg_small, cfg_large = (load_config(SMOKE, R50 + [f"data.batch_size={b}"]) for b in (2, 4))
    measured = (measured_saved_bytes(cfg_large, 4) - measured_saved_bytes(cfg_small, 2)) / 2
    small, large = trace_step(cfg_small, 1), trace_step(cfg_large, 1)
    planned = (traced_saved_bytes(large) - traced_saved_bytes(small)) / 2
    assert measured > 1 << 20  # megabytes per image: the comparison is not between two zeros
    assert abs(planned - measured) <= 0.05 * measured, (planned, measured)
    # the per-stage table covers the encoder at both resolutions and sums to the activations
    table = large.stage_table()
    assert set(table) == {"global", "local", "heads"} and set(table["global"]) == {"stem", "layer1", "layer2", "layer3", "layer4"}
    assert sum(sum(row.values()) for row in table.values()) == large.activation_total
    assert large.crops == {"global": (8, 64), "local": (8, 32)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fake_trace_peak_equals_the_real_steps(precision):
    """The same accounting over real CPU tensors and over fake ones: the same peak and FLOPs; the same saved
    bytes in fp32 (in bf16 the CPU's BatchNorm keeps its per-channel batch statistics in fp32 where the fake
    kernel keeps bf16: bytes per channel, not per image)."""
    cfg = _cfg("data.batch_size=8", f"train.precision={precision}", "loss.multicrop_rule=knn")
    for plan in (None, parse_checkpointing("layer1,layer3.1;local:stem", "resnet18")):
        fake, real = trace_step(cfg, 1, plan), trace_step(cfg, 1, plan, fake=False)
        assert fake.peak == real.peak and fake.step_flops == real.step_flops and fake.peak_phase == real.peak_phase
        if precision == "fp32":
            assert fake.activations == real.activations
        assert fake.activation_total == pytest.approx(real.activation_total, rel=0.01)


def test_fake_cuda_forward_saves_what_the_cpu_trace_saves():
    """The ResNet and heads save the same bytes under CUDA autocast (fake CUDA tensors, no GPU needed) as
    under the CPU autocast the plan traces with."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from wcl_fast.memory import _fakeify
    from wcl_fast.model import build_model

    cfg = load_config(SMOKE, R50)

    def saved(device, batch):
        with torch.device("meta"):
            model = build_model(cfg.model).to(memory_format=torch.channels_last)
        total = {}
        with FakeTensorMode():
            _fakeify(model, torch.device(device))
            x = torch.empty(batch, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
            enabled, dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
            torch.set_autocast_enabled(device, True)  # torch.autocast('cuda') refuses without a GPU; the flag does not
            torch.set_autocast_dtype(device, torch.bfloat16)

            def pack(t):
                total.setdefault(id(t.untyped_storage()), (t.untyped_storage(), t.dtype))
                return t

            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    model.embed(x)
            finally:
                torch.set_autocast_enabled(device, enabled)
                torch.set_autocast_dtype(device, dtype)
                torch.clear_autocast_cache()
        assert any(d == torch.bfloat16 for _, d in total.values())  # autocast did run
        return sum(s.nbytes() for s, _ in total.values())

    cuda = saved("cuda", 8) - saved("cuda", 4)
    cpu = saved("cpu", 8) - saved("cpu", 4)
    assert cuda == cpu > 1 << 20  # the same bytes per image
    # in all, within the per-channel batch statistics cuDNN keeps in fp32
    assert saved("cuda", 4) == pytest.approx(saved("cpu", 4), rel=0.005)


NARROW = ["model.widths=[16,32,64,128]", "data.global_size=64", "data.local_size=32"]  # activations dominate the peak


def test_checkpointing_lowers_the_peak_and_recomputes_the_encoder_forward():
    cfg = _cfg("data.batch_size=32", *NARROW)
    none = trace_step(cfg, 1)
    full = trace_step(cfg, 1, parse_checkpointing("all", "resnet18"))
    assert none.peak_phase == "backward" and full.peak < none.peak - 0.4 * none.activation_total
    # recomputation = one more forward of every segment: the encoder's forward FLOPs (stem .. layer4)
    encoder_forward = sum(v for (res, seg), v in none.forward_flops.items() if res in ("global", "local") and seg != "pool")
    assert full.step_flops - none.step_flops == pytest.approx(encoder_forward, rel=0.02)
    plan = build_plan(cfg, 1, 0, parse_checkpointing("all", "resnet18"), none, full)
    assert plan.recompute_share == pytest.approx(encoder_forward / none.step_flops, rel=0.02)
    # what the analytic model keeps (block inputs) is below what the plain step saves
    assert sum(plan.kept.values()) < 0.6 * none.activation_total


def test_auto_takes_the_shortest_prefix_that_fits():
    from wcl_fast import plan as wplan
    from wcl_fast.memory import GiB

    cfg = _cfg("data.batch_size=32", "model.activation_checkpointing=auto", *NARROW)
    plain = trace_step(cfg, 1)
    full = trace_step(cfg, 1, parse_checkpointing("all", "resnet18"))
    roomy = int(wplan.ALLOWANCE_FIXED + 2 * plain.peak + 1 * GiB)
    assert resolve(cfg, 1, roomy).text == "none"
    # a budget between the plain and the fully checkpointed step: some, not all, segments
    plain_total = build_plan(cfg, 1, 0, parse_checkpointing("none", "resnet18"), plain, plain).total
    full_total = build_plan(cfg, 1, 0, parse_checkpointing("all", "resnet18"), plain, full).total
    budget = (plain_total + full_total) // 2
    chosen = choose_plan(cfg, 1, budget)
    assert chosen.fits and chosen.text not in ("none", "all")
    order = wplan.ordered_segments(plain, "resnet18")
    n = sum(len(v) for v in chosen.checkpointing.values())
    assert chosen.checkpointing == wplan._as_plan(order[:n])
    shorter = build_plan(cfg, 1, budget, wplan._as_plan(order[:n - 1]), plain)
    assert not shorter.fits  # one segment fewer would not fit: the least recomputation that does
    # nothing fits: every segment checkpointed, and the nearest batch that fits named
    tight = choose_plan(cfg, 1, int(wplan.ALLOWANCE_FIXED + full.peak * 0.8))
    assert not tight.fits and tight.text == "all"
    assert tight.nearest is None or (tight.nearest["batch_per_gpu"] < 32 and tight.nearest["batch_per_gpu"] % 8 == 0)


def test_simulated_world_gathers_the_shapes_of_every_rank():
    from wcl_fast import dist as wdist

    x = torch.randn(3, 5, requires_grad=True)
    with wdist.simulated(4, 2):
        assert wdist.world_size() == 4 and wdist.rank() == 2
        gathered = wdist.gather_rows(x)
        assert gathered.shape == (12, 5) and torch.equal(gathered[6:9], x)
        gathered.sum().backward()
    assert wdist.world_size() == 1 and torch.equal(x.grad, torch.ones(3, 5))
    cfg = _cfg("data.batch_size=32")
    one, four = trace_step(cfg, 1), trace_step(cfg, 4)
    assert four.batch_per_gpu == 8 and four.batch * 4 == one.batch


def test_plan_command_prints_the_table_and_documented_json(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "wcl_fast.plan", "--config", str(SMOKE), "--gpus", "2", "--gpu-memory", "40",
                           "--json", str(out), "model.activation_checkpointing=layer1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "saved activations" in proc.stdout and "checkpointing: layer1" in proc.stdout and "fits" in proc.stdout
    record = json.loads(out.read_text())
    documented = set(re.findall(r"^\| `([a-z_0-9]+)` \|", (ROOT / "docs" / "memory.md").read_text(), re.M))
    assert set(record) == documented
    assert record["batch_per_gpu"] == 16 and record["plan"] == "layer1" and record["fits"] is True
    table = subprocess.run([sys.executable, "-m", "wcl_fast.plan", "--gpus", "2", "--table", str(SMOKE), "data.batch_size=64"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr[-2000:]
    rows = table.stdout.strip().splitlines()
    assert rows[0].startswith("| config | 80 GB") and len(rows) == 3
    assert rows[2].startswith("| `cpu_smoke.yaml` (32 per GPU) |") and rows[2].count("`none`: ") == 4
    bad = subprocess.run([sys.executable, "-m", "wcl_fast.plan", "--config", str(SMOKE), "--gpus", "3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--gpus 3" in bad.stderr


def test_out_of_memory_ends_the_run_with_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    from torch._subclasses.fake_tensor import FakeTensor

    import wcl_fast.train as wtrain

    args = ["--config", str(SMOKE), f"train.out_dir={tmp_path}", "train.epochs=2", "train.gpu_memory=64",
            "model.activation_checkpointing=auto"]
    real_step = wtrain.train_step

    def step(objective, ddp, batch, global_step, *a, **k):
        if global_step == 5 and not isinstance(batch.globals, FakeTensor):  # epoch 1, after epoch 0's checkpoint
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                              "capacity of 79.19 GiB of which 1.21 GiB is free.")
        return real_step(objective, ddp, batch, global_step, *a, **k)

    monkeypatch.setattr(wtrain, "train_step", step)
    assert wtrain.main(args) == wtrain.EXIT_OOM == 5
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]
    assert line.startswith("error: out of memory in global step 6 while allocating 2.00 GiB")
    assert "memory plan estimated" in line and "model.activation_checkpointing" in line and "checkpoint.pt" in line
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["global_step"] == 4  # epoch 0's checkpoint, untouched


@pytest.mark.parametrize("objective", [
    ["loss.multicrop_rule=knn"], ["loss.multicrop_rule=inherit"], ["loss.objective=simclr"],
    ["loss.objective=co2", "loss.co2.form=queue", "loss.momentum.queue_size=64"],
    ["loss.objective=slr", "loss.momentum.queue_size=64"],
    ["loss.objective=clinfonce", "loss.clinfonce.form=dual", "loss.clinfonce.kmeans_k=8"]],
    ids=["wcl-knn", "wcl-inherit", "simclr", "co2-queue", "slr", "clinfonce-dual"])
def test_every_objective_step_traces_without_reading_values(objective):
    """Fake tensors hold no values: a step that reads one on the host (.item(), a data-dependent shape) cannot
    be traced (DataDependentOutputException), so the plan exists for every objective, at world size 4 too."""
    cfg = _cfg("data.batch_size=16", *objective)
    trace = trace_step(cfg, 4)
    assert trace.peak > trace.parameters > 0 and trace.step_flops > 0


def test_step_bench_times_each_plan_against_none(tmp_path):
    from wcl_fast.bench_step import main

    out = tmp_path / "plans.json"
    assert main(["--config", str(SMOKE), "--steps", "2", "--warmup", "1", "--rounds", "1", "--json", str(out),
                 "--plans", "auto|none|all", "--gpu-memory", "64", "data.batch_size=16", *NARROW]) == 0
    rows = {row["plan"]: row for row in json.loads(out.read_text())["plans"]}
    assert set(rows) == {"auto", "none", "all"}
    assert rows["none"]["ratio"] == 1.0 and rows["none"]["recompute_share"] == 0.0
    assert rows["auto"]["checkpointing"] == "none"  # 64 GiB: nothing to checkpoint
    assert rows["all"]["ratio"] > 0 and 0.2 < rows["all"]["recompute_share"] < 0.5  # one more encoder forward
    assert rows["all"]["traced_peak_gib"] < rows["none"]["traced_peak_gib"]
    assert rows["all"]["measured_peak_gib"] is None  # measured on CUDA only
