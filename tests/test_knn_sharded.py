"""The sharded kNN monitor (wcl_fast/knn.py): each rank keeps only its own bank and query shards, and the
top-1 / top-5 are those of the single-process weighted kNN (Wu et al. 2018) on the concatenated shards."""
import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from conftest import run_distributed, write_colour_folder, write_odd_images
from wcl_fast.knn import knn_accuracy, knn_memory_bytes, knn_memory_terms, sharded_knn_accuracy

CLASSES, DIM, T = 10, 32, 0.1


class LiveStorages(TorchDispatchMode):
    """The high-water mark of the bytes of every storage an operator creates, from its creation until it
    is freed (weak references); `add` counts tensors made before the mode (the shards)."""

    def __init__(self):
        super().__init__()
        self.live = WeakIdKeyDictionary()
        self.current = self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage not in self.live:
            self.live[storage] = nbytes = storage.nbytes()
            self.current += nbytes
            weakref.finalize(storage, self._free, nbytes)
            self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.add(leaf)
        return out


def _features(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features near one of CLASSES random centres, and their class: continuous random values
    (no exact similarity ties) with accuracies well above chance, so a wrong neighbour set shows."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (rows,), generator=generator)
    feats = centres[labels] + 1.5 * torch.randn(rows, DIM, generator=generator, dtype=torch.float64)
    return torch.nn.functional.normalize(feats, dim=1).float(), labels


BANK, BANK_LABELS = _features(101, seed=1)
QUERIES, QUERY_LABELS = _features(37, seed=2)

# (k, chunk, block_elements): k beyond a shard and beyond the bank, chunks below and above a shard, column
# blocks of one, a few and all bank rows
CASES = [(5, 1024, 1 << 26), (20, 8, 64), (60, 8, 1 << 26), (60, 5, 40), (200, 7, 300), (1, 19, 1)]


@pytest.mark.parametrize("k,chunk,block", CASES)
def test_one_process_equals_knn_accuracy(k, chunk, block):
    expected = knn_accuracy(BANK, BANK_LABELS, QUERIES, QUERY_LABELS, CLASSES, k, T)
    got = sharded_knn_accuracy(BANK, BANK_LABELS, QUERIES, QUERY_LABELS, CLASSES, k, T, chunk=chunk,
                               block_elements=block)
    assert got == expected  # the same hits and the same fp32 rounding of the percentages
    assert 30.0 < expected["top1"] < 100.0  # a meaningful comparison: neither chance nor saturated


@pytest.mark.parametrize("k,chunk,block", CASES)
def test_memory_bound_covers_what_one_process_allocates(k, chunk, block):
    """knn_memory_bytes against the high-water mark of every storage the function creates (a dispatch
    mode with weak references, LiveStorages above), the shards counted from the start."""
    live = LiveStorages()
    for tensor in (BANK, BANK_LABELS, QUERIES, QUERY_LABELS):
        live.add(tensor)
    with live:
        sharded_knn_accuracy(BANK, BANK_LABELS, QUERIES, QUERY_LABELS, CLASSES, k, T, chunk=chunk, block_elements=block)
    bound = knn_memory_bytes(101, 37, DIM, 1, k, chunk, CLASSES, block_elements=block)
    assert live.peak <= bound <= 1.25 * live.peak


def test_memory_terms_of_the_shards():
    terms = knn_memory_terms(1_281_167, 50_000, 2048, 8, 200, 1024, 1000)
    assert terms["bank"] == math.ceil(1_281_167 / 8) * 2048 * 4
    assert terms["queries"] == math.ceil(50_000 / 8) * 2048 * 4
    assert terms["round_queries"] == (8 + 1) * 1024 * 2048 * 4
    assert terms["similarity_block"] <= (1 << 26) * 4
    # the point of sharding: far below the gathered bank of one GPU (1.28 M x 2048 fp32 = 10.5 GB)
    assert knn_memory_bytes(1_281_167, 50_000, 2048, 8, 200, 1024, 1000) < 1_281_167 * 2048 * 4 / 4


def _shard(x: torch.Tensor, bounds: tuple[int, int], rank: int) -> torch.Tensor:
    part = x[bounds[rank]:bounds[rank + 1]].clone()
    return part if part.shape[0] else torch.zeros((0,) * x.dim(), dtype=x.dtype)  # extract_features' empty shard


def _two_rank_worker(rank, world, folders, expected_eval):
    import wcl_fast.knn as knn
    from wcl_fast.config import load_config

    # bank rows and query rows of rank 0 (rank 1 has the rest): uneven shards, and a rank without a bank
    # shard or without queries (extract_features' [0, 0] tensors)
    for bank_split, query_split in [(51, 19), (101, 0)]:
        bank_bounds, query_bounds = (0, bank_split, 101), (0, query_split, 37)
        bank, bank_labels = _shard(BANK, bank_bounds, rank), _shard(BANK_LABELS, bank_bounds, rank)
        queries, query_labels = _shard(QUERIES, query_bounds, rank), _shard(QUERY_LABELS, query_bounds, rank)
        assert bank.shape[0] == bank_bounds[rank + 1] - bank_bounds[rank]  # no rank holds the whole bank
        for k, chunk, block in CASES:
            expected = knn_accuracy(BANK, BANK_LABELS, QUERIES, QUERY_LABELS, CLASSES, k, T)
            live = LiveStorages()
            for tensor in (bank, bank_labels, queries, query_labels):
                live.add(tensor)
            with live:
                got = sharded_knn_accuracy(bank, bank_labels, queries, query_labels, CLASSES, k, T, chunk=chunk,
                                           block_elements=block)
            assert got == expected, (rank, bank_split, query_split, k, chunk, block, got, expected)
            if bank_split == 51:  # the shards evaluate_knn makes: ceil(n / world) rows at most
                bound = knn_memory_bytes(101, 37, DIM, world, k, chunk, CLASSES, block_elements=block)
                assert live.peak <= bound <= 1.4 * live.peak, (rank, k, chunk, block, live.peak, bound)

    # the monitor itself: every rank passes only its own shards of data.train_dir and data.val_dir
    shards = []
    real = knn.sharded_knn_accuracy

    def spy(bank, bank_labels, queries, query_labels, *args, **kwargs):
        shards.append((bank.shape[0], queries.shape[0]))
        return real(bank, bank_labels, queries, query_labels, *args, **kwargs)

    knn.sharded_knn_accuracy = spy
    cfg = load_config(None, _eval_overrides(folders))
    result = knn.evaluate_knn(torch.nn.Flatten(), cfg, torch.device("cpu"))
    assert shards == [((17, 16)[rank], (11, 10)[rank])]  # 33 bank images, 21 readable of 22 queries
    assert result == expected_eval, (rank, result, expected_eval)


def _eval_overrides(folders):
    return [f"data.train_dir={folders / 'train'}", f"data.val_dir={folders / 'val'}", "data.backend=reference",
            "data.workers=0", "data.eval_resize=12", "data.eval_crop=12", "knn.k=20", "knn.batch_size=4"]


def test_two_processes_equal_one_process(tmp_path):
    """2 gloo processes with uneven shards give exactly the single-process top-1 / top-5: synthetic
    features (several k / chunk / block sizes) and evaluate_knn on image folders (raw pixels as features,
    one unreadable query image counted once)."""
    from wcl_fast.config import load_config
    from wcl_fast.knn import evaluate_knn

    write_colour_folder(tmp_path / "train", classes=3, per_class=11, sizes=(14, 20), seed=1)
    write_colour_folder(tmp_path / "val", classes=3, per_class=7, sizes=(14, 20), seed=2)
    write_odd_images(tmp_path / "val" / "c1", ["garbage.jpg"])
    expected = evaluate_knn(torch.nn.Flatten(), load_config(None, _eval_overrides(tmp_path)), torch.device("cpu"))
    assert expected["count"] == 21 and expected["skipped"] == 1
    run_distributed(_two_rank_worker, 2, tmp_path, expected)
