"""The self-checks of chapter 10's exercises (cpl_mini/exercises/ch10.py).

For each exercise: the right answer (computed here in closed form) passes; typical wrong answers
fail; the hint never contains the answer; an unanswered exercise (``None``) fails with a hint.
"""

import math

import pytest
import torch

from cpl_mini.exercises import available, grade


def _no_answer_in(hint, value):
    for digits in (2, 3, 4):
        assert f"{value:.{digits}f}" not in hint, f"the hint gives the answer away: {hint!r}"


def test_chapter_10_checks_are_registered():
    assert {"10.1", "10.3", "10.4", "10.5"} <= set(available(10))


@pytest.mark.parametrize("exercise", ["10.1", "10.3", "10.4", "10.5"])
def test_unanswered_is_not_yet(exercise):
    feedback = grade(exercise, None)
    assert not feedback.ok and "None" in feedback.hint


def test_10_1_best_uniform_sll_step():
    # |G| has 1 on the diagonal and 1/2 elsewhere: row sums 2, so rho(|G|) = 2 and the step is 2 / 2
    right = 1.0
    assert grade("10.1", right).ok
    assert grade("10.1", torch.tensor(1.0)).ok
    for wrong in (4 / 3, 2.0, 0.5, 4.0):  # the CPL's step 2 / ||W||^2, rho itself, ...
        feedback = grade("10.1", wrong)
        assert not feedback.ok and feedback.hint
        _no_answer_in(feedback.hint, right)


def test_10_3_distance_for_two_certificates():
    right = 2 * 108 / 255  # two open balls of radius > eps around the points must be disjoint
    assert grade("10.3", right).ok
    assert grade("10.3", 0.847).ok
    for wrong in (108 / 255, math.sqrt(2) * 108 / 255, 216.0, 1.0):
        feedback = grade("10.3", wrong)
        assert not feedback.ok and feedback.hint
        _no_answer_in(feedback.hint, right)


def test_10_4_radius_behind_normalisation():
    right = 1.5 * 0.2435 / math.sqrt(2)  # margin / (sqrt(2) L), L = 1 / min(std)
    assert grade("10.4", right).ok
    assert grade("10.4", 0.2583).ok
    for wrong in (
        1.5 / math.sqrt(2),
        1.5 * 0.2435,
        1.5 * 0.2616 / math.sqrt(2),
        1.5 / (math.sqrt(2) * 0.2435),
    ):
        feedback = grade("10.4", wrong)
        assert not feedback.ok and feedback.hint
        _no_answer_in(feedback.hint, right)


def test_10_5_underestimated_norm():
    right = 2 / 0.99**2 - 1  # |1 - h sigma^2| along the top singular vector, h = 2 / (0.99 sigma)^2
    assert grade("10.5", right).ok
    assert grade("10.5", 1.04061).ok
    for wrong in (1.0, 1 / 0.99**2, 1 / 0.99, 1.02):
        feedback = grade("10.5", wrong)
        assert not feedback.ok and feedback.hint
        _no_answer_in(feedback.hint, right)
