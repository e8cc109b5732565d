"""Images and files that break libraries, bad command-line arguments, and stop signals with every loader:
each case ends in a counted, named skip or one line and exit 2, never a hang, an abort or a traceback."""
import importlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import THREADS, write_colour_folder
from wcl_fast.config import ConfigError, DataConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "cpu_smoke.yaml"
ENV = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONPATH=str(ROOT))


def _has(module: str) -> bool:  # without importing it (FFCV's import changes torch's thread count)
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


needs_ffcv = pytest.mark.skipif(not _has("ffcv"), reason="needs FFCV")
needs_dali = pytest.mark.skipif(not _has("nvidia.dali"), reason="needs DALI")


def _save(array: np.ndarray, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- 16-bit images


def test_16bit_png_is_scaled_to_8_bits(tmp_path):
    from pipelines.images import load_rgb

    wide = np.array([[0, 257 * 100, 65535, 300], [128, 257 * 7 + 128, 40000, 1000]], dtype=np.uint16)
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # how PIL opens a 16-bit PNG
    expected = np.clip(np.rint(wide.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255
    decoded = np.asarray(load_rgb(path))
    assert decoded.shape == (2, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], expected)


# ---------------------------------------------------------------- links, loops, unreadable files


def _folder_with_links(root: Path) -> tuple[Path, list[str]]:
    """c0: 3 images, a folder link back to c0 (a loop), a self-referencing link, a dangling link;
    c1: 3 images (one in a sub-folder reached twice, directly and through a link). Returns the
    folder and the two unreadable entries."""
    for c in range(2):
        for i in range(3):
            target = root / f"c{c}" / ("sub" if c == 1 and i == 2 else "") / f"{i}.jpg"
            _save(_noise(40, 48, 10 * c + i), target, quality=95)
    (root / "c0" / "loop").symlink_to(root / "c0", target_is_directory=True)
    (root / "c0" / "self.jpg").symlink_to(root / "c0" / "self.jpg")
    (root / "c0" / "gone.jpg").symlink_to(root / "c0" / "missing.jpg")
    (root / "c1" / "alias").symlink_to(root / "c1" / "sub", target_is_directory=True)
    return root, [str(root / "c0" / "gone.jpg"), str(root / "c0" / "self.jpg")]


def test_symlink_loops_and_dangling_links_are_counted_and_named(tmp_path, capfd):
    from pipelines.images import scan_image_folder
    from pipelines.pil import build_eval_loader

    root, unreadable = _folder_with_links(tmp_path / "val")
    samples, classes = scan_image_folder(root, "data.val_dir")
    assert classes == ["c0", "c1"]
    paths = [p for p, _ in samples]
    assert len(paths) == 8 and len(set(paths)) == 8  # 6 images once each (the linked sub-folder once) + 2 links
    assert set(unreadable) <= set(paths)
    assert "links back to" in capfd.readouterr().err  # the folder loop is named, not followed
    cfg = DataConfig(val_dir=str(root), workers=0, eval_resize=40, eval_crop=32)
    loader, total, _ = build_eval_loader(cfg, str(root), "data.val_dir", 4, 0, 1, False)
    batches = list(loader)
    assert total == 8 and sum(b.failed for b in batches) == 2
    assert sum(b.globals.shape[0] for b in batches) == 6
    kept = sorted(int(i) for b in batches for i in b.index)
    assert [paths[i] for i in kept] == sorted(set(paths) - set(unreadable))
    err = capfd.readouterr().err
    for path in unreadable:
        assert f"skipped unreadable image '{path}'" in err and "left out of the evaluation" in err


# ---------------------------------------------------------------- evaluation counts


def _val_with_unreadable(root: Path) -> Path:
    """12 images in 2 classes, 3 of them unreadable (garbage bytes, an empty file, a dangling link)."""
    for c in range(2):
        for i in range(6):
            _save(_noise(36, 36, 100 + 10 * c + i), root / f"c{c}" / f"{i}.jpg", quality=95)
    (root / "c0" / "1.jpg").write_bytes(b"not an image at all")
    (root / "c1" / "2.jpg").write_bytes(b"")
    (root / "c1" / "4.jpg").unlink()
    (root / "c1" / "4.jpg").symlink_to(root / "nowhere.jpg")
    return root


@pytest.mark.parametrize("backend", ["reference", pytest.param("dali", marks=needs_dali)])
def test_evaluation_counts_are_the_images_actually_evaluated(tmp_path, capsys, backend):
    from wcl_fast.knn import main as knn_main

    val = _val_with_unreadable(tmp_path / "val")
    train = write_colour_folder(tmp_path / "train", classes=2, per_class=6, sizes=(36, 44))
    code = knn_main(["--config", str(SMOKE), f"data.backend={backend}", f"data.train_dir={train}", f"data.val_dir={val}",
                     "data.eval_resize=36", "data.eval_crop=32", "knn.k=3", "knn.batch_size=5", "data.workers=1"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert "on 9 images (3 unreadable left out)" in out
    assert "data.val_dir: 3 of 12 images are unreadable and were left out" in err
    from wcl_fast.knn import evaluate_knn
    from wcl_fast.model import build_encoder

    cfg = load_config(SMOKE, [f"data.backend={backend}", f"data.train_dir={train}", f"data.val_dir={val}",
                              "data.eval_resize=36", "data.eval_crop=32", "knn.k=3", "knn.batch_size=5"])
    torch.manual_seed(0)
    result = evaluate_knn(build_encoder("resnet18", "imagenet", None), cfg, torch.device("cpu"))
    assert result["count"] == 9 and result["skipped"] == 3


# ---------------------------------------------------------------- the converter


CONVERT = textwrap.dedent("""
    import sys
    from pipelines.convert import convert
    convert(sys.argv[1], sys.argv[2], max_resolution=512, workers=2, quiet=True)
""")


@needs_ffcv
def test_the_converter_keeps_every_side_and_finishes(tmp_path):
    """A 2 x 10000 image capped at 512 px would get a 0-px side in FFCV's writer, whose worker then dies
    while the parent waits forever."""
    src = tmp_path / "src"
    _save(_noise(2, 10000, 1), src / "a" / "long.png")
    _save(_noise(1, 1, 2), src / "a" / "dot.png")
    _save(_noise(30, 40, 3), src / "b" / "ok.jpg", quality=95)
    out = tmp_path / "out.beton"
    done = subprocess.run([sys.executable, "-c", CONVERT, str(src), str(out)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    from pipelines.ffcv import open_beton

    meta = open_beton(str(out)).metadata["f0"]
    assert sorted(zip(meta["height"].tolist(), meta["width"].tolist())) == [(1, 1), (1, 512), (30, 40)]
    assert not list(tmp_path.glob("*.partial"))


WRITER_FAILURE = textwrap.dedent("""
    import os, signal, sys
    import pipelines.convert as convert_module
    original = convert_module.fit_resolution

    def failing(image, max_resolution):  # runs in FFCV's (forked) writer worker
        if image.shape[:2] == (33, 47):
            if sys.argv[3] == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            raise MemoryError("simulated")
        return original(image, max_resolution)

    convert_module.fit_resolution = failing
    sys.exit(convert_module.main(["--src", sys.argv[1], "--out", sys.argv[2], "--workers", "2"]))
""")


@needs_ffcv
@pytest.mark.parametrize("failure", ["exception", "killed"])
def test_a_writer_worker_failure_names_the_file_and_leaves_nothing(tmp_path, failure):
    """FFCV's parent process waits forever for a writer worker that died."""
    src = tmp_path / "src"
    for i in range(6):
        _save(_noise(30, 40, i), src / f"c{i % 2}" / f"{i}.jpg", quality=95)
    bad = _save(_noise(33, 47, 9), src / "c1" / "odd.jpg", quality=95)  # the only 33 x 47 image
    out = tmp_path / "out.beton"
    done = subprocess.run([sys.executable, "-c", WRITER_FAILURE, str(src), str(out), failure], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=180)
    err = done.stderr
    assert done.returncode == 2 and "Traceback" not in err, err[-2000:]
    line = [row for row in err.splitlines() if row.startswith("error:")]
    assert len(line) == 1 and f"'{bad}'" in line[0] and "nothing was written" in line[0]
    assert ("MemoryError: simulated" if failure == "exception" else "killed by signal 9") in line[0]
    assert not out.exists() and not list(tmp_path.glob("*.partial")) and not Path(str(out) + ".json").exists()


# ---------------------------------------------------------------- FFCV evaluation of tiny images


FFCV_EVAL = textwrap.dedent("""
    import json, sys
    import torch
    from pipelines.convert import convert
    from pipelines.ffcv import FFCVEvalLoader
    from wcl_fast.config import DataConfig
    convert(sys.argv[1], sys.argv[2], workers=1, quiet=True)
    cfg = DataConfig(backend="ffcv", beton=sys.argv[2], workers=1, eval_resize=36, eval_crop=32)
    loader = FFCVEvalLoader(cfg, sys.argv[2], 4, 0, 1)
    rows = {}
    for batch in loader:
        for image, index in zip(batch.globals, batch.index):
            rows[int(index)] = image.mean(dim=(1, 2)).tolist()
    print(json.dumps({"count": loader.count, "rows": rows}))
""")


@needs_ffcv
def test_ffcv_evaluation_of_a_1x1_image_does_not_abort(tmp_path):
    """FFCV's centre crop rounds a 1 x 1 image's side to 0 and OpenCV aborts the whole process."""
    src = tmp_path / "src"
    _save(np.full((1, 1, 3), (200, 10, 10), np.uint8), src / "a" / "dot.png")
    for i in range(3):
        _save(_noise(40, 50, i), src / "b" / f"{i}.png")
    done = subprocess.run([sys.executable, "-c", FFCV_EVAL, str(src), str(tmp_path / "v.beton")], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]  # -6 (SIGABRT) before
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["count"] == 4 and sorted(result["rows"]) == ["0", "1", "2", "3"]
    mean, std = DataConfig().mean, DataConfig().std
    # the 1 x 1 image (record 0: class a) becomes a uniform 32 x 32 crop of its colour (JPEG-stored, q 90)
    for channel, value in enumerate((200, 10, 10)):
        assert result["rows"]["0"][channel] == pytest.approx((value / 255 - mean[channel]) / std[channel], abs=0.12)


# ---------------------------------------------------------------- DALI's decode memory


@needs_dali
def test_dali_decodes_within_the_pixel_cap_and_names_images_over_it(tmp_path, capfd):
    from pipelines.dali import DaliEvalLoader, EncodedReader
    from pipelines.pil import build_eval_loader

    root = tmp_path / "val"
    for i in range(5):
        _save(_noise(40, 44, i), root / "a" / f"{i}.jpg", quality=95)
    yy, xx = np.mgrid[0:60, 0:300]
    smooth = np.stack([xx * 255 / 300, yy * 255 / 60, (xx + yy) * 255 / 360], -1).astype(np.uint8)
    big = _save(smooth, root / "b" / "wide.jpg", quality=95)  # 18,000 px
    reader = EncodedReader(max_pixels=5000)
    data, width, height = reader(str(big))
    assert (width, height) == (300, 60)  # the original size: crop geometry is computed on it
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.width * stored.height <= 5000 and abs(stored.width / stored.height - 5) < 0.2
    assert str(big) in reader.downscaled and "max_decode_pixels" in capfd.readouterr().err
    small = reader(str(root / "a" / "0.jpg"))
    assert small[0].tobytes() == (root / "a" / "0.jpg").read_bytes()  # within the cap: passed through untouched

    cfg = DataConfig(val_dir=str(root), workers=1, eval_resize=36, eval_crop=32, max_decode_pixels=5000)
    dali = DaliEvalLoader(cfg, str(root), "data.val_dir", 4, 0, 1, None)
    reference, _, _ = build_eval_loader(DataConfig(val_dir=str(root), workers=0, eval_resize=36, eval_crop=32),
                                        str(root), "data.val_dir", 4, 0, 1, False)
    got = {int(i): x for b in dali for i, x in zip(b.index, b.globals.float())}
    want = {int(i): x for b in reference for i, x in zip(b.index, b.globals.float())}
    assert sorted(got) == sorted(want) == list(range(6))
    assert len(dali.reader.downscaled) == 1
    assert (got[5] - want[5]).abs().mean() < 0.1  # the downscaled image: same view within resampling
    assert "wide.jpg" in capfd.readouterr().err


def test_the_pixel_cap_is_a_checked_config_key():
    assert load_config(SMOKE, ["data.max_decode_pixels=0"]).data.max_decode_pixels == 0
    with pytest.raises(ConfigError, match="data.max_decode_pixels"):
        load_config(SMOKE, ["data.max_decode_pixels=-1"])


# ---------------------------------------------------------------- bad .beton files


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    pytest.importorskip("ffcv")
    from pipelines.convert import convert

    base = tmp_path_factory.mktemp("betons")
    src = write_colour_folder(base / "src", classes=2, per_class=4, sizes=(36, 44))
    good = base / "good.beton"
    convert(str(src), str(good), workers=1, quiet=True)
    data = good.read_bytes()
    files = {"missing": None, "empty": b"", "short": data[:10], "truncated": data[: len(data) // 2],
             "tail cut": data[:-7], "not a beton": np.random.default_rng(0).bytes(5000)}
    paths = {}
    for name, content in files.items():
        path = base / f"{name.replace(' ', '_')}.beton"
        if content is not None:
            path.write_bytes(content)
        paths[name] = path
    return good, paths


@needs_ffcv
@pytest.mark.parametrize("case", ["missing", "empty", "short", "truncated", "tail cut", "not a beton"])
@pytest.mark.parametrize("command", ["train", "knn", "linear"])
def test_a_bad_beton_is_one_line_and_exit_2(betons, tmp_path, capsys, case, command):
    good, paths = betons
    bad = paths[case]
    main = importlib.import_module(f"wcl_fast.{command}").main
    key = "data.val_beton" if command == "knn" else "data.beton"
    beton_args = [f"data.beton={good}", f"data.val_beton={bad}"] if command == "knn" else [f"data.beton={bad}"]
    code = main(["--config", str(SMOKE), "data.backend=ffcv", *beton_args, f"train.out_dir={tmp_path / 'run'}",
                 "knn.at_end=false"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [row for row in err.splitlines() if row.strip() and not row.startswith("warning")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: '{bad}'"), err


@needs_ffcv
def test_a_good_beton_passes_the_check(betons):
    from pipelines.ffcv import open_beton

    good, _ = betons
    assert int(open_beton(str(good)).num_samples) == 8


# ---------------------------------------------------------------- bad command-line arguments


BAD_ARGUMENTS = [
    ("pipelines.convert", ["--src", "{folder}", "--out", "{tmp}/x.beton", "--max-resolution", "-3"], "--max-resolution"),
    ("pipelines.convert", ["--src", "{folder}", "--out", "{tmp}/x.beton", "--jpeg-quality", "101"], "--jpeg-quality"),
    ("pipelines.convert", ["--src", "{folder}", "--out", "{tmp}/x.beton", "--workers", "0"], "--workers"),
    ("pipelines.convert", ["--out", "{tmp}/x.beton"], "--src"),
    ("pipelines.convert", ["--src", "{folder}", "--out", "{tmp}/x.beton", "--compress-probability", "2"],
     "--compress-probability"),
    ("pipelines.convert", ["--src", "{tmp}/none", "--out", "{tmp}/x.beton"], "--src"),
    ("pipelines.bench", ["--batch", "0"], "--batch"),
    ("pipelines.bench", ["--backend", "bogus"], "--backend"),
    ("pipelines.bench", ["--data", "{tmp}/none"], "--data"),
    ("pipelines.bench", ["--json", "{tmp}/no/such/folder.json"], "--json"),
    ("kernels.bench", ["--sizes", "0"], "--sizes"),
    ("kernels.bench", ["--repeats", "x"], "--repeats"),
    ("kernels.bench", ["--json", "{tmp}"], "--json"),
    ("wcl_fast.bench_step", ["--config", str(SMOKE), "--steps", "0"], "--steps"),
    ("wcl_fast.bench_step", ["--config", str(SMOKE), "--scaling", "2"], "--scaling"),
    ("wcl_fast.compare", ["--seeds", "0"], "--seeds"),
    ("wcl_fast.compare", ["--out", "{tmp}/file"], "--out"),
    ("wcl_fast.compare", ["compare.overrides=[moco:optim.lr_scale=1]"], "compare.overrides"),
    ("wcl_fast.compare", ["compare.overrides=[slr:optim.bogus=1]"], "optim.bogus"),
    ("wcl_fast.demo", ["--json", "{tmp}/no/such/folder.json"], "--json"),
    ("wcl_fast.plot", ["{tmp}/none"], "log.jsonl"),
    ("wcl_fast.train", [], "--config"),
    ("wcl_fast.knn", ["--bogus"], "--config"),
    ("wcl_fast.export", ["--out", "{tmp}/x.pt"], "--checkpoint"),
]


@pytest.mark.parametrize("module,argv,names", BAD_ARGUMENTS, ids=[f"{m}:{n}" for m, _, n in BAD_ARGUMENTS])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, module, argv, names):
    folder = tmp_path / "folder" / "c0"
    _save(_noise(8, 8, 0), folder / "0.jpg")
    (tmp_path / "file").write_text("x")
    argv = [a.format(folder=folder.parent, tmp=tmp_path) for a in argv]
    main = importlib.import_module(module).main
    code = main(argv)  # returns: no SystemExit, no traceback
    out, err = capsys.readouterr()
    lines = [row for row in err.splitlines() if row.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], err
    assert not (tmp_path / "x.beton").exists()


# ---------------------------------------------------------------- stop signals with every loader


def _loader_args(backend: str, folder: Path, beton: Path | None, out_dir: Path) -> list[str]:
    args = ["--config", str(SMOKE), f"train.out_dir={out_dir}", f"data.backend={backend}", "data.batch_size=16",
            "data.local_crops=0", "train.epochs=200", "train.log_interval=1", "data.workers=1"]
    if backend == "dali":
        args.append(f"data.train_dir={folder}")
    if backend == "ffcv":
        args.append(f"data.beton={beton}")
    return args


def _steps(out_dir: Path) -> list[int]:
    path = out_dir / "log.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def signal_data(tmp_path_factory):
    base = tmp_path_factory.mktemp("signals")
    folder = write_colour_folder(base / "train", classes=2, per_class=16, sizes=(36, 52))
    beton = None
    if _has("ffcv"):
        from pipelines.convert import convert

        beton = base / "train.beton"
        convert(str(folder), str(beton), workers=1, quiet=True)
    return folder, beton


@pytest.mark.parametrize("backend,signum", [("synthetic", signal.SIGTERM),
                                            pytest.param("dali", signal.SIGINT, marks=needs_dali),
                                            pytest.param("ffcv", signal.SIGTERM, marks=needs_ffcv)])
def test_a_signal_to_the_process_group_checkpoints_and_resume_continues_exactly(signal_data, tmp_path, backend, signum):
    import time

    from wcl_fast.train import main as train_main

    folder, beton = signal_data
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "wcl_fast.train", *_loader_args(backend, folder, beton, run)],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while len(_steps(run)) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signum)  # the whole group, as SLURM, timeout or a container runtime send it
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and f"stop requested ({signal.Signals(signum).name})" in err, err[-3000:]
    assert "Traceback" not in err
    stopped_at = torch.load(run / "checkpoint.pt", weights_only=False)["global_step"]
    assert stopped_at >= 2 and max(_steps(run)) == stopped_at
    target = stopped_at + 2
    straight = tmp_path / "straight"
    assert train_main([*_loader_args(backend, folder, beton, run), "train.resume=auto", f"train.stop_at_step={target}"]) == 0
    assert train_main([*_loader_args(backend, folder, beton, straight), f"train.stop_at_step={target}"]) == 0
    a = torch.load(run / "checkpoint.pt", weights_only=False)
    b = torch.load(straight / "checkpoint.pt", weights_only=False)
    assert a["global_step"] == b["global_step"] == target
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
