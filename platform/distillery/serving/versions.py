"""Several versions behind one served name: weighted, sticky routing, the canary's health against
the stable version, and the deploy log that records (and shares) every traffic change.

A served name with `versions` maps to one engine model id per version. Each request picks a
version by weight; with a sticky key (the `X-Session-Id` header, else the request's `user`) the
same key always lands on the same version while the weights stay the same. The ingress keeps a
sliding window of outcomes per version; when the canary's error rate or p95 latency is worse than
the stable version's by more than the configured margins, all traffic goes back to stable.

The deploy log (`serve.canary.deploy_log`, JSONL, append-only) is the one record of traffic
changes: rollbacks, promotions, manual weights. Every ingress replica reads new lines from it, so
a decision taken by one replica, or by `distillery deploy promote` from a shell, reaches all.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Version:
    """One version of a served name."""

    label: str
    """What the `X-Distillery-Version` header says: `v1`, `v2`, ..."""
    model_id: str
    """The engine-side model id (`<name>@<label>`, or `<base>:<adapter>` for an adapter)."""
    weight: float
    role: str
    """`stable`, `canary` or `shadow` (gets a copy of the traffic; its answers are logged, never returned)."""


def choose(versions: list[Version], weights: dict[str, float], key: str | None, rng: random.Random) -> Version:
    """The version that answers: by `weights` (label -> share; shadows excluded), deterministically
    from `key` when one is given (sticky per session), else at random."""
    live = [v for v in versions if v.role != "shadow" and weights.get(v.label, 0.0) > 0]
    if not live:
        return next(v for v in versions if v.role == "stable")
    total = sum(weights[v.label] for v in live)
    if key is not None:
        point = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 * total
    else:
        point = rng.random() * total
    for v in live:
        point -= weights[v.label]
        if point < 0:
            return v
    return live[-1]


@dataclass
class Window:
    """Outcomes of one version over the last `seconds`: (time, ok, latency seconds)."""

    seconds: float
    items: deque = field(default_factory=deque)

    def add(self, ok: bool, latency_s: float, now: float | None = None) -> None:
        self.items.append((now if now is not None else time.monotonic(), ok, latency_s))

    def _trim(self, now: float) -> None:
        while self.items and self.items[0][0] < now - self.seconds:
            self.items.popleft()

    def stats(self, now: float | None = None) -> dict[str, float]:
        """{requests, error_rate, p95_s} over the window."""
        self._trim(now if now is not None else time.monotonic())
        n = len(self.items)
        if not n:
            return {"requests": 0, "error_rate": 0.0, "p95_s": 0.0}
        lat = sorted(x[2] for x in self.items if x[1]) or [0.0]
        return {"requests": n, "error_rate": sum(not x[1] for x in self.items) / n,
                "p95_s": lat[min(len(lat) - 1, int(0.95 * (len(lat) - 1) + 0.5))]}


def judge(stable: dict[str, float], canary: dict[str, float], min_requests: int, max_error_rate_delta: float,
          max_p95_ratio: float) -> str | None:
    """Why the canary must be rolled back, or None: judged only once both versions have
    `min_requests` outcomes in the window."""
    if canary["requests"] < min_requests or stable["requests"] < min_requests:
        return None
    if canary["error_rate"] - stable["error_rate"] > max_error_rate_delta:
        return (f"canary error rate {canary['error_rate']:.1%} vs stable {stable['error_rate']:.1%} over "
                f"{canary['requests']} / {stable['requests']} requests (allowed +{max_error_rate_delta:.1%})")
    if stable["p95_s"] > 0 and canary["p95_s"] > max_p95_ratio * stable["p95_s"]:
        return (f"canary p95 latency {canary['p95_s'] * 1000:.0f} ms vs stable {stable['p95_s'] * 1000:.0f} ms "
                f"(allowed {max_p95_ratio:g}x)")
    return None


class DeployLog:
    """Append-only JSONL of traffic events; `weights(name)` is the latest traffic of a name."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._offset = 0
        self._latest: dict[str, dict[str, float]] = {}

    def append(self, event: str, name: str, weights: dict[str, float] | None = None, **detail: Any) -> dict[str, Any]:
        """Write one event line (under an exclusive lock: several replicas and shells may write)."""
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, "name": name,
                  **({"weights": weights} if weights is not None else {}), **detail}
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
        return record

    def refresh(self) -> list[dict[str, Any]]:
        """Read the lines written since the last call; returns them (the latest weights are kept)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                f.seek(self._offset)
                text = f.read()
        except FileNotFoundError:
            return []
        complete = text[: text.rfind("\n") + 1]  # a line being written is read next time
        self._offset += len(complete.encode("utf-8"))
        records = [json.loads(line) for line in complete.splitlines() if line.strip()]
        for r in records:
            if "weights" in r:
                self._latest[r["name"]] = r["weights"]
        return records

    def weights(self, name: str) -> dict[str, float] | None:
        return self._latest.get(name)

    def read_all(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []
