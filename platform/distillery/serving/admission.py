"""Latency-target admission for one engine replica: how many requests its vLLM engine works on at once.

vLLM batches every request it holds into each engine step, so the step time, and with it every
request's per-token latency (and the prefill delay a new request sees), grows with the number of
requests admitted. `AdmissionControl` holds the p95 of that latency near `serve.latency_target_ms`
by AIMD (additive increase, multiplicative decrease) on the admission limit:

- an epoch's p95 above the target: limit x `decrease` (at least 1);
- below `headroom` x target while the limit was full (more work was waiting or could have run):
  limit + 1;
- otherwise unchanged. Each decision starts a new epoch and judges only requests admitted in it,
  so no change is judged on evidence from before the previous one.

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
    """One admitted request: when it got in, and in which epoch (decisions judge only their own)."""

    admitted_at: float
    epoch: int


class AdmissionControl:
    """A concurrency gate whose limit is a fixed number or steered by AIMD to a p95 latency target.

    target_s: the p95 target in seconds (None: a fixed limit of `max_limit`).
    metric: `tpot` (a request's mean time per output token after its first) or `ttft` (time from
        admission to its first token).
    max_limit: the most requests admitted at once (the engine's `max_num_seqs`).
    """

    def __init__(self, max_limit: int, target_s: float | None = None, metric: Metric = "tpot", *,
                 min_limit: int = 1, decrease: float = 0.7, headroom: float = 0.9, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        if max_limit < 1 or not 1 <= min_limit <= max_limit:
            raise ValueError(f"admission limits must satisfy 1 <= min_limit ({min_limit}) <= max_limit ({max_limit})")
        self.target_s, self.metric = target_s, metric
        self.min_limit, self.max_limit = min_limit, max_limit
        self.decrease, self.headroom, self.window_s = decrease, headroom, window_s
        self.limit = max_limit  # open at first: the limit only matters once load saturates it
        self.active = 0
        self.epoch = 0
        self.decisions = {"increase": 0, "decrease": 0}
        self._clock = clock
        self._waiters: deque[asyncio.Future] = deque()
        self._epoch_samples: list[float] = []
        self._epoch_full = False  # the limit was reached during this epoch
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
        return Ticket(self._clock(), self.epoch)

    def release(self, ticket: Ticket, latency_s: float | None = None) -> None:
        """Free the ticket's slot; `latency_s` (in `metric`) is the request's measured latency, or
        None when it did not finish normally (an error or a client that hung up)."""
        self.active -= 1
        if latency_s is not None:
            self._observe(ticket, latency_s)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.active < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)

    # -- the controller ---------------------------------------------------------------------------

    def _observe(self, ticket: Ticket, latency_s: float) -> None:
        now = self._clock()
        self._recent.append((now, latency_s))
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()
        if self.target_s is None or ticket.epoch != self.epoch:
            return
        self._epoch_samples.append(latency_s)
        # An epoch lasts until half the limit's worth of its own requests finished (at least 4):
        # long enough for a p95 that means something, short enough to react within a few requests.
        if len(self._epoch_samples) >= max(4, self.limit // 2):
            self._decide(p95(self._epoch_samples))

    def _decide(self, observed: float) -> None:
        if observed > self.target_s:
            new = max(self.min_limit, math.floor(self.limit * self.decrease))
            kind = "decrease"
        elif observed < self.headroom * self.target_s and self._epoch_full:
            new = min(self.max_limit, self.limit + 1)
            kind = "increase"
        else:
            new, kind = self.limit, None
        if kind and new != self.limit:
            self.decisions[kind] += 1
        self.limit = new
        self.epoch += 1
        self._epoch_samples = []
        self._epoch_full = self.active >= self.limit

    def set_target(self, target_s: float | None, metric: Metric | None = None, max_limit: int | None = None) -> None:
        """Change the target (None: fixed limit), metric or ceiling while serving."""
        self.target_s = target_s
        self.metric = metric or self.metric
        if max_limit is not None:
            if max_limit < self.min_limit:
                raise ValueError(f"max_admitted ({max_limit}) is below min_limit ({self.min_limit})")
            self.max_limit = max_limit
        self.limit = self.max_limit if target_s is None else min(self.limit, self.max_limit)
        self.epoch += 1
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
