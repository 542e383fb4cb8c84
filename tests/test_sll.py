"""cpl_mini.sll: the SDP-based Lipschitz Layer is 1-Lipschitz for every W and q, generalises the CPL
(T = ||W||^2 I) and shares T with AOL (q = 1); checked in float64 with exact Jacobians. The convolutional
layer is checked against explicit convolution matrices built entry by entry from the definition."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

from cpl_mini.bounds import lipschitz_upper_bound
from cpl_mini.layers import ConvexPotentialLinear, FirstCoordinates
from cpl_mini.normalized import aol_conv_scaling, aol_scaling, conv_gram_kernel
from cpl_mini.sll import SLLConv2d, SLLLinear, sll_conv_t, sll_residual, sll_t

DT = torch.float64
SHAPES = [(6, 6), (8, 3), (5, 12)]  # features d, inner m


def jacobian(f, x):
    return torch.autograd.functional.jacobian(f, x).reshape(-1, x.numel())


def make(d, m, scale=1.0, q_spread=1.0):
    layer = SLLLinear(d, m).to(DT)
    with torch.no_grad():
        layer.weight.mul_(scale)
        layer.log_q.normal_(0.0, q_spread)  # a random positive q
    return layer


def test_t_matches_the_formula():
    W, q = torch.randn(5, 3, dtype=DT), torch.rand(5, dtype=DT) + 0.1
    G = W @ W.T
    expected = torch.tensor([sum(abs(G[i, j]) * q[j] / q[i] for j in range(5)) for i in range(5)], dtype=DT)
    assert torch.allclose(sll_t(W, q), expected, atol=1e-13)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}m{s[1]}")
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_jacobian_norm_at_most_one(shape, scale):
    d, m = shape
    layer = make(d, m, scale)
    for _ in range(3):
        x = torch.randn(d, dtype=DT)
        assert torch.linalg.svdvals(jacobian(layer, x))[0].item() <= 1 + 1e-6
    # sharp point: every ReLU active, the Jacobian is exactly I - 2 W^T T^{-1} W
    with torch.no_grad():
        layer.bias.fill_(1e3)
    x = torch.randn(d, dtype=DT)
    W, t = layer.weight.detach(), layer.t().detach()
    expected = torch.eye(d, dtype=DT) - 2 * W.T @ torch.diag(1 / t) @ W
    jac = jacobian(layer, x)
    assert torch.allclose(jac, expected, atol=1e-9)
    assert torch.linalg.svdvals(jac)[0].item() <= 1 + 1e-6
    assert lipschitz_upper_bound(layer.eval()) == pytest.approx(1.0, abs=1e-6)


def test_never_expands_pairs():
    layer = make(6, 9)
    with torch.no_grad():
        for _ in range(200):
            x, y = torch.randn(6, dtype=DT), torch.randn(6, dtype=DT)
            assert (layer(x) - layer(y)).norm() <= (x - y).norm() * (1 + 1e-12)


def test_cpl_is_the_special_case_t_equal_norm_squared():
    """sll_residual with t_i = ||W||^2 for all i is the Convex Potential Layer."""
    cpl = ConvexPotentialLinear(5, 7).to(DT).eval()
    x = torch.randn(4, 5, dtype=DT)
    sigma = torch.linalg.svdvals(cpl.weight.detach())[0]
    t = sigma**2 * torch.ones(7, dtype=DT)
    assert torch.allclose(sll_residual(x, cpl.weight, cpl.bias, t), cpl(x), atol=1e-8)


def test_q_equal_one_gives_the_aol_matrix():
    """With q = 1, t_i = sum_j |W W^T|_ij: the AOL scaling of W^T, t = d^-2."""
    W = torch.randn(6, 4, dtype=DT)
    assert torch.allclose(sll_t(W, torch.ones(6, dtype=DT)), aol_scaling(W.T) ** -2, atol=1e-12)
    layer = SLLLinear(4, 6).to(DT)  # log_q starts at 0
    assert torch.equal(layer.q(), torch.ones(6, dtype=DT))


@pytest.mark.parametrize("broken", ["diagonal_only", "half_t"])
def test_check_fails_when_t_is_too_small(broken):
    """Broken constructions: t_i = G_ii (off-diagonal mass dropped) or t / 2. With correlated rows of W
    the Jacobian at a point where all units are active has norm > 1, and the computed bound says so."""
    layer = make(4, 5, q_spread=0.0)
    with torch.no_grad():
        layer.weight.copy_(torch.ones(5, 4, dtype=DT) + 0.1 * torch.randn(5, 4, dtype=DT))
        layer.bias.fill_(1e3)
    x = torch.randn(4, dtype=DT)
    assert torch.linalg.svdvals(jacobian(layer, x))[0].item() <= 1 + 1e-9
    G = layer.weight @ layer.weight.T
    if broken == "diagonal_only":
        layer.t = lambda: torch.diagonal(G)
    else:
        layer.t = lambda: sll_t(layer.weight, layer.q()) / 2
    assert torch.linalg.svdvals(jacobian(layer, x))[0].item() > 1.5
    assert lipschitz_upper_bound(layer.eval()) > 1.5


def test_q_is_learnable_and_training_equals_eval():
    layer = SLLLinear(6, 8)
    x = torch.randn(5, 6)
    out_train = layer.train()(x)
    out_train.square().sum().backward()
    assert layer.log_q.grad is not None and layer.log_q.grad.abs().sum() > 0
    assert torch.equal(layer.eval()(x), out_train.detach())


def test_network_bound_and_bad_inputs():
    net = nn.Sequential(SLLLinear(8, 16), SLLLinear(8), FirstCoordinates(2))
    assert lipschitz_upper_bound(net.eval()) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        net(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"\(5,\)"):
        sll_t(torch.randn(5, 3), torch.ones(4))
    with pytest.raises(ValueError, match="positive"):
        SLLLinear(0)


# ------------------------------------------------------------------------------------ SLLConv2d
CONV_SHAPES = [(2, 3), (3, 2), (3, 3)]  # channels C, inner m
SIZES = [(5, 5), (6, 7)]
WEIGHTS = ["random", "large", "ones", "checkerboard"]


def conv_matrix(kernel, size):
    """The matrix of the zero-padded ("same") stride-1 convolution on (C, H, W) inputs, built entry by entry
    from y[a, h, w] = sum_{c, s, t} K[a, c, s, t] x[c, h + s - p, w + t - p] (no convolution routine)."""
    K = kernel.detach().double().cpu().numpy()
    m, C, k, _ = K.shape
    H, W = size
    p = k // 2
    A = np.zeros((m, H, W, C, H, W))
    for a, c, s, t, i, j in itertools.product(range(m), range(C), range(k), range(k), range(H), range(W)):
        h, w = i + s - p, j + t - p
        if 0 <= h < H and 0 <= w < W:
            A[a, i, j, c, h, w] += K[a, c, s, t]
    return torch.from_numpy(A.reshape(m * H * W, C * H * W))


def reference_t(kernel, q):
    """t from the explicit A A^T: on a (2k-1) x (2k-1) image, the row of (a, centre pixel) holds every shift
    of the gram kernel once, so t_a = sum of |A A^T| over that row, weighted by q_b / q_a."""
    m, k = kernel.shape[0], kernel.shape[2]
    n = 2 * k - 1
    A = conv_matrix(kernel, (n, n))
    G = (A @ A.T).reshape(m, n, n, m, n, n)[:, n // 2, n // 2]  # (m, m, n, n): rows (a, centre)
    S = G.abs().sum(dim=(2, 3))
    return (S @ q) / q


def conv_jacobian(f, x):
    return torch.autograd.functional.jacobian(f, x, vectorize=True).reshape(x.numel(), x.numel())


def make_conv(C, m, weights, seed, k=3):
    torch.manual_seed(seed)
    layer = SLLConv2d(C, m, kernel_size=k).to(DT)
    with torch.no_grad():
        if weights == "large":
            layer.weight.mul_(100.0)
        elif weights == "ones":  # every shift correlated: the gram kernel's row sums are tight
            layer.weight.fill_(1.0)
        elif weights == "checkerboard":  # the gram kernel alternates in sign: the |.| matters
            s = torch.arange(k)
            layer.weight.copy_(((-1.0) ** (s[:, None] + s[None, :])).to(DT).expand_as(layer.weight))
        if weights in ("random", "large"):
            layer.log_q.normal_(0.0, 1.0)
        else:
            layer.log_q.zero_()
    return layer


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("seed", range(3))
def test_conv_t_matches_the_explicit_operator(k, seed):
    torch.manual_seed(seed)
    K, q = torch.randn(3, 2, k, k, dtype=DT), torch.rand(3, dtype=DT) + 0.1
    assert torch.allclose(sll_conv_t(K, q), reference_t(K, q), rtol=1e-12, atol=0)
    # the gram kernel is the official code's conv2d(K, K, padding=k-1)
    assert torch.allclose(conv_gram_kernel(K.transpose(0, 1)), torch.conv2d(K, K, padding=k - 1), atol=1e-12)


def test_conv_q_equal_one_gives_the_aol_scaling_and_k1_is_the_dense_layer():
    K = torch.randn(4, 3, 3, 3, dtype=DT)
    assert torch.allclose(sll_conv_t(K, torch.ones(4, dtype=DT)), aol_conv_scaling(K.transpose(0, 1)) ** -2)
    conv, dense = SLLConv2d(3, 5, kernel_size=1).to(DT), SLLLinear(3, 5).to(DT)
    with torch.no_grad():
        conv.log_q.normal_()
        dense.load_state_dict({"weight": conv.weight[:, :, 0, 0], "bias": conv.bias, "log_q": conv.log_q})
    x = torch.randn(2, 3, 4, 5, dtype=DT)
    assert torch.allclose(conv(x), dense(x.movedim(1, -1)).movedim(-1, 1), atol=1e-12)


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: f"C{s[0]}m{s[1]}")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("weights", WEIGHTS)
def test_conv_jacobian_is_exact_and_in_the_unit_ball(shape, size, weights):
    """J = I - 2 A^T T^-1 D A (A the explicit matrix, D the ReLU slopes): symmetric, eigenvalues in
    [-1, 1]; its norm is at most 1 and at most lipschitz_bound() (which is 1 up to rounding)."""
    (C, m), (H, W) = shape, size
    for seed in range(2):
        layer = make_conv(C, m, weights, seed)
        A = conv_matrix(layer.weight, size)
        t = layer.t().detach().repeat_interleave(H * W)
        bound = layer.lipschitz_bound()
        assert 1.0 <= bound <= 1 + 1e-9
        for active in (False, True):  # a random point, then one where every unit is active
            if active:
                with torch.no_grad():
                    layer.bias.fill_(1e7)
            x = torch.randn(1, C, H, W, dtype=DT)
            b = layer.bias.detach().repeat_interleave(H * W)
            slopes = ((A @ x.flatten() + b) > 0).to(DT)
            expected = torch.eye(C * H * W, dtype=DT) - 2 * A.T @ torch.diag(slopes / t) @ A
            jac = conv_jacobian(layer, x)
            assert torch.allclose(jac, expected, atol=1e-10)
            eig = torch.linalg.eigvalsh((jac + jac.T) / 2)
            assert eig[0].item() >= -1 - 1e-9 and eig[-1].item() <= 1 + 1e-9
            sv = torch.linalg.svdvals(jac)[0].item()
            assert sv <= 1 + 1e-9 and sv <= bound


def _broken_t(kind, kernel, q):
    k = kernel.shape[-1]
    if kind == "no_abs":
        s = torch.conv2d(kernel, kernel, padding=k - 1).sum(dim=(2, 3))
    elif kind == "gram_size_k":  # padding k//2: a (k, k) gram kernel, the outer shifts dropped
        s = torch.conv2d(kernel, kernel, padding=k // 2).abs().sum(dim=(2, 3))
    elif kind == "centre_shift_only":  # the dense formula on the flattened kernel
        w = kernel.flatten(1)
        s = (w @ w.T).abs()
    else:  # "no_division_by_q_i"
        return torch.conv2d(kernel, kernel, padding=k - 1).abs().sum(dim=(2, 3)) @ q
    return s @ q / q


@pytest.mark.parametrize("broken", ["no_abs", "gram_size_k", "centre_shift_only", "no_division_by_q_i"])
def test_conv_check_fails_when_t_is_broken_and_the_bound_still_holds(broken):
    """Broken T: the Jacobian at a point where every unit is active has norm > 1 (so the unit-ball check
    can fail), and lipschitz_bound(), computed from the t the forward uses, is still above it."""
    weights = "checkerboard" if broken == "no_abs" else "ones"
    layer = make_conv(2, 2, weights, 0)
    with torch.no_grad():
        layer.bias.fill_(1e7)
        if broken == "no_division_by_q_i":
            layer.log_q.fill_(-2.0)
    x = torch.randn(1, 2, 6, 7, dtype=DT)
    assert torch.linalg.svdvals(conv_jacobian(layer, x))[0].item() <= 1 + 1e-9
    layer.t = lambda: _broken_t(broken, layer.weight, layer.q())
    sv = torch.linalg.svdvals(conv_jacobian(layer, x))[0].item()
    assert sv > 1.1
    assert layer.lipschitz_bound() >= sv


@pytest.mark.parametrize("seed", range(4))
def test_conv_bound_is_sound_for_any_t_and_the_sized_ratio_is_tighter(seed):
    """With t lowered at random (a layer that is not 1-Lipschitz) the bound still covers the exact Jacobian;
    contraction_ratio(size) is at least the exact ||T^-1/2 A||^2 and at most the size-free ratio."""
    layer = make_conv(3, 3, "large", seed)
    with torch.no_grad():
        layer.bias.fill_(1e7)
    t = layer.t().detach() * (torch.rand(3, dtype=DT) * 0.8 + 0.2)
    layer.t = lambda: t
    x = torch.randn(1, 3, 6, 7, dtype=DT)
    assert layer.lipschitz_bound() >= torch.linalg.svdvals(conv_jacobian(layer, x))[0].item()
    A = conv_matrix(layer.weight, (6, 7))
    B = A / t.repeat_interleave(42).sqrt()[:, None]
    exact = torch.linalg.svdvals(B)[0].item() ** 2
    assert exact <= layer.contraction_ratio((6, 7)) <= layer.contraction_ratio()
    assert layer.contraction_ratio((6, 7)) == pytest.approx(exact, rel=0.2)  # circular grid 8x9: close


def test_conv_modes_dtypes_and_gradients(device, dtype, ieee):
    layer = SLLConv2d(3, 4).to(device=device, dtype=dtype)
    with torch.no_grad():
        layer.log_q.normal_()
    x = torch.randn(2, 3, 6, 7, device=device, dtype=dtype)
    out = layer.train()(x)
    assert out.shape == x.shape and out.dtype == dtype
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.weight, layer.bias, layer.log_q))
    with torch.no_grad():
        assert torch.equal(layer.eval()(x), out.detach())
    assert 1.0 <= layer.lipschitz_bound() <= 1 + 1e-6
    sv = torch.linalg.svdvals(conv_jacobian(layer, x[:1]))[0].item()
    assert sv <= 1 + (1e-5 if dtype == torch.float32 else 1e-9)


def test_conv_network_bound_and_bad_inputs():
    net = nn.Sequential(SLLConv2d(3, 8), SLLConv2d(3, kernel_size=5), nn.Flatten()).to(DT).eval()
    assert 1.0 <= lipschitz_upper_bound(net) <= 1 + 1e-8
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        net(torch.randn(3, 6, 6, dtype=DT))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        net(torch.randn(1, 4, 6, 6, dtype=DT))
    with pytest.raises(ValueError, match="odd"):
        SLLConv2d(3, kernel_size=4)
    with pytest.raises(ValueError, match="positive"):
        SLLConv2d(3, 0)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        sll_conv_t(torch.randn(4, 3, 3, 3), torch.ones(3))
    with pytest.raises(ValueError, match="kernel"):
        sll_conv_t(torch.randn(4, 3), torch.ones(4))
