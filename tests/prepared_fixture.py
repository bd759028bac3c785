"""Write a prepared directory in the `distillery.data.splits` contract, for tests that train.

The real writer is `distillery prepare`; this one renders instruction rows with the tokenizer's
chat template exactly as the contract describes, so training tests do not depend on prepare.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

IGNORE_INDEX = -100


def _encode(tokenizer, row: dict) -> dict:
    user = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    response = row["output"] + "<|im_end|>\n"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    row_id = hashlib.sha1((prompt + response).encode()).hexdigest()[:16]
    return {
        "row_id": row_id,
        "source": "demo",
        "prompt": prompt,
        "response": response,
        "input_ids": ids,
        "labels": labels,
        "num_tokens": len(ids),
        "augment": "",
    }


def write_prepared(corpus_jsonl: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str], out: str | os.PathLike[str],
                   val_every: int = 10, limit: int | None = None) -> Path:
    """Tokenise the corpus rows into `out/{train,val}/part-0.parquet` + `out/manifest.json`.

    Every `val_every`-th row goes to val. Duplicate rows (same row_id) are dropped, as prepare does.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rows = [json.loads(line) for line in Path(corpus_jsonl).read_text(encoding="utf-8").splitlines() if line.strip()]
    if limit is not None:
        rows = rows[:limit]
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    seen: set[str] = set()
    for i, row in enumerate(rows):
        enc = _encode(tok, row)
        if enc["row_id"] in seen:
            continue
        seen.add(enc["row_id"])
        splits["val" if i % val_every == val_every - 1 else "train"].append(enc)
    out = Path(out)
    schema = pa.schema([
        ("row_id", pa.string()), ("source", pa.string()), ("prompt", pa.string()), ("response", pa.string()),
        ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("num_tokens", pa.int32()),
        ("augment", pa.string()),
    ])
    digest = hashlib.sha256()
    for name, split_rows in splits.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(split_rows, schema=schema), out / name / "part-0.parquet")
        for r in split_rows:
            digest.update(r["row_id"].encode())
    manifest = {
        "fingerprint": digest.hexdigest(),
        "tokenizer": str(tokenizer_dir),
        "counts": {name: len(r) for name, r in splits.items()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
