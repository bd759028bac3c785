"""What every benchmark shares: its JSON result file and the paired ratio over rounds."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, payload: dict) -> Path:
    """Write benchmarks/results/<name>.json atomically (write, then rename) and say where."""
    target = RESULTS / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, target)
    print(f"wrote {target}")
    return target


def paired_ratio(ours: list[float], baseline: list[float]) -> float:
    """Median over rounds of ours[i] / baseline[i]. A round's runs are minutes apart and rounds
    further: on a shared machine throughput drifts by tens of percent between rounds, and a ratio
    taken within each round cancels that drift where a ratio of medians would not."""
    if len(ours) != len(baseline) or not ours:
        raise ValueError(f"paired_ratio needs as many rounds on both sides, got {len(ours)} and {len(baseline)}")
    return statistics.median(a / b for a, b in zip(ours, baseline))
