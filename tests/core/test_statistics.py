"""bench.statistics: the intervals, ranks and tests the leaderboards and findings rest on,
checked against known answers."""

import itertools
import math
import random

import pytest

from bench.statistics import (
    Interval,
    clearly_best,
    equivalence_test,
    paired_difference,
    t_interval,
    tied_ranks,
    wilson_interval,
)


def test_t_interval_matches_the_textbook():
    interval = t_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, 2) = 4.302653
    assert interval.mean == 2.0 and interval.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    one = t_interval([0.7])
    assert one.low is None and one.half_width is None and one.overlaps(t_interval([100.0, 100.1]))


def test_overlapping_rows_always_share_a_rank_and_separate_rows_never_do():
    generator = random.Random(0)
    for _ in range(300):
        rows = {
            i: t_interval([generator.gauss(mu, sd) for _ in range(3)])
            for i, (mu, sd) in enumerate((generator.random(), generator.random() / 5) for _ in range(6))
        }
        ranks = tied_ranks(rows, higher_is_better=True)
        for a, b in itertools.combinations(rows, 2):
            if rows[a].overlaps(rows[b]):
                assert ranks[a] == ranks[b]
        # a rank counts the rows in better groups: rank 1 exists, and the best mean has it
        best = max(rows, key=lambda k: rows[k].mean)
        assert ranks[best] == 1


def test_clearly_best_needs_an_interval_that_excludes_the_runner_up():
    apart = {"a": Interval(0.9, 0.85, 0.95, 3), "b": Interval(0.5, 0.45, 0.55, 3)}
    assert clearly_best(apart, higher_is_better=True) == "a"
    assert clearly_best(apart, higher_is_better=False) == "b"
    close = {**apart, "c": Interval(0.84, 0.8, 0.88, 3)}
    assert clearly_best(close, higher_is_better=True) is None


def test_paired_difference_uses_only_the_common_seeds():
    difference = paired_difference({0: 0.5, 1: 0.7, 2: 0.9}, {0: 0.4, 1: 0.6, 3: 0.0})
    assert difference.n == 2 and difference.mean == pytest.approx(0.1) and difference.half_width == pytest.approx(0)


def test_wilson_interval_is_sound_at_zero_and_matches_a_known_value():
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    low, high = wilson_interval(10, 20)
    assert (low, high) == (pytest.approx(0.2993, abs=1e-4), pytest.approx(0.7007, abs=1e-4))


def test_equivalence_needs_enough_data_and_a_difference_inside_the_margin():
    tight = [0.001 * ((-1) ** i) for i in range(200)]
    assert equivalence_test(tight, margin=0.03).p_value < 1e-6
    assert equivalence_test(tight[:2], margin=0.03).p_value > 0.01  # two values prove little
    outside = [0.05 + 0.001 * ((-1) ** i) for i in range(200)]
    assert equivalence_test(outside, margin=0.03).p_value > 0.5


def test_holm_adjusts_for_the_number_of_comparisons_and_keeps_their_order():
    from bench.statistics import holm, paired_p_value

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    interval = t_interval([0.02, 0.03, 0.025])
    assert 0 < paired_p_value(interval) < 0.05 and paired_p_value(t_interval([0.1])) == 1.0


def test_a_row_without_an_interval_does_not_tie_every_row_together():
    rows = {"a": t_interval([0.90, 0.91, 0.92]), "b": t_interval([0.60, 0.61, 0.62]), "c": t_interval([0.30])}
    assert tied_ranks(rows, higher_is_better=True) == {"a": 1, "b": 2, "c": 3}


def test_bold_never_disagrees_with_a_shared_rank():
    rows = {
        "a": t_interval([0.90, 0.91, 0.92]),
        "b": t_interval([0.80, 0.81, 0.82]),
        "c": t_interval([0.2, 0.9, 0.3, 0.95]),
    }
    ranks = tied_ranks(rows, higher_is_better=True)
    assert ranks["a"] == ranks["c"] and clearly_best(rows, higher_is_better=True) is None


def test_holm_treats_an_undefined_p_value_as_rejecting_nothing_wherever_it_sits():
    from bench.statistics import holm

    assert holm([float("nan"), 0.001, 0.002]) == [1.0, 0.003, 0.004]
    assert holm([0.001, float("nan"), 0.002]) == [0.003, 1.0, 0.004]
