"""Self-checks for the exercises of chapter 2 (residual networks are discretised flows).

Each checker computes its reference with the package (its fields, ``euler``, exact matrix exponentials)
and compares the student's answer with it; its hint never contains the reference value.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch

from .checking import register, to_float

__all__ = ["MATRIX_2_5", "POINT_2_5", "TIME_2_5", "TOLERANCE_2_5"]

#: Exercise 2.5: the linear field M x of the chapter, the start x0, the horizon T and the tolerance.
MATRIX_2_5 = ((0.3, -1.0), (1.2, -0.4))
POINT_2_5 = (1.0, 0.0)
TIME_2_5 = 2.0
TOLERANCE_2_5 = 1e-2

_DT = torch.float64


def _test_fields():
    """A time-independent and a time-dependent field on R^2, built from the package's fields."""
    from ..flows import FunctionField, LinearField, SkewSymmetricField

    linear = LinearField(torch.tensor([[-0.5, 1.0], [-2.0, 0.1]], dtype=_DT))
    pulse = FunctionField(lambda t, x: torch.sin(3.0 * t) * torch.tanh(x.flip(-1)))
    return linear, SkewSymmetricField(torch.tensor([[0.0, 2.0], [0.0, 0.0]], dtype=_DT)) + pulse


def _heun(field, x, t_end, n_steps):
    h = t_end / n_steps
    for k in range(n_steps):
        t0 = torch.tensor(k * h, dtype=x.dtype)
        t1 = torch.tensor((k + 1) * h, dtype=x.dtype)
        v = field(t0, x)
        x = x + h / 2 * (v + field(t1, x + h * v))
    return x


@register("2.1")
def check_2_1(answer: Callable) -> Tuple[bool, str]:
    """A function ``heun(F, x, T, n)``: n steps of Heun's method on [0, T], returns x_n."""
    from ..flows import euler

    if answer is None:
        return False, "no answer yet: set answer to your function heun(F, x, T, n)"
    if not callable(answer):
        return False, "the answer is a function heun(F, x, T, n) returning the final state x_n"
    x0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=_DT)
    wrong_somewhere = []
    for name, field in zip(("time-independent", "time-dependent"), _test_fields()):
        for n in (1, 3, 8):
            with torch.no_grad():
                got = torch.as_tensor(answer(field, x0.clone(), 1.0, n))
                ref = _heun(field, x0, 1.0, n)
            if got.shape != ref.shape:
                return False, f"heun must return the final state, shaped like x {tuple(x0.shape)}"
            if not torch.allclose(got.to(_DT), ref, rtol=1e-10, atol=1e-12):
                wrong_somewhere.append((name, field, n, got.to(_DT)))
    if not wrong_somewhere:
        return True, ""
    name, field, n, got = wrong_somewhere[0]
    with torch.no_grad():
        if torch.allclose(got, euler(field, x0, 1.0, n, return_trajectory=False), atol=1e-12):
            return False, "this is the Euler scheme: Heun averages two slopes per step"
    if name == "time-dependent":
        return False, (
            "right on a field that ignores t, wrong on one that depends on it: check the time "
            "at which each slope is evaluated"
        )
    return False, "the step must be x + h/2 [F(t_k, x) + F(t_{k+1}, x + h F(t_k, x))]"


@register("2.4")
def check_2_4(answer: Any) -> Tuple[bool, str]:
    """``(mu_rotation, mu_contraction, mu_saddle)`` for the chapter's three linear fields."""
    from ..flows import LinearField, SkewSymmetricField

    if answer is None:
        return False, "no answer yet: set answer = (mu_rotation, mu_contraction, mu_saddle)"
    if not isinstance(answer, (tuple, list)) or len(answer) != 3:
        return False, "the answer is three numbers: (mu_rotation, mu_contraction, mu_saddle)"
    values = [to_float(a) for a in answer]
    matrices = [
        SkewSymmetricField(torch.tensor([[0.0, -2.0], [0.0, 0.0]], dtype=_DT)).S,
        LinearField(-torch.eye(2, dtype=_DT)).M,
        LinearField(torch.diag(torch.tensor([1.0, -1.0], dtype=_DT))).M,
    ]
    reference = [float(torch.linalg.eigvalsh(0.5 * (m + m.T))[-1]) for m in matrices]
    wrong = [
        name
        for name, v, r in zip(("rotation", "contraction", "saddle"), values, reference)
        if abs(v - r) > 1e-6
    ]
    if not wrong:
        return True, ""
    if all(abs(v - 1.0) < 1e-6 for v in values):
        return False, "these are the Lipschitz constants K = ||M||_2; mu can be zero or negative"
    return False, (
        f"not yet right for: {', '.join(wrong)}. mu is the largest eigenvalue of the "
        "symmetric part (M + M^T)/2"
    )


def _euler_error(n: int) -> float:
    """Error at T of the depth-n Euler network of the field M x, from x0 (exact flow exp(TM) x0)."""
    m = torch.tensor(MATRIX_2_5, dtype=_DT)
    x0 = torch.tensor(POINT_2_5, dtype=_DT)
    step = torch.eye(2, dtype=_DT) + (TIME_2_5 / n) * m
    exact = torch.linalg.matrix_exp(TIME_2_5 * m) @ x0
    return float((torch.linalg.matrix_power(step, n) @ x0 - exact).norm())


def _smallest_depth(limit: int = 10_000) -> int:
    from ..flows import LinearField, euler

    n = next(k for k in range(1, limit) if _euler_error(k) <= TOLERANCE_2_5)
    # the same depth with the package's Euler network (x_n = (I + hM)^n x0)
    field = LinearField(torch.tensor(MATRIX_2_5, dtype=_DT))
    x0 = torch.tensor([POINT_2_5], dtype=_DT)
    exact = x0 @ torch.linalg.matrix_exp(TIME_2_5 * field.M).T
    with torch.no_grad():
        errors = [
            float((euler(field, x0, TIME_2_5, k, return_trajectory=False) - exact).norm()) for k in (n - 1, n)
        ]
    if not (errors[0] > TOLERANCE_2_5 >= errors[1]):
        raise RuntimeError("the Euler networks of the package disagree with the matrix powers")
    return n


@register("2.5")
def check_2_5(answer: Any) -> Tuple[bool, str]:
    """The smallest depth n whose Euler network has error <= TOLERANCE_2_5 at T (exercise 2.5)."""
    if answer is None:
        return False, "no answer yet: set answer to the depth n (an integer)"
    value = to_float(answer)
    if value != int(value) or value < 1:
        return False, "a depth is a positive integer"
    n = int(value)
    reference = _smallest_depth()
    if n == reference:
        return True, ""
    if n < reference:
        return False, "at that depth the error is still above the tolerance"
    return False, "the error is already below the tolerance at a smaller depth: find the smallest one"
