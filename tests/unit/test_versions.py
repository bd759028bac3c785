"""Versioned serving without Ray: weighted and sticky routing, the canary's verdict, the deploy log."""

from __future__ import annotations

import json
import multiprocessing as mp
import random

import pytest

from distillery.config import Config
from distillery.serving.versions import DeployLog, Version, Window, choose, judge

V = [Version("v1", "bot@v1", 0.9, "stable"), Version("v2", "bot@v2", 0.1, "canary")]


def test_choose_follows_weights_and_sticks_to_a_session():
    rng = random.Random(0)
    picks = [choose(V, {"v1": 0.9, "v2": 0.1}, None, rng).label for _ in range(5000)]
    assert 0.08 < picks.count("v2") / len(picks) < 0.12
    for session in ("alice", "bob", "carol"):
        first = choose(V, {"v1": 0.5, "v2": 0.5}, session, rng).label
        assert all(choose(V, {"v1": 0.5, "v2": 0.5}, session, rng).label == first for _ in range(20))
    sessions = {choose(V, {"v1": 0.5, "v2": 0.5}, f"s{i}", rng).label for i in range(64)}
    assert sessions == {"v1", "v2"}
    assert {choose(V, {"v1": 1.0, "v2": 0.0}, f"s{i}", rng).label for i in range(64)} == {"v1"}  # rolled back
    shadowed = [Version("v1", "a", 1.0, "stable"), Version("v2", "b", 1.0, "shadow")]
    assert {choose(shadowed, {"v1": 1.0, "v2": 1.0}, None, rng).label for _ in range(50)} == {"v1"}


def test_window_and_judge():
    w = Window(10.0)
    for i in range(20):
        w.add(ok=i % 4 != 0, latency_s=0.1 * (i + 1), now=100.0 + i * 0.1)
    stats = w.stats(now=102.0)
    assert stats["requests"] == 20 and stats["error_rate"] == 0.25
    assert stats == w.stats(now=109.0)
    assert w.stats(now=200.0)["requests"] == 0  # everything left the window
    ok = {"requests": 30, "error_rate": 0.0, "p95_s": 0.2}
    assert judge(ok, {"requests": 30, "error_rate": 0.03, "p95_s": 0.25}, 20, 0.05, 1.5) is None
    assert "error rate" in judge(ok, {"requests": 30, "error_rate": 0.2, "p95_s": 0.2}, 20, 0.05, 1.5)
    assert "p95" in judge(ok, {"requests": 30, "error_rate": 0.0, "p95_s": 0.5}, 20, 0.05, 1.5)
    assert judge(ok, {"requests": 5, "error_rate": 1.0, "p95_s": 9.0}, 20, 0.05, 1.5) is None  # too few to judge


def _append(path: str, k: int) -> None:
    log = DeployLog(path)
    for i in range(50):
        log.append("weights", f"m{k}", {"v1": float(i), "v2": 1.0})


def test_deploy_log_is_shared_by_concurrent_writers_and_read_incrementally(tmp_path):
    path = str(tmp_path / "deploy.jsonl")
    reader = DeployLog(path)
    assert reader.refresh() == [] and reader.weights("m0") is None
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append, args=(path, k)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    lines = [json.loads(line) for line in open(path)]
    assert len(lines) == 150
    assert len(reader.refresh()) == 150 and reader.refresh() == []
    assert all(reader.weights(f"m{k}") == {"v1": 49.0, "v2": 1.0} for k in range(3))
    DeployLog(path).append("rollback", "m0", {"v1": 1.0, "v2": 0.0}, reason="test")
    assert [r["event"] for r in reader.refresh()] == ["rollback"] and reader.weights("m0") == {"v1": 1.0, "v2": 0.0}


def test_versions_config_is_checked():
    def serve(models):
        return Config.model_validate({"serve": {"models": models}})

    with pytest.raises(Exception, match="exactly one `role: stable`"):
        serve([{"name": "b", "versions": [{"path": "a", "role": "canary"}]}])
    with pytest.raises(Exception, match="`name` is required"):
        serve([{"versions": [{"path": "a"}]}])
    with pytest.raises(Exception, match="give `path` or `versions`"):
        serve([{"name": "b"}])
    with pytest.raises(Exception, match="at most one canary"):
        serve([{"name": "b", "versions": [{"path": "a"}, {"path": "b", "role": "canary"}, {"path": "c", "role": "shadow"}]}])
