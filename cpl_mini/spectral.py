"""Spectral norms of linear operators: power iteration, exact values and guaranteed upper bounds.

For a linear operator ``A`` the spectral norm is ``||A||_2 = max_{x != 0} ||A x|| / ||x||``, the
largest singular value. A certificate needs an *upper* bound of it; power iteration only gives a
*lower* estimate (it converges from below), so it is used for training, never for certificates.
"""

import contextlib
import math
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .precision import as_float64, float64_device, ieee_precision

__all__ = [
    "power_iteration",
    "dense_spectral_norm",
    "dense_spectral_norm_upper",
    "conv_spectral_norm_fft",
    "conv_spectral_norm_upper",
    "conv_operator",
]


def _normalize(x, eps=1e-12):
    return x / x.norm().clamp_min(eps)


Operator = Callable[[torch.Tensor], torch.Tensor]


def power_iteration(
    op: Operator, op_adjoint: Operator, x0: torch.Tensor, n_iter: int = 1, eps: float = 1e-12
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Estimate ``||A||_2`` by power iteration on ``A^T A``.

    ``x <- A^T A x / ||A^T A x||`` repeated ``n_iter`` times (no gradient through these updates),
    then ``sigma = ||A x||`` with ``x`` of unit norm. ``sigma`` is differentiable with respect to
    whatever ``op`` depends on (e.g. a layer's weight), as in the paper's training scheme.

    Args:
        op: callable ``x -> A x``.
        op_adjoint: callable ``y -> A^T y`` (the exact adjoint of ``op``).
        x0: starting vector, any shape ``op`` accepts (e.g. ``(1, C, H, W)``). Keep the returned
            vector and pass it back at the next call: with a persistent vector, one iteration per
            training step tracks the norm as the weights move.
        n_iter: number of iterations (``>= 0``).

    Returns:
        ``(sigma, x)``: the estimate (0-dim tensor, a *lower* bound of ``||A||_2`` up to rounding)
        and the final unit vector (detached).

    The estimate never exceeds the true norm: ``||A x|| <= ||A|| ||x||``.
    """
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    with torch.no_grad():
        x = _normalize(x0.detach(), eps)
        for _ in range(n_iter):
            x = _normalize(op_adjoint(op(x)), eps)
    sigma = op(x).norm()
    return sigma, x


#: Relative margin added to the float64 computations of the upper bounds, far above their rounding
#: error (about ``n * 1e-16``), so that a "guaranteed upper bound" stays one after rounding.
ROUNDING_MARGIN = 1e-9


def dense_spectral_norm(weight: torch.Tensor) -> torch.Tensor:
    """Exact ``||W||_2`` of a matrix ``(out, in)`` in float64 (a float64 0-dim tensor).

    Computed as ``sqrt(lambda_max(G))`` with ``G`` the smaller of ``W W^T`` and ``W^T W`` (symmetric
    eigenvalues), the same value as the largest singular value and 2-3x faster than an SVD for the
    wide matrices of the dense CPL layers.
    """
    if weight.dim() != 2:
        raise ValueError(f"dense_spectral_norm expects a matrix (out, in), got shape {tuple(weight.shape)}")
    w = as_float64(weight)
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt()


def dense_spectral_norm_upper(weight: torch.Tensor) -> torch.Tensor:
    """A guaranteed upper bound of ``||W||_2``: the exact value plus a relative rounding margin."""
    return dense_spectral_norm(weight) * (1 + ROUNDING_MARGIN)


def _check_kernel(kernel):
    if kernel.dim() != 4:
        raise ValueError(
            "expected a conv2d kernel of shape (out_channels, in_channels, k_h, k_w), "
            f"got {tuple(kernel.shape)}"
        )


def _fft_norm(kernel, size):
    """max over the frequencies of the FFT grid ``size`` of the largest singular value (float64)."""
    k = as_float64(kernel)
    symbol = torch.fft.fft2(k, s=size)  # (cout, cin, n1, n2), complex128
    symbol = symbol.permute(2, 3, 0, 1).reshape(-1, k.shape[0], k.shape[1])
    return torch.linalg.matrix_norm(symbol, ord=2).max()


def conv_spectral_norm_fft(kernel: torch.Tensor, n: Union[int, Sequence[int]]) -> torch.Tensor:
    """Exact spectral norm of the *circular* convolution with ``kernel`` on an ``n x n`` grid.

    The operator is block-diagonalised by the 2-D DFT (Sedghi et al., 2019): with
    ``A = fft2(kernel, s=(n, n))`` of shape ``(cout, cin, n, n)``,
    ``||conv||_2 = max_{u,v} sigma_max(A[:, :, u, v])``.

    Args:
        kernel: ``(out_channels, in_channels, k, k)``, with ``k <= n``.
        n: grid size (int or ``(n1, n2)``).
    Returns:
        float64 0-dim tensor.
    """
    _check_kernel(kernel)
    size = (n, n) if isinstance(n, int) else tuple(n)
    if size[0] < kernel.shape[2] or size[1] < kernel.shape[3]:
        raise ValueError(f"grid {size} is smaller than the kernel {tuple(kernel.shape[2:])}")
    return _fft_norm(kernel, size)


def conv_spectral_norm_upper(
    kernel: torch.Tensor,
    input_size: Union[int, Sequence[int]],
    padding: Union[None, int, Sequence[int]] = None,
) -> torch.Tensor:
    """A **guaranteed upper bound** of ``||conv2d(., kernel, padding)||_2`` on inputs of ``input_size``.

    The zero-padded convolution on ``n x n`` inputs is a compression (restrict the input to the
    embedded ``n x n`` block, restrict the output) of the circular convolution on the grid
    ``N = n + max(2 p, k - 1)``, large enough that nothing wraps around; so the exact FFT norm of
    that circular convolution bounds it from above. Computed in float64.

    Args:
        kernel: ``(out_channels, in_channels, k_h, k_w)``.
        input_size: ``n`` or ``(n_h, n_w)``.
        padding: zero padding (int or pair); default ``k // 2`` ("same").
    Returns:
        float64 0-dim tensor ``>=`` the true norm (a relative margin of ``ROUNDING_MARGIN`` covers rounding).
    """
    _check_kernel(kernel)
    n_h, n_w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    k_h, k_w = kernel.shape[2], kernel.shape[3]
    if padding is None:
        padding = (k_h // 2, k_w // 2)
    p_h, p_w = (padding, padding) if isinstance(padding, int) else tuple(padding)
    size = (n_h + max(2 * p_h, k_h - 1), n_w + max(2 * p_w, k_w - 1))
    return _fft_norm(kernel, size) * (1 + ROUNDING_MARGIN)


def conv_operator(
    kernel: torch.Tensor, padding: Union[None, int, Sequence[int]] = None
) -> Tuple[Operator, Operator]:
    """The pair ``(op, op_adjoint)`` of a stride-1 zero-padded convolution, for :func:`power_iteration`.

    ``op(x) = conv2d(x, kernel, padding)`` and ``op_adjoint(y) = conv_transpose2d(y, kernel, padding)``,
    its exact adjoint: ``<op(x), y> = <x, op_adjoint(y)>``.
    """
    _check_kernel(kernel)
    if padding is None:
        padding = (kernel.shape[2] // 2, kernel.shape[3] // 2)

    def op(x):
        return F.conv2d(x, kernel, padding=padding)

    def op_adjoint(y):
        return F.conv_transpose2d(y, kernel, padding=padding)

    return op, op_adjoint


# ---------------------------------------------------------------------------------------------
# Gram iteration (Delattre et al., 2023): fast guaranteed upper bounds
# ---------------------------------------------------------------------------------------------
__all__ += ["gram_iteration_dense", "gram_iteration_conv"]


def _check_n_iter(n_iter):
    if int(n_iter) != n_iter or n_iter < 0:
        raise ValueError(f"n_iter must be an integer >= 0, got {n_iter!r}")
    return int(n_iter)


def _gram_bound(g, n_iter, prune=False):
    r"""Gram iteration on a batch of matrices ``g`` of shape ``(..., m, n)`` (float64 or complex128).

    With ``G_0 = A`` and ``G_{t+1} = G_t^H G_t`` one has ``||A||_2^{2^t} = ||G_t||_2 <= ||G_t||_F``, so
    ``||A||_2 <= ||G_t||_F^{1/2^t}``. ``A`` is first divided by its largest entry, then each ``G_t`` by
    its Frobenius norm before it is squared, and the logarithm of the scale is carried along
    (``log c_{t+1} = 2 (log c_t + log ||G_t||_F)``), so nothing overflows or underflows.

    ``prune=True`` (a batch ``(B, m, n)`` whose *maximum* is wanted) drops, after each step, the matrices
    that cannot hold the maximum: for ``t >= 1``, ``G_t`` is Hermitian positive semi-definite, so
    ``lambda_max(G_t) >= ||G_t||_F^2 / tr(G_t)`` gives a lower bound of each ``||A_b||_2``, and a matrix whose
    upper bound is below the largest of these lower bounds is not the maximiser. The maximum of the
    returned bounds is unchanged (up to rounding); only the work shrinks.

    Returns the bounds of the matrices kept (all of them without pruning), float64, shape ``(...)``.
    """
    # divide by the largest entry first (|re| and |im| for complex entries), so that the squares in the
    # Frobenius norms neither overflow nor underflow whatever the scale of the input
    peak = _entrywise_norm(g, float("inf"))
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    g = g / peak[..., None, None]
    log_scale = peak.log()
    for t in range(1, n_iter + 1):
        fro = _frobenius(g)
        fro = torch.where(fro > 0, fro, torch.ones_like(fro))  # a zero matrix stays zero
        log_scale = 2.0 * (log_scale + fro.log())
        g = g.div_(fro[..., None, None])  # g is a fresh tensor here (never the caller's input)
        # now G_t (up to the scale exp(log_scale)); from t = 2 on, G_{t-1} is Hermitian, so G^H G = G G
        g = (g.mH.resolve_conj() if t == 1 else g) @ g
        if prune and t < n_iter and g.dim() == 3 and g.shape[0] > 1:
            fro = _frobenius(g)
            trace = torch.diagonal(g, dim1=-2, dim2=-1).real.sum(-1)
            ok = (fro > 0) & (trace > 0)
            tiny = torch.finfo(torch.float64).tiny
            log_upper = (log_scale + fro.clamp_min(tiny).log()) / 2.0**t
            log_lower = (log_scale + 2 * fro.clamp_min(tiny).log() - trace.clamp_min(tiny).log()) / 2.0**t
            if bool(ok.any()):
                # keep every candidate, with a margin (1e-9 relative) far above rounding error
                keep = log_upper >= log_lower[ok].max() - 1e-9
                if not bool(keep.all()):
                    g, log_scale = g[keep], log_scale[keep]
    fro = _frobenius(g)
    log_bound = (log_scale + fro.clamp_min(torch.finfo(torch.float64).tiny).log()) / 2.0**n_iter
    return torch.where(fro > 0, log_bound.exp(), torch.zeros_like(log_bound))


def _entrywise_norm(g, ord):
    """``ord``-norms of the entries (real and imaginary parts) of a batch ``(..., m, n)`` of matrices."""
    if g.is_complex():
        return torch.linalg.vector_norm(torch.view_as_real(g.resolve_conj()), ord=ord, dim=(-3, -2, -1))
    return torch.linalg.vector_norm(g, ord=ord, dim=(-2, -1))


def _frobenius(g):
    """Frobenius norms of a batch ``(..., m, n)`` of real or complex matrices (float64, shape ``(...)``)."""
    return _entrywise_norm(g, 2)


def gram_iteration_dense(weight: torch.Tensor, n_iter: int = 6) -> torch.Tensor:
    r"""A **guaranteed upper bound** of ``||W||_2`` by Gram iteration (Delattre et al., 2023), float64.

    ``G_0 = W``, ``G_{t+1} = G_t^T G_t``; since ``G_t`` is symmetric positive semi-definite for
    ``t >= 1``, ``||G_t||_2 = ||W||_2^{2^t}`` and

    .. math::  \|W\|_2 \le \|G_t\|_F^{1/2^t} = \Big(\sum_i \sigma_i^{2^{t+1}}\Big)^{1/2^{t+1}}
               \le \mathrm{rank}(W)^{1/2^{t+1}}\, \|W\|_2 ,

    a bound that never increases with ``t`` and converges to ``||W||_2`` (doubly exponentially in
    ``t``: the ratio ``sigma_2 / sigma_1`` is raised to the power ``2^{t+1}``). The iteration starts on
    the smaller side (``W W^T`` or ``W^T W``); each ``G_t`` is rescaled by its Frobenius norm (the
    log of the scale is carried along), so it never overflows, whatever ``n_iter``.

    Args:
        weight: matrix ``(out, in)``.
        n_iter: number ``t`` of Gram steps (``>= 0``; 0 gives the Frobenius norm of ``W``).
    Returns:
        float64 0-dim tensor ``>= ||W||_2`` (a relative margin of ``ROUNDING_MARGIN`` covers rounding).

    Cost: ``t`` products of ``min(out, in)``-sized matrices, no SVD.
    """
    if weight.dim() != 2:
        raise ValueError(f"gram_iteration_dense expects a matrix (out, in), got shape {tuple(weight.shape)}")
    n_iter = _check_n_iter(n_iter)
    w = as_float64(weight)
    if w.shape[0] < w.shape[1]:  # G_1 = G_0^T G_0 then has the smaller size
        w = w.T
    return _gram_bound(w, n_iter) * (1 + ROUNDING_MARGIN)


def _half_symbol(kernel, size):
    """``rfft2(kernel, s=size)`` as a batch ``(N_h * (N_w // 2 + 1), cout, cin)`` of complex128 matrices.

    Computed as the direct sum ``sum_{a,b} kernel[:, :, a, b] exp(-2 pi i (u a / N_h + v b / N_w))`` (the
    same numbers as the FFT): with ``k x k`` kernels much smaller than the grid this costs
    ``O(cout cin N^2 k)`` and lands directly in the frequency-major layout the batched products need.
    """
    n_h, n_w = size
    k_h, k_w = kernel.shape[2], kernel.shape[3]
    dev = kernel.device

    def phases(n, k, count):  # (count, k): exp(-2 pi i (f * a mod n) / n), exact reduction of the angle
        f = torch.arange(count, device=dev)[:, None] * torch.arange(k, device=dev)[None, :]
        one = torch.ones((), dtype=torch.float64, device=dev)
        return torch.polar(one, -2 * math.pi * (f % n).double() / n)

    e_h = phases(n_h, k_h, n_h)
    e_w = phases(n_w, k_w, n_w // 2 + 1)
    symbol = torch.einsum("ua,ocab,vb->uvoc", e_h, kernel.to(torch.complex128), e_w)
    return symbol.reshape(-1, kernel.shape[0], kernel.shape[1])


def gram_iteration_conv(
    kernel: torch.Tensor,
    input_size: Union[int, Sequence[int]],
    padding: Union[None, int, Sequence[int]] = None,
    n_iter: int = 6,
) -> torch.Tensor:
    r"""A **guaranteed upper bound** of ``||conv2d(., kernel, padding=padding)||_2`` on ``input_size``
    inputs, by Gram iteration on the convolution's Fourier symbol (Delattre et al., 2023), float64.

    The zero-padded convolution on ``n x n`` inputs is a compression of the circular convolution on the
    enlarged grid ``N = n + max(2 p, k - 1)`` (as in :func:`conv_spectral_norm_upper`), whose norm is
    ``max_{u,v} ||A(u, v)||_2`` with ``A = fft2(kernel, s=N)`` (Sedghi et al., 2019). Instead of an SVD
    per frequency, each ``A(u, v)`` gets the Gram-iteration bound of :func:`gram_iteration_dense`,
    batched over all frequencies; the maximum of these bounds is returned. So

    ``exact zero-padded norm <= circular norm on the N grid <= gram_iteration_conv(..., n_iter)``,

    non-increasing in ``n_iter`` and converging to the circular norm on the ``N`` grid (the exact value
    of :func:`conv_spectral_norm_upper`). A real kernel has a conjugate-symmetric symbol, so only the
    half spectrum of ``rfft2`` is needed; after each step the frequencies that provably cannot hold the
    maximum are dropped (see ``_gram_bound``), which leaves the result unchanged and the work smaller.

    Args:
        kernel: ``(out_channels, in_channels, k_h, k_w)``.
        input_size: ``n`` or ``(n_h, n_w)``.
        padding: zero padding (int or pair); default ``k // 2`` ("same").
        n_iter: number of Gram steps per frequency (``>= 0``).
    Returns:
        float64 0-dim tensor, a guaranteed upper bound (a relative margin of ``ROUNDING_MARGIN`` covers
        rounding).
    """
    _check_kernel(kernel)
    n_iter = _check_n_iter(n_iter)
    n_h, n_w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    k_h, k_w = kernel.shape[2], kernel.shape[3]
    if padding is None:
        padding = (k_h // 2, k_w // 2)
    p_h, p_w = (padding, padding) if isinstance(padding, int) else tuple(padding)
    if min(n_h, n_w) < 1 or min(p_h, p_w) < 0:
        raise ValueError(f"input_size must be positive and padding >= 0, got {input_size}, {padding}")
    size = (n_h + max(2 * p_h, k_h - 1), n_w + max(2 * p_w, k_w - 1))
    k = as_float64(kernel)
    symbol = _half_symbol(k, size)  # (frequencies, cout, cin), complex128
    if symbol.shape[1] < symbol.shape[2]:  # start on the smaller side
        symbol = symbol.mH.contiguous()
    return _gram_bound(symbol, n_iter, prune=True).max() * (1 + ROUNDING_MARGIN)


# ---------------------------------------------------------------------------------------------
# The norm of a layer's operator: training estimate, cached evaluation norm
# ---------------------------------------------------------------------------------------------
__all__ += ["OperatorNormModule", "frozen_power_iteration"]

#: The evaluation norms of :class:`OperatorNormModule`.
EVAL_NORMS = ("sound", "power")


def _official_unit(x):
    """``x / (sqrt(sum x^2) + 1e-12)``: the normalisation of the official power iteration."""
    return x / (x.square().sum().sqrt() + 1e-12)


class OperatorNormModule(torch.nn.Module):
    r"""Base class of the layers built on one linear operator ``W`` whose spectral norm they use.

    A subclass holds a ``weight`` parameter and a buffer ``u`` (the persistent vector, shaped as one
    input of ``W``), and defines :meth:`operator` (``x -> W x``), :meth:`adjoint` (``y -> W^T y``, its
    exact adjoint) and :meth:`norm_upper_bound` (a guaranteed upper bound of ``||W||_2``, computed
    now); :meth:`norm_key` when the norm depends on more than the weight (a convolution's input size).

    * **training mode**: :meth:`spectral_norm` is one power-iteration step from ``u`` (``u`` advances,
      the estimate ``||W u||`` is differentiable in ``W``): a *lower* estimate (Miyato et al., 2018).
    * **evaluation mode**: :meth:`eval_spectral_norm`, cached together with a copy of the weight it
      was computed from, and recomputed whenever the weight differs from that copy (``torch.equal``),
      however it changed: optimizer steps (fused, foreach, compiled: those need not bump the
      version counter), ``load_state_dict``, in-place or ``.data`` edits. ``eval_norm="sound"``
      (default): :meth:`norm_upper_bound`, so a layer normalised by it is provably 1-Lipschitz.
      ``eval_norm="power"``: the official code's evaluation (Meunier et al., 2022): ``n_eval_iter``
      iterations ``v = W u / ||W u||``, ``u = W^T v / ||W^T v||`` from the persistent vector, which
      they advance, and the estimate ``<W u, v>``; a lower estimate, for comparisons only.

    Under :func:`~cpl_mini.frozen_power_iteration` no forward writes ``u`` (nor resets the evaluation
    cache): the training estimate is the same power step from the stored ``u``, not written back: the
    training forward is a pure function of the weight, ``u`` and the input (for ``torch.func``).

    The sound norms run in float64 (on the CPU for MPS tensors), without autocast and with TF32 off
    (:func:`~cpl_mini.ieee_precision`).
    """

    def __init__(self, eval_norm: str = "sound", n_eval_iter: int = 100):
        super().__init__()
        if eval_norm not in EVAL_NORMS:
            raise ValueError(f"eval_norm must be one of {EVAL_NORMS}, got {eval_norm!r}")
        self.eval_norm = eval_norm
        self.n_eval_iter = int(n_eval_iter)
        self._norm_cache = None  # (key, weight copy, norm) of the last evaluation norm
        self._frozen_depth = 0  # > 0 inside frozen_power_iteration: no forward writes u
        self._frozen_norm_cache = None  # eval_norm="power" norm computed while frozen (from the stored u)

    # -- what a subclass defines ---------------------------------------------------------------
    def operator(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``W x`` (no bias), with ``W`` = ``weight`` (default: the layer's)."""
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``W^T y``, the exact adjoint of :meth:`operator`."""
        raise NotImplementedError

    def norm_upper_bound(self) -> torch.Tensor:
        """A guaranteed upper bound of ``||W||_2`` for the weight held now (float64 0-dim tensor)."""
        raise NotImplementedError

    def norm_key(self) -> tuple:
        """What the norm depends on besides the weight (part of the cache key); default nothing."""
        return ()

    # -- power iteration -----------------------------------------------------------------------
    def _is_frozen(self):
        return getattr(self, "_frozen_depth", 0) > 0  # modules pickled before the attribute existed

    def __getstate__(self):
        state = super().__getstate__()
        state["_frozen_depth"], state["_frozen_norm_cache"] = 0, None  # a copy is never frozen
        return state

    def _norm_weight(self):
        w = self.weight
        return w if w.dtype in (torch.float32, torch.float64) else w.float()

    def _power_norm(self, n_iter, update):
        w = self._norm_weight()
        u = self.u.to(w.dtype)
        sigma, u_new = power_iteration(lambda x: self.operator(x, w), lambda y: self.adjoint(y, w), u, n_iter)
        if update and not self._is_frozen():
            with torch.no_grad():
                self.u.copy_(u_new)
        return sigma

    def power_estimate(self, n_iter: int = 1, start: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The power-iteration estimate ``||W x_n||`` of ``||W||_2`` after ``n_iter`` iterations from
        ``start`` (default: the persistent vector ``u``), as :func:`power_iteration` computes it.

        Changes nothing: the buffer ``u`` is left as it is. ``start`` has the shape of ``u``
        (``(1, d)`` dense, ``(1, C, H, W)`` convolution). Returns a detached 0-dim tensor in the
        weight's dtype (float32 for lower precisions), a *lower* estimate of the norm.
        """
        x0 = self.u if start is None else start
        if tuple(x0.shape) != tuple(self.u.shape):
            raise ValueError(
                f"start must have the shape of the persistent vector {tuple(self.u.shape)}, "
                f"got {tuple(x0.shape)}"
            )
        w = self._norm_weight().detach()
        x0 = x0.detach().to(device=w.device, dtype=w.dtype)
        with torch.no_grad(), torch.autocast(w.device.type, enabled=False):
            sigma, _ = power_iteration(
                lambda x: self.operator(x, w), lambda y: self.adjoint(y, w), x0, n_iter
            )
        return sigma

    def _official_power_norm(self, n_iter, update=True):
        """The official evaluation estimate; advances ``u`` by ``n_iter`` iterations if ``update``."""
        if n_iter < 1:
            raise ValueError(f"eval_norm='power' needs n_eval_iter >= 1, got {n_iter}")
        w = self._norm_weight().detach()
        u = self.u.to(w.dtype)
        for _ in range(n_iter):
            v = _official_unit(self.operator(u, w))
            u = _official_unit(self.adjoint(v, w))
        sigma = (self.operator(u, w) * v).sum()
        if update:
            self.u.copy_(u)
        return sigma

    # -- the norm of each mode -----------------------------------------------------------------
    def _cache_key(self):
        return (self.eval_norm, self.n_eval_iter) + tuple(self.norm_key())

    def _cached_norm(self, entry):
        """The norm of a cache ``entry`` if it was computed for the very weight the layer holds now, or None.

        The cache keeps a copy of the weight and compares it element by element (``torch.equal``):
        version counters are not enough (fused and compiled optimizers update weights without
        bumping them, ``.data`` edits never do), and the comparison costs one pass over the weight.
        """
        if entry is None or entry[0] != self._cache_key():
            return None
        _, weight, value = entry
        w = self.weight.detach()
        if weight.shape != w.shape or weight.dtype != w.dtype or weight.device != w.device:
            return None
        return value if torch.equal(weight, w) else None

    def reset_norm_cache(self) -> None:
        """Forget the cached evaluation norm (never needed for soundness: the cache checks the weight)."""
        self._norm_cache = None

    def eval_spectral_norm(self) -> torch.Tensor:
        """The norm used in evaluation mode: a float64 0-dim tensor (on the CPU for MPS weights).

        Cached with a copy of the weight it was computed from; recomputed whenever the weight differs
        from that copy, however it was changed. Under :func:`~cpl_mini.frozen_power_iteration` a norm that
        ``eval_norm="power"`` has to compute comes from the stored ``u``, which is left as it is (the
        same value as outside the context), and is kept only until the context ends.
        """
        value = self._cached_norm(self._norm_cache)
        if value is not None:
            return value
        frozen = self.eval_norm == "power" and self._is_frozen()
        value = self._cached_norm(self._frozen_norm_cache) if frozen else None
        if value is None:
            with torch.no_grad(), torch.autocast(self.weight.device.type, enabled=False), ieee_precision():
                if self.eval_norm == "sound":
                    value = self.norm_upper_bound()
                else:
                    value = self._official_power_norm(self.n_eval_iter, update=not frozen)
            value = value.detach().to(device=float64_device(self.weight.device), dtype=torch.float64)
            entry = (self._cache_key(), self.weight.detach().clone(), value)
            if frozen:
                self._frozen_norm_cache = entry
            else:
                self._norm_cache = entry
        return value

    def sound_spectral_norm(self) -> torch.Tensor:
        """A guaranteed upper bound of ``||W||_2`` (float64), whatever ``eval_norm`` is."""
        if self.eval_norm == "sound":
            return self.eval_spectral_norm()
        with torch.no_grad(), ieee_precision():
            return self.norm_upper_bound()

    def spectral_norm(self) -> torch.Tensor:
        """The norm of the current mode: the training estimate (one power step, ``u`` advances unless
        frozen by :func:`~cpl_mini.frozen_power_iteration`, differentiable) or the cached evaluation norm."""
        if self.training:
            if self.eval_norm == "power" and not self._is_frozen():
                self._norm_cache = None  # the official evaluation restarts after each training step
            with torch.autocast(self.weight.device.type, enabled=False):
                return self._power_norm(1, update=True)
        return self.eval_spectral_norm()

    # names kept for code written against earlier versions: prefer operator() and adjoint()
    def _op(self, x, weight):
        return self.operator(x, weight)

    def _op_adjoint(self, y, weight):
        return self.adjoint(y, weight)


@contextlib.contextmanager
def frozen_power_iteration(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    r"""Run ``model``'s forwards without writing the power-iteration vectors of its layers.

    Inside the context, every :class:`OperatorNormModule` of ``model`` (``model`` itself included)
    computes its training estimate as usual, one power step from the stored vector,

    .. math::  \sigma = \|W x\|, \qquad x = \frac{W^\top W u}{\|W^\top W u\|} ,

    the same value (and the same gradient in ``W``) as a normal training forward, but does not write
    ``x`` back to ``u``; nor does it reset the evaluation cache, and an evaluation norm that
    ``eval_norm="power"`` has to compute comes from the stored ``u`` without advancing it. So no forward
    mutates a buffer, the training-mode forward is a pure function of the weights and the input, and
    ``torch.func`` transforms (``jacrev``, ``jvp``, ``vmap``, ``functional_call``) work on a model in
    training mode. Several forwards in the context all use the same ``u``.

    On exit (also on an exception) the normal behaviour is restored; contexts nest (the layers stay
    frozen until the outermost one ends). Layers added to ``model`` inside the context, and copies
    made there, are not frozen.

    Args:
        model: any ``nn.Module`` (one without such layers is left as it is); the context yields it.

    Examples:
        >>> import torch
        >>> from cpl_mini import ConvexPotentialLinear, frozen_power_iteration
        >>> layer = ConvexPotentialLinear(4).train()
        >>> u0 = layer.u.clone()
        >>> with frozen_power_iteration(layer):
        ...     jac = torch.func.jacrev(layer)(torch.randn(4))
        >>> jac.shape, torch.equal(layer.u, u0)
        (torch.Size([4, 4]), True)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"frozen_power_iteration expects an nn.Module, got {type(model).__name__}; "
            "a plain function has no power-iteration vectors to freeze"
        )
    layers = [m for m in model.modules() if isinstance(m, OperatorNormModule)]
    for layer in layers:
        depth = getattr(layer, "_frozen_depth", 0)  # 0 for layers pickled before the attribute existed
        if depth == 0:
            layer._frozen_norm_cache = None
        layer._frozen_depth = depth + 1
    try:
        yield model
    finally:
        for layer in layers:
            layer._frozen_depth -= 1
            if layer._frozen_depth == 0:
                layer._frozen_norm_cache = None
