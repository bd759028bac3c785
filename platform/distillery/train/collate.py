"""Pad a batch of prepared rows (variable-length token lists) into tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distillery.data.splits import IGNORE_INDEX


def collate(batch: dict[str, Any], pad_id: int, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Numpy batch from `iter_batches` -> padded tensors.

    Returns `input_ids` [B, T] int64 (pad_id on padding), `labels` [B, T] int64 (-100 on padding
    and prompt positions), `attention_mask` [B, T] int64; T is the longest row (capped at max_length).
    Any other list-valued columns are left as they are under their own keys.
    """
    ids_rows = [np.asarray(r) for r in batch["input_ids"]]
    label_rows = [np.asarray(r) for r in batch["labels"]]
    width = max(len(r) for r in ids_rows)
    if max_length:
        width = min(width, max_length)
    n = len(ids_rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(ids_rows, label_rows)):
        k = min(len(ids), width)
        input_ids[i, :k] = torch.from_numpy(ids[:k].astype(np.int64))
        labels[i, :k] = torch.from_numpy(lab[:k].astype(np.int64))
        mask[i, :k] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
    for key, value in batch.items():
        if key not in out:
            out[key] = value
    return out
