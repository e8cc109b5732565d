"""Reading a checkpoint never runs code from it: a planted pickle payload is refused (exit 2, one line naming
the file and the global, the payload never ran) by all seven commands that read checkpoints; the project's
own checkpoints load with weights_only=True; a checkpoint written the way earlier versions wrote it (numpy's
RNG state pickled) still resumes exactly; the safetensors export carries its sha256 and evaluates the same."""
import hashlib
import json
import os
import pickle
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_colour_folder
from wcl_fast.checkpoint import CheckpointError, load_checkpoint, rng_state, set_rng_state
from wcl_fast.config import load_config
from wcl_fast.train import main as train_main
from wcl_fast.train import train

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "cpu_smoke.yaml"
FAST = ["data.local_crops=0", "data.batch_size=8", "data.synthetic_size=32", "train.log_interval=1"]  # 4 steps per epoch


class RunsACommand:
    """Unpickling this calls os.system('touch <marker>') (pickled as the global posix.system): the payload
    of a planted checkpoint; the marker file exists only if it ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def _losses(out_dir: Path) -> dict:
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 1-epoch run (4 steps; the baseline of the exact resume) and a tiny image folder."""
    base = tmp_path_factory.mktemp("safe")
    straight = base / "straight"
    train(load_config(SMOKE, [f"train.out_dir={straight}", "train.epochs=1", *FAST]))
    images = write_colour_folder(base / "images", classes=2, per_class=3, sizes=(36, 40))
    return straight, images


def _eval_args(images: Path) -> list[str]:
    return ["--config", str(SMOKE), "data.backend=reference", f"data.train_dir={images}", f"data.val_dir={images}",
            "data.batch_size=4", "data.local_crops=0", "knn.k=2", "knn.batch_size=4"]


COMMANDS = ["knn", "linear", "finetune", "export", "export_official", "train_resume_path", "train_resume_auto"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_planted_payload_never_runs_in_any_command(runs, tmp_path, capsys, command):
    from wcl_fast import export, finetune, knn, linear

    straight, images = runs
    marker = tmp_path / "payload_ran"
    state = torch.load(straight / "checkpoint.pt", weights_only=True)
    if command == "export_official":  # the reference code's layout: {'model': {'module.net.*', ...}}
        state = {"model": {f"module.{key}": value for key, value in state["model"].items()}}
    state["extra"] = RunsACommand(marker)
    run_dir = tmp_path / "run"
    path = run_dir / "checkpoint.pt" if command == "train_resume_auto" else tmp_path / "planted.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save(state, path)
    common = _eval_args(images)
    calls = {"knn": lambda: knn.main(common + [f"checkpoint={path}"]),
             "linear": lambda: linear.main(common + [f"linear.checkpoint={path}", f"linear.out_dir={tmp_path / 'lin'}"]),
             "finetune": lambda: finetune.main(common + [f"finetune.checkpoint={path}"]),
             "export": lambda: export.main(["--checkpoint", str(path), "--out", str(tmp_path / "out.pth")]),
             "export_official": lambda: export.main(["--official", str(path), "--out", str(tmp_path / "out.pt")]),
             "train_resume_path": lambda: train_main(["--config", str(SMOKE), f"train.out_dir={run_dir}", "train.epochs=2",
                                                      f"train.resume={path}", *FAST]),
             "train_resume_auto": lambda: train_main(["--config", str(SMOKE), f"train.out_dir={run_dir}", "train.epochs=2",
                                                      "train.resume=auto", *FAST])}
    assert calls[command]() == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert f"checkpoint '{path}' asks to run 'posix.system'" in errors[0] and "weights_only=False" in errors[0], errors[0]
    assert not marker.exists()
    assert not (tmp_path / "out.pth").exists() and not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("form", ["protocol4", "legacy_format", "builtins"])
def test_other_pickle_forms_are_refused_by_name(tmp_path, form):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "x.pt"
    if form == "builtins":  # a builtin: torch's message names it bare ('exec'), the refusal in full
        class Exec:
            def __reduce__(self):
                return exec, (f"open({str(marker)!r}, 'w').close()",)

        torch.save({"w": torch.zeros(2), "x": Exec()}, path)
        named = "builtins.exec"
    else:  # protocol 4 (STACK_GLOBAL, FRAME: torch stops at the opcode; a static scan names the global)
        options = {"pickle_protocol": 4} if form == "protocol4" else {"_use_new_zipfile_serialization": False}
        torch.save({"w": torch.zeros(2), "x": RunsACommand(marker)}, path, **options)
        named = "posix.system"
    with pytest.raises(CheckpointError, match=rf"checkpoint '{path}' asks to run '{named}' when loaded"):
        load_checkpoint(path)
    assert not marker.exists()


def test_the_refusal_names_a_conversion_that_keeps_only_the_tensors(tmp_path):
    import datetime

    weights = {"conv1.weight": torch.randn(4, 3, 3, 3), "bn1.running_mean": torch.randn(4)}
    path = tmp_path / "trusted.pt"
    torch.save({"model": weights, "saved_on": datetime.date(2026, 1, 2)}, path)  # a harmless foreign global
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "asks to run 'datetime.date'" in message and "\n" not in message
    command = message.split("keep only its model tensors with: ")[1].split(" and use ")[0]
    assert command.startswith("python -c ")
    subprocess.run(shlex.split(command.replace("python", shlex.quote(sys.executable), 1)), check=True, timeout=120,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    converted = load_checkpoint(tmp_path / "trusted.weights.pt")
    assert set(converted) == set(weights) and all(torch.equal(converted[k], weights[k]) for k in weights)


def test_new_checkpoints_hold_only_weights_and_the_rng_round_trips(runs, tmp_path):
    straight, _ = runs
    state = torch.load(straight / "checkpoint.pt", weights_only=True)  # no allowlist needed
    assert isinstance(state["rng"]["numpy"], dict) and state["rng"]["numpy"]["key"].dtype == torch.int64
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    np.random.standard_normal()  # numpy now holds a cached Gaussian
    torch.save({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), np.random.randint(1 << 30), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.standard_normal(3).tolist(), np.random.randint(1 << 30), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_an_old_format_checkpoint_resumes_exactly(runs, tmp_path):
    straight, _ = runs
    run = tmp_path / "old"
    train(load_config(SMOKE, [f"train.out_dir={run}", "train.epochs=1", "train.stop_at_step=2", *FAST]))
    # rewrite the checkpoint as earlier versions wrote it: numpy's state as np.random.get_state()'s tuple
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    saved = state["rng"]["numpy"]
    state["rng"]["numpy"] = (saved["bit_generator"], saved["key"].numpy().astype(np.uint32), saved["pos"],
                             saved["has_gauss"], saved["gauss"])
    torch.save(state, run / "checkpoint.pt")
    with pytest.raises(pickle.UnpicklingError, match="numpy"):  # it does need numpy's globals
        torch.load(run / "checkpoint.pt", weights_only=True)
    old = load_checkpoint(run / "checkpoint.pt")
    set_rng_state(old["rng"])
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), state["rng"]["numpy"]))
    train(load_config(SMOKE, [f"train.out_dir={run}", "train.epochs=1", "train.resume=auto", *FAST]))
    a, b = _losses(straight), _losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 5)) and all(a[s] == b[s] for s in a), (a, b)
    final_a = torch.load(straight / "checkpoint.pt", weights_only=True)
    final_b = torch.load(run / "checkpoint.pt", weights_only=True)  # written anew: weights only again
    for key, value in final_a["model"].items():
        assert torch.equal(value, final_b["model"][key]), key
    for sa, sb in zip(final_a["optimizer"]["state"].values(), final_b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


def test_safetensors_export_has_its_sha256_and_evaluates_like_the_pth(runs, tmp_path, capsys):
    from wcl_fast import export, knn
    from wcl_fast.checkpoint import load_encoder_checkpoint
    from wcl_fast.model import build_encoder

    straight, images = runs
    out, pth = tmp_path / "encoder.safetensors", tmp_path / "encoder.pth"
    assert export.main(["--checkpoint", str(straight / "checkpoint.pt"), "--out", str(out), "--format", "safetensors"]) == 0
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert f"sha256 {digest}" in capsys.readouterr().out
    assert (tmp_path / "encoder.safetensors.sha256").read_text() == f"{digest}  encoder.safetensors\n"
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "-c", "encoder.safetensors.sha256"], cwd=tmp_path, check=True, capture_output=True)
    assert export.main(["--checkpoint", str(straight / "checkpoint.pt"), "--out", str(pth)]) == 0
    assert export.main(["--checkpoint", str(straight / "checkpoint.pt"), "--out", str(tmp_path / "e.pth"),
                        "--format", "safetensors"]) == 2  # the name must say what it is
    model = {"arch": "resnet18", "stem": "imagenet", "widths": None}
    encoders = [build_encoder("resnet18", "imagenet", None) for _ in range(2)]
    for encoder, path in zip(encoders, (out, pth)):
        load_encoder_checkpoint(encoder, path, model)
    for (key, a), b in zip(encoders[0].state_dict().items(), encoders[1].state_dict().values()):
        assert torch.equal(a, b), key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(encoders[0].eval()(x), encoders[1].eval()(x))
    with pytest.raises(CheckpointError, match=r"written with model.arch=resnet18"):  # the metadata's model
        load_encoder_checkpoint(build_encoder("resnet34", "imagenet", None), out, {"arch": "resnet34", "stem": "imagenet"})
    capsys.readouterr()
    lines = []
    for path in (out, pth):
        assert knn.main(_eval_args(images) + [f"checkpoint={path}"]) == 0
        lines.append([line for line in capsys.readouterr().out.splitlines() if line.startswith("kNN")])
    assert lines[0] == lines[1] and len(lines[0]) == 1
    (tmp_path / "cut.safetensors").write_bytes(out.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"could not be read .*not a safetensors file"):
        load_checkpoint(tmp_path / "cut.safetensors")
