"""cpl_mini.sll: the SDP-based Lipschitz Layer is 1-Lipschitz for every W and q, generalises the CPL
(T = ||W||^2 I) and shares T with AOL (q = 1); checked in float64 with exact Jacobians."""

import pytest
import torch
import torch.nn as nn

from cpl_mini.bounds import lipschitz_upper_bound
from cpl_mini.layers import ConvexPotentialLinear, FirstCoordinates
from cpl_mini.normalized import aol_scaling
from cpl_mini.sll import SLLLinear, sll_residual, sll_t

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
