"""cpl_mini.spectral against independent references: explicit operator matrices and SVD, float64; and the
evaluation-norm cache of OperatorNormModule against every way of changing a weight."""

import copy
import doctest
import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cpl_mini.spectral
from cpl_mini.bounds import lipschitz_upper_bound
from cpl_mini.certify import network_lipschitz
from cpl_mini.layers import (
    ConvexPotentialConv2d,
    ConvexPotentialLinear,
    convex_potential_conv2d,
    convex_potential_linear,
)
from cpl_mini.normalized import SpectralNormLinear
from cpl_mini.spectral import (
    conv_operator,
    conv_spectral_norm_fft,
    conv_spectral_norm_upper,
    dense_spectral_norm,
    dense_spectral_norm_upper,
    frozen_power_iteration,
    power_iteration,
)


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
    """At 32x32 the bound sits within a few percent of the true norm (power iteration, 2000 steps, below)."""
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


def test_upper_bound_where_the_unenlarged_circular_norm_fails():
    """Kernel [1, -1, 1] x [1, -1, 1] on 5x5 (chapter 6): its symbol peaks at a frequency the 5-grid
    misses, so the circular norm on the n x n grid itself is *below* the zero-padded norm (1 + sqrt 3)^2.
    Random kernels never show it; this one is where the bound's claim is sharp."""
    row = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    kernel = torch.outer(row, row)[None, None]
    exact = svd_norm(explicit_matrix(lambda x: F.conv2d(x, kernel, padding=1), (1, 1, 5, 5)))
    assert exact.item() == pytest.approx((1 + math.sqrt(3)) ** 2, rel=1e-12)
    assert conv_spectral_norm_fft(kernel, 5) < exact  # the n x n grid is not a bound
    assert conv_spectral_norm_upper(kernel, 5) >= exact


# ---------------------------------------------------------------------------------------------
# OperatorNormModule: the evaluation norm follows the weights, however they change
# ---------------------------------------------------------------------------------------------
def _make(kind):
    if kind == "dense":
        return ConvexPotentialLinear(6, 4), (8, 6)
    if kind == "conv":
        return ConvexPotentialConv2d(3, 2, input_size=(6, 6)), (8, 3, 6, 6)
    return SpectralNormLinear(6, 5), (8, 6)


def _fresh_bound(layer):
    """The sound norm computed from scratch with the spectral functions, for the weight held now."""
    if isinstance(layer, ConvexPotentialConv2d):
        return conv_spectral_norm_upper(layer.weight, layer.input_size)
    return dense_spectral_norm_upper(layer.weight)


def _optimizer_steps(layer, shape, **kw):
    opt = torch.optim.Adam(layer.parameters(), lr=1.0, **kw)
    layer.train()
    for _ in range(5):
        opt.zero_grad()
        (layer(torch.randn(shape)) ** 2).sum().mul(-1).backward()  # push the weights outward
        opt.step()


def _update(how, layer, shape):
    if how == "fused_adam":  # does not bump the parameters' version counters
        _optimizer_steps(layer, shape, fused=True)
    elif how == "foreach_adam":
        _optimizer_steps(layer, shape, foreach=True)
    elif how == "bf16_autocast_fused_adam":  # a bf16-trained layer (mixed precision)
        opt = torch.optim.Adam(layer.parameters(), lr=1.0, fused=True)
        layer.train()
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = -(layer(torch.randn(shape)) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    elif how == "data_edit":  # behind autograd's back
        layer.weight.data.mul_(7.0)
    elif how == "data_assign":
        layer.weight.data = layer.weight.data * 7.0
    elif how == "load_state_dict":
        other = copy.deepcopy(layer)
        with torch.no_grad():
            other.weight.mul_(7.0)
        layer.load_state_dict(other.state_dict())
    elif how == "inplace":
        with torch.no_grad():
            layer.weight.mul_(7.0)
    else:
        raise ValueError(how)


UPDATES = [
    "fused_adam",
    "foreach_adam",
    "bf16_autocast_fused_adam",
    "data_edit",
    "data_assign",
    "load_state_dict",
    "inplace",
]


@pytest.mark.parametrize("kind", ["dense", "conv", "spectral_norm"])
@pytest.mark.parametrize("how", UPDATES)
def test_eval_norm_follows_every_kind_of_weight_update(kind, how):
    """After the update the eval-mode layer must use the norm of the weight it holds (5 fused Adam steps
    once left a dense layer at a cached 1.07 for a true 13.06), and the certificates must see it."""
    torch.manual_seed(0)
    layer, shape = _make(kind)
    layer.eval()
    before = layer.eval_spectral_norm().item()
    lipschitz_upper_bound(layer)  # fills every cache
    _update(how, layer, shape)
    layer.eval()
    fresh = _fresh_bound(layer).item()
    assert fresh != pytest.approx(before, rel=1e-3)  # the update did change the norm
    assert layer.eval_spectral_norm().item() == fresh
    w = layer.weight.detach().double()
    if w.dim() == 2:
        exact = svd_norm(w).item()
    else:
        exact = svd_norm(explicit_matrix(lambda v: F.conv2d(v, w, padding=1), (1, *shape[1:]))).item()
    if kind == "spectral_norm":  # the matrix the eval-mode forward applies has norm <= 1
        applied = layer.weight_matrix().detach().double()
        assert torch.linalg.svdvals(applied)[0].item() <= 1.0
    else:  # h ||W||^2 <= 2 for the weight held now: 1-Lipschitz
        assert Fraction(layer.step_size().item()) * Fraction(exact) ** 2 <= 2
    net = nn.Sequential(layer).eval()
    assert lipschitz_upper_bound(net) <= 1.0 + 2e-9
    assert network_lipschitz(net)[0] <= 1.0 + 2e-9


def test_eval_norm_is_cached_while_nothing_changes(monkeypatch):
    layer = ConvexPotentialConv2d(3, 2, input_size=(6, 6)).eval()
    calls = []
    original = layer.norm_upper_bound
    monkeypatch.setattr(layer, "norm_upper_bound", lambda: calls.append(1) or original())
    x = torch.randn(2, 3, 6, 6)
    for _ in range(3):
        layer(x)
    layer.lipschitz_bound()
    assert len(calls) == 1
    layer.train()
    layer(x)  # a training forward that does not change the weight
    layer.eval()
    layer(x)
    assert len(calls) == 1
    layer.input_size = (7, 7)  # the norm depends on the input size: recomputed
    assert layer.eval_spectral_norm().item() == conv_spectral_norm_upper(layer.weight, (7, 7)).item()
    assert len(calls) == 2


def test_eval_norm_runs_in_ieee_float32(monkeypatch):
    """The sound norm is computed with TF32 off, whatever the caller set (the flags exist on CPUs too)."""
    layer = SpectralNormLinear(5, 4).eval()
    seen = []
    original = layer.norm_upper_bound
    monkeypatch.setattr(
        layer, "norm_upper_bound", lambda: seen.append(torch.backends.cuda.matmul.allow_tf32) or original()
    )
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        layer.eval_spectral_norm()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert seen == [False]


# ---------------------------------------------------------------------------------------------
# frozen_power_iteration: training forwards without writing the persistent vector
# ---------------------------------------------------------------------------------------------
def _frozen_case(kind):
    if kind == "dense":
        layer, shape = ConvexPotentialLinear(6, 4), (1, 6)
    else:
        layer, shape = ConvexPotentialConv2d(2, 3, input_size=(4, 4)), (1, 2, 4, 4)
    layer = layer.double().train()
    w = layer.weight.detach()
    m = w if kind == "dense" else explicit_matrix(lambda v: F.conv2d(v, w, padding=1), shape)
    return layer, shape, m


def _one_power_step(m, u):
    """The training estimate restated with the explicit matrix M: v = M^T M u / ||.||, sigma = ||M v||."""
    v = m.T @ (m @ u.flatten())
    v = v / v.norm()
    return (m @ v).norm(), v


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_frozen_training_forward_is_a_pure_function_for_torch_func(kind):
    torch.manual_seed(0)
    layer, shape, m = _frozen_case(kind)
    x = torch.randn(shape, dtype=torch.float64)
    buffers = {name: b.clone() for name, b in layer.named_buffers()}
    sigma, v = _one_power_step(m, layer.u)
    h = 2 / sigma.item() ** 2
    with frozen_power_iteration(layer) as same:
        assert same is layer
        jac = torch.func.jacrev(layer)(x).reshape(x.numel(), x.numel())
        frozen_sigma = layer.spectral_norm()
    assert frozen_sigma.item() == pytest.approx(sigma.item(), rel=1e-12)
    # the same value as a normal training forward would take (on a copy: that one advances u)
    assert torch.equal(frozen_sigma, copy.deepcopy(layer).spectral_norm())
    # the Jacobian I - h M^T D M of the step with that h
    w, b = layer.weight.detach(), layer.bias.detach()
    pre = F.linear(x, w, b) if kind == "dense" else F.conv2d(x, w, b, padding=1)
    d = torch.diag((pre.flatten() > 0).double())
    expected = torch.eye(x.numel(), dtype=torch.float64) - h * m.T @ d @ m
    assert torch.allclose(jac, expected, rtol=0, atol=1e-12)
    step = (
        (lambda z: convex_potential_linear(z, w, b, h))
        if kind == "dense"
        else (lambda z: convex_potential_conv2d(z, w, b, h, 1))
    )
    assert torch.allclose(jac, torch.func.jacrev(step)(x).reshape(jac.shape), rtol=0, atol=1e-12)
    assert all(torch.equal(b, buffers[name]) for name, b in layer.named_buffers())  # bit-identical
    layer(x)  # after the context a training forward advances u again, by one power step
    assert not torch.equal(layer.u, buffers["u"])
    assert torch.allclose(layer.u.flatten(), v, rtol=0, atol=1e-12)


def test_frozen_training_forward_gradient_in_the_weights_and_vmap():
    torch.manual_seed(1)
    layer = ConvexPotentialLinear(5, 3).double().train()
    x = torch.randn(4, 5, dtype=torch.float64)
    params = {name: p.detach().clone() for name, p in layer.named_parameters()}
    u = layer.u.clone()

    def independent(w, b):  # the training forward restated: one power step from u, no gradient through it
        with torch.no_grad():
            v = (u @ w.T) @ w
            v = v / v.norm()
        sigma = (v @ w.T).norm()
        return x - 2 / sigma**2 * (F.relu(x @ w.T + b) @ w)

    expected = torch.autograd.functional.jacobian(independent, (params["weight"], params["bias"]))
    with frozen_power_iteration(layer):
        got = torch.func.jacrev(lambda p: torch.func.functional_call(layer, p, (x,)))(params)
        batched = torch.func.vmap(layer)(x)  # one example (5,) at a time
        whole = layer(x)
    assert torch.allclose(got["weight"], expected[0], rtol=0, atol=1e-12)
    assert torch.allclose(got["bias"], expected[1], rtol=0, atol=1e-12)
    assert torch.allclose(batched, whole, rtol=0, atol=1e-12)
    assert torch.equal(layer.u, u)


def test_frozen_power_iteration_nests_and_restores_after_exceptions():
    layer = ConvexPotentialLinear(5).train()
    model = nn.Sequential(nn.Identity(), layer)
    x = torch.randn(3, 5)
    u0 = layer.u.clone()
    with frozen_power_iteration(model):
        with frozen_power_iteration(layer):
            model(x)
        model(x)  # the outer context still holds
        assert torch.equal(layer.u, u0)
    with pytest.raises(RuntimeError, match="boom"):
        with frozen_power_iteration(model):
            model(x)
            raise RuntimeError("boom")
    assert torch.equal(layer.u, u0)
    model(x)  # restored: a training forward advances u
    assert not torch.equal(layer.u, u0)
    with frozen_power_iteration(model):
        other = copy.deepcopy(layer)  # a copy made in the context is not frozen after it
    u1 = other.u.clone()
    other(x)
    assert not torch.equal(other.u, u1)
    with pytest.raises(TypeError, match="nn.Module"):
        with frozen_power_iteration(lambda z: z):
            pass


def test_frozen_eval_power_norm_leaves_the_vector_and_the_cache():
    """eval_norm="power" with a cold cache: in the context the norm comes from the stored u (the value the
    first normal evaluation computes), u is not advanced, and the cache stays cold; a frozen training
    forward does not reset a warm cache either."""
    torch.manual_seed(2)
    layer = ConvexPotentialConv2d(2, 3, input_size=(5, 5), eval_norm="power").double().eval()
    reference = copy.deepcopy(layer)
    u0 = layer.u.clone()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with frozen_power_iteration(layer):
        out = layer(x)
        sigma = layer.eval_spectral_norm()
        assert torch.equal(layer.u, u0)
    assert torch.equal(out, reference(x)) and torch.equal(sigma, reference.eval_spectral_norm())
    layer(x)  # the cache was not filled: the first normal evaluation runs now and advances u
    assert torch.equal(layer.u, reference.u) and not torch.equal(layer.u, u0)
    layer.train()
    with frozen_power_iteration(layer):
        layer(x)
    layer.eval()
    u1 = layer.u.clone()
    layer(x)  # still cached: u stays
    assert torch.equal(layer.u, u1)
    layer.train()
    layer(x)  # a normal training forward restarts the official evaluation
    layer.eval()
    u2 = layer.u.clone()
    layer(x)
    assert not torch.equal(layer.u, u2)


def test_docstring_examples():
    result = doctest.testmod(cpl_mini.spectral, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0
