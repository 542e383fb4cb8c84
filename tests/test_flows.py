"""Checks of cpl_mini.flows against the theorems it illustrates, in float64.

References are independent of the code under test: matrix exponentials and matrix powers for linear
fields, exact SVDs, autograd for gradients, and a tightly-solved ODE for the Euler error.
"""

import math

import pytest
import torch

from cpl_mini.flows import (
    ConvexPotentialField,
    FunctionField,
    LinearField,
    SkewSymmetricField,
    SumField,
    euler,
    euler_step,
    euler_step_lipschitz_lower_bound,
    flow,
    one_sided_lipschitz,
    trajectory_distance,
)

DT = torch.float64
ACTIVATIONS = ["relu", "tanh", "sigmoid"]


def _field(d, m, scale, activation="relu", gen=None):
    W = scale * torch.randn(m, d, dtype=DT, generator=gen)
    b = torch.randn(m, dtype=DT, generator=gen)
    return ConvexPotentialField(W, b, activation=activation)


def _expanding_matrix(d):
    """A matrix whose symmetric part has the eigenvalue +1 (e_1 direction) and is otherwise <= 0."""
    S = torch.randn(d, d, dtype=DT)
    M = -torch.eye(d, dtype=DT) + 0.5 * (S - S.T)
    M[0, 0] = 1.0
    return M


# --- convex potential: flows never expand -----------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_convex_potential_flow_never_increases_distances(activation, scale):
    d, m, n = 4, 6, 100
    field = _field(d, m, scale, activation)
    x0 = 2 * torch.randn(n, d, dtype=DT)
    y0 = x0 + torch.randn(n, d, dtype=DT) * torch.rand(n, 1, dtype=DT)
    t = torch.linspace(0, 0.5, 11, dtype=DT)
    with torch.no_grad():
        dist = trajectory_distance(field, x0, y0, t)
    assert dist.shape == (len(t), n)
    assert torch.allclose(dist[0], (x0 - y0).norm(dim=-1))
    # non-increasing along every trajectory, up to the solver's tolerance
    assert (dist[1:] <= dist[:-1] * (1 + 1e-6) + 1e-8).all()
    # and it genuinely contracts somewhere (the check could fail on an expanding field)
    assert (dist[-1] < 0.99 * dist[0]).any()


def test_expanding_linear_field_increases_distances_exactly_as_expm():
    d, n = 4, 50
    M = _expanding_matrix(d)
    field = LinearField(M)
    x0, y0 = torch.randn(n, d, dtype=DT), torch.randn(n, d, dtype=DT)
    t = torch.linspace(0, 1, 6, dtype=DT)
    with torch.no_grad():
        traj = flow(field, x0, t)
        dist = trajectory_distance(field, x0, y0, t)
    expm = torch.stack([torch.linalg.matrix_exp(tk * M) for tk in t])  # (T, d, d)
    assert torch.allclose(traj, torch.einsum("tij,nj->tni", expm, x0), rtol=1e-6, atol=1e-7)
    exact = torch.einsum("tij,nj->tni", expm, x0 - y0).norm(dim=-1)
    assert torch.allclose(dist, exact, rtol=1e-6, atol=1e-7)
    assert (dist[-1] > 1.05 * dist[0]).any()
    # along e_1 the distance grows at least like e^{t} minus the coupling: check a direct witness
    u = torch.zeros(1, d, dtype=DT)
    u[0, 0] = 1e-3
    with torch.no_grad():
        g = trajectory_distance(field, torch.zeros(1, d, dtype=DT), u, torch.tensor([0.0, 1e-2]))
    assert g[1, 0] > g[0, 0]


def test_non_monotone_field_increases_distances():
    """Gradient *ascent* on a convex potential, F = +grad f, is not dissipative."""
    d, n = 3, 100
    cpf = _field(d, 5, 1.0, "tanh")
    bad = FunctionField(cpf.gradient, time_dependent=False)
    x0 = torch.randn(n, d, dtype=DT)
    y0 = x0 + 0.1 * torch.randn(n, d, dtype=DT)
    with torch.no_grad():
        dist = trajectory_distance(bad, x0, y0, torch.linspace(0, 1, 5, dtype=DT))
        osl = one_sided_lipschitz(bad, x0, y0)
    assert (dist[-1] > 1.01 * dist[0]).any()
    assert (osl > 1e-3).any()


# --- conservative part ------------------------------------------------------------------------
def test_skew_field_preserves_norms_and_distances():
    d, n = 5, 40
    A = torch.randn(d, d, dtype=DT)
    field = SkewSymmetricField(A)
    S = 0.5 * (A - A.T)
    assert torch.equal(field.S, S)
    x0, y0 = torch.randn(n, d, dtype=DT), torch.randn(n, d, dtype=DT)
    t = torch.linspace(0, 3, 7, dtype=DT)
    with torch.no_grad():
        traj = flow(field, x0, t)
        dist = trajectory_distance(field, x0, y0, t)
    norms = traj.norm(dim=-1)
    assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-6)
    assert torch.allclose(dist, dist[0].expand_as(dist), rtol=1e-6)
    exact = torch.einsum("ij,nj->ni", torch.linalg.matrix_exp(3.0 * S), x0)
    assert torch.allclose(traj[-1], exact, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(traj[-1], x0, atol=1e-2)  # it does move


# --- one-sided Lipschitz constant -----------------------------------------------------------
def test_one_sided_lipschitz_signs():
    d, n = 4, 2000
    x, y = 3 * torch.randn(n, d, dtype=DT), 3 * torch.randn(n, d, dtype=DT)
    cpf = _field(d, 8, 2.0, "relu")
    skew = SkewSymmetricField(torch.randn(d, d, dtype=DT))
    M = _expanding_matrix(d)
    with torch.no_grad():
        assert (one_sided_lipschitz(cpf, x, y) <= 1e-12).all()
        assert one_sided_lipschitz(skew, x, y).abs().max() <= 1e-12
        assert (one_sided_lipschitz(cpf + skew, x, y) <= 1e-12).all()
        bad = one_sided_lipschitz(LinearField(M), x, y)
    # for a linear field it is the Rayleigh quotient of the symmetric part: below its top eigenvalue
    lam_max = torch.linalg.eigvalsh(0.5 * (M + M.T)).max()
    assert (bad > 0).any()
    assert bad.max() <= lam_max + 1e-12
    assert bad.max() > 0.5 * lam_max


# --- potentials -----------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_potential_is_convex_and_minus_its_gradient_is_the_field(activation):
    d, n = 5, 500
    field = _field(d, 7, 1.5, activation)
    a, b = 2 * torch.randn(n, d, dtype=DT), 2 * torch.randn(n, d, dtype=DT)
    fa, fb, fm = field.potential(a), field.potential(b), field.potential((a + b) / 2)
    assert fa.shape == (n,)
    assert (fm <= (fa + fb) / 2 + 1e-12).all()
    x = torch.randn(n, d, dtype=DT, requires_grad=True)
    (grad,) = torch.autograd.grad(field.potential(x).sum(), x)
    with torch.no_grad():
        assert torch.allclose(grad, -field(0.0, x), rtol=1e-12, atol=1e-12)
        assert torch.allclose(grad, field.gradient(x), rtol=1e-12, atol=1e-12)


def test_potential_closed_forms():
    z = torch.tensor([[-30.0, -1.0, 0.0, 0.5, 30.0]], dtype=DT).T  # (5, 1): one unit, d = 1
    w = torch.ones(1, 1, dtype=DT)
    relu = ConvexPotentialField(w, activation="relu").potential(z)
    tanh = ConvexPotentialField(w, activation="tanh").potential(z)
    sig = ConvexPotentialField(w, activation="sigmoid").potential(z)
    zz = z[:, 0]
    assert torch.allclose(relu, 0.5 * zz.clamp_min(0) ** 2)
    assert torch.allclose(tanh, torch.tensor([math.log(math.cosh(v)) for v in zz.tolist()], dtype=DT))
    assert torch.allclose(sig, torch.tensor([math.log1p(math.exp(v)) for v in zz.tolist()], dtype=DT))


def test_smoothness_bounds_the_gradient_and_is_attained_for_relu():
    d = 4
    for activation, sup in [("relu", 1.0), ("tanh", 1.0), ("sigmoid", 0.25)]:
        field = _field(d, 6, 2.0, activation)
        L = field.smoothness()
        assert L == pytest.approx(torch.linalg.svdvals(field.weight)[0].item() ** 2 * sup, rel=1e-12)
        a, b = torch.randn(1000, d, dtype=DT), torch.randn(1000, d, dtype=DT)
        ratio = (field.gradient(a) - field.gradient(b)).norm(dim=-1) / (a - b).norm(dim=-1)
        assert ratio.max() <= L * (1 + 1e-12)
    # ReLU with every unit active: grad f(x) = W^T (W x + b) is linear with norm exactly ||W||^2
    W = torch.randn(6, d, dtype=DT)
    field = ConvexPotentialField(W, torch.full((6,), 1e3, dtype=DT))
    v = torch.linalg.svd(W).Vh[:1]  # top right singular vector, (1, d)
    x = torch.randn(1, d, dtype=DT)
    ratio = (field.gradient(x + v) - field.gradient(x)).norm() / v.norm()
    assert ratio.item() == pytest.approx(field.smoothness(), rel=1e-10)


# --- Euler: a weight-shared ResNet ---------------------------------------------------------------
def test_euler_on_a_linear_field_is_a_matrix_power():
    d, n_steps = 3, 7
    M = torch.randn(d, d, dtype=DT)
    x0 = torch.randn(2, d, dtype=DT)
    traj = euler(LinearField(M), x0, t_end=0.7, n_steps=n_steps)
    assert traj.shape == (n_steps + 1, 2, d)
    P = torch.eye(d, dtype=DT) + 0.1 * M
    for k in range(n_steps + 1):
        assert torch.allclose(traj[k], x0 @ torch.linalg.matrix_power(P, k).T, rtol=1e-12, atol=1e-12)
    last = euler(LinearField(M), x0, t_end=0.7, n_steps=n_steps, return_trajectory=False)
    assert torch.equal(last, traj[-1])


def test_euler_converges_to_the_flow_at_first_order():
    d, n = 3, 20
    field = _field(d, 5, 1.0, "tanh") + SkewSymmetricField(torch.randn(d, d, dtype=DT))
    assert isinstance(field, SumField)

    def time_varying(t, x):  # a time-dependent part, so t_k = k h is exercised too
        return torch.sin(3 * t) * torch.ones_like(x)

    field = field + FunctionField(time_varying)
    assert len(field.fields) == 3  # sums are flattened
    x0 = torch.randn(n, d, dtype=DT)
    with torch.no_grad():
        ref = flow(field, x0, torch.tensor([0.0, 1.0], dtype=DT), rtol=1e-11, atol=1e-12)[-1]
        errors = [
            (euler(field, x0, 1.0, k, return_trajectory=False) - ref).norm().item()
            for k in (50, 100, 200, 400)
        ]
    ratios = [errors[i] / errors[i + 1] for i in range(3)]
    assert errors[-1] < 1e-2
    assert all(1.8 < r < 2.2 for r in ratios), (errors, ratios)


def test_flow_shapes_and_errors():
    field = _field(3, 4, 1.0)
    x0 = torch.randn(2, 5, 3, dtype=DT)
    with torch.no_grad():
        assert flow(field, x0, torch.linspace(0, 1, 4, dtype=DT)).shape == (4, 2, 5, 3)
        assert trajectory_distance(field, x0, x0 + 1, [0.0, 0.5]).shape == (2, 2, 5)
    with pytest.raises(ValueError, match="shape"):
        field(0.0, torch.randn(2, 4, dtype=DT))
    with pytest.raises(ValueError, match="1-D"):
        flow(field, x0, torch.tensor(1.0))
    with pytest.raises(ValueError, match="activation"):
        ConvexPotentialField(torch.randn(4, 3), activation="softsign")
    with pytest.raises(ValueError, match="bias"):
        ConvexPotentialField(torch.randn(4, 3), torch.randn(3))
    with pytest.raises(ValueError, match="square"):
        SkewSymmetricField(torch.randn(3, 4))
    with pytest.raises(ValueError, match="shaped like x"):
        FunctionField(lambda x: x.sum(-1), time_dependent=False)(0.0, torch.randn(2, 3))
    with pytest.raises(TypeError):
        SumField(field, lambda t, x: x)


# --- the Euler step x - h grad f(x) around h = 2/L -----------------------------------------------
@pytest.mark.parametrize("scale", [0.5, 3.0, 20.0])
def test_gradient_step_is_nonexpansive_iff_h_at_most_2_over_L(scale):
    d, m = 4, 8
    field = _field(d, m, scale, "relu")
    L = field.smoothness()
    x = 3 * torch.randn(64, d, dtype=DT) / scale  # pre-activations W x of order 6, beyond b
    for c in (0.5, 1.0, 2.0):
        ratio = euler_step_lipschitz_lower_bound(field, c / L, x, n_pairs=500, search_steps=60, seed=1)
        assert ratio <= 1 + 1e-9, (c, ratio)
    # independent check at h = 2/L: random pairs evaluated directly
    step = euler_step(field, 2 / L)
    a, b = 2 * torch.randn(5000, d, dtype=DT), 2 * torch.randn(5000, d, dtype=DT)
    assert ((step(a) - step(b)).norm(dim=-1) <= (a - b).norm(dim=-1) * (1 + 1e-12)).all()
    # past the threshold the worst-pair search finds an expanded pair
    ratio = euler_step_lipschitz_lower_bound(field, 2.5 / L, x, n_pairs=500, search_steps=60, seed=1)
    assert ratio > 1.05
