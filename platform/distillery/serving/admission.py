"""Latency-target admission for one engine replica: how many requests its vLLM engine works on at once.

vLLM batches every request it holds into each engine step, so the step time, and with it every
request's per-token latency (and the prefill delay a new request sees), grows with the number of
requests admitted. `AdmissionControl` holds the p95 of that latency near `serve.latency_target_ms`
by AIMD (additive increase, multiplicative decrease) on the admission limit:

- the p95 since the last decision above the target: limit x target / p95, kept within
  [0.5, 0.9] (latency grows about in proportion to the batch once the engine is compute-bound, so
  that ratio aims at the target; a small overshoot costs little throughput, a large one halves);
- below `headroom` x target while the limit was full (more work was waiting or could have run):
  limit + 1;
- otherwise unchanged.
Each decision judges only latency measured after the previous one took effect: spans that began
before it, and anything measured while more requests run than the new limit (after a decrease
the engine's batch shrinks only as requests finish), are left out. Samples arrive while requests
stream, not only when they end (`observe`), so a decision takes a fraction of a request's time.

Why AIMD and not PID: the latency-vs-concurrency curve is flat until the engine is compute-bound,
then steep, and its shape changes with the model, the hardware, prompt and output lengths. A PID
needs gains fitted to that curve (and winds up whenever the load is below capacity and the limit
does not bind); AIMD needs no plant-specific gains, only the target, is stable under noisy p95
estimates, and backs off fast when a latency spike says the knee moved.

Requests over the limit wait here (first come, first served) rather than in vLLM, where they would
slow everyone's steps; how many wait is what `distillery.serving.autoscale` scales replicas on.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Literal

Metric = Literal["tpot", "ttft"]


def p95(values: list[float]) -> float:
    """The 95th percentile (nearest rank) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


@dataclass
class Ticket:
    """One admitted request: when it got in."""

    admitted_at: float


class AdmissionControl:
    """A concurrency gate whose limit is a fixed number or steered by AIMD to a p95 latency target.

    target_s: the p95 target in seconds (None: a fixed limit of `max_limit`).
    metric: `tpot` (a request's mean time per output token after its first) or `ttft` (time from
        admission to its first token).
    max_limit: the most requests admitted at once (the engine's `max_num_seqs`).
    """

    def __init__(self, max_limit: int, target_s: float | None = None, metric: Metric = "tpot", *,
                 min_limit: int = 1, min_decrease: float = 0.5, max_decrease: float = 0.9, headroom: float = 0.9,
                 window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        if max_limit < 1 or not 1 <= min_limit <= max_limit:
            raise ValueError(f"admission limits must satisfy 1 <= min_limit ({min_limit}) <= max_limit ({max_limit})")
        self.target_s, self.metric = target_s, metric
        self.min_limit, self.max_limit = min_limit, max_limit
        self.min_decrease, self.max_decrease = min_decrease, max_decrease
        self.headroom, self.window_s = headroom, window_s
        self.limit = max_limit  # open at first: the limit only matters once load saturates it
        self.active = 0
        self.decisions = {"increase": 0, "decrease": 0}
        self._clock = clock
        self._waiters: deque[asyncio.Future] = deque()
        self._decided_at = float("-inf")  # when the limit last changed (or was judged)
        self._epoch_samples: list[float] = []  # latencies measured since then
        self._epoch_full = False  # the limit was reached since then
        self._recent: deque[tuple[float, float]] = deque()  # (time, latency s) over window_s, for reports

    # -- the gate ---------------------------------------------------------------------------------

    async def acquire(self) -> Ticket:
        """Wait for a slot (in arrival order); the ticket goes back to `release`."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
        else:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter  # `_wake` counts us in before resolving the future
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self.active -= 1  # admitted and cancelled in the same instant: hand the slot on
                    self._wake()
                else:
                    self._waiters.remove(waiter)
                raise
        if self.active >= self.limit:
            self._epoch_full = True
        return Ticket(self._clock())

    def release(self, ticket: Ticket) -> None:
        """Free the ticket's slot."""
        self.active -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.active < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)

    # -- the controller ---------------------------------------------------------------------------

    def observe(self, latency_s: float, started_at: float) -> None:
        """One latency measurement (in `metric`) over a span that began at `started_at`: a request's
        time to first token from its admission, or its time per token over a stretch of its stream."""
        now = self._clock()
        self._recent.append((now, latency_s))
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()
        if self.target_s is None or started_at < self._decided_at or self.active > self.limit:
            return  # no target, or evidence from before the last decision took effect
        self._epoch_samples.append(latency_s)
        if len(self._epoch_samples) >= self.samples_needed():
            self._decide(p95(self._epoch_samples))

    def samples_needed(self) -> int:
        """Samples a decision waits for: at least 20, since the p95 of fewer is close to their
        maximum and would read every noisy sample as an overshoot; one per admitted request
        beyond that, so each of them is heard."""
        return max(20, self.limit)

    def _decide(self, observed: float) -> None:
        if observed > self.target_s:
            factor = min(max(self.target_s / observed, self.min_decrease), self.max_decrease)
            new = max(self.min_limit, math.floor(self.limit * factor))
            kind = "decrease"
        elif observed < self.headroom * self.target_s and self._epoch_full:
            new = min(self.max_limit, self.limit + 1)
            kind = "increase"
        else:
            new, kind = self.limit, None
        if kind and new != self.limit:
            self.decisions[kind] += 1
        self.limit = new
        self._decided_at = self._clock()
        self._epoch_samples = []
        self._epoch_full = bool(self._waiters)  # requests already wait: the new limit binds

    def set_target(self, target_s: float | None, metric: Metric | None = None, max_limit: int | None = None) -> None:
        """Change the target (None: fixed limit), metric or ceiling while serving."""
        self.target_s = target_s
        self.metric = metric or self.metric
        if max_limit is not None:
            if max_limit < self.min_limit:
                raise ValueError(f"max_admitted ({max_limit}) is below min_limit ({self.min_limit})")
            self.max_limit = max_limit
        self.limit = self.max_limit if target_s is None else min(self.limit, self.max_limit)
        self._decided_at = self._clock()
        self._epoch_samples = []
        self._recent.clear()
        self._wake()

    def stats(self) -> dict[str, float]:
        """The replica's admission state, as numbers (Serve's custom autoscaling metrics)."""
        now = self._clock()
        recent = [v for t, v in self._recent if t >= now - self.window_s]
        observed = p95(recent) if recent else 0.0
        return {
            "admit_limit": float(self.limit),
            "admit_max": float(self.max_limit),
            "admit_active": float(self.active),
            "admit_waiting": float(len(self._waiters)),
            "latency_p95_ms": observed * 1000,
            "latency_samples": float(len(recent)),
            # > 1: slower than the target; 0 when there is no target or no sample yet.
            "latency_ratio": observed / self.target_s if self.target_s and recent else 0.0,
        }
