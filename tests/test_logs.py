"""Logs survive: a torn last line of log.jsonl is removed before appending, wcl_fast.plot skips an unparseable
line with a warning, and a full disk under the logs pauses logging (one warning) while training and its
checkpoints go on."""
import errno
import json
from pathlib import Path

import pytest
import torch

import wcl_fast.log as wlog
from wcl_fast.config import load_config
from wcl_fast.log import RunLogger
from wcl_fast.plot import PlotError, read_log

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "cpu_smoke.yaml"


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]  # every line must parse


def test_a_torn_last_line_is_removed_before_the_next_append(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # kill -9 mid-write
    logger = RunLogger(tmp_path, True, False)
    logger.scalars(3, {"loss": 1.25})
    logger.close()
    assert "cut off mid-write" in capsys.readouterr().err
    assert [r["step"] for r in _records(log)] == [1, 2, 3]
    assert [r["loss"] for r in read_log(tmp_path)] == [2.0, 1.5, 1.25]
    # an intact file is left as it is; a file holding only a torn line becomes empty
    before = log.read_bytes()
    RunLogger(tmp_path, True, False).close()
    assert log.read_bytes() == before
    log.write_text('{"step": 1')
    RunLogger(tmp_path, True, False).close()
    assert log.read_bytes() == b""


def test_plot_skips_lines_that_are_not_json_with_a_warning(tmp_path, capsys):
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo{"step": 2, "loss": 1.0}\n'
                                        '{"step": 3, "loss": 0.5}\n')
    assert [r["step"] for r in read_log(tmp_path)] == [1, 3]
    assert "skipped 1 line(s) that are not JSON (line 2)" in capsys.readouterr().err
    (tmp_path / "log.jsonl").write_text("this is not a log\n")
    with pytest.raises(PlotError, match="holds no JSON records"):
        read_log(tmp_path)


class _Disk:
    """Files opened by wcl_fast.log whose writes fail with ENOSPC while `full` is set (after writing half of
    the text, as a real full disk can)."""

    def __init__(self):
        self.full = False

    def open(self, path, mode="r", buffering=-1, **kwargs):
        disk = self
        real = open(path, mode, buffering=buffering, **kwargs)
        if "a" not in mode:  # reading / truncating: the real file
            return real

        class Handle:
            def write(self, text):
                if disk.full:
                    real.write(text[: len(text) // 2])
                    real.flush()
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real.write(text)

            def flush(self):
                real.flush()

            def close(self):
                real.close()

        return Handle()


def test_a_full_disk_pauses_logging_and_training_goes_on(tmp_path, monkeypatch, capsys):
    from wcl_fast.train import train

    disk = _Disk()
    monkeypatch.setattr(wlog, "open", disk.open, raising=False)
    real_scalars = RunLogger.scalars
    calls = {"n": 0}

    def scalars(self, step, values):
        calls["n"] += 1
        disk.full = 3 <= calls["n"] <= 5  # the disk fills after two records and frees up three later
        return real_scalars(self, step, values)

    monkeypatch.setattr(RunLogger, "scalars", scalars)
    cfg = load_config(SMOKE, [f"train.out_dir={tmp_path}", "train.log_interval=1", "train.epochs=2"])
    summary = train(cfg)
    err = capsys.readouterr().err
    assert summary["global_step"] == 8
    assert err.count("writing log.jsonl failed (No space left on device)") == 1
    assert "log.jsonl: logging resumed (3 record(s) could not be written meanwhile)" in err
    records = _records(tmp_path / "log.jsonl")  # every line parses: the half-written records were removed
    steps = [r["step"] for r in records if "loss" in r]
    assert steps[-1] == 8 and len(steps) >= 4
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["global_step"] == 8


def test_a_failing_tensorboard_writer_pauses_with_one_warning(tmp_path, capsys):
    class Writer:
        fail = True

        def add_scalar(self, *args):
            if Writer.fail:
                raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    logger = RunLogger(tmp_path, True, False)
    logger.writer = Writer()
    logger.scalars(1, {"loss": 1.0})
    logger.scalars(2, {"loss": 0.9})
    Writer.fail = False
    logger.scalars(3, {"loss": 0.8})
    logger.close()
    err = capsys.readouterr().err
    assert err.count("writing TensorBoard failed") == 1 and "TensorBoard: logging resumed" in err
    assert [r["step"] for r in _records(tmp_path / "log.jsonl")] == [1, 2, 3]


def test_the_objectives_own_counters_reach_log_jsonl(tmp_path):
    from wcl_fast.log import StepMeter

    logger = RunLogger(tmp_path, True, False)
    meter = StepMeter(logger, ("loss",), torch.device("cpu"), 8, 1, 4, 0)
    meter.add({"loss": torch.tensor(2.0)}, None)
    record = meter.log(1, 0, 1, 0.1, extra={"knn_unconverged": 3.0})
    logger.close()
    assert record["knn_unconverged"] == 3.0
    assert _records(tmp_path / "log.jsonl")[-1]["knn_unconverged"] == 3.0
