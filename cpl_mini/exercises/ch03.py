"""Self-checks for the exercises of chapter 3 (when is a flow 1-Lipschitz?).

Each checker computes its reference with the package (linear fields and their symmetric parts, the
Euler network of a rotation, one-sided Lipschitz quotients of the chapter's counter-example) and
compares the student's answer with it; its hint never contains the reference value.
"""

from __future__ import annotations

import math
from typing import Any, Tuple

import torch

from .checking import register, to_float

__all__ = ["counterexample_field", "TARGET_3_4"]

#: Exercise 3.4: the Lipschitz constant the Euler network of one turn of the rotation must reach.
TARGET_3_4 = 1.01

_DT = torch.float64


def _mu_linear(m: torch.Tensor) -> float:
    """``mu(Mx) = lambda_max((M + M^T) / 2)`` (chapter 3, equation ch3-mu-linear)."""
    return float(torch.linalg.eigvalsh(0.5 * (m + m.T))[-1])


@register("3.1")
def check_3_1(answer: Any) -> Tuple[bool, str]:
    """The largest ``a >= 0`` for which every flow map of ``M_a = [[-1, a], [0, -1]]`` is 1-Lipschitz."""
    from ..flows import LinearField

    if answer is None:
        return False, "no answer yet: set answer to the threshold a* (a number)"
    value = to_float(answer)

    def dissipative(a: float) -> bool:
        return _mu_linear(LinearField(torch.tensor([[-1.0, a], [0.0, -1.0]], dtype=_DT)).M) <= 0.0

    lo, hi = 0.0, 100.0  # dissipative at lo, not at hi: bisect
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if dissipative(mid) else (lo, mid)
    if abs(value - lo) <= 1e-6:
        return True, ""
    if value < lo:
        return False, "too small: the symmetric part is still negative semi-definite a little beyond it"
    return False, "too large: there the symmetric part of M_a has a positive eigenvalue"


def _euler_turn_lipschitz(n: int) -> float:
    """``||(I + h A)^n||_2`` for the rotation ``A``, ``h = 2 pi / n``, from the package's Euler network."""
    from ..flows import LinearField, euler
    from ..spectral import dense_spectral_norm

    rotation = LinearField(torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=_DT))
    with torch.no_grad():  # the network applied to the basis vectors: the rows of its matrix^T
        image = euler(rotation, torch.eye(2, dtype=_DT), 2 * math.pi, n, return_trajectory=False)
    return float(dense_spectral_norm(image.T))


def _smallest_depth_3_4() -> int:
    # closed form (1 + h^2)^(n/2) (chapter 3, exercise 3.4), confirmed with the Euler network
    def closed(n: int) -> float:
        return (1 + (2 * math.pi / n) ** 2) ** (n / 2)

    n = next(k for k in range(8, 1_000_000) if closed(k) <= TARGET_3_4)
    if not (_euler_turn_lipschitz(n - 1) > TARGET_3_4 >= _euler_turn_lipschitz(n)):
        raise RuntimeError("the Euler network disagrees with the closed form")
    return n


@register("3.4")
def check_3_4(answer: Any) -> Tuple[bool, str]:
    """The smallest number of Euler steps over one turn whose network is at most 1.01-Lipschitz."""
    if answer is None:
        return False, "no answer yet: set answer to the number of layers n (an integer)"
    value = to_float(answer)
    if value != int(value) or value < 1:
        return False, "a number of layers is a positive integer"
    reference = _smallest_depth_3_4()
    if int(value) == reference:
        return True, ""
    if int(value) < reference:
        return (
            False,
            f"with that many layers the network still stretches a distance by more than {TARGET_3_4}",
        )
    return False, f"fewer layers already give a network at most {TARGET_3_4}-Lipschitz: find the smallest n"


def _as_matrix(value: Any, name: str) -> torch.Tensor:
    m = getattr(value, "M", value)  # a LinearField, or a matrix
    m = torch.as_tensor(m, dtype=_DT)
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{name} must be a square matrix (or a LinearField), got shape {tuple(m.shape)}")
    return m


@register("3.5")
def check_3_5(answer: Any) -> Tuple[bool, str]:
    """Two linear fields: ``M1`` with ``||M1||_2 = 100`` and a non-expansive flow; ``M2`` with
    ``||M2||_2 = 0.01`` and an expanding flow."""
    from ..spectral import dense_spectral_norm

    if answer is None:
        return False, "no answer yet: set answer = (M1, M2), two square matrices"
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        return False, "the answer is a pair (M1, M2) of square matrices (or LinearFields)"
    m1, m2 = _as_matrix(answer[0], "M1"), _as_matrix(answer[1], "M2")
    lip1, lip2 = float(dense_spectral_norm(m1)), float(dense_spectral_norm(m2))
    if abs(lip1 - 100.0) > 1e-6 * 100.0:
        return False, f"M1 must have Lipschitz constant ||M1||_2 = 100, yours has {lip1:.6g}"
    if abs(lip2 - 0.01) > 1e-6 * 0.01:
        return False, f"M2 must have Lipschitz constant ||M2||_2 = 0.01, yours has {lip2:.6g}"
    if _mu_linear(m1) > 1e-12:
        return False, "the flow of M1 expands some distance: its symmetric part has a positive eigenvalue"
    if _mu_linear(m2) <= 0.0:
        return False, "the flow of M2 expands no distance: its symmetric part is negative semi-definite"
    return True, ""


def counterexample_field():
    """The chapter's counter-example ``F(x) = (-x1 - sin(x2) / 2, -x2)`` as a field on R^2."""
    from ..flows import FunctionField

    def fn(x):
        return torch.stack([-x[..., 0] - 0.5 * torch.sin(x[..., 1]), -x[..., 1]], dim=-1)

    return FunctionField(fn, time_dependent=False)


def _mu_counterexample() -> float:
    """sup_x lambda_max(sym J_F(x)) on a fine grid of x2 (J does not depend on x1), and confirmed by
    one-sided Lipschitz quotients of close pairs, which approach it from below."""
    from ..flows import one_sided_lipschitz

    field = counterexample_field()
    x2 = torch.linspace(-math.pi, math.pi, 2001, dtype=_DT)
    points = torch.stack([torch.zeros_like(x2), x2], dim=-1)
    jac = torch.func.vmap(torch.func.jacrev(lambda z: field(0.0, z)))(points)  # (2001, 2, 2)
    sup = float(torch.linalg.eigvalsh(0.5 * (jac + jac.transpose(1, 2)))[:, -1].max())
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(4000, 2, dtype=_DT, generator=gen)
    y = x + 1e-3 * torch.randn(4000, 2, dtype=_DT, generator=gen)
    if float(one_sided_lipschitz(field, x, y).max()) > sup + 1e-9:
        raise RuntimeError("a one-sided quotient exceeds the supremum of the Jacobian's symmetric part")
    return sup


@register("3.6")
def check_3_6(answer: Any) -> Tuple[bool, str]:
    """The one-sided Lipschitz constant ``mu(F)`` of ``F(x) = (-x1 - sin(x2) / 2, -x2)``."""
    if answer is None:
        return False, "no answer yet: set answer to mu(F) (a number)"
    value = to_float(answer)
    reference = _mu_counterexample()
    if abs(value - reference) <= 1e-4:
        return True, ""
    if value > 0:
        return False, "F is dissipative: its one-sided Lipschitz constant is negative"
    if value < reference:
        return False, (
            "too small: mu is the supremum over x of the largest eigenvalue of the symmetric "
            "part of the Jacobian, and the off-diagonal terms raise it"
        )
    return False, "too large: bound the off-diagonal entries of the symmetric part of the Jacobian"
