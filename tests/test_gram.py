"""Gram iteration (cpl_mini.spectral.gram_iteration_*) against independent references, float64.

References: the exact SVD of the matrix, and the explicit matrix of the zero-padded convolution built
by pushing the identity basis through ``conv2d``. A bound must never fall below the exact value, must
not increase with the number of iterations, and must converge to the value its theory says.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from cpl_mini.spectral import (
    ROUNDING_MARGIN,
    conv_operator,
    conv_spectral_norm_fft,
    conv_spectral_norm_upper,
    gram_iteration_conv,
    gram_iteration_dense,
    power_iteration,
)

ITERS = (0, 1, 2, 3, 4, 6, 8)


def svd_norm(m):
    return torch.linalg.svdvals(m.double())[0]


def conv_matrix(kernel, size, padding):
    """Explicit matrix ``(out_numel, in_numel)`` of ``x -> conv2d(x, kernel, padding)`` on ``size`` inputs."""
    cin = kernel.shape[1]
    n_h, n_w = size
    eye = torch.eye(cin * n_h * n_w, dtype=torch.float64).reshape(-1, cin, n_h, n_w)
    return F.conv2d(eye, kernel.double(), padding=padding).reshape(cin * n_h * n_w, -1).T


def circular_matrix(kernel, size):
    """Explicit matrix of the circular convolution on a ``size`` grid (kernel anchored at its centre)."""
    k_h, k_w = kernel.shape[2:]
    cin = kernel.shape[1]
    eye = torch.eye(cin * size[0] * size[1], dtype=torch.float64).reshape(-1, cin, *size)
    padded = F.pad(eye, (k_w // 2, k_w // 2, k_h // 2, k_h // 2), mode="circular")
    return F.conv2d(padded, kernel.double()).reshape(eye.shape[0], -1).T


def random_matrix(g, kind, m, n):
    if kind == "gaussian":
        w = torch.randn(m, n, generator=g, dtype=torch.float64)
    elif kind == "low_rank":
        r = max(1, min(m, n) // 3)
        a = torch.randn(m, r, generator=g, dtype=torch.float64)
        w = a @ torch.randn(r, n, generator=g, dtype=torch.float64)
    elif kind == "flat":  # all singular values nearly equal: the slowest case for Gram iteration
        q1, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        s = 1 + 1e-3 * torch.rand(min(m, n), generator=g, dtype=torch.float64)
        w = q1[:, : len(s)] @ torch.diag(s) @ q2[:, : len(s)].T
    elif kind == "heavy":  # heavy-tailed entries
        w = torch.randn(m, n, generator=g, dtype=torch.float64) ** 3
    else:
        raise ValueError(kind)
    scale = 10.0 ** float(torch.empty(1, dtype=torch.float64).uniform_(-3, 3, generator=g))
    return w * scale


# ----------------------------------------------------------------------------------------------
# dense
# ----------------------------------------------------------------------------------------------
def test_dense_never_below_exact_norm():
    g = torch.Generator().manual_seed(1)
    checked = 0
    for kind in ("gaussian", "low_rank", "flat", "heavy"):
        for _ in range(15):
            m, n = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
            w = random_matrix(g, kind, m, n)
            exact = svd_norm(w)
            for t in ITERS:
                assert gram_iteration_dense(w, t) >= exact, (kind, m, n, t)
                checked += 1
    assert checked == 4 * 15 * len(ITERS)


@pytest.mark.parametrize("shape", [(30, 20), (20, 30), (64, 64), (1, 7)])
def test_dense_decreases_and_converges(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    exact = svd_norm(w)
    bounds = torch.stack([gram_iteration_dense(w, t) for t in range(12)])
    # n_iter = 0 is the Frobenius norm
    assert torch.isclose(bounds[0], torch.linalg.matrix_norm(w) * (1 + ROUNDING_MARGIN), rtol=1e-12)
    # non-increasing, and the sandwich ||W|| <= bound <= rank^(1/2^(t+1)) ||W||
    assert bool((bounds[1:] <= bounds[:-1] * (1 + 1e-12)).all())
    rank = min(shape)
    for t, b in enumerate(bounds):
        assert exact <= b <= exact * rank ** (1 / 2 ** (t + 1)) * (1 + 2 * ROUNDING_MARGIN)
    # converged: only the rounding margin is left
    assert (bounds[-1] / exact - 1).abs() < 5 * ROUNDING_MARGIN


def test_dense_orthogonal_matrix_is_the_worst_case():
    """All singular values equal: the bound is exactly n^(1/2^(t+1)) ||W||, the top of the sandwich."""
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    for t in (0, 1, 3, 6):
        expected = 16 ** (1 / 2 ** (t + 1)) * 3.0
        assert math.isclose(float(gram_iteration_dense(3 * q, t)), expected, rel_tol=1e-8)


def test_dense_rescaling_prevents_overflow_and_underflow():
    w = torch.randn(12, 9, dtype=torch.float64)
    exact = svd_norm(w)
    for scale in (1e200, 1e-200, 1e300):
        b = gram_iteration_dense(w * scale, 12)
        assert torch.isfinite(b) and b > 0
        assert abs(float(b / (exact * scale)) - 1) < 1e-8
    # without rescaling, 12 Gram steps of a matrix of norm 1e200 would need 10^(200 * 4096)
    assert gram_iteration_dense(torch.zeros(3, 4), 5) == 0  # and a zero matrix gives exactly 0


def test_dense_accepts_float32_and_parameters():
    w = torch.nn.Parameter(torch.randn(8, 5))
    b = gram_iteration_dense(w)
    assert b.dtype == torch.float64 and not b.requires_grad
    assert b >= svd_norm(w.detach())


# ----------------------------------------------------------------------------------------------
# convolution
# ----------------------------------------------------------------------------------------------
# (cout, cin, k, (n_h, n_w), padding): square and rectangular inputs, cout < cin and cout > cin,
# 1x1, 3x3 and 5x5 kernels, "same", "valid" and other paddings
CONV_CASES = [
    (3, 2, 3, (5, 5), None),
    (2, 5, 3, (6, 4), None),
    (4, 4, 5, (6, 6), None),
    (2, 3, 3, (5, 5), 0),
    (3, 2, 1, (4, 4), None),
    (1, 1, 3, (5, 5), None),
    (2, 3, 5, (7, 7), 1),
    (2, 2, 3, (4, 4), 2),
    (5, 6, 3, (8, 8), None),
]


@pytest.mark.parametrize("cout,cin,k,size,padding", CONV_CASES)
def test_conv_never_below_explicit_zero_padded_norm(cout, cin, k, size, padding):
    g = torch.Generator().manual_seed(cout * 100 + cin * 10 + k)
    p = k // 2 if padding is None else padding
    for rep in range(6):
        kernel = torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64)
        if rep % 2:
            kernel = kernel**3  # heavier tails, a few dominant taps
        kernel = kernel * 10.0 ** float(torch.empty(1, dtype=torch.float64).uniform_(-3, 3, generator=g))
        exact = svd_norm(conv_matrix(kernel, size, p))
        for t in ITERS:
            assert gram_iteration_conv(kernel, size, padding, n_iter=t) >= exact, (rep, t)


def test_conv_bound_where_the_unenlarged_circular_norm_fails():
    """Kernel [1, -1, 1] x [1, -1, 1] on 5x5: the circular norm on the 5x5 grid is *below* the zero-padded
    norm (its symbol peaks at a frequency the 5-grid misses); the enlarged-grid bounds stay above it."""
    row = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    kernel = torch.outer(row, row)[None, None]
    exact = svd_norm(conv_matrix(kernel, (5, 5), 1))
    assert math.isclose(float(exact), (1 + math.sqrt(3)) ** 2, rel_tol=1e-12)
    assert conv_spectral_norm_fft(kernel, 5) < exact  # not a bound: the reference detects it
    for t in ITERS:
        assert gram_iteration_conv(kernel, 5, n_iter=t) >= exact


@pytest.mark.parametrize("cout,cin,k,size", [(3, 4, 3, (6, 6)), (4, 2, 5, (5, 7)), (1, 3, 3, (4, 4))])
def test_conv_decreases_to_the_enlarged_circular_norm(cout, cin, k, size):
    kernel = torch.randn(cout, cin, k, k, dtype=torch.float64)
    bounds = torch.stack([gram_iteration_conv(kernel, size, n_iter=t) for t in range(12)])
    assert bool((bounds[1:] <= bounds[:-1] * (1 + 1e-12)).all())
    # the limit: the circular convolution on the enlarged grid, from its explicit matrix
    enlarged = (size[0] + k - 1, size[1] + k - 1)
    circular = svd_norm(circular_matrix(kernel, enlarged))
    assert torch.isclose(bounds[-1], circular, rtol=1e-8)
    assert torch.isclose(bounds[-1], conv_spectral_norm_upper(kernel, size), rtol=1e-8)


@pytest.mark.parametrize(
    "cout,cin,k,size,padding", [(5, 12, 3, (16, 16), None), (6, 4, 5, (9, 7), 1), (3, 3, 1, (5, 5), None)]
)
def test_conv_matches_a_naive_reference(cout, cin, k, size, padding):
    """Same numbers as the textbook algorithm: full FFT (fft2, every frequency), no rescaling, no pruning."""
    kernel = torch.randn(cout, cin, k, k, dtype=torch.float64)
    p = k // 2 if padding is None else padding
    grid = (size[0] + max(2 * p, k - 1), size[1] + max(2 * p, k - 1))
    symbols = torch.fft.fft2(kernel, s=grid).permute(2, 3, 0, 1).reshape(-1, cout, cin)
    for t in range(6):
        g = symbols
        for _ in range(t):
            g = g.mH @ g
        naive = (torch.linalg.matrix_norm(g) ** (1 / 2**t)).max()
        bound = gram_iteration_conv(kernel, size, padding, n_iter=t)
        assert torch.isclose(bound, naive, rtol=2e-9), t  # margin 1e-9


@pytest.mark.parametrize(
    "shape,n",
    [((5, 16, 3, 3), 32), ((5, 45, 3, 3), 32), ((16, 16, 3, 3), 16), ((8, 3, 3, 3), 32), ((32, 32, 3, 3), 8)],
)
def test_conv_six_iterations_are_within_one_percent(shape, n):
    """Typical CPL kernels (Kaiming-uniform, as the layer initialises them): after 6 steps the bound is
    within 1% of the exact enlarged-grid norm (in fact far closer)."""
    kernel = torch.empty(*shape, dtype=torch.float64)
    torch.nn.init.kaiming_uniform_(kernel, a=math.sqrt(5))
    g6 = gram_iteration_conv(kernel, n, n_iter=6)
    limit = conv_spectral_norm_upper(kernel, n)
    assert limit * (1 - 1e-12) <= g6 <= 1.01 * limit  # equal up to rounding once converged


def test_conv_within_one_percent_of_the_zero_padded_norm_at_cifar_size():
    """At 32x32 the enlarged grid costs little: 6 Gram steps sit within 1% above a power-iteration
    estimate, itself a lower bound of the exact zero-padded norm."""
    kernel = torch.empty(5, 16, 3, 3)
    torch.nn.init.kaiming_uniform_(kernel, a=math.sqrt(5))
    op, adj = conv_operator(kernel)
    lower, _ = power_iteration(op, adj, torch.randn(1, 16, 32, 32), n_iter=300)
    g6 = gram_iteration_conv(kernel, 32, n_iter=6)
    assert lower <= g6 <= 1.01 * lower


def test_conv_input_checks_and_dtypes():
    with pytest.raises(ValueError, match="kernel"):
        gram_iteration_conv(torch.randn(3, 3, 3), 8)
    with pytest.raises(ValueError, match="n_iter"):
        gram_iteration_conv(torch.randn(2, 2, 3, 3), 8, n_iter=-1)
    with pytest.raises(ValueError, match="n_iter"):
        gram_iteration_dense(torch.randn(2, 2), n_iter=1.5)
    with pytest.raises(ValueError, match="matrix"):
        gram_iteration_dense(torch.randn(2, 2, 2))
    kernel = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    b = gram_iteration_conv(kernel, (6, 5))
    assert b.dtype == torch.float64 and b.dim() == 0 and not b.requires_grad
    assert b >= svd_norm(conv_matrix(kernel.detach(), (6, 5), 1))
    assert gram_iteration_conv(torch.zeros(2, 3, 3, 3), 6) == 0
