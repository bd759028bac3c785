"""Curriculum ordering without Ray: stages of increasing difficulty, hashed order inside a stage, determinism."""

from __future__ import annotations

import random

from distillery.train.curriculum import curriculum_ranks


def test_stages_run_easy_to_hard_with_a_hashed_order_inside():
    rng = random.Random(0)
    difficulty = {f"r{i}": float(rng.randint(1, 50)) for i in range(300)}
    ranks, bounds = curriculum_ranks(difficulty, 3, seed=7)
    order = sorted(ranks, key=ranks.get)
    assert sorted(order) == sorted(difficulty) and sorted(ranks.values()) == list(range(300))
    thirds = [order[:100], order[100:200], order[200:]]
    assert [max(difficulty[r] for r in t) for t in thirds] == bounds
    assert bounds == sorted(bounds)
    for easier, harder in zip(thirds, thirds[1:]):
        assert max(difficulty[r] for r in easier) <= min(difficulty[r] for r in harder)
    # inside a stage the order is not by difficulty (same-length rows would fill one batch)
    inside = [difficulty[r] for r in thirds[1]]
    assert inside != sorted(inside)
    assert curriculum_ranks(difficulty, 3, seed=7) == (ranks, bounds)  # deterministic
    assert curriculum_ranks(difficulty, 3, seed=8)[0] != ranks  # the seed moves rows within stages only
    one, (bound,) = curriculum_ranks(difficulty, 1, seed=7)
    assert bound == max(difficulty.values()) and len(one) == 300
