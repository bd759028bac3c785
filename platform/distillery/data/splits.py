"""The prepared-data contract between `prepare` and every stage that reads its output.

A prepared directory (`cfg.prepared_dir`) holds:

    manifest.json        what was prepared: sources, counts per step, quarantine counts, mix,
                         `fingerprint` (identifies the exact token content of the splits),
                         `tokenizer` identity, the resolved config
    train/*.parquet      one row per training example (see COLUMNS)
    val/*.parquet
    test/*.parquet
    quarantine/          rejected rows with reason, source file and line

Every split row has the columns in COLUMNS. `input_ids` and `labels` have the same length
(at most `data.max_length`); `labels` is -100 on prompt and padding positions, so the loss
sees response tokens only. Rows are not padded on disk: collation pads per batch.
Readers open splits by path with `read_split` and never import the writer.
"""

from __future__ import annotations

import json
import os
from typing import Any

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
IGNORE_INDEX = -100  # label value the cross-entropy and KD losses skip

# column -> meaning. Extra columns may exist; these are always there.
COLUMNS: dict[str, str] = {
    "row_id": "stable hash of the normalised row (also what the split is decided by)",
    "source": "name of the data source the row came from",
    "prompt": "rendered prompt text (chat template applied), empty for plain text",
    "response": "rendered response text (the part that is trained on)",
    "input_ids": "list<int32>: prompt + response token ids",
    "labels": "list<int32>: input_ids with prompt and padding positions set to -100",
    "num_tokens": "int32: len(input_ids)",
    "augment": "provenance of augmentation ('' for an original row)",
}


class PreparedDataError(FileNotFoundError):
    """A prepared directory that is missing or incomplete; the message says which and where."""


def split_dir(prepared: str, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    return os.path.join(prepared, split)


def load_manifest(prepared: str) -> dict[str, Any]:
    """The manifest of a prepared directory, or PreparedDataError telling the user to run `prepare`."""
    path = os.path.join(prepared, MANIFEST)
    if not os.path.isfile(path):
        raise PreparedDataError(
            f"data.prepared: '{prepared}' has no {MANIFEST}; run `distillery prepare CONFIG` first"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_parquet(paths: str | list[str], **kwargs):
    """`ray.data.read_parquet` through Ray Data's V1 Parquet datasource, for the directories this
    platform writes (tens of files, not millions). The V2 datasource, Ray 2.60's default, lists the
    files in a task that starts a pool of 32 `FooterReader` actors (32 new worker processes) on
    every execution, so every epoch, which dwarfs reading a small split on a small machine; V1 reads
    the few footers where the dataset is planned (benchmarks/README.md, "Where a training step's
    time goes")."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    previous, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(paths, **kwargs)
    finally:
        ctx.use_datasource_v2 = previous


def read_split(prepared: str, split: str, columns: list[str] | None = None):
    """The split as a streaming `ray.data.Dataset` of Parquet rows."""
    d = split_dir(prepared, split)
    if not os.path.isdir(d) or not any(name.endswith(".parquet") for name in os.listdir(d)):
        raise PreparedDataError(f"data.prepared: split '{split}' has no parquet files under '{d}'")
    return read_parquet(d, columns=columns)


def head_rows(prepared: str, split: str, columns: list[str], max_rows: int | None = None, max_tokens: int | None = None) -> list[dict]:
    """The first rows of a split, read directly (no Ray): up to `max_rows` rows, or as many as hold
    `max_tokens` tokens of `input_ids`. For small samples a worker takes before training (ESFT's
    expert relevance, EWC's Fisher)."""
    import pyarrow.parquet as pq

    d = split_dir(prepared, split)
    if not os.path.isdir(d):
        raise PreparedDataError(f"data.prepared: no prepared {split} split at '{d}'")
    rows: list[dict] = []
    tokens = 0
    for name in sorted(os.listdir(d)):
        if not name.endswith(".parquet"):
            continue
        for row in pq.read_table(os.path.join(d, name), columns=columns).to_pylist():
            if (max_rows is not None and len(rows) >= max_rows) or (max_tokens is not None and tokens >= max_tokens):
                return rows
            rows.append(row)
            tokens += len(row.get("input_ids") or ())
    return rows
