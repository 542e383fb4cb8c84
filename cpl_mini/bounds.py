r"""Guaranteed upper bounds of a network's l2 Lipschitz constant, composed from its parts.

For ``f = f_n o ... o f_1``, ``Lip(f) <= Lip(f_n) ... Lip(f_1)``: a network's bound is the product of
its parts' bounds. :func:`lipschitz_upper_bound` walks an ``nn.Sequential`` and asks each part:

* a module with a ``lipschitz_bound()`` method answers for itself (every layer of this package);
* ``nn.Linear`` gets its exact spectral norm in float64 plus a rounding margin;
* ``nn.ReLU``, ``nn.Identity``, ``nn.Flatten`` and the dropout layers (the identity in evaluation mode)
  are 1-Lipschitz;
* anything else raises ``TypeError``: a bound is never guessed.

**The protocol for your own module.** Give it a method ``lipschitz_bound(self) -> float`` returning a
*guaranteed* upper bound of its l2 -> l2 Lipschitz constant **in evaluation mode**, computed from the
parameters it holds when called (not from a value cached across weight updates) and rounded up, e.g.
``float(dense_spectral_norm_upper(W))`` for ``x -> W x + b``, or ``1.0`` for an isometry.
:func:`lipschitz_upper_bound` then trusts it and multiplies it in.

**Evaluation mode only.** A network in training mode computes another function (dropout scales its
kept inputs by ``1 / (1 - p)``, the CPL layers normalise by a power-iteration *under*-estimate of
their norm, batch norms use batch statistics), so :func:`lipschitz_upper_bound` refuses any module
with a part in training mode (``ValueError``: call ``model.eval()`` first) instead of bounding a
function other than the one that runs.
"""

import math
from fractions import Fraction

import torch.nn as nn

from .precision import float_up, ieee_precision
from .spectral import dense_spectral_norm_upper

__all__ = ["lipschitz_upper_bound"]

#: Parts that are 1-Lipschitz in evaluation mode (dropout is the identity there).
_ONE_LIPSCHITZ = (nn.ReLU, nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


#: Containers: their own training flag changes nothing (slicing an ``nn.Sequential`` even makes a new one
#: in training mode); their children are checked.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _check_eval_mode(module: nn.Module) -> None:
    training = [
        name or type(module).__name__
        for name, m in module.named_modules()
        if m.training and type(m) not in _CONTAINERS
    ]
    if training:
        shown = ", ".join(training[:3]) + (", ..." if len(training) > 3 else "")
        raise ValueError(
            f"lipschitz_upper_bound bounds networks in evaluation mode, but {len(training)} part(s) are in "
            f"training mode ({shown}), where dropout rescales and the CPL layers use a power-iteration "
            "estimate of their norm; call model.eval() first."
        )


def _bound(module: nn.Module) -> float:
    if isinstance(module, nn.Sequential):
        parts = [_bound(child) for child in module]
        if not all(math.isfinite(b) for b in parts):  # nan (a broken part) or inf propagate
            return math.fsum(parts)
        return float_up(math.prod(map(Fraction, parts)))  # the exact product, rounded up
    if hasattr(module, "lipschitz_bound"):
        return float(module.lipschitz_bound())
    if isinstance(module, nn.Linear):
        return float(dense_spectral_norm_upper(module.weight))
    if isinstance(module, _ONE_LIPSCHITZ):
        return 1.0
    raise TypeError(
        f"lipschitz_upper_bound does not know a sound bound for {type(module).__name__}; "
        "give the module a `lipschitz_bound()` method returning a guaranteed upper bound "
        "(see cpl_mini.bounds)."
    )


def lipschitz_upper_bound(module: nn.Module) -> float:
    """A guaranteed upper bound of the l2 Lipschitz constant of ``module`` in evaluation mode.

    Composition multiplies constants: for ``nn.Sequential`` the bound is the product of its parts
    (computed exactly, rounded up). Known parts: the package's layers (via their ``lipschitz_bound()``
    method: the CPL layers through their sound norm), any module with such a method (the protocol in
    the module docstring), ``nn.Linear`` (exact norm in float64), ``nn.ReLU``, ``nn.Identity``,
    ``nn.Flatten``, the dropout layers. Anything else raises ``TypeError``; a module with any part in
    training mode raises ``ValueError`` (call ``.eval()``). Runs with TF32 off
    (:func:`~cpl_mini.precision.ieee_precision`).

    Examples:
        >>> import torch
        >>> import torch.nn as nn
        >>> from cpl_mini import ConvexPotentialLinear, FirstCoordinates, lipschitz_upper_bound
        >>> net = nn.Sequential(ConvexPotentialLinear(6), nn.Dropout(0.5), FirstCoordinates(2))
        >>> lipschitz_upper_bound(net.eval())
        1.0
        >>> lipschitz_upper_bound(net.train())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: lipschitz_upper_bound bounds networks in evaluation mode, ... call model.eval() first.
        >>> lin = nn.Linear(2, 2, bias=False)
        >>> _ = lin.weight.data.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
        >>> round(lipschitz_upper_bound(nn.Sequential(lin, nn.ReLU(), lin).eval()), 6)  # 3 * 3
        9.0
    """
    _check_eval_mode(module)
    with ieee_precision():
        return _bound(module)
