"""Pass 2 of `prepare`, dedupe: one Ray task per key bucket.

Ingest wrote every row's dedupe keys (exact hash, MinHash LSH bands) into files by key bucket;
here each task reads one bucket's files, compares the rows sharing a key, and returns the uids of
the rows that copy (exactly, or above the MinHash threshold) an earlier row. The algorithms are
in `dedupe`.
"""

from __future__ import annotations

import numpy as np

from distillery.data import dedupe as dd
from distillery.data.shared import no_gc


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
    sigs, parts = None, 1
    if "sig" in t.column_names:
        col = t["sig"].combine_chunks()
        width = col.type.byte_width // 4  # num_perm, or twice that with the response's signature beside the row's
        values = np.frombuffer(col.buffers()[1], dtype=np.uint32)
        sigs = values[col.offset * width:(col.offset + len(col)) * width].reshape(len(col), width)
        parts = width // num_perm
    with no_gc():
        found = dd.find_duplicates(t["key"].to_numpy(), t["uid"].to_numpy(), sigs, threshold, parts=parts)
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
