"""Self-checks for the exercises of chapter 10 (where to go next).

Each checker computes its reference with the package (``sll_t``, ``certified_radius``,
``sll_residual`` with ``exact_jacobian_norm``) in float64 and compares the student's answer with a
tolerance; its hint says where to look, never what the answer is.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..certify import certified_radius
from ..lipschitz import exact_jacobian_norm
from ..sll import sll_residual, sll_t
from .checking import as_number, is_close, register

__all__ = ["CIFAR_STD", "check_10_1", "check_10_3", "check_10_4", "check_10_5", "rows_at_120_degrees"]

DT = torch.float64

#: Per-channel standard deviations of the CIFAR-10 training images (R, G, B), used in Exercise 10.4.
CIFAR_STD = (0.2470, 0.2435, 0.2616)


# ----------------------------------------------------------------------------- Exercise 10.1
def rows_at_120_degrees() -> torch.Tensor:
    """``W`` (3 x 2) whose rows are three unit vectors in the plane at 120 degrees from each other."""
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=DT)
    return torch.stack([angles.cos(), angles.sin()], dim=1)


@register("10.1")
def check_10_1(answer: Any) -> tuple[bool, str]:
    """``max over q > 0 of min_i 2 / t_i`` (the SLL's best uniform step) for the rows at 120 degrees."""
    value, hint = as_number(answer, "the largest step the SLL can give to every neuron at once")
    if value is None:
        return False, hint
    W = rows_at_120_degrees()
    gram_abs = (W @ W.T).abs()
    perron = torch.linalg.eigh(gram_abs).eigenvectors[:, -1].abs()  # the maximiser (Collatz-Wielandt)
    reference = (2.0 / sll_t(W, perron)).min().item()
    cpl_step = 2.0 / torch.linalg.matrix_norm(W, 2).item() ** 2
    if is_close(value, reference):
        return True, ""
    if is_close(value, cpl_step):
        return False, (
            "that is the CPL's step 2 / ||W||^2; the SLL's t_i come from |W W^T|, whose "
            "largest eigenvalue is larger here"
        )
    if is_close(value, 2.0 / reference) or is_close(value, 1.0 / reference):
        return False, "the question asks for a step 2 / t_i, not for t_i"
    return False, (
        "for every q > 0 the largest t_i is at least the Perron eigenvalue of |W W^T| "
        "(chapter 7); compute |W W^T| for these rows"
    )


# ----------------------------------------------------------------------------- Exercise 10.3
@register("10.3")
def check_10_3(answer: Any) -> tuple[bool, str]:
    """The distance below which two differently labelled points cannot both be certified at 108/255."""
    value, hint = as_number(answer, "a distance in pixel units, where 1 is the full range of a pixel")
    if value is None:
        return False, hint
    eps = 108 / 255
    # two points at distance d and the best 1-Lipschitz classifier for them (the bisector, logits
    # (g, -g) / sqrt(2)): both certified radii equal d / 2, so both exceed eps exactly when d > 2 eps.
    d = 1.0
    g = torch.tensor([d / 2, -d / 2], dtype=DT)  # g(x) = <x - midpoint, unit normal> at both points
    logits = torch.stack([g, -g], dim=1) / math.sqrt(2.0)
    radius_per_distance = certified_radius(logits, torch.tensor([0, 1])).min().item() / d
    reference = eps / radius_per_distance
    if is_close(value, reference):
        return True, ""
    if is_close(value, eps):
        return False, "that is the radius itself: both balls must be disjoint, so count both radii"
    if is_close(value, math.sqrt(2.0) * eps) or is_close(value, reference / math.sqrt(2.0)):
        return False, "no sqrt(2) here: the argument is about balls, not about logit margins"
    if is_close(value, reference * 255) or is_close(value, eps * 255):
        return False, "give the distance in pixel units (divide by 255)"
    return (
        False,
        "if both radii exceed eps, the two open balls must be disjoint: how far apart are their centres?",
    )


# ----------------------------------------------------------------------------- Exercise 10.4
@register("10.4")
def check_10_4(answer: Any) -> tuple[bool, str]:
    """Certified radius (input pixel units) of a margin 1.5 behind per-channel normalisation."""
    value, hint = as_number(answer, "a radius in pixel units, before the normalisation")
    if value is None:
        return False, hint
    input_lipschitz = 1.0 / min(CIFAR_STD)  # x -> (x - mean) / std, channel by channel
    logits = torch.tensor([[1.5, 0.0, -0.3]], dtype=DT)  # margin f_y - max_{j != y} f_j = 1.5
    reference = certified_radius(logits, torch.tensor([0]), lipschitz=input_lipschitz).item()
    if is_close(value, reference):
        return True, ""
    if is_close(value, 1.5 / math.sqrt(2.0)):
        return (
            False,
            "that is the radius after the normalisation: the normalisation itself is not 1-Lipschitz",
        )
    if is_close(value, 1.5 * min(CIFAR_STD)):
        return (
            False,
            "the margin of a 1-Lipschitz network certifies a radius margin / sqrt(2), not the margin",
        )
    if any(is_close(value, 1.5 * s / math.sqrt(2.0)) for s in CIFAR_STD if s != min(CIFAR_STD)):
        return False, "which channel's division stretches distances the most?"
    if is_close(value, 1.5 / (math.sqrt(2.0) * min(CIFAR_STD))):
        return False, "dividing the input by std < 1 stretches distances, so it shrinks the radius"
    return (
        False,
        "the radius is margin / (sqrt(2) L), with L the Lipschitz constant of the whole map, "
        "normalisation included",
    )


# ----------------------------------------------------------------------------- Exercise 10.5
@register("10.5")
def check_10_5(answer: Any) -> tuple[bool, str]:
    """Lipschitz constant of a CPL layer whose step uses a norm estimate 1% too small, all units active."""
    value, hint = as_number(answer, "the Lipschitz constant of the layer with every unit active")
    if value is None:
        return False, hint
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(4, 4, dtype=DT, generator=gen)
    sigma_hat = 0.99 * torch.linalg.matrix_norm(W, 2)
    bias = torch.full((4,), 1e3, dtype=DT)  # every ReLU active near the origin
    t = sigma_hat**2 * torch.ones(4, dtype=DT)  # the CPL step 2 / sigma_hat^2 for every neuron
    x = torch.zeros(1, 4, dtype=DT)
    reference = exact_jacobian_norm(lambda z: sll_residual(z, W, bias, t), x).item()
    if is_close(value, reference, 1e-4):
        return True, ""
    if is_close(value, 1.0, 1e-4):
        return (
            False,
            "a step above 2 / L is not 1-Lipschitz: look at the Jacobian along the top singular vector",
        )
    if is_close(value, 1 / 0.99**2, 1e-4) or is_close(value, 1 / 0.99, 1e-4):
        return False, (
            "that is the ratio of the steps (or of the norms); the Jacobian is I - h W^T W, "
            "take its eigenvalue of largest modulus"
        )
    return False, "with every unit active the Jacobian is I - h W^T W with h = 2 / sigma_hat^2"
