"""Token ids and labels for rendered rows: prompt masking, truncation, sliding windows and packing.

`labels` equal `input_ids` on the response and IGNORE_INDEX on the prompt, so the loss sees the
response only. The prompt and the response are tokenised separately (never across their boundary)
and the response ends with eos, which is how the training stages and the test fixture expect it.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

from distillery.data.splits import IGNORE_INDEX


@lru_cache(maxsize=4)
def load_tokenizer_cached(path: str):
    """One tokenizer per worker process per path (Ray reuses workers, so this loads once per core)."""
    from distillery.models.load import load_tokenizer

    return load_tokenizer(path)


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`, straight from the Rust tokenizer
    when the tokenizer class adds nothing around it (then the ids are the same, without building
    offsets, attention masks and a BatchEncoding per row: benchmarks/README.md, "Prepare")."""
    if _plain_backend(tokenizer):
        return [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _plain_backend(tokenizer) -> bool:
    """True when `tokenizer.__call__` is the fast tokenizer base class's own encode path, with no
    truncation or padding configured and special tokens handled as the Rust tokenizer is set to."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    cls = type(tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    return (isinstance(tokenizer, TokenizersBackend) and backend is not None
            and cls.__call__ is PreTrainedTokenizerBase.__call__ and cls._encode_plus is TokenizersBackend._encode_plus
            and backend.truncation is None and backend.padding is None
            and bool(backend.encode_special_tokens) == bool(tokenizer.split_special_tokens))


def encode_batch(tokenizer, prompts: list[str], responses: list[str]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row; prompt tokens are masked, the response gets eos appended once."""
    if not responses:
        return []
    eos = tokenizer.eos_token_id
    p_ids = token_ids(tokenizer, prompts) if any(prompts) else [[] for _ in prompts]
    r_ids = token_ids(tokenizer, responses)
    out = []
    for p, r in zip(p_ids, r_ids):
        if eos is not None and (not r or r[-1] != eos):
            r = r + [eos]
        out.append((p + r, [IGNORE_INDEX] * len(p) + r))
    return out


def truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]] | None:
    """Cut to `max_length` tokens, keeping the prompt; None when no response token would be left."""
    if len(ids) <= max_length:
        return ids, labels
    ids, labels = ids[:max_length], labels[:max_length]
    if labels[-1] == IGNORE_INDEX:  # the prompt is a masked prefix: a masked last token means no response is left
        return None
    return ids, labels


def windows(ids: list[int], labels: list[int], size: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """Sliding windows over a long document; tokens already trained on in the previous window are masked.

    The overlap (size - stride tokens) still gives each window its left context, but each token is
    a training target exactly once across the windows.
    """
    if len(ids) <= size:
        return [(ids, labels)]
    out = []
    start = 0
    while True:
        w_ids = ids[start : start + size]
        w_labels = list(labels[start : start + size])
        if start > 0:
            seen = min(size - stride, len(w_ids)) if stride < size else 0
            w_labels[:seen] = [IGNORE_INDEX] * seen
        out.append((w_ids, w_labels))
        if start + size >= len(ids):
            return out
        start += stride


def pack(rows: list[dict], max_length: int) -> list[dict]:
    """Greedily concatenate consecutive rows (same split) into sequences of at most `max_length` tokens.

    Rows keep their own masking; a packed row's row_id hashes its members' ids, its prompt is empty
    and its response is the members' texts joined, so it stays readable in the Parquet file.
    """
    out: list[dict] = []
    cur: list[dict] = []

    def flush():
        if not cur:
            return
        if len(cur) == 1:
            out.append(cur[0])
        else:
            ids = [t for r in cur for t in r["input_ids"]]
            labels = [t for r in cur for t in r["labels"]]
            out.append({
                **cur[0],
                "row_id": hashlib.sha1("+".join(r["row_id"] for r in cur).encode()).hexdigest()[:16],
                "source": "+".join(dict.fromkeys(r["source"] for r in cur)),
                "prompt": "",
                "response": "".join(r["prompt"] + r["response"] for r in cur),
                "input_ids": ids,
                "labels": labels,
                "num_tokens": len(ids),
                "augment": ";".join(r["augment"] for r in cur if r["augment"]),
            })
        cur.clear()

    for r in rows:
        if cur and (sum(x["num_tokens"] for x in cur) + r["num_tokens"] > max_length or cur[0]["split"] != r["split"]):
            flush()
        cur.append(r)
    flush()
    return out
