r"""The Convex Potential Layer (CPL) and the pieces of a 1-Lipschitz network.

A Convex Potential Layer is one explicit Euler step of the gradient flow of the convex potential
:math:`f(x) = \sum_i \psi(w_i^\top x + b_i)` with :math:`\psi' = \mathrm{ReLU}`:

.. math::  z = x - h\, W^\top \mathrm{ReLU}(W x + b), \qquad h = 2 / \|W\|_2^2 ,

which is 1-Lipschitz for any ``W`` because ``grad f`` is ``||W||^2``-smooth and co-coercive.

How ``||W||_2`` is obtained decides whether the layer is *provably* 1-Lipschitz:

* training mode: one power-iteration step per forward with a persistent vector (a buffer); the
  estimate is differentiable with respect to ``W`` (no gradient through the vector update);
* evaluation mode: a cached norm, recomputed whenever the weight changes (optimizer step,
  ``load_state_dict``, in-place edits through the parameter; ``reset_norm_cache()`` for edits made
  behind autograd's back through ``.data``). With ``eval_norm="sound"`` (default) the cached value is
  a guaranteed upper bound (exact SVD for dense layers, :func:`~cpl_mini.spectral.conv_spectral_norm_upper`
  for convolutions), so the eval-mode layer is 1-Lipschitz, not approximately so.
  ``eval_norm="power"`` reproduces the official code (100 power iterations, a lower estimate): only
  for comparisons, its certificates are not sound.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .spectral import conv_spectral_norm_upper, dense_spectral_norm_upper, power_iteration

__all__ = [
    "ConvexPotentialLinear",
    "ConvexPotentialConv2d",
    "ChannelPad",
    "LipschitzAvgPool2d",
    "FirstCoordinates",
    "RowNormalizedLinear",
    "lipschitz_upper_bound",
]

_EVAL_NORMS = ("sound", "power")


class _ConvexPotentialBase(nn.Module):
    """Shared machinery: the weight's norm in training and evaluation, the step, the forward."""

    def __init__(self, eval_norm="sound", n_eval_iter=100, step_scale=1.0):
        super().__init__()
        if eval_norm not in _EVAL_NORMS:
            raise ValueError(f"eval_norm must be one of {_EVAL_NORMS}, got {eval_norm!r}")
        self.eval_norm = eval_norm
        self.n_eval_iter = int(n_eval_iter)
        #: multiplies the step ``h = 2 / ||W||^2``; above 1 the layer is no longer 1-Lipschitz
        #: (kept for the book's counter-examples and the tests that show the checks can fail).
        self.step_scale = float(step_scale)
        self._norm_cache = {}

    # -- subclasses define the operator W and its adjoint ------------------------------------
    def _op(self, x, weight, bias=None):
        raise NotImplementedError

    def _op_adjoint(self, y, weight):
        raise NotImplementedError

    def _sound_norm(self):
        raise NotImplementedError

    def _check_input(self, x):
        raise NotImplementedError

    # -- the norm ----------------------------------------------------------------------------
    def _norm_weight(self):
        w = self.weight
        return w if w.dtype in (torch.float32, torch.float64) else w.float()

    def _power_norm(self, n_iter, update):
        w = self._norm_weight()
        u = self.u.to(w.dtype)
        sigma, u_new = power_iteration(lambda x: self._op(x, w), lambda y: self._op_adjoint(y, w), u, n_iter)
        if update:
            self.u.copy_(u_new)
        return sigma

    def _cached_norm(self):
        """The cached norm if it was computed from exactly the weight the layer holds now, else None.

        The cache keeps a copy of the weight it was computed from and compares it element by element
        (``torch.equal``): version counters are not enough (fused and compiled optimizers update
        weights without bumping them), and a comparison costs one pass over the weight.
        """
        entry = self._norm_cache.get((self.eval_norm, self.n_eval_iter))
        if entry is None:
            return None
        weight, value = entry
        w = self.weight.detach()
        if weight.shape != w.shape or weight.dtype != w.dtype or weight.device != w.device:
            return None
        return value if torch.equal(weight, w) else None

    def reset_norm_cache(self):
        """Forget the cached evaluation norm (never needed for soundness: the cache checks the weight)."""
        self._norm_cache.clear()

    def eval_spectral_norm(self):
        """The norm used in evaluation mode, a float32/64 0-dim tensor.

        Cached with a copy of the weight it was computed from; recomputed whenever the weight differs
        from that copy, however it was changed.
        """
        value = self._cached_norm()
        if value is None:
            with torch.no_grad(), torch.autocast(self.weight.device.type, enabled=False):
                if self.eval_norm == "sound":
                    value = self._sound_norm()
                else:
                    value = self._power_norm(self.n_eval_iter, update=False).to(torch.float64)
            self._norm_cache.clear()
            self._norm_cache[(self.eval_norm, self.n_eval_iter)] = (self.weight.detach().clone(), value)
        return value

    def sound_spectral_norm(self):
        """A guaranteed upper bound of ``||W||_2`` (float64), whatever ``eval_norm`` is."""
        if self.eval_norm == "sound":
            return self.eval_spectral_norm()
        with torch.no_grad():
            return self._sound_norm()

    def spectral_norm(self):
        """The norm the forward pass uses now: the training estimate or the cached evaluation norm."""
        if self.training:
            with torch.autocast(self.weight.device.type, enabled=False):
                return self._power_norm(1, update=True)
        return self.eval_spectral_norm()

    def step_size(self, sigma=None):
        """``h = step_scale * 2 / sigma^2`` (float32 or float64, never lower precision)."""
        if sigma is None:
            sigma = self.spectral_norm()
        dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        sigma = sigma.to(device=self.weight.device, dtype=dtype)
        return self.step_scale * 2.0 / sigma.square().clamp_min(1e-12)

    def lipschitz_bound(self):
        r"""A guaranteed upper bound of this layer's Lipschitz constant in evaluation mode.

        The Jacobian is ``I - h W^T D W`` with ``D`` diagonal in ``[0, 1]``; its eigenvalues lie in
        ``[1 - h ||W||^2, 1]``, so the constant is at most ``max(1, h ||W||^2 - 1)`` with ``||W||`` the
        sound bound. It is 1 for the default (sound) layer.
        """
        sigma_up = self.sound_spectral_norm().double()
        h = self.step_size(self.eval_spectral_norm()).double().cpu()
        return max(1.0, float(h * sigma_up.cpu() ** 2 - 1.0))

    def forward(self, x):
        self._check_input(x)
        h = self.step_size(self.spectral_norm())
        y = F.relu(self._op(x, self.weight, self.bias))
        return x - h * self._op_adjoint(y, self.weight)

    def extra_repr(self):
        return f"eval_norm={self.eval_norm!r}" + (f", step_scale={self.step_scale}" if self.step_scale != 1 else "")


class ConvexPotentialLinear(_ConvexPotentialBase):
    r"""Dense Convex Potential Layer ``z = x - (2/||W||^2) W^T ReLU(W x + b)``.

    Args:
        features: size ``d`` of the input and output.
        inner_features: number ``m`` of rows of ``W`` (``(m, d)``); default ``features``.
        bias: learn ``b`` (shape ``(m,)``).
        eval_norm: ``"sound"`` (exact norm in float64 plus a rounding margin, default) or ``"power"``.
        n_eval_iter: power iterations for ``eval_norm="power"``.
        step_scale: multiplies ``h`` (1 = the paper's layer).

    Shape: input ``(..., d)``, output ``(..., d)``.
    """

    def __init__(self, features, inner_features=None, bias=True, eval_norm="sound", n_eval_iter=100,
                 step_scale=1.0, device=None, dtype=None):
        super().__init__(eval_norm, n_eval_iter, step_scale)
        inner_features = features if inner_features is None else inner_features
        if features < 1 or inner_features < 1:
            raise ValueError(f"features and inner_features must be positive, got {features}, {inner_features}")
        self.features, self.inner_features = int(features), int(inner_features)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(inner_features, features, **kw))
        self.bias = nn.Parameter(torch.empty(inner_features, **kw)) if bias else None
        self.register_buffer("u", torch.randn(1, features, **kw))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.features)
            nn.init.uniform_(self.bias, -bound, bound)

    def _op(self, x, weight, bias=None):
        return F.linear(x, weight, bias)

    def _op_adjoint(self, y, weight):
        return F.linear(y, weight.t())

    def _sound_norm(self):
        return dense_spectral_norm_upper(self.weight).to(self.weight.device)

    def _check_input(self, x):
        if x.dim() < 1 or x.shape[-1] != self.features:
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape (..., {self.features}), got {tuple(x.shape)}; "
                "flatten images first (nn.Flatten) or build the layer with the right `features`.")

    def extra_repr(self):
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
            evaluation norm is :func:`~cpl_mini.spectral.conv_spectral_norm_upper` (float64).

    Shape: input ``(N, C, H, W)``, output ``(N, C, H, W)``.
    """

    def __init__(self, channels, inner_channels=None, kernel_size=3, input_size=(32, 32), bias=True,
                 eval_norm="sound", n_eval_iter=100, step_scale=1.0, device=None, dtype=None):
        super().__init__(eval_norm, n_eval_iter, step_scale)
        inner_channels = channels if inner_channels is None else inner_channels
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (padding k//2 keeps the size), got {kernel_size}")
        if channels < 1 or inner_channels < 1:
            raise ValueError(f"channels and inner_channels must be positive, got {channels}, {inner_channels}")
        self.channels, self.inner_channels, self.kernel_size = int(channels), int(inner_channels), int(kernel_size)
        self.input_size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        self.padding = kernel_size // 2
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(inner_channels, channels, kernel_size, kernel_size, **kw))
        self.bias = nn.Parameter(torch.empty(inner_channels, **kw)) if bias else None
        self.register_buffer("u", torch.randn(1, channels, *self.input_size, **kw))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.channels * self.kernel_size ** 2)
            nn.init.uniform_(self.bias, -bound, bound)

    def _op(self, x, weight, bias=None):
        return F.conv2d(x, weight, bias, padding=self.padding)

    def _op_adjoint(self, y, weight):
        return F.conv_transpose2d(y, weight, padding=self.padding)

    def _sound_norm(self):
        return conv_spectral_norm_upper(self.weight, self.input_size, self.padding).to(self.weight.device)

    def _check_input(self, x):
        if x.dim() != 4:
            raise ValueError(
                f"{type(self).__name__} expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}; "
                "add a batch dimension with x.unsqueeze(0) for a single image.")
        if x.shape[1] != self.channels:
            raise ValueError(
                f"{type(self).__name__} was built for {self.channels} channels, got {x.shape[1]} "
                f"(input shape {tuple(x.shape)}); pad the channels first (ChannelPad) or change `channels`.")
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(
                f"{type(self).__name__} was built for {self.input_size[0]}x{self.input_size[1]} inputs (its norm "
                f"depends on the size), got {x.shape[2]}x{x.shape[3]}; pass input_size={tuple(x.shape[2:])}.")

    def extra_repr(self):
        return (f"{self.channels}, inner_channels={self.inner_channels}, kernel_size={self.kernel_size}, "
                f"input_size={self.input_size}, " + super().extra_repr())


class ChannelPad(nn.Module):
    """Zero-pad the channel dimension ``(N, c, H, W) -> (N, C, H, W)``: an isometry (Lipschitz 1)."""

    def __init__(self, channels):
        super().__init__()
        self.channels = int(channels)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] > self.channels:
            raise ValueError(f"ChannelPad({self.channels}) expects (N, c<={self.channels}, H, W), got {tuple(x.shape)}")
        return F.pad(x, (0, 0, 0, 0, 0, self.channels - x.shape[1]))

    def lipschitz_bound(self):
        return 1.0

    def extra_repr(self):
        return str(self.channels)


class LipschitzAvgPool2d(nn.Module):
    """Average pooling rescaled to norm exactly 1: the sum over each ``k x k`` window divided by ``k``.

    Non-overlapping windows (stride ``k``): each output is ``k`` times the window's mean, and by
    Cauchy-Schwarz ``(sum of k^2 values / k)^2 <= sum of squares``, with equality for constant windows.
    """

    def __init__(self, kernel_size):
        super().__init__()
        self.kernel_size = int(kernel_size)

    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, divisor_override=self.kernel_size)

    def lipschitz_bound(self):
        return 1.0

    def extra_repr(self):
        return str(self.kernel_size)


class FirstCoordinates(nn.Module):
    """Keep the first ``k`` coordinates ``(N, d) -> (N, k)``: a projection (Lipschitz 1). The CPL head."""

    def __init__(self, k):
        super().__init__()
        self.k = int(k)

    def forward(self, x):
        if x.shape[-1] < self.k:
            raise ValueError(f"FirstCoordinates({self.k}) needs at least {self.k} features, got {x.shape[-1]}")
        return x[..., : self.k]

    def lipschitz_bound(self):
        return 1.0

    def extra_repr(self):
        return str(self.k)


class RowNormalizedLinear(nn.Linear):
    """Linear layer whose rows are normalised to unit l2 norm: ``y_j = <w_j/||w_j||, x> + b_j``.

    Each logit is 1-Lipschitz; the certificate uses pairwise constants ``||w_i/||w_i|| - w_j/||w_j||||``
    (see :func:`cpl_mini.certify.certified_radius_pairwise`).
    """

    def normalized_weight(self):
        return self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x):
        return F.linear(x, self.normalized_weight(), self.bias)

    def pairwise_lipschitz(self):
        """``(out, out)`` matrix of ``||v_i - v_j||`` for the normalised rows ``v`` (float64)."""
        v = self.normalized_weight().detach().double()
        return torch.cdist(v, v)

    def lipschitz_bound(self):
        return float(dense_spectral_norm_upper(self.normalized_weight()))


_ONE_LIPSCHITZ = (nn.ReLU, nn.Identity, nn.Flatten, nn.Dropout)


def lipschitz_upper_bound(module):
    """A guaranteed upper bound of the l2 Lipschitz constant of ``module`` in evaluation mode.

    Composition multiplies constants: for ``nn.Sequential`` the bound is the product of its parts.
    Known parts: the CPL layers (via their sound norm), :class:`ChannelPad`,
    :class:`LipschitzAvgPool2d`, :class:`FirstCoordinates`, :class:`RowNormalizedLinear`,
    ``nn.Linear`` (exact SVD), ``nn.ReLU``, ``nn.Identity``, ``nn.Flatten``. Anything else raises
    ``TypeError`` (a bound must never be guessed).
    """
    if isinstance(module, nn.Sequential):
        bound = 1.0
        for child in module:
            bound *= lipschitz_upper_bound(child)
        return bound
    if hasattr(module, "lipschitz_bound"):
        return float(module.lipschitz_bound())
    if isinstance(module, nn.Linear):
        return float(dense_spectral_norm_upper(module.weight))
    if isinstance(module, _ONE_LIPSCHITZ):
        return 1.0
    raise TypeError(
        f"lipschitz_upper_bound does not know a sound bound for {type(module).__name__}; "
        "give the module a `lipschitz_bound()` method returning a guaranteed upper bound.")
