"""Running a stage as a user does, `python -m distillery STAGE CONFIG key=value ...`, for the GPU checks.

A subprocess per stage: its Ray, its CUDA context and its engines end with it, so the next check
starts with the whole GPU free (vLLM sizes its KV cache from the memory free when it starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def stage_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "platform"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_stage(stage: str, cwd: Path, *overrides: str, timeout: float = 420) -> str:
    """Run `distillery STAGE` with an empty config file and `overrides`; returns its stdout + stderr
    (the training workers' progress lines included) and fails the test, with the output's tail, if it failed."""
    cfg = cwd / f"{stage}.yaml"
    cfg.write_text("{}\n")
    proc = subprocess.run([sys.executable, "-m", "distillery", stage, str(cfg), *overrides], cwd=cwd, env=stage_env(),
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"distillery {stage} exited {proc.returncode}:\n{out[-6000:]}"
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


def steps(run: Path, key: str) -> list[float]:
    """`key` per training step, in step order."""
    return [m[key] for m in sorted((m for m in metrics(run) if key in m and "step" in m), key=lambda m: m["step"])]


def falls(values: list[float], n: int = 3) -> bool:
    """The mean of the last `n` values is below the mean of the first `n` (robust to one noisy step)."""
    return len(values) >= 2 * n and sum(values[-n:]) / n < sum(values[:n]) / n
