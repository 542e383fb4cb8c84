"""Self-checks of chapter 5 (the Convex Potential Layer).

Each checker computes its reference with the package (fields and their Euler steps, CPL layers, their
sound bounds) and compares the student's answer with a tolerance; its hint points at the idea, never at
the value.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Tuple

import torch
import torch.nn as nn

from ..flows import ConvexPotentialField, euler_step
from ..layers import ConvexPotentialLinear, lipschitz_upper_bound
from ..lipschitz import pair_ratio
from ..spectral import dense_spectral_norm
from .checking import register

__all__ = ["check_5_1", "check_5_2", "check_5_3", "check_5_5"]

Verdict = Tuple[bool, str]
DT = torch.float64


def _missing(what: str) -> Verdict:
    return False, f"replace None by your answer ({what})"


@register("5.1")
def check_5_1(answer: Any) -> Verdict:
    """A function ``cpl_tanh(x, W, b)``: the CPL step with tanh, ``x - (2/||W||^2) W^T tanh(W x + b)``."""
    if not callable(answer):
        return False, "the answer is a function cpl_tanh(x, W, b) that returns a tensor like x"
    gen = torch.Generator().manual_seed(51)
    for m, d in [(12, 6), (3, 5)]:
        weight = torch.randn(m, d, dtype=DT, generator=gen)
        bias = torch.randn(m, dtype=DT, generator=gen)
        x = torch.randn(50, d, dtype=DT, generator=gen)
        field = ConvexPotentialField(weight, bias, activation="tanh")
        reference = euler_step(field, 2 / dense_spectral_norm(weight).item() ** 2)(x)
        out = answer(x.clone(), weight.clone(), bias.clone())
        if out is None:
            return False, "cpl_tanh returned None: return the layer's output, a tensor of shape (N, d)"
        out = torch.as_tensor(out, dtype=DT)
        if out.shape != x.shape:
            return False, f"the output must have the shape of x, {tuple(x.shape)}; got {tuple(out.shape)}"
        if not torch.allclose(out, reference, rtol=1e-6, atol=1e-8):
            if torch.allclose(out, x - torch.tanh(x @ weight.T + bias) @ weight, rtol=1e-6, atol=1e-8):
                return False, "the step size is missing: h = 2 / ||W||_2^2"
            return False, "compare with cpl_from_scratch: only the activation changes"
    return True, ""


def _sharp_pair(layer: ConvexPotentialLinear):
    """Two points where every ReLU is on, along the top right singular vector of ``W`` (needs ``m <= d``)."""
    w, b = layer.weight.detach(), layer.bias.detach()
    x0 = torch.linalg.lstsq(w, (1 - b)[:, None]).solution[:, 0]
    _, s, vh = torch.linalg.svd(w)
    return x0[None], (x0 + 0.5 / s[0] * vh[0])[None]


@register("5.2")
def check_5_2(answer: Any) -> Verdict:
    """A function ``lipschitz_constant(s)``: the Lipschitz constant of the CPL with its step times ``s``."""
    if not callable(answer):
        return False, "the answer is a function lipschitz_constant(s) that returns a number"
    gen = torch.Generator().manual_seed(52)
    for s in (0.25, 0.5, 0.8, 1.0, 1.3, 2.0, 3.5):
        value = answer(s)
        if value is None:
            return False, "lipschitz_constant returned None: return a number"
        value = float(value)
        layer = _layer(10, 6, step_scale=s)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(6, 10, dtype=DT, generator=gen))
            layer.bias.copy_(torch.randn(6, dtype=DT, generator=gen))
        upper = layer.lipschitz_bound()  # guaranteed upper bound
        # attained: 1 where every ReLU is off, |1 - 2s| at the sharp pair
        lower = max(1.0, pair_ratio(layer, *_sharp_pair(layer)).item())
        if not lower - 1e-6 <= value <= upper + 1e-6:
            if s < 0.5 and math.isclose(value, abs(1 - 2 * s), abs_tol=1e-6):
                return False, "for small s, which pairs of points keep their distance exactly?"
            return False, f"wrong at s = {s}: compare with the sharp pair and lipschitz_bound() there"
    return True, ""


def _layer(*args, **kwargs) -> ConvexPotentialLinear:
    """A CPL layer in float64, built without touching the global random stream (the weights are set after)."""
    with torch.random.fork_rng(devices=[]):
        return ConvexPotentialLinear(*args, dtype=DT, **kwargs).eval()


def _fold_layer() -> ConvexPotentialLinear:
    layer = _layer(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0]], dtype=DT))
        layer.bias.copy_(torch.tensor([-5.0], dtype=DT))
    return layer


@register("5.3")
def check_5_3(answer: Any) -> Verdict:
    """A point ``y != x = (3, 4)`` with the image of ``x``: one-row CPL, ``w = (3, 4)``, ``b = -5``."""
    if answer is None:
        return _missing("a point y, a tensor of shape (2,)")
    y = torch.as_tensor(answer, dtype=DT).reshape(-1)
    if y.shape != (2,):
        return False, f"y is a point of the plane, shape (2,); got {tuple(y.shape)}"
    layer = _fold_layer()
    x = torch.tensor([3.0, 4.0], dtype=DT)
    if torch.allclose(y, x, atol=1e-6):
        return False, "y must differ from x"
    with torch.no_grad():
        zx, zy = layer(x[None])[0], layer(y[None])[0]
    if torch.allclose(zx, zy, atol=1e-6):
        return True, ""
    if torch.allclose(y, -x, atol=1e-6):
        return False, "the layer folds space along the line w.x + b = 0, which misses the origin"
    return False, "your y has another image: where is the layer the identity, and what is z(x)?"


def _cpl_layers(net: nn.Module):
    return [m for m in net.modules() if isinstance(m, ConvexPotentialLinear)]


def _power_bound(net: nn.Module, k: int) -> float:
    """The sound Lipschitz bound of ``net`` with every CPL layer normalised by ``k`` power iterations."""
    copy_k = copy.deepcopy(net).eval()
    for layer in _cpl_layers(copy_k):
        layer.eval_norm, layer.n_eval_iter = "power", int(k)
    return lipschitz_upper_bound(copy_k)


@register("5.5")
def check_5_5(answer: Any, net: nn.Module = None, tol: float = 1e-4) -> Verdict:
    """The smallest ``k`` for which the power-normalised copy of ``net`` has a bound ``<= 1 + tol``."""
    if net is None or not _cpl_layers(net):
        raise ValueError("call check('5.5', answer, net=net) with the chapter's trained network")
    if answer is None:
        return _missing("a number of iterations k, an integer")
    if isinstance(answer, torch.Tensor):
        answer = answer.item()
    if float(answer) != int(answer) or int(answer) < 1:
        return False, "k is a number of iterations: a positive integer"
    k = int(answer)
    reference = next((j for j in range(1, 5001) if _power_bound(net, j) <= 1 + tol), None)
    if reference is None:
        raise ValueError("this network needs more than 5000 iterations: was it trained?")
    if k == reference:
        return True, ""
    if k < reference:
        return False, f"at k = {k} the bound is still 1 + {_power_bound(net, k) - 1:.1e}"
    return False, "fewer iterations already give a bound <= 1 + 1e-4: try k one by one"
