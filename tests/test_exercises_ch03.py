"""The self-checks of chapter 3's exercises: right answers pass, typical wrong ones fail with a hint
that does not give the answer away. References are independent (closed forms, explicit matrices)."""

import math

import torch

from cpl_mini import LinearField
from cpl_mini.exercises import available, grade
from cpl_mini.exercises.ch03 import counterexample_field

DT = torch.float64


def test_chapter_3_has_three_self_checks_or_more():
    assert len(available(3)) >= 3


def test_3_1_threshold_of_the_non_normal_family():
    # by hand: the symmetric part [[-1, a/2], [a/2, -1]] has eigenvalues -1 +- a/2
    assert grade("3.1", 2.0).ok
    half, double = grade("3.1", 1.0), grade("3.1", 4.0)
    assert not half.ok and not double.ok
    for fb in (half, double):
        assert "2" not in fb.hint


def _closed_form_depth(target=1.01):
    # ||(I + hA)^n|| = (1 + h^2)^(n/2) for the rotation, h = 2 pi / n; smallest n past the peak
    return next(n for n in range(8, 100_000) if (1 + (2 * math.pi / n) ** 2) ** (n / 2) <= target)


def test_3_4_layers_for_a_nearly_isometric_euler_network():
    n = _closed_form_depth()
    assert grade("3.4", n).ok
    too_few, too_many = grade("3.4", n - 1), grade("3.4", 2 * n)
    assert not too_few.ok and not too_many.ok
    for fb in (too_few, too_many):
        assert str(n) not in fb.hint
    assert not grade("3.4", 0).ok


def test_3_5_large_field_small_flow_and_conversely():
    assert grade("3.5", (-100 * torch.eye(3, dtype=DT), 0.01 * torch.eye(3, dtype=DT))).ok
    skew = torch.tensor([[0.0, -100.0], [100.0, 0.0]], dtype=DT)  # a rotation is fine too
    assert grade("3.5", (LinearField(skew), LinearField(torch.diag(torch.tensor([0.01, -0.01]))))).ok
    swapped = grade("3.5", (100 * torch.eye(2, dtype=DT), -0.01 * torch.eye(2, dtype=DT)))
    wrong_size = grade("3.5", (-10 * torch.eye(2, dtype=DT), 0.01 * torch.eye(2, dtype=DT)))
    assert not swapped.ok and not wrong_size.ok
    assert not grade("3.5", (-100 * torch.eye(2, dtype=DT), -0.01 * torch.eye(2, dtype=DT))).ok
    expanding_m1 = grade("3.5", (100 * torch.eye(2, dtype=DT), 0.01 * torch.eye(2, dtype=DT)))
    assert not expanding_m1.ok and "M1" in expanding_m1.hint


def test_3_6_one_sided_constant_of_the_counterexample():
    # by hand: sym J = [[-1, -cos(x2)/4], [-cos(x2)/4, -1]], eigenvalues -1 +- |cos x2| / 4
    assert grade("3.6", -0.75).ok
    no_coupling, too_much = grade("3.6", -1.0), grade("3.6", -0.5)
    assert not no_coupling.ok and not too_much.ok
    for fb in (no_coupling, too_much):
        assert "0.75" not in fb.hint and "3/4" not in fb.hint
    assert not grade("3.6", 0.1).ok


def test_counterexample_field_is_the_formula():
    x = torch.tensor([[0.3, 1.2], [-2.0, math.pi / 2]], dtype=DT)
    expected = torch.stack([-x[:, 0] - torch.sin(x[:, 1]) / 2, -x[:, 1]], dim=-1)
    assert torch.allclose(counterexample_field()(0.0, x), expected, atol=1e-15)
