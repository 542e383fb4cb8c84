"""cpl_mini.normalized: spectral normalisation (sound in eval mode) and AOL rescaling are 1-Lipschitz;
checked in float64 with exact Jacobians, explicit matrices and SVDs."""

import pytest
import torch
import torch.nn as nn

from cpl_mini.bounds import lipschitz_upper_bound
from cpl_mini.layers import FirstCoordinates
from cpl_mini.normalized import AOLLinear, SpectralNormLinear, aol_scaling
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
