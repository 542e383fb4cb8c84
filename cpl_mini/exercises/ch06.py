"""Self-checks of chapter 6 (convolutional CPL and the spectral norm of a convolution).

Each checker computes its reference with the package (FFT bounds, Gram iteration, the convolution
operator and its adjoint, exact norms of explicit matrices) and compares the student's answer with a
tolerance; its hint points at the idea, never at the value.
"""

from __future__ import annotations

import math
from typing import Any, Tuple

import torch
import torch.nn.functional as F

from ..spectral import conv_operator, conv_spectral_norm_upper, dense_spectral_norm, gram_iteration_dense
from .checking import register

__all__ = ["check_6_1", "check_6_2", "check_6_3", "check_6_5"]

Verdict = Tuple[bool, str]
DT = torch.float64


def _missing(what: str) -> Verdict:
    return False, f"replace None by your answer ({what})"


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        value = value.item()
    return float(value)


def _explicit_matrix(kernel: torch.Tensor, n: int, padding: int) -> torch.Tensor:
    """The matrix ``(out_numel, in_numel)`` of ``conv2d(., kernel, padding)`` on ``n x n`` inputs."""
    op, _ = conv_operator(kernel, padding)
    c_in = kernel.shape[1]
    eye = torch.eye(c_in * n * n, dtype=DT).reshape(-1, c_in, n, n)
    return op(eye).reshape(eye.shape[0], -1).T


@register("6.1")
def check_6_1(answer: Any) -> Verdict:
    """A function ``one_by_one_norm(kernel)``: the spectral norm of a 1x1 convolution (any image size)."""
    if not callable(answer):
        return False, "the answer is a function one_by_one_norm(kernel) that returns a number"
    gen = torch.Generator().manual_seed(61)
    for c_out, c_in in [(6, 4), (3, 7), (1, 1)]:
        kernel = torch.randn(c_out, c_in, 1, 1, dtype=DT, generator=gen)
        value = answer(kernel.clone())
        if value is None:
            return False, "one_by_one_norm returned None: return a number"
        value = _as_float(value)
        reference = conv_spectral_norm_upper(kernel, 5).item()  # the same on every grid for k = 1
        if not math.isclose(value, reference, rel_tol=1e-6):
            if math.isclose(value, torch.linalg.matrix_norm(kernel[:, :, 0, 0]).item(), rel_tol=1e-6):
                return False, "that is the Frobenius norm; the operator norm is the largest singular value"
            return False, f"wrong for a {c_out} x {c_in} x 1 x 1 kernel: it is one matrix per pixel"
    return True, ""


@register("6.2")
def check_6_2(answer: Any) -> Verdict:
    """A function ``adjoint_as_conv(kernel, p)`` returning ``(kernel_tilde, padding)`` with
    ``conv2d(y, kernel_tilde, padding) == conv_transpose2d(y, kernel, p)``."""
    if not callable(answer):
        return False, "the answer is a function adjoint_as_conv(kernel, p) that returns a pair"
    gen = torch.Generator().manual_seed(62)
    for c_out, c_in, k, p in [(5, 3, 3, 1), (2, 4, 5, 2), (3, 2, 3, 0), (4, 1, 1, 0), (2, 3, 5, 1)]:
        kernel = torch.randn(c_out, c_in, k, k, dtype=DT, generator=gen)
        out = answer(kernel.clone(), p)
        if out is None:
            return False, "adjoint_as_conv returned None: return a pair (kernel_tilde, padding)"
        try:
            kernel_tilde, padding = out
        except (TypeError, ValueError):
            return False, "return a pair (kernel_tilde, padding)"
        kernel_tilde = torch.as_tensor(kernel_tilde, dtype=DT)
        if kernel_tilde.shape != (c_in, c_out, k, k):
            return False, (
                f"for a kernel of shape {(c_out, c_in, k, k)} the adjoint's kernel maps the "
                f"{c_out} output channels back to the {c_in} input ones"
            )
        y = torch.randn(2, c_out, 7, 7, dtype=DT, generator=gen)
        _, adjoint = conv_operator(kernel, p)
        reference = adjoint(y)
        try:
            got = F.conv2d(y, kernel_tilde, padding=int(padding))
        except RuntimeError as exc:
            return False, f"conv2d with your pair fails for k = {k}, p = {p}: {exc}"
        if got.shape != reference.shape or not torch.allclose(got, reference, atol=1e-10):
            if torch.allclose(kernel_tilde, kernel.transpose(0, 1)):
                return False, "swapping the channels is not enough: the kernel is also flipped in space"
            return False, f"wrong for k = {k}, p = {p}: check the spatial flip and the padding"
    return True, ""


@register("6.3")
def check_6_3(answer: Any) -> Verdict:
    """The number of Gram steps that guarantees a bound within 1% for every 45 x 45 matrix."""
    if answer is None:
        return _missing("a number of Gram steps t, an integer")
    t = _as_float(answer)
    if t != int(t) or t < 0:
        return False, "t is a number of Gram steps: a non-negative integer"
    t = int(t)
    q, _ = torch.linalg.qr(torch.randn(45, 45, dtype=DT, generator=torch.Generator().manual_seed(63)))
    reference = next(s for s in range(30) if gram_iteration_dense(q, s).item() <= 1.01)  # worst case
    if t == reference:
        return True, ""
    if t < reference:
        still = gram_iteration_dense(q, t).item()
        return False, f"after {t} steps the bound of an orthogonal matrix is still {still:.4f}"
    return False, "fewer steps already suffice: find the smallest t with 45^(1/2^(t+1)) <= 1.01"


@register("6.5")
def check_6_5(answer: Any) -> Verdict:
    """A function ``exact_norm(n)``: the norm of the zero-padded ``[1,-1,1] x [1,-1,1]`` convolution."""
    if not callable(answer):
        return False, "the answer is a function exact_norm(n) that returns a number"
    r = torch.tensor([1.0, -1.0, 1.0], dtype=DT)
    kernel = torch.outer(r, r)[None, None]
    for n in range(2, 10):
        value = answer(n)
        if value is None:
            return False, "exact_norm returned None: return a number"
        value = _as_float(value)
        reference = dense_spectral_norm(_explicit_matrix(kernel, n, 1)).item()
        if not math.isclose(value, reference, rel_tol=1e-9):
            if math.isclose(value, 9.0, rel_tol=1e-9):
                return False, "9 is the maximum of the symbol: the zero-padded norm on n x n is smaller"
            return False, f"wrong at n = {n}: compare with the SVD of the explicit matrix, and use T_n"
    return True, ""
