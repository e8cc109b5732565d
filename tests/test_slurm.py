"""SLURM lifecycle (docs/running.md): SIGUSR1 and SIGHUP stop like SIGTERM, a signalled stop under SLURM
requeues the job once after its checkpoint (a fake scontrol on PATH), the periodic checkpoint inside
epochs, and scripts/slurm_train.sh passing the time limit's signal on to the job step."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wcl_fast.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "cpu_smoke.yaml"
TINY = ["model.widths=[8,16,16,32]", "model.head_hidden=32", "model.head_out=16"]  # seconds per run


def _fake_scontrol(folder: Path, record: Path, checkpoint: Path, rc: int = 0) -> Path:
    folder.mkdir(exist_ok=True)
    script = folder / "scontrol"
    script.write_text(f"#!/bin/sh\n[ -f '{checkpoint}' ] && on_disk=yes || on_disk=no\n"
                      f"echo \"$@ checkpoint=$on_disk\" >> '{record}'\n"
                      f"[ {rc} = 0 ] || echo 'slurm_requeue error: Invalid job id specified' >&2\nexit {rc}\n")
    script.chmod(0o755)
    return folder


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGHUP"])
def test_usr1_and_hup_write_a_checkpoint_and_exit_cleanly(tmp_path, sig):
    cmd = [sys.executable, "-m", "wcl_fast.train", "--config", str(SMOKE), f"train.out_dir={tmp_path}",
           "train.epochs=50", "train.log_interval=1", *TINY]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and log.read_text().count('"loss"') >= 2):
        time.sleep(0.3)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert f"stop requested ({sig})" in err
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert 2 <= state["global_step"] < 400


def _train_with_signal_at(tmp_path, monkeypatch, step: int, *overrides):
    """train() in this process; SIGUSR1 to this process during global step `step`."""
    import wcl_fast.train as wtrain

    real_step = wtrain.train_step

    def train_step(objective, ddp, batch, global_step, *args, **kwargs):
        if global_step == step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(objective, ddp, batch, global_step, *args, **kwargs)

    monkeypatch.setattr(wtrain, "train_step", train_step)
    cfg = load_config(SMOKE, [f"train.out_dir={tmp_path / 'run'}", "train.log_interval=1", "train.epochs=3", *TINY, *overrides])
    return wtrain.train(cfg)


@pytest.mark.parametrize("env, job", [({"SLURM_JOB_ID": "4242"}, "4242"),
                                      ({"SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}, "77_3")])
def test_a_signal_under_slurm_requeues_the_job_once_after_the_checkpoint(tmp_path, monkeypatch, capsys, env, job):
    record = tmp_path / "scontrol.txt"
    bin_dir = _fake_scontrol(tmp_path / "bin", record, tmp_path / "run" / "checkpoint.pt")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    summary = _train_with_signal_at(tmp_path, monkeypatch, 2)
    assert summary["global_step"] == 3  # stopped after the step in which the signal came
    assert record.read_text().splitlines() == [f"requeue {job} checkpoint=yes"]
    assert f"SLURM job {job}: requeued" in capsys.readouterr().err


def test_no_requeue_without_slurm_or_a_signal_and_one_line_when_scontrol_fails(tmp_path, monkeypatch, capsys):
    record = tmp_path / "scontrol.txt"
    bin_dir = _fake_scontrol(tmp_path / "bin", record, tmp_path / "run" / "checkpoint.pt", rc=1)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    _train_with_signal_at(tmp_path / "a", monkeypatch, 2)
    assert not record.exists()  # outside SLURM: nothing
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    cfg = load_config(SMOKE, [f"train.out_dir={tmp_path / 'b'}", "train.epochs=1", "train.stop_at_step=2", *TINY])
    from wcl_fast.train import train

    train(cfg)
    assert not record.exists()  # stopped by stop_at_step, not by a signal: nothing to requeue
    capsys.readouterr()
    _train_with_signal_at(tmp_path / "c", monkeypatch, 2)
    err = capsys.readouterr().err
    assert "SLURM job 99: scontrol requeue failed (slurm_requeue error: Invalid job id specified); resubmit" in err
    monkeypatch.setenv("PATH", "/nonexistent")
    _train_with_signal_at(tmp_path / "d", monkeypatch, 2)
    assert "SLURM job 99: scontrol is not on PATH, so the job was not requeued; resubmit" in capsys.readouterr().err


def test_the_periodic_checkpoint_is_written_inside_epochs(tmp_path, monkeypatch):
    from wcl_fast import checkpoint
    from wcl_fast.train import train

    saves = []
    real_save = checkpoint.Checkpointer.save

    def save(self, epoch, step_in_epoch, global_step):
        saves.append((epoch, step_in_epoch, global_step))
        return real_save(self, epoch, step_in_epoch, global_step)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    cfg = load_config(SMOKE, [f"train.out_dir={tmp_path}", "train.epochs=2", "train.checkpoint_every_minutes=1e-9", *TINY])
    train(cfg)
    # every step boundary inside an epoch (the timer has always run out), and every epoch end
    assert saves == [(0, 1, 1), (0, 2, 2), (0, 3, 3), (1, 0, 4), (1, 1, 5), (1, 2, 6), (1, 3, 7), (2, 0, 8)]
    saves.clear()
    train(load_config(SMOKE, [f"train.out_dir={tmp_path / 'off'}", "train.epochs=2", *TINY]))
    assert saves == [(1, 0, 4), (2, 0, 8)]  # 0 = off: epoch ends only


def test_slurm_script_passes_the_time_limit_signal_to_the_job_step(tmp_path):
    """scripts/slurm_train.sh with fake srun / scontrol: SIGUSR1 to the batch shell (--signal=B:USR1@...)
    reaches the job step as SIGTERM, and the script exits with the step's code once it has ended."""
    script = (ROOT / "scripts" / "slurm_train.sh").read_text()
    assert "#SBATCH --signal=B:USR1@" in script and "#SBATCH --requeue" in script
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    got = tmp_path / "step.txt"
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node0\n")
    (bin_dir / "srun").write_text(f"#!/bin/sh\ntrap 'echo TERM >> {got}; exit 0' TERM\necho started >> {got}\n"
                                  f"while true; do sleep 0.1; done\n")
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node0",
           "SLURM_NNODES": "1", "SLURM_JOB_ID": "5", "SLURM_GPUS_ON_NODE": "8"}
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "slurm_train.sh"), "configs/cpu_smoke.yaml"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and not (got.exists() and "started" in got.read_text()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert got.read_text().split() == ["started", "TERM"]
    assert "stop signal: checkpoint at the next step, then requeue" in out
