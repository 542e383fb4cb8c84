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

The convolutional layer :class:`SLLConv2d` replaces ``W`` by a zero-padded stride-1 convolution with a
kernel ``K`` of shape ``(m, C, k, k)`` and ``W W^T`` by the gram kernel ``K * K^T`` of shape
``(m, m, 2k - 1, 2k - 1)`` (:func:`~cpl_mini.normalized.conv_gram_kernel` of ``K^T``):

.. math::  z = x - 2\, \operatorname{conv\_transpose2d}\big(T^{-1}
           \mathrm{ReLU}(\operatorname{conv2d}(x, K, b)), K\big), \qquad
           t_i = \sum_j \sum_{u, v} |K \star K^\top|_{ij}(u, v)\, q_j / q_i .
"""

import math
from fractions import Fraction
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .normalized import conv_gram_kernel, conv_gram_kernel_abs_upper
from .precision import as_float64, check_last_dim, float_up, gamma, ieee_precision
from .spectral import ROUNDING_MARGIN, conv_spectral_norm_upper

__all__ = ["sll_t", "sll_residual", "SLLLinear", "sll_conv_t", "SLLConv2d"]


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


# ------------------------------------------------------------------------------------- convolutions
def sll_conv_t(kernel: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    r"""The diagonal ``t`` of ``T`` of a convolution: ``t_i = sum_{j,u,v} |K * K^T|_{ij}(u,v) q_j / q_i``.

    ``K * K^T`` is the gram kernel over the ``m`` inner channels, ``conv2d(K, K, padding=k-1)``, shape
    ``(m, m, 2k - 1, 2k - 1)``: the kernel of ``A A^T`` for ``A = conv2d(., K)``.

    Args:
        kernel: ``K``, shape ``(m, C, k_h, k_w)``.
        q: positive weights, shape ``(m,)``.
        eps: ``t_i`` is raised to at least ``eps`` (a larger ``t_i`` never breaks the bound).
    Returns:
        ``t``, shape ``(m,)``, differentiable in ``K`` and ``q``.
    """
    if kernel.dim() != 4:
        raise ValueError(f"sll_conv_t expects a kernel of shape (m, C, k, k), got {tuple(kernel.shape)}")
    if q.shape != (kernel.shape[0],):
        raise ValueError(
            f"q must have shape ({kernel.shape[0]},) to match the kernel {tuple(kernel.shape)}, "
            f"got {tuple(q.shape)}"
        )
    gram = conv_gram_kernel(kernel.transpose(0, 1)).abs().sum(dim=(2, 3))  # (m, m)
    return (gram @ q / q).clamp_min(eps)


class SLLConv2d(nn.Module):
    r"""Convolutional SDP-based Lipschitz Layer (Araujo et al. 2023):

    .. math::  z = x - 2\, \operatorname{conv\_transpose2d}\big(T^{-1}
               \mathrm{ReLU}(\operatorname{conv2d}(x, K, b)), K\big),

    zero padding ``k // 2``, stride 1, ``T = diag(t)`` over the inner channels (:func:`sll_conv_t`),
    ``q = exp(log_q)`` learnable. Computed exactly at each forward: the same function in both modes.

    **Why it is 1-Lipschitz for every input size.** Let ``A`` be the convolution on ``C x H x W``
    images. The Jacobian is ``I - 2 B^T D B`` with ``B = T^{-1/2} A`` and ``D`` diagonal in ``[0, 1]``
    (the ReLU slopes), so its eigenvalues lie in ``[1 - 2 ||B||^2, 1]`` and it suffices that
    ``A A^T <= T``. Write ``A = P_out C P_in`` with ``C`` the convolution on the whole plane, ``P_in``
    the embedding of the image and ``P_out`` the restriction to it; then
    ``A A^T <= P_out C C^T P_out^T =: M`` (``P_in P_in^T <= I``), whose entries are
    ``H_{ab}(x - x')`` between pixels ``x, x'`` of the image, ``H = K * K^T``: the compression of the
    gram kernel's Toeplitz operator. Conjugated by ``diag(q)``, row ``(a, x)`` of ``T - M`` has diagonal
    ``t_a - H_{aa}(0)`` and off-diagonal mass at most ``sum_{(b, u) != (a, 0)} |H_{ab}(u)| q_b / q_a =
    t_a - H_{aa}(0)``: by Gershgorin ``T - M`` (symmetric) is positive semi-definite, for every image size.

    **The bound** (:meth:`lipschitz_bound`, no input size needed): the same Gershgorin argument on
    ``T^{-1/2} M T^{-1/2}`` with the similarity ``diag(q_b t_b^{1/2})`` and the ``t`` the forward computed
    (in its dtype, rounded) gives ``||B||^2 <= r = max_a sum_{b,u} |H_{ab}(u)| q_b / (q_a t_a)`` (about
    1), computed in float64 with its rounding errors bounded (Higham's ``gamma``); the layer's
    constant is at most ``max(1, 2 r - 1)``, rounded up.

    Args:
        channels: ``C``, channels of the input and output.
        inner_channels: ``m``, output channels of the inner convolution (default ``C``).
        kernel_size: odd ``k``.
        bias: learn ``b`` (shape ``(m,)``).

    Shape: input ``(N, C, H, W)``, output ``(N, C, H, W)``, any ``H, W``.
    """

    def __init__(
        self,
        channels: int,
        inner_channels: Optional[int] = None,
        kernel_size: int = 3,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        inner_channels = channels if inner_channels is None else inner_channels
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (padding k//2 keeps the size), got {kernel_size}")
        if channels < 1 or inner_channels < 1:
            raise ValueError(
                f"channels and inner_channels must be positive, got {channels}, {inner_channels}"
            )
        self.channels, self.inner_channels = int(channels), int(inner_channels)
        self.kernel_size, self.padding = int(kernel_size), int(kernel_size) // 2
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(inner_channels, channels, kernel_size, kernel_size, **kw))
        self.bias = nn.Parameter(torch.empty(inner_channels, **kw)) if bias else None
        self.log_q = nn.Parameter(torch.empty(inner_channels, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            b = 1.0 / math.sqrt(self.channels * self.kernel_size**2)
            nn.init.uniform_(self.bias, -b, b)
        nn.init.zeros_(self.log_q)  # q = 1 at start

    def q(self) -> torch.Tensor:
        """The positive weights ``q = exp(log_q)``, shape ``(m,)``."""
        return self.log_q.exp()

    def t(self) -> torch.Tensor:
        """The diagonal of ``T``, shape ``(m,)`` (differentiable in ``K`` and ``q``)."""
        return sll_conv_t(self.weight, self.q())

    def _check_input(self, x):
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"SLLConv2d expects inputs of shape (N, {self.channels}, H, W), got {tuple(x.shape)}; "
                "add a batch dimension with x.unsqueeze(0) for a single image, or pad the channels "
                "first (ChannelPad)."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        y = F.relu(F.conv2d(x, self.weight, self.bias, padding=self.padding)) / self.t()[:, None, None]
        return x - 2.0 * F.conv_transpose2d(y, self.weight, padding=self.padding)

    def contraction_ratio(self, input_size: Union[None, int, Sequence[int]] = None) -> float:
        r"""A guaranteed upper bound of ``r = ||T^{-1/2} A||^2`` with the ``t`` the forward uses.

        Without ``input_size``: the Gershgorin bound above, valid for every input size (about 1).
        With ``input_size`` (``n`` or ``(H, W)``): the smaller of it and the square of
        :func:`~cpl_mini.conv_spectral_norm_upper` of the float64 kernel ``T^{-1/2} K`` on that
        size (the exact norm of a circular convolution that contains ``A``, plus a relative margin).
        """
        with torch.no_grad():
            t = as_float64(self.t())
            q = as_float64(self.q())
        q = torch.where((q > 0) & q.isfinite(), q, torch.ones_like(q))  # any positive similarity is sound
        gram = conv_gram_kernel_abs_upper(self.weight.transpose(0, 1)).sum(dim=(2, 3))  # (m, m)
        rows = (gram @ q) / q / t
        terms = self.inner_channels * (2 * self.kernel_size - 1) ** 2 + 6
        r = float_up(Fraction(float(rows.max())) * (1 + Fraction(gamma(terms))))
        if input_size is None:
            return r
        with torch.no_grad(), ieee_precision():
            scaled = as_float64(self.weight) * t.rsqrt()[:, None, None, None]
            norm = float(conv_spectral_norm_upper(scaled, input_size, self.padding))
        return min(r, float_up(Fraction(norm) ** 2 * (1 + Fraction(ROUNDING_MARGIN))))

    def lipschitz_bound(self) -> float:
        """A guaranteed upper bound ``max(1, 2 r - 1)`` of the layer's constant on inputs of every size,
        ``r`` the size-independent :meth:`contraction_ratio` (exactly 1 up to rounding)."""
        r = Fraction(self.contraction_ratio())
        return max(1.0, float_up(2 * r - 1))

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, inner_channels={self.inner_channels}, kernel_size={self.kernel_size}, "
            f"bias={self.bias is not None}"
        )
