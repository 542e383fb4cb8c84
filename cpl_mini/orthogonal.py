r"""Orthogonal layers: discretisations of the conservative flow ``dx/dt = A x``, ``A`` skew-symmetric.

For a skew-symmetric ``A`` (``A^T = -A``) the field ``F(x) = A x`` is conservative:
``d/dt ||x||^2 = 2 <A x, x> = 0``. Its exact flow over a time ``t`` is the orthogonal matrix
``exp(t A)``, and two classical ways of turning ``A`` into an orthogonal matrix are two ways of
discretising that flow:

.. math::  \exp(A) \quad\text{(exact flow for time 1)}, \qquad
           \operatorname{cay}(A) = (I - A)(I + A)^{-1} \quad\text{(Cayley transform)}.

The Cayley transform is one Crank-Nicolson (implicit midpoint) step of ``dx/dt = -2 A x`` with step 1:
``x_1 - x_0 = -A (x_0 + x_1)`` gives ``x_1 = (I + A)^{-1}(I - A) x_0``, and ``(I - A)`` and
``(I + A)^{-1}`` commute. It agrees with the exact flow ``exp(-2A)`` up to ``O(||A||^3)``.
Both are orthogonal for every skew ``A``: ``Q^T Q = I``, so the layers below are isometries.

Layers (parameter: an unconstrained square matrix ``P``; ``A = P - P^T``):

* :class:`CayleyLinear`    ``y = cay(A) x + b`` (Trockman & Kolter, 2021, dense case),
* :class:`MatrixExpLinear` ``y = exp(A) x + b`` (the exact flow; Singla & Feizi's SOC truncates the
  series of the convolutional version),
* :class:`MaxMin`          the pairwise sort activation of Anil et al. (2019), gradient-norm preserving,
  the usual non-linearity between orthogonal layers.

Rectangular use: for ``in_features != out_features`` the layer works in dimension
``d = max(in, out)``: it zero-pads ``x`` to ``d`` coordinates, applies the ``d x d`` orthogonal
matrix, and keeps the first ``out_features`` coordinates. Its matrix is the top-left
``(out, in)`` block of ``Q``: orthonormal columns when ``in < out`` (an isometry), orthonormal rows
when ``in > out`` (a projection composed with an isometry); in both cases ``||Q_{out,in}||_2 <= 1``.
"""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .precision import check_last_dim
from .spectral import dense_spectral_norm_upper

__all__ = ["skew", "cayley", "CayleyLinear", "MatrixExpLinear", "MaxMin"]


def skew(P: torch.Tensor) -> torch.Tensor:
    """The skew-symmetric part ``P - P^T`` of a square matrix ``(..., d, d)`` (no factor 1/2)."""
    if P.dim() < 2 or P.shape[-1] != P.shape[-2]:
        raise ValueError(f"skew expects square matrices (..., d, d), got shape {tuple(P.shape)}")
    return P - P.transpose(-1, -2)


def cayley(A: torch.Tensor) -> torch.Tensor:
    r"""Cayley transform ``(I - A)(I + A)^{-1}`` of a skew-symmetric ``A`` of shape ``(..., d, d)``.

    ``I + A`` is invertible because the eigenvalues of a real skew matrix are purely imaginary. The
    two factors commute, so the result is computed as ``solve(I + A, I - A) = (I + A)^{-1}(I - A)``.
    """
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"cayley expects square matrices (..., d, d), got shape {tuple(A.shape)}")
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(eye + A, eye - A)


class _SkewParametrizedLinear(nn.Module):
    """``y = Q[:out, :in] x + b`` with ``Q = orth(P - P^T)`` orthogonal; subclasses define ``orth``."""

    def __init__(
        self, in_features: int, out_features: Optional[int] = None, bias: bool = True, device=None, dtype=None
    ):
        super().__init__()
        out_features = in_features if out_features is None else out_features
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features and out_features must be positive, got {in_features}, {out_features}"
            )
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.dim = max(self.in_features, self.out_features)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.dim, self.dim, **kw))
        self.bias = nn.Parameter(torch.empty(self.out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # P ~ U(-1/sqrt(d), 1/sqrt(d)) / 2: the skew matrix A = P - P^T has entries of size ~1/sqrt(d),
        # so the orthogonal matrix starts neither at the identity nor far from it.
        bound = 0.5 / math.sqrt(self.dim)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            b = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -b, b)

    def _orth(self, A):
        raise NotImplementedError

    def skew_matrix(self) -> torch.Tensor:
        """``A = P - P^T``, shape ``(d, d)``, ``d = max(in_features, out_features)``."""
        return skew(self.weight)

    def orthogonal_matrix(self) -> torch.Tensor:
        """The full ``(d, d)`` orthogonal matrix ``Q`` (differentiable in the weight)."""
        return self._orth(self.skew_matrix())

    def weight_matrix(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` matrix the layer applies: the top-left block of ``Q``."""
        return self.orthogonal_matrix()[: self.out_features, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_last_dim(self, x, self.in_features)
        return F.linear(x, self.weight_matrix(), self.bias)

    def lipschitz_bound(self) -> float:
        """A guaranteed upper bound of the Lipschitz constant: the float64 norm of the matrix actually
        applied (1 up to the rounding of ``Q``, plus a relative margin)."""
        with torch.no_grad():
            return float(dense_spectral_norm_upper(self.weight_matrix()))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class CayleyLinear(_SkewParametrizedLinear):
    r"""Orthogonal layer from the Cayley transform: ``y = Q x + b``, ``Q = (I - A)(I + A)^{-1}``.

    ``A = P - P^T`` with ``P`` the ``(d, d)`` parameter ``weight``, ``d = max(in, out)``. ``Q`` is one
    Crank-Nicolson step of the conservative flow ``dx/dt = -2 A x``; it is orthogonal for every ``P``
    (Trockman & Kolter, 2021). Rectangular shapes use the top-left block of ``Q`` (zero-pad the
    input, keep the first outputs).

    Shape: input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def _orth(self, A):
        return cayley(A)


class MatrixExpLinear(_SkewParametrizedLinear):
    r"""Orthogonal layer from the matrix exponential: ``y = exp(A) x + b``, ``A = P - P^T``.

    ``exp(t A) x`` is the exact solution at time ``t`` of ``dx/dt = A x``, a conservative flow, so
    ``exp(A)`` is orthogonal with determinant 1 (``torch.linalg.matrix_exp``). Singla & Feizi's
    SOC layer is the convolutional analogue with the series truncated.

    Shape: input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def _orth(self, A):
        return torch.linalg.matrix_exp(A)

    def flow_matrix(self, t: float = 1.0) -> torch.Tensor:
        """``exp(t A)``, shape ``(d, d)``: the flow of ``dx/dt = A x`` at time ``t`` (``t = 1``: the
        layer)."""
        return torch.linalg.matrix_exp(t * self.skew_matrix())


class MaxMin(nn.Module):
    r"""Pairwise sort (GroupSort with groups of 2, Anil et al., 2019): ``(a, b) -> (max(a, b), min(a, b))``.

    The features along ``dim`` are split in two halves ``a = x[:k]``, ``b = x[k:]`` and the output is
    ``cat(max(a, b), min(a, b))``. On each region the map is a permutation, so it is 1-Lipschitz and
    its Jacobian is orthogonal wherever it exists (gradient-norm preserving, unlike ReLU).

    Shape: any, with an even size along ``dim`` (default the last dimension).
    """

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = int(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[self.dim] if x.dim() else 0
        if n % 2:
            raise ValueError(
                f"MaxMin needs an even number of features along dim {self.dim}, got shape "
                f"{tuple(x.shape)}; use an even width."
            )
        a, b = x.chunk(2, dim=self.dim)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=self.dim)

    def lipschitz_bound(self) -> float:
        return 1.0

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
