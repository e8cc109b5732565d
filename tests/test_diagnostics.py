"""Weak-label and embedding diagnostics, and the online linear probe (docs/diagnostics.md): the statistics
against scipy / scikit-learn / float64 loops on random and adversarial graphs, no host read in a step with
them, labels never reaching the loss, the probe detached from the encoder, resumed exactly and equal on
two processes."""
from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.special import comb

from conftest import run_distributed
from wcl_fast import diagnostics as wd
from wcl_fast.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "cpu_smoke.yaml"


# ---- float64 / scipy references ----

def scipy_labels(nn: np.ndarray) -> np.ndarray:
    n = len(nn)
    graph = coo_matrix((np.ones(n), (np.arange(n), nn)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def ari_reference(a, b) -> float:
    """The adjusted Rand index from its definition (Hubert & Arabie 1985) with binomial coefficients."""
    n = len(a)
    cells, rows, cols = {}, {}, {}
    for x, y in zip(a, b):
        cells[(x, y)] = cells.get((x, y), 0) + 1
        rows[x] = rows.get(x, 0) + 1
        cols[y] = cols.get(y, 0) + 1
    index = sum(comb(v, 2, exact=True) for v in cells.values())
    sum_a = sum(comb(v, 2, exact=True) for v in rows.values())
    sum_b = sum(comb(v, 2, exact=True) for v in cols.values())
    expected = sum_a * sum_b / comb(n, 2, exact=True)
    maximum = (sum_a + sum_b) / 2
    if maximum == expected:  # both partitions trivial and equal (scikit-learn's convention: 1)
        return 1.0
    return (index - expected) / (maximum - expected)


def truth_reference(components, classes):
    """(precision, recall, purity) by loops over the pairs of valid nodes (label >= 0); None where undefined."""
    valid = [i for i in range(len(classes)) if classes[i] >= 0]
    weak = same = both = 0
    for i, j in combinations(valid, 2):
        w, s = components[i] == components[j], classes[i] == classes[j]
        weak, same, both = weak + w, same + s, both + (w and s)
    majority = 0
    for c in set(components[i] for i in valid):
        members = [classes[i] for i in valid if components[i] == c]
        majority += max(members.count(k) for k in set(members))
    return both / weak if weak else None, both / same if same else None, majority / len(valid)


def random_nn(n: int, rng) -> np.ndarray:
    """A random functional graph without self loops: node i points at any other node."""
    nn = rng.integers(0, n - 1, n)
    return np.where(nn >= np.arange(n), nn + 1, nn).astype(np.int64)


def graphs():
    """1-NN graphs (nn [N], no self loops): random, and adversarial ones: one component (a cycle and a star
    whose centre is everyone's tied nearest neighbour), disjoint pairs, a chain, and real 1-NN searches over
    embeddings with duplicated rows (ties go to the smallest index)."""
    import kernels

    rng = np.random.default_rng(0)
    out = [random_nn(n, rng) for n in (2, 3, 17, 64, 200)]
    n = 24
    out += [(np.arange(n) + 1) % n, np.r_[1, np.zeros(n - 1, dtype=int)], np.arange(n) ^ 1,
            np.r_[1, np.arange(n - 1)]]
    for n, copies in ((40, 2), (30, 5)):
        base = torch.nn.functional.normalize(torch.randn(n // copies, 8, generator=torch.Generator().manual_seed(n)), dim=1)
        u = base.repeat(copies, 1)[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
        out.append(kernels.nearest_neighbor(u).numpy())
    return [np.asarray(g, dtype=np.int64) for g in out]


def test_statistics_match_scipy_sklearn_and_float64_loops():
    import kernels

    try:
        from sklearn.metrics import adjusted_rand_score
    except ImportError:  # the float64 definition below is the reference either way
        adjusted_rand_score = None
    rng = np.random.default_rng(1)
    all_graphs = graphs()
    for k, nn in enumerate(all_graphs):
        n = len(nn)
        labels = kernels.connected_components(torch.from_numpy(nn))
        reference = scipy_labels(nn)
        sizes = np.bincount(reference)
        count, nodes, largest, singles = wd.partition_summary(labels).tolist()
        assert (count, nodes, largest, singles) == (len(sizes), n, sizes.max(), 0), k  # a 1-NN graph has no singleton
        # against a random graph and the previous graph of the same size: ARI and shared edges
        others = [random_nn(n, rng)] + ([all_graphs[k - 1]] if k and len(all_graphs[k - 1]) == n else [])
        a = labels.numpy()
        for other in others:
            b = kernels.connected_components(torch.from_numpy(other)).numpy()
            for x, y in ((a, b), (a, scipy_labels(nn)), (b, scipy_labels(nn))):
                got = float(wd.adjusted_rand_index(torch.from_numpy(x), torch.from_numpy(y)))
                assert got == pytest.approx(ari_reference(x, y), abs=1e-12), k
                if adjusted_rand_score is not None:
                    assert got == pytest.approx(adjusted_rand_score(x, y), abs=1e-12), k
            edges_a = {frozenset((i, int(nn[i]))) for i in range(n)}
            edges_b = {frozenset((i, int(other[i]))) for i in range(n)}
            expected = (sum(frozenset((i, int(nn[i]))) in edges_b for i in range(n))
                        + sum(frozenset((i, int(other[i]))) in edges_a for i in range(n))) / (2 * n)
            assert float(wd.shared_edges(torch.from_numpy(nn), torch.from_numpy(other))) == pytest.approx(expected, abs=1e-12)
        # weak labels against classes: sparse class ids, some unlabeled (-1)
        classes = rng.choice([-1, 3, 7, 1000], size=n, p=[0.2, 0.3, 0.3, 0.2]).astype(np.int64)
        classes[:2] = [3, 7]  # at least two valid classes
        tp, weak, same, major, valid = wd.truth_counts(labels, torch.from_numpy(classes),
                                                      torch.from_numpy(classes >= 0)).tolist()
        precision, recall, purity = truth_reference(a, classes)
        assert (precision is None) == (weak == 0) and (recall is None) == (same == 0), k
        assert precision is None or tp / weak == pytest.approx(precision, abs=1e-12), k
        assert recall is None or tp / same == pytest.approx(recall, abs=1e-12), k
        assert major / valid == pytest.approx(purity, abs=1e-12), k
    # the compact ids of any int64 keys, and the blocks: one class in the batch logs nothing
    keys = torch.tensor([5, -3, 5, 2**40, -3, 0])
    assert wd.compact(keys).tolist() == [2, 0, 2, 3, 0, 1]
    y = kernels.connected_components(torch.from_numpy(all_graphs[5]))
    assert wd.truth_block((y,), torch.zeros(24, dtype=torch.int64)).abs().sum() == 0
    assert wd.truth_block((y,), torch.full((24,), -1)).abs().sum() == 0


def test_graph_block_of_both_rules():
    """inherit: the two views' labellings; knn: one labelling, the views' partitions from their own 1-NN graphs."""
    import kernels

    nn1, nn2 = torch.arange(24) ^ 1, torch.from_numpy(random_nn(24, np.random.default_rng(2)))  # pairs, random
    y1, y2 = kernels.connected_components(nn1), kernels.connected_components(nn2)
    block = wd.graph_block((y1, y2), (nn1, nn2))
    (c1, n1, m1, _), (c2, _, m2, _) = wd.partition_summary(y1).tolist(), wd.partition_summary(y2).tolist()
    ratios = (block[0] / block[1]).tolist()
    assert ratios[:4] == pytest.approx([(c1 + c2) / 2, 2 * n1 / (c1 + c2), (m1 + m2) / 2, 0.0])
    assert ratios[4] == pytest.approx(ari_reference(y1.numpy(), y2.numpy()))
    joint = kernels.connected_components_edges(torch.arange(48) % 24, torch.cat([nn1, nn2]), 24)
    knn = wd.graph_block((joint,), (nn1, nn2))
    assert (knn[1, 0], knn[0, 0]) == (1.0, len(set(joint.tolist())))
    assert float(knn[0, 4]) == pytest.approx(ratios[4]) and float(knn[0, 5]) == pytest.approx(ratios[5])


def test_embedding_block_collapse_and_cosines():
    generator = torch.Generator().manual_seed(0)
    spread = torch.nn.functional.normalize(torch.randn(512, 64, generator=generator, dtype=torch.float64), dim=1)
    collapsed = torch.nn.functional.normalize(torch.ones(512, 64, dtype=torch.float64) + 1e-4 * spread, dim=1)
    ratio = lambda block: (block[0] / block[1]).tolist()  # noqa: E731
    assert ratio(wd.embedding_block(spread, torch.device("cpu")))[0] == pytest.approx(1.0, abs=0.05)
    assert ratio(wd.embedding_block(collapsed, torch.device("cpu")))[0] < 0.01
    x1, x2 = spread[:256], spread[256:]
    sims = x1 @ x2.T
    _, pos, neg = ratio(wd.embedding_block(spread, torch.device("cpu")))
    assert pos == pytest.approx(sims.diagonal().mean().item()) and neg == pytest.approx(
        (sims.sum() - sims.diagonal().sum()).item() / (256 * 255))


# ---- the trainer's step with diagnostics and the probe ----

def _step_setup(rule: str, labels: torch.Tensor, probe_optimizer: str = "sgd", diagnostics: bool = True):
    """The trainer's step (as tests/test_host_sync.py builds it) on random crops of 8 images with `labels`,
    and an online probe on the model."""
    from test_host_sync import COMMON

    from pipelines.batch import MultiCropBatch
    from wcl_fast import dist as wdist, objectives
    from wcl_fast.model import build_model, feature_dim
    from wcl_fast.optim import build_optimizer
    from wcl_fast.probe import OnlineProbe
    from wcl_fast.train import train_step

    cfg = load_config(SMOKE, [*COMMON, "train.precision=fp32", f"loss.multicrop_rule={rule}",
                              f"train.diagnostics={str(diagnostics).lower()}"])
    ctx = wdist.DistContext()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim, skip_nonfinite=True)
    model, ddp = wdist.wrap_model(model, optimizer, cfg.model, ctx)
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    autocast = objectives.autocast_factory(ctx.device, None)
    generator = torch.Generator().manual_seed(1000)
    fmt = torch.channels_last
    globals_ = torch.randn(16, 3, 32, 32, generator=generator).contiguous(memory_format=fmt)
    locals_ = torch.randn(16, 3, 32, 32, generator=generator).contiguous(memory_format=fmt)
    batch = MultiCropBatch(globals_, locals_, torch.arange(8), labels)
    objective = objectives.build_objective(cfg, model, ctx, 8)
    probe = OnlineProbe(feature_dim(cfg.model.arch, cfg.model.widths), 4, probe_optimizer, 0.1, ctx.device, model)
    ddp.train()
    counter = {"step": 0}

    def step():
        terms, ok = train_step(objective, ddp, batch, counter["step"], 100, autocast, optimizer)
        probe.step(batch)
        counter["step"] += 1
        return terms, ok

    return step, model, objective, probe


@pytest.fixture()
def _one_thread():
    torch.set_num_threads(1)  # tiny models (see tests/test_host_sync.py); conftest restores the count
    yield


@pytest.mark.parametrize("rule", ["inherit", "knn"])
def test_step_with_diagnostics_and_probe_reads_nothing_on_the_host(rule, _one_thread):
    """tests/test_host_sync.py's recorder over the second step: train_step (with its diagnostics) and the
    probe's update read nothing on the host; the sums then hold every statistic."""
    from test_host_sync import HostReads

    labels = torch.tensor([0, 1, 2, 3, 0, 1, -1, 2])
    step, _, objective, probe = _step_setup(rule, labels)
    step()
    with HostReads() as reads:
        terms, _ = step()
    assert not reads.found, f"{rule}: host reads in one step: {dict(reads.found)}"
    assert torch.isfinite(terms["loss"])
    for source in (objective.diagnostics, probe):
        assert (source.sums[1] > 0).all(), (source.names, source.sums)  # every statistic counted


def test_labels_never_reach_the_loss(_one_thread):
    """The same step with different class labels (real, zeros, unlabeled): the same loss terms, gradients and
    parameters; only the label statistics differ."""
    runs = []
    for labels in (torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), torch.zeros(8, dtype=torch.int64), torch.full((8,), -1)):
        step, model, objective, _ = _step_setup("inherit", labels)
        terms = [step()[0] for _ in range(2)]
        runs.append((terms, {n: p.grad.clone() for n, p in model.named_parameters()},
                     {n: p.detach().clone() for n, p in model.named_parameters()}, objective.diagnostics.sums.clone()))
    first = runs[0]
    for other in runs[1:]:
        assert all(torch.equal(a[k], b[k]) for a, b in zip(first[0], other[0]) for k in a)
        assert all(torch.equal(first[1][n], other[1][n]) and torch.equal(first[2][n], other[2][n]) for n in first[1])
    truth = slice(len(wd.GRAPH_NAMES), len(wd.GRAPH_NAMES) + len(wd.TRUTH_NAMES))
    assert (first[3][1, truth] > 0).all() and (runs[1][3][:, truth] == 0).all() and (runs[2][3][:, truth] == 0).all()


# ---- the trainer: detached probe, exact resume, the plot ----

def _train(out_dir, *overrides):
    from wcl_fast.train import train

    cfg = load_config(SMOKE, [f"train.out_dir={out_dir}", "train.log_interval=1", "train.epochs=2", "data.local_crops=0",
                              *overrides])
    return train(cfg)


def _records(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def test_probe_is_detached_resumes_exactly_and_is_drawn(tmp_path):
    """Probe on (Adam) vs probe and diagnostics off: the same encoder, heads and optimizer state after 8 steps.
    Stopped after 3 steps and resumed: the probe's parameters and Adam state, its per-step top-1 and the
    diagnostics equal those of the straight run. The plot draws the new panels."""
    probe = ["train.online_probe=true", "train.online_probe_lr=0.01"]
    straight, interrupted, off = tmp_path / "straight", tmp_path / "interrupted", tmp_path / "off"
    _train(straight, *probe)
    _train(off, "train.diagnostics=false")
    assert _train(interrupted, *probe, "train.stop_at_step=3")["global_step"] == 3
    _train(interrupted, *probe, "train.resume=auto")
    states = {name: torch.load(folder / "checkpoint.pt", weights_only=True)
              for name, folder in (("straight", straight), ("interrupted", interrupted), ("off", off))}
    for name in ("interrupted", "off"):
        for key, value in states["straight"]["model"].items():
            assert torch.equal(value, states[name]["model"][key]), (name, key)
        for a, b in zip(states["straight"]["optimizer"]["state"].values(), states[name]["optimizer"]["state"].values()):
            assert torch.equal(a["momentum_buffer"], b["momentum_buffer"]), name
    assert "probe" not in states["off"]
    a, b = states["straight"]["probe"], states["interrupted"]["probe"]
    assert all(torch.equal(a["linear"][k], b["linear"][k]) for k in a["linear"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    logged = {name: {r["step"]: r for r in _records(folder) if "loss" in r}
              for name, folder in (("straight", straight), ("interrupted", interrupted), ("off", off))}
    keys = ("probe_top1", "probe_loss", "wl_components", "wl_view_ari", "wl_precision", "collapse_z", "neg_cos_u")
    assert sorted(logged["straight"]) == sorted(logged["interrupted"]) == list(range(1, 9))
    for step, record in logged["straight"].items():
        assert all(record[k] == logged["interrupted"][step][k] for k in keys), step
        assert not any(k in logged["off"][step] for k in keys) and record["loss"] == logged["off"][step]["loss"]
    assert logged["straight"][8]["wl_singletons"] == 0.0 and 0 < logged["straight"][8]["wl_precision"] <= 1

    from PIL import Image

    from wcl_fast.plot import PANELS, plot_runs

    out = plot_runs([straight, off], tmp_path / "curves.png", labels=["probe", "off"])
    with Image.open(out) as img:
        assert img.format == "PNG"
    assert {"weak-label components", "weak labels vs classes", "embeddings: collapse, cosines",
            "online probe top-1 (%)"} <= {title for title, _ in PANELS}


PROBE_ROWS = 16  # rows per step; on two processes rank r updates on rows [8 r, 8 r + 8)


def _probe_data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, PROBE_ROWS, 6, generator=generator), torch.randint(0, 3, (3, PROBE_ROWS), generator=generator)


def _probe_worker(rank, world, reference):
    from wcl_fast.probe import OnlineProbe

    h, labels = _probe_data()
    mine = slice(PROBE_ROWS // world * rank, PROBE_ROWS // world * (rank + 1))
    expected = torch.load(reference)
    for optimizer in ("sgd", "adam"):
        probe = OnlineProbe(6, 3, optimizer, 0.5, torch.device("cpu"))
        for step in range(3):
            probe.update(h[step, mine], labels[step, mine])
        weight = probe.linear.weight.detach()
        parts = [torch.empty_like(weight) for _ in range(world)]
        torch.distributed.all_gather(parts, weight)
        assert torch.equal(parts[0], parts[1]), (rank, optimizer)  # the replicas stay identical
        torch.testing.assert_close(weight, expected[optimizer], rtol=1e-5, atol=1e-6)


def test_probe_on_two_processes_equals_the_whole_batch(tmp_path):
    """2 gloo processes, each with half the rows (equal counts): the averaged gradient keeps the replicas
    identical and equal to one probe trained on the whole batch in one process, for SGD and Adam."""
    from wcl_fast.probe import OnlineProbe

    h, labels = _probe_data()
    expected = {}
    for optimizer in ("sgd", "adam"):
        single = OnlineProbe(6, 3, optimizer, 0.5, torch.device("cpu"))
        for step in range(3):
            single.update(h[step], labels[step])
        expected[optimizer] = single.linear.weight.detach().clone()
    torch.save(expected, tmp_path / "reference.pt")
    run_distributed(_probe_worker, 2, str(tmp_path / "reference.pt"))
