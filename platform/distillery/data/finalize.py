"""Pass 3 of `prepare`, finalise: one Ray task per staged file (plus the back-translation branch).

Each task drops duplicates, mixes sources to their weights, splits by a hash of the row, augments
training rows (synonyms, clause reordering), cuts to `max_length` (truncation, sliding windows,
packing), writes `<split>/*.parquet` itself and streams back per-batch counts and digests
(`SplitCounts`: rows, tokens, the fingerprint's order-independent sums) per (split, source).
Back-translated copies take the same selection, then a translation actor, then the same writing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from distillery.data.augment import Synonyms, augment_messages, provenance
from distillery.data.context import AugmentSettings, FinalizeContext
from distillery.data.mix import copies_of, unit_hash
from distillery.data.normalize import render
from distillery.data.shared import no_gc, row_id, row_schema, worker_tokenizer, write_text
from distillery.data.splits import SPLITS
from distillery.data.tokenize import encode_batch, pack, truncate, windows

HASH_MOD = 2**63  # the digest sums stay below this: they fit an int64 column


@dataclass
class SplitCounts:
    """What finalise counts of one (split, source): the columns of `split_summary`'s table."""

    rows: int = 0
    """Rows written."""
    tokens: int = 0
    """Tokens in the written rows."""
    augmented: int = 0
    """Written rows that are augmented copies."""
    orig_tokens: int = 0
    """Tokens in the written rows that are not augmented copies."""
    h1: int = 0
    """First lane of the order-independent digest: sum of the rows' sha256 bytes 0-7, mod 2**63."""
    h2: int = 0
    """Second lane of the digest: sum of bytes 8-15, mod 2**63 (two lanes make collisions negligible)."""
    selected: int = 0
    """Original rows the mix kept, each counted once however often it is repeated, windowed or augmented."""
    mixed_out: int = 0
    """Rows the mix dropped (downsampling), counted in the split their hash gives them."""

    def add_row(self, tokens: int, augmented: bool, digest: bytes) -> None:
        """Count one row with `tokens` tokens and the sha256 `digest` of its content."""
        self.rows += 1
        self.tokens += tokens
        self.augmented += augmented
        self.orig_tokens += 0 if augmented else tokens
        self.h1 = (self.h1 + int.from_bytes(digest[:8], "little")) % HASH_MOD
        self.h2 = (self.h2 + int.from_bytes(digest[8:16], "little")) % HASH_MOD

    def add(self, other: SplitCounts) -> SplitCounts:
        """Add `other`'s counts to these (digests stay sums mod 2**63); returns self."""
        self.rows += other.rows
        self.tokens += other.tokens
        self.augmented += other.augmented
        self.orig_tokens += other.orig_tokens
        self.h1 = (self.h1 + other.h1) % HASH_MOD
        self.h2 = (self.h2 + other.h2) % HASH_MOD
        self.selected += other.selected
        self.mixed_out += other.mixed_out
        return self

    @classmethod
    def from_row(cls, row: dict) -> SplitCounts:
        """The counts of one row of `split_summary`'s table (a dict with at least its count columns)."""
        return cls(**{name: int(row[name]) for name in COUNT_COLUMNS})


COUNT_COLUMNS = tuple(f.name for f in dataclasses.fields(SplitCounts))


# --------------------------------------------------------------------------- row selection


def select_table(batch, ctx: FinalizeContext, repeats: bool = True) -> tuple[Any, dict[tuple[str, str], SplitCounts]]:
    """Drop duplicates, bring each source to its mix share and add the `split` column: the same
    decision for every branch. Upsampled training rows are repeated with row_id `<id>-r<k>`
    (`repeats`). Only the row ids and sources leave Arrow; the token columns are taken as they are.
    Returns the table and, per (split, source), how many rows the mix selected and dropped."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(ctx.dups):
        batch = batch.filter(pc.invert(pc.is_in(batch["uid"], value_set=pa.array(ctx.dups, pa.int64()))))
    seed, rates = ctx.seed, ctx.rates
    take, row_ids, splits = [], [], []
    counts: dict[tuple[str, str], SplitCounts] = {}
    sources = batch["source"].to_pylist()
    # data.balance scales the mix rate of training rows by their group's factor.
    groups = sources if ctx.balance_by == "source" else batch["group"].to_pylist() if ctx.balance_by == "label" else None
    for i, (rid, source) in enumerate(zip(batch["row_id"].to_pylist(), sources)):
        u = unit_hash("split", seed, rid)
        split = "val" if u < ctx.val_fraction else "test" if u < ctx.val_fraction + ctx.test_fraction else "train"
        rate = rates[source] * (ctx.balance.get(groups[i], 1.0) if groups is not None and split == "train" else 1.0)
        n = copies_of(rate, unit_hash("mix", seed, rid)) if rate != 1.0 else 1
        c = counts.setdefault((split, source), SplitCounts())
        if n == 0:
            c.mixed_out += 1
            continue
        c.selected += 1
        take.append(i)
        row_ids.append(rid)
        splits.append(split)
        if repeats and split == "train":  # val and test measure the data as it is: never repeated
            for k in range(1, n):
                take.append(i)
                row_ids.append(f"{rid}-r{k}")
                splits.append(split)
    out = batch.take(pa.array(take, pa.int64()))
    out = out.set_column(out.schema.get_field_index("row_id"), "row_id", pa.array(row_ids, pa.string()))
    return out.append_column("split", pa.array(splits, pa.string())), counts


def select_for_back_translation(batch, ctx: FinalizeContext):
    """The selected training rows (`select_table`, without repeats) that back-translation samples."""
    import pyarrow as pa

    table, _ = select_table(batch, ctx, repeats=False)  # the main branch counts the selection
    seed, p = ctx.augment.seed, ctx.bt_probability
    chosen = [split == "train" and unit_hash("bt", seed, rid) < p
              for rid, split in zip(table["row_id"].to_pylist(), table["split"].to_pylist())]
    return table.filter(pa.array(chosen, pa.bool_())).select(["uid", "row_id", "source", "messages", "label", "metadata", "split"])


# --------------------------------------------------------------------------- the tasks


def finalize_file(batch: dict, ctx: FinalizeContext):
    """Ray Data UDF over one staged file: `finalize_batch` on each of its row groups; returns the
    summaries (see split_summary)."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    (path,) = batch["path"]
    fs, p = fsspec.core.url_to_fs(str(path))
    with fs.open(p, "rb") as f:
        staged = pq.ParquetFile(f)
        return pa.concat_tables([finalize_batch(staged.read_row_group(g), ctx) for g in range(staged.num_row_groups)])


def finalize_batch(batch, ctx: FinalizeContext):
    """Originals plus their synonym/reorder copies (train only), cut to length: the rows that are
    written. Returns their summary (split_summary) with the mix's selection counts added."""
    with no_gc():
        table, selection = select_table(batch, ctx)
        if ctx.balance_by:
            _record_balance(table, ctx)
        acc = {(r["split"], r["source"]): SplitCounts.from_row(r) for r in _write_selected(table, ctx).to_pylist()}
    for key, counts in selection.items():
        acc.setdefault(key, SplitCounts()).add(counts)
    return summary_table(acc)


def _record_balance(table, ctx: FinalizeContext) -> None:
    """Training rows selected per balance group (repeats count) to `_balance/`, for the manifest's
    achieved ratios."""
    import uuid

    key = "source" if ctx.balance_by == "source" else "group"
    counts = Counter(g for g, split in zip(table[key].to_pylist(), table["split"].to_pylist()) if split == "train")
    write_text(f"{ctx.tmp}/_balance/{uuid.uuid4().hex}.json", json.dumps(counts))


def _write_selected(table, ctx: FinalizeContext):
    """Write the selected rows and their augmented copies, cut to length; returns their summary."""
    import pyarrow as pa
    import pyarrow.compute as pc

    aug = ctx.augment
    copy_rows = bool(aug.copies and (aug.synonyms is not None or aug.reorder is not None))
    if not copy_rows and ctx.window is None and not ctx.packing:
        # Originals only, cut to max_length in Arrow. Ingest already dropped the rows whose prompt
        # alone fills max_length, so this slice is exactly `truncate`.
        ids = pc.list_slice(table["input_ids"], 0, ctx.max_length)
        labels = pc.list_slice(table["labels"], 0, ctx.max_length)
        table = (table.set_column(table.schema.get_field_index("input_ids"), "input_ids", ids)
                 .set_column(table.schema.get_field_index("labels"), "labels", labels)
                 .set_column(table.schema.get_field_index("num_tokens"), "num_tokens",
                             pc.list_value_length(ids).cast(pa.int32())))
        return write_table(table.select(row_schema(False).names), ctx, "part")
    rows = table.to_pylist()
    copies = _augmented_copies(rows, aug) if copy_rows else []
    return write_rows(_shape(rows + _encode_rows(copies, ctx), ctx), ctx, "part")


def finalize_translated(batch, ctx: FinalizeContext):
    """Ray Data UDF over back-translated rows: tokenise, cut to length and write them."""
    with no_gc():
        return write_rows(_shape(_encode_rows(batch.to_pylist(), ctx), ctx), ctx, "bt")


# --------------------------------------------------------------------------- augmentation and shaping


def _augmented_copies(rows: list[dict], aug: AugmentSettings) -> list[dict]:
    """The synonym / reorder copies of the training rows (messages changed, not yet tokenised)."""
    copies = []
    syn = _synonyms(aug.synonyms.groups) if aug.synonyms else None
    for r in rows:
        if r["split"] != "train":
            continue  # augmented rows never reach val or test
        for c in range(1, aug.copies + 1):
            res = augment_messages(json.loads(r["messages"]), r["row_id"], c, aug.seed, syn,
                                   aug.synonyms.probability if syn else 0.0, aug.reorder)
            if res is not None:
                copies.append({**r, "messages": json.dumps(res[0], ensure_ascii=False), "augment": provenance(res[1])})
    return copies


_SYN_CACHE: dict[int, Synonyms] = {}


def _synonyms(groups: list[list[str]]) -> Synonyms:
    """The matcher for `groups`, built once per worker process."""
    key = hash(json.dumps(groups))
    if key not in _SYN_CACHE:
        _SYN_CACHE[key] = Synonyms(groups)
    return _SYN_CACHE[key]


def _encode_rows(rows: list[dict], ctx: FinalizeContext) -> list[dict]:
    """Render and tokenise rows whose `messages` changed (augmented copies)."""
    tok = worker_tokenizer(ctx.tokenizer)
    for r in rows:
        msgs = json.loads(r["messages"])
        text = msgs[0]["content"] if msgs[0]["role"] == "text" else None
        r["prompt"], r["response"] = render(None if text is not None else msgs, text, tok, ctx.chat_template)
        # Provenance names the original row: two originals whose copies happen to read the same keep distinct ids.
        r["row_id"] = row_id(r["prompt"], r["response"] + "\0" + r["augment"])
    for r, (ids, labels) in zip(rows, encode_batch(tok, [r["prompt"] for r in rows], [r["response"] for r in rows])):
        r["input_ids"], r["labels"], r["num_tokens"] = ids, labels, len(ids)
    return rows


def _shape(rows: list[dict], ctx: FinalizeContext) -> list[dict]:
    """Truncate, window (plain text with data.window) and pack rows into their final sequences."""
    out = []
    win = ctx.window
    for r in rows:
        ids, labels = list(r["input_ids"]), list(r["labels"])
        if win is not None and not r["prompt"]:
            pieces = windows(ids, labels, min(win.size, ctx.max_length), win.stride)
        else:
            cut = truncate(ids, labels, ctx.max_length)
            pieces = [cut] if cut else []
        for i, (w_ids, w_labels) in enumerate(pieces):
            row = {**r, "input_ids": w_ids, "labels": w_labels, "num_tokens": len(w_ids)}
            if len(pieces) > 1:
                row["row_id"] = f"{r['row_id']}-w{i}"
            out.append(row)
    return pack(out, ctx.max_length) if ctx.packing else out


# --------------------------------------------------------------------------- writing and counting


def write_rows(rows: list[dict], ctx: FinalizeContext, prefix: str):
    """`write_table` for rows as dicts."""
    import pyarrow as pa

    return write_table(pa.Table.from_pylist(rows, schema=row_schema(False)), ctx, prefix)


def write_table(table, ctx: FinalizeContext, prefix: str):
    """Write a batch's rows (final schema, with `split`) into `<tmp>/<split>/` and return its summary
    (see split_summary).

    Files are named by a hash of their row ids, so a retried task overwrites its own files
    instead of adding rows; writing here, not in a separate sink, lets one pass both write and count.
    """
    import fsspec
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for split in SPLITS:
        part = table.filter(pc.equal(table["split"], split))
        if not part.num_rows:
            continue
        name = hashlib.sha1("".join(part["row_id"].to_pylist()).encode()).hexdigest()[:20]
        fs, path = fsspec.core.url_to_fs(f"{ctx.tmp}/{split}/{prefix}-{name}.parquet")
        with fs.open(path, "wb") as f:
            pq.write_table(part.drop_columns(["split"]), f)
    return split_summary(table)


def split_summary(batch) -> Any:
    """Per (split, source) of a batch: its `SplitCounts` (rows, tokens, augmented rows, tokens of
    original rows and an order-independent digest: two 64-bit sums of per-row sha256 of the token
    content), as an Arrow table with columns split, source and COUNT_COLUMNS."""
    import pyarrow.compute as pc

    def flat(col: str) -> tuple[np.ndarray, np.ndarray]:
        """The column's int32 values end to end, and each row's offset into them (n + 1)."""
        lists = batch[col]
        lens = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
        return (pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
                np.concatenate([[0], np.cumsum(lens)]))

    ids, off = flat("input_ids")
    labels, loff = flat("labels")
    acc: dict[tuple[str, str], SplitCounts] = {}
    for i, (split, source, rid, aug) in enumerate(zip(batch["split"].to_pylist(), batch["source"].to_pylist(),
                                                      batch["row_id"].to_pylist(), batch["augment"].to_pylist())):
        d = hashlib.sha256(f"{split}|{rid}|".encode() + ids[off[i]:off[i + 1]].tobytes() + b"|"
                           + labels[loff[i]:loff[i + 1]].tobytes()).digest()
        acc.setdefault((split, source), SplitCounts()).add_row(int(off[i + 1] - off[i]), bool(aug), d)
    return summary_table(acc)


def summary_table(acc: dict[tuple[str, str], SplitCounts]):
    """`SplitCounts` per (split, source) as the Arrow table the finalise tasks stream back."""
    import pyarrow as pa

    keys = list(acc)
    return pa.table({
        "split": [k[0] for k in keys], "source": [k[1] for k in keys],
        **{name: [getattr(acc[k], name) for k in keys] for name in COUNT_COLUMNS},
    }, schema=pa.schema([("split", pa.string()), ("source", pa.string())] + [(n, pa.int64()) for n in COUNT_COLUMNS]))
