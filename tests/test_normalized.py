"""cpl_mini.normalized: spectral normalisation (sound in eval mode) and AOL rescaling are 1-Lipschitz;
checked in float64 with exact Jacobians, explicit matrices and SVDs. The convolutional AOL layer is checked
against explicit convolution matrices built entry by entry from the definition."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

from cpl_mini.bounds import lipschitz_upper_bound
from cpl_mini.layers import FirstCoordinates
from cpl_mini.normalized import (
    AOLConv2d,
    AOLLinear,
    SpectralNormLinear,
    aol_conv_scaling,
    aol_scaling,
    conv_gram_kernel,
    conv_gram_kernel_abs_upper,
)
from cpl_mini.orthogonal import MaxMin

DT = torch.float64
SHAPES = [(6, 6), (3, 7), (7, 3)]


def jacobian_svals(f, x):
    jac = torch.autograd.functional.jacobian(f, x)
    return torch.linalg.svdvals(jac.reshape(-1, x.numel()))


def exact_norm(m):
    return torch.linalg.svdvals(m.detach().to(DT))[0].item()


# --------------------------------------------------------------------------------- spectral norm
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_spectral_norm_eval_jacobian_norm_is_one(shape, scale):
    layer = SpectralNormLinear(*shape).to(DT).eval()
    with torch.no_grad():
        layer.weight.mul_(scale)
    for _ in range(3):
        s = jacobian_svals(layer, torch.randn(shape[0], dtype=DT))[0].item()
        assert s <= 1 + 1e-6
        assert s >= 1 - 1e-6  # W / ||W|| has norm exactly 1: the bound is tight
    # the Jacobian is W / ||W||_2 with the exact norm from an SVD (an independent reference)
    jac = torch.autograd.functional.jacobian(layer, torch.randn(shape[0], dtype=DT))
    assert torch.allclose(jac, layer.weight / exact_norm(layer.weight), atol=1e-8)
    assert lipschitz_upper_bound(layer.eval()) == pytest.approx(1.0, abs=1e-6)


def test_spectral_norm_training_is_one_power_step_and_never_above_the_sound_norm():
    layer = SpectralNormLinear(8, 5).train()
    u0 = layer.u.clone()
    layer(torch.randn(4, 8)).square().sum().backward()
    assert not torch.equal(u0, layer.u)
    assert layer.weight.grad is not None
    sigma = layer.spectral_norm()
    assert sigma.requires_grad  # differentiable estimate, as in Miyato et al.
    assert sigma.item() <= layer.sound_spectral_norm().item() * (1 + 1e-5)


def test_check_fails_with_an_unconverged_power_estimate():
    """Normalising by a 1-step power estimate (the usual eval norm, under-converged) expands some pair."""
    torch.manual_seed(2)
    layer = SpectralNormLinear(10, 10, eval_norm="power", n_eval_iter=1).to(DT).eval()
    U, _ = torch.linalg.qr(torch.randn(10, 10, dtype=DT))
    V, _ = torch.linalg.qr(torch.randn(10, 10, dtype=DT))
    s = torch.linspace(1.0, 0.9, 10, dtype=DT)
    with torch.no_grad():
        layer.weight.copy_(U @ torch.diag(s) @ V.T)
        layer.u.copy_((V[:, 1] + 1e-3 * V[:, 0])[None])  # start near the 2nd singular vector
    x = torch.randn(10, dtype=DT)
    assert jacobian_svals(layer, x)[0].item() > 1.005
    assert lipschitz_upper_bound(layer.eval()) > 1.005
    sound = SpectralNormLinear(10, 10).to(DT).eval()
    sound.load_state_dict(layer.state_dict())
    assert jacobian_svals(sound, x)[0].item() <= 1 + 1e-6


def test_spectral_norm_eval_cache_follows_the_weights():
    layer = SpectralNormLinear(6, 4).eval()
    n0 = layer.eval_spectral_norm().item()
    with torch.no_grad():
        layer.weight.mul_(2.0)
    assert layer.eval_spectral_norm().item() == pytest.approx(2 * n0, rel=1e-6)
    assert layer.lipschitz_bound() == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------------------------- AOL
def test_aol_scaling_matches_the_formula():
    W = torch.randn(5, 4, dtype=DT)
    gram = W.T @ W
    expected = torch.tensor([sum(abs(gram[i, j]) for i in range(4)) ** -0.5 for j in range(4)], dtype=DT)
    assert torch.allclose(aol_scaling(W), expected, atol=1e-14)
    layer = AOLLinear(4, 5).to(DT)
    with torch.no_grad():
        layer.weight.copy_(W)
    assert torch.allclose(layer.weight_matrix(), W @ torch.diag(expected), atol=1e-14)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_aol_jacobian_norm_at_most_one(shape, scale):
    for _ in range(5):  # several random weights
        layer = AOLLinear(*shape).to(DT)
        with torch.no_grad():
            layer.weight.mul_(scale)
        assert jacobian_svals(layer, torch.randn(shape[0], dtype=DT))[0].item() <= 1 + 1e-6
        assert lipschitz_upper_bound(layer.eval()) <= 1 + 1e-6


def test_aol_gershgorin_lemma_and_tightness_on_orthogonal_columns():
    """W^T W <= diag(row sums of |W^T W|) (PSD gap), and AOL is exactly orthogonal when W's columns are."""
    for _ in range(10):
        G = (lambda W: W.T @ W)(torch.randn(7, 5, dtype=DT))
        gap = torch.diag(G.abs().sum(1)) - G
        assert torch.linalg.eigvalsh(gap)[0].item() >= -1e-10
    Q, _ = torch.linalg.qr(torch.randn(6, 4, dtype=DT))
    layer = AOLLinear(4, 6).to(DT)
    with torch.no_grad():
        layer.weight.copy_(Q * torch.tensor([3.0, 0.5, 2.0, 7.0], dtype=DT))  # orthogonal, unequal columns
    s = torch.linalg.svdvals(layer.weight_matrix().detach())
    assert torch.allclose(s, torch.ones(4, dtype=DT), atol=1e-12)


def test_check_fails_when_the_rescaling_ignores_the_off_diagonal_terms():
    """Broken construction: d_j = 1 / ||w_j|| (column normalisation only) instead of the AOL scaling.
    With equal columns, W diag(d) has norm sqrt(n): the Jacobian check catches it."""
    layer = AOLLinear(4, 3).to(DT)
    with torch.no_grad():
        layer.weight.copy_(torch.ones(3, 4, dtype=DT))
    x = torch.randn(4, dtype=DT)
    assert jacobian_svals(layer, x)[0].item() == pytest.approx(1.0, abs=1e-9)  # AOL: exactly 1 here
    layer.scaling = lambda: layer.weight.norm(dim=0).reciprocal()
    assert jacobian_svals(layer, x)[0].item() == pytest.approx(2.0, abs=1e-9)
    assert lipschitz_upper_bound(layer.eval()) > 1.9


def test_network_bound_and_bad_inputs():
    net = nn.Sequential(
        AOLLinear(2, 8), MaxMin(), SpectralNormLinear(8, 8), MaxMin(), AOLLinear(8, 8), FirstCoordinates(2)
    ).eval()
    assert lipschitz_upper_bound(net.eval()) <= 1 + 1e-5
    assert net(torch.randn(5, 2)).shape == (5, 2)
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        AOLLinear(8, 3)(torch.randn(5, 7))
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        SpectralNormLinear(8, 3)(torch.randn(5, 7))
    with pytest.raises(ValueError, match="eval_norm"):
        SpectralNormLinear(4, eval_norm="svd")
    with pytest.raises(ValueError, match="matrix"):
        aol_scaling(torch.randn(3, 3, 3))


@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_spectral_norm_applied_matrix_has_norm_at_most_one(dt):
    """The eval-mode forward applies fl(W / sigma) in the weight's dtype. With the sound norm cast to float32
    to nearest (up to 3e-8 below it, far more than its 1e-9 margin) that matrix can have norm above 1; in
    bf16 the rounding of the entries alone does it. The divisor rounded up and raised by (sqrt(rank) + 1)
    ulps keeps it at most 1 (checked with the exact float64 SVD of the stored matrix)."""
    for seed in range(16):
        torch.manual_seed(seed)
        layer = SpectralNormLinear(9, 7).to(dt).eval()
        applied = layer.weight_matrix().detach().to(dt)  # what F.linear receives
        assert torch.linalg.svdvals(applied.double())[0].item() <= 1.0, seed
        assert layer.lipschitz_bound() <= 1 + 2e-9
        # and the divisor is not much larger than the norm: the layer stays an isometry on its top direction
        assert torch.linalg.svdvals(applied.double())[0].item() >= 1 - max(30 * torch.finfo(dt).eps, 3e-9)


def test_spectral_norm_power_mode_is_the_official_estimate():
    """eval_norm="power": 100 iterations v = Wu/|Wu|, u = W^T v/|W^T v| from the persistent vector (which
    advances) and sigma = <W u, v>; the layer divides by it."""
    torch.manual_seed(4)
    layer = SpectralNormLinear(8, 6, eval_norm="power").to(DT).eval()
    w = layer.weight.detach()
    u = layer.u.clone()
    for _ in range(100):
        v = u @ w.T
        v = v / (v.square().sum().sqrt() + 1e-12)
        u = v @ w
        u = u / (u.square().sum().sqrt() + 1e-12)
    sigma = ((u @ w.T) * v).sum()
    x = torch.randn(5, 8, dtype=DT)
    assert torch.allclose(layer(x), x @ (w / sigma).T + layer.bias, atol=1e-12)
    assert torch.allclose(layer.u, u, atol=1e-12)


# ------------------------------------------------------------------------------------ AOLConv2d
def conv_matrix(kernel, size, stride=1, padding=None):
    """The matrix of conv2d(., K, stride, padding) on (C, H, W) inputs, built entry by entry from
    y[a, i, j] = sum_{c, s, t} K[a, c, s, t] x[c, stride i + s - p, stride j + t - p] (no conv routine)."""
    K = kernel.detach().double().cpu().numpy()
    m, C, k, _ = K.shape
    (H, W), p = size, k // 2 if padding is None else padding
    Ho, Wo = (H + 2 * p - k) // stride + 1, (W + 2 * p - k) // stride + 1
    A = np.zeros((m, Ho, Wo, C, H, W))
    for a, c, s, t, i, j in itertools.product(range(m), range(C), range(k), range(k), range(Ho), range(Wo)):
        h, w = stride * i + s - p, stride * j + t - p
        if 0 <= h < H and 0 <= w < W:
            A[a, i, j, c, h, w] += K[a, c, s, t]
    return torch.from_numpy(A.reshape(m * Ho * Wo, C * H * W))


def reference_gram(kernel):
    """G_ij(u, v) read off the explicit A^T A on a (2k-1) x (2k-1) image: column (j, centre pixel), row
    (i, centre + (u, v)); shape (in, in, 2k-1, 2k-1)."""
    cin, k = kernel.shape[1], kernel.shape[2]
    n = 2 * k - 1
    A = conv_matrix(kernel, (n, n))
    return (A.T @ A).reshape(cin, n, n, cin, n, n)[:, :, :, :, n // 2, n // 2].permute(0, 3, 1, 2)


def conv_jacobian(f, x):
    return torch.autograd.functional.jacobian(f, x, vectorize=True).reshape(-1, x.numel())


def make_aol(cin, cout, weights, seed, stride=1, k=3):
    torch.manual_seed(seed)
    layer = AOLConv2d(cin, cout, kernel_size=k, stride=stride).to(DT)
    with torch.no_grad():
        if weights == "large":
            layer.weight.mul_(100.0)
        elif weights == "ones":
            layer.weight.fill_(1.0)
        elif weights == "checkerboard":
            s = torch.arange(k)
            layer.weight.copy_(((-1.0) ** (s[:, None] + s[None, :])).to(DT).expand_as(layer.weight))
        elif weights == "orthogonal_delta":  # K[:, :, centre] with orthonormal columns: AOL is an isometry
            q, _ = torch.linalg.qr(torch.randn(max(cin, cout), max(cin, cout), dtype=DT))
            layer.weight.zero_()
            layer.weight[:, :, k // 2, k // 2] = q[:cout, :cin] * torch.rand(cin, dtype=DT).add(0.5)
    return layer


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("seed", range(3))
def test_conv_gram_and_aol_conv_scaling_match_the_explicit_operator(k, seed):
    torch.manual_seed(seed)
    K = torch.randn(3, 2, k, k, dtype=DT)
    G = reference_gram(K)
    assert torch.allclose(conv_gram_kernel(K), G, atol=1e-12)
    expected = G.abs().sum(dim=(0, 2, 3)) ** -0.5
    assert torch.allclose(aol_conv_scaling(K), expected, rtol=1e-12, atol=0)
    upper = conv_gram_kernel_abs_upper(K)
    assert upper.dtype == DT and bool((upper >= G.abs()).all())
    assert torch.allclose(upper, G.abs(), rtol=0, atol=1e-11)  # a margin of a few ulps of |K|^T * |K|
    if k == 1:  # a 1x1 convolution is the dense layer
        assert torch.allclose(aol_conv_scaling(K), aol_scaling(K[:, :, 0, 0]), rtol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3), (3, 2), (3, 3)], ids=lambda s: f"{s[0]}to{s[1]}")
@pytest.mark.parametrize("size", [(5, 5), (6, 7)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("weights", ["random", "large", "ones", "checkerboard", "orthogonal_delta"])
def test_aol_conv_jacobian_is_the_rescaled_operator_in_the_unit_ball(shape, size, stride, weights):
    """The Jacobian is the explicit matrix of conv(K diag(d)) with d from the explicit A^T A; its norm is at
    most 1 and at most lipschitz_bound() (itself 1 up to rounding); exactly 1 for orthogonal columns."""
    cin, cout = shape
    for seed in range(2):
        layer = make_aol(cin, cout, weights, seed, stride)
        d = reference_gram(layer.weight.detach()).abs().sum(dim=(0, 2, 3)) ** -0.5
        expected = conv_matrix(layer.weight.detach() * d[:, None, None], size, stride)
        x = torch.randn(1, cin, *size, dtype=DT)
        jac = conv_jacobian(layer, x)
        assert torch.allclose(jac, expected, atol=1e-12)
        sv = torch.linalg.svdvals(jac)[0].item()
        bound = layer.lipschitz_bound()
        assert sv <= 1 + 1e-9 and sv <= bound <= 1 + 1e-9
        if weights == "orthogonal_delta" and stride == 1 and cin <= cout:
            assert torch.allclose(torch.linalg.svdvals(jac), torch.ones(cin * size[0] * size[1], dtype=DT))


def _broken_scaling(kind, kernel):
    k = kernel.shape[-1]
    kt = kernel.transpose(0, 1)
    if kind == "no_abs":
        s = torch.conv2d(kt, kt, padding=k - 1).sum(dim=(0, 2, 3))
    elif kind == "gram_size_k":
        s = torch.conv2d(kt, kt, padding=k // 2).abs().sum(dim=(0, 2, 3))
    elif kind == "output_channel_gram":  # K * K^T (out x out) in place of K^T * K (in x in)
        s = torch.conv2d(kernel, kernel, padding=k - 1).abs().sum(dim=(0, 2, 3))
    else:  # "dense_formula": aol_scaling of the kernel flattened to (out * k * k, in), the centre shift only
        return aol_scaling(kernel.permute(0, 2, 3, 1).reshape(-1, kernel.shape[1]))
    return s.clamp_min(1e-12).rsqrt()


@pytest.mark.parametrize("broken", ["no_abs", "gram_size_k", "output_channel_gram", "dense_formula"])
def test_aol_conv_check_fails_with_a_broken_scaling_and_the_bound_still_holds(broken):
    layer = make_aol(2, 2, "checkerboard" if broken == "no_abs" else "ones", 0)
    if broken == "output_channel_gram":  # only output channel 0 is non-zero
        with torch.no_grad():
            layer.weight[1].zero_()
    x = torch.randn(1, 2, 6, 7, dtype=DT)
    assert torch.linalg.svdvals(conv_jacobian(layer, x))[0].item() <= 1 + 1e-9
    layer.scaling = lambda: _broken_scaling(broken, layer.weight)
    sv = torch.linalg.svdvals(conv_jacobian(layer, x))[0].item()
    assert sv > 1.1
    assert layer.lipschitz_bound() >= sv


def test_aol_conv_stride_is_a_subsampling_and_modes_agree():
    layer = AOLConv2d(3, 4, stride=2).to(DT)
    dense = AOLConv2d(3, 4).to(DT)
    dense.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 7, 6, dtype=DT)
    y = layer(x)
    assert y.shape == (2, 4, 4, 3)
    assert torch.allclose(y, dense(x)[:, :, ::2, ::2], atol=1e-14)
    patches = AOLConv2d(3, 5, kernel_size=2, stride=2, padding=0).to(DT)  # non-overlapping 2x2 patches
    assert patches(x[..., :6, :]).shape == (2, 5, 3, 3)
    assert patches.lipschitz_bound() <= 1 + 1e-9


def test_aol_conv_dtypes_devices_and_gradients(device, dtype, ieee):
    layer = AOLConv2d(3, 5, stride=2).to(device=device, dtype=dtype)
    x = torch.randn(2, 3, 6, 7, device=device, dtype=dtype)
    out = layer.train()(x)
    assert out.shape == (2, 5, 3, 4) and out.dtype == dtype
    out.square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(layer.eval()(x), out.detach())
    bound = layer.lipschitz_bound()
    assert bound <= 1 + 1e-6
    sv = torch.linalg.svdvals(conv_jacobian(layer, x[:1]))[0].item()
    assert sv <= 1 + (1e-5 if dtype == torch.float32 else 1e-9)
    if dtype == torch.float64:
        assert sv <= bound


def test_aol_conv_network_bound_and_bad_inputs():
    net = nn.Sequential(AOLConv2d(3, 8), MaxMin(), AOLConv2d(8, 4, stride=2), nn.Flatten()).to(DT).eval()
    assert lipschitz_upper_bound(net) <= 1 + 1e-8
    assert net(torch.randn(2, 3, 8, 8, dtype=DT)).shape == (2, 64)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        net(torch.randn(3, 8, 8, dtype=DT))
    with pytest.raises(ValueError, match="in_channels=4"):
        net(torch.randn(1, 4, 8, 8, dtype=DT))
    with pytest.raises(ValueError, match="positive"):
        AOLConv2d(3, 4, stride=0)
    with pytest.raises(ValueError, match="padding"):
        AOLConv2d(3, 4, padding=-1)
    for f in (aol_conv_scaling, conv_gram_kernel, conv_gram_kernel_abs_upper):
        with pytest.raises(ValueError, match="conv2d kernel"):
            f(torch.randn(3, 3))
