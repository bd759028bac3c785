"""`distillery prepare CONFIG`: corpus files -> training-ready Parquet splits, streaming on Ray Data.

    distillery prepare jobs/prepare.yaml
    RAY_AUTH_MODE=token ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python -m distillery prepare jobs/prepare.yaml

Three Ray Data passes; the driver only ever holds file lists, counts and the uids of duplicates:

1. **ingest** (one task per file chunk): read with file and line, validate, normalise (NFC,
   whitespace), render through the chat template, tokenise, filter by length, compute the dedupe
   keys (exact hash + MinHash LSH bands). Bad rows go to `quarantine/` with reason, file and line.
   Output: the chunk's staged Parquet file, and its (key, uid, signature) rows bucketed by key
   into files.
2. **dedupe** (one task per key bucket): rows sharing a key are compared; each task returns the
   rows that copy (exactly, or above the MinHash threshold) an earlier row.
3. **finalise** (one task per staged file): drop duplicates, mix sources to their weights, split by a hash of the row,
   augment training rows (synonyms, clause reordering, back-translation), cut to `max_length`
   (truncation, sliding windows, packing), write `<split>/*.parquet` and stream back per-batch
   counts and digests (rows, tokens, the fingerprint's order-independent sums).

Then the manifest is written and the temporary directory is renamed into place
(`data.prepared`), so readers never see half a result.
For a multi-node cluster `data.prepared` must be on shared storage, as tasks write beside it.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from functools import lru_cache
from typing import Any, Iterator

import numpy as np

from distillery.config import Config, ConfigError
from distillery.data import dedupe as dd
from distillery.data.augment import Synonyms, augment_messages, load_synonyms, provenance
from distillery.data.mix import copies_of, keep_rates, ratios, unit_hash
from distillery.data.normalize import content_text, normalize_fields, render, to_messages
from distillery.data.read import discover_files, file_kind, index_file, read_chunk
from distillery.data.splits import MANIFEST, SPLITS, read_parquet
from distillery.data.tokenize import encode_batch, load_tokenizer_cached, pack, truncate, windows
from distillery.data.validate import Invalid, validate

OUT_BATCH = 4096  # rows per block the ingest tasks emit: bounded task memory, few small blocks and files
UID_LINE_BITS, UID_FILE_BITS = 33, 20  # uid = source | file | line, so uid order = config order


def _uid(source_idx: int, file_idx: int, line: int) -> int:
    return (((source_idx << UID_FILE_BITS) | file_idx) << UID_LINE_BITS) | line


def _source_of_uid(uid: int) -> int:
    return uid >> (UID_LINE_BITS + UID_FILE_BITS)


def _row_id(prompt: str, response: str) -> str:
    """The stable id of a normalised row: also what exact dedupe and the split are decided by."""
    return hashlib.sha1((prompt + response).encode()).hexdigest()[:16]


def _schema(with_keys: bool):
    import pyarrow as pa

    fields = [
        ("row_id", pa.string()), ("source", pa.string()), ("prompt", pa.string()), ("response", pa.string()),
        ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("num_tokens", pa.int32()),
        ("augment", pa.string()), ("label", pa.string()), ("metadata", pa.string()),
    ]
    if with_keys:
        fields += [("uid", pa.int64()), ("messages", pa.string())]
    else:
        fields += [("split", pa.string())]
    return pa.schema(fields)


@contextlib.contextmanager
def _no_gc():
    """Pause the cyclic garbage collector: batch UDFs allocate many short-lived acyclic objects
    (row dicts, token lists) that reference counting frees anyway, and the collector's repeated
    scans of them cost 3-4x the work itself."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _passthrough(value: Any) -> str | None:
    """label / metadata as stored: strings as they are, anything else as JSON (None stays null)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _write_text(path: str, text: str) -> None:
    import fsspec

    with fsspec.open(path, "w", encoding="utf-8") as f:
        f.write(text)


# --------------------------------------------------------------------------- pass 1: ingest


def chunk_id(chunk: dict) -> str:
    """The name of everything a chunk's ingest task writes: sorts in source, file and byte order."""
    return f"{int(chunk['source_idx']):04d}-{int(chunk['file_idx']):06d}-{int(chunk['start']):012d}"


def ingest_chunk(batch: dict, ctx: dict) -> dict:
    """Ray Data UDF over one chunk descriptor: writes the chunk's staged rows, dedupe keys,
    quarantine and stats under `ctx["tmp"]`; returns the chunk's id.

    The task writes its staged rows itself, one Parquet row group per batch of OUT_BATCH rows,
    rather than handing them to a Ray Data write: nothing crosses the object store, and the next
    pass finds one file per chunk, named by it, to give to one task each.
    """
    import fsspec
    import pyarrow.parquet as pq

    (chunk,) = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
    cid = chunk_id(chunk)
    fs, path = fsspec.core.url_to_fs(f"{ctx['tmp']}/_stage/{cid}.parquet")
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    writer = None
    with _no_gc(), fs.open(path, "wb") as f:
        for table in _ingest_chunk(chunk, ctx, cid):
            writer = writer or pq.ParquetWriter(f, table.schema)
            writer.write_table(table)
        if writer is not None:
            writer.close()
    if writer is None:  # nothing valid in the chunk: no staged file
        fs.rm(path)
    return {"chunk": np.array([cid])}


def _ingest_chunk(chunk: dict, ctx: dict, cid: str) -> Iterator[Any]:
    import pyarrow as pa

    src_idx, file_idx = int(chunk["source_idx"]), int(chunk["file_idx"])
    name, fmt, path = chunk["source"], chunk["format"], chunk["file"]
    tok = _worker_tokenizer(ctx["tokenizer"])
    stats: Counter = Counter()
    quarantine: list[str] = []
    key_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []  # (keys, uids, signatures) for pass 2
    pending: list[dict] = []
    schema = _schema(True)
    dd_cfg = ctx["dedupe"]
    bands = rows_per_band = 0
    if dd_cfg["near"]:
        bands, rows_per_band = dd.lsh_params(dd_cfg["threshold"], dd_cfg["num_perm"])

    def bad(line: int, raw: str, reason: str, detail: str = "") -> None:
        stats["quarantine:" + reason] += 1
        quarantine.append(json.dumps({"reason": reason, "detail": detail, "source": name, "file": path, "line": line,
                                      "raw": raw}, ensure_ascii=False))

    def flush() -> pa.Table:
        encoded = encode_batch(tok, [r["prompt"] for r in pending], [r["response"] for r in pending])
        rows, ids_col, labels_col = [], [], []
        for r, (ids, labels) in zip(pending, encoded):
            if len(ids) < ctx["min_length"]:
                stats["too_short"] += 1
                continue
            if not ctx["window"] and truncate(ids, labels, ctx["max_length"]) is None:
                stats["too_long"] += 1  # the prompt alone fills max_length: nothing left to learn from
                continue
            rows.append(r)
            ids_col.append(ids)
            labels_col.append(labels)
        pending.clear()
        uids = np.fromiter((r["uid"] for r in rows), dtype=np.int64, count=len(rows))
        if dd_cfg["exact"]:  # exact keys need no signature
            key_parts.append((np.fromiter((dd.exact_key(r["row_id"]) for r in rows), dtype=np.int64, count=len(rows)), uids, None))
        if dd_cfg["near"] and rows:
            sigs = dd.minhash_batch([r["content"] for r in rows], dd_cfg["num_perm"], dd_cfg["shingle"], ctx["seed"])
            key_parts.append((dd.band_keys_batch(sigs, bands, rows_per_band).ravel(), np.repeat(uids, bands),
                              np.repeat(sigs, bands, axis=0)))
        num_tokens = [len(x) for x in ids_col]
        stats["rows"] += len(rows)
        stats["tokens"] += sum(num_tokens)
        cols = {k: [r[k] for r in rows] for k in ("row_id", "source", "prompt", "response", "label", "metadata", "uid", "messages")}
        return pa.table({**cols, "input_ids": ids_col, "labels": labels_col, "num_tokens": num_tokens,
                         "augment": [""] * len(rows)}, schema=schema)

    for line, obj, raw, reason in read_chunk(path, int(chunk["start"]), int(chunk["end"]), int(chunk["first_line"])):
        stats["read"] += 1
        if reason:
            kind, _, detail = reason.partition(": ")
            bad(line, raw, kind, detail)
            continue
        try:
            fields = normalize_fields(validate(obj, fmt), fmt)
        except Invalid as e:
            bad(line, raw or json.dumps(obj, ensure_ascii=False, default=str), e.reason, e.detail)
            continue
        messages = to_messages(fields, fmt)
        try:
            prompt, response = render(messages, fields.get("text"), tok, ctx["chat_template"])
        except Exception as e:  # noqa: BLE001 - a template error on one row must not stop the corpus
            bad(line, raw or json.dumps(obj, ensure_ascii=False, default=str), "template_error", str(e))
            continue
        stats["valid"] += 1
        pending.append({
            "uid": _uid(src_idx, file_idx, line), "row_id": _row_id(prompt, response), "source": name,
            "prompt": prompt, "response": response,
            # The messages are only read again to augment: otherwise not worth a JSON encoding per row.
            "messages": json.dumps(messages if messages is not None else [{"role": "text", "content": fields["text"]}],
                                   ensure_ascii=False) if ctx["keep_messages"] else None,
            "label": _passthrough(fields["label"]), "metadata": _passthrough(fields["metadata"]),
            "content": content_text(messages, fields.get("text")) if dd_cfg["near"] else None,
        })
        if len(pending) >= OUT_BATCH:
            yield flush()
    if pending:
        yield flush()
    _write_key_buckets(key_parts, ctx["buckets"], f"{ctx['tmp']}/_keys", cid)
    if quarantine:
        _write_text(f"{ctx['tmp']}/quarantine/{cid}.jsonl", "\n".join(quarantine) + "\n")
    _write_text(f"{ctx['tmp']}/_stats/{cid}.json",
                json.dumps({"source": name, "file": path, "tokenizer": _tokenizer_identity(ctx["tokenizer"]), **stats}))


# --------------------------------------------------------------------------- pass 2: dedupe


def _write_key_buckets(key_parts: list, buckets: int, root: str, chunk_id: str) -> None:
    """Write this chunk's (key, uid, signature) rows into one Parquet file per key bucket (key % buckets).

    `key_parts`: (int64 keys, int64 uids, uint32[n, num_perm] signatures or None for exact keys)
    per flush. Signatures are a fixed-size binary column (exact keys get zeros: they are never
    compared); with near-dedupe off the column is left out.
    This is the map side of a shuffle through files: pass 2 reads each bucket's files in one task.
    It costs one small file per (chunk, bucket) and no all-to-all exchange between processes, which
    on few cores is several times cheaper than a generic hash shuffle of the same narrow rows.
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
        fs, path = fsspec.core.url_to_fs(f"{root}/b{int(bucket[idx[0]]):05d}/{chunk_id}.parquet")
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            pq.write_table(pa.table(cols), f)


def duplicates_in_bucket(batch: dict, root: str, threshold: float, num_perm: int) -> dict:
    """Ray Data UDF, one key bucket: {uid, kind} of the rows that copy an earlier row (reduce side)."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    (bucket,) = batch["bucket"]
    fs, path = fsspec.core.url_to_fs(f"{root}/b{int(bucket):05d}")
    files = sorted(fs.find(path)) if fs.exists(path) else []
    if not files:
        return {"uid": np.zeros(0, np.int64), "kind": np.zeros(0, object)}
    tables = []
    for f in files:
        with fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh))
    t = pa.concat_tables(tables)
    sigs = None
    if "sig" in t.column_names:
        col = t["sig"].combine_chunks()
        values = np.frombuffer(col.buffers()[1], dtype=np.uint32)
        sigs = values[col.offset * num_perm:(col.offset + len(col)) * num_perm].reshape(len(col), num_perm)
    with _no_gc():
        found = dd.find_duplicates(t["key"].to_numpy(), t["uid"].to_numpy(), sigs, threshold)
    return {"uid": np.array(list(found), dtype=np.int64), "kind": np.array(list(found.values()), dtype=object)}


def find_all_duplicates(tmp: str, buckets: int, dedupe) -> dict[int, str]:
    """{uid: 'exact' | 'near'} over the whole corpus: one Ray task per key bucket, only duplicates come back.

    Driver memory is O(duplicate rows) (8 bytes + a short string each), not O(corpus rows).
    """
    import ray.data

    found = ray.data.from_items([{"bucket": b} for b in range(buckets)], override_num_blocks=buckets).map_batches(
        duplicates_in_bucket, batch_size=1, batch_format="numpy",
        fn_kwargs={"root": f"{tmp}/_keys", "threshold": dedupe.threshold, "num_perm": dedupe.num_perm})
    dups: dict[int, str] = {}
    for b in found.iter_batches(batch_format="numpy", batch_size=None):
        for u, k in zip(b["uid"], b["kind"]):
            if dups.get(int(u)) != "exact":  # a row both copied and near-copied counts as an exact copy
                dups[int(u)] = str(k)
    return dups


# --------------------------------------------------------------------------- pass 3: finalise


def _shape(rows: list[dict], ctx: dict) -> list[dict]:
    """Truncate, window (plain text with data.window) and pack rows into their final sequences."""
    out = []
    win = ctx["window"]
    for r in rows:
        ids, labels = list(r["input_ids"]), list(r["labels"])
        if win and not r["prompt"]:
            pieces = windows(ids, labels, min(win["size"], ctx["max_length"]), win["stride"])
        else:
            cut = truncate(ids, labels, ctx["max_length"])
            pieces = [cut] if cut else []
        for i, (w_ids, w_labels) in enumerate(pieces):
            row = {**r, "input_ids": w_ids, "labels": w_labels, "num_tokens": len(w_ids)}
            if len(pieces) > 1:
                row["row_id"] = f"{r['row_id']}-w{i}"
            out.append(row)
    return pack(out, ctx["max_length"]) if ctx["packing"] else out


def _encode_rows(rows: list[dict], ctx: dict) -> list[dict]:
    """Render and tokenise rows whose `messages` changed (augmented copies)."""
    tok = _worker_tokenizer(ctx["tokenizer"])
    for r in rows:
        msgs = json.loads(r["messages"])
        text = msgs[0]["content"] if msgs[0]["role"] == "text" else None
        r["prompt"], r["response"] = render(None if text is not None else msgs, text, tok, ctx["chat_template"])
        # Provenance names the original row: two originals whose copies happen to read the same keep distinct ids.
        r["row_id"] = _row_id(r["prompt"], r["response"] + "\0" + r["augment"])
    for r, (ids, labels) in zip(rows, encode_batch(tok, [r["prompt"] for r in rows], [r["response"] for r in rows])):
        r["input_ids"], r["labels"], r["num_tokens"] = ids, labels, len(ids)
    return rows


def select_table(batch, ctx: dict, repeats: bool = True):
    """Drop duplicates, bring each source to its mix share and add the `split` column: the same
    decision for every branch. Upsampled training rows are repeated with row_id `<id>-r<k>`
    (`repeats`). Only the row ids and sources leave Arrow; the token columns are taken as they are."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(ctx["dups"]):
        batch = batch.filter(pc.invert(pc.is_in(batch["uid"], value_set=pa.array(ctx["dups"], pa.int64()))))
    seed, rates = ctx["seed"], ctx["rates"]
    take, row_ids, splits = [], [], []
    for i, (rid, source) in enumerate(zip(batch["row_id"].to_pylist(), batch["source"].to_pylist())):
        rate = rates[source]
        n = copies_of(rate, unit_hash("mix", seed, rid)) if rate != 1.0 else 1
        if n == 0:
            continue
        u = unit_hash("split", seed, rid)
        split = "val" if u < ctx["val"] else "test" if u < ctx["val"] + ctx["test"] else "train"
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
    return out.append_column("split", pa.array(splits, pa.string()))


def finalize_file(batch: dict, ctx: dict):
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


def finalize_batch(batch, ctx: dict):
    """Originals plus their synonym/reorder copies (train only), cut to length: the rows that are written."""
    with _no_gc():
        return _finalize_batch(batch, ctx)


def _finalize_batch(batch, ctx: dict):
    import pyarrow as pa
    import pyarrow.compute as pc

    table = select_table(batch, ctx)
    aug = ctx["augment"]
    copy_rows = bool(aug["copies"] and (aug["synonyms"] is not None or aug["reorder"] is not None))
    if not copy_rows and not ctx["window"] and not ctx["packing"]:
        # Originals only, cut to max_length in Arrow. Ingest already dropped the rows whose prompt
        # alone fills max_length, so this slice is exactly `truncate`.
        ids = pc.list_slice(table["input_ids"], 0, ctx["max_length"])
        labels = pc.list_slice(table["labels"], 0, ctx["max_length"])
        table = (table.set_column(table.schema.get_field_index("input_ids"), "input_ids", ids)
                 .set_column(table.schema.get_field_index("labels"), "labels", labels)
                 .set_column(table.schema.get_field_index("num_tokens"), "num_tokens",
                             pc.list_value_length(ids).cast(pa.int32())))
        return write_table(table.select(_schema(False).names), ctx, "part")
    rows = table.to_pylist()
    copies = []
    if copy_rows:
        syn = _synonyms(aug["synonyms"]["groups"]) if aug["synonyms"] else None
        for r in rows:
            if r["split"] != "train":
                continue  # augmented rows never reach val or test
            for c in range(1, aug["copies"] + 1):
                res = augment_messages(json.loads(r["messages"]), r["row_id"], c, aug["seed"], syn,
                                       aug["synonyms"]["probability"] if syn else 0.0, aug["reorder"])
                if res is not None:
                    copies.append({**r, "messages": json.dumps(res[0], ensure_ascii=False), "augment": provenance(res[1])})
    return write_rows(_shape(rows + _encode_rows(copies, ctx), ctx), ctx, "part")


def select_for_back_translation(batch, ctx: dict):
    import pyarrow as pa

    table = select_table(batch, ctx, repeats=False)
    seed, p = ctx["augment"]["seed"], ctx["bt_probability"]
    chosen = [split == "train" and unit_hash("bt", seed, rid) < p
              for rid, split in zip(table["row_id"].to_pylist(), table["split"].to_pylist())]
    return table.filter(pa.array(chosen, pa.bool_())).select(["uid", "row_id", "source", "messages", "label", "metadata", "split"])


def finalize_translated(batch, ctx: dict):
    with _no_gc():
        return write_rows(_shape(_encode_rows(batch.to_pylist(), ctx), ctx), ctx, "bt")


def write_rows(rows: list[dict], ctx: dict, prefix: str):
    """`write_table` for rows as dicts."""
    import pyarrow as pa

    return write_table(pa.Table.from_pylist(rows, schema=_schema(False)), ctx, prefix)


def write_table(table, ctx: dict, prefix: str):
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
        fs, path = fsspec.core.url_to_fs(f"{ctx['tmp']}/{split}/{prefix}-{name}.parquet")
        with fs.open(path, "wb") as f:
            pq.write_table(part.drop_columns(["split"]), f)
    return split_summary(table)


_SYN_CACHE: dict[int, Synonyms] = {}


def _synonyms(groups: list[list[str]]) -> Synonyms:
    key = hash(json.dumps(groups))
    if key not in _SYN_CACHE:
        _SYN_CACHE[key] = Synonyms(groups)
    return _SYN_CACHE[key]


def split_summary(batch) -> Any:
    """Per (split, source) of a batch: rows, tokens, augmented rows, tokens of original rows and an
    order-independent digest (two 64-bit sums of per-row sha256) of the token content."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def flat(col: str) -> tuple[np.ndarray, np.ndarray]:
        """The column's int32 values end to end, and each row's offset into them (n + 1)."""
        lists = batch[col]
        lens = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
        return (pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
                np.concatenate([[0], np.cumsum(lens)]))

    ids, off = flat("input_ids")
    labels, loff = flat("labels")
    acc: dict[tuple[str, str], list[int]] = {}
    for i, (split, source, rid, aug) in enumerate(zip(batch["split"].to_pylist(), batch["source"].to_pylist(),
                                                      batch["row_id"].to_pylist(), batch["augment"].to_pylist())):
        n = int(off[i + 1] - off[i])
        d = hashlib.sha256(f"{split}|{rid}|".encode() + ids[off[i]:off[i + 1]].tobytes() + b"|"
                           + labels[loff[i]:loff[i + 1]].tobytes()).digest()
        a = acc.setdefault((split, source), [0, 0, 0, 0, 0, 0])
        a[0] += 1
        a[1] += n
        a[2] += bool(aug)
        a[3] += 0 if aug else n
        a[4] = (a[4] + int.from_bytes(d[:8], "little")) % 2**63  # int64-safe sums; two lanes make collisions negligible
        a[5] = (a[5] + int.from_bytes(d[8:16], "little")) % 2**63
    keys = list(acc)
    names = ["rows", "tokens", "augmented", "orig_tokens", "h1", "h2"]
    return pa.table({
        "split": [k[0] for k in keys], "source": [k[1] for k in keys],
        **{name: [acc[k][i] for k in keys] for i, name in enumerate(names)},
    }, schema=pa.schema([("split", pa.string()), ("source", pa.string())] + [(n, pa.int64()) for n in names]))


# --------------------------------------------------------------------------- driver


def _tokenizer_dir(path: str) -> str:
    """The directory holding the tokenizer files: `path` itself, or the model dir of a run directory."""
    if os.path.exists(os.path.join(path, "tokenizer_config.json")):
        return path
    from distillery.models.load import resolve_model_dir

    return str(resolve_model_dir(path))


def _tokenizer_path(cfg: Config) -> str:
    path = cfg.model.tokenizer or cfg.model.path
    if path is None:
        raise ConfigError("prepare: set model.path (or model.tokenizer): its tokenizer and chat template render and tokenise the rows")
    try:
        _tokenizer_dir(path)
    except FileNotFoundError as e:
        raise ConfigError(f"model.{'tokenizer' if cfg.model.tokenizer else 'path'}: {e}") from None
    return path


@lru_cache(maxsize=4)
def _tokenizer_identity(path: str) -> dict:
    """What the manifest records of the tokenizer: path, class, vocabulary, eos, file and template hashes."""
    tok = _worker_tokenizer(path)
    digest = hashlib.sha256()
    d = _tokenizer_dir(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                digest.update(f.read())
    return {"path": str(path), "class": type(tok).__name__, "vocab_size": len(tok), "sha256": digest.hexdigest(),
            "eos_token": tok.eos_token, "chat_template_sha256": hashlib.sha256((tok.chat_template or "").encode()).hexdigest()}


def _worker_tokenizer(path: str):
    """The tokenizer in a task; a tokenizer that cannot be loaded is a configuration error."""
    # Ray already runs one task per CPU: the Rust tokenizer's own thread pool in every task would
    # put several threads on each core (measured: the tokenizer's share of the work 1.7x slower).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return load_tokenizer_cached(path)
    except Exception as e:  # noqa: BLE001 - whatever the files are, the user must learn which setting names them
        raise ConfigError(f"model.path / model.tokenizer: cannot load a tokenizer from '{path}': {type(e).__name__}: {e}") from None


@contextlib.contextmanager
def _config_errors_from_tasks():
    """Re-raise a ConfigError that a Ray task raised as itself, so the CLI reports it as one.

    Ray Data wraps a task's exception (RayTaskError, UserCodeException); depending on the path
    the original survives as a `cause` or only in the wrapper's text, so both are searched.
    """
    import re

    marker = re.compile(re.escape(f"{ConfigError.__module__}.{ConfigError.__qualname__}: ") + r"(.+)")
    try:
        yield
    except Exception as e:
        seen, err = set(), e
        while err is not None and id(err) not in seen:
            seen.add(id(err))
            if type(err) is ConfigError:  # Ray's wrappers subclass it too, with the traceback as text
                raise ConfigError(str(err)) from None
            found = marker.search(str(err))
            if found:
                raise ConfigError(found.group(1).strip()) from None
            err = getattr(err, "cause", None) or err.__cause__
        raise


class Progress:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self, text: str) -> None:
        print(f"prepare: {text}  ({time.time() - self.t0:.1f}s)", flush=True)


def prepare(cfg: Config, log=None) -> dict:
    """Run the three passes and write `cfg.prepared_dir` atomically; returns the manifest.

    Needs a connected Ray (`run_prepare` starts or joins one); `log` gets the progress lines.
    """
    import ray
    import ray.data

    log = log or Progress()
    t0 = time.time()
    data = cfg.data
    if not data.sources:
        raise ConfigError("data.sources: no sources given")
    names = [s.display_name for s in data.sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.sources: source names must be unique to be mixed and reported, got {names}; set `name`")
    # The tokenizer is loaded by the tasks that use it, not here: the driver would spend seconds
    # importing torch for nothing but the manifest's tokenizer identity, which the tasks report.
    tok_path = _tokenizer_path(cfg)
    aug = data.augment
    aug_seed = cfg.seed if aug.seed is None else aug.seed
    synonyms = None
    if aug.synonyms:
        try:
            synonyms = {"groups": load_synonyms(aug.synonyms.path), "probability": aug.synonyms.probability}
        except OSError as e:
            raise ConfigError(f"data.augment.synonyms.path: cannot read '{aug.synonyms.path}': {e}") from None

    final = cfg.prepared_dir.rstrip("/")
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(f"{tmp}/quarantine", exist_ok=True)
    os.makedirs(f"{tmp}/_stats", exist_ok=True)

    # Files and their chunks (the driver holds only this list).
    files = [(i, s, discover_files(s, i)) for i, s in enumerate(data.sources)]
    # Chunks small enough that every CPU gets several (one file must not mean one task), large
    # enough that per-task overhead stays small.
    sizes = sum(_file_size(f) for _, _, fs in files for f in fs)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    chunk_bytes = int(min(64 << 20, max(256 << 10, sizes / (8 * cpus))))
    index_remote = ray.remote(num_cpus=1)(index_file)
    refs = [[index_remote.remote(f, chunk_bytes) for f in fs] for _, _, fs in files]
    chunks, source_files = [], []
    for (si, s, fs), rs in zip(files, refs):
        for fi, (f, info) in enumerate(zip(fs, ray.get(rs))):
            source_files.append({"source": s.display_name, "file": f, "bytes": info.size, "sha256": info.sha256})
            for start, end, first_line in info.chunks:
                chunks.append({"source_idx": si, "file_idx": fi, "source": s.display_name, "format": s.format, "file": f,
                               "start": start, "end": end, "first_line": first_line})
    total_bytes = sum(f["bytes"] for f in source_files)
    log(f"found {len(source_files):,} files ({total_bytes / 1e6:,.1f} MB) in {len(data.sources)} sources; {len(chunks):,} chunks")
    if not chunks:
        raise ConfigError("data.sources: every source file is empty")

    ctx = {
        "tokenizer": tok_path, "chat_template": data.chat_template, "seed": cfg.seed, "tmp": tmp,
        "min_length": data.min_length, "max_length": data.max_length,
        "window": data.window.model_dump() if data.window else None, "packing": data.packing,
        "dedupe": data.dedupe.model_dump(),
        # Key buckets of pass 2: at least one per CPU, and about 32 MB of corpus each.
        "buckets": int(max(cpus, min(4096, sizes // (32 << 20) + 1))),
        # Augmented copies are made from the rows' messages; nothing else reads them after ingest.
        "keep_messages": bool(aug.copies and (aug.synonyms or aug.reorder or aug.back_translate)),
    }
    ray.data.DataContext.get_current().enable_progress_bars = False
    stage = f"{tmp}/_stage"
    # Longest chunks first, so the last tasks to start are short ones and no core idles at the end.
    by_size = sorted(chunks, key=lambda c: c["end"] - c["start"] if file_kind(c["file"]) == "jsonl" else 0, reverse=True)
    ingest = ray.data.from_items(by_size, override_num_blocks=len(chunks)).map_batches(
        ingest_chunk, batch_size=1, batch_format="numpy", fn_kwargs={"ctx": ctx})
    with _config_errors_from_tasks():
        for _ in ingest.iter_batches(batch_size=None):
            pass

    # Counts from the ingest tasks' stats files.
    per_source: dict[str, Counter] = {n: Counter() for n in names}
    for name in os.listdir(f"{tmp}/_stats"):
        with open(f"{tmp}/_stats/{name}", encoding="utf-8") as f:
            st = json.load(f)
        identity = st.pop("tokenizer")
        per_source[st.pop("source")].update({k: v for k, v in st.items() if k != "file"})
    total = sum(per_source.values(), Counter())
    quarantine = {k.split(":", 1)[1]: v for k, v in sorted(total.items()) if k.startswith("quarantine:")}
    log(f"read {total['read']:,} rows from {len(source_files):,} files: {total['valid']:,} valid, "
        f"{sum(quarantine.values()):,} quarantined {quarantine or ''}; length filter dropped "
        f"{total['too_short']:,} short and {total['too_long']:,} long rows")
    for i, n in enumerate(names):
        if per_source[n]["valid"] == 0:
            reasons = {k.split(":", 1)[1]: v for k, v in per_source[n].items() if k.startswith("quarantine:")}
            raise ConfigError(
                f"data.sources.{i} ('{n}', format {data.sources[i].format}): no valid rows in {per_source[n]['read']:,} "
                f"read; quarantined by reason: {reasons or 'none (the files are empty)'}; see {_first_quarantined(tmp, n)}"
            )

    # Pass 2: duplicates (the driver receives only their uids).
    dups: dict[int, str] = {}
    if data.dedupe.exact or data.dedupe.near:
        dups = find_all_duplicates(tmp, ctx["buckets"], data.dedupe)
    shutil.rmtree(f"{tmp}/_keys", ignore_errors=True)
    dup_counts = Counter(dups.values())
    dup_by_source: dict[str, Counter] = {n: Counter() for n in names}
    for u, k in dups.items():
        dup_by_source[names[_source_of_uid(u)]][k] += 1
    log(f"dedupe removed {dup_counts['exact']:,} exact and {dup_counts['near']:,} near copies")

    # Mix: keep rates from per-source amounts after dedupe (tokens are approximated by the mean row length).
    kept_rows = {n: per_source[n]["rows"] - sum(dup_by_source[n].values()) for n in names}
    for i, n in enumerate(names):
        if kept_rows[n] <= 0:
            raise ConfigError(f"data.sources.{i} ('{n}'): no rows left after dedupe: every row copies a row of an earlier source")
    amounts = kept_rows if data.mix_by == "rows" else {
        n: per_source[n]["tokens"] * kept_rows[n] / max(1, per_source[n]["rows"]) for n in names}
    weights = {s.display_name: s.weight for s in data.sources}
    rates = keep_rates(amounts, weights, upsample=data.mix_strategy == "upsample")

    ctx.update({
        "dups": np.array(sorted(dups), dtype=np.int64), "rates": rates, "val": data.val_fraction, "test": data.test_fraction,
        "augment": {"copies": aug.copies, "seed": aug_seed, "synonyms": synonyms,
                    "reorder": aug.reorder.probability if aug.reorder else None},
        "bt_probability": aug.back_translate.probability if aug.back_translate else 0.0,
    })
    staged_files = sorted(f"{stage}/{n}" for n in os.listdir(stage)) if os.path.isdir(stage) else []
    out = ray.data.from_items([{"path": p} for p in staged_files], override_num_blocks=max(1, len(staged_files))).map_batches(
        finalize_file, batch_size=1, batch_format="numpy", fn_kwargs={"ctx": ctx})
    if aug.back_translate and aug.copies:
        from distillery.data.back_translate import BackTranslator

        bt = aug.back_translate
        translated = (read_parquet(staged_files).map_batches(select_for_back_translation, batch_format="pyarrow", fn_kwargs={"ctx": ctx})
                      .map_batches(BackTranslator, batch_size=16, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1, batch_format="numpy",
                                   fn_constructor_kwargs={"model": bt.model, "pivot_prompt": bt.pivot_prompt,
                                                          "return_prompt": bt.return_prompt, "max_new_tokens": bt.max_new_tokens,
                                                          "engine": bt.engine})
                      .map_batches(finalize_translated, batch_format="pyarrow", fn_kwargs={"ctx": ctx}))
        out = out.union(translated)
    for split in SPLITS:
        os.makedirs(f"{tmp}/{split}", exist_ok=True)
    # Writing happens inside the map tasks; what streams back is one summary row per (batch, split, source).
    totals: dict[tuple[str, str], np.ndarray] = {}
    for b in out.iter_batches(batch_format="pandas", batch_size=None):
        for r in b.itertuples(index=False):
            acc = totals.setdefault((r.split, r.source), np.zeros(6, dtype=object))
            acc += np.array([r.rows, r.tokens, r.augmented, r.orig_tokens, r.h1, r.h2], dtype=object)
    shutil.rmtree(stage, ignore_errors=True)
    splits: dict[str, dict] = {}
    fp = hashlib.sha256()
    for split in SPLITS:
        acc = sum((v for (sp, _), v in totals.items() if sp == split), np.zeros(6, dtype=object))
        rows, tokens, augmented = int(acc[0]), int(acc[1]), int(acc[2])
        splits[split] = {"rows": rows, "tokens": tokens, "augmented": augmented}
        fp.update(f"{split}:{rows}:{tokens}:{int(acc[4]) % 2**63:016x}{int(acc[5]) % 2**63:016x};".encode())
    shutil.rmtree(f"{tmp}/_stats", ignore_errors=True)
    fingerprint = fp.hexdigest()

    # Achieved mix over the training split's non-augmented rows (repeats of upsampled rows count),
    # in the unit the weights are in: training is what the mix is for.
    achieved_amounts = {n: 0 for n in names}
    for (split, source), v in totals.items():
        if split != "train":
            continue
        for n in source.split("+"):  # packed rows count for their first member's source only
            achieved_amounts[n] += int(v[0] - v[2]) if data.mix_by == "rows" else int(v[3])
            break
    target = ratios(weights)
    achieved = ratios(achieved_amounts)
    mix = {"by": data.mix_by, "strategy": data.mix_strategy, "target": target, "achieved": achieved,
           "keep_rate": {n: round(r, 6) for n, r in rates.items()}, "amounts": achieved_amounts}
    originals = sum(s["rows"] - s["augmented"] for s in splits.values())
    manifest = {
        "fingerprint": fingerprint,
        "tokenizer": str(tok_path),
        "tokenizer_identity": identity,
        "vocab_size": identity["vocab_size"],
        "counts": {s: splits[s]["rows"] for s in SPLITS},
        "splits": splits,
        "steps": {
            "read": total["read"], "valid": total["valid"], "length_filtered": total["rows"],
            "exact_dedupe": total["rows"] - dup_counts["exact"],
            "near_dedupe": total["rows"] - dup_counts["exact"] - dup_counts["near"],
            "mixed": originals if not data.window and not data.packing else None,
            "augmented": sum(s["augmented"] for s in splits.values()),
            "written": sum(s["rows"] for s in splits.values()),
        },
        "filtered": {"too_short": total["too_short"], "too_long": total["too_long"], "exact_duplicates": dup_counts["exact"],
                     "near_duplicates": dup_counts["near"]},
        "quarantine": quarantine,
        "mix": mix,
        "sources": source_files,
        "per_source": {n: {"read": per_source[n]["read"], "valid": per_source[n]["valid"], "after_length": per_source[n]["rows"],
                           "after_dedupe": kept_rows[n]} for n in names},
        "config": cfg.model_dump(mode="json", by_alias=True),
        "seconds": round(time.time() - t0, 2),
    }
    with open(f"{tmp}/{MANIFEST}", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
    # Atomic replace: the old directory moves aside first, so a reader sees the old or the new one.
    old = f"{final}.old-{os.getpid()}"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def _file_size(path: str) -> int:
    import fsspec.core

    fs, p = fsspec.core.url_to_fs(path)
    return int(fs.size(p) or 0)


def _first_quarantined(tmp: str, source: str) -> str:
    qdir = f"{tmp}/quarantine"
    for name in sorted(os.listdir(qdir)):
        with open(f"{qdir}/{name}", encoding="utf-8") as f:
            for line in f:
                q = json.loads(line)
                if q["source"] == source:
                    return f"{q['file']}:{q['line']} ({q['reason']}: {q['detail']})"
    return "the source's files"


def run_prepare(cfg: Config) -> int:
    """The CLI stage: prepare, print a summary, return an exit code."""
    from distillery.runtime import ensure_ray

    t0 = time.time()
    # Ray Data's per-execution INFO lines would bury the stage's own progress lines.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Logical CPUs: one per core for the map tasks, plus one for the back-translation actor so
    # that it cannot starve the tasks feeding it (ARCHITECTURE.md, resource traps on 2 cores).
    extra = 1 if cfg.data.augment.back_translate and cfg.data.augment.copies else 0
    started = ensure_ray(num_cpus=max(2, os.cpu_count() or 2) + extra)
    try:
        m = prepare(cfg)
    finally:
        if started:
            import ray

            ray.shutdown()
    s = m["splits"]
    print(f"prepare: splits train {s['train']['rows']:,} rows ({s['train']['augmented']:,} augmented, {s['train']['tokens']:,} tokens), "
          f"val {s['val']['rows']:,}, test {s['test']['rows']:,}")
    print(f"prepare: quarantine by reason {m['quarantine'] or 'none'} -> {cfg.prepared_dir}/quarantine/")
    print(f"prepare: mix ({m['mix']['by']}, {m['mix']['strategy']}) " + ", ".join(
        f"{n} target {m['mix']['target'][n]:.3f} achieved {m['mix']['achieved'][n]:.3f} (rate {m['mix']['keep_rate'][n]:.3g})"
        for n in m["mix"]["target"]))
    print(f"prepare: wrote {cfg.prepared_dir} (fingerprint {m['fingerprint'][:16]}) in {time.time() - t0:.1f}s", flush=True)
    return 0
