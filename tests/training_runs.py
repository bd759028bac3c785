"""What the integration modules that train share: a private local Ray per module, and run helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillery.config import load_config


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the importing module. Logical CPUs: two 1-CPU train workers plus room for
    the Ray Data tasks feeding them."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def run_cfg(out, prepared, model, *overrides):
    """A short finetune/distill config: 6 steps of 4 rows, constant lr 3e-3, evaluated every 3."""
    return load_config(
        overrides=[
            f"output_dir={out}", f"data.prepared={prepared}", f"model.path={model}", "train.lr=3e-3",
            "train.batch_size=4", "train.max_steps=6", "train.eval_every=3", "train.scheduler=constant", *overrides,
        ]
    )


def run_metrics(run: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


def traced_batches(run: Path, world: int) -> list[list[list[str]]]:
    """Per step, each rank's micro-batch row ids, from the run's row trace (`train.trace_rows`)."""
    per_rank = [[json.loads(l)["row_ids"] for l in (run / "trace" / f"rows_rank{r}.jsonl").read_text().splitlines()] for r in range(world)]
    return [list(batches) for batches in zip(*per_rank)]
