r"""Normalised linear layers: a free weight matrix rescaled so that the layer is 1-Lipschitz.

* :class:`SpectralNormLinear` (Miyato et al., 2018): ``y = (W / ||W||_2) x + b``. As for the CPL
  layers (:mod:`cpl_mini.layers`), ``||W||_2`` is one power-iteration step per training forward
  (persistent vector, differentiable estimate, a *lower* estimate) and, in evaluation mode, a cached
  guaranteed upper bound (exact float64 norm plus a rounding margin): the eval-mode layer is
  provably 1-Lipschitz. ``eval_norm="power"`` gives the usual (unsound) implementation, for comparison.
* :class:`AOLLinear` (Prach & Lampert, 2022, "almost orthogonal layer"):

  .. math::  y = W \operatorname{diag}(d)\, x + b, \qquad
             d_j = \Big(\sum_i |W^\top W|_{ij}\Big)^{-1/2},

  1-Lipschitz for every ``W`` with no norm computation: ``diag(d) W^T W diag(d) <= I`` because
  ``W^T W <= diag(sum_i |W^T W|_{ij})`` (Gershgorin's theorem on a symmetric matrix).

Both layers have a ``lipschitz_bound()`` method (a guaranteed upper bound, read by
:func:`cpl_mini.bounds.lipschitz_upper_bound`) computed in float64 from the matrix the layer applies.
"""

import math
from fractions import Fraction
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .precision import cast_down, check_last_dim, float64_device, float_up
from .spectral import OperatorNormModule, dense_spectral_norm_upper

__all__ = ["SpectralNormLinear", "AOLLinear", "aol_scaling"]


def _init_linear(weight, bias, in_features):
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # as nn.Linear
    if bias is not None:
        b = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(bias, -b, b)


class SpectralNormLinear(OperatorNormModule):
    r"""Spectrally normalised linear layer ``y = (W / sigma) x + b`` with ``sigma ~ ||W||_2``.

    ``sigma`` comes from :class:`~cpl_mini.spectral.OperatorNormModule`: training mode, one
    power-iteration step with a persistent vector ``u`` (the estimate is differentiable in ``W``, as in
    Miyato et al.); evaluation mode, a cached norm, recomputed whenever ``W`` changes, which with
    ``eval_norm="sound"`` (default) is a guaranteed upper bound of ``||W||_2``. In that mode the divisor
    is raised by ``(sqrt(min(out, in)) + 1)`` units of the weight's precision and rounded up, so that
    the rounded matrix ``fl(W / sigma)`` the forward applies has norm at most 1: its error ``E`` has
    entries at most ``eps |W_ij| / sigma``, so ``||E||_2 <= ||E||_F <= eps sqrt(rank) ||W||_2 / sigma``.

    Args:
        in_features, out_features: ``W`` has shape ``(out_features, in_features)``.
        bias: learn ``b`` (shape ``(out_features,)``).
        eval_norm: ``"sound"`` (default) or ``"power"`` (``n_eval_iter`` power iterations: a lower
            estimate, the usual implementation; its certificates are not sound).

    Shape: input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: Optional[int] = None,
        bias: bool = True,
        eval_norm: str = "sound",
        n_eval_iter: int = 100,
        device=None,
        dtype=None,
    ):
        super().__init__(eval_norm, n_eval_iter)
        out_features = in_features if out_features is None else out_features
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features and out_features must be positive, got {in_features}, {out_features}"
            )
        self.in_features, self.out_features = int(in_features), int(out_features)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.register_buffer("u", torch.randn(1, in_features, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_linear(self.weight, self.bias, self.in_features)

    # the operator W and its adjoint, for the power iteration of the base class
    def operator(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``W x`` for ``x`` of shape ``(..., in)``."""
        return F.linear(x, self.weight if weight is None else weight)

    def adjoint(self, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``W^T y`` for ``y`` of shape ``(..., out)``."""
        return F.linear(y, (self.weight if weight is None else weight).t())

    def norm_upper_bound(self) -> torch.Tensor:
        """Exact ``||W||_2`` in float64 times ``1 + ROUNDING_MARGIN``."""
        return dense_spectral_norm_upper(self.weight)

    def _compute_dtype(self):
        return self.weight.dtype if self.weight.dtype in (torch.float32, torch.float64) else torch.float32

    def _eval_divisor(self):
        """The evaluation-mode divisor: the cached norm, raised (sound mode) for the rounding of W / sigma."""
        sigma = Fraction(float(self.eval_spectral_norm()))
        if self.eval_norm == "sound":
            rank = min(self.weight.shape)
            slack = (Fraction(math.nextafter(math.sqrt(rank), math.inf)) + 1) * Fraction(
                torch.finfo(self.weight.dtype).eps
            )
            sigma = sigma * (1 + slack)
        up = torch.tensor(
            float_up(max(sigma, Fraction(1e-12))),
            dtype=torch.float64,
            device=float64_device(self.weight.device),
        )
        return (-cast_down(-up, self._compute_dtype())).to(self.weight.device)  # rounded up

    def weight_matrix(self) -> torch.Tensor:
        """``W / sigma`` with the norm of the current mode (training: the power estimate, which also
        advances the persistent vector; evaluation: the cached norm, see above). Shape ``(out, in)``."""
        if self.training:
            sigma = self.spectral_norm().to(device=self.weight.device, dtype=self._compute_dtype())
            return self.weight / sigma.clamp_min(1e-12)
        return self.weight / self._eval_divisor()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_last_dim(self, x, self.in_features)
        return F.linear(x, self.weight_matrix().to(self.weight.dtype), self.bias)

    def lipschitz_bound(self) -> float:
        """A guaranteed upper bound of the eval-mode layer's constant: ``||W / sigma_eval||_2`` computed
        in float64 (plus a relative margin) from the matrix the eval-mode forward applies. At most
        ``1 + 1e-9`` with ``eval_norm="sound"``; above 1 when the eval norm underestimates ``||W||``."""
        with torch.no_grad():
            matrix = (self.weight / self._eval_divisor()).to(self.weight.dtype)
            return float(dense_spectral_norm_upper(matrix))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, eval_norm={self.eval_norm!r}"
        )


def aol_scaling(weight: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    r"""The AOL column scaling ``d_j = (sum_i |W^T W|_{ij})^{-1/2}`` of ``W`` ``(out, in)``; shape ``(in,)``.

    Row sums below ``eps`` are raised to ``eps`` (a zero column of ``W`` then stays zero; lowering
    ``d_j`` never breaks the bound, since ``W diag(d') = W diag(d) diag(d'/d)`` with ``d'/d <= 1``).
    """
    if weight.dim() != 2:
        raise ValueError(f"aol_scaling expects a matrix (out, in), got shape {tuple(weight.shape)}")
    gram = weight.t() @ weight  # (in, in)
    return gram.abs().sum(dim=0).clamp_min(eps).rsqrt()


class AOLLinear(nn.Module):
    r"""Almost-orthogonal layer (AOL, Prach & Lampert 2022): ``y = W diag(d) x + b``.

    .. math::  d_j = \Big(\sum_i |W^\top W|_{ij}\Big)^{-1/2}

    ``||W diag(d)||_2 <= 1`` for every ``W``; the bound is attained (``W diag(d)`` orthogonal) when
    the columns of ``W`` are orthogonal. No norm estimate, no power iteration, same in both modes.

    Args:
        in_features, out_features: ``W`` has shape ``(out_features, in_features)``.
        bias: learn ``b``.

    Shape: input ``(..., in_features)``, output ``(..., out_features)``.
    """

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
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_linear(self.weight, self.bias, self.in_features)

    def scaling(self) -> torch.Tensor:
        """The vector ``d`` (shape ``(in_features,)``)."""
        return aol_scaling(self.weight)

    def weight_matrix(self) -> torch.Tensor:
        """``W diag(d)``, shape ``(out_features, in_features)``: the matrix the layer applies."""
        return self.weight * self.scaling()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_last_dim(self, x, self.in_features)
        return F.linear(x, self.weight_matrix(), self.bias)

    def lipschitz_bound(self) -> float:
        """A guaranteed upper bound: ``||W diag(d)||_2`` in float64 plus a margin (<= 1 up to rounding)."""
        with torch.no_grad():
            return float(dense_spectral_norm_upper(self.weight_matrix()))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )
