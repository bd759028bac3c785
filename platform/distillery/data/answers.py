"""Score an answer against a reference: the task metrics (exact match, token F1, label accuracy,
contains, regex) that `distillery eval` reports and `distillery generate` accepts samples by.

Pure text functions, no model: they sit low in the layers (docs/architecture.md) so that both
the evaluation stage and the distillation stages use the same definitions.
"""

from __future__ import annotations

import collections
import re
import string
import unicodedata

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
