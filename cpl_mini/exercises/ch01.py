"""Self-checks for the exercises of chapter 1 (adversarial examples and certified robustness).

Each checker computes its reference with the package (exact spectral norms, the margin certificate,
autograd Jacobians) and compares the student's answer with a tolerance; its hint never contains the
reference value.
"""

from __future__ import annotations

from typing import Any, Tuple

import torch

from .checking import register, to_float

__all__ = ["LOGITS_1_2", "LABEL_1_2", "LIPSCHITZ_1_2", "POINT_1_3"]

#: Exercise 1.2: the logits of one input, its label and the Lipschitz bound of the network.
LOGITS_1_2 = (2.0, 0.5, 1.2)
LABEL_1_2 = 0
LIPSCHITZ_1_2 = 2.0
#: Exercise 1.3: the point x (label 0) at which the identity classifier is examined.
POINT_1_3 = (1.0, 0.0)


def _as_float64(value: Any, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains inf or nan")
    return tensor


@register("1.1")
def check_1_1(answer: Any) -> Tuple[bool, str]:
    """A pair ``(W1, W2)`` of 2 x 2 matrices with ``||W1||_2 = ||W2||_2 = 1`` and ``W2 @ W1 = 0``."""
    from ..spectral import dense_spectral_norm

    if answer is None:
        return False, "no answer yet: set answer = (W1, W2), two 2 x 2 matrices"
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        return False, "the answer is a pair (W1, W2) of 2 x 2 matrices"
    w1, w2 = (_as_float64(w, name) for w, name in zip(answer, ("W1", "W2")))
    if w1.shape != (2, 2) or w2.shape != (2, 2):
        return False, f"both matrices must be 2 x 2, got {tuple(w1.shape)} and {tuple(w2.shape)}"
    norms = [float(dense_spectral_norm(w)) for w in (w1, w2)]
    if any(abs(n - 1.0) > 1e-6 for n in norms):
        return False, (
            f"both matrices need spectral norm 1 (largest singular value); yours have "
            f"{norms[0]:.4f} and {norms[1]:.4f}"
        )
    product = float(dense_spectral_norm(w2 @ w1))
    if product > 1e-8:
        return False, (
            f"||W2 W1||_2 = {product:.4f}, not 0: W2 must send every vector of the range "
            "of W1 to zero (the product is W2 @ W1, W1 acts first)"
        )
    return True, ""


@register("1.2")
def check_1_2(answer: Any) -> Tuple[bool, str]:
    """The certified l2 radius for the logits ``LOGITS_1_2``, label ``LABEL_1_2`` and ``L = 2``."""
    from ..certify import certified_radius

    if answer is None:
        return False, "no answer yet: set answer to the certified radius (a number)"
    value = to_float(answer)
    logits = torch.tensor([LOGITS_1_2], dtype=torch.float64)
    label = torch.tensor([LABEL_1_2])
    reference = float(certified_radius(logits, label, lipschitz=LIPSCHITZ_1_2)[0])
    if abs(value - reference) <= 1e-4 * max(1.0, abs(reference)):
        return True, ""
    gap = logits[0, LABEL_1_2] - logits[0, 1:].max()
    if abs(value - float(gap) / LIPSCHITZ_1_2) < 1e-4:
        return False, "the margin is right, but a logit difference has Lipschitz constant up to sqrt(2) L"
    return False, ("the radius is the margin (true logit minus the LARGEST other logit) divided by sqrt(2) L")


@register("1.3")
def check_1_3(answer: Any) -> Tuple[bool, str]:
    """The distance ``d(x)`` to the decision boundary of the identity classifier at ``POINT_1_3``."""
    from ..certify import certified_radius

    if answer is None:
        return False, "no answer yet: set answer to the distance d(x) (a number)"
    value = to_float(answer)
    x = torch.tensor([POINT_1_3], dtype=torch.float64)
    # for f = identity the certified radius M / sqrt(2) is attained (the exercise's claim)
    reference = float(certified_radius(x, torch.tensor([0]), lipschitz=1.0)[0])
    if abs(value - reference) <= 1e-6:
        return True, ""
    if abs(value - POINT_1_3[0]) <= 1e-6:
        return False, (
            "that is the margin M; the distance to the line x1 = x2 is measured perpendicular to it"
        )
    return False, "the decision boundary of f(x) = x for two classes is the line x1 = x2"


@register("1.5")
def check_1_5(answer: Any, model: torch.nn.Module = None, x: torch.Tensor = None) -> Tuple[bool, str]:
    """The Jacobian ``W3 D2 W2 D1 W1`` of ``model`` at the point ``x`` (shape (1, n)), as a matrix."""
    if model is None or x is None:
        raise TypeError("call check('1.5', answer, model=net, x=x0) with the chapter's net and point")
    if answer is None:
        return False, "no answer yet: set answer to the 2 x 2 matrix W3 D2 W2 D1 W1"
    value = _as_float64(torch.as_tensor(answer).detach(), "the answer")
    point = x.detach().reshape(-1)
    reference = torch.autograd.functional.jacobian(lambda z: model(z[None])[0], point)
    reference = reference.detach().to(torch.float64)
    if value.shape != reference.shape:
        return False, (
            f"the Jacobian of a map R^{reference.shape[1]} -> R^{reference.shape[0]} has "
            f"shape {tuple(reference.shape)}, got {tuple(value.shape)}"
        )
    if torch.allclose(value, reference, rtol=1e-4, atol=1e-4):
        return True, ""
    if torch.allclose(value.T, reference, rtol=1e-4, atol=1e-4):
        return False, "this is the transpose: row i of the Jacobian holds the derivatives of f_i"
    return False, (
        "the matrices are applied right to left (W1 first), and D_k is diagonal with 1 "
        "where the pre-activation of layer k is positive"
    )
