"""Spectral norms of linear operators: power iteration, exact values and guaranteed upper bounds.

For a linear operator ``A`` the spectral norm is ``||A||_2 = max_{x != 0} ||A x|| / ||x||``, the
largest singular value. A certificate needs an *upper* bound of it; power iteration only gives a
*lower* estimate (it converges from below), so it is used for training, never for certificates.
"""
import math

import torch
import torch.nn.functional as F

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


def power_iteration(op, op_adjoint, x0, n_iter=1, eps=1e-12):
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


def dense_spectral_norm(weight):
    """Exact ``||W||_2`` of a matrix ``(out, in)`` in float64 (a float64 0-dim tensor).

    Computed as ``sqrt(lambda_max(G))`` with ``G`` the smaller of ``W W^T`` and ``W^T W`` (symmetric
    eigenvalues), the same value as the largest singular value and 2-3x faster than an SVD for the
    wide matrices of the dense CPL layers.
    """
    if weight.dim() != 2:
        raise ValueError(f"dense_spectral_norm expects a matrix (out, in), got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64) if weight.device.type != "mps" else weight.detach().cpu().double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt()


def dense_spectral_norm_upper(weight):
    """A guaranteed upper bound of ``||W||_2``: the exact value plus a relative rounding margin."""
    return dense_spectral_norm(weight) * (1 + ROUNDING_MARGIN)


def _check_kernel(kernel):
    if kernel.dim() != 4:
        raise ValueError(
            f"expected a conv2d kernel of shape (out_channels, in_channels, k_h, k_w), got {tuple(kernel.shape)}")


def _fft_norm(kernel, size):
    """max over the frequencies of the FFT grid ``size`` of the largest singular value (float64)."""
    k = kernel.detach().to(torch.float64)
    if k.device.type == "mps":
        k = k.cpu()
    symbol = torch.fft.fft2(k, s=size)  # (cout, cin, n1, n2), complex128
    symbol = symbol.permute(2, 3, 0, 1).reshape(-1, k.shape[0], k.shape[1])
    return torch.linalg.matrix_norm(symbol, ord=2).max()


def conv_spectral_norm_fft(kernel, n):
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


def conv_spectral_norm_upper(kernel, input_size, padding=None):
    """A **guaranteed upper bound** of ``||conv2d(., kernel, padding=padding)||_2`` on inputs of ``input_size``.

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


def conv_operator(kernel, padding=None):
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
