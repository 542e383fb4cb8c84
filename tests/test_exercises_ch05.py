"""The self-checks of chapter 5's exercises: right answers pass, typical wrong ones fail with a hint
that does not give the answer away. References are independent of the checkers (closed forms, explicit
float64 power iterations, the reflection formula)."""

import re

import torch
import torch.nn as nn

from cpl_mini import ConvexPotentialLinear
from cpl_mini.exercises import available, grade
from cpl_mini.layers import OFFICIAL_EPSILON

DT = torch.float64


def _mentions(hint, value):
    """Whether ``hint`` contains the number ``value`` as a number of its own (not inside another one)."""
    return re.search(rf"(?<![\d.]){re.escape(str(value))}(?![\d])", hint) is not None


def test_chapter_5_has_three_self_checks_or_more():
    assert len(available(5)) >= 3


def _cpl_tanh(x, W, b):
    return x - 2 / torch.linalg.svdvals(W)[0] ** 2 * torch.tanh(x @ W.T + b) @ W


def test_5_1_the_tanh_layer():
    assert grade("5.1", _cpl_tanh).ok
    no_step = grade("5.1", lambda x, W, b: x - torch.tanh(x @ W.T + b) @ W)
    relu = grade("5.1", lambda x, W, b: x - 2 / torch.linalg.svdvals(W)[0] ** 2 * torch.relu(x @ W.T + b) @ W)
    assert not no_step.ok and not relu.ok
    for fb in (no_step, relu):
        assert "tanh(" not in fb.hint and fb.hint
    assert not grade("5.1", lambda x, W, b: None).ok
    assert not grade("5.1", 1.0).ok


def test_5_2_lipschitz_constant_of_a_scaled_step():
    # by hand: eigenvalues of the Jacobian in [1 - 2s, 1], with 1 attained where every ReLU is off
    assert grade("5.2", lambda s: max(1.0, 2 * s - 1)).ok
    absolute, linear = grade("5.2", lambda s: abs(1 - 2 * s)), grade("5.2", lambda s: 2 * s - 1)
    assert not absolute.ok and not linear.ok
    for fb in (absolute, linear):
        assert "max(1" not in fb.hint and "2s - 1" not in fb.hint and "2 * s" not in fb.hint
    assert not grade("5.2", lambda s: 1.0).ok  # right only up to s = 1


def test_5_3_the_other_point_with_the_same_image():
    # by hand: the reflection of x through w.x + b = 0 is x - 2 (w.x + b) / ||w||^2 w
    w, b, x = torch.tensor([3.0, 4.0], dtype=DT), -5.0, torch.tensor([3.0, 4.0], dtype=DT)
    reflected = x - 2 * (w @ x + b) / (w @ w) * w
    assert torch.allclose(reflected, torch.tensor([-1.8, -2.4], dtype=DT))
    assert grade("5.3", reflected).ok
    assert grade("5.3", reflected.tolist()).ok
    itself, minus_x, origin = grade("5.3", x), grade("5.3", -x), grade("5.3", torch.zeros(2))
    assert not itself.ok and not minus_x.ok and not origin.ok
    for fb in (itself, minus_x, origin):
        assert "1.8" not in fb.hint and "2.4" not in fb.hint
    assert not grade("5.3", None).ok
    assert not grade("5.3", torch.zeros(3)).ok


def _small_net():
    torch.manual_seed(55)
    layers = [ConvexPotentialLinear(6, 12, eval_norm="sound", dtype=DT) for _ in range(3)]
    return nn.Sequential(*layers).eval()


def _bound_by_hand(net, k):
    # independent of the package's bound: float64 power iteration from each layer's vector u, the
    # step h = 2 / (sigma_hat^2 + eps) (power mode, official epsilon), exact norms by SVD
    total = 1.0
    for layer in net:
        w = layer.weight.detach()
        v = layer.u.detach().reshape(-1).to(DT)
        v = v / v.norm()
        for _ in range(k):
            v = w.T @ (w @ v)
            v = v / v.norm()
        sigma_hat, sigma = (w @ v).norm().item(), torch.linalg.svdvals(w)[0].item()
        h = 2 / (sigma_hat**2 + OFFICIAL_EPSILON)
        total *= max(1.0, h * sigma**2 - 1)
    return total


def test_5_5_iterations_for_a_nearly_sound_power_network():
    net = _small_net()
    reference = next(k for k in range(1, 2000) if _bound_by_hand(net, k) <= 1 + 1e-4)
    assert reference > 3  # the exercise is not trivial for this network
    assert grade("5.5", reference, net=net).ok
    too_few, too_many = grade("5.5", reference - 1, net=net), grade("5.5", 2 * reference, net=net)
    assert not too_few.ok and not too_many.ok
    for fb in (too_few, too_many):
        assert not _mentions(fb.hint, reference)
    assert not grade("5.5", 0, net=net).ok and not grade("5.5", 1.5, net=net).ok
    missing = grade("5.5", reference)  # without the network the check cannot run, and says so
    assert not missing.ok and "net=net" in missing.hint
    # the check leaves the student's network as it was
    assert all(layer.eval_norm == "sound" for layer in net)
