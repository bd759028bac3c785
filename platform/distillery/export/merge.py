"""LoRA adapters merged into full weights, cached by content so a merge is never stale.

A merge lives at `<adapter's parent>/merges/<key>/`, where the key hashes every file of the
adapter in full (adapters are small) and the base model's content hash: a retrained adapter, or
the same adapter over a changed base, gets a new directory, and merges of older contents are
removed when a new one is written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from distillery.files import install_dir, removed_on_failure
from distillery.models.load import adapter_base, load_causal_lm, load_tokenizer, model_identity, resolve_model_dir
from distillery.registry.record import sha256_file

MERGES = "merges"
KEY_CHARS = 16


def merge_key(adapter_dir: str | os.PathLike[str]) -> str:
    """Hash of the adapter's files (names and full contents) and of its base model's content."""
    adapter_dir = Path(adapter_dir)
    base = adapter_base(adapter_dir)
    if base is None:
        raise ValueError(f"'{adapter_dir}' is not a LoRA adapter (no adapter_config.json)")
    h = hashlib.sha256()
    for p in sorted(q for q in adapter_dir.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(adapter_dir)}\0{sha256_file(p)}\0".encode())
    h.update(model_identity(resolve_model_dir(base))["hash"].encode())
    return h.hexdigest()[:KEY_CHARS]


def merged_dir(adapter_dir: str | os.PathLike[str]) -> Path:
    """Where the merge of the adapter's current contents lives (it may not exist yet)."""
    adapter_dir = Path(adapter_dir)
    return adapter_dir.parent / MERGES / merge_key(adapter_dir)


def merge_adapter(adapter_dir: str | os.PathLike[str], say=print) -> Path:
    """The merged full weights (fp32 safetensors + tokenizer) of a PEFT adapter: reused when a merge
    of these exact contents exists, else written atomically; merges of older contents are removed."""
    adapter_dir = Path(adapter_dir).resolve()
    target = merged_dir(adapter_dir)
    if (target / "config.json").exists():
        return target
    say(f"merging LoRA adapter {adapter_dir} into full weights at {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with removed_on_failure(tmp):
        model = load_causal_lm(adapter_dir, dtype="float32").merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(adapter_dir).save_pretrained(tmp)
        install_dir(tmp, target)
    for old in target.parent.iterdir():
        # Another content's merge: nothing will ask for it again (a serving engine has its weights loaded).
        if old != target and old.is_dir() and ".tmp-" not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    return target
