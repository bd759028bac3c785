"""Mixing sources to their weights: per-source keep rates, and the achieved ratios to report.

Over-represented sources are downsampled so that every source's share (of rows or tokens) matches
its normalised weight while keeping as much data as possible: the scarcest source relative to its
weight is kept whole. Whether a row is kept is decided by a hash of its row_id and the seed, so the
choice is stable across runs and when rows are appended.
"""

from __future__ import annotations

import hashlib


def keep_rates(amounts: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    """{source: fraction of its rows to keep} so that kept amounts are proportional to weights."""
    total_w = sum(weights.values())
    shares = {s: w / total_w for s, w in weights.items()}
    # The largest total T with amounts[s] >= T * share[s] for every source.
    total = min(amounts[s] / shares[s] for s in shares)
    return {s: min(1.0, total * shares[s] / amounts[s]) for s in shares}


def unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) from a hash of the parts: the same on every machine and run."""
    d = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") / 2**64


def ratios(amounts: dict[str, float]) -> dict[str, float]:
    total = sum(amounts.values()) or 1
    return {s: round(a / total, 4) for s, a in amounts.items()}
