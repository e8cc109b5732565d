"""The device helper scripts: scripts/dali_wheels.sh (carry DALI to an offline GPU machine in parts)
and scripts/gpu_check.sh (shell syntax)."""
import hashlib
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "dali_wheels.sh"


def _run(*args, env):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True)


def test_dali_wheels_pack_then_install_joins_verifies_and_refuses_bad_parts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    wheels = {"nvidia_dali_cuda120-2.4.0-py3-none-manylinux_2_28_x86_64.whl": os.urandom(70 * 2**20),  # > 1 part
              "six-1.17.0-py2.py3-none-any.whl": os.urandom(1000)}
    for name, data in wheels.items():
        (src / name).write_bytes(data)
    out = tmp_path / "dali"
    env = {"DALI_WHEELS_DIR": str(out), "DALI_WHEELS_SRC": str(src)}
    packed = _run("pack", "cuda120", env=env)
    assert packed.returncode == 0, packed.stderr
    manifest = dict(line.split("=", 1) for line in (out / "manifest").read_text().splitlines())
    parts = manifest["parts"].split()
    assert manifest["variant"] == "cuda120" and parts == ["dali.tar.part-aa", "dali.tar.part-ab"]
    assert all((out / p).stat().st_size <= 60 * 2**20 for p in parts)  # each fits one 64 MiB carry
    joined = b"".join((out / p).read_bytes() for p in parts)
    assert hashlib.sha256(joined).hexdigest() == manifest["sha256"]

    dry = _run("install", "--dry-run", env={"DALI_WHEELS_DIR": str(out)})
    assert dry.returncode == 0, dry.stderr
    assert "--no-index" in dry.stdout and "nvidia-dali-cuda120" in dry.stdout
    assert all(name in dry.stdout for name in wheels)

    (out / "dali.tar.part-ab").write_bytes(joined[60 * 2**20:][:-1] + b"x")  # corrupted in transit
    bad = _run("install", "--dry-run", env={"DALI_WHEELS_DIR": str(out)})
    assert bad.returncode == 2 and "sha256" in bad.stderr
    (out / "dali.tar.part-ab").unlink()  # not carried yet
    missing = _run("install", "--dry-run", env={"DALI_WHEELS_DIR": str(out)})
    assert missing.returncode == 2 and "dali.tar.part-ab" in missing.stderr
    assert _run("pack", "cuda999", env=env).returncode == 2


def test_gpu_check_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0


def test_gpu_check_dry_run_writes_one_report_and_one_log(tmp_path):
    """GPU_CHECK_DRY=1 runs every step of scripts/gpu_check.sh on the CPU at toy sizes: the script's own
    logic (order, return codes, junit XML, the report's memory table, two files only)."""
    import json
    import sys

    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.log", "report.json"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    steps = report["steps"]
    assert list(steps)[:3] == ["headline", "train", "tests"] and "nn" in steps and "step" in steps
    assert all(step["rc"] == 0 for step in steps.values())
    assert report["tests"]["passed"] >= 1 and report["tests"]["failed"] == []
    assert set(report["memory"]) == {"none", "all"} and report["memory"]["all"]["traced_peak_gib"] > 0
    assert steps["nn"]["result"]["rows"][0]["keys"] == 256
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "resumed from" in log  # the end-to-end run stopped with a checkpoint and resume=auto continued it
