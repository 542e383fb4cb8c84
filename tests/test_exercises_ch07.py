"""The self-checks of chapter 7's exercises (cpl_mini/exercises/ch07.py).

For each exercise: the right answer (computed here independently, in closed form where there is one)
passes; typical wrong answers fail; the hint never contains the answer; an unanswered exercise
(``None``) fails with a hint.
"""

import math

import pytest
import torch

from cpl_mini.exercises import available, grade

DT = torch.float64


def _no_answer_in(hint, value):
    for digits in (2, 3, 4):
        assert f"{value:.{digits}f}" not in hint, f"the hint gives the answer away: {hint!r}"


def test_chapter_7_checks_are_registered():
    assert {"7.1", "7.2", "7.3", "7.4", "7.6"} <= set(available(7))


@pytest.mark.parametrize("exercise", ["7.1", "7.2", "7.3", "7.4", "7.6"])
def test_unanswered_is_not_yet(exercise):
    feedback = grade(exercise, None)
    assert not feedback.ok and "None" in feedback.hint


# ----------------------------------------------------------------------------- 7.1
def test_7_1_euler_steps_of_a_rotation():
    right = (1 + 9 / 100) ** 5  # closed form: I + B/10 is normal with singular values sqrt(1 + 0.09)
    assert grade("7.1", right).ok
    assert grade("7.1", round(right, 4)).ok
    assert grade("7.1", torch.tensor(right)).ok
    for wrong in (1.0, right**2, math.sqrt(1.09), math.exp(0.45)):
        feedback = grade("7.1", wrong)
        assert not feedback.ok and feedback.hint
        _no_answer_in(feedback.hint, right)
    assert not grade("7.1", "1.54").ok


# ----------------------------------------------------------------------------- 7.2
def test_7_2_inverse_cayley():
    def right(Q):
        eye = torch.eye(Q.shape[0], dtype=Q.dtype)
        return torch.linalg.solve(eye + Q, eye - Q)  # (I + Q)^-1 (I - Q) = (I - Q)(I + Q)^-1

    assert grade("7.2", right).ok
    assert not grade("7.2", lambda Q: Q - Q.T).ok  # skew, but not the inverse
    wrong_order = grade(
        "7.2",
        lambda Q: torch.linalg.solve(
            torch.eye(len(Q), dtype=Q.dtype) - Q, torch.eye(len(Q), dtype=Q.dtype) + Q
        ),
    )
    assert not wrong_order.ok  # A^-1: cay of it is -Q
    assert not grade("7.2", lambda Q: Q).ok  # not skew
    returns_none = grade("7.2", lambda Q: None)
    assert not returns_none.ok and "None" in returns_none.hint
    assert not grade("7.2", 3.0).ok


# ----------------------------------------------------------------------------- 7.3
def test_7_3_aol_norm_of_three_columns():
    right = math.sqrt(3) / 2  # closed form: lambda_max(G) / t = (3/2) / 2
    assert grade("7.3", right).ok
    assert grade("7.3", 0.866).ok
    for wrong in (1.0, 0.75, 1 / math.sqrt(3), 1.2):
        feedback = grade("7.3", wrong)
        assert not feedback.ok and feedback.hint
        _no_answer_in(feedback.hint, right)


# ----------------------------------------------------------------------------- 7.4
def test_7_4_perron_weights():
    def right(W):
        # power iteration on |W W^T| (independent of the checker's eigh): converges to the Perron vector
        G = (W @ W.T).abs()
        q = torch.ones(W.shape[0], dtype=W.dtype)
        for _ in range(2000):
            q = G @ q
            q = q / q.norm()
        return q

    assert grade("7.4", right).ok
    assert not grade("7.4", lambda W: torch.ones(W.shape[0], dtype=W.dtype)).ok  # AOL's q = 1
    top_of_G = grade("7.4", lambda W: torch.linalg.eigh(W @ W.T).eigenvectors[:, -1].abs() + 1e-3)
    assert not top_of_G.ok  # eigenvector of W W^T instead of |W W^T|
    negative = grade("7.4", lambda W: -right(W))
    assert not negative.ok and "positive" in negative.hint
    assert not grade("7.4", lambda W: right(W)[:-1]).ok  # wrong shape
    assert not grade("7.4", lambda W: None).ok


# ----------------------------------------------------------------------------- 7.6
def test_7_6_one_sided_lipschitz_constant():
    right = -1 + 1 / 4  # max over x2 of the top eigenvalue of [[-1, -c/4], [-c/4, -1]], c = cos x2
    assert grade("7.6", right).ok
    assert grade("7.6", -0.75).ok
    for wrong in (-1.0, -1.25, 0.0, -0.5):
        feedback = grade("7.6", wrong)
        assert not feedback.ok and feedback.hint
        _no_answer_in(feedback.hint, right)
