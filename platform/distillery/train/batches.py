"""The rows a worker trains and validates on: its Ray Data shard cut into micro-batches.

Training batches resume mid-epoch from the data position in `TrainState`; validation batches are
kept in memory after the first pass when every worker's shard is small.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from distillery.config import Config
from distillery.train.checkpoint import TrainState
from distillery.train.collate import collate
from distillery.train.parallel import all_reduce_sums


FETCH_ROWS = 256  # rows pulled from the data shard at a time, then cut into micro-batches


def shard_batches(shard, batch_size: int, columns: list[str]) -> Iterator[dict[str, Any]]:
    """The shard's rows in order, as numpy batches of `batch_size` (the last one may be shorter).

    Pulls about FETCH_ROWS rows per `iter_batches` batch and slices them here: each Ray Data batch
    has a fixed cost (block fetch, Arrow -> numpy) that is large next to a small model's step at
    micro-batches of a few rows (benchmarks/README.md, "Where a training step's time goes").
    The micro-batches are the same as `iter_batches(batch_size)`'s.
"""
    fetch = batch_size * max(1, FETCH_ROWS // batch_size)
    for big in shard.iter_batches(batch_size=fetch, batch_format="numpy"):
        cols = {k: big[k] for k in columns if k in big}
        n = len(next(iter(cols.values())))
        for start in range(0, n, batch_size):
            yield {k: v[start : start + batch_size] for k, v in cols.items()}


def micro_batches(shard, cfg: Config, pad_id: int, state: TrainState, columns: list[str]):
    """Yield (epoch, collated micro-batch) forever, skipping what the restored state already consumed."""
    while True:
        skip = state.micro_in_epoch
        for i, batch in enumerate(shard_batches(shard, cfg.train.batch_size, columns)):
            if i < skip:
                continue
            yield collate(batch, pad_id, cfg.data.max_length)
        state.epoch += 1
        state.micro_in_epoch = 0
        if cfg.train.max_steps is None and state.epoch >= cfg.train.epochs:
            return


VAL_KEEP_BYTES = 256 * 2**20  # a validation shard up to this size (per worker) is read once and kept


def _nbytes(value: Any) -> int:
    """Bytes held by a numpy column value, nested object arrays (list columns) included."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes) if value.dtype != object else sum(_nbytes(v) for v in value)
    return 8


class ValidationBatches:
    """The validation shard's micro-batches. The first pass streams them from Ray Data and keeps them
    when every worker's shard is under VAL_KEEP_BYTES; later evaluations replay them from memory.
    Each pass over a streaming shard starts a Dataset execution (seconds): with frequent evaluations
    (ASHA rungs, small `eval_every`) that cost more than evaluating. Every worker decides the same
    (an all-reduce), since the shards of one split must be iterated together."""

    def __init__(self, shard, batch_size: int, columns: list[str]):
        self.shard, self.batch_size, self.columns = shard, batch_size, columns
        self.kept: list[dict[str, Any]] | None = None
        self._pending: list[dict[str, Any]] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.kept is not None:
            yield from self.kept
            return
        pending: list[dict[str, Any]] | None = []
        size = 0
        for batch in shard_batches(self.shard, self.batch_size, self.columns):
            if pending is not None:
                size += sum(_nbytes(v) for v in batch.values())
                if size <= VAL_KEEP_BYTES:
                    pending.append(batch)
                else:
                    pending = None
            yield batch
        self._pending = pending

    def settle(self, device: torch.device) -> None:
        """After a full pass: keep the batches if no worker's shard went over the limit."""
        if self.kept is None:
            over = all_reduce_sums({"over": float(self._pending is None)}, device)["over"]
            self.kept = self._pending if over == 0 else None
            self._pending = None


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
