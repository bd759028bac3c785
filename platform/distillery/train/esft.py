"""ESFT on the Ray Train workers: which experts this run trains (models/experts.py does the measuring).

Rank 0 measures expert relevance on the first `method.esft.sample_tokens` tokens of the prepared
training split with the freshly loaded model, chooses the experts, writes `esft_experts.json` to
the run directory and broadcasts the choice, so every rank trains the same slices. A resumed run
reuses the file it wrote (its checkpoints were trained on that choice); `method.esft.experts_file`
reuses another run's.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch
import torch.distributed as dist

from distillery.config import Config
from distillery.data.splits import head_rows
from distillery.models.experts import ESFT_FILE, expert_relevance, read_selection, select_experts, write_selection


def sample_batches(cfg: Config, pad_id: int, device: torch.device, batch_size: int = 8) -> Iterator[dict[str, torch.Tensor]]:
    """The first training rows, batched and padded: `input_ids` / `attention_mask` [B, T]."""
    from distillery.train.collate import collate

    rows = head_rows(cfg.prepared_dir, "train", ["input_ids", "labels"], max_tokens=cfg.method.esft.sample_tokens)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        b = collate({"input_ids": [r["input_ids"] for r in chunk], "labels": [r["labels"] for r in chunk]}, pad_id, cfg.data.max_length)
        yield {k: b[k].to(device) for k in ("input_ids", "attention_mask")}


def measure(cfg: Config, model, pad_id: int, device: torch.device) -> tuple[dict[int, list[float]], dict[int, list[int]], int]:
    """(relevance per layer, chosen experts per layer, tokens measured) of `model` on the training split."""
    esft = cfg.method.esft
    relevance, tokens = expert_relevance(model.to(device), sample_batches(cfg, pad_id, device), esft.relevance, esft.sample_tokens)
    return relevance, select_experts(relevance, esft.threshold), tokens


def choose_experts(cfg: Config, model, pad_id: int, device: torch.device, rank: int, resuming: bool) -> tuple[dict[int, list[int]], dict | None]:
    """The experts every rank trains, and (rank 0, when measured here) what `record_choice` writes."""
    own = os.path.join(cfg.output_dir, ESFT_FILE)
    pending = None
    if cfg.method.esft.experts_file:
        selected = read_selection(cfg.method.esft.experts_file)
    elif resuming and os.path.isfile(own):
        selected = read_selection(own)
    elif rank == 0:
        relevance, selected, tokens = measure(cfg, model, pad_id, device)
        pending = {"relevance": relevance, "selected": selected, "tokens": tokens}
    else:
        selected = None
    if dist.is_available() and dist.is_initialized():
        box = [selected]
        dist.broadcast_object_list(box, src=0)
        selected = box[0]
    return {int(k): v for k, v in selected.items()}, pending


def record_choice(cfg: Config, pending: dict | None, trainable_fraction: float) -> None:
    """Rank 0: write `esft_experts.json` with the relevance scores and the trainable fraction."""
    if pending is None:
        return
    write_selection(os.path.join(cfg.output_dir, ESFT_FILE), cfg.method.esft, pending["relevance"], pending["selected"],
                    pending["tokens"], trainable_fraction)
