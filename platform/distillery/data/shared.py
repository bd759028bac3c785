"""What the three passes of `prepare` share: the row id and the row schema, the tokenizer as a
task loads it, the garbage-collector pause of the batch UDFs, and small text files."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
from functools import lru_cache

from distillery.config import ConfigError
from distillery.data.tokenize import load_tokenizer_cached


def row_id(prompt: str, response: str) -> str:
    """The stable id of a normalised row: also what exact dedupe and the split are decided by."""
    return hashlib.sha1((prompt + response).encode()).hexdigest()[:16]


def row_schema(with_keys: bool):
    """The Arrow schema of the rows: staged by ingest (`with_keys`: uid, messages and group, which
    only the later passes read) or written by finalise (with the `split` column instead)."""
    import pyarrow as pa

    fields = [
        ("row_id", pa.string()), ("source", pa.string()), ("prompt", pa.string()), ("response", pa.string()),
        ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("num_tokens", pa.int32()),
        ("augment", pa.string()), ("label", pa.string()), ("metadata", pa.string()),
    ]
    if with_keys:  # group: the row's class for data.balance.by label (null otherwise)
        fields += [("uid", pa.int64()), ("messages", pa.string()), ("group", pa.string())]
    else:
        fields += [("split", pa.string())]
    return pa.schema(fields)


@contextlib.contextmanager
def no_gc():
    """Pause the cyclic garbage collector: batch UDFs allocate many short-lived acyclic objects
    (row dicts, token lists) that reference counting frees anyway, while the collector's repeated
    scans of them cost more than the work itself (benchmarks/README.md, "Prepare")."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def write_text(path: str, text: str) -> None:
    """Write `text` to a local path or fsspec URI."""
    import fsspec

    with fsspec.open(path, "w", encoding="utf-8") as f:
        f.write(text)


def tokenizer_dir(path: str) -> str:
    """The directory holding the tokenizer files: `path` itself, or the model dir of a run directory."""
    if os.path.exists(os.path.join(path, "tokenizer_config.json")):
        return path
    from distillery.models.load import resolve_model_dir

    return str(resolve_model_dir(path))


@lru_cache(maxsize=4)
def tokenizer_identity(path: str) -> dict:
    """What the manifest records of the tokenizer: path, class, vocabulary, eos, file and template hashes."""
    tok = worker_tokenizer(path)
    digest = hashlib.sha256()
    d = tokenizer_dir(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                digest.update(f.read())
    return {"path": str(path), "class": type(tok).__name__, "vocab_size": len(tok), "sha256": digest.hexdigest(),
            "eos_token": tok.eos_token, "chat_template_sha256": hashlib.sha256((tok.chat_template or "").encode()).hexdigest()}


def worker_tokenizer(path: str):
    """The tokenizer in a task; a tokenizer that cannot be loaded is a configuration error."""
    # Ray already runs one task per CPU: the Rust tokenizer's own thread pool in every task would
    # put several threads on each core, which makes tokenising slower, not faster
    # (benchmarks/README.md, "Prepare").
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return load_tokenizer_cached(path)
    except Exception as e:  # noqa: BLE001 - whatever the files are, the user must learn which setting names them
        raise ConfigError(f"model.path / model.tokenizer: cannot load a tokenizer from '{path}': {type(e).__name__}: {e}") from None
