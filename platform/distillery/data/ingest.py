"""Pass 1 of `prepare`, ingest: one Ray task per file chunk.

Each task reads its chunk with file and line, validates, normalises (NFC, whitespace), renders
through the chat template, tokenises, filters by length and computes the dedupe keys (exact hash
+ MinHash LSH bands). Bad rows go to `quarantine/` with reason, file and line. Output, under the
temporary directory: the chunk's staged Parquet file (`_stage/`), its (key, uid, signature) rows
bucketed by key into files (`_keys/`) and its counts (`_stats/`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Iterator

import numpy as np

from distillery.data import dedupe as dd
from distillery.data.context import IngestContext
from distillery.data.mix import balance_key
from distillery.data.normalize import content_text, dedupe_texts, normalize_fields, render, to_messages
from distillery.data.read import read_chunk
from distillery.data.shared import no_gc, row_id, row_schema, tokenizer_identity, worker_tokenizer, write_text
from distillery.data.tokenize import encode_batch, truncate
from distillery.data.validate import Invalid, validate

OUT_BATCH = 4096  # rows per block the ingest tasks emit: bounded task memory, few small blocks and files
UID_LINE_BITS, UID_FILE_BITS = 33, 20  # uid = source | file | line, so uid order = config order


def uid_of(source_idx: int, file_idx: int, line: int) -> int:
    """The row's uid: its source, file and line packed into one int64."""
    return (((source_idx << UID_FILE_BITS) | file_idx) << UID_LINE_BITS) | line


def source_of_uid(uid: int) -> int:
    """The index (in `data.sources`) of the source a uid's row comes from."""
    return uid >> (UID_LINE_BITS + UID_FILE_BITS)


def chunk_id(chunk: dict) -> str:
    """The name of everything a chunk's ingest task writes: sorts in source, file and byte order."""
    return f"{int(chunk['source_idx']):04d}-{int(chunk['file_idx']):06d}-{int(chunk['start']):012d}"


def ingest_chunk(batch: dict, ctx: IngestContext) -> dict:
    """Ray Data UDF over one chunk descriptor: writes the chunk's staged rows, dedupe keys,
    quarantine and stats under `ctx.tmp`; returns the chunk's id.

    The task writes its staged rows itself, one Parquet row group per batch of OUT_BATCH rows,
    rather than handing them to a Ray Data write: nothing crosses the object store, and the next
    pass finds one file per chunk, named by it, to give to one task each.
    """
    import fsspec
    import pyarrow.parquet as pq

    (chunk,) = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
    cid = chunk_id(chunk)
    fs, path = fsspec.core.url_to_fs(f"{ctx.tmp}/_stage/{cid}.parquet")
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    writer = None
    with no_gc(), fs.open(path, "wb") as f:
        for table in _ingest_chunk(chunk, ctx, cid):
            writer = writer or pq.ParquetWriter(f, table.schema)
            writer.write_table(table)
        if writer is not None:
            writer.close()
    if writer is None:  # nothing valid in the chunk: no staged file
        fs.rm(path)
    return {"chunk": np.array([cid])}


def _ingest_chunk(chunk: dict, ctx: IngestContext, cid: str) -> Iterator[Any]:
    """The chunk's valid rows as Arrow tables of up to OUT_BATCH rows; then writes its dedupe
    keys, quarantined lines and stats."""
    state = _ChunkIngest(chunk, ctx)
    for line, obj, raw, reason in read_chunk(state.path, int(chunk["start"]), int(chunk["end"]), int(chunk["first_line"])):
        state.add(line, obj, raw, reason)
        if len(state.pending) >= OUT_BATCH:
            yield state.flush()
    if state.pending:
        yield state.flush()
    state.finish(cid)


class _ChunkIngest:
    """One chunk's ingest as it goes: its counts, quarantined lines, dedupe keys, and the valid
    rows waiting to be tokenised as a batch."""

    def __init__(self, chunk: dict, ctx: IngestContext):
        self.ctx = ctx
        self.src_idx, self.file_idx = int(chunk["source_idx"]), int(chunk["file_idx"])
        self.name, self.fmt, self.path = chunk["source"], chunk["format"], chunk["file"]
        self.tok = worker_tokenizer(ctx.tokenizer)
        self.stats: Counter = Counter()
        self.quarantine: list[str] = []
        # (keys, uids, signatures) for pass 2
        self.key_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self.pending: list[dict] = []
        self.schema = row_schema(True)
        self.bands = self.rows_per_band = 0
        if ctx.dedupe.near:
            self.bands, self.rows_per_band = dd.lsh_params(ctx.dedupe.threshold, ctx.dedupe.num_perm)

    def bad(self, line: int, raw: str, reason: str, detail: str = "") -> None:
        """Count and quarantine one line."""
        self.stats["quarantine:" + reason] += 1
        self.quarantine.append(json.dumps({"reason": reason, "detail": detail, "source": self.name, "file": self.path,
                                           "line": line, "raw": raw}, ensure_ascii=False))

    def add(self, line: int, obj: Any, raw: str, reason: str | None) -> None:
        """One line as `read_chunk` gives it: quarantined, or rendered and queued for `flush`."""
        ctx = self.ctx
        self.stats["read"] += 1
        if reason:
            kind, _, detail = reason.partition(": ")
            self.bad(line, raw, kind, detail)
            return
        try:
            fields = normalize_fields(validate(obj, self.fmt), self.fmt)
        except Invalid as e:
            self.bad(line, raw or json.dumps(obj, ensure_ascii=False, default=str), e.reason, e.detail)
            return
        messages = to_messages(fields, self.fmt)
        try:
            prompt, response = render(messages, fields.get("text"), self.tok, ctx.chat_template)
        except Exception as e:  # noqa: BLE001 - a template error on one row must not stop the corpus
            self.bad(line, raw or json.dumps(obj, ensure_ascii=False, default=str), "template_error", str(e))
            return
        self.stats["valid"] += 1
        self.pending.append({
            "uid": uid_of(self.src_idx, self.file_idx, line), "row_id": row_id(prompt, response), "source": self.name,
            "prompt": prompt, "response": response,
            # The messages are only read again to augment: otherwise not worth a JSON encoding per row.
            "messages": json.dumps(messages if messages is not None else [{"role": "text", "content": fields["text"]}],
                                   ensure_ascii=False) if ctx.keep_messages else None,
            "label": _passthrough(fields["label"]), "metadata": _passthrough(fields["metadata"]),
            "group": balance_key(_passthrough(fields["label"]), messages, fields.get("text")) if ctx.count_labels else None,
            **self._near_texts(messages, fields.get("text")),
        })

    def _near_texts(self, messages: list[dict] | None, text: str | None) -> dict[str, str | None]:
        """What near-dedupe compares: `content` gives the candidate keys (the whole row, or the prompt
        with `near_by: prompt`); `response` must match too with `near_by: row`."""
        dedupe = self.ctx.dedupe
        if not dedupe.near:
            return {"content": None, "response_content": None}
        prompt, response = dedupe_texts(messages, text)
        if dedupe.near_by == "prompt":
            return {"content": prompt, "response_content": None}
        return {"content": content_text(messages, text), "response_content": response}

    def flush(self):
        """Tokenise the pending rows, filter them by length, record their dedupe keys and return
        the kept ones as an Arrow table (staged schema)."""
        import pyarrow as pa

        ctx, pending = self.ctx, self.pending
        encoded = encode_batch(self.tok, [r["prompt"] for r in pending], [r["response"] for r in pending])
        rows, ids_col, labels_col = [], [], []
        for r, (ids, labels) in zip(pending, encoded):
            if len(ids) < ctx.min_length:
                self.stats["too_short"] += 1
                continue
            if ctx.window is None and truncate(ids, labels, ctx.max_length) is None:
                self.stats["too_long"] += 1  # the prompt alone fills max_length: nothing left to learn from
                continue
            rows.append(r)
            ids_col.append(ids)
            labels_col.append(labels)
        pending.clear()
        self._add_keys(rows)
        num_tokens = [len(x) for x in ids_col]
        self.stats["rows"] += len(rows)
        self.stats["tokens"] += sum(num_tokens)
        if ctx.count_labels:  # data.balance.by: label sets its rates from these
            for r in rows:
                self.stats["label:" + r["group"]] += 1
        cols = {k: [r[k] for r in rows] for k in ("row_id", "source", "prompt", "response", "label", "metadata", "uid", "messages", "group")}
        return pa.table({**cols, "input_ids": ids_col, "labels": labels_col, "num_tokens": num_tokens,
                         "augment": [""] * len(rows)}, schema=self.schema)

    def _add_keys(self, rows: list[dict]) -> None:
        """The kept rows' dedupe keys: the exact key, and the MinHash band keys with the signature."""
        dedupe = self.ctx.dedupe
        uids = np.fromiter((r["uid"] for r in rows), dtype=np.int64, count=len(rows))
        if dedupe.exact:  # exact keys need no signature
            self.key_parts.append((np.fromiter((dd.exact_key(r["row_id"]) for r in rows), dtype=np.int64, count=len(rows)),
                                   uids, None))
        if dedupe.near and rows:
            sigs = dd.minhash_batch([r["content"] for r in rows], dedupe.num_perm, dedupe.shingle, self.ctx.seed)
            keys = dd.band_keys_batch(sigs, self.bands, self.rows_per_band).ravel()
            if dedupe.near_by == "row":  # the response's signature rides along: a near copy must match it too
                sigs = np.concatenate([sigs, dd.minhash_batch([r["response_content"] for r in rows], dedupe.num_perm,
                                                              dedupe.shingle, self.ctx.seed)], axis=1)
            self.key_parts.append((keys, np.repeat(uids, self.bands), np.repeat(sigs, self.bands, axis=0)))

    def finish(self, cid: str) -> None:
        """Write the chunk's key buckets, quarantined lines and stats."""
        tmp = self.ctx.tmp
        _write_key_buckets(self.key_parts, self.ctx.buckets, f"{tmp}/_keys", cid)
        if self.quarantine:
            write_text(f"{tmp}/quarantine/{cid}.jsonl", "\n".join(self.quarantine) + "\n")
        write_text(f"{tmp}/_stats/{cid}.json",
                   json.dumps({"source": self.name, "file": self.path, "tokenizer": tokenizer_identity(self.ctx.tokenizer),
                               **self.stats}))


def _passthrough(value: Any) -> str | None:
    """label / metadata as stored: strings as they are, anything else as JSON (None stays null)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _write_key_buckets(key_parts: list, buckets: int, root: str, cid: str) -> None:
    """Write this chunk's (key, uid, signature) rows into one Parquet file per key bucket (key % buckets).

    `key_parts`: (int64 keys, int64 uids, uint32[n, num_perm] signatures or None for exact keys)
    per flush. Signatures are a fixed-size binary column (exact keys get zeros: they are never
    compared); with near-dedupe off the column is left out.
    This is the map side of a shuffle through files: pass 2 reads each bucket's files in one task.
    It costs one small file per (chunk, bucket) and no all-to-all exchange between processes, which
    on few cores costs more than these narrow rows' own work (benchmarks/README.md, "Prepare").
    """
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not key_parts:
        return
    keys = np.concatenate([k for k, _, _ in key_parts])
    uids = np.concatenate([u for _, u, _ in key_parts])
    width = next((sig.shape[1] for _, _, sig in key_parts if sig is not None), 0)
    sigs = None
    if width:
        sigs = np.concatenate([sig if sig is not None else np.zeros((len(k), width), np.uint32) for k, _, sig in key_parts])
    bucket = keys % buckets
    order = np.argsort(bucket, kind="stable")
    bounds = np.flatnonzero(np.diff(bucket[order])) + 1
    for idx in np.split(order, bounds):
        if not len(idx):
            continue
        cols = {"key": pa.array(keys[idx]), "uid": pa.array(uids[idx])}
        if sigs is not None:
            cols["sig"] = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(4 * width), len(idx), [None, pa.py_buffer(np.ascontiguousarray(sigs[idx]).tobytes())])
        fs, path = fsspec.core.url_to_fs(f"{root}/b{int(bucket[idx[0]]):05d}/{cid}.parquet")
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            pq.write_table(pa.table(cols), f)
