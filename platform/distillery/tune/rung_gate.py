"""ASHA rungs as gates: a trial's workers wait at each rung until Tune has decided on its result.

ASHA compares a trial with the others when its evaluation count reaches a rung (grace_period x
reduction_factor^k evaluations). A report travels from the workers to their Train controller (polled),
to the Tune trial and to the Tune driver before the scheduler sees it; meanwhile the workers would
train on, and a trial ASHA stops would have paid for steps past its rung that nothing uses. So at
a rung the workers wait: a Tune callback in the driver writes every decision to Ray's internal
key-value store (`go` or `stop`, keyed by trial and step; ray_compat.py says why that store), and
the workers read it there through `RungGate`, the loop's EvaluationGate. Between rungs nothing
waits. The keys go when the search ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from distillery.ray_compat import kv_delete_prefix, kv_get, kv_put

NAMESPACE = "distillery_tune_rungs"


def rung_evaluations(grace_period: int, reduction_factor: int, max_t: int) -> list[int]:
    """Times (evaluation counts) where ASHA may stop a trial: grace x rf^k below max_t."""
    rungs, t = [], grace_period
    while t < max_t:
        rungs.append(t)
        t *= reduction_factor
    return rungs


def _key(trial_id: str, step: int) -> bytes:
    return f"{trial_id}/{step}".encode()


def decision_callback(rungs: list[int]):
    """A Tune callback for the driver: records Tune's decision on each trial result whose
    `evaluation` count is one of `rungs`, and removes a trial's records when the search ends."""
    from ray.tune import Callback

    rung_set = set(rungs)

    class RungDecisions(Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
            # Tune sets `done` on a result when the scheduler (or the trial's end) stops the trial.
            if "step" in result and result.get("evaluation") in rung_set:
                kv_put(_key(trial.trial_id, int(result["step"])), b"stop" if result.get("done") else b"go", NAMESPACE)

        def on_experiment_end(self, trials: list, **info):
            for trial in trials:
                kv_delete_prefix(f"{trial.trial_id}/".encode(), NAMESPACE)

    return RungDecisions()


def wait_for_decision(trial_id: str, step: int, timeout_s: float = 600.0) -> str:
    """Block until the driver has recorded Tune's decision on the report at `step`: "go" or "stop".
    Returns "go" after `timeout_s` without one (a driver that is gone stops the trial anyway)."""
    key, deadline, pause = _key(trial_id, step), time.monotonic() + timeout_s, 0.005
    while time.monotonic() < deadline:
        value = kv_get(key, NAMESPACE)
        if value is not None:
            return value.decode()
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    return "go"


@dataclass(frozen=True)
class RungGate:
    """The training loop's EvaluationGate in a tune trial under ASHA: at a rung, wait for Tune's decision."""

    trial_id: str
    rungs: tuple[int, ...]  # evaluation counts where ASHA decides (rung_evaluations)

    def should_stop(self, evaluations: int, step: int) -> bool:
        return evaluations in self.rungs and wait_for_decision(self.trial_id, step) == "stop"
