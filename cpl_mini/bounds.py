r"""Guaranteed upper bounds of a network's l2 Lipschitz constant, composed from its parts.

For ``f = f_n o ... o f_1``, ``Lip(f) <= Lip(f_n) ... Lip(f_1)``: a network's bound is the product of
its parts' bounds. :func:`lipschitz_upper_bound` walks an ``nn.Sequential`` and asks each part, in order:

1. a module with a ``lipschitz_bound()`` method answers for itself (every layer of this package);
2. an ``nn.Sequential`` multiplies its parts' bounds (exact product, rounded up);
3. the torch modules below (subclasses too, unless they override ``forward``) get a rule;
4. anything else raises ``TypeError``: a bound is never guessed.

Rules (``s`` stride, ``k`` kernel, ``p`` padding, ``n`` input size; float64, rounded up):

* ``nn.Linear``: exact ``||W||_2``. ``nn.Conv2d``: the FFT bound of
  :func:`~cpl_mini.conv_spectral_norm_upper` on the input size (stride ``> 1`` subsamples the
  stride-1 output: same bound; groups: block diagonal, the max over groups; dilation: the kernel with
  zeros inserted); circular padding: also the exact norm of the circular convolution
  (:func:`~cpl_mini.spectral.conv_spectral_norm_fft`); reflect / replicate: ``sqrt(m)`` times the
  unpadded bound on the padded size (``m``: the most copies of one pixel the padding makes). Without the
  input size: ``sqrt(m) sum_{a,b} ||K[:, :, a, b]||_2`` (each tap is a shift, norm <= 1, tensored with a
  matrix), size-independent and looser: pass ``input_shape`` for the tight one. ``nn.ConvTranspose2d``:
  the adjoint of a convolution on its output size, the same bounds.
* ``nn.BatchNorm1d/2d/3d`` (running statistics): ``max_c |gamma_c| / sqrt(running_var_c + eps)``.
* ``nn.AvgPool2d``: with the input size, the exact norm (the pooling is ``A_h (x) A_w``, each built
  explicitly); without it, ``sqrt(ceil(k_h/s_h) ceil(k_w/s_w) / (k_h k_w))`` (Schur test, see
  ``_avg_pool_bound``). ``nn.AdaptiveAvgPool2d``: exact, input size required. ``nn.MaxPool2d``:
  ``sqrt(m_h m_w)`` with ``m = min(k, ceil((d (k - 1) + 1) / s))`` windows per pixel (1 without overlap).
* 1-Lipschitz: ``nn.ReLU``, ``nn.ReLU6``, ``nn.Hardtanh``, ``nn.Tanh``, ``nn.Softsign``,
  ``nn.Tanhshrink``, ``nn.Softshrink``, ``nn.LogSigmoid``, ``nn.CELU`` (alpha > 0), ``nn.Softplus``
  (threshold >= 20), the isometries ``nn.Identity``, ``nn.Flatten``, ``nn.Unflatten``,
  ``nn.PixelShuffle``, ``nn.PixelUnshuffle``, ``nn.ChannelShuffle``, and dropout (evaluation mode).
  ``nn.Sigmoid`` 1/4, ``nn.Hardsigmoid`` 1/6, ``nn.Hardswish`` 3/2, ``nn.LeakyReLU`` / ``nn.ELU``
  ``max(1, |a|)``, ``nn.PReLU`` ``max(1, max |a|)``, ``nn.SELU`` scale * alpha, ``nn.GELU``
  ``(1 + erf(1)) / 2 + 1 / (e sqrt(pi)) = 1.12890...`` (``x Phi(x)`` has ``d2/dx2 = phi(x) (2 - x^2)``:
  the slope peaks at ``sqrt(2)``), ``nn.GELU(approximate="tanh")`` 1.12899... and ``nn.SiLU``
  1.09984... (proven sup of ``|f'|``, see ``_sup_abs``).

**Input sizes.** ``input_shape`` is one input without the batch dimension (``(C, H, W)`` or
``(features,)``). Inside an ``nn.Sequential`` it is carried part by part: each part runs once on zeros
of shape ``(1, *shape)`` (no gradient, its own dtype, float64 for parts without parameters) to find the
next shape.

**The protocol for your own module.** Give it a method ``lipschitz_bound(self) -> float`` returning a
*guaranteed* upper bound of its l2 -> l2 Lipschitz constant **in evaluation mode**, computed from the
parameters it holds when called (not from a value cached across weight updates) and rounded up, e.g.
``float(dense_spectral_norm_upper(W))`` for ``x -> W x + b``, or ``1.0`` for an isometry. If the method
takes an ``input_shape`` argument, :func:`lipschitz_upper_bound` passes the shape it knows (or None).

**The protocol for your own container.** Its ``lipschitz_bound`` calls :func:`lipschitz_upper_bound` on
its children and combines, rounding up (:func:`~cpl_mini.precision.float_up` of exact ``Fraction``
arithmetic): ``1 + L_f`` for a residual ``x + f(x)``, ``L_f + L_g`` for a sum ``f(x) + g(x)``, the product
for a composition, ``sqrt(L_f^2 + L_g^2)`` for branches concatenated ``(f(x), g(x))``:

>>> from fractions import Fraction
>>> import torch.nn as nn
>>> from cpl_mini import lipschitz_upper_bound
>>> from cpl_mini.precision import float_up
>>> class Residual(nn.Module):
...     def __init__(self, f):
...         super().__init__()
...         self.f = f
...     def forward(self, x):
...         return x + self.f(x)
...     def lipschitz_bound(self, input_shape=None):  # Lip(x + f(x)) <= 1 + Lip(f)
...         return float_up(1 + Fraction(lipschitz_upper_bound(self.f, input_shape)))
>>> net = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 3, padding=1))
>>> block = nn.Sequential(Residual(net), nn.ReLU()).eval()
>>> lipschitz_upper_bound(block, (2, 8, 8)) <= lipschitz_upper_bound(block)  # tight <= size-free
True

**Evaluation mode only.** A network in training mode computes another function (dropout scales its
kept inputs by ``1 / (1 - p)``, the CPL layers normalise by a power-iteration *under*-estimate of
their norm, batch norms use batch statistics), so :func:`lipschitz_upper_bound` refuses any module
with a part in training mode (``ValueError``: call ``model.eval()`` first) instead of bounding a
function other than the one that runs. Parts with forward hooks are refused too (a hook can change
the function). The bounds are for the exact-arithmetic functions the modules compute.
"""

import functools
import inspect
import math
import operator
from fractions import Fraction
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .precision import as_float64, float_up, ieee_precision, sqrt_up
from .spectral import (
    ROUNDING_MARGIN,
    conv_spectral_norm_fft,
    conv_spectral_norm_upper,
    dense_spectral_norm_upper,
)

__all__ = ["lipschitz_upper_bound"]

Shape = Optional[Tuple[int, ...]]

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


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _times_sqrt(bound: float, m: int) -> float:
    return bound if m == 1 else float_up(Fraction(bound) * Fraction(sqrt_up(Fraction(m))))


# ---------------------------------------------------------------------------------------------
# convolutions: x -> conv(x) = sum_{a,b} K[:, :, a, b] (x) S_ab x, S_ab a shift of the padded input
# ---------------------------------------------------------------------------------------------
def _conv_kernels(weight: torch.Tensor, groups: int, dilation) -> tuple:
    """Per group (block-diagonal: the norm is the max), the float64 kernel with zeros between taps."""
    w, (dh, dw) = as_float64(weight), dilation
    if (dh, dw) != (1, 1):
        wide = w.new_zeros(*w.shape[:2], dh * (w.shape[2] - 1) + 1, dw * (w.shape[3] - 1) + 1)
        wide[:, :, ::dh, ::dw] = w
        w = wide
    return w.chunk(groups, dim=0)


def _conv_pads(m: nn.Conv2d) -> tuple:
    """``((left, right) rows, (left, right) columns)`` of the padding ``m`` applies."""
    if m.padding == "valid":
        return ((0, 0), (0, 0))
    if m.padding == "same":  # torch pads d (k - 1) in all, the extra one on the right
        spans = [d * (k - 1) for d, k in zip(_pair(m.dilation), m.weight.shape[2:])]
        return tuple((t // 2, t - t // 2) for t in spans)
    return tuple((q, q) for q in _pair(m.padding))


def _tap_sum(kernels) -> float:
    """``max_g sum_{a,b} ||K_g[:, :, a, b]||_2``: ``||sum K_ab (x) S_ab|| <= sum ||K_ab|| ||S_ab||``, and
    ``S_ab`` (output pixel ``i`` reads padded pixel ``s i + a``: distinct rows, distinct pixels) has at
    most one 1 per row and column: norm <= 1. Any size, stride and dilation (zero taps add nothing)."""
    tap_norms = (torch.linalg.matrix_norm(k.permute(2, 3, 0, 1), ord=2).sum() for k in kernels)
    return max(float(t) for t in tap_norms) * (1 + ROUNDING_MARGIN)


def _copies(mode: str, n: Optional[int], left: int, right: int) -> int:
    """The most copies of one pixel that padding a row of ``n`` pixels makes (``n`` None: any size). The
    padded conv is ``V P``, ``V`` unpadded, ``P`` 0/1 with ``P^T P = diag(copies)``: ``||P|| = sqrt(max)``."""
    if mode == "zeros" or left + right == 0:
        return 1
    if n is None:  # torch needs pads < n (reflect), <= n (circular): each side adds at most one copy
        return 1 + left + right if mode == "replicate" else 1 + (left > 0) + (right > 0)
    j = torch.arange(-left, n + right)
    if mode == "circular":
        i = j % n
    elif mode == "reflect":
        i = j.abs()
        i = torch.where(i > n - 1, 2 * (n - 1) - i, i)
    else:
        i = j.clamp(0, n - 1)
    return int(torch.bincount(i, minlength=n).max())


def _circular_bound(kernels, size, pads) -> float:
    """Circular padding: output row ``i`` is row ``(i - left) mod n`` of the circular convolution on the
    ``n`` grid with the kernel folded modulo ``n`` (exact FFT norm), each row repeated at most
    ``ceil(rows / n)`` times."""
    norms = []
    for k in kernels:
        folded = k.new_zeros(*k.shape[:2], *size)
        for a in range(k.shape[2]):
            for b in range(k.shape[3]):
                folded[:, :, a % size[0], b % size[1]] += k[:, :, a, b]
        norms.append(float(conv_spectral_norm_fft(folded, size)) * (1 + ROUNDING_MARGIN))
    k_h, k_w = kernels[0].shape[2:]
    rows = [n + sum(lr) - k + 1 for n, lr, k in zip(size, pads, (k_h, k_w))]
    return _times_sqrt(max(norms), math.prod(-(-o // n) for o, n in zip(rows, size)))


def _conv2d_bound(m: nn.Conv2d, shape: Shape, out: Shape) -> float:
    kernels = _conv_kernels(m.weight, m.groups, _pair(m.dilation))
    pads, mode = _conv_pads(m), m.padding_mode
    free = _times_sqrt(_tap_sum(kernels), math.prod(_copies(mode, None, *lr) for lr in pads))
    if shape is None:
        return free
    size = tuple(shape[-2:])
    if mode == "zeros":  # asymmetric pads: a compression of the conv padded max(left, right) both sides
        pad = tuple(max(lr) for lr in pads)
        return min(free, max(float(conv_spectral_norm_upper(k, size, pad)) for k in kernels))
    copies = math.prod(_copies(mode, n, *lr) for n, lr in zip(size, pads))
    padded = tuple(n + sum(lr) for n, lr in zip(size, pads))
    bound = _times_sqrt(max(float(conv_spectral_norm_upper(k, padded, 0)) for k in kernels), copies)
    bound = min(free, bound)
    return min(bound, _circular_bound(kernels, size, pads)) if mode == "circular" else bound


def _conv_transpose2d_bound(m: nn.ConvTranspose2d, shape: Shape, out: Shape) -> float:
    """``conv_transpose2d`` is the adjoint of ``conv2d`` (same kernel, stride, padding) on inputs of its
    output size (restricted to its rows when ``output_padding >= stride``): the same norm bound."""
    kernels = _conv_kernels(m.weight, m.groups, _pair(m.dilation))
    if out is None:
        return _tap_sum(kernels)
    size, pad = tuple(out[-2:]), _pair(m.padding)
    return min(_tap_sum(kernels), max(float(conv_spectral_norm_upper(k, size, pad)) for k in kernels))


# ---------------------------------------------------------------------------------------------
# batch norm, pooling
# ---------------------------------------------------------------------------------------------
def _batch_norm_bound(m: nn.modules.batchnorm._BatchNorm, shape: Shape, out: Shape) -> float:
    """``x_c -> gamma_c (x_c - mu_c) / sqrt(var_c + eps) + beta_c`` is diagonal: the max ratio. Three float64
    roundings (sum, sqrt, division) err by less than ``3 u`` relative: margin ``4 u``."""
    if m.running_var is None:
        raise TypeError(
            f"{type(m).__name__} with track_running_stats=False normalises by each batch's statistics, even "
            "in evaluation mode, so it has no fixed Lipschitz constant; build it with "
            "track_running_stats=True or give your module a `lipschitz_bound()` method."
        )
    var = as_float64(m.running_var)
    gamma = as_float64(m.weight).abs() if m.weight is not None else torch.ones_like(var)
    ratio = float((gamma / (var + m.eps).sqrt()).max())
    return float_up(Fraction(ratio) * (1 + Fraction(4, 2**53))) if math.isfinite(ratio) else ratio


def _pool_1d_norm(pool, n: int) -> float:
    """``||A||`` of the 1-D pooling ``A`` on ``n`` pixels, applied to the identity (float64)."""
    columns = pool(torch.eye(n, dtype=torch.float64).reshape(n, 1, n, 1))  # row i: A e_i, i.e. A^T
    return float(dense_spectral_norm_upper(columns.reshape(n, -1)))


def _separable(norm_h: float, norm_w: float, divisor: int = 1) -> float:
    """2-D pooling with per-axis windows and divisors is ``A_h (x) A_w``: norm ``||A_h|| ||A_w||``."""
    return float_up(Fraction(norm_h) * Fraction(norm_w) / divisor)


def _avg_pool_bound(m: nn.AvgPool2d, shape: Shape, out: Shape) -> float:
    r"""Without the size, Schur's test ``||A||^2 <= max_i sum_j A_ij * max_j sum_i A_ij`` (``A >= 0``): a
    pixel lies in at most ``c = ceil(k_h/s_h) ceil(k_w/s_w)`` windows (window ``j`` along an axis covers
    ``[s j - p, s j - p + k)``: ``s j`` in an interval of ``k`` integers). Entries ``1/(k_h k_w)``, rows
    summing to <= 1: ``c / (k_h k_w)``. Divisor ``D``: rows ``k_h k_w / D``, columns ``c / D``. Otherwise
    (``count_include_pad=False`` with padding, ``ceil_mode``) entries ``1 / count <= 1``, rows 1: ``c``."""
    k, s, p = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding)
    d, c = m.divisor_override, math.ceil(k[0] / s[0]) * math.ceil(k[1] / s[1])
    if d:
        free = sqrt_up(Fraction(c * k[0] * k[1], d * d))
    elif not m.ceil_mode and (m.count_include_pad or p == (0, 0)):
        free = sqrt_up(Fraction(c, k[0] * k[1]))
    else:
        free = sqrt_up(Fraction(c))
    if shape is None:
        return free
    args = (m.ceil_mode, m.count_include_pad, 1 if d else None)
    pools = [lambda x, i=i: F.avg_pool2d(x, (k[i], 1), (s[i], 1), (p[i], 0), *args) for i in range(2)]
    return min(free, _separable(*(_pool_1d_norm(f, n) for f, n in zip(pools, shape[-2:])), d or 1))


def _adaptive_avg_pool_bound(m: nn.AdaptiveAvgPool2d, shape: Shape, out: Shape) -> float:
    if shape is None:
        raise ValueError(
            "the norm of AdaptiveAvgPool2d depends on its input size; pass "
            "lipschitz_upper_bound(model, input_shape=(C, H, W)), the shape of one input without the batch."
        )
    pools = [lambda x, o=o: F.adaptive_avg_pool2d(x, (o, 1)) for o in out[-2:]]
    return _separable(*(_pool_1d_norm(pool, n) for pool, n in zip(pools, shape[-2:])))


def _max_pool_bound(m: nn.MaxPool2d, shape: Shape, out: Shape) -> float:
    """``|max_W x - max_W y| <= max_{i in W} |x_i - y_i|``, so ``||f(x) - f(y)||^2 <= sum_W sum_{i in W}
    (x_i - y_i)^2 <= (most windows per pixel) ||x - y||^2``; windows per pixel as in ``_avg_pool_bound``,
    along an axis at most ``k`` and ``ceil((d (k - 1) + 1) / s)``."""
    if m.return_indices:
        raise TypeError("MaxPool2d(return_indices=True) returns (values, indices); bound it without indices.")
    k, s, d = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.dilation)
    c = [min(k[i], -(-(d[i] * (k[i] - 1) + 1) // s[i])) for i in range(2)]
    return sqrt_up(Fraction(c[0] * c[1]))


# ---------------------------------------------------------------------------------------------
# smooth activations: sup |f'| over R, proven on a grid
# ---------------------------------------------------------------------------------------------
def _silu_slope(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _gelu_tanh_slope(x: torch.Tensor) -> torch.Tensor:
    c, a = math.sqrt(2 / math.pi), 0.044715  # torch's constants
    t = torch.tanh(c * (x + a * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * a * x * x)


#: name: (f', L, M2 >= sup_{|x| <= L} |f''|, T >= sup_{|x| >= L} |f'|).
#: SiLU: f'' = s (1 - s) (2 - x tanh(x/2)), |f''| <= min(1/4, e^-|x|) (2 + |x|) <= (2 + ln 4) / 4 < 0.85;
#: for x >= 16, 0 < f' <= 1 + x e^-x; for x <= -16, |f'| <= e^-|x| (1 + |x|).
#: GELU tanh, t = tanh(z), z = c (x + a x^3): f'' = sech^2(z) z' - x t sech^2(z) z'^2 + x sech^2(z) z'' / 2
#: with |t sech^2| <= 2 / 3^1.5, z' <= 2.511, |z''| <= 0.857 on |x| <= 4: |f''| <= 13.93 < 14; for |x| >= 4,
#: |f' - 1[x > 0]| <= e^{-2|z|} + 2 |x| z' e^{-2|z|} <= 4e-4 (decreasing in |x|).
_SMOOTH = {"silu": (_silu_slope, 16.0, 0.85, 1.001), "gelu_tanh": (_gelu_tanh_slope, 4.0, 14.0, 1.001)}


@functools.lru_cache(maxsize=None)
def _sup_abs(name: str) -> float:
    """A guaranteed upper bound of ``sup_R |f'|``: ``|f'|`` is ``M2``-Lipschitz on ``[-L, L]``, so on a cell
    of width ``w`` around ``c``, ``|f'| <= |f'(c)| + M2 w / 2`` (plus ``1e-12`` for the float64 evaluation
    at the exact dyadic point ``c``). Cells whose bound is below the best value found cannot hold the
    supremum and are dropped; the others are split 16-fold until ``M2 w / 2 < 1e-6``."""
    slope, half, m2, tail = _SMOOTH[name]
    width, left = 2 * half, torch.tensor([-half], dtype=torch.float64)
    while True:
        width /= 16
        left = (left[:, None] + width * torch.arange(16, dtype=torch.float64)).flatten()
        value = slope(left + width / 2).abs()
        upper = value + (m2 * width / 2 + 1e-12)
        if m2 * width / 2 < 1e-6:
            return float_up(max(Fraction(tail), Fraction(float(upper.max()))))
        left = left[upper >= value.max() - 1e-12]


def _gelu_bound(m: nn.GELU, shape: Shape, out: Shape) -> float:
    if m.approximate == "tanh":
        return _sup_abs("gelu_tanh")
    # f' = Phi + x phi rises on [-sqrt 2, sqrt 2], falls outside, f'(-x) = 1 - f'(x): sup |f'| = f'(sqrt 2);
    # math.erf and math.exp err by a few ulps: margin 1e-12 relative
    peak = (1 + math.erf(1)) / 2 + 1 / (math.e * math.sqrt(math.pi))
    return float_up(Fraction(peak) * (1 + Fraction(1, 10**12)))


def _one_if(ok, message: str):
    """1 when ``ok(module)``, else ``TypeError(message)``."""

    def rule(m: nn.Module, shape: Shape, out: Shape) -> float:
        if not ok(m):
            raise TypeError(f"{m!r} {message}")
        return 1.0

    return rule


def _one(m: nn.Module, shape: Shape, out: Shape) -> float:
    return 1.0


def _constant(value: Fraction):
    return lambda m, shape, out: float_up(value)


#: module type -> rule(module, input shape or None, output shape or None) -> float.
_RULES = {
    nn.Linear: lambda m, shape, out: float(dense_spectral_norm_upper(m.weight)),
    nn.Conv2d: _conv2d_bound,
    nn.ConvTranspose2d: _conv_transpose2d_bound,
    nn.BatchNorm1d: _batch_norm_bound,
    nn.BatchNorm2d: _batch_norm_bound,
    nn.BatchNorm3d: _batch_norm_bound,
    nn.AvgPool2d: _avg_pool_bound,
    nn.AdaptiveAvgPool2d: _adaptive_avg_pool_bound,
    nn.MaxPool2d: _max_pool_bound,
    nn.GELU: _gelu_bound,
    nn.SiLU: lambda m, shape, out: _sup_abs("silu"),
    # Softplus: slope sigmoid(beta x) < 1, but for beta x > threshold torch returns x: a jump of
    # log1p(exp(-threshold)) / beta: 2e-9 / beta at threshold 20 (default), under float32's spacing there
    nn.Softplus: _one_if(lambda m: m.threshold >= 20, "jumps where it switches to x; use threshold >= 20."),
    nn.CELU: _one_if(lambda m: m.alpha > 0, "has an unbounded slope for x < 0; use alpha > 0."),  # e^(x/a)
    nn.Sigmoid: _constant(Fraction(1, 4)),
    nn.Hardsigmoid: _constant(Fraction(1, 6)),
    nn.Hardswish: _constant(Fraction(3, 2)),  # x (x + 3) / 6 on [-3, 3]: slope (2 x + 3) / 6
    nn.SELU: _constant(Fraction(1.0507009873554805) * Fraction(1.6732632423543772)),  # torch's constants
    nn.LeakyReLU: lambda m, shape, out: max(1.0, abs(m.negative_slope)),
    nn.ELU: lambda m, shape, out: max(1.0, abs(m.alpha)),  # slopes 1 and alpha e^x
    nn.PReLU: lambda m, shape, out: max(1.0, float(as_float64(m.weight).abs().max())),
}
#: 1-Lipschitz: slopes in [0, 1] (or [-1, 1]), isometries (permutations, reshapes), dropout in evaluation.
_ONE_LIPSCHITZ = (
    *(nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.LogSigmoid),
    *(nn.Identity, nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle),
    *(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout),
)
_RULES.update((t, _one) for t in _ONE_LIPSCHITZ)


def _rule_for(module: nn.Module):
    """The rule of the nearest listed base class, unless the module's class overrides its forward."""
    for base in type(module).__mro__:
        if base in _RULES:
            names = ("forward", "_conv_forward")
            same = all(getattr(type(module), n, None) is getattr(base, n, None) for n in names)
            return _RULES[base] if same else None
    return None


# ---------------------------------------------------------------------------------------------
# the walk
# ---------------------------------------------------------------------------------------------
def _output_shape(module: nn.Module, shape: Shape) -> Shape:
    """The shape of ``module(zeros(1, *shape))[0]`` (None when ``shape`` is None or the output no tensor)."""
    if shape is None:
        return None
    ref = next((t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), None)
    dtype, device = (torch.float64, "cpu") if ref is None else (ref.dtype, ref.device)
    try:
        with torch.no_grad():
            y = module(torch.zeros((1, *shape), dtype=dtype, device=device))
    except Exception as err:  # any failure means the shape does not fit this part
        raise ValueError(
            f"{type(module).__name__} cannot take inputs of shape {shape} ({err}); input_shape is the shape "
            "of one input of the model without the batch dimension, e.g. (3, 32, 32)."
        ) from err
    return tuple(y.shape[1:]) if isinstance(y, torch.Tensor) else None


def _own_bound(module: nn.Module, shape: Shape) -> float:
    if "input_shape" in inspect.signature(module.lipschitz_bound).parameters:
        return float(module.lipschitz_bound(input_shape=shape))
    return float(module.lipschitz_bound())


def _product(parts) -> float:
    if not all(math.isfinite(b) for b in parts):  # nan (a broken part) or inf propagate
        return math.fsum(parts)
    return float_up(math.prod(map(Fraction, parts)))  # the exact product, rounded up


def _bound(module: nn.Module, shape: Shape) -> Tuple[float, Shape]:
    """``(bound, output shape)`` of ``module`` on inputs of ``shape`` (None: unknown)."""
    if module._forward_hooks or module._forward_pre_hooks:
        raise TypeError(
            f"{type(module).__name__} has forward hooks, which may change its function; remove them or "
            "bound the function without them."
        )
    if hasattr(module, "lipschitz_bound"):
        return _own_bound(module, shape), _output_shape(module, shape)
    sequential = isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
    rule = None if sequential else _rule_for(module)
    if not sequential and rule is None:
        raise TypeError(
            f"lipschitz_upper_bound does not know a sound bound for {type(module).__name__}; give the module "
            "a `lipschitz_bound()` method returning a guaranteed upper bound (a container: combine "
            "lipschitz_upper_bound of its children; see the protocol in cpl_mini.bounds)."
        )
    if not sequential:
        out = _output_shape(module, shape)
        return float(rule(module, shape, out)), out
    parts = []
    for child in module:
        part, shape = _bound(child, shape)
        parts.append(part)
    return _product(parts), shape


def lipschitz_upper_bound(module: nn.Module, input_shape: Optional[Sequence[int]] = None) -> float:
    """A guaranteed upper bound of the l2 Lipschitz constant of ``module`` in evaluation mode.

    For ``nn.Sequential``, the product of its parts' bounds (exact, rounded up); the parts known (modules
    with a ``lipschitz_bound()`` method, torch layers) and the protocol: the module docstring.

    Args:
        module: the network, in evaluation mode.
        input_shape: one input's shape without the batch dimension, ``(C, H, W)`` or ``(features,)``;
            optional. Carried through an ``nn.Sequential`` part by part, it gives ``nn.Conv2d`` and
            ``nn.AvgPool2d`` their tight, size-dependent bounds (without it: looser size-independent
            ones) and is required by ``nn.AdaptiveAvgPool2d``.

    Raises:
        TypeError: a part without a known sound bound (give it a ``lipschitz_bound()`` method).
        ValueError: a part in training mode (call ``.eval()``), or an ``input_shape`` that does not fit.

    Runs with TF32 off (:func:`~cpl_mini.ieee_precision`).

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
        >>> pool = nn.Sequential(nn.AvgPool2d(2), nn.Flatten()).eval()  # 2x2 means: norm 1/2
        >>> lipschitz_upper_bound(pool), lipschitz_upper_bound(pool, input_shape=(3, 8, 8))
        (0.5, 0.5)
    """
    _check_eval_mode(module)
    with ieee_precision():
        return _bound(module, None if input_shape is None else _checked_shape(input_shape))[0]


def _checked_shape(input_shape) -> Tuple[int, ...]:
    try:
        shape = tuple(operator.index(n) for n in input_shape)
    except TypeError:
        shape = ()
    if not shape or min(shape) < 1:
        raise ValueError(
            "input_shape must be positive ints without the batch dimension, e.g. (3, 32, 32); "
            f"got {input_shape!r}"
        )
    return shape
