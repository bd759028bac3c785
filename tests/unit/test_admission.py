"""Latency-target admission (AIMD on one replica's concurrency) and the autoscaling policy that reads it."""

from __future__ import annotations

import asyncio

import pytest

from distillery.serving.admission import AdmissionControl, p95
from distillery.serving.autoscale import DOWNSCALE_DELAY_S, desired_replicas, latency_policy


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(coro)


def test_p95_is_nearest_rank():
    assert p95([1.0]) == 1.0
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    assert p95([5.0, 1.0, 3.0]) == 5.0


def test_fixed_limit_admits_in_arrival_order_and_hands_slots_on():
    async def scenario():
        gate = AdmissionControl(2)
        order: list[int] = []
        t1, t2 = await gate.acquire(), await gate.acquire()
        waiting = [asyncio.create_task(_enter(gate, i, order)) for i in range(3)]
        await asyncio.sleep(0)
        assert gate.stats()["admit_waiting"] == 3 and order == []
        gate.release(t1)
        await asyncio.sleep(0)
        assert order == [0] and gate.active == 2
        gate.release(t2)
        await asyncio.sleep(0)
        assert order == [0, 1]
        waiting[2].cancel()  # a client that hangs up while waiting leaves the queue
        await asyncio.sleep(0)
        assert gate.stats()["admit_waiting"] == 0 and gate.active == 2
        assert gate.limit == 2  # no target: the limit never moves
        return waiting

    run(scenario())


async def _enter(gate: AdmissionControl, i: int, order: list[int]):
    await gate.acquire()
    order.append(i)
    await asyncio.sleep(3600)


def _round(gate: AdmissionControl, latency_s: float, clock: Clock, fill: bool = True) -> None:
    """Admit up to the limit (or one request), measure just enough samples for a decision, finish."""
    async def go():
        tickets = [await gate.acquire() for _ in range(gate.limit if fill else 1)]
        clock.now += 1.0
        for _ in range(gate.samples_needed()):
            gate.observe(latency_s, started_at=clock.now)
        for t in tickets:
            gate.release(t)
        clock.now += 1.0

    run(go())


def test_aimd_decreases_multiplicatively_over_target_and_creeps_back_when_full():
    clock = Clock()
    gate = AdmissionControl(32, target_s=0.1, clock=clock)
    _round(gate, 0.3, clock)
    assert gate.limit == 16 and gate.decisions["decrease"] == 1  # 3x over: halved (the floor of the factor)
    _round(gate, 0.125, clock)
    assert gate.limit == 12  # 1.25x over: x 0.8
    _round(gate, 0.101, clock)
    assert gate.limit == 10  # a hair over: x 0.9 (the ceiling of the factor)
    for _ in range(3):
        _round(gate, 0.05, clock)  # fast and full: one more request per decision
    assert gate.limit == 13 and gate.decisions["increase"] == 3
    _round(gate, 0.095, clock)  # within the headroom band: hold
    assert gate.limit == 13
    for _ in range(20):
        _round(gate, 10.0, clock)
    assert gate.limit == 1  # never below min_limit


def test_aimd_does_not_grow_without_load():
    clock = Clock()
    gate = AdmissionControl(16, target_s=0.1, clock=clock)
    _round(gate, 0.5, clock)
    assert gate.limit == 8
    for _ in range(10):
        _round(gate, 0.01, clock, fill=False)  # fast but never full: no reason to admit more
    assert gate.limit == 8


def test_a_decision_judges_only_what_was_measured_after_the_last_one_took_effect():
    clock = Clock()
    gate = AdmissionControl(10, target_s=0.1, clock=clock)

    async def scenario():
        tickets = [await gate.acquire() for _ in range(7)]
        clock.now = 1.0
        for _ in range(gate.samples_needed()):
            gate.observe(1.0, started_at=0.5)  # 10x slow: 10 -> 5
        limits = [gate.limit]
        clock.now = 2.0
        for _ in range(50):
            gate.observe(1.0, started_at=0.9)  # spans that began before that decision
        limits.append(gate.limit)
        for _ in range(50):
            gate.observe(1.0, started_at=1.5)  # 7 still run: the batch has not shrunk to 5 yet
        limits.append(gate.limit)
        for t in tickets[:2]:
            gate.release(t)
        for _ in range(gate.samples_needed() - 1):
            gate.observe(1.0, started_at=1.5)  # 5 run: judged again, one sample short of a decision
        limits.append(gate.limit)
        gate.observe(1.0, started_at=1.5)  # 5 -> 2
        return limits + [gate.limit]

    assert run(scenario()) == [5, 5, 5, 5, 2]


def test_retarget_and_stats():
    clock = Clock()
    gate = AdmissionControl(8, target_s=0.2, metric="ttft", clock=clock)
    _round(gate, 0.4, clock)
    s = gate.stats()
    assert s["admit_limit"] == 4 and s["latency_p95_ms"] == pytest.approx(400) and s["latency_ratio"] == pytest.approx(2)
    gate.set_target(None, max_limit=12)
    assert gate.limit == 12 and gate.stats()["latency_ratio"] == 0
    with pytest.raises(ValueError):
        AdmissionControl(0)


def test_desired_replicas_follow_demand_over_the_sustainable_limit():
    assert desired_replicas(running=8, waiting=0, queued=0, mean_limit=8, current=1, lo=1, hi=4) == 1
    assert desired_replicas(running=8, waiting=9, queued=0, mean_limit=8, current=1, lo=1, hi=4) == 3
    assert desired_replicas(running=8, waiting=90, queued=10, mean_limit=8, current=1, lo=1, hi=4) == 4
    assert desired_replicas(running=0, waiting=0, queued=0, mean_limit=8, current=3, lo=1, hi=4) == 1
    assert desired_replicas(running=0, waiting=0, queued=0, mean_limit=0, current=3, lo=1, hi=4) == 3


def _ctx(limits, active, waiting, target, now, state=None, queued=0.0):
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingContext

    dep = DeploymentID(name="DistilleryLLMServer:m", app_name="distillery")
    ids = [ReplicaID(unique_id=f"r{i}", deployment_id=dep) for i in range(len(limits))]
    metrics = {"admit_limit": dict(zip(ids, limits)), "admit_active": dict(zip(ids, active)),
               "admit_waiting": dict(zip(ids, waiting))}
    return AutoscalingContext(
        deployment_id=dep, deployment_name=dep.name, app_name=dep.app_name, current_num_replicas=target,
        target_num_replicas=target, running_replicas=ids, total_num_requests=sum(active) + sum(waiting) + queued,
        total_queued_requests=queued, aggregated_metrics=metrics, raw_metrics=None,
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state=state or {},
        last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=None)


def test_policy_scales_up_at_once_and_down_after_the_delay():
    n, state = latency_policy(_ctx([6, 6], [6, 6], [10, 2], target=2, now=100.0))
    assert n == 4  # 24 requests over 6 per replica
    n, state = latency_policy(_ctx([8, 8], [1, 0], [0, 0], target=2, now=200.0, state=state))
    assert n == 2 and "low_since" in state  # a lull: hold
    n, state = latency_policy(_ctx([8, 8], [1, 0], [0, 0], target=2, now=200.0 + DOWNSCALE_DELAY_S, state=state))
    assert n == 1
    n, _ = latency_policy(_ctx([], [], [], target=2, now=0.0))
    assert n == 2  # nothing reported yet: keep what is there
