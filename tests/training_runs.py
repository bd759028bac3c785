"""What the integration modules that train share: a private local Ray per module, and run helpers."""

from __future__ import annotations

import json
import os
import signal
import time
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


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, prepared_tiny, tiny_teacher):
    """The tiny teacher fine-tuned for 40 steps (one worker): a teacher worth distilling from."""
    from distillery.train.finetune import run_finetune

    out = tmp_path_factory.mktemp("teacher") / "run"
    cfg = load_config(overrides=[
        f"output_dir={out}", f"data.prepared={prepared_tiny}", "train.batch_size=8", "train.lr=5e-3", "train.scheduler=constant",
        "train.num_workers=1", "train.strategy=none", f"model.path={tiny_teacher}", "train.max_steps=40", "train.eval_every=40",
    ])
    assert run_finetune(cfg) == 0
    return out


def wait_for(what: str, condition, timeout_s: float, alive=None, interval: float = 0.1):
    """Poll `condition()` until it returns something truthy; fail the test, naming `what`, after
    `timeout_s` or as soon as `alive()` says the run it waits on has ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if alive is not None and not alive():
            pytest.fail(f"the run ended while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval)


def trace_lines(path: Path) -> list[dict]:
    """The complete lines of a rows_rank*.jsonl trace (a line being written is left out)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(l) for l in text[: text.rfind("\n") + 1].splitlines() if l.strip()]


def process_state(pid: int) -> str | None:
    """The state letter in /proc/<pid>/stat (R, S, Z, ...), or None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def kill_worker(pid_file: Path) -> int:
    """SIGKILL the live Ray worker named in pid_file and wait until it is gone; returns its pid."""
    pid = int(pid_file.read_text())
    assert process_state(pid) not in (None, "Z"), f"pid_rank0 names {pid}, which is not a live process"
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    assert cmdline.startswith("ray::"), f"pid {pid} is not a Ray worker process: {cmdline!r}"
    os.kill(pid, signal.SIGKILL)
    wait_for(f"killed worker {pid} to die", lambda: process_state(pid) in (None, "Z"), 60)
    return pid
