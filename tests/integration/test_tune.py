"""`distillery tune`: Optuna + ASHA over real Ray Train trials on tiny models."""

from __future__ import annotations

import csv
import json

import pytest
import ray

from distillery.config import ConfigError, load_config
from distillery.train.finetune import run_finetune
from distillery.tune import run_tune

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def _base(tmp_path, prepared, model, *extra):
    return load_config(overrides=[
        f"output_dir={tmp_path}", f"data.prepared={prepared}", f"model.path={model}", "method.kind=freeze",
        "train.num_workers=1", "train.strategy=none", "train.batch_size=8", "train.max_steps=12", "train.eval_every=3",
        "train.checkpoint_every=12", "train.scheduler=constant", "tune.num_samples=6", "tune.grace_period=1",
        "tune.reduction_factor=2", "tune.max_concurrent_trials=1", *extra,
    ])


@pytest.mark.timeout(1500)
def test_search_stops_weak_trials_records_failures_and_best_reproduces(tmp_path, prepared_tiny, tiny_teacher):
    # 99 layers passes the schema but fails inside the trial on a 2-layer model.
    cfg = _base(tmp_path, prepared_tiny, tiny_teacher,
                'tune.search_space={train.lr: {loguniform: [1.0e-5, 3.0e-2]}, method.freeze.trainable_layers: {choice: [1, 2, 99]}}')
    assert run_tune(cfg) == 0
    out = tmp_path / "tune"
    rows = list(csv.DictReader(open(out / "leaderboard.csv")))
    assert len(rows) == 6
    statuses = [r["status"] for r in rows]
    assert "failed" in statuses and "trainable_layers" in " ".join(r["error"] for r in rows if r["status"] == "failed")
    assert "stopped early" in statuses
    assert all(r["status"] != "failed" or r["method.freeze.trainable_layers"] == "99" for r in rows)
    done = [r for r in rows if r["status"] == "completed"]
    assert done and all(int(r["evaluations"]) == 4 for r in done)
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert all(int(r["steps"]) < 12 for r in stopped)
    for png in ["asha_curves.png", "metric_vs_train_lr.png", "metric_vs_method_freeze_trainable_layers.png"]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # best.yaml is a complete config that reproduces the best trial.
    best_val = float(rows[0]["val_loss"])
    best = load_config(out / "best.yaml", [f"output_dir={tmp_path / 'rerun'}"])
    assert best.method.freeze.trainable_layers == int(rows[0]["method.freeze.trainable_layers"])
    assert run_finetune(best) == 0
    rerun = [json.loads(l)["val_loss"] for l in (tmp_path / "rerun" / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
    assert min(rerun) == pytest.approx(best_val, rel=1e-3)
    assert (out / "best" / "model").is_dir()


def test_unknown_key_fails_before_any_trial(tmp_path, prepared_tiny, tiny_teacher):
    cfg = _base(tmp_path, prepared_tiny, tiny_teacher, "tune.search_space={distill.temprature: {uniform: [1, 2]}}")
    with pytest.raises(ConfigError, match="distill.temprature"):
        run_tune(cfg)
    assert not (tmp_path / "tune" / "search").exists()


def test_placement_group_of_a_killed_owner_is_removed():
    """What happens to a Ray Train controller that Tune stops: its workers' group must be freed."""
    from ray.util.placement_group import placement_group, placement_group_table

    from distillery.tune import remove_orphaned_placement_groups

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
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and placement_group_table().get(pg_id, {}).get("state") != "REMOVED":
        remove_orphaned_placement_groups()
        time.sleep(0.5)
    assert placement_group_table()[pg_id]["state"] == "REMOVED"
    assert ray.available_resources().get("CPU", 0) >= 3.99
