"""Checks of the empirical Lipschitz lower bounds in cpl_mini.lipschitz, in float64.

References: matrices built with known singular values, torch.linalg.svdvals, and the product of the
layers' exact spectral norms (an upper bound for networks with 1-Lipschitz activations).
"""

import copy

import pytest
import torch
import torch.nn as nn

from cpl_mini.layers import ConvexPotentialConv2d, ConvexPotentialLinear
from cpl_mini.lipschitz import (
    exact_jacobian_norm,
    jacobian_spectral_norm,
    pair_ratio,
    random_pairs_lower_bound,
    worst_pair_search,
)

DT = torch.float64


def _matrix_with_singular_values(s, m, d):
    U, _ = torch.linalg.qr(torch.randn(m, m, dtype=DT))
    V, _ = torch.linalg.qr(torch.randn(d, d, dtype=DT))
    S = torch.zeros(m, d, dtype=DT)
    S[range(len(s)), range(len(s))] = torch.tensor(s, dtype=DT)
    return U @ S @ V.T


def _linear(A):
    lin = nn.Linear(A.shape[1], A.shape[0]).to(DT)
    with torch.no_grad():
        lin.weight.copy_(A)
        lin.bias.normal_()
    return lin


def _mlp(d_in=6, width=16, d_out=4, act=nn.Tanh):
    return nn.Sequential(
        nn.Linear(d_in, width), act(), nn.Linear(width, width), act(), nn.Linear(width, d_out)
    ).to(DT)


def _product_of_norms(model):
    return float(
        torch.prod(
            torch.stack(
                [
                    torch.linalg.svdvals(m.weight.detach())[0]
                    for m in model.modules()
                    if isinstance(m, nn.Linear)
                ]
            )
        )
    )


@pytest.mark.parametrize("known", [True, False])
def test_all_estimators_recover_the_norm_of_a_linear_map(known):
    m, d = 7, 5
    if known:
        A = _matrix_with_singular_values([3.0, 1.5, 1.0, 0.5, 0.2], m, d)
    else:
        A = torch.randn(m, d, dtype=DT)
    norm = torch.linalg.svdvals(A)[0].item()
    if known:
        assert norm == pytest.approx(3.0, rel=1e-12)
    model = _linear(A).eval()
    x = torch.randn(32, d, dtype=DT)

    rp = random_pairs_lower_bound(model, x, n_pairs=1000, scale=0.1)
    jac = jacobian_spectral_norm(model, x, n_iter=50)
    exact = exact_jacobian_norm(model, x[:3])
    ratio, a, b = worst_pair_search(model, x, steps=200, lr=0.01)

    assert rp <= norm + 1e-9 and rp >= 0.8 * norm
    assert jac.shape == (32,) and (jac <= norm + 1e-9).all()
    assert torch.allclose(jac, torch.full_like(jac, norm), rtol=1e-8)
    assert exact.dtype == DT and torch.allclose(exact, torch.full_like(exact, norm), rtol=1e-12)
    assert ratio <= norm + 1e-9 and ratio >= 0.99 * norm
    assert a.shape == b.shape == (1, d)
    # the returned pair really attains the returned ratio
    assert pair_ratio(model, a, b).item() == pytest.approx(ratio, rel=1e-12)


def test_power_iteration_matches_the_exact_jacobian_norm_of_an_mlp():
    model = _mlp().eval()
    x = 2 * torch.randn(20, 6, dtype=DT)
    est = jacobian_spectral_norm(model, x, n_iter=300)
    ref = exact_jacobian_norm(model, x)
    assert (est <= ref * (1 + 1e-12)).all()  # a lower bound: ||J v|| <= ||J|| for unit v
    assert torch.allclose(est, ref, rtol=1e-6)
    # independent check of the reference on one point: the autograd Jacobian of the composition
    W1, W2, W3 = (mod.weight for mod in model if isinstance(mod, nn.Linear))
    b1, b2 = model[0].bias, model[2].bias
    x0 = x[0]
    h1 = W1 @ x0 + b1
    h2 = W2 @ torch.tanh(h1) + b2
    J = W3 @ torch.diag(1 - torch.tanh(h2) ** 2) @ W2 @ torch.diag(1 - torch.tanh(h1) ** 2) @ W1
    assert ref[0].item() == pytest.approx(torch.linalg.svdvals(J.detach())[0].item(), rel=1e-12)


def test_per_example_norms_of_a_convolutional_model():
    """Image-shaped inputs: norms over all non-batch dimensions, per example."""
    model = (
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
        .to(DT)
        .eval()
    )
    x = torch.randn(6, 2, 4, 4, dtype=DT)
    est = jacobian_spectral_norm(model, x, n_iter=300)
    ref = exact_jacobian_norm(model, x)
    assert est.shape == ref.shape == (6,)
    assert torch.allclose(est, ref, rtol=1e-6)
    assert (est <= ref * (1 + 1e-12)).all()
    # distinct points give distinct local constants: the batch was not mixed up
    assert ref.unique().numel() == 6
    # a single example's value does not depend on the rest of the batch
    assert jacobian_spectral_norm(model, x[2:3], n_iter=300).item() == pytest.approx(ref[2].item(), rel=1e-6)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_lower_bounds_stay_below_the_product_of_norms(act):
    model = _mlp(act=act).eval()
    upper = _product_of_norms(model)
    x = torch.randn(50, 6, dtype=DT)
    rp = random_pairs_lower_bound(model, x, n_pairs=2000, scale=0.5)
    ratio, _, _ = worst_pair_search(model, x, steps=100)
    jac = jacobian_spectral_norm(model, x, n_iter=50)
    assert 0 < rp <= upper
    assert 0 < ratio <= upper
    assert (jac <= upper).all()
    # and the local estimates dominate the cruder random-pairs search near the same points
    assert jac.max().item() >= 0.9 * rp


def test_worst_pair_search_improves_on_its_start():
    model = _mlp(act=nn.ReLU).eval()
    x = torch.randn(16, 6, dtype=DT)
    y = x + 0.05 * torch.randn(16, 6, dtype=DT)
    with torch.no_grad():
        start = ((model(x) - model(y)).norm(dim=1) / (x - y).norm(dim=1)).max().item()
    ratio, a, b = worst_pair_search(model, x, y, steps=200, lr=0.01)
    assert ratio > 1.05 * start
    with torch.no_grad():
        attained = ((model(a) - model(b)).norm() / (a - b).norm()).item()
    assert attained == pytest.approx(ratio, rel=1e-12)
    assert ratio <= _product_of_norms(model)
    # zero steps: the best starting pair
    ratio0, _, _ = worst_pair_search(model, x, y, steps=0)
    assert ratio0 == pytest.approx(start, rel=1e-12)
    with pytest.raises(ValueError, match="y_i != x_i"):
        worst_pair_search(model, x, x.clone())


@pytest.mark.parametrize("training", [False, True])
def test_no_side_effects_on_the_model_or_the_global_rng(training):
    model = _mlp().train(training)
    for p in model.parameters():
        assert p.grad is None
    flags = [p.requires_grad for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 6, dtype=DT)
    rng = torch.get_rng_state()
    random_pairs_lower_bound(model, x, n_pairs=100)
    jacobian_spectral_norm(model, x, n_iter=5)
    exact_jacobian_norm(model, x[:2])
    worst_pair_search(model, x, steps=5)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training is training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def _training_steps(model):
    """h = 2 / sigma^2 of each CPL layer's next training forward, restated: sigma = ||W v||,
    v = W^T W u / ||W^T W u|| from the stored u (float64)."""
    steps = []
    for layer in model:
        w = layer.weight.detach()
        v = w.T @ (w @ layer.u.flatten())
        steps.append(2 / (w @ (v / v.norm())).norm() ** 2)
    return steps


def test_jacobian_norm_of_a_cpl_model_in_training_mode():
    """The Jacobian of the training-mode function (each layer one power step from its stored vector),
    against the explicit product of the layers' Jacobians I - h W^T D W; the buffers are left unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(ConvexPotentialLinear(6, 8), ConvexPotentialLinear(6, 5)).to(DT).train()
    x = torch.randn(5, 6, dtype=DT)
    buffers = [b.clone() for b in model.buffers()]
    steps = _training_steps(model)
    ref = []
    for z in x:
        jac = torch.eye(6, dtype=DT)
        for layer, h in zip(model, steps):
            w, b = layer.weight.detach(), layer.bias.detach()
            pre = w @ z + b
            jac = (torch.eye(6, dtype=DT) - h * w.T @ torch.diag((pre > 0).to(DT)) @ w) @ jac
            z = z - h * w.T @ torch.relu(pre)
        ref.append(torch.linalg.svdvals(jac)[0])
    ref = torch.stack(ref)
    est = jacobian_spectral_norm(model, x, n_iter=300)
    assert (est <= ref * (1 + 1e-12)).all()
    assert torch.allclose(est, ref, rtol=1e-6)
    assert torch.allclose(exact_jacobian_norm(model, x), ref, rtol=1e-12)
    assert ref.max() > 1.01  # the training-mode step uses a lower estimate of the norm
    random_pairs_lower_bound(model, x, n_pairs=50)
    worst_pair_search(model, x, steps=3)
    assert model.training
    assert all(torch.equal(b, b0) for b, b0 in zip(model.buffers(), buffers))  # bit-identical


@pytest.mark.parametrize("eval_norm", ["power", "sound"])
def test_jacobian_norm_of_an_eval_cpl_model_with_a_cold_cache(eval_norm):
    """A fresh eval-mode model (no norm cached yet): the Jacobian norm of the function its first
    evaluation forward computes, against float64 autograd Jacobians of an untouched copy and svdvals."""
    torch.manual_seed(0)
    kw = {"eval_norm": eval_norm, "step_scale": 1.9}  # not 1-Lipschitz: local constants above 1
    model = nn.Sequential(
        ConvexPotentialConv2d(2, 3, input_size=(4, 4), **kw),
        nn.Flatten(),
        ConvexPotentialLinear(32, 16, **kw),
    )
    model = model.to(DT).eval()
    reference = copy.deepcopy(model)
    buffers = [b.clone() for b in model.buffers()]
    x = torch.randn(4, 2, 4, 4, dtype=DT)
    est = jacobian_spectral_norm(model, x, n_iter=300)
    ref = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda z: reference(z.unsqueeze(0)).flatten(), xi)
        ref.append(torch.linalg.svdvals(jac.reshape(jac.shape[0], -1))[0])
    ref = torch.stack(ref)
    assert (est <= ref * (1 + 1e-12)).all()
    assert torch.allclose(est, ref, rtol=1e-6)
    assert ref.min() > 1.01 and ref.unique().numel() == 4
    assert all(torch.equal(b, b0) for b, b0 in zip(model.buffers(), buffers))


def test_float32_model_and_float64_inputs():
    model = _mlp().float().eval()
    x = torch.randn(8, 6, dtype=DT)  # moved to the model's dtype
    est = jacobian_spectral_norm(model, x, n_iter=100)
    assert est.dtype == torch.float32
    ref = exact_jacobian_norm(model, x)
    assert ref.dtype == DT
    assert torch.allclose(est.double(), ref, rtol=1e-4)
    assert random_pairs_lower_bound(model, x) > 0
    ratio, a, _ = worst_pair_search(model, x, steps=10)
    assert ratio > 0 and a.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda():
    A = _matrix_with_singular_values([2.0, 1.0, 0.5], 4, 3)
    model = _linear(A).cuda().eval()
    x = torch.randn(16, 3, dtype=DT)  # on the CPU: moved to the model's device
    assert jacobian_spectral_norm(model, x, n_iter=50).device.type == "cuda"
    assert exact_jacobian_norm(model, x[:2]).cpu() == pytest.approx([2.0, 2.0], rel=1e-12)
    assert random_pairs_lower_bound(model, x) <= 2.0 + 1e-9
    ratio, a, _ = worst_pair_search(model, x, steps=50)
    assert 1.9 <= ratio <= 2.0 + 1e-9 and a.device.type == "cuda"
