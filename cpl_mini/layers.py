r"""The Convex Potential Layer (CPL) and the pieces of a 1-Lipschitz network.

A Convex Potential Layer is one explicit Euler step of the gradient flow of the convex potential
:math:`f(x) = \sum_i \psi(w_i^\top x + b_i)` with :math:`\psi' = \mathrm{ReLU}`:

.. math::  z = x - h\, W^\top \mathrm{ReLU}(W x + b), \qquad h = 2 / \|W\|_2^2 ,

which is 1-Lipschitz for any ``W`` because ``grad f`` is ``||W||^2``-smooth and co-coercive. The step
itself, for given ``W``, ``b`` and ``h``, is the function :func:`convex_potential_linear` (dense) or
:func:`convex_potential_conv2d` (convolution); the layers compute ``h`` and call them.

How ``||W||_2`` is obtained decides whether the layer is *provably* 1-Lipschitz (the machinery is
:class:`~cpl_mini.spectral.OperatorNormModule`'s):

* training mode: one power-iteration step per forward with a persistent vector (a buffer); the
  estimate is differentiable with respect to ``W`` (no gradient through the vector update);
* evaluation mode: a cached norm, recomputed whenever the weight differs from the copy it was
  computed from, however the weight changed. With ``eval_norm="sound"`` (default) the norm is a
  guaranteed upper bound (exact SVD for dense layers, :func:`~cpl_mini.conv_spectral_norm_upper`
  for convolutions) and the step ``h = 2 / sigma^2`` is rounded *down* to the dtype it is applied
  in, so the eval-mode layer is 1-Lipschitz, not approximately so.
  ``eval_norm="power"`` reproduces the official evaluation: ``n_eval_iter`` (100) power iterations
  from the persistent vector (advancing it), the estimate ``<W u, v>`` and ``h = 2 / (sigma^2 + 1e-4)``.
  A lower estimate of the norm: only for comparisons, its certificates are not sound.
"""

import math
from fractions import Fraction
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bounds import lipschitz_upper_bound
from .precision import (
    as_float64,
    cast_down,
    check_last_dim,
    float64_device,
    float_down,
    float_up,
    gamma,
    next_up,
)
from .spectral import OperatorNormModule, conv_spectral_norm_upper, dense_spectral_norm_upper

__all__ = [
    "convex_potential_linear",
    "convex_potential_conv2d",
    "ConvexPotentialLinear",
    "ConvexPotentialConv2d",
    "ChannelPad",
    "LipschitzAvgPool2d",
    "FirstCoordinates",
    "RowNormalizedLinear",
    "lipschitz_upper_bound",
]

#: The official code's ``epsilon`` in ``h = 2 / (sigma^2 + epsilon)`` (used with ``eval_norm="power"``).
OFFICIAL_EPSILON = 1e-4

Step = Union[float, torch.Tensor]


def _check_step(step, name):
    if torch.is_tensor(step) and step.dim() != 0:
        raise ValueError(
            f"{name}: step must be a float or a 0-dim tensor, got a tensor of shape {tuple(step.shape)}; "
            "use torch.func.vmap to apply several steps"
        )


def convex_potential_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], step: Step
) -> torch.Tensor:
    r"""The dense CPL step ``z = x - h W^T ReLU(W x + b)``, for given ``W``, ``b`` and ``h``.

    .. math::  z = x - h\, W^\top \mathrm{ReLU}(W x + b)

    Args:
        x: input ``(..., d)``.
        weight: ``W``, shape ``(m, d)``.
        bias: ``b``, shape ``(m,)``, or ``None``.
        step: ``h``, a float or a 0-dim tensor (1-Lipschitz for ``0 <= h <= 2 / ||W||_2^2``).

    Returns:
        ``z``, shape ``(..., d)``. Differentiable in every argument; a pure function, usable in
        ``torch.func`` transforms. :class:`ConvexPotentialLinear` is this function with
        ``h = 2 / ||W||^2``.

    Examples:
        >>> import torch
        >>> from cpl_mini import ConvexPotentialLinear, convex_potential_linear
        >>> layer = ConvexPotentialLinear(3).eval()
        >>> x = torch.randn(2, 3)
        >>> torch.equal(layer(x), convex_potential_linear(x, layer.weight, layer.bias, layer.step_size()))
        True
    """
    if weight.dim() != 2 or x.shape[-1:] != weight.shape[1:]:
        raise ValueError(
            f"convex_potential_linear: weight must be (m, d) and x (..., d), got weight "
            f"{tuple(weight.shape)} and x {tuple(x.shape)}"
        )
    _check_step(step, "convex_potential_linear")
    return x - step * F.linear(F.relu(F.linear(x, weight, bias)), weight.t())


def convex_potential_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    step: Step,
    padding: Union[None, int, Sequence[int]] = None,
) -> torch.Tensor:
    r"""The convolutional CPL step, for given ``K``, ``b`` and ``h``:

    .. math::  z = x - h\, \mathrm{conv\_transpose2d}(\mathrm{ReLU}(\mathrm{conv2d}(x, K, b)), K) ,

    both with stride 1 and zero padding ``padding``, so ``conv_transpose2d(., K)`` is the exact adjoint
    ``K^T`` of ``conv2d(., K)`` and ``z`` has the shape of ``x`` for an odd kernel and ``padding = k // 2``.

    Args:
        x: input ``(N, C, H, W)`` (or ``(C, H, W)``).
        weight: ``K``, shape ``(m, C, k, k)``.
        bias: ``b``, shape ``(m,)``, or ``None``.
        step: ``h``, a float or a 0-dim tensor (1-Lipschitz for ``0 <= h <= 2 / ||K||_2^2``, the norm
            of the convolution on inputs of ``x``'s size).
        padding: zero padding (int or pair); default ``(k_h // 2, k_w // 2)`` ("same").

    Returns:
        ``z``, the shape of ``x``. Differentiable in every argument; a pure function, usable in
        ``torch.func`` transforms. :class:`ConvexPotentialConv2d` is this function with
        ``h = 2 / ||K||^2``.
    """
    if weight.dim() != 4 or x.dim() not in (3, 4) or x.shape[-3] != weight.shape[1]:
        raise ValueError(
            f"convex_potential_conv2d: weight must be (m, C, k, k) and x (N, C, H, W), got weight "
            f"{tuple(weight.shape)} and x {tuple(x.shape)}"
        )
    _check_step(step, "convex_potential_conv2d")
    if padding is None:
        padding = (weight.shape[2] // 2, weight.shape[3] // 2)
    pre = F.conv2d(x, weight, bias, padding=padding)
    return x - step * F.conv_transpose2d(F.relu(pre), weight, padding=padding)


def _autocast_dtype(kind):
    """The autocast dtype on devices of type ``kind``, or None where autocast is off."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    if kind == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if kind == "cuda" and torch.is_autocast_enabled() else None


def _update_dtype(x, weight):
    """The dtype ``W^T ReLU(W x + b)`` is computed in: the autocast dtype where autocast casts the
    inputs (float32 or lower precision), else the dtype of ``x`` and ``W``."""
    autocast = _autocast_dtype(x.device.type)
    if autocast is not None and x.dtype != torch.float64 and weight.dtype != torch.float64:
        return autocast
    return torch.promote_types(x.dtype, weight.dtype)


class _ConvexPotentialBase(OperatorNormModule):
    """The CPL step and forward, on top of the operator-norm machinery."""

    def __init__(self, eval_norm: str = "sound", n_eval_iter: int = 100, step_scale: float = 1.0):
        super().__init__(eval_norm, n_eval_iter)
        #: multiplies the step ``h = 2 / ||W||^2``; above 1 the layer is no longer 1-Lipschitz
        #: (kept for the book's counter-examples and the tests that show the checks can fail).
        self.step_scale = float(step_scale)
        self._step_cache = {}

    def _step(self, x, step):
        """The CPL step with step ``step`` (the functional form of the layer)."""
        raise NotImplementedError

    def _check_input(self, x):
        raise NotImplementedError

    # -- the step ------------------------------------------------------------------------------
    def _step_value(self, sigma: float) -> float:
        r"""``h = step_scale * 2 / (sigma^2 + epsilon)`` computed exactly and rounded down to a float
        (``epsilon`` = :data:`OFFICIAL_EPSILON` with ``eval_norm="power"``, else 0; the denominator is at
        least ``1e-12``, as in training)."""
        eps = Fraction(OFFICIAL_EPSILON) if self.eval_norm == "power" else Fraction(0)
        denominator = max(Fraction(sigma) ** 2 + eps, Fraction(1e-12))
        return float_down(Fraction(self.step_scale) * 2 / denominator)

    def eval_step(self) -> float:
        """The evaluation-mode step ``h`` as a float64 number, before it is rounded down to the dtype the
        forward applies it in (so every ``h`` the forward uses is at most this one)."""
        return self._step_value(float(self.eval_spectral_norm()))

    def _eval_step_tensor(self, dtype, device):
        sigma = float(self.eval_spectral_norm())
        key = (sigma, self.step_scale, self.eval_norm, dtype, device)
        h = self._step_cache.get(key)
        if h is None:
            h64 = torch.tensor(self._step_value(sigma), dtype=torch.float64, device=float64_device(device))
            h = cast_down(h64, dtype).to(device)
            if len(self._step_cache) > 16:
                self._step_cache.clear()
            self._step_cache[key] = h
        return h

    def _compute_dtype(self):
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    def step_size(self, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The step ``h`` (0-dim tensor, float32 or float64, never lower precision).

        Without ``sigma``: the step the forward uses now; in training mode ``step_scale * 2 / sigma^2``
        with the differentiable power estimate (``u`` advances), in evaluation mode the cached step
        rounded down (:meth:`eval_step`). With ``sigma``: the evaluation formula applied to it.
        """
        dtype = self._compute_dtype()
        if sigma is None and self.training:
            sigma = self.spectral_norm().to(device=self.weight.device, dtype=dtype)
            return self.step_scale * 2.0 / sigma.square().clamp_min(1e-12)
        if sigma is None:
            return self._eval_step_tensor(dtype, self.weight.device)
        h64 = torch.tensor(
            self._step_value(float(sigma)), dtype=torch.float64, device=float64_device(self.weight.device)
        )
        return cast_down(h64, dtype).to(self.weight.device)

    def lipschitz_bound(self) -> float:
        r"""A guaranteed upper bound of this layer's Lipschitz constant in evaluation mode.

        The Jacobian is ``I - h W^T D W`` with ``D`` diagonal in ``[0, 1]``; its eigenvalues lie in
        ``[1 - h ||W||^2, 1]``, so the constant is at most ``max(1, h ||W||^2 - 1)``, computed exactly
        (fractions) with ``||W||`` the sound bound and ``h`` :meth:`eval_step`, then rounded up. It is
        exactly 1 for the default (sound) layer.
        """
        sigma_up = Fraction(float(self.sound_spectral_norm()))
        return max(1.0, float_up(Fraction(self.eval_step()) * sigma_up**2 - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.training:
            h = self.step_size()
        else:  # rounded down to the dtype h * W^T ReLU(W x + b) is computed in
            h = self._eval_step_tensor(_update_dtype(x, self.weight), x.device)
        return self._step(x, h)

    def extra_repr(self) -> str:
        scale = f", step_scale={self.step_scale}" if self.step_scale != 1 else ""
        return f"eval_norm={self.eval_norm!r}" + scale


class ConvexPotentialLinear(_ConvexPotentialBase):
    r"""Dense Convex Potential Layer ``z = x - (2/||W||^2) W^T ReLU(W x + b)``.

    Args:
        features: size ``d`` of the input and output.
        inner_features: number ``m`` of rows of ``W`` (``(m, d)``); default ``features``.
        bias: learn ``b`` (shape ``(m,)``).
        eval_norm: ``"sound"`` (exact norm in float64 plus a rounding margin, default) or ``"power"``
            (the official evaluation, unsound).
        n_eval_iter: power iterations for ``eval_norm="power"``.
        step_scale: multiplies ``h`` (1 = the paper's layer).

    Shape: input ``(..., d)``, output ``(..., d)``.

    Examples:
        >>> import torch
        >>> from cpl_mini import ConvexPotentialLinear
        >>> layer = ConvexPotentialLinear(8, inner_features=16).eval()
        >>> layer(torch.randn(4, 8)).shape
        torch.Size([4, 8])
        >>> layer.lipschitz_bound()  # sound norm, step rounded down: exactly 1-Lipschitz
        1.0
        >>> sigma = layer.eval_spectral_norm()  # a float64 upper bound of ||W||_2, cached
        >>> bool(layer.power_estimate(n_iter=1) < sigma)  # one power step from the persistent vector: below
        True
    """

    def __init__(
        self,
        features: int,
        inner_features: Optional[int] = None,
        bias: bool = True,
        eval_norm: str = "sound",
        n_eval_iter: int = 100,
        step_scale: float = 1.0,
        device=None,
        dtype=None,
    ):
        super().__init__(eval_norm, n_eval_iter, step_scale)
        inner_features = features if inner_features is None else inner_features
        if features < 1 or inner_features < 1:
            raise ValueError(
                f"features and inner_features must be positive, got {features}, {inner_features}"
            )
        self.features, self.inner_features = int(features), int(inner_features)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(inner_features, features, **kw))
        self.bias = nn.Parameter(torch.empty(inner_features, **kw)) if bias else None
        self.register_buffer("u", torch.randn(1, features, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.features)
            nn.init.uniform_(self.bias, -bound, bound)

    def operator(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``W x`` for ``x`` of shape ``(..., d)``: shape ``(..., m)``."""
        return F.linear(x, self.weight if weight is None else weight)

    def adjoint(self, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``W^T y`` for ``y`` of shape ``(..., m)``: shape ``(..., d)``."""
        return F.linear(y, (self.weight if weight is None else weight).t())

    def _step(self, x, step):
        return convex_potential_linear(x, self.weight, self.bias, step)

    def norm_upper_bound(self) -> torch.Tensor:
        """Exact ``||W||_2`` in float64 times ``1 + ROUNDING_MARGIN``."""
        return dense_spectral_norm_upper(self.weight)

    def _check_input(self, x):
        check_last_dim(self, x, self.features, "features")

    def extra_repr(self) -> str:
        return f"{self.features}, inner_features={self.inner_features}, " + super().extra_repr()


class ConvexPotentialConv2d(_ConvexPotentialBase):
    r"""Convolutional Convex Potential Layer.

    ``z = x - (2/||K||^2) conv_transpose2d(ReLU(conv2d(x, K, b)), K)`` with zero padding ``k//2``,
    stride 1, and ``conv_transpose2d`` the exact adjoint of ``conv2d``. ``||K||`` is the spectral norm
    of the convolution as a linear map on ``channels x input_size`` images.

    Args:
        channels: ``C``, channels of the input and output.
        inner_channels: output channels of the inner convolution (the official code uses 5).
        kernel_size: odd kernel size ``k``.
        input_size: ``(H, W)`` of the inputs (the norm depends on it); inputs of another size are refused.
        bias, eval_norm, n_eval_iter, step_scale: as in :class:`ConvexPotentialLinear`; the sound
            evaluation norm is :func:`~cpl_mini.conv_spectral_norm_upper` (float64).

    Shape: input ``(N, C, H, W)``, output ``(N, C, H, W)``.

    Examples:
        >>> import torch
        >>> from cpl_mini import ConvexPotentialConv2d
        >>> layer = ConvexPotentialConv2d(4, inner_channels=5, input_size=(8, 8)).eval()
        >>> layer(torch.randn(2, 4, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
        >>> layer.lipschitz_bound()
        1.0
        >>> layer(torch.randn(2, 4, 16, 16))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ConvexPotentialConv2d was built for 8x8 inputs (its norm depends on the size), ...
    """

    def __init__(
        self,
        channels: int,
        inner_channels: Optional[int] = None,
        kernel_size: int = 3,
        input_size: Union[int, Tuple[int, int]] = (32, 32),
        bias: bool = True,
        eval_norm: str = "sound",
        n_eval_iter: int = 100,
        step_scale: float = 1.0,
        device=None,
        dtype=None,
    ):
        super().__init__(eval_norm, n_eval_iter, step_scale)
        inner_channels = channels if inner_channels is None else inner_channels
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (padding k//2 keeps the size), got {kernel_size}")
        if channels < 1 or inner_channels < 1:
            raise ValueError(
                f"channels and inner_channels must be positive, got {channels}, {inner_channels}"
            )
        self.channels, self.inner_channels = int(channels), int(inner_channels)
        self.kernel_size = int(kernel_size)
        self.input_size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        self.padding = kernel_size // 2
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(inner_channels, channels, kernel_size, kernel_size, **kw))
        self.bias = nn.Parameter(torch.empty(inner_channels, **kw)) if bias else None
        self.register_buffer("u", torch.randn(1, channels, *self.input_size, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.channels * self.kernel_size**2)
            nn.init.uniform_(self.bias, -bound, bound)

    def operator(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``conv2d(x, K, padding=k//2)``: ``(N, C, H, W) -> (N, inner_channels, H, W)``."""
        return F.conv2d(x, self.weight if weight is None else weight, padding=self.padding)

    def adjoint(self, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``conv_transpose2d(y, K, padding=k//2)``, the exact adjoint of :meth:`operator`."""
        return F.conv_transpose2d(y, self.weight if weight is None else weight, padding=self.padding)

    def _step(self, x, step):
        return convex_potential_conv2d(x, self.weight, self.bias, step, self.padding)

    def norm_upper_bound(self) -> torch.Tensor:
        """:func:`~cpl_mini.conv_spectral_norm_upper` on ``input_size`` inputs (float64)."""
        return conv_spectral_norm_upper(self.weight, self.input_size, self.padding)

    def norm_key(self) -> tuple:
        return (self.input_size, self.padding)

    def _check_input(self, x):
        name = type(self).__name__
        if x.dim() != 4:
            raise ValueError(
                f"{name} expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}; "
                "add a batch dimension with x.unsqueeze(0) for a single image."
            )
        if x.shape[1] != self.channels:
            raise ValueError(
                f"{name} was built for {self.channels} channels, got {x.shape[1]} (input shape "
                f"{tuple(x.shape)}); pad the channels first (ChannelPad) or change `channels`."
            )
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(
                f"{name} was built for {self.input_size[0]}x{self.input_size[1]} inputs (its norm depends on "
                f"the size), got {x.shape[2]}x{x.shape[3]}; pass input_size={tuple(x.shape[2:])}."
            )

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, inner_channels={self.inner_channels}, kernel_size={self.kernel_size}, "
            f"input_size={self.input_size}, " + super().extra_repr()
        )


class ChannelPad(nn.Module):
    """Zero-pad the channel dimension ``(N, c, H, W) -> (N, C, H, W)``: an isometry (Lipschitz 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = int(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] > self.channels:
            raise ValueError(
                f"ChannelPad({self.channels}) expects (N, c<={self.channels}, H, W), got {tuple(x.shape)}"
            )
        return F.pad(x, (0, 0, 0, 0, 0, self.channels - x.shape[1]))

    def lipschitz_bound(self) -> float:
        return 1.0

    def extra_repr(self) -> str:
        return str(self.channels)


class LipschitzAvgPool2d(nn.Module):
    """Average pooling rescaled to norm exactly 1: the sum over each ``k x k`` window divided by ``k``.

    Non-overlapping windows (stride ``k``): each output is ``k`` times the window's mean, and by
    Cauchy-Schwarz ``(sum of k^2 values / k)^2 <= sum of squares``, with equality for constant windows.

    Shape: input ``(N, C, H, W)`` with ``H`` and ``W`` divisible by ``k`` (other sizes are refused: the
    pooling would silently drop the last rows or columns), output ``(N, C, H / k, W / k)``.
    """

    def __init__(self, kernel_size: int):
        super().__init__()
        self.kernel_size = int(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        if x.dim() not in (3, 4) or x.shape[-2] % k or x.shape[-1] % k:
            size = "x".join(str(n) for n in x.shape[-2:])
            raise ValueError(
                f"LipschitzAvgPool2d({k}) needs an (N, C, H, W) input with H and W divisible by {k}, got "
                f"shape {tuple(x.shape)}: the last rows or columns of a {size} input would be dropped. "
                f"Crop or pad the input to a multiple of {k}, or choose a kernel size that divides H and W."
            )
        return F.avg_pool2d(x, k, divisor_override=k)

    def lipschitz_bound(self) -> float:
        return 1.0

    def extra_repr(self) -> str:
        return str(self.kernel_size)


class FirstCoordinates(nn.Module):
    """Keep the first ``k`` coordinates ``(N, d) -> (N, k)``: a projection (Lipschitz 1). The CPL head."""

    def __init__(self, k: int):
        super().__init__()
        self.k = int(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < self.k:
            raise ValueError(
                f"FirstCoordinates({self.k}) needs at least {self.k} features, got {x.shape[-1]}"
            )
        return x[..., : self.k]

    def lipschitz_bound(self) -> float:
        return 1.0

    def extra_repr(self) -> str:
        return str(self.k)


class RowNormalizedLinear(nn.Linear):
    """Linear layer whose rows are normalised to unit l2 norm: ``y_j = <w_j/||w_j||, x> + b_j``.

    Each logit is 1-Lipschitz; the certificate uses pairwise constants ``||w_i/||w_i|| - w_j/||w_j||||``
    (see :func:`~cpl_mini.certified_radius_pairwise`).
    """

    def normalized_weight(self) -> torch.Tensor:
        """The rows ``v_j = w_j / ||w_j||`` as the forward computes them, shape ``(out, in)``."""
        return self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)

    def pairwise_lipschitz(self) -> torch.Tensor:
        r"""``(out, out)`` float64 matrix of guaranteed upper bounds of ``||v_i - v_j||``, ``v`` the rows the
        forward applies (:meth:`normalized_weight`), zero on the diagonal.

        The differences are formed explicitly in float64 (exact for float32 rows), never through
        ``||a||^2 + ||b||^2 - 2 <a, b>`` (which cancels for nearly parallel rows, as ``torch.cdist``
        does above 25 rows); the sum of squares is then raised by Higham's ``gamma`` for its rounding
        errors and the square root rounded up.
        """
        with torch.no_grad():
            v = as_float64(self.normalized_weight())
        k, d = v.shape
        squares = torch.stack([(v[i] - v).square().sum(dim=1) for i in range(k)])  # (k, k), float64
        # fl(differences), fl(squares) and a sum of d terms: relative error below gamma(d + 2); the
        # absolute term covers squares that underflow
        squares = squares * (1 + gamma(2 * (d + 2))) + math.ldexp(d, -1022)
        out = next_up(squares.sqrt())
        return out.fill_diagonal_(0.0)

    def lipschitz_bound(self) -> float:
        """A guaranteed upper bound of the layer's constant: ``||V||_2`` of the normalised rows."""
        with torch.no_grad():
            return float(dense_spectral_norm_upper(self.normalized_weight()))
