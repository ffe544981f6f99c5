"""The MDS curve area on known curves."""

import pytest

from latentedit.evaluation import area_under_curve


def test_a_perfect_method_scores_one():
    assert area_under_curve([(0.5, 1.0), (1.0, 1.0)]) == pytest.approx(1.0)


def test_a_method_that_breaks_everything_on_the_way_scores_half():
    assert area_under_curve([(1.0, 0.0)]) == pytest.approx(0.5)


def test_no_credit_beyond_the_largest_accuracy_reached():
    assert area_under_curve([(0.5, 1.0)]) == pytest.approx(0.5)
    assert area_under_curve([(0.2, 0.9), (0.6, 0.5)]) == pytest.approx(0.2 * 0.95 + 0.4 * 0.7)
