"""The canary's quality probe: prompts with checkable answers, asked of the stable and the canary.

A probe file is JSONL, one `{"prompt": ..., "answer": ...}` per line. Each version answers every
prompt greedily; an output passes when it contains the answer, compared case-insensitively with
runs of whitespace folded. Errors and latency show a broken canary; the probe shows one that
answers quickly and wrongly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


def load_probe(path: str | Path) -> list[tuple[str, str]]:
    """The (prompt, answer) rows of a probe file; ValueError naming the line of a bad row."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("answer"), str) \
                or not row["answer"].strip():
            raise ValueError(f"{path} line {i}: needs a string `prompt` and a non-empty string `answer`")
        rows.append((row["prompt"], row["answer"]))
    if not rows:
        raise ValueError(f"{path}: no probe rows")
    return rows


def _fold(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def passes(output: str, answer: str) -> bool:
    """Whether `output` contains `answer` (case and runs of whitespace ignored)."""
    return _fold(answer) in _fold(output)
