"""Where tune trials wait for ASHA: rung iterations and the report count at a step."""

from distillery.rung_gate import report_iteration, rung_iterations


def test_rungs_are_grace_times_powers_of_the_reduction_factor_below_max_t():
    assert rung_iterations(1, 4, 12) == [1, 4]
    assert rung_iterations(1, 4, 20) == [1, 4, 16]
    assert rung_iterations(1, 2, 4) == [1, 2]
    assert rung_iterations(2, 3, 18) == [2, 6]
    assert rung_iterations(4, 2, 4) == []


def test_report_iteration_counts_evaluations_and_checkpoints():
    assert [report_iteration(s, 3, 12) for s in (3, 6, 9)] == [1, 2, 3]
    assert report_iteration(12, 5, 4) == 5  # reports at 4, 5, 8, 10, 12
    assert report_iteration(6, 3, 3) == 2  # a step that evaluates and checkpoints reports once
    assert report_iteration(7, 0, 0) == 0
