r"""Normalised linear and convolutional layers: a free weight rescaled so that the layer is 1-Lipschitz.

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

* :class:`AOLConv2d` (Prach & Lampert, 2022, Theorem 2): the same rescaling for a convolution with
  kernel ``K`` of shape ``(out, in, k, k)``, with the *gram kernel* in place of ``W^T W``:

  .. math::  y = \operatorname{conv2d}(x, K \operatorname{diag}(d), b), \qquad
             d_j = \Big(\sum_i \sum_{u, v} |K^\top \star K|_{ij}(u, v)\Big)^{-1/2},

  ``(K^T * K)_{ij}(u, v) = sum_c sum_{s, t} K_{c i}(s + u, t + v) K_{c j}(s, t)``, shape
  ``(in, in, 2k - 1, 2k - 1)`` (:func:`conv_gram_kernel`): the kernel of ``A^T A`` for the
  convolution ``A``. 1-Lipschitz for every input size and every stride (see :class:`AOLConv2d`).

The layers have a ``lipschitz_bound()`` method (a guaranteed upper bound, read by
:func:`cpl_mini.bounds.lipschitz_upper_bound`) computed in float64 from what the layer applies.
"""

import math
from fractions import Fraction
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .precision import (
    as_float64,
    cast_down,
    check_last_dim,
    float64_device,
    float_up,
    gamma,
    ieee_precision,
    sqrt_up,
)
from .spectral import OperatorNormModule, dense_spectral_norm_upper

__all__ = [
    "SpectralNormLinear",
    "AOLLinear",
    "aol_scaling",
    "AOLConv2d",
    "aol_conv_scaling",
    "conv_gram_kernel",
    "conv_gram_kernel_abs_upper",
]


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


# ------------------------------------------------------------------------------------- convolutions
def _check_conv_kernel(kernel, name):
    if kernel.dim() != 4:
        raise ValueError(
            f"{name} expects a conv2d kernel of shape (out_channels, in_channels, k_h, k_w), "
            f"got {tuple(kernel.shape)}"
        )


def conv_gram_kernel(kernel: torch.Tensor) -> torch.Tensor:
    r"""The gram kernel ``K^T * K`` of a convolution: the kernel of ``A^T A``, ``A = conv2d(., K)``.

    .. math::  (K^\top \star K)_{ij}(u, v) = \sum_c \sum_{s, t} K_{c i}(s + u, t + v)\, K_{c j}(s, t),

    for shifts ``|u| < k_h``, ``|v| < k_w``; computed as ``conv2d(K^T, K^T, padding=(k_h-1, k_w-1))`` with
    ``K^T = K.transpose(0, 1)``, in ``K``'s dtype and differentiable. On the whole plane (no boundary)
    ``A^T A`` is the convolution with this kernel; with zero padding it is at most a compression of it.
    The gram over the *output* channels (the kernel of ``A A^T``) is ``conv_gram_kernel(K.transpose(0, 1))``.

    Args:
        kernel: ``(out, in, k_h, k_w)``.
    Returns:
        ``(in, in, 2 k_h - 1, 2 k_w - 1)``.
    """
    _check_conv_kernel(kernel, "conv_gram_kernel")
    kt = kernel.transpose(0, 1)
    return F.conv2d(kt, kt, padding=(kernel.shape[2] - 1, kernel.shape[3] - 1))


def conv_gram_kernel_abs_upper(kernel: torch.Tensor) -> torch.Tensor:
    r"""An entrywise guaranteed upper bound of ``|K^T * K|`` (:func:`conv_gram_kernel`), float64.

    Each entry is a dot product of length ``n = out * k_h * k_w``; computed in float64 in any order its error
    is at most ``gamma_n (|K|^T * |K|)`` (Higham, Lemma 3.1 and section 3.1), so
    ``|fl(G)| + 2 gamma_n fl(|K|^T * |K|)`` bounds ``|G|`` (the factor 2 covers the rounding of the second
    gram; the two final operations are left to the caller's margin). Detached, no autocast, no TF32.
    """
    _check_conv_kernel(kernel, "conv_gram_kernel_abs_upper")
    k = as_float64(kernel)
    n = k.shape[0] * k.shape[2] * k.shape[3]
    with torch.no_grad(), torch.autocast(k.device.type, enabled=False), ieee_precision():
        return conv_gram_kernel(k).abs() + 2 * gamma(n) * conv_gram_kernel(k.abs())


def aol_conv_scaling(kernel: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    r"""The AOL scaling of a convolution, ``d_j = (sum_i sum_{u,v} |K^T * K|_{ij}(u, v))^{-1/2}``.

    Args:
        kernel: ``K``, shape ``(out, in, k_h, k_w)``.
        eps: sums below ``eps`` are raised to it (as in :func:`aol_scaling`; a lower ``d_j`` never
            breaks the bound).
    Returns:
        ``d``, shape ``(in,)``, differentiable in ``K``.
    """
    _check_conv_kernel(kernel, "aol_conv_scaling")
    return conv_gram_kernel(kernel).abs().sum(dim=(0, 2, 3)).clamp_min(eps).rsqrt()


class AOLConv2d(nn.Module):
    r"""Convolutional almost-orthogonal layer (Prach & Lampert 2022, Theorem 2):
    ``y = conv2d(x, K diag(d), b, stride, padding)`` with ``d`` = :func:`aol_conv_scaling` of ``K``.

    **Why it is 1-Lipschitz, for every input size, padding and stride.** Let ``A`` be the stride-1
    zero-padded convolution with ``K`` on ``in x H x W`` images, and ``S_j = sum_{i,u,v} |G_{ij}(u,v)|``
    with ``G = K^T * K``. ``A = P_out C P_in`` where ``C`` is the convolution on the whole plane, ``P_in``
    embeds the image and ``P_out`` restricts the output, so ``A^T A <= P_in^T C^T C P_in =: M``
    (``P_out^T P_out <= I``). ``M`` has entries ``G_{ij}(x - x')`` between pixels ``x, x'`` of the image,
    so the row of channel ``j`` at a pixel holds a subset of the entries of ``G_{j.}``:
    ``diag(S) - M`` is diagonally dominant (its diagonal ``S_j - G_{jj}(0)`` is at least its off-diagonal
    mass), hence
    positive semi-definite (Gershgorin), and ``D A^T A D <= D diag(S) D = I``. A stride ``s`` keeps the
    outputs at ``s``-multiples: a coordinate subsampling ``R`` of the stride-1 output, ``||R A D|| <= 1``.

    **The bound.** :meth:`lipschitz_bound` applies the same Gershgorin argument to the kernel the forward
    applies, ``K' = fl(K diag(d))``, with the similarity ``diag(1/d)``:
    ``||A'||^2 <= max_j sum_{i,u,v} |G'_{ji}(u,v)| d_j / d_i`` (about 1; no input size needed),
    computed in float64 with its rounding errors bounded (:func:`conv_gram_kernel_abs_upper`, Higham's
    ``gamma``), square root rounded up.

    Args:
        in_channels, out_channels: ``K`` has shape ``(out_channels, in_channels, k, k)``.
        kernel_size: ``k``.
        stride: ``s >= 1`` (``s > 1``: a 1-Lipschitz down-sampling step).
        bias: learn ``b`` (shape ``(out_channels,)``).
        padding: zero padding, default ``k // 2`` (same size for odd ``k`` and ``s = 1``).

    Shape: input ``(N, in, H, W)``, output ``(N, out, H', W')``,
    ``H' = floor((H + 2 p - k) / s) + 1``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        bias: bool = True,
        padding: Optional[int] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if in_channels < 1 or out_channels < 1 or kernel_size < 1 or stride < 1:
            raise ValueError(
                "in_channels, out_channels, kernel_size and stride must be positive, got "
                f"{in_channels}, {out_channels}, {kernel_size}, {stride}"
            )
        padding = kernel_size // 2 if padding is None else padding
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = int(kernel_size), int(stride), int(padding)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_linear(self.weight, self.bias, self.in_channels * self.kernel_size**2)  # as nn.Conv2d

    def scaling(self) -> torch.Tensor:
        """The vector ``d`` (shape ``(in_channels,)``)."""
        return aol_conv_scaling(self.weight)

    def rescaled_kernel(self) -> torch.Tensor:
        """``K diag(d)`` (shape ``(out, in, k, k)``): the kernel the layer applies."""
        return self.weight * self.scaling()[:, None, None]

    def _check_input(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"AOLConv2d expects inputs of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}; "
                "add a batch dimension with x.unsqueeze(0) for a single image, or build the layer with "
                f"in_channels={x.shape[1] if x.dim() == 4 else '?'}."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return F.conv2d(x, self.rescaled_kernel(), self.bias, stride=self.stride, padding=self.padding)

    def lipschitz_bound(self) -> float:
        """A guaranteed upper bound of the layer's constant on inputs of every size (about 1; see above)."""
        with torch.no_grad():
            applied = self.rescaled_kernel()
            d = as_float64(self.scaling())
        w = torch.where(d > 0, d, torch.ones_like(d))  # any positive similarity is sound
        gram = conv_gram_kernel_abs_upper(applied).sum(dim=(2, 3))  # (in, in): rows j, columns i
        rows = (gram @ (1 / w)) * w
        terms = gram.shape[1] * (2 * self.kernel_size - 1) ** 2 + 6  # additions and products per row
        square = Fraction(float(rows.max())) * (1 + Fraction(gamma(terms)))
        return sqrt_up(square)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}"
        )
