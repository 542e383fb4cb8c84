"""cpl_mini.orthogonal: Cayley and exponential layers are isometries; checked in float64 against explicit
matrices, the ODE solver (torchdiffeq) and exact Jacobians."""

import pytest
import torch
import torch.nn as nn

from cpl_mini.bounds import lipschitz_upper_bound
from cpl_mini.flows import SkewSymmetricField, flow
from cpl_mini.layers import FirstCoordinates
from cpl_mini.orthogonal import CayleyLinear, MatrixExpLinear, MaxMin, cayley, skew

DT = torch.float64
LAYERS = [CayleyLinear, MatrixExpLinear]
SHAPES = [(6, 6), (3, 7), (7, 3)]


def jacobian_svals(f, x):
    jac = torch.autograd.functional.jacobian(f, x)
    return torch.linalg.svdvals(jac.reshape(-1, x.numel()))


def make(cls, n_in, n_out, scale=1.0):
    layer = cls(n_in, n_out).to(DT)
    with torch.no_grad():
        layer.weight.mul_(scale)
    return layer


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_jacobian_norm_at_most_one_and_isometry(cls, shape, scale):
    n_in, n_out = shape
    layer = make(cls, n_in, n_out, scale)
    for _ in range(3):
        s = jacobian_svals(layer, torch.randn(n_in, dtype=DT))
        assert s[0] <= 1 + 1e-6
        # orthonormal columns (in <= out) or rows (in > out): every singular value is exactly 1
        assert s[min(n_in, n_out) - 1] >= 1 - 1e-6
    assert lipschitz_upper_bound(layer.eval()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("scale", [0.3, 1.0, 30.0])
def test_cayley_matches_explicit_formula_and_is_orthogonal(scale):
    A = skew(scale * torch.randn(5, 5, dtype=DT))
    eye = torch.eye(5, dtype=DT)
    Q = cayley(A)
    reference = (eye - A) @ torch.linalg.inv(eye + A)  # the formula as written, factors in that order
    assert torch.allclose(Q, reference, atol=1e-10)
    assert torch.allclose(Q.T @ Q, eye, atol=1e-10)
    assert torch.linalg.det(Q).item() == pytest.approx(1.0, abs=1e-9)  # Cayley images have det +1


def test_cayley_is_one_crank_nicolson_step_of_the_conservative_flow():
    """x1 - x0 = (h/2) B (x0 + x1) with B = -2A, h = 1, is solved by x1 = cay(A) x0."""
    A = skew(torch.randn(4, 4, dtype=DT))
    B, eye = -2 * A, torch.eye(4, dtype=DT)
    x0 = torch.randn(4, dtype=DT)
    x1 = cayley(A) @ x0
    assert torch.allclose(x1 - x0, 0.5 * B @ (x0 + x1), atol=1e-12)
    cn = torch.linalg.solve(eye - 0.5 * B, eye + 0.5 * B)
    assert torch.allclose(cn, cayley(A), atol=1e-12)


def test_cayley_and_exp_agree_to_third_order():
    """||exp(-2 h A) - cay(h A)|| = O(h^3): halving h divides the gap by about 8."""
    A = skew(torch.randn(5, 5, dtype=DT))
    gaps = [(torch.linalg.matrix_exp(-2 * h * A) - cayley(h * A)).norm().item() for h in (0.02, 0.01)]
    assert gaps[0] / gaps[1] == pytest.approx(8.0, rel=0.02)


def test_matrix_exp_layer_is_the_exact_flow_of_the_skew_field():
    torch.manual_seed(1)
    layer = MatrixExpLinear(5, bias=False).to(DT)
    with torch.no_grad():
        layer.weight.mul_(4.0)  # a non-trivial rotation
    A = layer.skew_matrix().detach()
    x0 = torch.randn(3, 5, dtype=DT)
    with torch.no_grad():
        xt = flow(SkewSymmetricField(A), x0, torch.tensor([0.0, 1.0], dtype=DT), rtol=1e-11, atol=1e-12)[-1]
        assert torch.allclose(layer(x0), xt, atol=1e-8)
        half = layer.flow_matrix(0.5)
        assert torch.allclose(half @ half, layer.orthogonal_matrix(), atol=1e-12)


@pytest.mark.parametrize("cls", LAYERS)
def test_rectangular_layer_is_zero_pad_then_truncate(cls):
    for n_in, n_out in [(3, 7), (7, 3)]:
        layer = make(cls, n_in, n_out)
        x = torch.randn(4, n_in, dtype=DT)
        d = max(n_in, n_out)
        padded = torch.cat([x, torch.zeros(4, d - n_in, dtype=DT)], 1)
        expected = (padded @ layer.orthogonal_matrix().T)[:, :n_out] + layer.bias
        assert torch.allclose(layer(x), expected, atol=1e-12)


@pytest.mark.parametrize("cls,shift", [(CayleyLinear, -0.5), (MatrixExpLinear, 0.5)])
def test_check_fails_without_the_skew_symmetrisation(cls, shift, monkeypatch):
    """Broken construction: feed P itself instead of P - P^T. With a symmetric part near shift * I,
    exp(P) (shift > 0) and cay(P) (shift < 0) both stretch some direction: neither is orthogonal."""
    layer = make(cls, 6, 6)
    with torch.no_grad():
        layer.weight.add_(shift * torch.eye(6, dtype=DT))
    monkeypatch.setattr(layer, "skew_matrix", lambda: layer.weight)
    x = torch.randn(6, dtype=DT)
    assert jacobian_svals(layer, x)[0] > 1.05
    assert lipschitz_upper_bound(layer.eval()) > 1.05


def test_gradients_flow_and_orthogonality_survives_training():
    layer = CayleyLinear(6)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(8, 6)).square().sum().backward()
        assert layer.weight.grad.abs().sum() > 0
        opt.step()
    Q = layer.orthogonal_matrix().detach().double()
    assert torch.allclose(Q.T @ Q, torch.eye(6, dtype=DT), atol=1e-5)


def test_maxmin_is_a_permutation_on_each_region():
    act = MaxMin()
    x = torch.randn(3, 8, dtype=DT)
    out = act(x)
    assert torch.equal(out[:, :4], torch.maximum(x[:, :4], x[:, 4:]))
    assert torch.equal(out.sort(1).values, x.sort(1).values)  # a permutation of the inputs
    jac = torch.autograd.functional.jacobian(act, x[0])
    assert torch.equal(jac @ jac.T, torch.eye(8, dtype=DT))  # a permutation matrix
    with pytest.raises(ValueError, match="even"):
        act(torch.randn(2, 5))


def test_network_bound_and_bad_inputs():
    net = nn.Sequential(
        CayleyLinear(2, 8), MaxMin(), MatrixExpLinear(8), MaxMin(), CayleyLinear(8, 3), FirstCoordinates(2)
    )
    assert lipschitz_upper_bound(net.eval()) == pytest.approx(1.0, abs=1e-5)
    assert net(torch.randn(5, 2)).shape == (5, 2)
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        MatrixExpLinear(8)(torch.randn(5, 7))
    with pytest.raises(ValueError, match="square"):
        cayley(torch.randn(3, 4))
    with pytest.raises(ValueError, match="positive"):
        CayleyLinear(0, 3)
