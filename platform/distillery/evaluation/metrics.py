"""Task metrics (exact match, token F1, label accuracy, contains, regex) and the eval examples they score."""

from __future__ import annotations

import collections
import json
import os
import re
import string
import unicodedata
from dataclasses import dataclass

from distillery.config import ConfigError

METRICS = ("exact_match", "f1", "accuracy", "contains", "regex")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: NFKC, lower case, no punctuation (ASCII and CJK), no articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    # CJK has no spaces: each CJK character counts as a token, as in multilingual SQuAD variants.
    out: list[str] = []
    for word in normalize_answer(text).split():
        buf = ""
        for ch in word:
            if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf":
                if buf:
                    out.append(buf)
                    buf = ""
                out.append(ch)
            else:
                buf += ch
        if buf:
            out.append(buf)
    return out


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between a prediction and a reference."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def predicted_label(prediction: str, labels: list[str]) -> str | None:
    """The label a free-text prediction names: the exact label, else the first label mentioned."""
    norm = normalize_answer(prediction)
    by_norm = {normalize_answer(l): l for l in labels}
    if norm in by_norm:
        return by_norm[norm]
    hits = [(norm.find(k), l) for k, l in by_norm.items() if k and k in norm]
    return min(hits)[1] if hits else None


def score(metric: str, prediction: str, reference: str, labels: list[str] | None = None) -> float:
    """Score one prediction in [0, 1] with the named metric."""
    if metric == "exact_match":
        return float(normalize_answer(prediction) == normalize_answer(reference))
    if metric == "f1":
        return token_f1(prediction, reference)
    if metric == "accuracy":
        return float(predicted_label(prediction, labels or [reference]) == reference)
    if metric == "contains":
        return float(normalize_answer(reference) in normalize_answer(prediction))
    if metric == "regex":
        return float(re.search(reference, prediction) is not None)
    raise ValueError(f"metric: unknown metric '{metric}' (one of {', '.join(METRICS)})")


# --------------------------------------------------------------------------- eval set


@dataclass
class Example:
    prompt: str
    reference: str
    task: str
    metric: str
    rendered: bool = False  # True when the prompt already went through the chat template


def load_jsonl_examples(path: str) -> list[Example]:
    """Read {prompt, reference, task, metric} rows; a bad row fails naming its line and field."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"eval.dataset {path}:{lineno}: not valid JSON ({e.msg})") from None
            for key in ("prompt", "reference"):
                if not isinstance(row.get(key), str):
                    raise ConfigError(f"eval.dataset {path}:{lineno}: field '{key}' must be a string")
            metric = row.get("metric", "exact_match")
            if metric not in METRICS:
                raise ConfigError(f"eval.dataset {path}:{lineno}: field 'metric' is '{metric}', not one of {METRICS}")
            examples.append(Example(row["prompt"], row["reference"], str(row.get("task", "default")), metric))
    if not examples:
        raise ConfigError(f"eval.dataset {path}: no examples")
    return examples


def load_prepared_examples(prepared: str, split: str, tokenizer) -> list[Example]:
    """Examples from a prepared split: the rendered prompt, and the response without template tokens."""
    import pyarrow.parquet as pq

    from distillery.data.splits import split_dir

    d = split_dir(prepared, split)
    if not os.path.isdir(d):
        raise ConfigError(f"eval: no dataset given and no prepared split at '{d}' (run `distillery prepare` or set eval.dataset)")
    examples = []
    for name in sorted(os.listdir(d)):
        if not name.endswith(".parquet"):
            continue
        table = pq.read_table(os.path.join(d, name))
        cols = table.column_names
        for row in table.to_pylist():
            if row.get("augment"):
                continue
            ref_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
            reference = tokenizer.decode(ref_ids, skip_special_tokens=True).strip()
            task = row.get("task") or row.get("source") or "default"
            metric = row.get("metric") if "metric" in cols and row.get("metric") in METRICS else "exact_match"
            examples.append(Example(row["prompt"], reference, str(task), metric, rendered=True))
    return examples
