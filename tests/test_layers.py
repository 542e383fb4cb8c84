"""cpl_mini.layers: the eval-mode CPL layers are provably 1-Lipschitz; checked with exact Jacobians (float64)."""
import copy

import pytest
import torch
import torch.nn as nn

from cpl_mini.layers import (ChannelPad, ConvexPotentialConv2d, ConvexPotentialLinear, FirstCoordinates,
                             LipschitzAvgPool2d, RowNormalizedLinear, lipschitz_upper_bound)


def jacobian_norm(layer, x):
    """Largest singular value of the exact Jacobian of ``layer`` at the single input ``x`` (float64)."""
    jac = torch.autograd.functional.jacobian(layer, x)
    return torch.linalg.svdvals(jac.reshape(x.numel(), x.numel()))[0].item()


def sharp_point(layer, x):
    """Make every ReLU active at x (a huge bias): there the Jacobian is I - h W^T W, the worst case."""
    with torch.no_grad():
        layer.bias.fill_(1e3)
    return x


def exact_operator_norm(layer, x):
    """||W||_2 of the layer's inner linear map at the input shape of x, from its explicit matrix."""
    m = torch.autograd.functional.jacobian(lambda v: layer._op(v, layer.weight), x)
    return torch.linalg.svdvals(m.reshape(-1, x.numel()))[0].item()


DENSE = [(6, 6), (8, 3), (5, 12)]
CONV = [(3, 3, 3, 5), (4, 2, 3, 6), (2, 5, 5, 6), (3, 3, 1, 4)]  # channels, inner, kernel, size


def make_dense(features, inner, **kw):
    return ConvexPotentialLinear(features, inner, **kw).double().eval()


def make_conv(c, inner, k, n, **kw):
    return ConvexPotentialConv2d(c, inner, kernel_size=k, input_size=(n, n), **kw).double().eval()


def _cases():
    for f, m in DENSE:
        yield f"dense{f}x{m}", (lambda f=f, m=m, **kw: make_dense(f, m, **kw)), (lambda f=f: torch.randn(f, dtype=torch.float64))
    for c, m, k, n in CONV:
        yield (f"conv{c}-{m}-k{k}-{n}", (lambda c=c, m=m, k=k, n=n, **kw: make_conv(c, m, k, n, **kw)),
               (lambda c=c, n=n: torch.randn(1, c, n, n, dtype=torch.float64)))


CASES = list(_cases())
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name,make,sample", CASES, ids=IDS)
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_eval_layer_jacobian_norm_at_most_one(name, make, sample, scale):
    layer = make()
    with torch.no_grad():
        layer.weight.mul_(scale)
    for _ in range(3):  # random points
        assert jacobian_norm(layer, sample()) <= 1 + 1e-6
    x = sharp_point(layer, sample())
    norm = jacobian_norm(layer, x)
    assert norm <= 1 + 1e-6
    # I - h W^T W has eigenvalue 1 - h ||W||^2: -1 for the exact dense norm; for a convolution the sound
    # norm is an upper bound a little above the exact one, so the layer is a little contractive
    # there the Jacobian is exactly I - h M^T M, with M the explicit matrix of W
    m = torch.autograd.functional.jacobian(lambda v: layer._op(v, layer.weight), x).reshape(-1, x.numel())
    expected = torch.eye(x.numel(), dtype=torch.float64) - layer.step_size().item() * m.T @ m
    jac = torch.autograd.functional.jacobian(layer, x).reshape(x.numel(), x.numel())
    assert torch.allclose(jac, expected, atol=1e-9)
    if name.startswith("dense"):  # with the exact norm, the eigenvalue 1 - h ||W||^2 is -1: the bound is tight
        assert norm >= 1 - 1e-6


@pytest.mark.parametrize("name,make,sample", CASES, ids=IDS)
def test_eval_layer_never_expands_pairs(name, make, sample):
    layer = make()
    with torch.no_grad():
        for _ in range(20):
            x, y = sample(), sample() * 0.1
            y = x + y
            assert (layer(x) - layer(y)).norm() <= (x - y).norm() * (1 + 1e-9)
        # sharp pairs: all ReLUs active, difference along the top right-singular vector of W
        sharp_point(layer, None)
        x = sample()
        m = torch.autograd.functional.jacobian(lambda a: layer._op(a, layer.weight), x).reshape(-1, x.numel())
        v = torch.linalg.svd(m).Vh[0].reshape(x.shape)  # top right-singular vector of W
        y = x + 0.1 * v
        ratio = ((layer(x) - layer(y)).norm() / (x - y).norm()).item()
        # there the layer is affine with slope I - h W^T W, and v is W's top singular vector
        expected = abs(1 - layer.step_size().item() * exact_operator_norm(layer, x) ** 2)
        assert ratio == pytest.approx(expected, abs=1e-7)
        assert ratio <= 1 + 1e-9


@pytest.mark.parametrize("name,make,sample", CASES, ids=IDS)
def test_check_fails_when_step_is_one_percent_too_large(name, make, sample):
    layer = make()
    x = sample()
    exact = exact_operator_norm(layer, x)
    # h = 1.01 * 2 / ||W||^2 with the exact norm of W
    layer.step_scale = 1.01 * (layer.eval_spectral_norm().item() / exact) ** 2
    sharp_point(layer, x)
    assert jacobian_norm(layer, x) > 1.005
    assert lipschitz_upper_bound(layer) > 1.005


def test_power_iteration_eval_norm_is_not_sound():
    """A layer normalised by a 1-iteration estimate expands some pair: why certificates need upper bounds."""
    torch.manual_seed(3)
    layer = make_dense(10, 10, eval_norm="power", n_eval_iter=1)
    x = sharp_point(layer, torch.randn(10, dtype=torch.float64))
    assert jacobian_norm(layer, x) > 1.01
    assert lipschitz_upper_bound(layer) > 1.01
    sound = make_dense(10, 10)
    sound.load_state_dict(layer.state_dict())
    assert jacobian_norm(sound, x) <= 1 + 1e-6


def test_training_mode_one_power_step_and_gradient_through_h():
    layer = ConvexPotentialConv2d(4, 3, input_size=(8, 8)).train()
    u0 = layer.u.clone()
    x = torch.randn(2, 4, 8, 8)
    layer(x).square().sum().backward()
    assert not torch.equal(u0, layer.u)
    assert layer.weight.grad is not None
    sigma = layer.spectral_norm()
    assert sigma.requires_grad  # the estimate is differentiable, as in the paper
    # the training estimate never exceeds the sound bound
    assert sigma.item() <= layer.sound_spectral_norm().item() * (1 + 1e-5)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_eval_norm_cache_follows_the_weights(kind):
    layer = (ConvexPotentialLinear(6, 4) if kind == "dense" else ConvexPotentialConv2d(3, 2, input_size=(6, 6)))
    x = torch.randn(5, 6) if kind == "dense" else torch.randn(5, 3, 6, 6)
    layer.eval()
    n0 = layer.eval_spectral_norm().item()
    assert layer.eval_spectral_norm().item() == n0  # cached
    # an optimizer step changes W: the cached norm must follow
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.train()
    layer(x).sum().backward()
    opt.step()
    layer.eval()
    n1 = layer.eval_spectral_norm().item()
    expected = layer.sound_spectral_norm().item()
    assert n1 != n0 and n1 == pytest.approx(expected, rel=1e-12)
    # load_state_dict from another layer
    other = copy.deepcopy(layer)
    with torch.no_grad():
        other.weight.mul_(3.0)
    other_norm = other.eval_spectral_norm().item()
    layer.load_state_dict(other.state_dict())
    assert layer.eval_spectral_norm().item() == pytest.approx(other_norm, rel=1e-12)
    # in-place edit through the parameter
    with torch.no_grad():
        layer.weight.mul_(0.5)
    assert layer.eval_spectral_norm().item() == pytest.approx(other_norm * 0.5, rel=1e-9)


def test_bad_inputs_give_clear_errors():
    conv = ConvexPotentialConv2d(4, 2, input_size=(8, 8))
    with pytest.raises(ValueError, match="4 channels"):
        conv(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        conv(torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match="input_size"):
        conv(torch.randn(1, 4, 16, 16))
    dense = ConvexPotentialLinear(10, 5)
    with pytest.raises(ValueError, match=r"\(\.\.\., 10\)"):
        dense(torch.randn(3, 9))
    with pytest.raises(ValueError, match="odd"):
        ConvexPotentialConv2d(4, 2, kernel_size=4)
    with pytest.raises(ValueError, match="eval_norm"):
        ConvexPotentialLinear(4, eval_norm="svd")


def test_autocast_keeps_norm_in_float32():
    layer = ConvexPotentialConv2d(8, 5, input_size=(8, 8)).train()
    x = torch.randn(4, 8, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(x)
        sigma = layer.spectral_norm()
    assert sigma.dtype == torch.float32
    assert z.dtype == torch.float32 and torch.isfinite(z).all()


def test_pieces_are_one_lipschitz_and_bound_of_a_network():
    pad = ChannelPad(5)
    x = torch.randn(2, 3, 4, 4)
    out = pad(x)
    assert out.shape == (2, 5, 4, 4) and torch.equal(out[:, :3], x) and out[:, 3:].abs().sum() == 0
    pool = LipschitzAvgPool2d(4)
    m = torch.autograd.functional.jacobian(pool, torch.zeros(1, 2, 8, 8, dtype=torch.float64)).reshape(8, 128)
    assert torch.linalg.svdvals(m)[0].item() == pytest.approx(1.0, abs=1e-12)
    head = RowNormalizedLinear(7, 3)
    assert torch.allclose(head.normalized_weight().norm(dim=1), torch.ones(3))
    net = nn.Sequential(ChannelPad(4), ConvexPotentialConv2d(4, 2, input_size=(8, 8)), LipschitzAvgPool2d(4),
                        nn.Flatten(), ConvexPotentialLinear(16, 8), FirstCoordinates(3)).eval()
    assert lipschitz_upper_bound(net) == pytest.approx(1.0, abs=1e-6)
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 3)
    with pytest.raises(TypeError, match="Conv2d"):
        lipschitz_upper_bound(nn.Sequential(nn.Conv2d(3, 3, 3)))
