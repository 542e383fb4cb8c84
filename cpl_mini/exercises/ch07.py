"""Self-checks for the exercises of chapter 7 (one framework, many layers).

Each checker computes its reference with the package (``cayley``, ``aol_scaling``, ``sll_t``,
``one_sided_lipschitz``) in float64 and compares the student's answer with a tolerance; its hint says
where to look, never what the answer is.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..flows import FunctionField, one_sided_lipschitz
from ..normalized import aol_scaling
from ..orthogonal import cayley
from ..sll import sll_t
from .checking import as_number, is_close, register

__all__ = [
    "check_7_1",
    "check_7_2",
    "check_7_3",
    "check_7_4",
    "check_7_6",
    "counterexample_field",
    "euler_power_matrix",
]

DT = torch.float64


def _function(answer: Any, what: str) -> str | None:
    """A hint when ``answer`` is not a function, else None."""
    if answer is None:
        return f"replace None by your function ({what})"
    if not callable(answer):
        return f"the answer should be a function ({what}), got {type(answer).__name__}"
    return None


# ----------------------------------------------------------------------------- Exercise 7.1
def euler_power_matrix(k: int = 10) -> torch.Tensor:
    """``(I + B/k)^k`` for ``B = [[0, -3], [3, 0]]`` (float64, shape ``(2, 2)``): Exercise 7.1."""
    B = torch.tensor([[0.0, -3.0], [3.0, 0.0]], dtype=DT)
    return torch.linalg.matrix_power(torch.eye(2, dtype=DT) + B / k, k)


@register("7.1")
def check_7_1(answer: Any) -> tuple[bool, str]:
    """``||(I + B/k)^k||_2`` for ``B = [[0, -3], [3, 0]]`` and ``k = 10``."""
    value, hint = as_number(answer, "the norm of k = 10 Euler steps")
    if value is None:
        return False, hint
    reference = torch.linalg.matrix_norm(euler_power_matrix(10), 2).item()
    if is_close(value, reference):
        return True, ""
    if is_close(value, 1.0):
        return False, (
            "an explicit Euler step of a skew field is not orthogonal: compute the norm of "
            "one step I + B/k first"
        )
    if is_close(value, reference**2):
        return False, "that is the square of the norm: the singular values of I + hB are square roots"
    if value < 1.0:
        return False, "every Euler step of a skew field expands, so the norm is above 1"
    return False, (
        "I + B/k is a normal matrix: the norm of its k-th power is the k-th power of its "
        "norm, and its singular values are the moduli of its eigenvalues"
    )


# ----------------------------------------------------------------------------- Exercise 7.2
def _random_rotation(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=gen))
    if torch.linalg.det(Q) < 0:
        Q[:, 0] = -Q[:, 0]
    return Q


@register("7.2")
def check_7_2(answer: Any) -> tuple[bool, str]:
    """A function ``Q -> A`` with ``A`` skew-symmetric and ``cay(A) = Q`` for rotations ``Q``."""
    hint = _function(answer, "Q -> A, the inverse of the Cayley transform")
    if hint is not None:
        return False, hint
    for n, seed in [(2, 0), (5, 1), (6, 2), (8, 3)]:
        Q = _random_rotation(n, seed)
        A = answer(Q.clone())
        if A is None:
            return False, "your function returns None: write its body"
        if not isinstance(A, torch.Tensor):
            return False, f"your function should return a tensor, got {type(A).__name__}"
        if A.shape != (n, n):
            return (
                False,
                f"for an {n} x {n} rotation the result should have shape ({n}, {n}), got {tuple(A.shape)}",
            )
        A = A.to(DT)
        if not torch.isfinite(A).all():
            return False, "your function returned non-finite entries"
        scale = 1.0 + A.abs().max().item()
        if (A + A.T).abs().max().item() > 1e-8 * scale:
            return False, "your A is not skew-symmetric (A^T = -A) for a random rotation Q"
        if (cayley(A) - Q).abs().max().item() > 1e-8 * scale:
            return False, (
                "your A is skew-symmetric but cay(A) is not Q: solve Q = (I - A)(I + A)^(-1) "
                "for A, using that the factors commute"
            )
    return True, ""


# ----------------------------------------------------------------------------- Exercise 7.3
def _columns_at_120_degrees() -> torch.Tensor:
    """``W`` (2 x 3) whose columns are three unit vectors in the plane at 120 degrees."""
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=DT)
    return torch.stack([angles.cos(), angles.sin()])


@register("7.3")
def check_7_3(answer: Any) -> tuple[bool, str]:
    """``||W diag(d)||_2`` for three unit columns in the plane at 120 degrees from each other."""
    value, hint = as_number(answer, "the spectral norm of the AOL-rescaled matrix")
    if value is None:
        return False, hint
    W = _columns_at_120_degrees()
    reference = torch.linalg.matrix_norm(W * aol_scaling(W), 2).item()
    if is_close(value, reference):
        return True, ""
    if is_close(value, 1.0):
        return False, (
            "the AOL bound is attained only in special cases; compute G = W^T W, then d, "
            "then the largest eigenvalue of diag(d) G diag(d)"
        )
    if is_close(value, reference**2):
        return False, "that is the square of the norm (an eigenvalue of diag(d) G diag(d))"
    if value > 1.0:
        return False, "AOL's rescaled matrix never has a norm above 1"
    return (
        False,
        "write G = W^T W = a I + b 11^T and use that 1 and the vectors orthogonal to 1 are eigenvectors",
    )


# ----------------------------------------------------------------------------- Exercise 7.4
def _perron_test_weights():
    for (m, d), seed in [((6, 4), 0), ((5, 5), 1), ((8, 3), 2), ((3, 7), 3)]:
        gen = torch.Generator().manual_seed(100 + seed)
        yield torch.randn(m, d, dtype=DT, generator=gen)


@register("7.4")
def check_7_4(answer: Any) -> tuple[bool, str]:
    """A function ``W -> q`` (``q > 0``, shape ``(m,)``) for which every SLL ``t_i`` is the same."""
    hint = _function(answer, "W -> q, the weights that make every t_i equal")
    if hint is not None:
        return False, hint
    for W in _perron_test_weights():
        m = W.shape[0]
        q = answer(W.clone())
        if q is None:
            return False, "your function returns None: write its body"
        if not isinstance(q, torch.Tensor):
            return False, f"your function should return a tensor, got {type(q).__name__}"
        if q.shape != (m,):
            return False, f"for W of shape {tuple(W.shape)}, q should have shape ({m},), got {tuple(q.shape)}"
        q = q.to(DT)
        if not torch.isfinite(q).all() or not (q > 0).all():
            return False, (
                "q must be positive (q_i > 0); an eigenvector is defined only up to sign, and "
                "only one eigenvector of a matrix with positive entries is positive"
            )
        t = sll_t(W, q)
        rho = torch.linalg.eigvalsh((W @ W.T).abs())[-1].item()
        # all t_i equal forces t_i = rho(|W W^T|) (Collatz-Wielandt): check both ends against rho
        if not (is_close(t.max().item(), rho, 1e-6) and is_close(t.min().item(), rho, 1e-6)):
            return False, "with your q the t_i are not all equal: look for q with |W W^T| q = c q"
    return True, ""


# ----------------------------------------------------------------------------- Exercise 7.6
def counterexample_field() -> FunctionField:
    """``F(x) = (-x_1 - sin(x_2) / 2, -x_2)`` on ``R^2``: dissipative, not ``-grad f + A x``."""

    def field(x):
        return torch.stack([-x[..., 0] - torch.sin(x[..., 1]) / 2, -x[..., 1]], dim=-1)

    return FunctionField(field, time_dependent=False)


def _largest_symmetric_eigenvalue(field: Callable, n: int = 721) -> float:
    """``max_x lambda_max((J + J^T) / 2)`` over a grid of ``x_2`` in ``[0, 2 pi]`` (J: Jacobian of F)."""
    x2 = torch.linspace(0.0, 2 * math.pi, n, dtype=DT)
    x = torch.stack([torch.zeros_like(x2), x2], dim=1).requires_grad_(True)  # (n, 2)
    out = field(torch.zeros((), dtype=DT), x)  # (n, 2); row k depends on x[k] only
    rows = [torch.autograd.grad(out[:, i].sum(), x, retain_graph=True)[0] for i in range(2)]
    J = torch.stack(rows, dim=1)  # (n, 2, 2): J[k, i, j] = dF_i / dx_j at x[k]
    return torch.linalg.eigvalsh((J + J.transpose(1, 2)) / 2)[:, -1].max().item()


@register("7.6")
def check_7_6(answer: Any) -> tuple[bool, str]:
    """The one-sided Lipschitz constant ``mu`` of ``F(x) = (-x_1 - sin(x_2)/2, -x_2)``."""
    value, hint = as_number(answer, "the one-sided Lipschitz constant mu")
    if value is None:
        return False, hint
    field = counterexample_field()
    reference = _largest_symmetric_eigenvalue(field)
    # the sampled quotient never exceeds it (a lower bound of mu): a guard on the reference itself
    gen = torch.Generator().manual_seed(0)
    x = 4 * torch.randn(2000, 2, dtype=DT, generator=gen)
    y = x + 0.01 * torch.randn(2000, 2, dtype=DT, generator=gen)
    with torch.no_grad():
        sampled = one_sided_lipschitz(field, x, y).max().item()
    assert sampled <= reference + 1e-6, "the reference of Exercise 7.6 is below a sampled quotient"
    if is_close(value, reference):
        return True, ""
    if value > 0:
        return False, "F is dissipative, so mu is not positive"
    if is_close(value, -1.0):
        return False, "the diagonal of the Jacobian is not the whole story: the off-diagonal term counts"
    if value < -1.0:
        return (
            False,
            "that is below the diagonal of the Jacobian: you want the largest eigenvalue, not the smallest",
        )
    return False, (
        "mu is the supremum over x of the largest eigenvalue of the symmetric part "
        "(J + J^T)/2 of the Jacobian"
    )
