r"""The SDP-based Lipschitz Layer (SLL) of Araujo et al. (2023): a Convex Potential Layer with one
step size per neuron.

Paper statement (Araujo et al., 2023, Theorem 3), with their ``W`` of shape ``(n, m)`` acting on
``x`` in ``R^n``: for ``q_i > 0`` and

.. math::  T = \operatorname{diag}(t_i), \qquad t_i = \sum_{j=1}^m |W^\top W|_{ij}\, \frac{q_j}{q_i},

the layer ``h(x) = x - 2 W T^{-1} \sigma(W^\top x + b)`` is 1-Lipschitz for ``sigma`` = ReLU (any
activation with slopes in ``[0, 1]``).

Here, as in :class:`~cpl_mini.layers.ConvexPotentialLinear`, the parameter ``weight`` holds the rows
``w_i`` (shape ``(m, d)``, so it is the paper's ``W^T``) and the layer reads

.. math::  z = x - 2\, W^\top T^{-1} \mathrm{ReLU}(W x + b), \qquad
           t_i = \sum_j |W W^\top|_{ij}\, q_j / q_i .

Why it is 1-Lipschitz: the Jacobian is ``I - 2 B^T D B`` with ``B = T^{-1/2} W`` and ``D`` diagonal
in ``[0, 1]``, so its eigenvalues lie in ``[1 - 2 r, 1]`` with ``r = ||T^{-1/2} W W^T T^{-1/2}||_2``.
And ``r <= 1`` because ``T - W W^T`` is positive semi-definite: conjugated by ``diag(q)`` its row ``i``
has diagonal ``t_i - G_ii`` and off-diagonal sum ``sum_{j != i} |G_ij| q_j / q_i``, so by Gershgorin
every eigenvalue is ``>= t_i - sum_j |G_ij| q_j / q_i = 0``.

It is one explicit Euler step (step 2) of the gradient flow of the convex potential
``f(x) = sum_i psi(w_i^T x + b_i) / t_i`` (``psi' = ReLU``), whose gradient is ``L``-Lipschitz with
``L = r <= 1``. The CPL is the special case ``T = ||W||_2^2 I`` (all ``t_i`` equal), and ``q = 1`` gives
the same ``T`` as the AOL rescaling (:mod:`cpl_mini.normalized`).
"""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .precision import check_last_dim
from .spectral import ROUNDING_MARGIN

__all__ = ["sll_t", "sll_residual", "SLLLinear"]


def sll_t(weight: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    r"""The diagonal ``t`` of ``T``: ``t_i = sum_j |W W^T|_{ij} q_j / q_i``, shape ``(m,)``.

    Args:
        weight: ``W``, shape ``(m, d)`` (rows ``w_i``).
        q: positive weights, shape ``(m,)``.
        eps: ``t_i`` is raised to at least ``eps`` (only when row ``i`` of ``W`` is ~0; a larger
            ``t_i`` never breaks the bound).
    """
    if weight.dim() != 2:
        raise ValueError(f"sll_t expects weight of shape (m, d), got {tuple(weight.shape)}")
    if q.shape != (weight.shape[0],):
        raise ValueError(
            f"q must have shape ({weight.shape[0]},) to match weight {tuple(weight.shape)}, "
            f"got {tuple(q.shape)}"
        )
    gram = weight @ weight.t()  # (m, m)
    return (gram.abs() @ q / q).clamp_min(eps)


def sll_residual(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], t: torch.Tensor
) -> torch.Tensor:
    r"""``z = x - 2 W^T diag(t)^{-1} ReLU(W x + b)`` for ``x`` of shape ``(..., d)``, ``W`` ``(m, d)``,
    ``b`` ``(m,)`` or ``None``, ``t`` ``(m,)``. With ``t = ||W||^2`` (all entries) it is the CPL step."""
    y = F.relu(F.linear(x, weight, bias)) / t
    return x - 2.0 * F.linear(y, weight.t())


class SLLLinear(nn.Module):
    r"""Dense SDP-based Lipschitz Layer ``z = x - 2 W^T T^{-1} ReLU(W x + b)``.

    ``T = diag(t)``, ``t_i = sum_j |W W^T|_{ij} q_j / q_i``, ``q = exp(log_q)`` with ``log_q`` learnable
    (so ``q > 0``). 1-Lipschitz for every ``W`` and ``q``, in training and evaluation mode alike (``T`` is
    computed exactly from ``W`` at each forward: no norm estimate).

    Args:
        features: ``d``, size of the input and output.
        inner_features: ``m``, number of rows of ``W`` (default ``d``).
        bias: learn ``b`` (shape ``(m,)``).

    Shape: input ``(..., d)``, output ``(..., d)``.
    """

    def __init__(
        self, features: int, inner_features: Optional[int] = None, bias: bool = True, device=None, dtype=None
    ):
        super().__init__()
        inner_features = features if inner_features is None else inner_features
        if features < 1 or inner_features < 1:
            raise ValueError(
                f"features and inner_features must be positive, got {features}, {inner_features}"
            )
        self.features, self.inner_features = int(features), int(inner_features)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(inner_features, features, **kw))
        self.bias = nn.Parameter(torch.empty(inner_features, **kw)) if bias else None
        self.log_q = nn.Parameter(torch.empty(inner_features, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            b = 1.0 / math.sqrt(self.features)
            nn.init.uniform_(self.bias, -b, b)
        nn.init.zeros_(self.log_q)  # q = 1 at start: the AOL choice of T

    def q(self) -> torch.Tensor:
        """The positive weights ``q = exp(log_q)``, shape ``(m,)``."""
        return self.log_q.exp()

    def t(self) -> torch.Tensor:
        """The diagonal of ``T``, shape ``(m,)`` (differentiable in ``W`` and ``q``)."""
        return sll_t(self.weight, self.q())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_last_dim(self, x, self.features, "features")
        return sll_residual(x, self.weight, self.bias, self.t())

    def contraction_ratio(self) -> float:
        """``r = ||T^{-1/2} W W^T T^{-1/2}||_2`` in float64 from the ``t`` the forward uses (``<= 1``)."""
        with torch.no_grad():
            w = self.weight.detach().double()
            s = self.t().detach().double().rsqrt()
            b = s[:, None] * w
            gram = b @ b.T if b.shape[0] <= b.shape[1] else b.T @ b
            return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0))

    def lipschitz_bound(self) -> float:
        r"""A guaranteed upper bound ``max(1, 2 r - 1)`` of the layer's constant (eigenvalues of the
        Jacobian lie in ``[1 - 2r, 1]``), with ``r`` from :meth:`contraction_ratio` plus a margin."""
        r = self.contraction_ratio() * (1 + ROUNDING_MARGIN)
        return max(1.0, 2.0 * r - 1.0)

    def extra_repr(self) -> str:
        return f"{self.features}, inner_features={self.inner_features}, bias={self.bias is not None}"
