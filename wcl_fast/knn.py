"""Weighted kNN monitor (Wu et al., CVPR 2018, "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination", Sec. 3.4): k = 200 nearest training features by cosine similarity vote
with weight exp(s / T), T = 0.1 (docs/wcl.md §5).

Features are the encoder outputs h (before the heads) under the evaluation transform, fp32 and
L2-normalised. Each rank extracts an unpadded contiguous shard of the bank (data.train_dir) and of the
queries (data.val_dir) and keeps only those shards: no rank ever holds the whole bank (on ImageNet the
gathered bank would be 1.28 M x 2048 fp32 = 10.5 GB per GPU). The sharding is ours; the vote is Wu et
al.'s, with the same top-1 / top-5 as knn_accuracy on the concatenated shards:

1. Rounds: every rank contributes up to `chunk` of its query rows per round; all ranks run the same
   number of rounds (the largest shard's), a rank out of rows sending zero rows as padding.
2. The round's queries are gathered on every rank ([world x chunk, d]), and each rank takes their k most
   similar rows of its own bank shard, k = min(knn.k, bank size), scoring its shard in column blocks of
   at most BLOCK_ELEMENTS similarities and merging each block's top k into a running top k: per query k
   (similarity, bank label) candidates, -inf where the shard has fewer than k rows.
3. An all-to-all hands every rank the world x k candidates of its own queries. The global top k is
   among them (each of the k nearest is among its own shard's k nearest): the rank takes their top k,
   sums exp(s / T) per class and counts its queries' top-1 / top-5 hits; one all-reduce of the counts
   at the end.

Per-rank memory: knn_memory_bytes (the bank and query shards, one round's queries, a similarity block
and the candidates), e.g. for a memory planner.

Standalone: python -m wcl_fast.knn --config configs/X.yaml checkpoint=PATH [key=value ...]
"""
from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist

from wcl_fast import dist as wdist
from wcl_fast.cli import command, config_arguments
from wcl_fast.evaluation import extract_all
from wcl_fast.runtime import memory_format

QUERY_CHUNK = 1024  # query rows each rank contributes per round
BLOCK_ELEMENTS = 1 << 26  # similarities [round queries, bank columns] scored at once: 256 MiB of fp32


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores [m, C]: sum over the k most similar training features of exp(sim / T) per class."""
    k = min(k, train_features.shape[0])
    scores = []
    for start in range(0, test_features.shape[0], chunk):
        sims = test_features[start:start + chunk] @ train_features.t()  # [c, n]
        top_sims, top_idx = sims.topk(k, dim=1)  # [c, k]
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes, device=sims.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, k=200, temperature=0.1) -> dict:
    """Single-process reference of sharded_knn_accuracy: the whole bank and every query in one process."""
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    correct = top == test_labels[:, None]
    return {"top1": 100.0 * correct[:, 0].float().mean().item(),  # sync point (evaluation only)
            "top5": 100.0 * correct.any(dim=1).float().mean().item(), "count": int(test_labels.shape[0])}


@torch.no_grad()
def sharded_knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                         query_labels: torch.Tensor, num_classes: int, k: int = 200, temperature: float = 0.1,
                         chunk: int = QUERY_CHUNK, block_elements: int = BLOCK_ELEMENTS) -> dict:
    """kNN top-1 / top-5 over every rank's queries against every rank's bank, each rank passing only its
    own shards (bank [n_r, d], labels [n_r], queries [m_r, d], labels [m_r]; row counts may differ and
    be 0). Every rank returns the same {"top1", "top5", "count"}; see the module docstring."""
    if chunk < 1 or block_elements < 1:
        raise ValueError(f"chunk={chunk} and block_elements={block_elements} must be at least 1")
    world, rank = wdist.world_size(), wdist.rank()
    device = bank.device
    sizes = torch.tensor([bank.shape[0], queries.shape[0], bank.shape[-1], queries.shape[-1]], dtype=torch.int64,
                         device=device)
    if world > 1:
        parts = [torch.empty_like(sizes) for _ in range(world)]
        dist.all_gather(parts, sizes)
        sizes = torch.stack(parts)
    shards = sizes.view(-1, 4).tolist()  # sync point (evaluation only): rows and widths of every rank's shards
    n_bank, n_query = sum(s[0] for s in shards), sum(s[1] for s in shards)
    dims = {s[2] for s in shards if s[0]} | {s[3] for s in shards if s[1]}
    if len(dims) > 1:
        raise ValueError(f"the kNN feature shards differ in width across ranks: {sorted(dims)}")
    if n_bank == 0:
        raise ValueError("the kNN bank is empty on every rank")
    dim = dims.pop()
    bank = bank.reshape(bank.shape[0], dim)  # an empty shard from extract_features is [0, 0]
    queries = queries.reshape(queries.shape[0], dim)
    k = min(k, n_bank)
    rounds = max(math.ceil(s[1] / chunk) for s in shards)  # the same on every rank: the collectives pair up
    hits = torch.zeros(2, dtype=torch.int64, device=device)  # top-1, top-5 of this rank's queries
    for step in range(rounds):
        start = step * chunk
        own = min(chunk, max(0, queries.shape[0] - start))  # this rank's queries in this round
        rows = queries[start:start + own]
        if world > 1:
            rows = _gather_round(rows, chunk)  # [world * chunk, d]: rank j's rows at [j * chunk, (j + 1) * chunk)
        sims, labels = _shard_top_k(rows, bank, bank_labels, k, block_elements)  # [q, k]
        del rows
        if world > 1:  # row block j of the result: shard j's candidates for this rank's queries
            sims, labels = _all_to_all(sims), _all_to_all(labels)
        sims, labels = sims.view(world, -1, k)[:, :own], labels.view(world, -1, k)[:, :own]
        hits += _vote(sims, labels, query_labels[start:start + own], k, temperature, num_classes)
        del sims, labels
    if world > 1:
        dist.all_reduce(hits)
    # hits / count in fp32, the rounding of knn_accuracy's mean: the same numbers on one process
    top1, top5 = (hits.float() / n_query).tolist()  # sync point (evaluation only)
    return {"top1": 100.0 * top1, "top5": 100.0 * top5, "count": int(n_query)}


def _gather_round(rows: torch.Tensor, chunk: int) -> torch.Tensor:
    """Every rank's `rows` ([<= chunk, d], zero-padded to chunk) stacked in rank order: [world * chunk, d]."""
    if rows.shape[0] < chunk:
        padded = rows.new_zeros(chunk, rows.shape[1])
        padded[:rows.shape[0]] = rows
        rows = padded
    out = rows.new_empty(wdist.world_size() * chunk, rows.shape[1])
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the name before torch 2.14
    gather(out, rows.contiguous())
    return out


def _all_to_all(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)
    return out


def _shard_top_k(rows: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, k: int,
                 block_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest rows @ bank.T per row and their bank labels ([q, k] each, similarities descending),
    -inf / label 0 past the shard's row count; at most max(block_elements, q) similarities at a time."""
    q = rows.shape[0]
    cols = max(1, block_elements // max(q, 1))
    best_sims = best_labels = None
    for start in range(0, bank.shape[0], cols):
        block = rows @ bank[start:start + cols].t()  # [q, <= cols]
        sims, idx = block.topk(min(k, block.shape[1]), dim=1)
        del block
        labels = bank_labels[start:start + cols][idx]
        del idx
        if best_sims is None and sims.shape[1] == k:
            best_sims, best_labels = sims, labels
            continue
        if best_sims is None:
            best_sims, best_labels = _empty_candidates(rows, k, bank_labels.dtype)
        best_sims, pos = torch.cat([best_sims, sims], dim=1).topk(k, dim=1)
        best_labels = torch.cat([best_labels, labels], dim=1).gather(1, pos)
        del sims, labels, pos
    if best_sims is None:  # an empty shard
        best_sims, best_labels = _empty_candidates(rows, k, bank_labels.dtype)
    return best_sims, best_labels


def _empty_candidates(rows: torch.Tensor, k: int, label_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    sims = torch.full((rows.shape[0], k), float("-inf"), dtype=rows.dtype, device=rows.device)
    return sims, torch.zeros(rows.shape[0], k, dtype=label_dtype, device=rows.device)


def _vote(sims: torch.Tensor, labels: torch.Tensor, query_labels: torch.Tensor, k: int, temperature: float,
          num_classes: int) -> torch.Tensor:
    """Top-1 and top-5 hits [2] of queries whose candidates are sims / labels [shards, c, k]: the k most
    similar of all candidates vote with exp(s / T) (the scores of knn_predict)."""
    shards, c = sims.shape[:2]
    sims = sims.permute(1, 0, 2).reshape(c, shards * k)  # a copy past one shard: query-major candidates
    labels = labels.permute(1, 0, 2).reshape(c, shards * k)
    if sims.shape[1] > k:
        sims, pos = sims.topk(k, dim=1)
        labels = labels.gather(1, pos)
        del pos
    weights = (sims / temperature).exp()
    votes = torch.zeros(c, num_classes, device=sims.device, dtype=weights.dtype)
    votes.scatter_add_(1, labels, weights)
    top = votes.topk(min(5, num_classes), dim=1).indices
    correct = top == query_labels[:, None]
    return torch.stack([correct[:, 0].sum(), correct.any(dim=1).sum()])


def knn_memory_terms(num_train: int, num_val: int, feature_dim: int, world: int, k: int, chunk: int,
                     num_classes: int, block_elements: int = BLOCK_ELEMENTS) -> dict:
    """Bytes per rank of sharded_knn_accuracy's largest buffers with the shards evaluate_knn makes
    (ceil(n / world) rows at most); float32 features and scores, int64 labels and indices:

    - bank: the bank shard [ceil(num_train / world), d]; bank_labels its labels;
    - queries: the query shard [ceil(num_val / world), d]; query_labels its labels;
    - round_queries: one round's queries, q = world x chunk rows [q, d], and this rank's zero-padded
      [chunk, d] part (the collective may keep it until it is released); world 1: a view of the shard;
    - similarity_block: one column block of similarities [q, min(bank shard, BLOCK_ELEMENTS / q)];
    - shard_candidates: the running top k of the shard (similarity, label) [q, k], a block's top k and
      their concatenation while merging;
    - exchanged_candidates: the candidates sent and received by the all-to-all ([q, k] each; world 1:
      the shard's own);
    - vote: this rank's queries of the round (c = min(chunk, its shard)): their merged top k of the
      world x k candidates, the weights and the class scores [c, num_classes].

    The four input terms live throughout; the scoring phase (round_queries, similarity_block,
    shard_candidates) and the vote phase (exchanged_candidates, vote) are not live together, and each
    phase's sum bounds that phase's high-water mark from above (knn_memory_bytes).
    """
    f, i = 4, 8  # float32, int64
    bank_rows, query_rows = math.ceil(num_train / world), math.ceil(num_val / world)
    k = min(k, num_train)
    c = min(chunk, query_rows)  # this rank's queries in a round
    q = world * chunk if world > 1 else c
    cols = min(bank_rows, max(1, block_elements // max(q, 1)))
    block_k = min(k, cols)
    return {"bank": bank_rows * feature_dim * f, "bank_labels": bank_rows * i,
            "queries": query_rows * feature_dim * f, "query_labels": query_rows * i,
            "round_queries": (q + chunk) * feature_dim * f if world > 1 else 0,
            "similarity_block": q * cols * f,
            # a block's top k with indices and labels; past one block also the running best, the
            # concatenations and the merged best
            "shard_candidates": q * (block_k * (f + i + i) if cols >= bank_rows and block_k == k
                                     else k * (f + i) * 2 + block_k * (f + i + i) + (k + block_k) * (f + i)),
            "exchanged_candidates": q * k * (f + i) * (2 if world > 1 else 1),
            # world > 1: all candidates of the round's own queries in query order, their top k with
            # positions and labels; the weights, the class scores and their top 5
            "vote": c * ((world * k * (f + i) + k * (f + i + i)) * (world > 1) + k * (f + f) + num_classes * f
                         + min(5, num_classes) * (f + i + 1))}


def knn_memory_bytes(num_train: int, num_val: int, feature_dim: int, world: int, k: int, chunk: int,
                     num_classes: int, block_elements: int = BLOCK_ELEMENTS) -> int:
    """Per-rank bytes of the sharded kNN monitor's largest live buffers at its peak (knn_memory_terms
    lists them): the bank and query shards with their labels, plus the larger of the scoring phase
    (one round's gathered queries, a similarity block, the shard's candidates) and the vote phase (the
    exchanged candidates, the merged top k, the class scores)."""
    t = knn_memory_terms(num_train, num_val, feature_dim, world, k, chunk, num_classes, block_elements)
    inputs = t["bank"] + t["bank_labels"] + t["queries"] + t["query_labels"]
    scoring = t["round_queries"] + t["similarity_block"] + t["shard_candidates"]
    return inputs + max(scoring, t["exchanged_candidates"] + t["vote"])


def evaluate_knn(encoder: torch.nn.Module, cfg, device: torch.device) -> dict:
    """kNN top-1/top-5 of `encoder` with data.train_dir as the memory bank and data.val_dir as the test set,
    each rank keeping only its own shards of both (sharded_knn_accuracy)."""
    from pipelines import build_eval_loader, resolve_backend

    resolve_backend(cfg)  # data.backend=auto -> the concrete loader
    rank, world = wdist.rank(), wdist.world_size()
    pin = device.type == "cuda"
    train_loader, n_train, num_classes = build_eval_loader(cfg.data, cfg.data.train_dir, "data.train_dir",
                                                           cfg.knn.batch_size, rank, world, pin)
    val_loader, n_val, _ = build_eval_loader(cfg.data, cfg.data.val_dir, "data.val_dir",
                                             cfg.knn.batch_size, rank, world, pin)
    bank, bank_labels, _ = extract_all(encoder, train_loader, n_train, "data.train_dir", device, cfg.model.channels_last,
                                       cfg.train.precision, gather=False)
    test, test_labels, skipped = extract_all(encoder, val_loader, n_val, "data.val_dir", device, cfg.model.channels_last,
                                             cfg.train.precision, gather=False)
    result = sharded_knn_accuracy(bank, bank_labels, test, test_labels, num_classes, cfg.knn.k, cfg.knn.temperature)
    result["skipped"] = skipped  # unreadable test images, left out of `count`
    return result


@command
def main(argv=None) -> int:
    from pipelines import resolve_backend
    from wcl_fast.checkpoint import load_encoder_checkpoint
    from wcl_fast.config import check_paths, load_config, to_dict
    from wcl_fast.model import build_encoder

    args = config_arguments("python -m wcl_fast.knn", "Weighted kNN evaluation of a WCL encoder",
                            "key=value; checkpoint=PATH selects the weights (default: untrained)", argv)
    checkpoint = None
    overrides = []
    for item in args.overrides:
        if item.startswith("checkpoint="):
            checkpoint = item.split("=", 1)[1]
        else:
            overrides.append(item)
    cfg = load_config(args.config, overrides)
    check_paths(cfg, need_val=True)
    resolve_backend(cfg, report=True)
    ctx = wdist.init_distributed()
    torch.manual_seed(cfg.train.seed)
    encoder = build_encoder(cfg.model.arch, cfg.model.stem, cfg.model.widths)
    if checkpoint:  # a wcl-fast checkpoint, an exported or torchvision ResNet state dict, a reference-code file
        load_encoder_checkpoint(encoder, checkpoint, to_dict(cfg)["model"])
    encoder.to(ctx.device, memory_format=memory_format(cfg.model.channels_last))
    result = evaluate_knn(encoder, cfg, ctx.device)
    if ctx.is_main:
        left_out = f" ({result['skipped']} unreadable left out)" if result["skipped"] else ""
        print(f"kNN (k={cfg.knn.k}, T={cfg.knn.temperature}) on {result['count']} images{left_out}: "
              f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
