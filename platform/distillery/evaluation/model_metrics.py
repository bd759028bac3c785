"""Numbers of a model rather than of its answers: size, parameters, val loss and agreement with the teacher."""

from __future__ import annotations

import math
import os
from pathlib import Path

from distillery.models.load import adapter_base, resolve_model_dir

def size_on_disk(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file())


def parameter_counts(model_dir: Path) -> tuple[int, int]:
    """(total parameters of the model as served, trainable parameters of the run)."""
    from safetensors import safe_open

    def count(d: Path, pattern: str) -> int:
        n = 0
        for f in d.glob(pattern):
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    n += math.prod(st.get_slice(k).get_shape())
        return n

    base = adapter_base(model_dir)
    if base is None:
        total = count(model_dir, "*.safetensors")
        return total, total
    adapter = count(model_dir, "adapter_model.safetensors")
    return count(resolve_model_dir(base), "*.safetensors") + adapter, adapter


def quantised_source(model_dir: Path) -> tuple[Path, Path] | None:
    """(the model a quantised export was made from, as its `distillery_export.json` names it; the
    full weights to compare with), when it still exists; None for anything else."""
    import json

    manifest = Path(model_dir) / "distillery_export.json"
    if not manifest.exists():
        return None
    m = json.loads(manifest.read_text())
    if m.get("quantize", "none") == "none" or not os.path.exists(m.get("source", "")):
        return None
    from distillery.export.merge import merged_dir

    source = Path(m["source"])
    # An adapter's quantised export was made from its merge: compare with the same full weights.
    return source, merged_dir(source) if adapter_base(source) and merged_dir(source).exists() else source


def same_tokens(tokenizer, prepared: str) -> bool:
    """Whether `tokenizer` has the vocabulary the prepared data was tokenised with (its manifest's
    tokenizer; by vocabulary size when that path is gone)."""
    from distillery.data.splits import load_manifest
    from distillery.data.tokenize import load_tokenizer_cached

    identity = load_manifest(prepared).get("tokenizer_identity") or {}
    path = identity.get("path")
    if path and os.path.exists(path):  # loaded once for all the models an eval compares
        return load_tokenizer_cached(path).get_vocab() == tokenizer.get_vocab()
    return identity.get("vocab_size") in (None, len(tokenizer))


def val_and_teacher_metrics(model_dir: Path, teacher_dir: Path | None, prepared: str, max_rows: int = 256,
                            source_dir: Path | None = None, device: str = "cpu") -> dict[str, float]:
    """Val loss / perplexity on response tokens; top-1 agreement and KL(teacher‖model) when a teacher
    is given; and `source_top1_agreement` / `source_kl` against `source_dir`, the unquantised model a
    quantised export was made from (full vocabulary, nats per response token). The models run in
    float32 on `device` (`cuda` on a GPU worker)."""
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F

    from distillery.data.splits import IGNORE_INDEX, split_dir
    from distillery.models.load import load_causal_lm, load_tokenizer

    d = split_dir(prepared, "val")
    files = sorted(f for f in os.listdir(d) if f.endswith(".parquet")) if os.path.isdir(d) else []
    if not files:
        return {}
    rows = []
    for f in files:
        rows.extend(pq.read_table(os.path.join(d, f), columns=["input_ids", "labels"]).to_pylist())
        if len(rows) >= max_rows:
            break
    rows = rows[:max_rows]
    tok = load_tokenizer(model_dir)
    if not same_tokens(tok, prepared):
        return {}  # the val rows are another tokenizer's ids (a cross-tokenizer student): no loss of this model on them
    model = load_causal_lm(model_dir).eval().to(device)
    teacher = load_causal_lm(teacher_dir).eval().to(device) if teacher_dir else None
    if teacher is not None and load_tokenizer(teacher_dir).get_vocab() != tok.get_vocab():
        teacher = None  # KL and agreement compare token ids: only within one vocabulary
    references = {"teacher": teacher} if teacher is not None else {}
    if source_dir is not None:
        references["source"] = load_causal_lm(source_dir).eval().to(device)
    nll = n_tok = 0.0
    agree = dict.fromkeys(references, 0.0)
    kl_sum = dict.fromkeys(references, 0.0)
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            batch = rows[i : i + 8]
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, r in enumerate(batch):
                n = len(r["input_ids"])
                ids[j, :n] = torch.tensor(r["input_ids"])
                labels[j, :n] = torch.tensor(r["labels"])
                mask[j, :n] = 1
            ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            target = labels[:, 1:]
            sel = target != IGNORE_INDEX
            nll += F.cross_entropy(logits[sel], target[sel], reduction="sum").item()
            n_tok += sel.sum().item()
            s_logits = logits[sel]
            s_logp = F.log_softmax(s_logits, -1)
            for role, ref in references.items():
                t_logits = ref(input_ids=ids, attention_mask=mask).logits[:, :-1].float()[sel]
                agree[role] += (t_logits.argmax(-1) == s_logits.argmax(-1)).sum().item()
                t_logp = F.log_softmax(t_logits, -1)
                kl_sum[role] += (t_logp.exp() * (t_logp - s_logp)).sum().item()
    if n_tok == 0:
        return {}
    out = {"val_loss": nll / n_tok, "val_perplexity": math.exp(min(nll / n_tok, 50))}
    for role in references:
        out.update({f"{role}_top1_agreement": agree[role] / n_tok, f"{role}_kl": kl_sum[role] / n_tok})
    return out
