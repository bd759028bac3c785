"""Ray Serve autoscaling policy for engine replicas that hold a latency target.

Each replica reports its admission state (`serving.admission.AdmissionControl.stats`): the limit
its controller found holds the latency target, and the requests it runs and keeps waiting. The
replicas needed are the demand over the limit one replica sustains at the target:

    desired = ceil((running + waiting + queued in Serve's routers) / mean admission limit)

Scaling up is immediate (waiting requests are latency already over the target); scaling down waits
until a lower count has been enough for `DOWNSCALE_DELAY_S`, so a short lull does not drop a
replica that the next burst needs (an engine replica takes a minute to start).

Serve pickles this module by value into its controller: it imports only the standard library.
"""

from __future__ import annotations

import math

DOWNSCALE_DELAY_S = 30.0


def desired_replicas(running: float, waiting: float, queued: float, mean_limit: float, current: int,
                     lo: int, hi: int) -> int:
    """Replicas for the demand, before the downscale delay; within [lo, hi]."""
    demand = running + waiting + queued
    if mean_limit <= 0:
        return min(max(current, lo), hi)
    need = math.ceil(demand / mean_limit - 1e-9) if demand > 0 else 0
    return min(max(need, lo), hi)


def latency_policy(ctx):
    """`AutoscalingConfig.policy` function: (target replicas, policy state) from the replicas'
    admission metrics (`ray.serve.config.AutoscalingContext`)."""
    metrics = ctx.aggregated_metrics or {}
    limits = metrics.get("admit_limit") or {}
    current = ctx.target_num_replicas
    state = dict(ctx.policy_state or {})
    if not limits:  # no replica has reported yet
        return current, state
    running = sum((metrics.get("admit_active") or {}).values())
    waiting = sum((metrics.get("admit_waiting") or {}).values())
    queued = ctx.total_queued_requests or 0.0
    mean_limit = sum(limits.values()) / len(limits)
    lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    desired = desired_replicas(running, waiting, queued, mean_limit, current, lo, hi)
    now = ctx.current_time or 0.0
    if desired >= current:
        state.pop("low_since", None)
        return desired, state
    since = state.setdefault("low_since", now)
    if now - since >= DOWNSCALE_DELAY_S:
        state.pop("low_since", None)
        return desired, state
    return current, state
