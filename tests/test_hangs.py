"""Nothing hangs: every end of a training run -- an exception in the step, a second signal while reads do
not return, every image deleted mid-run, a read that blocks (a FIFO), a DataLoader worker killed (as by the
OOM killer), an exception on one rank under torchrun -- ends the trainer and its loader worker processes
within 30 s, with a non-zero exit code and one `error:` line (docs/running.md, faults). Each case is one
trainer subprocess, under a deadline: a regression fails the test instead of hanging the suite."""
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import THREADS, write_colour_folder

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "cpu_smoke.yaml"
ENV = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONPATH=str(ROOT))
EXIT_WITHIN_S = 30.0

# the trainer's program entry (python -m wcl_fast.train) with a fault injected: FAULT_RAISE_AT="rank:call" raises
# in that rank's train_step call; FAULT_FFCV_BLOCK_AT=n blocks FFCV's reader thread in its n-th batch for ever
FAULTS = textwrap.dedent("""
    import os, sys, threading
    import wcl_fast.train as train
    from wcl_fast.signals import run_program

    if os.environ.get("FAULT_RAISE_AT"):
        rank, call = os.environ["FAULT_RAISE_AT"].split(":")
        calls, step = [0], train.train_step

        def train_step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == int(call) and os.environ.get("RANK", "0") == rank:
                raise RuntimeError("injected fault in the step")
            return step(*args, **kwargs)

        train.train_step = train_step
    if os.environ.get("FAULT_FFCV_BLOCK_AT"):
        from ffcv.loader.epoch_iterator import EpochIterator

        runs, run_pipeline = [0], EpochIterator.run_pipeline

        def blocking(self, *args, **kwargs):
            runs[0] += 1
            if runs[0] == int(os.environ["FAULT_FFCV_BLOCK_AT"]):
                threading.Event().wait()  # a read through FFCV's memory map that never returns
            return run_pipeline(self, *args, **kwargs)

        EpochIterator.run_pipeline = blocking
    run_program(lambda: train.main(sys.argv[1:]))
""")


# rank 0 of a two-process gloo group waits in a barrier that rank 1 never reaches: its main thread is blocked in
# C++, where no Python signal handler runs, as behind a collective whose peer is stuck
BLOCKED = textwrap.dedent("""
    import os, sys, time
    import torch.distributed as dist
    from wcl_fast.signals import StopRequest

    rank = int(sys.argv[1])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if rank == 1:
        time.sleep(120)
        sys.exit(0)
    StopRequest(last_good=lambda: "the last good checkpoint is 'X'").install()
    print("blocked", file=sys.stderr, flush=True)
    dist.barrier()
""")


def _has(module: str) -> bool:  # without importing it (FFCV's import changes torch's thread count)
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One small ImageFolder (2 x 16 images: 2 steps of 16 per epoch, every image read in every epoch) and the
    fault script; a case that changes the images works on its own copy."""
    base = tmp_path_factory.mktemp("hangs")
    folder = write_colour_folder(base / "train", classes=2, per_class=16, sizes=(36, 52))
    script = base / "faults.py"
    script.write_text(FAULTS)
    return folder, script


def _args(out_dir: Path, backend: str = "reference", **data) -> list[str]:
    options = {"backend": backend, "workers": 2, "batch_size": 16, "local_crops": 0, "global_size": 32, **data}
    return ["--config", str(SMOKE), f"train.out_dir={out_dir}", "train.epochs=200", "train.log_interval=1",
            "model.widths=[8,16,16,32]", "model.head_hidden=32", "model.head_out=16",
            *(f"data.{key}={value}" for key, value in options.items())]


def _processes() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, state, start time) of every process, from /proc (the start time tells a reused pid)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            found[int(entry.name)] = (int(fields[1]), fields[0], int(fields[19]))
    return found


def _alive(pid: int, start: int) -> bool:
    state = _processes().get(pid)
    return state is not None and state[1] not in ("Z", "X") and state[2] == start


class Run:
    """One trainer subprocess in its own session (as a cluster or a terminal starts it), its stderr in a file,
    and every process it started (DataLoader workers, torchrun's ranks) noted while it runs."""

    def __init__(self, command: list[str], out_dir: Path, **env):
        self.out_dir = out_dir
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.stderr_path = out_dir.parent / f"{out_dir.name}.stderr"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(command, cwd=ROOT, env={**ENV, **env}, stdout=subprocess.DEVNULL,
                                         stderr=stderr, start_new_session=True)
        self.started: dict[int, int] = {}  # pid -> start time

    def note(self) -> list[int]:
        """This run's live descendants (noted)."""
        table, found, todo = _processes(), [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            kids = [child for child, (parent, state, _) in table.items() if parent == pid and state not in ("Z", "X")]
            found += kids
            todo += kids
        self.started.update((pid, table[pid][2]) for pid in found)
        return found

    def steps(self) -> list[int]:
        path = self.out_dir / "log.jsonl"
        if not path.exists():
            return []
        return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]

    def wait_for(self, ready, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self.note()
            assert self.proc.poll() is None, f"ended before {what}: {self.stderr()[-3000:]}"
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {what} within {timeout:.0f} s: {self.stderr()[-3000:]}")
            time.sleep(0.1)

    def wait_steps(self, count: int) -> None:
        self.wait_for(lambda: len(self.steps()) >= count, f"{count} logged steps")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        for pid in self.note():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()

    def ends(self, within: float = EXIT_WITHIN_S, lines: int = 1):
        """Waits (at most `within` s) for the run to end; asserts that it did, that no process it started is
        left and that it printed `lines` `error:` lines (one per process that failed); returns (exit code, the
        line) (with lines > 1: (exit code, the lines))."""
        deadline = time.monotonic() + within
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.note()
            time.sleep(0.1)
        if self.proc.poll() is None:
            left = self.note()
            self.kill()
            raise AssertionError(f"still running {within:.0f} s after the fault ({len(left)} processes under it): "
                                 f"{self.stderr()[-3000:]}")
        time.sleep(0.3)  # the kernel delivers a parent-death signal asynchronously
        left = [pid for pid, start in self.started.items() if _alive(pid, start)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes of the run left behind: {left}"
        err = self.stderr()
        found = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(found) == lines, err[-3000:]
        return self.proc.returncode, (found[0] if lines == 1 else found)


def _trainer(data, out_dir: Path, *args, script: bool = False, **env) -> Run:
    entry = [str(data[1])] if script else ["-m", "wcl_fast.train"]
    return Run([sys.executable, *entry, *args], out_dir, **env)


def _copy(folder: Path, base: Path) -> Path:
    return Path(shutil.copytree(folder, base / "train"))


def _last_good(line: str, checkpoint: Path) -> None:
    """The line names `checkpoint` as the last good one, and that file is intact: it loads, at that global step."""
    named = re.search(rf"the last good checkpoint is '{re.escape(str(checkpoint))}' \(epoch \d+, step \d+, "
                      rf"global step (\d+)\)", line)
    assert named, line
    assert torch.load(checkpoint, weights_only=True)["global_step"] == int(named.group(1))


# ---------------------------------------------------------------- the cases, each one trainer subprocess
# Every case of the selected tests starts at once (the module fixture `cases`): a case is mostly waiting (for a
# step, a signal's window, a read timeout, an exit), so the module takes about as long as its slowest case.


def exception_in_step(data, base: Path):
    run = _trainer(data, base / "run", *_args(base / "run", train_dir=data[0]), script=True, FAULT_RAISE_AT="0:3")
    run.wait_steps(2)  # the third step raises
    return run, *run.ends()


def second_signal(data, base: Path):
    folder = _copy(data[0], base)
    for image in folder.rglob("*.jpg"):  # a hung mount: no read returns
        image.unlink()
        os.mkfifo(image)
    run = _trainer(data, base / "run", *_args(base / "run", train_dir=folder))
    run.wait_for(lambda: len(run.note()) >= 2, "DataLoader workers")
    time.sleep(1.0)  # the workers are blocked opening their first FIFO
    os.killpg(run.proc.pid, signal.SIGINT)  # Ctrl-C: the stop waits for a step boundary that does not come
    time.sleep(8.0)  # well past StopRequest.REPEAT_WINDOW_S: a second signal, not a copy of the first
    os.killpg(run.proc.pid, signal.SIGINT)
    return run, *run.ends(), folder


def images_deleted(data, base: Path):
    folder = _copy(data[0], base)
    run = _trainer(data, base / "run", *_args(base / "run", train_dir=folder))
    run.wait_steps(2)
    for image in folder.rglob("*.jpg"):
        image.unlink()
    return run, *run.ends()


def fifo_read(backend: str):
    def case(data, base: Path):
        folder = _copy(data[0], base)
        run = _trainer(data, base / "run", *_args(base / "run", backend, train_dir=folder,
                                                  workers=2 if backend == "reference" else 1, read_timeout=3))
        run.wait_steps(2)  # epoch 0 and its checkpoint are done; every later epoch reads every image
        fifo = folder / "c1" / "7.jpg"
        fifo.unlink()
        os.mkfifo(fifo)
        return run, *run.ends(), fifo

    return case


def killed_worker(data, base: Path):
    run = _trainer(data, base / "run", *_args(base / "run", train_dir=data[0]))
    run.wait_steps(2)
    run.wait_for(lambda: (run.out_dir / "checkpoint.pt").exists(), "epoch 0's checkpoint")  # written after step 2
    workers = run.note()
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)  # what the OOM killer does
    return run, *run.ends(), workers[0]


def ffcv_blocked_read(data, base: Path):
    beton = base / "train.beton"
    base.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pipelines.convert", "--src", str(data[0]), "--out", str(beton),
                    "--workers", "1"], cwd=ROOT, env=ENV, capture_output=True, check=True, timeout=300)
    run = _trainer(data, base / "run", *_args(base / "run", "ffcv", beton=beton, workers=1, read_timeout=3),
                   script=True, FAULT_FFCV_BLOCK_AT="3")  # FFCV's thread blocks in epoch 1's first batch
    run.wait_steps(2)
    return run, *run.ends(), beton


def blocked_main_thread(data, base: Path):
    from conftest import free_port

    base.mkdir(parents=True)
    script, port = base / "blocked.py", str(free_port())
    script.write_text(BLOCKED)
    peer = subprocess.Popen([sys.executable, str(script), "1", port], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        run = Run([sys.executable, str(script), "0", port], base / "rank0")
        out = base / "rank0.stderr"
        run.wait_for(lambda: "blocked" in out.read_text(), "the barrier")
        time.sleep(1.0)
        os.kill(run.proc.pid, signal.SIGINT)
        time.sleep(8.0)
        os.kill(run.proc.pid, signal.SIGINT)
        started = time.monotonic()
        code, line = run.ends()
        return run, code, line, time.monotonic() - started
    finally:
        peer.kill()
        peer.wait()


def torchrun_exception(data, base: Path):
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(data[1])]
    run = Run([sys.executable, *torchrun, *_args(base / "run", train_dir=data[0], workers=1)], base / "run",
              FAULT_RAISE_AT="0:3", OMP_NUM_THREADS="1")
    run.wait_steps(2)  # rank 0's third step raises; rank 1 waits for it in a collective
    return run, *run.ends(lines=2)


CASES = {  # test name -> (case, the module it needs)
    "test_an_exception_in_the_step_ends_the_run_and_its_workers": (exception_in_step, None),
    "test_a_second_signal_ends_a_run_whose_reads_never_return": (second_signal, None),
    "test_every_image_deleted_mid_run_is_one_line_and_ends_the_workers": (images_deleted, None),
    "test_a_read_that_never_returns_is_named_and_stops_the_run": (fifo_read("reference"), None),
    "test_dali_a_read_that_never_returns_in_its_reader_threads_is_named": (fifo_read("dali"), "nvidia.dali"),
    "test_ffcv_a_read_that_never_returns_in_its_threads_is_named": (ffcv_blocked_read, "ffcv"),
    "test_a_killed_worker_ends_the_run_with_one_line": (killed_worker, None),
    "test_torchrun_an_exception_on_one_rank_ends_every_rank": (torchrun_exception, None),
    "test_a_second_signal_ends_the_process_even_when_the_main_thread_cannot_run_python": (blocked_main_thread, None),
}


@pytest.fixture(scope="module")
def cases(request, data, tmp_path_factory):
    """The futures of the cases of this module's selected tests, all started at once (threads waiting on their
    subprocesses); each test takes its own result (an assertion failed inside its case is raised there)."""
    from concurrent.futures import ThreadPoolExecutor

    names = [item.name for item in request.session.items if item.module.__name__ == __name__ and item.name in CASES]
    wanted = [name for name in names if CASES[name][1] is None or _has(CASES[name][1])]
    base = tmp_path_factory.mktemp("cases")
    with ThreadPoolExecutor(max(1, len(wanted))) as pool:
        yield {name: pool.submit(CASES[name][0], data, base / f"case{i}") for i, name in enumerate(wanted)}


def _outcome(cases, request):
    return cases[request.node.name].result(timeout=600)


def test_an_exception_in_the_step_ends_the_run_and_its_workers(cases, request):
    run, code, line = _outcome(cases, request)
    assert code == 1 and "Traceback" in run.stderr()
    assert "unexpected RuntimeError: injected fault in the step" in line


def test_a_second_signal_ends_a_run_whose_reads_never_return(cases, request):
    run, code, line, folder = _outcome(cases, request)
    assert code == 128 + signal.SIGINT, line
    assert line.startswith("error: aborted by a second SIGINT") and f"files being read: '{folder}" in line
    assert "Traceback" not in run.stderr()


def test_every_image_deleted_mid_run_is_one_line_and_ends_the_workers(cases, request):
    run, code, line = _outcome(cases, request)
    assert code == 6 and "16 consecutive unreadable images" in line and "Traceback" not in run.stderr()
    _last_good(line, run.out_dir / "checkpoint.pt")


def _named_fifo(run, code, line, fifo):
    assert code == 6, line
    assert line.startswith(f"error: reading '{fifo}' has not returned after") and "(data.read_timeout=3)" in line
    _last_good(line, run.out_dir / "checkpoint.pt")


def test_a_read_that_never_returns_is_named_and_stops_the_run(cases, request):
    """The reference loader: the read blocks in a DataLoader worker process."""
    _named_fifo(*_outcome(cases, request))


@pytest.mark.skipif(not _has("nvidia.dali"), reason="needs DALI")
def test_dali_a_read_that_never_returns_in_its_reader_threads_is_named(cases, request):
    _named_fifo(*_outcome(cases, request))


@pytest.mark.skipif(not _has("ffcv"), reason="needs FFCV")
def test_ffcv_a_read_that_never_returns_in_its_threads_is_named(cases, request):
    run, code, line, beton = _outcome(cases, request)
    assert code == 6, line
    assert line.startswith(f"error: reading '{beton}' (records ") and "of step 0 of epoch 1) has not returned" in line
    _last_good(line, run.out_dir / "checkpoint.pt")


def test_a_killed_worker_ends_the_run_with_one_line(cases, request):
    run, code, line, worker = _outcome(cases, request)
    assert code == 6 and f"a data loader worker process (pid {worker}) was killed by SIGKILL" in line, line
    assert "Traceback" not in run.stderr()
    _last_good(line, run.out_dir / "checkpoint.pt")


def test_torchrun_an_exception_on_one_rank_ends_every_rank(cases, request):
    run, code, lines = _outcome(cases, request)
    assert code != 0
    assert any("unexpected RuntimeError: injected fault in the step" in line for line in lines)  # rank 0
    assert any(line.startswith("error: lost the connection to another rank") for line in lines)  # rank 1


def test_a_second_signal_ends_the_process_even_when_the_main_thread_cannot_run_python(cases, request):
    """The watchdog thread sees the signals through the wake-up descriptor and ends the process
    ABORT_GRACE_S after the second."""
    from wcl_fast.signals import ABORT_GRACE_S

    run, code, line, took = _outcome(cases, request)
    assert code == 128 + signal.SIGINT, line
    assert line.startswith("error: aborted by a second SIGINT") and "the main thread did not stop within" in line
    assert ABORT_GRACE_S - 1 <= took <= ABORT_GRACE_S + 5
