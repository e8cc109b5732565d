"""WebDataset shards (pipelines/shards.py, pipelines/wds_write.py): shards written by the webdataset package read
locally and over HTTP on 127.0.0.1, crops equal to the reference loader's, the exact world-size-independent
order, failing reads, the converter's shards read by webdataset and indexed as DALI's wds2idx indexes them, and
bit-exact resume."""
import functools
import hashlib
import http.server
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_distributed, write_colour_folder
from pipelines.images import DataStop
from wcl_fast.config import ConfigError, load_config

webdataset = pytest.importorskip("webdataset")
ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "cpu_smoke.yaml"
PER_SHARD = 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_colour_folder(tmp_path_factory.mktemp("shards") / "train", classes=3, per_class=16, sizes=(28, 44))


def _write_with_webdataset(folder: Path, out: Path, damaged: dict | None = None) -> list[tuple[str, int]]:
    """Shards of `folder` in its sample order (sample id i = the reference loader's sample i), by webdataset's own
    ShardWriter, PER_SHARD samples each; damaged: {sample id: bytes written instead of its image}."""
    from pipelines.images import scan_image_folder

    samples, _ = scan_image_folder(folder)
    out.mkdir(parents=True)
    with webdataset.ShardWriter(str(out / "s-%03d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
        for i, (path, label) in enumerate(samples):
            image = (damaged or {}).get(i, Path(path).read_bytes())
            sink.write({"__key__": f"sample{i:05d}", "jpg": image, "cls": str(label).encode()})
    return samples


@pytest.fixture(scope="module")
def shard_dir(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("wds") / "shards"
    _write_with_webdataset(folder, out)
    return out


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the shard folder; `faults` (a dict on the server) makes requests fail: {name: [status, ...]} is
    answered with those statuses first, in turn (then the file)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.lstrip("/")
        queue = self.server.faults.get(name)
        if queue:
            self.send_error(queue.pop(0))
            return
        self.server.requests.append(name)
        super().do_GET()


@pytest.fixture(scope="module")
def server(shard_dir):
    handler = functools.partial(_Handler, directory=str(shard_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.faults, httpd.requests = {}, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


def _cfg(shards, *overrides):
    return load_config(SMOKE, ["data.backend=auto", f"data.shards={shards}", "data.shard_streams=4", "data.batch_size=8",
                               "data.workers=0", "data.shard_retries=2", "data.shard_backoff=0.01", *overrides])


def _loader(cfg, rank=0, world=1):
    from pipelines import build_loader

    return build_loader(cfg, "train", rank, world)


def _pattern(shard_dir):
    count = len(list(Path(shard_dir).glob("s-*.tar")))
    return f"{shard_dir}/s-{{000..{count - 1:03d}}}.tar"


# ------------------------------------------------------------------------------------------------- the shard list

def test_shard_list_forms_and_errors(shard_dir, tmp_path):
    from pipelines.shards import resolve_shards

    by_pattern = resolve_shards(_pattern(shard_dir))
    files = sorted(str(p) for p in shard_dir.glob("s-*.tar"))
    assert by_pattern.urls == files and resolve_shards(files).urls == files
    assert by_pattern.counts == [PER_SHARD] * 9 + [3] and by_pattern.total == 48
    with pytest.raises(ConfigError, match=r"data.shards: shard '.*/s-098.tar' could not be read \(not found\)"):
        resolve_shards(f"{shard_dir}/s-{{098..099}}.tar")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="is not a shard manifest"):
        resolve_shards(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="listed twice"):
        resolve_shards([files[0], files[0]])


# ------------------------------------------------------------------------------------------------- the order

def _naive_epoch(counts, seed, epoch, streams, batch):
    """The documented order written out in full: every global batch's sample ids of one epoch."""
    starts = np.concatenate([[0], np.cumsum(counts)])
    perm = np.random.default_rng([seed, epoch, 0x5348]).permutation(len(counts))
    sequence = [int(starts[k]) + int(q) for k in perm
                for q in np.random.default_rng([seed, epoch, 0x5348, 1, int(k)]).permutation(counts[k])]
    length = len(sequence) // streams
    share = batch // streams
    cut = [sequence[j * length:(j + 1) * length] for j in range(streams)]
    return [[i for j in range(streams) for i in cut[j][s * share:(s + 1) * share]] for s in range(length // share)]


def test_order_is_the_documented_one_and_the_same_at_every_world_size():
    from pipelines.shards import ShardList, ShardOrder, mixing

    counts = [7, 3, 9, 1, 6, 6, 8, 2, 5, 4, 7]
    shards = ShardList("data.shards", [f"s{i}.tar" for i in range(len(counts))], counts)
    for epoch in (0, 1, 5):
        expected = _naive_epoch(counts, 3, epoch, 4, 8)
        order = ShardOrder(shards, 8, 4, 1, 3)
        assert len(expected) == order.steps_per_epoch == (58 // 4) // 2
        got = [order.sample_ids(epoch, s) for s in range(order.steps_per_epoch)]
        assert got == expected
        flat = [i for ids in got for i in ids]
        assert len(set(flat)) == len(flat)  # no sample twice in an epoch
        for world in (2, 4):
            order_w = ShardOrder(shards, 8, 4, world, 3)
            per = 4 // world
            for s in range(order.steps_per_epoch):
                assert [i for r in range(world) for i in order_w.sample_ids(epoch, s, range(r * per, (r + 1) * per))] == got[s]
    assert _naive_epoch(counts, 3, 0, 4, 8) != _naive_epoch(counts, 3, 1, 4, 8)
    with pytest.raises(ConfigError, match="data.shard_streams=4 is not divisible by the world size 3"):
        ShardOrder(shards, 12, 4, 3, 0)
    with pytest.raises(ConfigError, match="data.batch_size=6 is not divisible by data.shard_streams=4"):
        ShardOrder(shards, 6, 4, 2, 0)
    measured = mixing(ShardOrder(shards, 8, 4, 1, 0), 0, 7)
    assert 4 <= measured["distinct_shards_per_batch"] <= 8
    assert measured["same_shard_pairs_uniform"] == pytest.approx(sum((c / 58) ** 2 for c in counts))


def _collect(loader, epoch, start=0, stop=None):
    batches = []
    for batch in loader.epoch(epoch, start):
        batches.append(batch)
        if stop is not None and len(batches) == stop - start:
            break
    return batches


def test_crops_equal_the_reference_loaders_and_follow_the_order(folder, shard_dir):
    from pipelines.images import ImageSource
    from pipelines.pil import MultiCropDataset

    cfg = _cfg(_pattern(shard_dir))
    loader = _loader(cfg)
    assert type(loader).__name__ == "ShardLoader" and len(loader) == 6 and loader.num_samples == 48
    reference = MultiCropDataset(ImageSource(*_split(folder)), cfg.data, cfg.train.seed)
    for epoch in (0, 1):
        batches = _collect(loader, epoch)
        assert [b.index.tolist() for b in batches] == [loader.order.sample_ids(epoch, s) for s in range(6)]
        for batch in batches[:2]:
            for row, sample_id in enumerate(batch.index.tolist()):
                globals_, locals_, actual, label, failed = reference[(epoch, sample_id)]
                assert (actual, label, failed) == (sample_id, batch.label[row].item(), 0)
                assert torch.equal(batch.globals[row], globals_[0]) and torch.equal(batch.globals[8 + row], globals_[1])
                assert torch.equal(batch.locals[row], locals_[0]) and torch.equal(batch.locals[8 + row], locals_[1])


def _split(folder):
    from pipelines.datasets import load_split

    samples, _, decode = load_split(load_config(SMOKE).data, str(folder), "data.train_dir", pretraining=True)
    return samples, decode


def test_worker_processes_and_a_late_start_give_the_same_batches(shard_dir):
    whole = _collect(_loader(_cfg(_pattern(shard_dir))), 2)
    late = _collect(_loader(_cfg(_pattern(shard_dir), "data.workers=2")), 2, start=3)
    for a, b in zip(whole[3:], late):
        assert torch.equal(a.index, b.index) and torch.equal(a.globals, b.globals) and torch.equal(a.locals, b.locals)


def _gloo_ids(rank, world, pattern, out):
    import torch.distributed as dist

    loader = _loader(_cfg(pattern), rank, world)
    steps = []
    for batch in loader.epoch(1):
        gathered = [torch.zeros(4, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(gathered, batch.index)
        steps.append(torch.cat(gathered).tolist())
    loader.close()  # its fetch threads end before the process group does
    if rank == 0:
        Path(out).write_text(json.dumps(steps))


def test_two_gloo_processes_read_the_one_process_global_batches(shard_dir, tmp_path):
    out = tmp_path / "ids.json"
    run_distributed(_gloo_ids, 2, _pattern(shard_dir), str(out))
    assert json.loads(out.read_text()) == [b.index.tolist() for b in _collect(_loader(_cfg(_pattern(shard_dir))), 1)]


# ------------------------------------------------------------------------------------------------- HTTP and faults

def test_http_shards_equal_local_ones_and_retries_transient_errors(shard_dir, server):
    base = f"http://127.0.0.1:{server.server_address[1]}"
    local = _collect(_loader(_cfg(_pattern(shard_dir))), 0, stop=3)
    count = len(list(shard_dir.glob("s-*.tar")))
    server.faults.update({"s-003.tar": [503, 500], "s-007.tar": [502]})  # fail, then serve
    remote_loader = _loader(_cfg(f"{base}/s-{{000..{count - 1:03d}}}.tar"))
    order = remote_loader.order
    read = {order.shards.names[k] for s in range(3) for j in range(4) for k, _ in order.positions(0, s, j)}
    server.faults.update({name: [503] for name in read})  # every shard these steps read fails once
    remote = _collect(remote_loader, 0, stop=3)
    for a, b in zip(local, remote):
        assert torch.equal(a.index, b.index) and torch.equal(a.globals, b.globals)
    assert not any(server.faults.values())


def test_a_shard_unreadable_after_retries_stops_with_one_line(shard_dir, server):
    base = f"http://127.0.0.1:{server.server_address[1]}"
    count = len(list(shard_dir.glob("s-*.tar")))
    loader = _loader(_cfg(f"{base}/s-{{000..{count - 1:03d}}}.tar", "data.shard_retries=1"))
    first = loader.order.shards.urls[loader.order.positions(0, 0, 0)[0][0]].rsplit("/", 1)[1]
    server.faults[first] = [503] * 5
    with pytest.raises(DataStop) as stop:
        _collect(loader, 0)
    text = str(stop.value)
    assert f"shard '{base}/{first}' could not be read after 2 tries" in text and "503" in text and "\n" not in text
    server.faults.clear()


def test_an_unreadable_sample_is_replaced_within_its_stream_counted_and_named(folder, tmp_path, capsys):
    from pipelines.shards import ShardOrder, resolve_shards

    shards = resolve_shards(_pattern_for(tmp_path, folder, {}))
    order = ShardOrder(shards, 8, 4, 1, load_config(SMOKE).train.seed)
    bad = order.sample_ids(0, 1)[5]  # row 5 of step 1: stream 2's second sample
    pattern = _pattern_for(tmp_path / "damaged", folder, {bad: b"not an image" * 4})
    batches = _collect(_loader(_cfg(pattern)), 0)
    expected = order.sample_ids(0, 1)
    assert [b.failed for b in batches] == [0, 1, 0, 0, 0, 0]
    assert batches[1].index.tolist() == expected[:5] + [expected[4]] + expected[6:]  # the next of stream 2's share, cyclically
    err = capsys.readouterr().err
    assert f"skipped unreadable sample '{'sample%05d' % bad}' of shard '" in err and f"(id {bad};" in err


def _pattern_for(root, folder, damaged):
    out = Path(root) / "shards"
    if not out.exists():
        _write_with_webdataset(folder, out, damaged)
    return _pattern(out)


# ------------------------------------------------------------------------------------------------- writing

def test_converter_writes_shards_webdataset_reads_dali_indexes_and_the_loader_streams(folder, tmp_path, capsys):
    import shutil

    from pipelines.convert import main as convert_main
    from pipelines.images import scan_image_folder

    src = tmp_path / "src"
    shutil.copytree(folder, src)
    (src / "c1" / "broken.jpg").write_bytes(b"garbage" * 10)
    (src / "c2" / "z.png").write_bytes(_png_bytes())
    out = tmp_path / "wds"
    assert convert_main(["--format", "wds", "--src", str(src), "--out", str(out), "--shard-size", "7", "--workers", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    samples, classes = scan_image_folder(src)
    assert manifest["count"] == 49 and manifest["classes"] == classes == ["c0", "c1", "c2"]
    assert [s["count"] for s in manifest["shards"]] == [7] * 7 and manifest["skipped"][0]["path"].endswith("broken.jpg")
    by_path = {}
    for entry in manifest["shards"]:
        tar = out / entry["name"]
        assert entry["sha256"] == hashlib.sha256(tar.read_bytes()).hexdigest()
        assert (out / entry["index"]).read_text() == _dali_index(tar)  # DALI's own indexer gives the same file
    got = list(webdataset.WebDataset(str(out / "shard-{000000..000006}.tar"), shardshuffle=False))
    assert len(got) == 49 and len({g["__key__"] for g in got}) == 49
    for path, label in samples:
        if not path.endswith("broken.jpg"):
            by_path[Path(path).read_bytes()] = label
    for g in got:
        image = g.get("jpg", g.get("png"))
        assert by_path[image] == int(g["cls"])  # the file's own bytes, its class id
    assert sum("png" in g for g in got) == 1
    _dali_reads(out, manifest, by_path)
    loader = _loader(_cfg(str(out / "manifest.json"), "data.shard_streams=7", "data.batch_size=7"))
    ids = [i for b in loader.epoch(0) for i in b.index.tolist()]
    assert sorted(ids) == list(range(49))
    assert convert_main(["--format", "wds", "--src", str(src), "--out", str(out), "--shard-size", "7"]) == 2
    assert "already holds shards (manifest.json); pass --force" in capsys.readouterr().err


def _dali_reads(out: Path, manifest: dict, by_path: dict) -> None:
    """DALI's own fn.readers.webdataset opens the shards with their index files, unchanged (CPU): every sample once,
    its image bytes and class as written."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    paths = [str(out / e["name"]) for e in manifest["shards"]]
    indexes = [str(out / e["index"]) for e in manifest["shards"]]

    @pipeline_def(batch_size=7, num_threads=1, device_id=None)
    def read():
        image, label = fn.readers.webdataset(paths=paths, index_paths=indexes, ext=["jpg;png", "cls"],
                                             missing_component_behavior="error")
        return image, label

    pipe = read()
    pipe.build()
    seen = []
    for _ in range(7):
        images, labels = pipe.run()
        for i in range(len(images)):
            image, label = bytes(np.asarray(images[i])), int(bytes(np.asarray(labels[i])).decode())
            assert by_path[image] == label
            seen.append(image)
    assert len(set(seen)) == 49


def _png_bytes():
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _dali_index(tar: Path) -> str:
    wds2idx = pytest.importorskip("wds2idx")  # ships with nvidia-dali
    target = tar.with_suffix(".dali.idx")
    with wds2idx.IndexCreator(str(tar), str(target), verbose=False) as creator:
        creator.create_index()
    return target.read_text()


# ------------------------------------------------------------------------------------------------- training

def _train_args(pattern, out_dir, *extra):
    return ["--config", str(SMOKE), f"train.out_dir={out_dir}", "data.backend=auto", f"data.shards={pattern}",
            "data.shard_streams=4", "data.batch_size=8", "data.workers=0", "data.local_crops=0", "train.epochs=2",
            "train.log_interval=1", "model.widths=[8,16,32,64]", *extra]


def test_stop_mid_epoch_and_resume_auto_is_bit_exact_and_other_shards_are_refused(shard_dir, tmp_path, capsys):
    from wcl_fast.train import main as train_main

    pattern = _pattern(shard_dir)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train_main(_train_args(pattern, straight, "train.stop_at_step=7")) == 0
    assert train_main(_train_args(pattern, stopped, "train.stop_at_step=3")) == 0
    state = torch.load(stopped / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 3) and state["data_identity"]["counts"][-1] == 3
    assert train_main(_train_args(pattern, stopped, "train.resume=auto", "train.stop_at_step=7")) == 0
    a, b = torch.load(straight / "checkpoint.pt", weights_only=False), torch.load(stopped / "checkpoint.pt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 7
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    fewer = pattern.replace(pattern[pattern.index("..") + 2:pattern.index("}")], "008")
    capsys.readouterr()
    assert train_main(_train_args(fewer, stopped, "train.resume=auto")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "other shards (10 shards (48 samples) there, 9 (45) here; missing here: s-009.tar)" in err[-1]


def test_evaluation_reads_val_shards_in_id_order_with_the_reference_transform(folder, shard_dir):
    from pipelines import build_eval_loader
    from pipelines.images import ImageSource
    from pipelines.pil import EvalDataset

    cfg = _cfg(_pattern(shard_dir), f"data.val_shards={_pattern(shard_dir)}", "data.eval_resize=36", "data.eval_crop=32")
    from pipelines import resolve_backend

    resolve_backend(cfg)
    reference = EvalDataset(ImageSource(*_split(folder)), cfg.data)
    seen = []
    for rank in (0, 1):
        loader, total, classes = build_eval_loader(cfg.data, cfg.data.val_dir, "data.val_dir", 10, rank, 2)
        assert (total, classes) == (48, 3)
        for batch in loader:
            for row, sample_id in enumerate(batch.index.tolist()):
                image, _, _, label, _ = reference[sample_id]
                assert torch.equal(batch.globals[row], image[0]) and batch.label[row].item() == label
                seen.append(sample_id)
    assert seen == list(range(48))


def test_a_read_that_hangs_is_named_in_the_reads_in_flight(shard_dir, server):
    import time

    from pipelines.images import ReadsInFlight, reads_in_flight
    from pipelines.shards import read_bytes

    class Slow(_Handler):
        def do_GET(self):
            time.sleep(1.5)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Slow, directory=str(shard_dir)))
    httpd.faults, httpd.requests = {}, []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/s-002.tar"
    tracker, done = ReadsInFlight(), []
    reader = threading.Thread(target=lambda: done.append(read_bytes(url, reads=tracker)))
    reader.start()
    time.sleep(0.8)
    named = [what for what, seconds in reads_in_flight() if url in what]
    reader.join()
    httpd.shutdown()
    assert named == [f"'{url}' (shard, try 1 of 1)"] and done[0] == (shard_dir / "s-002.tar").read_bytes()


def test_loader_bench_shard_rows_read_the_folders_images_and_report_mixing(folder, tmp_path, capsys):
    """pipelines.bench's shards rows: the folder converted once to <folder>.wds, read locally and from a local
    server that waits before every answer; the mixing figures against a count over the loader's own order."""
    import time
    import urllib.request

    from pipelines.bench import _serve, main
    from pipelines.shards import ShardOrder, resolve_shards

    out = tmp_path / "bench.json"
    assert main(["--data", str(folder), "--batch", "8", "--batches", "2", "--workers", "0", "--global-size", "32",
                 "--local-crops", "0", "--http-latency-ms", "20", "--json", str(out),
                 "--backend", "reference,shards,shards-http"]) == 0
    rows = {r["backend"]: r for r in json.loads(out.read_text())["rows"]}
    manifest = json.loads((folder.with_suffix(".wds") / "manifest.json").read_text())
    assert sum(s["count"] for s in manifest["shards"]) == 48  # every image of the folder
    shards = resolve_shards(str(folder.with_suffix(".wds") / "manifest.json"))
    order = ShardOrder(shards, 8, 8, 1, 0)
    distinct, same = [], []
    for step in range(order.steps_per_epoch):  # an independent count over the same order
        owners = [shards.locate(i)[0] for i in order.sample_ids(0, step)]
        distinct.append(len(set(owners)))
        same.append(sum(a == b for i, a in enumerate(owners) for j, b in enumerate(owners) if i != j) / (8 * 7))
    counts = [s["count"] for s in manifest["shards"]]
    for name in ("shards", "shards-http"):
        row = rows[name]
        assert row["samples_per_s"] > 0 and row["vs_folder"] == pytest.approx(row["samples_per_s"] / rows["reference"]["samples_per_s"])
        assert row["mixing"]["distinct_shards_per_batch"] == pytest.approx(sum(distinct) / len(distinct))
        assert row["mixing"]["same_shard_pairs"] == pytest.approx(sum(same) / len(same))
        assert row["mixing"]["same_shard_pairs_uniform"] == pytest.approx(sum((c / 48) ** 2 for c in counts))
    assert "shards-http: " in capsys.readouterr().out
    base = _serve(folder.with_suffix(".wds"), 0.2)
    start = time.perf_counter()
    with urllib.request.urlopen(f"{base}/manifest.json") as answer:
        assert json.loads(answer.read()) == manifest
    assert time.perf_counter() - start >= 0.2  # the added latency


# ------------------------------------------------------------------------------------------------- DALI

def test_dali_decodes_shards_as_it_decodes_the_folder_and_replaces_like_the_shard_loader(folder, tmp_path):
    """data.shard_decoder=dali: the shard loader's order and replacement rule feeding the DALI graph (CPU decoder
    here). Its batches equal those of the folder's DALI loader asked for the same sample ids (the shards hold the
    folder's files in its sample order), a late start equals the tail, and a damaged member is replaced exactly as
    the PIL shard loader replaces it."""
    pytest.importorskip("nvidia.dali")
    from pipelines.dali import DaliMultiCropLoader
    from pipelines.shards import ShardOrder, resolve_shards

    pattern = _pattern_for(tmp_path / "plain", folder, {})
    cfg = _cfg(pattern, "data.shard_decoder=dali", "data.workers=1")
    loader = _loader(cfg)
    assert type(loader).__name__ == "DaliShardLoader" and len(loader) == 6 and loader.num_samples == 48
    batches = _collect(loader, 1)
    assert [b.index.tolist() for b in batches] == [loader.order.sample_ids(1, s) for s in range(6)]

    class Keys:  # the folder loader asked for the shard loader's ids, step by step
        def set_epoch(self, epoch, start):
            self.epoch, self.start = epoch, start

        def __len__(self):
            return 6 - self.start

        def __iter__(self):
            return iter([[(self.epoch, i) for i in b.index.tolist()] for b in batches[self.start:]])

    folder_cfg = load_config(SMOKE, [f"data.train_dir={folder}", "data.batch_size=8", "data.workers=1"])
    reference = DaliMultiCropLoader(folder_cfg.data, folder_cfg.train.seed, 0, 1, None)
    reference.sampler = Keys()
    for a, b in zip(batches, list(reference.epoch(1))):
        assert torch.equal(a.globals, b.globals) and torch.equal(a.locals, b.locals) and torch.equal(a.label, b.label)
    late = _collect(loader, 1, start=4)
    for a, b in zip(batches[4:], late):
        assert torch.equal(a.index, b.index) and torch.equal(a.globals, b.globals)
    loader.close()
    reference.close()

    order = ShardOrder(resolve_shards(pattern), 8, 4, 1, cfg.train.seed)
    bad = order.sample_ids(0, 2)[2]
    damaged = _pattern_for(tmp_path / "damaged", folder, {bad: b"not an image" * 4})
    dali = _collect(_loader(_cfg(damaged, "data.shard_decoder=dali", "data.workers=1")), 0)
    pil = _collect(_loader(_cfg(damaged)), 0)
    assert [b.failed for b in dali] == [b.failed for b in pil] == [0, 0, 1, 0, 0, 0]
    assert [b.index.tolist() for b in dali] == [b.index.tolist() for b in pil]


RECORD_IDS = """
import json, os, sys
import wcl_fast.train as train

step = train.train_step


def recording(objective, ddp, batch, global_step, *args, **kwargs):
    with open(f"{os.environ['IDS_FILE']}.{os.environ.get('RANK', '0')}", "a") as out:
        out.write(json.dumps([global_step, batch.index.tolist()]) + "\\n")
    return step(objective, ddp, batch, global_step, *args, **kwargs)


train.train_step = recording
sys.exit(train.main(sys.argv[1:]))
"""


def test_resume_at_another_world_size_continues_the_same_batches(shard_dir, tmp_path):
    """Stopped at step 3 by 2 torchrun processes and resumed by 1, and the reverse: every step of both runs trains
    on the global batch the shard order gives one process (the sample ids each rank's train_step received,
    concatenated in rank order), and the resumed run ends where the straight run does."""
    import os
    import subprocess
    import sys

    from pipelines.shards import ShardOrder, resolve_shards

    pattern = _pattern(shard_dir)
    script = tmp_path / "record.py"
    script.write_text(RECORD_IDS)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    order = ShardOrder(resolve_shards(pattern), 8, 4, 1, load_config(SMOKE).train.seed)
    expected = [order.sample_ids(epoch, s) for epoch in (0, 1) for s in range(6)]  # global steps 0-11
    for first, then in ((2, 1), (1, 2)):
        out = tmp_path / f"{first}to{then}"
        ids = tmp_path / f"ids{first}{then}"
        for processes, extra in ((first, "train.stop_at_step=3"), (then, "train.resume=auto")):
            launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                      if processes == 2 else [sys.executable])
            proc = subprocess.run(launch + [str(script), *_train_args(pattern, out, extra)], cwd=ROOT,
                                  env=dict(env, IDS_FILE=str(ids)), capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
        seen = {}
        for rank in (0, 1):
            path = Path(f"{ids}.{rank}")
            for step, rows in (json.loads(line) for line in path.read_text().splitlines()):
                seen.setdefault(step, [None, None])[rank] = rows
        got = [sum((part for part in seen[step] if part is not None), []) for step in sorted(seen)]
        assert sorted(seen) == list(range(12)) and got == expected, (first, then)
        assert all(None not in seen[step] for step in sorted(seen) if (step < 3) == (first == 2))  # 2 ranks there
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert state["world_size"] == then and state["global_step"] == 12


def test_reads_ahead_across_the_epochs_end(shard_dir):
    """The last steps of an epoch fetch the next epoch's first shards, in order of use, so the next epoch's first
    step waits for no fetch of its own: the shards it reads were all fetched ahead (a read-ahead of 6 shards
    covers the 5 that step reads here)."""
    loader = _loader(_cfg(_pattern(shard_dir), "data.shard_read_ahead=6"))
    cache, requested = loader.cache, []
    want = cache.want

    def counting(shards):  # the fetches started, in order (want runs on the sampler's thread)
        requested.extend(k for k in dict.fromkeys(shards) if k not in cache.futures)
        want(shards)

    cache.want = counting
    order, plan = loader.order, loader.sampler._plan(1, 0)[0]
    _collect(loader, 0)
    ahead = list(cache.futures)
    assert ahead and sorted(ahead) == sorted(plan[:len(ahead)])
    first_step = {k for j in range(order.streams) for k, _ in order.positions(1, 0, j)}
    assert first_step <= set(ahead)
    before = len(requested)
    batches = loader.epoch(1)
    first = next(batches)
    assert first.index.tolist() == order.sample_ids(1, 0)
    assert not first_step & set(requested[before:])  # nothing the first step reads was fetched again
    del batches
    loader.close()


def test_a_shard_gone_mid_run_stops_with_one_line_and_the_last_checkpoint_intact(folder, tmp_path, capsys):
    """A shard that cannot be read (here deleted after step 3's checkpoint) ends the resumed run with exit code 6 and
    one line naming it and the last good checkpoint, which still loads at the step the line names."""
    from wcl_fast.train import main as train_main

    shards = tmp_path / "shards"
    _write_with_webdataset(folder, shards)
    manifest = tmp_path / "manifest.json"  # counts from a manifest: start-up reads no shard
    names = sorted(p.name for p in shards.glob("s-*.tar"))
    manifest.write_text(json.dumps({"shards": [{"name": f"shards/{n}", "count": PER_SHARD if i < len(names) - 1 else
                                                48 - PER_SHARD * (len(names) - 1)} for i, n in enumerate(names)]}))
    out = tmp_path / "run"
    assert train_main(_train_args(str(manifest), out, "train.stop_at_step=3", "data.shard_retries=1",
                                  "data.shard_backoff=0.01")) == 0
    (shards / names[4]).unlink()
    capsys.readouterr()
    code = train_main(_train_args(str(manifest), out, "train.resume=auto", "data.shard_retries=1", "data.shard_backoff=0.01"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 6 and len(err) == 1, err
    assert f"shard '{shards / names[4]}' could not be read" in err[0] and "last good checkpoint" in err[0], err[0]
    import re

    named = re.search(r"the last good checkpoint is '([^']+)' \(epoch \d+, step \d+, global step (\d+)\)", err[0])
    assert named and named.group(1) == str(out / "checkpoint.pt"), err[0]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["global_step"] == int(named.group(2)) >= 3


def test_s3_shards_from_a_mock_server_equal_local_ones(shard_dir, monkeypatch):
    """s3:// through fsspec (s3fs) against moto's S3 server on 127.0.0.1, configured as a user's environment
    configures it (AWS_ENDPOINT_URL and keys): the same batches as the local shards."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="shards")
        for tar in sorted(shard_dir.glob("s-*.tar")):
            client.upload_file(str(tar), "shards", f"train/{tar.name}")
        count = len(list(shard_dir.glob("s-*.tar")))
        remote = _collect(_loader(_cfg(f"s3://shards/train/s-{{000..{count - 1:03d}}}.tar")), 0)
        local = _collect(_loader(_cfg(_pattern(shard_dir))), 0)
        assert len(remote) == len(local) == 6
        for a, b in zip(remote, local):
            assert torch.equal(a.index, b.index) and torch.equal(a.globals, b.globals) and torch.equal(a.label, b.label)
    finally:
        server.stop()
