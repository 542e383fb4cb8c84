"""Self-checks for the exercises of chapter 9 (certifying robustness).

The answers depend on the trained network, so each checker recomputes its reference from what it is
given: the certified radii of the test set and the Lipschitz bounds (9.1, 9.4), a layer and a start
vector whose power iterations it counts (9.3). Hints say where to look, never what the answer is.
"""

from __future__ import annotations

from typing import Any

import torch

from .checking import as_number, register

__all__ = [
    "check_9_1",
    "check_9_3",
    "check_9_4",
    "half_accuracy_radius",
    "normalised_layer_lipschitz",
    "iterations_needed",
    "TOL_9_3",
    "MAX_ITER_9_3",
    "EPS_9_4",
]

#: Exercise 9.3: the Lipschitz constant to reach, and the most iterations the checker tries.
TOL_9_3 = 1.01
MAX_ITER_9_3 = 5000
#: The radius of Exercise 9.4.
EPS_9_4 = 36 / 255


def _radii(radii: Any) -> torch.Tensor:
    if radii is None:
        raise ValueError("pass the certified radii of the test set: check(..., radii=res['radii'])")
    r = torch.as_tensor(radii).detach().cpu().double().reshape(-1)
    if r.numel() == 0 or not bool(torch.isfinite(r).all()):
        raise ValueError("radii must be a non-empty tensor of finite radii (res['radii'])")
    return r


# ----------------------------------------------------------------------------- Exercise 9.1
def half_accuracy_radius(radii: Any) -> float:
    """The smallest radius ``t`` with ``certified(t) <= clean / 2``, where ``certified(t)`` is the
    fraction of radii ``> t`` and ``clean = certified(0)``: the median radius of the correct pictures
    (the lower one of the two middle values when their number is even)."""
    r = _radii(radii)
    correct = r[r > 0].sort(descending=True).values
    if correct.numel() == 0:
        raise ValueError("no test picture is correctly classified: the curve starts at 0")
    return float(correct[correct.numel() // 2])


@register("9.1")
def check_9_1(answer: Any, radii: Any = None) -> tuple[bool, str]:
    """The radius at which the certified accuracy falls to half the clean accuracy."""
    r = _radii(radii)
    value, hint = as_number(answer, "a radius in pixel units, e.g. 0.2, not 0.2 * 255")
    if value is None:
        return False, hint
    reference = half_accuracy_radius(r)
    if abs(value - reference) <= 1 / 255:
        return True, ""
    if abs(value / 255 - reference) <= 1 / 255:
        return False, "give the radius in pixel units (divide by 255), not in units of 1/255"
    if abs(value - float(r.median())) <= 1 / 255:
        return False, "the misclassified pictures (radius <= 0) are not part of the clean accuracy"
    half = (r > value).double().mean() < (r > 0).double().mean() / 2
    if half:
        return False, "the certified accuracy is already below half the clean accuracy there: look lower"
    return False, "the certified accuracy is still above half the clean accuracy there"


# ----------------------------------------------------------------------------- Exercise 9.3
def normalised_layer_lipschitz(sigma: float, s: float) -> float:
    """The Lipschitz constant ``max(1, 2 sigma^2 / s^2 - 1)`` of a CPL layer ``x - (2/s^2) W^T ReLU(Wx + b)``
    whose weight has norm ``sigma`` when it is normalised by the estimate ``s`` (chapter 5)."""
    return max(1.0, 2.0 * sigma**2 / s**2 - 1.0)


def iterations_needed(
    layer: Any, start: torch.Tensor, tol: float = TOL_9_3, max_iter: int = MAX_ITER_9_3
) -> int:
    """The fewest power iterations from ``start`` after which the layer normalised by the estimate is
    guaranteed ``tol``-Lipschitz: ``max(1, 2 u^2 / s_k^2 - 1) <= tol`` with ``u`` the layer's sound
    upper bound of its norm and ``s_k`` the estimate after ``k`` iterations (``layer.power_estimate``).
    Returns ``max_iter + 1`` when ``max_iter`` iterations are not enough."""
    from ..spectral import power_iteration

    upper = float(layer.sound_spectral_norm())
    w = layer.weight.detach()
    x = start.detach().to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        for k in range(1, max_iter + 1):  # one iteration at a time, from the vector of the last one
            s, x = power_iteration(lambda v: layer.operator(v, w), lambda v: layer.adjoint(v, w), x, 1)
            if normalised_layer_lipschitz(upper, float(s)) <= tol:
                return k
    return max_iter + 1


@register("9.3")
def check_9_3(answer: Any, layer: Any = None, start: torch.Tensor | None = None) -> tuple[bool, str]:
    """The number of power iterations from ``start`` that make ``layer`` provably 1.01-Lipschitz."""
    if layer is None or start is None:
        raise ValueError("pass the layer and the start vector: check('9.3', answer, layer=..., start=...)")
    value, hint = as_number(answer, "a number of iterations")
    if value is None:
        return False, hint
    reference = iterations_needed(layer, start)
    if reference > MAX_ITER_9_3:
        return False, (
            f"this layer does not get there in {MAX_ITER_9_3} iterations: its sound bound may sit "
            "above its true norm (the FFT bound of a convolution); take a dense CPL layer"
        )
    if abs(value - reference) <= 1:  # one iteration of slack for rounding at the threshold
        return True, ""
    if value < reference:
        return False, (
            "too few: after that many iterations the layer is not yet provably 1.01-Lipschitz; "
            "use the sound bound for the true norm and max(1, 2 u^2 / s^2 - 1)"
        )
    return False, "too many: the constant is already below 1.01 with fewer iterations"


# ----------------------------------------------------------------------------- Exercise 9.4
@register("9.4")
def check_9_4(
    answer: Any, radii: Any = None, lipschitz: float | None = None, new_bound: float | None = None
) -> tuple[bool, str]:
    """Certified accuracy at 36/255 of the same logits when only the bound ``new_bound`` is known.

    ``radii`` were computed with the bound ``lipschitz``: a radius is ``margin / (sqrt(2) L)``.
    """
    r = _radii(radii)
    if lipschitz is None or new_bound is None or not (lipschitz > 0 and new_bound > 0):
        raise ValueError("pass lipschitz=res['lipschitz'] and new_bound=<the looser bound>, both positive")
    value, hint = as_number(answer, "a fraction between 0 and 1")
    if value is None:
        return False, hint
    reference = float((r * (lipschitz / new_bound) > EPS_9_4).double().mean())
    if abs(value - reference) <= 1e-6:
        return True, ""
    if abs(value / 100 - reference) <= 1e-6:
        return False, "give a fraction between 0 and 1, not a percentage"
    if abs(value - float((r > EPS_9_4).double().mean())) <= 1e-6:
        return False, "that is the certified accuracy with the original bound: radii change with the bound"
    if abs(value - float((r * (new_bound / lipschitz) > EPS_9_4).double().mean())) <= 1e-6:
        return False, "a larger Lipschitz bound makes every radius smaller, not larger"
    return False, "rescale each radius to the new bound, then count the pictures certified at 36/255"
