"""Task metrics (exact match, token F1, label accuracy, contains, regex) and the eval examples they score."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from distillery.config import ConfigError

# The scoring functions live in the data layer (`distillery.data.answers`) so that `distillery
# generate` accepts samples with the same definitions the evaluation scores with.
from distillery.data.answers import METRICS


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
