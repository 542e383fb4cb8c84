"""cpl_mini.spectral against independent references: explicit operator matrices and SVD, float64."""
import pytest
import torch
import torch.nn.functional as F

from cpl_mini.spectral import (conv_operator, conv_spectral_norm_fft, conv_spectral_norm_upper,
                               dense_spectral_norm, dense_spectral_norm_upper, power_iteration)


def explicit_matrix(fn, in_shape):
    """The matrix of a linear map, built column by column with autograd (float64)."""
    x = torch.zeros(in_shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(fn, x)
    out_numel = jac.numel() // x.numel()
    return jac.reshape(out_numel, x.numel())


def svd_norm(m):
    return torch.linalg.svdvals(m)[0]


def circular_conv(x, kernel):
    k = kernel.shape[-1]
    p = k // 2
    return F.conv2d(F.pad(x, (p, p, p, p), mode="circular"), kernel)


@pytest.mark.parametrize("shape", [(7, 5), (20, 30), (64, 16)])
def test_power_iteration_converges_to_svd_from_below(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    exact = svd_norm(w)
    estimates = []
    x = torch.randn(1, shape[1], dtype=torch.float64)
    for n in (1, 5, 20, 500):
        sigma, _ = power_iteration(lambda v: v @ w.T, lambda v: v @ w, x, n_iter=n)
        estimates.append(sigma.item())
        assert sigma <= exact * (1 + 1e-12)
    assert abs(estimates[-1] - exact.item()) / exact.item() < 1e-6
    assert estimates[0] <= estimates[-1] + 1e-12


def test_power_iteration_returns_reusable_vector_and_gradient():
    w = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 6, dtype=torch.float64)
    sigma, v = power_iteration(lambda a: a @ w.T, lambda a: a @ w, x, n_iter=3)
    assert not v.requires_grad and abs(v.norm().item() - 1) < 1e-12
    sigma.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        power_iteration(lambda a: a, lambda a: a, x, n_iter=-1)


def test_dense_norm_is_exact_and_upper_is_above():
    for shape in [(3, 9), (9, 3), (50, 50)]:
        w = torch.randn(*shape)
        exact = svd_norm(w.double())
        assert torch.isclose(dense_spectral_norm(w), exact, rtol=1e-12)
        assert dense_spectral_norm_upper(w) >= exact
    with pytest.raises(ValueError, match="matrix"):
        dense_spectral_norm(torch.randn(2, 3, 4))


@pytest.mark.parametrize("cout,cin,k,n", [(2, 3, 3, 5), (4, 2, 3, 6), (3, 3, 5, 7), (1, 2, 1, 4)])
def test_fft_norm_equals_explicit_circular_conv_matrix(cout, cin, k, n):
    kernel = torch.randn(cout, cin, k, k, dtype=torch.float64)
    m = explicit_matrix(lambda x: circular_conv(x, kernel), (1, cin, n, n))
    assert torch.isclose(conv_spectral_norm_fft(kernel, n), svd_norm(m), rtol=1e-9)


@pytest.mark.parametrize("cout,cin,k,n", [(2, 3, 3, 5), (5, 4, 3, 8), (3, 2, 5, 6), (2, 2, 3, 4)])
def test_upper_bound_is_above_explicit_zero_padded_norm(cout, cin, k, n):
    for _ in range(3):
        kernel = torch.randn(cout, cin, k, k, dtype=torch.float64)
        m = explicit_matrix(lambda x: F.conv2d(x, kernel, padding=k // 2), (1, cin, n, n))
        exact = svd_norm(m)
        upper = conv_spectral_norm_upper(kernel, n)
        assert upper >= exact
        # and with an explicit padding of 0 (a "valid" convolution)
        m0 = explicit_matrix(lambda x: F.conv2d(x, kernel, padding=0), (1, cin, n, n))
        assert conv_spectral_norm_upper(kernel, n, padding=0) >= svd_norm(m0)


def test_upper_bound_is_tight_at_cifar_size():
    """At 32x32 the bound sits within a few percent of the true norm (power iteration, 2000 steps, below it)."""
    kernel = torch.randn(5, 16, 3, 3, dtype=torch.float64)
    op, adj = conv_operator(kernel)
    lower, _ = power_iteration(op, adj, torch.randn(1, 16, 32, 32, dtype=torch.float64), n_iter=2000)
    upper = conv_spectral_norm_upper(kernel, 32)
    assert lower <= upper
    assert (upper - lower) / lower < 0.03


@pytest.mark.parametrize("k", [1, 3, 5])
def test_conv_transpose_is_exact_adjoint(k):
    kernel = torch.randn(5, 7, k, k, dtype=torch.float64)
    op, adj = conv_operator(kernel)
    x = torch.randn(2, 7, 9, 9, dtype=torch.float64)
    y = torch.randn(2, 5, 9, 9, dtype=torch.float64)
    lhs = (op(x) * y).sum()
    rhs = (x * adj(y)).sum()
    assert torch.isclose(lhs, rhs, rtol=1e-12)


def test_bad_kernel_shapes():
    with pytest.raises(ValueError, match="kernel"):
        conv_spectral_norm_fft(torch.randn(3, 3, 3), 8)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        conv_spectral_norm_fft(torch.randn(2, 2, 5, 5), 3)
