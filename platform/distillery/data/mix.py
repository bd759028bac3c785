"""Mixing sources to their weights: per-source keep rates, and the achieved ratios to report;
and balancing the training split over labels or sources (`data.balance`) the same way.

Every source's share (of rows or tokens) is brought to its normalised weight. Downsampling keeps
the scarcest source (relative to its weight) whole and keeps a fraction of every other source's
rows; upsampling keeps the most plentiful one whole and writes every other source's training rows
`rate` times on average (floor(rate) copies, one more for a fraction of rows). Which rows are
kept, or get the extra copy, is decided by a hash of the row_id and the seed, so the choice is
stable across runs and when rows are appended.
"""

from __future__ import annotations

import hashlib


def keep_rates(amounts: dict[str, float], weights: dict[str, float], upsample: bool = False) -> dict[str, float]:
    """{source: rows written per row it has} so that written amounts are proportional to weights:
    at most 1 when downsampling, at least 1 when upsampling."""
    total_w = sum(weights.values())
    shares = {s: w / total_w for s, w in weights.items()}
    if upsample:  # the smallest total T with amounts[s] <= T * share[s] for every source
        total = max(amounts[s] / shares[s] for s in shares)
        return {s: max(1.0, total * shares[s] / amounts[s]) for s in shares}
    # The largest total T with amounts[s] >= T * share[s] for every source.
    total = min(amounts[s] / shares[s] for s in shares)
    return {s: min(1.0, total * shares[s] / amounts[s]) for s in shares}


def copies_of(rate: float, u: float) -> int:
    """Times a row is written at `rate` (rows per row), given its uniform hash `u` in [0, 1):
    0 or 1 below rate 1, floor(rate) or floor(rate) + 1 above, so the mean is `rate`."""
    whole = int(rate)
    return whole + (u < rate - whole)


def unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) from a hash of the parts: the same on every machine and run."""
    d = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") / 2**64


def ratios(amounts: dict[str, float]) -> dict[str, float]:
    total = sum(amounts.values()) or 1
    return {s: round(a / total, 4) for s, a in amounts.items()}


def balance_key(label: str | None, messages: list[dict] | None, text: str | None) -> str:
    """The class of a row for `data.balance.by: label`: its `label` field, else the content of its
    last assistant turn (a plain-text row: its text), stripped."""
    if label is not None:
        return label
    if messages:
        answers = [m["content"] for m in messages if m.get("role") == "assistant"]
        if answers:
            return answers[-1].strip()
    return (text or "").strip()
