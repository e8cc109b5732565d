"""Activation checkpointing (model.activation_checkpointing): the spec grammar, and exactness -- a
checkpointed step gives the losses, gradients, LARS update and BatchNorm statistics of the plain step
(in one process for every granularity and objective family, under 2-process DDP, across a resume).
docs/memory.md §2."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import wcl_fast.model as model_module
from pipelines import build_loader
from wcl_fast import objectives
from wcl_fast.config import (BLOCKS_PER_STAGE, ConfigError, checkpoint_segments, format_checkpointing, load_config,
                             parse_checkpointing)
from wcl_fast.dist import DistContext
from wcl_fast.model import build_model
from wcl_fast.optim import build_optimizer
from wcl_fast.train import train, train_step

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "cpu_smoke.yaml"
KEY = "config key 'model.activation_checkpointing'"
# a narrow ResNet-18 on 16 px global / 8 px local crops: every test here runs in seconds on 2 cores
TINY = ["model.widths=[8, 16, 16, 32]", "model.stem=small", "model.head_hidden=32", "model.head_out=16",
        "data.global_size=16", "data.local_size=8", "data.local_crops=2", "data.batch_size=8",
        "data.synthetic_size=32", "data.backend=synthetic", "train.precision=fp32"]
EXACT = {"rtol": 1e-6, "atol": 1e-7}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread here (conftest puts the suite's count back after each test): on these tiny
    tensors a second OpenMP thread buys nothing, and on 2 shared cores its barriers made the trainer
    runs 20-50x slower (measured: the resume test 1.0 s with 1 thread, 18-48 s with 2 under load)."""
    torch.set_num_threads(1)
    yield


def _segments(*names):
    return frozenset(names)


# --- the grammar --------------------------------------------------------------------------------


def test_segments_in_forward_order():
    assert checkpoint_segments("resnet18") == ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0",
                                               "layer3.1", "layer4.0", "layer4.1"]
    assert len(checkpoint_segments("resnet50")) == 1 + sum(BLOCKS_PER_STAGE["resnet50"]) == 17
    assert checkpoint_segments("resnet34")[-1] == "layer4.2"


@pytest.mark.parametrize("text,arch,expected_global,expected_local", [
    ("none", "resnet18", (), ()),
    (" none ", "resnet18", (), ()),
    ("stem", "resnet18", ("stem",), ("stem",)),
    ("layer2", "resnet50", ("layer2.0", "layer2.1", "layer2.2", "layer2.3"), ("layer2.0", "layer2.1", "layer2.2", "layer2.3")),
    ("layer1.0, layer3.5", "resnet50", ("layer1.0", "layer3.5"), ("layer1.0", "layer3.5")),
    ("global:layer1;local:stem,layer3.1", "resnet18", ("layer1.0", "layer1.1"), ("stem", "layer3.1")),
    ("global : all", "resnet18", tuple(checkpoint_segments("resnet18")), ()),
    ("local:layer4.1", "resnet18", (), ("layer4.1",)),
    ("stem;global:layer1.1;global:layer2.0", "resnet18", ("stem", "layer1.1", "layer2.0"), ("stem",)),
    ("all,stem", "resnet34", tuple(checkpoint_segments("resnet34")), tuple(checkpoint_segments("resnet34"))),
])
def test_accepted_forms(text, arch, expected_global, expected_local):
    plan = parse_checkpointing(text, arch)
    assert plan == {"global": frozenset(expected_global), "local": frozenset(expected_local)}
    assert all(isinstance(v, frozenset) for v in plan.values())


@pytest.mark.parametrize("plan,arch,text", [
    ({"global": _segments(), "local": _segments()}, "resnet18", "none"),
    ({"global": _segments(*checkpoint_segments("resnet50")), "local": _segments(*checkpoint_segments("resnet50"))},
     "resnet50", "all"),
    ({"global": _segments("stem", "layer1.0", "layer1.1", "layer3.1"), "local": _segments("stem", "layer1.0", "layer1.1", "layer3.1")},
     "resnet18", "stem,layer1,layer3.1"),
    ({"global": _segments("layer1.0", "layer1.1"), "local": _segments("stem", "layer3.1")}, "resnet18",
     "global:layer1;local:stem,layer3.1"),
    ({"global": _segments(), "local": _segments("layer4.0", "layer4.1", "layer4.2")}, "resnet50", "local:layer4"),
    ({"global": _segments(*checkpoint_segments("resnet18")), "local": _segments("layer2.1")}, "resnet18",
     "global:all;local:layer2.1"),
])
def test_format_is_canonical_and_round_trips(plan, arch, text):
    assert format_checkpointing(plan, arch) == text
    assert parse_checkpointing(text, arch) == plan


def test_round_trip_over_many_plans():
    generator = torch.Generator().manual_seed(0)
    for arch in BLOCKS_PER_STAGE:
        names = checkpoint_segments(arch)
        for _ in range(200):
            plan = {resolution: frozenset(n for n in names if torch.rand((), generator=generator) < 0.5)
                    for resolution in ("global", "local")}
            if torch.rand((), generator=generator) < 0.3:
                plan["local"] = plan["global"]
            text = format_checkpointing(plan, arch)
            assert parse_checkpointing(text, arch) == plan, text
            assert format_checkpointing(parse_checkpointing(text, arch), arch) == text


@pytest.mark.parametrize("text,arch,fragment", [
    ("layer5", "resnet50", "layer5 is not a segment of resnet50"),
    ("layer0", "resnet18", "layer0 is not a segment of resnet18"),
    ("layer2.2", "resnet18", "layer2.2 is not a segment of resnet18 (layer2 has blocks 0..1)"),
    ("layer3.6", "resnet50", "layer3.6 is not a segment of resnet50 (layer3 has blocks 0..5)"),
    ("conv1", "resnet18", "conv1 is not a segment of resnet18"),
    ("global:auto", "resnet18", "auto is not a segment"),
    ("stem,,layer1", "resnet18", "an empty item"),
    ("foo:stem", "resnet18", "bad prefix 'foo:'"),
    ("global:local:stem", "resnet18", "bad prefix 'global:local:'"),
    ("", "resnet18", "is empty"),
])
def test_errors_name_the_key_the_item_and_the_forms(text, arch, fragment):
    with pytest.raises(ConfigError) as info:
        parse_checkpointing(text, arch)
    message = str(info.value)
    assert message.startswith(KEY) and fragment in message and "\n" not in message
    if "prefix" not in fragment:
        assert "use stem, layer1..layer4, layerN.K" in message and "or all" in message


def test_auto_is_the_trainers_to_resolve():
    with pytest.raises(ValueError, match="resolved by the trainer"):
        parse_checkpointing("auto", "resnet18")
    assert load_config(SMOKE, ["model.activation_checkpointing=auto"]).model.activation_checkpointing == "auto"
    model = build_model(load_config(SMOKE, [*TINY, "model.activation_checkpointing=auto"]).model)
    assert model.checkpointing == {"global": frozenset(), "local": frozenset()}


def test_load_config_checks_the_value():
    assert load_config(SMOKE).model.activation_checkpointing == "none"
    assert load_config(SMOKE, ["model.activation_checkpointing=global:layer1;local:all"])
    with pytest.raises(ConfigError, match=r"^config key 'model.activation_checkpointing': layer4.2 is not a segment of resnet18"):
        load_config(SMOKE, ["model.activation_checkpointing=layer4.2"])
    # the same spec is valid for a ResNet-50 (3 blocks in stage 4): the check uses model.arch
    assert load_config(SMOKE, ["model.arch=resnet50", "model.activation_checkpointing=layer4.2"])


def test_model_plan_api():
    cfg = load_config(SMOKE, [*TINY, "model.activation_checkpointing=global:layer1;local:stem"]).model
    model = build_model(cfg)
    assert model.checkpointing == {"global": _segments("layer1.0", "layer1.1"), "local": _segments("stem")}
    plain = build_model(cfg, checkpointing={})  # an explicit plan wins over the config; a missing key = none
    assert plain.checkpointing == {"global": frozenset(), "local": frozenset()}
    assert plain.state_dict().keys() == model.state_dict().keys() == build_model(load_config(SMOKE, TINY).model).state_dict().keys()
    model.set_checkpointing(parse_checkpointing("all", "resnet18"))
    assert model.checkpointing["local"] == frozenset(checkpoint_segments("resnet18"))
    with pytest.raises(ValueError, match="not segments of resnet18"):
        model.set_checkpointing({"global": {"layer4.2"}})
    with pytest.raises(ValueError, match="global / local"):
        model.set_checkpointing({"globals": {"stem"}})


# --- exactness in one process -----------------------------------------------------------------

VARIANTS = {
    "wcl-knn": ["loss.multicrop_rule=knn", "loss.similarity_backend=torch"],
    "wcl-inherit": ["loss.multicrop_rule=inherit"],
    "wcl-inherit-per_view": ["loss.multicrop_rule=inherit", "model.forward=per_view"],
    "co2-queue": ["loss.objective=co2", "loss.co2.form=queue", "loss.momentum.queue_size=24"],
    "slr": ["loss.objective=slr", "loss.momentum.queue_size=24"],
}
SPECS = ["stem", "layer1.0", "layer2", "all", "global:layer1;local:stem,layer3.1"]


def _passes(cfg) -> list[str]:
    """The resolution of every encoder pass with gradients in one step (the online model's forward call)."""
    views = 2 if cfg.model.forward == "per_view" else 1
    local = (cfg.data.local_crops if cfg.model.forward == "per_view" else 1) if cfg.data.local_crops else 0
    extra = 1 if cfg.loss.objective == "slr" else 0  # SLR's mixed queries
    return ["global"] * views + ["local"] * local + ["global"] * extra


class _Counting:
    """Counts checkpointed segments (forward) and recomputations (backward) through the model module."""

    def __init__(self, monkeypatch):
        self.forward = self.recomputed = 0
        real_checkpoint, real_context = model_module.checkpoint, model_module._ScratchRunningStats
        counter = self

        def checkpoint(*args, **kwargs):
            counter.forward += 1
            return real_checkpoint(*args, **kwargs)

        class Context(real_context):
            def __enter__(self):
                counter.recomputed += 1
                return super().__enter__()

        monkeypatch.setattr(model_module, "checkpoint", checkpoint)
        monkeypatch.setattr(model_module, "_ScratchRunningStats", Context)


def _initial(cfg, steps: int = 2):
    """The seed's initial model (channels-last, as the trainer's) and the first `steps` synthetic batches."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, two_heads=objectives.two_heads(cfg)).to(memory_format=torch.channels_last)
    batches = build_loader(cfg, "train", 0, 1).epoch(0, 0)
    return model, [next(batches).to(torch.device("cpu"), True) for _ in range(steps)]


def _run_steps(cfg, initial, plan=None):
    """Trainer steps (wcl_fast.train.train_step) from a copy of the initial model, with the plan of
    activation checkpointing `plan` (a spec; None: the model's own); returns per step: loss terms,
    gradients, parameters after LARS, buffers and the objective's state (EMA key encoder, queue)."""
    model = copy.deepcopy(initial[0])
    if plan is not None:
        model.set_checkpointing(parse_checkpointing(plan, cfg.model.arch))
    optimizer = build_optimizer(model, cfg.optim, skip_nonfinite=cfg.train.max_bad_steps > 0)
    objective = objectives.build_objective(cfg, model, DistContext(), cfg.data.synthetic_size)
    autocast = objectives.autocast_factory(torch.device("cpu"), None)
    model.train()
    records = []
    for step, batch in enumerate(initial[1]):
        for group in optimizer.param_groups:
            group["lr"] = 0.2
        terms, _ = train_step(objective, model, batch, step, 100, autocast, optimizer)
        records.append({
            "terms": {k: v.detach().clone() for k, v in terms.items()},
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()},
            "objective": {n: v.clone() for n, v in _tensors(objective.state_dict()).items()},
        })
    return records


def _tensors(state, prefix=""):
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_tensors(value, f"{prefix}{key}."))
        elif torch.is_tensor(value):
            out[f"{prefix}{key}"] = value
    return out


def _assert_same_steps(got, want, label):
    for step, (a, b) in enumerate(zip(got, want)):
        for part in ("terms", "grads", "params", "buffers", "objective"):
            assert a[part].keys() == b[part].keys()
            for name in b[part]:
                if b[part][name].is_floating_point():
                    assert_close(a[part][name], b[part][name], **EXACT, msg=lambda m: f"{label} step {step} {part} {name}: {m}")
                else:
                    assert torch.equal(a[part][name], b[part][name]), f"{label} step {step} {part} {name}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpointed_steps_equal_the_plain_steps(variant, monkeypatch):
    """Two full trainer steps (the second on the first's parameters and buffers), for every
    granularity: the same loss terms, gradients, parameters after LARS and BatchNorm buffers (running
    statistics updated once per forward pass, as without checkpointing), EMA key encoder and queue."""
    cfg = load_config(SMOKE, [*TINY, *VARIANTS[variant]])
    initial = _initial(cfg)
    want = _run_steps(cfg, initial)
    passes = _passes(cfg)
    # every BatchNorm of the encoder and the heads counted every forward pass of the online model
    for name, value in want[1]["buffers"].items():
        if name.endswith("num_batches_tracked"):
            assert int(value) == 2 * len(passes), (name, int(value), passes)
    for spec in SPECS:
        counting = _Counting(monkeypatch)
        got = _run_steps(cfg, initial, spec)
        plan = parse_checkpointing(spec, cfg.model.arch)
        expected = 2 * sum(len(plan[resolution]) for resolution in passes)  # the key encoder runs without grad
        assert counting.forward == counting.recomputed == expected, (spec, counting.forward, counting.recomputed)
        _assert_same_steps(got, want, f"{variant} {spec}")
        monkeypatch.undo()


def test_recomputation_without_scratch_statistics_would_update_them_twice(monkeypatch):
    """The check above sees the BatchNorm statistics: with a recomputation context that does nothing,
    the checkpointed segments' running statistics and batch counts move a second time."""

    class Nothing:
        def __init__(self, modules):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    cfg = load_config(SMOKE, [*TINY, "loss.multicrop_rule=inherit"])
    initial = _initial(cfg, steps=1)
    want = _run_steps(cfg, initial)
    monkeypatch.setattr(model_module, "_ScratchRunningStats", Nothing)
    got = _run_steps(cfg, initial, "layer2")
    assert_close(got[0]["grads"], want[0]["grads"], **EXACT)  # the gradients are the same either way
    buffers, plain = got[0]["buffers"], want[0]["buffers"]
    assert int(buffers["net.layer2.0.bn1.num_batches_tracked"]) == 2 * int(plain["net.layer2.0.bn1.num_batches_tracked"])
    assert not torch.allclose(buffers["net.layer2.1.bn2.running_var"], plain["net.layer2.1.bn2.running_var"])
    assert torch.equal(buffers["net.layer1.0.bn1.running_var"], plain["net.layer1.0.bn1.running_var"])  # not checkpointed


def test_no_grad_and_frozen_inputs_run_without_checkpoints(monkeypatch):
    cfg = load_config(SMOKE, [*TINY, "model.activation_checkpointing=all"])
    model = build_model(cfg.model)
    plain = build_model(cfg.model, checkpointing={})
    plain.load_state_dict(model.state_dict())
    counting = _Counting(monkeypatch)
    images = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        z, u = model.embed(images)
        z_plain, u_plain = plain.embed(images)
    assert counting.forward == 0
    assert torch.equal(z, z_plain) and torch.equal(u, u_plain)
    model.net.requires_grad_(False)  # frozen encoder, input without grad: nothing to recompute for
    model.embed(images)
    assert counting.forward == 0
    model.net.layer4.requires_grad_(True)
    model.embed(images)
    assert counting.forward == 2  # only the stage with trainable parameters (its 2 blocks)


# --- through the trainer: 2-process DDP and resume ---------------------------------------------


def test_two_process_ddp_checkpointed_equals_plain(tmp_path):
    """torchrun, 2 gloo processes, one epoch of 3 steps (data.synthetic_size=24): the checkpointed run ends with the plain run's
    parameters and BatchNorm buffers, and its replicas stay identical."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    states = {}
    for spec in ("none", "all"):
        out_dir = tmp_path / spec
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "wcl_fast.train", "--config", str(SMOKE), f"train.out_dir={out_dir}", *TINY, "data.synthetic_size=24",
             "train.epochs=1", "data.workers=1", "train.log_interval=1",
             f"model.activation_checkpointing={spec}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
        assert [r["replica_divergence"] for r in records if "replica_divergence" in r] == [0.0]
        states[spec] = torch.load(out_dir / "checkpoint.pt", weights_only=False)
        assert states[spec]["world_size"] == 2 and states[spec]["global_step"] == 3
    plain, checkpointed = states["none"]["model"], states["all"]["model"]
    assert plain.keys() == checkpointed.keys()
    assert any(key.endswith("running_var") for key in plain)
    for key, value in plain.items():
        if value.is_floating_point():
            assert_close(checkpointed[key], value, **EXACT, msg=lambda m: f"{key}: {m}")
        else:
            assert torch.equal(checkpointed[key], value), key


def test_resume_with_checkpointing_continues_exactly(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    common = [f"train.out_dir={{}}", "train.log_interval=1", *TINY, "data.synthetic_size=24", "train.epochs=2",
              "model.activation_checkpointing=global:all;local:layer1,layer4.1", "loss.multicrop_rule=knn",
              "loss.similarity_backend=torch"]

    def cfg(out_dir, *extra):
        return load_config(SMOKE, [common[0].format(out_dir), *common[1:], *extra])

    train(cfg(straight))
    assert train(cfg(interrupted, "train.stop_at_step=2"))["global_step"] == 2  # stops mid-epoch 0 (3 steps each)
    train(cfg(interrupted, "train.resume=auto"))
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(interrupted / "checkpoint.pt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
