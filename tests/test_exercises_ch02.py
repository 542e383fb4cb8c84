"""The self-checks of chapter 2's exercises: right answers pass, typical wrong ones fail with a hint
that does not give the answer away. References are independent (closed forms, matrix powers)."""

import math

import torch

from cpl_mini import LinearField, euler
from cpl_mini.exercises import available, grade

DT = torch.float64


def test_chapter_2_has_three_self_checks_or_more():
    assert len(available(2)) >= 3


def heun(F, x, T, n):
    h = T / n
    for k in range(n):
        t, t1 = torch.tensor(k * h, dtype=x.dtype), torch.tensor((k + 1) * h, dtype=x.dtype)
        v = F(t, x)
        x = x + h / 2 * (v + F(t1, x + h * v))
    return x


def heun_wrong_time(F, x, T, n):  # the second slope evaluated at t_k instead of t_{k+1}
    h = T / n
    for k in range(n):
        t = torch.tensor(k * h, dtype=x.dtype)
        v = F(t, x)
        x = x + h / 2 * (v + F(t, x + h * v))
    return x


def midpoint(F, x, T, n):  # also second order, but not Heun's method
    h = T / n
    for k in range(n):
        t = torch.tensor(k * h, dtype=x.dtype)
        x = x + h * F(t + h / 2, x + h / 2 * F(t, x))
    return x


def test_2_1_heun_function():
    assert grade("2.1", heun).ok
    as_euler = grade("2.1", lambda F, x, T, n: euler(F, x, T, n, return_trajectory=False))
    assert not as_euler.ok and "Euler" in as_euler.hint
    wrong_time = grade("2.1", heun_wrong_time)
    assert not wrong_time.ok and "time" in wrong_time.hint
    assert not grade("2.1", midpoint).ok
    assert not grade("2.1", None).ok


def test_2_1_reference_is_second_order():
    # independent of the checker: Heun's error on a linear field falls like 1/n^2
    m = torch.tensor([[0.3, -1.0], [1.2, -0.4]], dtype=DT)
    x0 = torch.tensor([[1.0, 0.0]], dtype=DT)
    exact = x0 @ torch.linalg.matrix_exp(m).T
    errors = [float((heun(LinearField(m), x0, 1.0, n) - exact).norm()) for n in (64, 128)]
    assert abs(math.log2(errors[0] / errors[1]) - 2) < 0.05


def test_2_4_one_sided_constants_of_the_three_fields():
    assert grade("2.4", (0.0, -1.0, 1.0)).ok  # lambda_max of the symmetric parts, by hand
    lipschitz = grade("2.4", (1.0, 1.0, 1.0))
    flow_constants = grade("2.4", (1.0, math.exp(-1), math.e))
    assert not lipschitz.ok and not flow_constants.ok
    for fb in (lipschitz, flow_constants):
        assert "(0" not in fb.hint and "-1.0" not in fb.hint


def _smallest_depth(tol=1e-2):
    # independent reference: explicit matrix powers (I + hM)^n against exp(TM)
    m = torch.tensor([[0.3, -1.0], [1.2, -0.4]], dtype=DT)
    x0 = torch.tensor([1.0, 0.0], dtype=DT)
    exact = torch.linalg.matrix_exp(2.0 * m) @ x0
    for n in range(1, 5000):
        step = torch.eye(2, dtype=DT) + (2.0 / n) * m
        if float((torch.linalg.matrix_power(step, n) @ x0 - exact).norm()) <= tol:
            return n
    raise AssertionError("no depth found")


def test_2_5_smallest_depth():
    n = _smallest_depth()
    assert grade("2.5", n).ok
    too_small, too_large = grade("2.5", n - 1), grade("2.5", n + 10)
    assert not too_small.ok and not too_large.ok
    for fb in (too_small, too_large):
        assert str(n) not in fb.hint
    assert not grade("2.5", 2.5).ok
