"""`distillery tune`: Optuna + ASHA over real Ray Train trials on tiny models."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import ray

from ray_head import BIN

from distillery.config import ConfigError, load_config
from distillery.train.finetune import run_finetune
from distillery.tune.search import run_tune
from training_runs import local_ray  # noqa: F401  (the module's Ray, autouse)

pytestmark = pytest.mark.slow




def _base(tmp_path, prepared, model, *extra):
    return load_config(overrides=[
        f"output_dir={tmp_path}", f"data.prepared={prepared}", f"model.path={model}", "method.kind=freeze",
        "train.num_workers=1", "train.strategy=none", "train.batch_size=8", "train.max_steps=12", "train.eval_every=3",
        "train.checkpoint_every=4", "train.scheduler=constant", "tune.num_samples=6", "tune.grace_period=1",
        "tune.reduction_factor=2", "tune.max_concurrent_trials=1", *extra,
    ])


@pytest.mark.timeout(1500)
def test_search_stops_weak_trials_records_failures_and_best_reproduces(tmp_path, prepared_tiny, tiny_teacher):
    # trainable_layers 99 passes the schema but fails inside its trial (before its workers start) on
    # the 2-layer model; 1 and 2 train. Which trial draws what is Optuna's business: every assertion
    # derives a trial's expected outcome from its own drawn values, in any order. Seed 0's four
    # draws hold both an invalid and valid values (checked first, with the draws in the message).
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(tiny_teacher).num_hidden_layers
    cfg = _base(tmp_path, prepared_tiny, tiny_teacher, "tune.num_samples=4",
                'tune.search_space={train.lr: {loguniform: [1.0e-5, 3.0e-2]}, method.freeze.trainable_layers: {choice: [1, 2, 99]}}')
    assert run_tune(cfg) == 0
    out = tmp_path / "tune"
    rows = list(csv.DictReader(open(out / "leaderboard.csv")))
    assert len(rows) == 4
    drawn = [(r["method.freeze.trainable_layers"], r["train.lr"], r["status"]) for r in rows]
    valid = [r for r in rows if 1 <= abs(int(r["method.freeze.trainable_layers"])) <= layers]
    invalid = [r for r in rows if r not in valid]
    assert invalid and len(valid) >= 2, f"the seeded draws no longer cover the cases this test checks: {drawn}"

    # A trial whose drawn value is invalid fails, recorded with its error; every valid one trains.
    for r in invalid:
        assert r["status"] == "failed", drawn
        assert "trainable_layers" in r["error"] and r["method.freeze.trainable_layers"] in r["error"], r["error"]
    assert all(r["status"] in ("completed", "stopped early") for r in valid), drawn

    # ASHA's rungs (grace 1, reduction factor 2, 4 evaluations) are the 1st and 2nd evaluations, steps
    # 3 and 6; the checkpoints at steps 4 and 8 report too but do not move ASHA's clock.
    history = {}
    for r in valid:
        lines = [json.loads(l) for l in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        history[r["trial_id"]] = {
            "trained": [m["step"] for m in lines if "loss" in m],
            "time": {m["step"]: m["time"] for m in lines if "time" in m},  # when each step ended
            "val": {m["step"]: m["val_loss"] for m in lines if "val_loss" in m},
        }
    done = [r for r in valid if r["status"] == "completed"]
    assert done, f"no trial completed: {drawn}"
    for r in done:
        assert int(r["evaluations"]) == 4 and history[r["trial_id"]]["trained"] == list(range(1, 13)), r
    stopped = [r for r in valid if r["status"] == "stopped early"]
    assert any(int(r["steps"]) == 3 for r in stopped), f"ASHA stopped no trial at its first rung (step 3): {drawn}"
    for r in stopped:
        h, step = history[r["trial_id"]], int(r["steps"])
        # A stopped trial's workers waited at its rung for the decision and trained no step past it.
        assert step in (3, 6) and max(h["trained"]) == step, (r["trial_id"], step, h["trained"])
        # ASHA stops a trial only when a trial that reached the same rung before it did better there.
        earlier = [o["val"][step] for t, o in history.items()
                   if t != r["trial_id"] and step in o["val"] and o["time"][step] < h["time"][step]]
        assert earlier and min(earlier) < h["val"][step], (r["trial_id"], step, h["val"][step], earlier)
    for png in ["asha_curves.png", "metric_vs_train_lr.png", "metric_vs_method_freeze_trainable_layers.png"]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # The leaderboard is sorted by val loss; the best trial is a completed one, and best.yaml is a
    # complete config that reproduces it.
    losses = [float(r["val_loss"]) for r in rows if r["status"] != "failed"]
    assert losses == sorted(losses) and rows[0]["status"] == "completed", drawn
    best_val = float(rows[0]["val_loss"])
    assert best_val == min(history[rows[0]["trial_id"]]["val"].values())
    best = load_config(out / "best.yaml", [f"output_dir={tmp_path / 'rerun'}"])
    assert best.method.freeze.trainable_layers == int(rows[0]["method.freeze.trainable_layers"])
    assert best.train.lr == pytest.approx(float(rows[0]["train.lr"]), rel=1e-12)
    assert run_finetune(best) == 0
    rerun = [json.loads(l)["val_loss"] for l in (tmp_path / "rerun" / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
    assert min(rerun) == pytest.approx(best_val, rel=1e-3)
    assert (out / "best" / "model").is_dir()


@pytest.mark.timeout(1200)
def test_interrupted_search_resumes(tmp_path, prepared_tiny, tiny_teacher, capfd):
    """Ctrl-C saves the search (exit 130); the same command resumes it: the finished trial is kept,
    the interrupted one continues from its last checkpoint."""
    cfg = _base(tmp_path, prepared_tiny, tiny_teacher, "tune.num_samples=2", "tune.searcher=random", "tune.scheduler=fifo",
                "train.checkpoint_every=3", "tune.search_space={train.lr: {loguniform: [1.0e-4, 1.0e-2]}}")
    path = tmp_path / "tune.yaml"
    path.write_text(cfg.to_yaml())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the command starts its own Ray
    proc = subprocess.Popen([str(BIN / "distillery"), "tune", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    trials = tmp_path / "tune" / "trials"

    def second_trial_log():
        logs = sorted(trials.glob("*/metrics.jsonl"), key=lambda p: p.stat().st_mtime)
        return logs[1] if len(logs) > 1 else None

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        log = second_trial_log()  # one trial at a time: the first has finished when the second logs
        if log and any(json.loads(l).get("step", 0) >= 4 for l in log.read_text().splitlines() if l.strip()):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, output[-3000:]
    assert "Re-run the same command to resume" in output
    first = [r for r in csv.DictReader(open(tmp_path / "tune" / "leaderboard.csv"))]
    assert [r["status"] for r in first].count("completed") == 1 and "unfinished" in [r["status"] for r in first]
    done_id = next(r["trial_id"] for r in first if r["status"] == "completed")
    done_log = (trials / done_id / "metrics.jsonl").read_text()
    cut_id = next(r["trial_id"] for r in first if r["status"] == "unfinished")
    cut_lines = (trials / cut_id / "metrics.jsonl").read_text().splitlines()

    capfd.readouterr()
    assert run_tune(load_config(path)) == 0
    assert "resuming the search" in capfd.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "tune" / "leaderboard.csv")))
    assert len(rows) == 2 and all(r["status"] == "completed" and int(r["steps"]) == 12 for r in rows)
    assert (trials / done_id / "metrics.jsonl").read_text() == done_log  # not run again
    resumed = (trials / cut_id / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(l)["step"] for l in resumed if "loss" in json.loads(l)]
    assert steps == list(range(1, 13))
    assert resumed[:3] == cut_lines[:3]  # steps 1-3 (the checkpoint at 3) kept, with their timestamps


def test_unknown_key_fails_before_any_trial(tmp_path, prepared_tiny, tiny_teacher):
    cfg = _base(tmp_path, prepared_tiny, tiny_teacher, "tune.search_space={distill.temprature: {uniform: [1, 2]}}")
    with pytest.raises(ConfigError, match="distill.temprature"):
        run_tune(cfg)
    assert not (tmp_path / "tune" / "search").exists()


def test_placement_group_of_a_killed_owner_is_removed():
    """What happens to a Ray Train controller that Tune stops: its workers' group must be freed."""
    from ray.util.placement_group import placement_group, placement_group_table

    from distillery.tune.janitor import remove_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Owner:
        def reserve(self) -> str:
            self.pg = placement_group([{"CPU": 1}])
            ray.get(self.pg.ready())
            return self.pg.id.hex()

    owner = Owner.remote()
    pg_id = ray.get(owner.reserve.remote())
    remove_orphaned_placement_groups()
    assert placement_group_table()[pg_id]["state"] == "CREATED"  # its owner is alive: left alone
    ray.kill(owner)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and placement_group_table().get(pg_id, {}).get("state") != "REMOVED":
        remove_orphaned_placement_groups()
        time.sleep(0.5)
    assert placement_group_table()[pg_id]["state"] == "REMOVED"
    assert ray.available_resources().get("CPU", 0) >= 3.99
