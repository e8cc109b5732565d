"""The trainer under faults: signals as clusters send them, a second run into a held folder, a full
disk, interrupted writes, non-finite steps, and resumes that would silently change the experiment."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import THREADS, write_colour_folder
from wcl_fast.config import ConfigError, load_config
from wcl_fast.train import main as train_main
from wcl_fast.train import train, train_step

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "cpu_smoke.yaml"
# the subprocess runs use the thread count of in-process runs: conv results depend on it, bit-exact checks need it
ENV = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONPATH=str(ROOT))


def _steps(out_dir) -> list[int]:
    path = Path(out_dir) / "log.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if "loss" in r]


def _wait_for_steps(out_dir, count, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and len(_steps(out_dir)) < count:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    assert len(_steps(out_dir)) >= count


def _same_state(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    assert sa["global_step"] == sb["global_step"]
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    for ma, mb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(ma["momentum_buffer"], mb["momentum_buffer"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_colour_folder(tmp_path_factory.mktemp("faults") / "train", classes=2, per_class=24, sizes=(36, 60))


def _reference_args(folder, out_dir, workers=2):
    return ["--config", str(SMOKE), f"train.out_dir={out_dir}", "data.backend=reference", f"data.train_dir={folder}",
            f"data.workers={workers}", "data.batch_size=16", "data.local_crops=0", "train.epochs=200",
            "train.log_interval=1"]


def test_sigterm_to_the_process_group_checkpoints_resumes_exactly_and_holds_the_folder(folder, tmp_path):
    """The reference loader's workers share the trainer's process group, as under SLURM or `timeout`."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "wcl_fast.train", *_reference_args(folder, run)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for_steps(run, 2, proc)
    # a second run into the folder this one holds stops at once and names the holder
    second = subprocess.run([sys.executable, "-m", "wcl_fast.train", *_reference_args(folder, run), "train.resume=auto"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is in use by a live run (pid {proc.pid} on host" in second.stderr and "Traceback" not in second.stderr
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group: trainer and its DataLoader workers
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "stop requested (SIGTERM)" in err and "Traceback" not in err
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    stopped_at = state["global_step"]
    assert stopped_at >= 2 and max(_steps(run)) == stopped_at
    target = stopped_at + 3  # resume a few steps further and compare with a run that never stopped
    assert train_main([*_reference_args(folder, run), "train.resume=auto", f"train.stop_at_step={target}"]) == 0
    straight = tmp_path / "straight"
    assert train_main([*_reference_args(folder, straight), f"train.stop_at_step={target}"]) == 0
    _same_state(run / "checkpoint.pt", straight / "checkpoint.pt")


def test_sigterm_to_the_torchrun_agent_checkpoints_and_resume_continues_exactly(folder, tmp_path):
    run, straight = tmp_path / "run", tmp_path / "straight"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "wcl_fast.train"]
    proc = subprocess.Popen(torchrun + _reference_args(folder, run, workers=1), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_steps(run, 2, proc)
    proc.send_signal(signal.SIGTERM)  # the agent only; it forwards SIGTERM to its workers' process groups
    _, err = proc.communicate(timeout=300)
    assert "stop requested" in err, err[-3000:]
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    stopped_at = state["global_step"]
    assert stopped_at >= 2 and state["world_size"] == 2
    target = stopped_at + 2
    for out, extra in ((run, ["train.resume=auto"]), (straight, [])):
        done = subprocess.run(torchrun + _reference_args(folder, out, workers=1) + extra + [f"train.stop_at_step={target}"],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    _same_state(run / "checkpoint.pt", straight / "checkpoint.pt")


def test_signals_repeated_within_moments_are_one_request():
    from wcl_fast.signals import StopRequest

    stop = StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # the group's copy
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's forwarded copy
        assert stop.poll() and stop.signal_name == "SIGTERM"
        stop.first_signal -= StopRequest.REPEAT_WINDOW_S + 1  # a deliberate second signal, later
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()


LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from wcl_fast.checkpoint import RunLock
    RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def test_run_lock_names_its_holder_and_dies_with_it(tmp_path):
    from wcl_fast.checkpoint import RunLock

    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=rf"in use by a live run \(pid {proc.pid} on host .+, started "):
        RunLock(tmp_path).acquire()
    proc.kill()  # kill -9: no cleanup code runs
    proc.wait()
    RunLock(tmp_path).acquire().release()  # never blocked by a dead holder


def test_resume_refuses_other_batch_head_arch_or_objective(tmp_path):
    from wcl_fast.checkpoint import CheckpointError

    train(load_config(SMOKE, [f"train.out_dir={tmp_path}", "train.stop_at_step=1"]))
    for override, named in [("data.batch_size=30", "data.batch_size=32 there, 30 here"),
                            ("model.head_out=16", "model.head_out=32 there, 16 here"),
                            ("model.arch=resnet34", "model.arch='resnet18' there, 'resnet34' here"),
                            ("loss.objective=simclr", "loss.objective='wcl' there, 'simclr' here")]:
        cfg = load_config(SMOKE, [f"train.out_dir={tmp_path}", "train.resume=auto", override])
        with pytest.raises(CheckpointError, match=named.replace("(", r"\(").replace("[", r"\[")):
            train(cfg)


def test_resume_from_a_file_that_is_not_a_training_checkpoint_is_one_line(tmp_path, capsys):
    weights = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, weights)
    assert train_main(["--config", str(SMOKE), f"train.out_dir={tmp_path / 'run'}", f"train.resume={weights}"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is not a wcl-fast training checkpoint" in errors[0] and "Traceback" not in err


def test_nonfinite_stop_writes_no_poisoned_checkpoint_and_names_the_last_good_one(tmp_path, capsys):
    # base_lr 1e6: parameters blow up within a few steps; max_bad_steps 6 > 4 steps per epoch, so epoch
    # boundaries (and their checkpoints) pass while steps are already being skipped
    args = ["--config", str(SMOKE), f"train.out_dir={tmp_path}", "optim.base_lr=1000000.0", "train.epochs=20",
            "train.max_bad_steps=6", "data.local_crops=0"]
    assert train_main(args) == 3
    err = capsys.readouterr().err
    assert err.count("error:") == 1
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    from wcl_fast.checkpoint import nonfinite_entries

    assert nonfinite_entries({k: state[k] for k in ("model", "optimizer", "objective")}) == []
    assert (f"the last good checkpoint is '{tmp_path / 'checkpoint.pt'}' (epoch {state['epoch']}, step "
            f"{state['step_in_epoch']}, global step {state['global_step']})") in err


@pytest.mark.parametrize("objective", [["loss.objective=wcl"], ["loss.objective=slr", "loss.momentum.queue_size=64"],
                                       ["loss.objective=co2", "loss.co2.form=queue", "loss.momentum.queue_size=64"]],
                         ids=["wcl", "slr", "co2-queue"])
def test_a_skipped_step_leaves_no_trace_in_any_state(objective):
    """One finite step changes buffers, EMA keys and queue; a NaN batch afterwards changes none of them."""
    from pipelines.synthetic import build_synthetic_loader
    from wcl_fast import dist as wdist
    from wcl_fast.model import build_model
    from wcl_fast import objectives
    from wcl_fast.optim import build_optimizer

    cfg = load_config(SMOKE, ["data.local_crops=0", *objective])
    torch.manual_seed(0)
    model = build_model(cfg.model, two_heads=objectives.two_heads(cfg))
    optimizer = build_optimizer(model, cfg.optim, skip_nonfinite=True)
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    objective = objectives.build_objective(cfg, model, wdist.DistContext(), 128)
    batch = next(build_synthetic_loader(cfg.data, 0, 0, 1).epoch(0, 0))
    autocast = objectives.autocast_factory(torch.device("cpu"), None)

    def snapshot():
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "objective": objective.state_dict()}
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in _flatten(state).items()}

    before = snapshot()
    train_step(objective, model, batch, 0, 10, autocast, optimizer)
    assert bool(optimizer.last_step_ok)
    after_good = snapshot()
    changed = [k for k in before if not _equal(before[k], after_good[k])]
    assert any("running_mean" in k for k in changed)
    if "objective" in "".join(changed) or objective.state_dict():
        assert any(k.startswith("objective.") for k in changed)  # EMA keys / queue moved
    batch.globals[0, 0, 0, 0] = float("nan")
    train_step(objective, model, batch, 1, 10, autocast, optimizer)
    assert not bool(optimizer.last_step_ok)
    after_bad = snapshot()
    assert [k for k in after_good if not _equal(after_good[k], after_bad[k])] == []


def _flatten(tree, prefix=""):
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(tree, (list, tuple)) and tree and not isinstance(tree[0], (int, float, str)):
        for i, value in enumerate(tree):
            out.update(_flatten(value, f"{prefix}[{i}]"))
    else:
        out[prefix] = tree
    return out


def _equal(a, b):
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as ENOSPC would
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
    from wcl_fast.train import main
    sys.exit(main(sys.argv[2:]))
""")


def test_a_failing_checkpoint_write_stops_with_one_line_and_keeps_the_previous_file(tmp_path):
    args = ["--config", str(SMOKE), f"train.out_dir={tmp_path}", "train.epochs=1", "data.local_crops=0"]
    assert train_main(args) == 0
    previous = (tmp_path / "checkpoint.pt").read_bytes()
    limit = len(previous) // 2  # the checkpoint no longer fits; the small log lines still do
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(limit), *args, "train.epochs=2", "train.resume=auto"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and f"could not write checkpoint '{tmp_path / 'checkpoint.pt'}': File too large" in line[0]
    assert "the previous 'checkpoint.pt' there is intact" in line[0]
    assert (tmp_path / "checkpoint.pt").read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_temporaries_of_interrupted_writes_are_removed_on_the_next_start(tmp_path, capsys):
    tmp_path.mkdir(exist_ok=True)
    for name in (".checkpoint.pt.abc123.tmp", ".checkpoint.pt.zz9.tmp"):
        (tmp_path / name).write_bytes(b"\0" * 2**20)  # what a kill during atomic_save leaves
    (tmp_path / "notes.tmp").write_text("a user's file")  # not ours: kept
    assert train_main(["--config", str(SMOKE), f"train.out_dir={tmp_path}", "train.stop_at_step=1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == ["notes.tmp"]
    assert "removed 2 temporary file(s) of interrupted checkpoint writes (2.0 MB)" in capsys.readouterr().err


def test_numbers_as_people_write_them_are_floats(tmp_path):
    yaml_file = tmp_path / "x.yaml"
    yaml_file.write_text("optim:\n  weight_decay: 1e-5\n  base_lr: 5e-1\nloss:\n  tau: 1.0e-1\n")
    cfg = load_config(yaml_file, ["optim.lr_scale=2E-2", "knn.temperature=.5"])
    assert (cfg.optim.weight_decay, cfg.optim.base_lr, cfg.loss.tau, cfg.optim.lr_scale, cfg.knn.temperature) == \
        (1e-5, 0.5, 0.1, 0.02, 0.5)
    assert load_config(None, ["train.out_dir=1e5"]).train.out_dir == "1e5"  # a str key keeps what was written


@pytest.mark.parametrize("override,key", [("model.head_out=0", "model.head_out"), ("model.head_hidden=-4", "model.head_hidden"),
                                          ("data.std=[0.2,0,0.2]", "data.std"), ("data.eval_crop=0", "data.eval_crop"),
                                          ("optim.base_lr=-0.1", "optim.base_lr"), ("optim.weight_decay=-1e-6", "optim.weight_decay"),
                                          ("optim.momentum=-0.9", "optim.momentum"), ("linear.lr_scale=0", "linear.lr_scale")])
def test_values_out_of_range_name_their_key(override, key):
    with pytest.raises(ConfigError, match=rf"config key '{key}' must"):
        load_config(SMOKE, [override])


def _bad_checkpoints(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {"net.conv1.weight": torch.zeros(1)}}, good)
    files = {"missing": tmp_path / "nope.pt", "empty": tmp_path / "empty.pt", "truncated": tmp_path / "trunc.pt",
             "garbage": tmp_path / "garbage.pt"}
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(good.read_bytes()[:200])
    files["garbage"].write_bytes(b"definitely not a checkpoint" * 20)
    return files


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "garbage", "other_arch"])
def test_bad_checkpoints_are_one_line_and_exit_2_in_every_command(tmp_path, capsys, case):
    from wcl_fast import export, finetune, knn, linear
    from wcl_fast.model import build_encoder

    files = _bad_checkpoints(tmp_path)
    if case == "other_arch":
        files[case] = tmp_path / "r34.pth"
        torch.save(build_encoder("resnet34").state_dict(), files[case])
    path = files[case]
    val = write_colour_folder(tmp_path / "val", classes=2, per_class=3, sizes=(36, 40))
    common = ["--config", str(SMOKE), "data.backend=reference", f"data.train_dir={val}", f"data.val_dir={val}",
              "data.batch_size=4", "data.local_crops=0", "knn.k=2"]
    commands = {"train": lambda: train_main(common + [f"train.out_dir={tmp_path / 'run'}", f"train.resume={path}"]),
                "knn": lambda: knn.main(common + [f"checkpoint={path}"]),
                "linear": lambda: linear.main(common + [f"linear.checkpoint={path}", f"linear.out_dir={tmp_path / 'lin'}"]),
                "finetune": lambda: finetune.main(common + [f"finetune.checkpoint={path}"]),
                "export": lambda: export.main(["--checkpoint", str(path), "--out", str(tmp_path / "out.pth")])}
    for name, run in commands.items():
        if case == "other_arch" and name in ("export",):
            continue
        assert run() == 2, name
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(path) in errors[0] and "Traceback" not in err, (name, err[-1500:])
        if case == "other_arch" and name != "train":
            assert "model.arch=resnet18" in errors[0] and "this model lacks (first: 'layer1.2.conv1.weight')" in errors[0]


def test_a_torchvision_state_dict_loads_in_knn_and_the_linear_probe(tmp_path):
    from wcl_fast.config import to_dict
    from wcl_fast.evaluation import load_encoder
    from wcl_fast.model import build_encoder

    weights = build_encoder("resnet18").state_dict()
    weights["fc.weight"], weights["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)  # torchvision's classifier
    torch.save(weights, tmp_path / "resnet18.pth")
    cfg = load_config(SMOKE, [f"linear.checkpoint={tmp_path / 'resnet18.pth'}"])
    encoder = load_encoder(cfg, torch.device("cpu"))
    assert torch.equal(encoder.conv1.weight, weights["conv1.weight"]) and to_dict(cfg)["model"]["arch"] == "resnet18"


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_an_out_dir_that_is_a_file_or_unwritable_is_one_line(tmp_path, capsys, kind):
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("x")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes everywhere")
        target.mkdir()
        target.chmod(0o500)
    assert train_main(["--config", str(SMOKE), f"train.out_dir={target}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.out_dir:") and err.count("\n") == 1
