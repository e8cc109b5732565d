"""WebDataset shards through DALI (data.shards with data.backend dali, or auto where DALI is the choice): the
shard loader's order, reads and replacement rule (pipelines/shards.py, docs/data.md) feeding the DALI graph of
pipelines/dali.py with each member's encoded bytes (nvJPEG on a GPU, DALI's CPU decoder without one) and the
same crop draws, keyed by (seed, epoch, sample id, slot), as every other loader."""
from __future__ import annotations

import sys

import numpy as np

from pipelines.crop_params import P_ROI
from pipelines.dali import DaliMultiCropLoader, _Prepared
from pipelines.images import ReadsInFlight, UnreadableData
from pipelines.shards import ShardCache, ShardOrder, ShardSampler, ShardSteps, resolve_shards


class _Where:
    """samples[sample id][0]: where a sample lives ("sample 'key' of shard 'url'"), for DALI's error lines."""

    def __init__(self, shards):
        self.shards = shards

    def __len__(self) -> int:
        return self.shards.total

    def __getitem__(self, sample_id: int):
        shard, position = self.shards.locate(sample_id)
        return f"sample {position} of shard '{self.shards.urls[shard]}'", None


class DaliShardLoader(ShardSteps, DaliMultiCropLoader):
    """DaliMultiCropLoader over WebDataset shards: len() steps per epoch, .epoch(e, start_step), .num_samples,
    .identity (what the checkpoint records), .order (ShardOrder), .operator_count, .close()."""

    def __init__(self, cfg, seed: int, rank: int, world: int, device_id: int | None = None, shards=None, **kwargs):
        self._shards = shards
        super().__init__(cfg, seed, rank, world, device_id, **kwargs)

    def _open_source(self, batch_size: int, rank: int, world: int) -> None:
        cfg = self.cfg
        self.shards = self._shards or resolve_shards(cfg.shards, "data.shards", cfg.shard_retries, cfg.shard_backoff)
        self.order = ShardOrder(self.shards, batch_size, cfg.shard_streams, world, self.seed)
        self.reads = ReadsInFlight()
        self.cache = ShardCache(self.shards, cfg.shard_read_threads, cfg.shard_read_ahead, cfg.shard_retries,
                                cfg.shard_backoff, self.reads)
        self.sampler = ShardSampler(self.order, rank, world, self.cache, cfg.shard_label_key)
        self.samples = _Where(self.shards)
        self._warned = 0

    def _check(self, sample):
        """(encoded bytes as uint8, width, height) of one member, or None when it is unreadable (warned)."""
        sample_id, where, data, _, why = sample
        try:
            if data is None:
                raise ValueError(why)
            return self.reader.encoded(data, where)
        except Exception as exc:
            if self._warned < 20:
                self._warned += 1
                print(f"warning: skipped unreadable {where} (id {sample_id}; {type(exc).__name__}: {exc}); using the "
                      f"next readable sample of its stream's share instead", file=sys.stderr)
            return None

    def _prepare(self, shares) -> _Prepared:
        """One step of this rank's streams: each sample's bytes checked as a file's would be, an unreadable one
        replaced by the next readable sample of the same stream's share (pipelines.shards' rule), the crops drawn
        for the requested sample id."""
        epoch = shares[0].epoch
        requested, jpegs, widths, heights, index, label, failed = [], [], [], [], [], [], 0
        flat = [sample for share in shares for sample in share.samples]
        results = iter(list(self.pool.map(self._check, flat)))  # every member checked once, on the read threads
        for share in shares:
            n = len(share.samples)
            checked = {j: next(results) for j in range(n)}
            for i, sample in enumerate(share.samples):
                for attempt in range(n):
                    j = (i + attempt) % n
                    if checked[j] is not None:
                        break
                else:
                    raise UnreadableData(f"every sample of stream {share.stream}'s share of step {share.step} (epoch "
                                         f"{share.epoch}) is unreadable, e.g. {share.samples[0][1]}: "
                                         f"{share.samples[0][4]}; the shards are damaged; check them (sha256 in the "
                                         f"manifest)")
                data, width, height = checked[j]
                requested.append(sample[0])
                jpegs.append(data)
                widths.append(width)
                heights.append(height)
                index.append(share.samples[j][0])
                label.append(share.samples[j][3])
                failed += attempt
        params = self._draw(epoch, requested, widths, heights)
        rois = [np.ascontiguousarray(params[c][:, P_ROI]) for c in range(self.num_crops)]
        return _Prepared(jpegs, rois, params, index, label, failed)

    def close(self) -> None:
        super().close()
        self.cache.close()
