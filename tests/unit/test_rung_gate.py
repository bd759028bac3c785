"""Where tune trials wait for ASHA: the rungs, in evaluations, as Ray's ASHA places them."""

import pytest
from ray.tune.schedulers import ASHAScheduler

from distillery.tune.rung_gate import rung_evaluations


@pytest.mark.parametrize("grace,rf,max_t,rungs", [
    (1, 4, 12, [1, 4]), (1, 4, 20, [1, 4, 16]), (1, 2, 4, [1, 2]), (2, 3, 18, [2, 6]), (4, 2, 4, []), (1, 3, 30, [1, 3, 9, 27]),
])
def test_rungs_are_where_rays_asha_decides(grace, rf, max_t, rungs):
    assert rung_evaluations(grace, rf, max_t) == rungs
    # The workers must wait exactly where the scheduler compares trials (its last rung, at max_t,
    # ends every trial anyway).
    asha = ASHAScheduler(time_attr="evaluation", metric="val_loss", mode="min", max_t=max_t, grace_period=grace, reduction_factor=rf)
    assert sorted(m for m, _ in asha._brackets[0]._rungs if m < max_t) == rungs
