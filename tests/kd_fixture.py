"""A tiny prepared directory in the `distillery.data.splits` contract, written directly for the
teacher-cache tests (independent of `distillery prepare`): demo-corpus rows tokenised with the
teacher's tokenizer, labels -100 over the prompt, train/val parquet + manifest.json."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_prepared(out: Path, corpus_jsonl: Path, tokenizer_dir: Path, n_train: int = 20, n_val: int = 6) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [json.loads(line) for line in Path(corpus_jsonl).read_text(encoding="utf-8").splitlines()[: n_train + n_val]]
    records = []
    for r in rows:
        prompt = r["instruction"] + ("\n" + r["input"] if r.get("input") else "") + "\n"
        response = r["output"]
        p_ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = p_ids + r_ids
        records.append(
            {
                "row_id": hashlib.sha256((prompt + response).encode()).hexdigest()[:16],
                "source": "demo",
                "prompt": prompt,
                "response": response,
                "input_ids": ids,
                "labels": [-100] * len(p_ids) + r_ids,
                "num_tokens": len(ids),
                "augment": "",
            }
        )
    schema = pa.schema(
        [
            ("row_id", pa.string()), ("source", pa.string()), ("prompt", pa.string()), ("response", pa.string()),
            ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("num_tokens", pa.int32()),
            ("augment", pa.string()),
        ]
    )
    splits = {"train": records[:n_train], "val": records[n_train:]}
    h = hashlib.sha256()
    for name, recs in splits.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(recs, schema=schema), out / name / "part-0.parquet")
        for rec in recs:
            h.update(f"{name}:{rec['row_id']}:{rec['input_ids']}:{rec['labels']}".encode())
    manifest = {"fingerprint": h.hexdigest(), "tokenizer": str(tokenizer_dir), "counts": {k: len(v) for k, v in splits.items()}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
