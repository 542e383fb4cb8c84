"""Self-checks of chapter 4 (convex potentials and gradient steps).

Each checker computes its reference with the package (potentials, steps, exact norms) and compares the
student's answer with a tolerance; its hint points at the idea, never at the value.
"""

from __future__ import annotations

import math
from typing import Any, Tuple

import torch

from ..flows import ConvexPotentialField
from ..layers import ConvexPotentialLinear
from ..spectral import dense_spectral_norm
from .checking import register

__all__ = ["check_4_1", "check_4_3", "check_4_4", "check_4_5", "check_4_6"]

Verdict = Tuple[bool, str]


def _missing(what: str) -> Verdict:
    return False, f"replace None by your answer ({what})"


def _number(answer: Any, what: str) -> float:
    """``answer`` as a float, or a ``ValueError`` whose message says what was expected."""
    if isinstance(answer, torch.Tensor):
        if answer.numel() != 1:
            raise ValueError(f"expected one number ({what}), got a tensor of shape {tuple(answer.shape)}")
        answer = answer.item()
    value = float(answer)
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number ({what}), got {value}")
    return value


def _close(value: float, reference: float, rtol: float = 1e-3) -> bool:
    return abs(value - reference) <= rtol * abs(reference)


@register("4.1")
def check_4_1(answer: Any) -> Verdict:
    """The multiple ``c`` of ``1 / ||W||^2`` that is the largest guaranteed step for the sigmoid potential."""
    if answer is None:
        return _missing("the number c in h = c / ||W||^2")
    c = _number(answer, "the number c in h = c / ||W||^2")
    weight = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(41))
    field = ConvexPotentialField(weight, activation="sigmoid")
    reference = 2 * dense_spectral_norm(weight).item() ** 2 / field.smoothness()  # h = 2 / L
    if _close(c, reference, 1e-6):
        return True, ""
    if _close(c, 2.0, 1e-6):
        return False, "2 / ||W||^2 is the ReLU potential's step; the sigmoid's slope is at most 1/4"
    if c < reference:
        return False, "a smoother potential allows a larger step: h = 2 / L with the sigmoid potential's L"
    return False, "too large: above 2 / L the theorem gives no guarantee (L = ||W||^2 sup sigma')"


@register("4.3")
def check_4_3(answer: Any) -> Verdict:
    """A function ``keep_distance(W)`` returning a unit ``v`` with ``||z(x + v) - z(x)|| = 1`` for a CPL."""
    if not callable(answer):
        return False, "the answer is a function keep_distance(W) that returns a vector"
    gen = torch.Generator().manual_seed(43)
    for m, d in [(3, 6), (2, 5), (3, 6)]:
        with torch.random.fork_rng(devices=[]):  # leave the student's random stream alone
            layer = ConvexPotentialLinear(d, inner_features=m, dtype=torch.float64).eval()
        with torch.no_grad():
            layer.weight.copy_(torch.randn(m, d, dtype=torch.float64, generator=gen))
            layer.bias.copy_(torch.randn(m, dtype=torch.float64, generator=gen))
        v = answer(layer.weight.detach().clone())
        if v is None:
            return False, f"keep_distance returned None: return a unit vector, a tensor of shape ({d},)"
        v = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
        if v.shape != (d,):
            return False, f"for W of shape ({m}, {d}) the vector must have shape ({d},), got {tuple(v.shape)}"
        if abs(v.norm().item() - 1) > 1e-6:
            return False, f"v must be a unit vector (its norm is {v.norm().item():.4g})"
        x = 3 * torch.randn(64, d, dtype=torch.float64, generator=gen)
        with torch.no_grad():
            moved = (layer(x + v) - layer(x)).norm(dim=1)
        if (moved - 1).abs().max().item() > 1e-6:
            return False, (
                "some points move by less than ||v||: look for a direction along which "
                "W x + b does not change at all"
            )
    return True, ""


@register("4.4")
def check_4_4(answer: Any, weight: torch.Tensor = None, signs: torch.Tensor = None) -> Verdict:
    """``lambda_min / L``: the smallest Hessian eigenvalue of ``f_pm`` (any activation pattern) over ``L``."""
    if weight is None or signs is None:
        raise ValueError("call check('4.4', answer, weight=W, signs=signs) with the chapter's W and signs")
    if answer is None:
        return _missing("lambda_min / L, a number")
    value = _number(answer, "lambda_min / L, a number")
    w = torch.as_tensor(weight, dtype=torch.float64)
    a = torch.as_tensor(signs, dtype=torch.float64)
    if a.shape != (w.shape[0],):
        raise ValueError(f"signs must have one entry per row of W ({w.shape[0]}), got shape {tuple(a.shape)}")
    lip = dense_spectral_norm(w).item() ** 2
    negative = w[a < 0]
    reference = -(dense_spectral_norm(negative).item() ** 2) / lip if len(negative) else 0.0
    if _close(value, reference, 1e-3):
        return True, ""
    if value >= 0:
        return False, "the responsible eigenvalue is negative: it is what makes 1 - h lambda exceed 1"
    if _close(value, -1.0, 1e-3):
        return False, "the positive units' term W_+^T D_+ W_+ can be switched off: only negative rows count"
    return False, "take the activation pattern that makes the Hessian as negative as possible"


@register("4.5")
def check_4_5(answer: Any) -> Verdict:
    """The largest 1-Lipschitz step for ``W = [w; -w]``, ``b = 0``, ``w = (1, 2, -1)``."""
    if answer is None:
        return _missing("the largest step h, a number")
    h = _number(answer, "the largest step h, a number")
    w = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    field = ConvexPotentialField(torch.stack([w, -w]))
    reference = 2 / (w @ w).item()  # 2 / (best smoothness constant ||w||^2)
    if _close(h, reference, 1e-6):
        return True, ""
    if _close(h, 2 / field.smoothness(), 1e-6):
        return False, "that is the CPL's step 2 / ||W||^2; the potential's best smoothness constant is less"
    if _close(h, 1 / (w @ w).item(), 1e-6):
        return False, "1 / L is the usual step of optimisation; the largest 1-Lipschitz step is larger"
    return False, "the potential is a quadratic: use equation (ch4-quadratic) with its Hessian"


@register("4.6")
def check_4_6(answer: Any) -> Verdict:
    """The pair ``(h*, Lip(T_h*))`` of the strongest contraction, quadratic with eigenvalues 0.2 .. 2."""
    if answer is None:
        return _missing("a pair (h, Lip(T_h))")
    try:
        h, lip = (_number(v, "a pair (h, Lip(T_h))") for v in answer)
    except TypeError:
        return False, "give a pair (h, Lip(T_h)), for instance a tuple of two numbers"
    lam = torch.tensor([0.2, 0.7, 1.3, 2.0], dtype=torch.float64)
    h_grid = torch.linspace(0.0, 2 / lam.max().item(), 200001, dtype=torch.float64)
    lips = (1 - h_grid[:, None] * lam).abs().max(dim=1).values  # Lip(T_h) = max_i |1 - h lambda_i|
    best = int(lips.argmin())
    h_ref, lip_ref = h_grid[best].item(), lips[best].item()
    if _close(h, h_ref) and _close(lip, lip_ref):
        return True, ""
    lip_at_h = (1 - h * lam).abs().max().item()
    if not _close(lip, lip_at_h):
        return False, "Lip(T_h) at your h is max_i |1 - h lambda_i|: recompute it"
    if _close(h, 2 / lam.max().item()) or _close(h, 1 / lam.max().item()):
        return False, "neither 1/L nor 2/L: balance the smallest and the largest eigenvalue"
    return False, "the best h makes |1 - h lambda| equal at the two ends of the spectrum"
