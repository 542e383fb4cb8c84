"""The self-checks of chapter 4's exercises: right answers pass, typical wrong ones fail with a hint
that does not give the answer away. References are independent of the checkers (closed forms, a
brute-force enumeration of activation patterns, explicit null spaces)."""

import itertools
import math

import torch

from cpl_mini.exercises import available, grade

DT = torch.float64


def test_chapter_4_has_three_self_checks_or_more():
    assert len(available(4)) >= 3


def test_none_is_not_yet_with_a_hint():
    for ex in ("4.1", "4.5", "4.6"):
        fb = grade(ex, None)
        assert not fb.ok and "None" in fb.hint


def test_4_1_sigmoid_step_multiple():
    # by hand: sup sigmoid' = 1/4, so L = ||W||^2 / 4 and h = 2 / L = 8 / ||W||^2
    assert grade("4.1", 8).ok
    assert grade("4.1", torch.tensor(8.0)).ok
    relu_step, quarter, too_big = grade("4.1", 2), grade("4.1", 0.5), grade("4.1", 12)
    assert not relu_step.ok and not quarter.ok and not too_big.ok
    for fb in (relu_step, quarter, too_big):
        assert "8" not in fb.hint and fb.hint


def _null_unit_vector(W):
    # independent of the checker and the solution: project e_1 off the row space with the pseudo-inverse
    d = W.shape[1]
    e = torch.zeros(d, dtype=DT)
    e[0] = 1.0
    v = e - torch.linalg.pinv(W) @ (W @ e)
    return v / v.norm()


def test_4_3_a_direction_that_keeps_distances():
    assert grade("4.3", _null_unit_vector).ok
    top = grade("4.3", lambda W: torch.linalg.svd(W)[2][0])  # the most contracted direction instead
    not_unit = grade("4.3", lambda W: 2 * _null_unit_vector(W))
    assert not top.ok and not not_unit.ok
    assert "unit" in not_unit.hint
    assert not grade("4.3", lambda W: None).ok
    assert not grade("4.3", torch.zeros(6)).ok  # a vector, not a function


def _chapter_weight_and_signs():
    gp = torch.Generator().manual_seed(1)
    W = torch.randn(4, 4, dtype=DT, generator=gp) / 2
    return W, torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=DT)


def _brute_force_lambda_min(W, signs):
    # smallest Hessian eigenvalue of f_pm over all 2^m activation patterns, divided by ||W||^2
    L = torch.linalg.svdvals(W)[0].item() ** 2
    lowest = min(
        torch.linalg.eigvalsh(W.T @ torch.diag(signs * torch.tensor(p, dtype=DT)) @ W)[0].item()
        for p in itertools.product([0.0, 1.0], repeat=W.shape[0])
    )
    return lowest / L


def test_4_4_most_negative_curvature_of_the_signed_potential():
    W, signs = _chapter_weight_and_signs()
    ref = _brute_force_lambda_min(W, signs)
    assert ref < -0.5
    assert grade("4.4", ref, weight=W, signs=signs).ok
    whole_w, positive = grade("4.4", -1.0, weight=W, signs=signs), grade("4.4", -ref, weight=W, signs=signs)
    assert not whole_w.ok and not positive.ok
    for fb in (whole_w, positive):
        assert f"{ref:.2f}" not in fb.hint and f"{-ref:.2f}" not in fb.hint
    missing = grade("4.4", ref)  # without the chapter's W the check cannot run, and says so
    assert not missing.ok and "weight=W" in missing.hint


def test_4_5_largest_step_of_the_paired_units():
    # by hand: f = (w.x)^2 / 2 has curvature ||w||^2 = 6, so h <= 2 / 6
    assert grade("4.5", 1 / 3).ok
    cpl_step, too_big = grade("4.5", 1 / 6), grade("4.5", 0.5)
    assert not cpl_step.ok and not too_big.ok
    for fb in (cpl_step, too_big):
        assert "1/3" not in fb.hint and "0.33" not in fb.hint


def test_4_6_best_step_of_the_quadratic():
    # by hand: h* = 2 / (mu + L) = 2 / 2.2, Lip = (L - mu) / (L + mu) = 9 / 11
    mu, L = 0.2, 2.0
    right = (2 / (mu + L), (L - mu) / (L + mu))
    assert grade("4.6", right).ok
    assert grade("4.6", [torch.tensor(right[0]), torch.tensor(right[1])]).ok
    one_over_l, wrong_lip = grade("4.6", (1 / L, 0.9)), grade("4.6", (right[0], 0.5))
    assert not one_over_l.ok and not wrong_lip.ok
    for fb in (one_over_l, wrong_lip):
        assert "0.909" not in fb.hint and "0.818" not in fb.hint and "9/11" not in fb.hint
    assert not grade("4.6", right[0]).ok  # one number is not a pair
    assert math.isclose(max(abs(1 - right[0] * mu), abs(1 - right[0] * L)), right[1])
