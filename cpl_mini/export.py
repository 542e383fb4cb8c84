r"""Export a 1-Lipschitz network as a plain ``torch.nn`` network with the same evaluation-mode outputs.

The layers of this package compute their normalisation (a spectral norm, a rescaling, an orthogonal
matrix) at each forward, with caches and checks that ``torch.export``, ``torch.jit.script`` and ONNX do
not follow (the evaluation norm is cached with a copy of the weight compared by ``torch.equal``; the
sound norm of a convolution runs an FFT). :func:`to_plain` computes all of it once, folds it into the
weights, and returns an equivalent network in evaluation mode made of ``torch.nn`` layers and the small
modules below, whose ``state_dict`` holds only plain tensors:

=========================================  ==========================================================
layer (evaluation mode)                    plain form
=========================================  ==========================================================
``ConvexPotentialLinear``                  ``Residual(Linear(W, b), ReLU, Linear(-h W^T))``
  :math:`z = x - h W^\top \mathrm{ReLU}(W x + b)`
``ConvexPotentialConv2d``                  ``Residual(Conv2d(K, b), ReLU, ConvTranspose2d(-h K))``
  :math:`z = x - h K^\top \mathrm{ReLU}(K x + b)`   (padding ``k // 2``, stride 1)
``SLLLinear``                              ``Residual(Linear(W, b), ReLU, Linear(-2 W^T diag(1/t)))``
  :math:`z = x - 2 W^\top T^{-1} \mathrm{ReLU}(W x + b)`
``SLLConv2d``                              ``Residual(Conv2d(K, b), ReLU, ConvTranspose2d(-2 K / t))``
  :math:`z = x - 2 K^\top T^{-1} \mathrm{ReLU}(K x + b)`   (padding ``k // 2``, stride 1; ``1/t_a``
  scales the kernel of inner channel ``a``)
``SpectralNormLinear``                     ``Linear(W / sigma_eval, b)``
``AOLLinear``                              ``Linear(W diag(d), b)``
``AOLConv2d``                              ``Conv2d(K diag(d), b)``, same stride and padding
``CayleyLinear``, ``MatrixExpLinear``      ``Linear(Q[:out, :in], b)``, ``Q = cay(A)`` or ``exp(A)``
``RowNormalizedLinear``                    ``Linear(V, b)``, rows ``v_j = w_j / ||w_j||``
``InputNormalization``                     ``Conv2d(C, C, 1, groups=C)``: :math:`x_c / s_c - m_c / s_c`
``LipschitzAvgPool2d(k)``                  ``AvgPool2d(k, divisor_override=k)`` (sum / k of each window)
``InvertibleDownsampling(f)``              ``PixelUnshuffle(f)``
``ChannelSlice(k)``                        :class:`PlainChannelSlice` ``(k)``
``ChannelPad(C)``                          :class:`PlainChannelPad` ``(C)``
``FirstCoordinates(k)``                    :class:`PlainFirstCoordinates` ``(k)``
``MaxMin(dim)``                            :class:`PlainMaxMin` ``(dim)``
``nn.Sequential``                          ``nn.Sequential`` of the converted children, same names
other ``torch.nn`` modules                 a deep copy
=========================================  ==========================================================

The numbers folded in are the ones the evaluation forward uses, not recomputed approximations:

* CPL step ``h``: :meth:`~cpl_mini.layers.ConvexPotentialLinear.step_size` in evaluation mode, the
  step ``2 / sigma^2`` (sound norm ``sigma``) rounded *down* to the dtype the forward applies it in;
  the product ``-h W^T`` is formed in float64 and rounded once to the weight's dtype.
* SLL: ``t`` = :meth:`~cpl_mini.sll.SLLLinear.t` (:meth:`~cpl_mini.sll.SLLConv2d.t`; in the weight's
  dtype, as the forward computes it); ``-2 W^T diag(1/t)`` (``-2 K / t_a`` for each inner channel ``a``)
  is formed in float64 and rounded once.
* Normalised layers: their ``weight_matrix()`` (``normalized_weight()``, ``rescaled_kernel()``), the
  very matrix (kernel) the evaluation forward applies, so those outputs are bit-identical.
* Input normalisation: ``1 / s_c`` and ``-m_c / s_c`` in float64, rounded once (``-m_c`` alone, exact,
  without ``std``).

So the outputs agree with the original evaluation forward up to the rounding of a reordered product
(about ``1e-7`` relative in float32, ``1e-16`` in float64). The plain network is for deployment: its
weights are rounded to nearest, so the *certificate* is the original's
(:func:`~cpl_mini.bounds.lipschitz_upper_bound` on the original model), not a new one.

``PlainChannelPad``, ``PlainFirstCoordinates`` and ``PlainChannelSlice`` exist because ``ChannelPad``,
``FirstCoordinates`` and ``ChannelSlice`` accept inputs of any width (``c <= C`` channels, ``d >= k``
features, ``C >= k`` channels) and do not record it, while the ``torch.nn`` padding and selection layers
(``ConstantPad3d``, a 0/1 ``Linear`` or 1x1 ``Conv2d``) need it fixed; a 0/1 matrix would moreover not
be exact (``0 * inf`` is NaN). They are a slice or an ``F.pad``, which ``torch.export`` and
``torch.jit.script`` accept.

Extending: a module with a method ``to_plain(self) -> nn.Module`` is converted by calling it (before
anything else). It is called in evaluation mode, under ``torch.no_grad()`` and with TF32 off, and must
return a new module (tensors not shared with the layer) made of ``torch.nn`` layers and the modules of
this file, computing the layer's evaluation forward. Any other module type raises a ``TypeError``.
"""

import copy
from collections import OrderedDict
from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .downsampling import ChannelSlice, InvertibleDownsampling
from .layers import (
    ChannelPad,
    ConvexPotentialConv2d,
    ConvexPotentialLinear,
    FirstCoordinates,
    LipschitzAvgPool2d,
    RowNormalizedLinear,
)
from .normalization import InputNormalization
from .normalized import AOLConv2d, AOLLinear, SpectralNormLinear
from .orthogonal import CayleyLinear, MatrixExpLinear, MaxMin
from .precision import as_float64, cast_down, ieee_precision
from .sll import SLLConv2d, SLLLinear

__all__ = [
    "to_plain",
    "Residual",
    "PlainChannelPad",
    "PlainFirstCoordinates",
    "PlainChannelSlice",
    "PlainMaxMin",
]


# ---------------------------------------------------------------------------------------------
# the small modules torch.nn has no layer for
# ---------------------------------------------------------------------------------------------
class Residual(nn.Module):
    r"""The residual sum ``z = x + branch(x)``; ``branch`` is usually an ``nn.Sequential``.

    The plain form of a CPL step: ``branch = (Linear(W, b), ReLU, Linear(-h W^T))``, so
    ``z = x - h W^T ReLU(W x + b)``. Shape: that of ``branch``, whose output must have the input's shape.
    """

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class PlainChannelPad(nn.Module):
    """Zero-pad the channels ``(N, c, H, W) -> (N, C, H, W)`` for any ``c <= C`` (as ``ChannelPad``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = int(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] > self.channels:
            raise ValueError("PlainChannelPad expects (N, c, H, W) inputs with c <= channels")
        return F.pad(x, (0, 0, 0, 0, 0, self.channels - x.shape[1]))

    def extra_repr(self) -> str:
        return str(self.channels)


class PlainFirstCoordinates(nn.Module):
    """The first ``k`` coordinates of the last dimension ``(..., d) -> (..., k)``, ``d >= k``."""

    def __init__(self, k: int):
        super().__init__()
        self.k = int(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < self.k:
            raise ValueError("PlainFirstCoordinates needs at least k features in the last dimension")
        return x[..., : self.k]

    def extra_repr(self) -> str:
        return str(self.k)


class PlainChannelSlice(nn.Module):
    """The first ``k`` channels ``(N, C, ...) -> (N, k, ...)``, ``C >= k`` (as ``ChannelSlice``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = int(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] < self.channels:
            raise ValueError("PlainChannelSlice expects (N, C, ...) inputs with C >= channels")
        return x[:, : self.channels]

    def extra_repr(self) -> str:
        return str(self.channels)


class PlainMaxMin(nn.Module):
    """Pairwise sort ``(a, b) -> (max(a, b), min(a, b))`` of the two halves along ``dim`` (as ``MaxMin``)."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = int(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.dim] % 2 != 0:
            raise ValueError("PlainMaxMin needs an even number of features along dim")
        a, b = x.chunk(2, dim=self.dim)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


_HELPERS = (Residual, PlainChannelPad, PlainFirstCoordinates, PlainChannelSlice, PlainMaxMin)


# ---------------------------------------------------------------------------------------------
# conversions
# ---------------------------------------------------------------------------------------------
def _fold(value64: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float64 product rounded once to the dtype (and device) of the parameter ``like``."""
    return value64.to(device=like.device, dtype=like.dtype)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.detach())


def _linear(weight: torch.Tensor, bias, like: torch.Tensor) -> nn.Linear:
    """``nn.Linear`` holding ``weight`` ``(out, in)`` and ``bias`` (or none), in ``like``'s dtype."""
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=like.device, dtype=like.dtype)
    _set(layer.weight, weight)
    if bias is not None:
        _set(layer.bias, bias)
    return layer


def _cpl_step(layer) -> torch.Tensor:
    """The step ``h`` of the evaluation forward (rounded down to the weight's dtype) as a float64 0-dim
    tensor: the dtype is exact, so ``-h W^T`` can be formed in float64 and rounded once."""
    return as_float64(cast_down(layer.step_size(), layer.weight.dtype))


def _convex_potential_linear(layer: ConvexPotentialLinear) -> nn.Module:
    w = layer.weight
    second = -_cpl_step(layer) * as_float64(w).t()  # (d, m): -h W^T
    branch = [_linear(w, layer.bias, w), nn.ReLU(), _linear(_fold(second, w), None, w)]
    return Residual(nn.Sequential(*branch))


def _convex_potential_conv2d(layer: ConvexPotentialConv2d) -> nn.Module:
    w = layer.weight  # (inner, C, k, k)
    inner, channels, k, _ = w.shape
    kw = {"padding": layer.padding, "device": w.device, "dtype": w.dtype}
    conv = nn.Conv2d(channels, inner, k, bias=layer.bias is not None, **kw)
    _set(conv.weight, w)
    if layer.bias is not None:
        _set(conv.bias, layer.bias)
    adjoint = nn.ConvTranspose2d(inner, channels, k, bias=False, **kw)  # weight (inner, C, k, k)
    _set(adjoint.weight, _fold(-_cpl_step(layer) * as_float64(w), w))
    return Residual(nn.Sequential(conv, nn.ReLU(), adjoint))


def _sll_linear(layer: SLLLinear) -> nn.Module:
    w = layer.weight
    second = -2.0 * as_float64(w).t() / as_float64(layer.t())  # (d, m): -2 W^T diag(1/t)
    branch = [_linear(w, layer.bias, w), nn.ReLU(), _linear(_fold(second, w), None, w)]
    return Residual(nn.Sequential(*branch))


def _sll_conv2d(layer: SLLConv2d) -> nn.Module:
    w = layer.weight  # (inner, C, k, k); also the layout of ConvTranspose2d(inner, C, k).weight
    inner, channels, k, _ = w.shape
    kw = {"padding": layer.padding, "device": w.device, "dtype": w.dtype}
    conv = nn.Conv2d(channels, inner, k, bias=layer.bias is not None, **kw)
    _set(conv.weight, w)
    if layer.bias is not None:
        _set(conv.bias, layer.bias)
    adjoint = nn.ConvTranspose2d(inner, channels, k, bias=False, **kw)
    t = as_float64(layer.t())[:, None, None, None]  # the t of the forward, in the weight's dtype
    _set(adjoint.weight, _fold(-2.0 * as_float64(w) / t, w))  # -2 K / t_a for each inner channel a
    return Residual(nn.Sequential(conv, nn.ReLU(), adjoint))


def _aol_conv2d(layer: AOLConv2d) -> nn.Module:
    kernel = layer.rescaled_kernel()  # (out, in, k, k): the kernel the forward applies
    out_c, in_c, k, _ = kernel.shape
    conv = nn.Conv2d(
        in_c,
        out_c,
        k,
        stride=layer.stride,
        padding=layer.padding,
        bias=layer.bias is not None,
        device=kernel.device,
        dtype=layer.weight.dtype,
    )
    _set(conv.weight, kernel)
    if layer.bias is not None:
        _set(conv.bias, layer.bias)
    return conv


def _matrix_layer(matrix: Callable[[nn.Module], torch.Tensor]) -> Callable[[nn.Module], nn.Module]:
    """Conversion of ``y = M x + b`` with ``M = matrix(layer)``, the matrix the forward applies."""

    def convert(layer):
        return _linear(matrix(layer).to(layer.weight.dtype), layer.bias, layer.weight)

    return convert


def _input_normalization(layer: InputNormalization) -> nn.Module:
    mean = layer.mean  # (1, C, 1, 1)
    c = layer.channels
    m64 = as_float64(mean).reshape(c)
    if layer.std is None:
        scale, shift = torch.ones_like(m64), -m64
    else:
        s64 = as_float64(layer.std).reshape(c)
        scale, shift = 1.0 / s64, -m64 / s64
    conv = nn.Conv2d(c, c, 1, groups=c, device=mean.device, dtype=mean.dtype)  # weight (C, 1, 1, 1)
    _set(conv.weight, _fold(scale.reshape(c, 1, 1, 1), mean))
    _set(conv.bias, _fold(shift, mean))
    return conv


_CONVERTERS: Dict[type, Callable[[nn.Module], nn.Module]] = {
    ConvexPotentialLinear: _convex_potential_linear,
    ConvexPotentialConv2d: _convex_potential_conv2d,
    SLLLinear: _sll_linear,
    SLLConv2d: _sll_conv2d,
    SpectralNormLinear: _matrix_layer(lambda layer: layer.weight_matrix()),
    AOLLinear: _matrix_layer(lambda layer: layer.weight_matrix()),
    AOLConv2d: _aol_conv2d,
    CayleyLinear: _matrix_layer(lambda layer: layer.weight_matrix()),
    MatrixExpLinear: _matrix_layer(lambda layer: layer.weight_matrix()),
    RowNormalizedLinear: _matrix_layer(lambda layer: layer.normalized_weight()),
    InputNormalization: _input_normalization,
    LipschitzAvgPool2d: lambda layer: nn.AvgPool2d(layer.kernel_size, divisor_override=layer.kernel_size),
    ChannelPad: lambda layer: PlainChannelPad(layer.channels),
    InvertibleDownsampling: lambda layer: nn.PixelUnshuffle(layer.factor),
    ChannelSlice: lambda layer: PlainChannelSlice(layer.channels),
    FirstCoordinates: lambda layer: PlainFirstCoordinates(layer.k),
    MaxMin: lambda layer: PlainMaxMin(layer.dim),
}


def _is_plain(module: nn.Module) -> bool:
    """Whether every module inside is a ``torch.nn`` class or one of this file's helpers."""
    return all(type(m) in _HELPERS or type(m).__module__.startswith("torch.nn.") for m in module.modules())


def _convert(module: nn.Module, path: str) -> nn.Module:
    method = getattr(type(module), "to_plain", None)
    if callable(method):
        plain = module.to_plain()
        if not isinstance(plain, nn.Module):
            raise TypeError(
                f"{type(module).__name__}.to_plain() (at {path}) returned {type(plain).__name__}, "
                "not an nn.Module"
            )
        return plain
    converter = _CONVERTERS.get(type(module))
    if converter is not None:
        return converter(module)
    if type(module) is nn.Sequential:
        children = [(name, _convert(child, f"{path}.{name}")) for name, child in module.named_children()]
        return nn.Sequential(OrderedDict(children))
    if _is_plain(module):
        return copy.deepcopy(module)
    cls = type(module)
    raise TypeError(
        f"to_plain cannot convert {cls.__module__}.{cls.__qualname__} (at {path}): it is neither a "
        "torch.nn module nor a layer of cpl_mini it knows. Give the class a method "
        "`to_plain(self) -> nn.Module` returning a new module made of torch.nn layers (and "
        "cpl_mini.export.Residual for a residual sum) that computes its evaluation-mode forward; "
        "to_plain calls it first."
    )


def to_plain(model: nn.Module) -> nn.Module:
    r"""An equivalent network in evaluation mode made only of ``torch.nn`` layers and the helpers
    :class:`Residual`, :class:`PlainChannelPad`, :class:`PlainFirstCoordinates`,
    :class:`PlainChannelSlice`, :class:`PlainMaxMin`.

    Every normalisation of the evaluation forward is computed once and folded into the weights (the
    table in the module docstring); the result's outputs equal ``model.eval()(x)`` up to rounding
    (``1e-5`` in float32, ``1e-12`` in float64 for inputs of size ~1), and ``torch.export.export``,
    ``torch.jit.script`` and ``state_dict`` round trips work on it. ``nn.Sequential`` is converted
    child by child with the same child names; other ``torch.nn`` modules are deep-copied; a module
    with a ``to_plain()`` method is converted by it.

    The conversion runs under ``torch.no_grad()``, with TF32 off, on ``model`` in evaluation mode;
    afterwards ``model`` is left as it was: the mode of every submodule and every buffer (an
    ``eval_norm="power"`` layer's persistent vector advances when its norm is computed) are restored.

    Raises:
        TypeError: for a module this function does not know (the message says how to extend it).

    Example::

        plain = to_plain(cpl_network("XS", mean=mean, std=std))
        program = torch.export.export(plain, (torch.rand(1, 3, 32, 32),))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_plain expects an nn.Module, got {type(model).__name__}")
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        model.eval()
        with torch.no_grad(), ieee_precision():
            plain = _convert(model, type(model).__name__)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, mode in modes:
            m.training = mode
    return plain.eval()
