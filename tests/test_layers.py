"""cpl_mini.layers: the eval-mode CPL layers are provably 1-Lipschitz; checked with exact Jacobians on
every device and in float32 and float64, against exact (fractions) arithmetic where rounding matters."""

import copy
import doctest
import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cpl_mini.layers
from cpl_mini.bounds import lipschitz_upper_bound
from cpl_mini.layers import (
    ChannelPad,
    ConvexPotentialConv2d,
    ConvexPotentialLinear,
    FirstCoordinates,
    LipschitzAvgPool2d,
    RowNormalizedLinear,
    convex_potential_conv2d,
    convex_potential_linear,
)
from cpl_mini.precision import cast_down
from cpl_mini.spectral import power_iteration

pytestmark = pytest.mark.usefixtures("ieee")  # on GPUs too, the checks are of IEEE float32 arithmetic


def jacobian(layer, x):
    """The exact Jacobian of ``layer`` at the single input ``x`` as a matrix (x.numel(), x.numel())."""
    return torch.autograd.functional.jacobian(layer, x).reshape(x.numel(), x.numel())


def jacobian_norm(layer, x):
    """Largest singular value of the exact Jacobian of ``layer`` at ``x``, computed in float64."""
    return torch.linalg.svdvals(jacobian(layer, x).double())[0].item()


def sharp_point(layer, x):
    """Make every ReLU active at x (a huge bias): there the Jacobian is I - h W^T W, the worst case."""
    with torch.no_grad():
        layer.bias.fill_(1e3)
    return x


def operator_matrix(layer, x):
    """The explicit matrix of the layer's inner linear map W at the input shape of x (float64), built from
    the weight alone: W itself, or the zero-padded convolution applied to the identity basis."""
    w = layer.weight.detach().double()
    if w.dim() == 2:
        return w
    n = x.numel()
    eye = torch.eye(n, dtype=torch.float64, device=w.device).reshape(n, *x.shape[1:])
    return F.conv2d(eye, w, padding=w.shape[-1] // 2).reshape(n, -1).T


def pre_activation(layer, x):
    """W x + b from the weight and bias alone."""
    w, b = layer.weight, layer.bias
    return F.linear(x, w, b) if w.dim() == 2 else F.conv2d(x, w, b, padding=w.shape[-1] // 2)


def exact_operator_norm(layer, x):
    return torch.linalg.svdvals(operator_matrix(layer, x).cpu())[0].item()


DENSE = [(6, 6), (8, 3), (5, 12)]
CONV = [(3, 3, 3, 5), (4, 2, 3, 6), (2, 5, 5, 6), (3, 3, 1, 4)]  # channels, inner, kernel, size


def _cases():
    for f, m in DENSE:
        yield (f"dense{f}x{m}", lambda f=f, m=m, **kw: ConvexPotentialLinear(f, m, **kw), lambda f=f: (f,))
    for c, m, k, n in CONV:
        yield (
            f"conv{c}-{m}-k{k}-{n}",
            lambda c=c, m=m, k=k, n=n, **kw: ConvexPotentialConv2d(
                c, m, kernel_size=k, input_size=(n, n), **kw
            ),
            lambda c=c, n=n: (1, c, n, n),
        )


CASES = list(_cases())
IDS = [c[0] for c in CASES]


def build(make, device, dtype, **kw):
    return make(**kw).to(device=device, dtype=dtype).eval()


@pytest.mark.parametrize("name,make,shape", CASES, ids=IDS)
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_eval_layer_jacobian_norm_at_most_one(name, make, shape, scale, device, dtype, tol):
    layer = build(make, device, dtype)
    with torch.no_grad():
        layer.weight.mul_(scale)
    sample = lambda: torch.randn(shape(), device=device, dtype=dtype)  # noqa: E731
    for _ in range(3):  # random points
        assert jacobian_norm(layer, sample()) <= 1 + tol
    x = sharp_point(layer, sample())
    norm = jacobian_norm(layer, x)
    assert norm <= 1 + tol
    # there the Jacobian is exactly I - h M^T M, with M the explicit matrix of W
    m = operator_matrix(layer, x)
    h = layer.step_size().double().item()
    expected = torch.eye(x.numel(), dtype=torch.float64, device=device) - h * m.T @ m
    assert torch.allclose(jacobian(layer, x).double(), expected, atol=10 * tol)
    if name.startswith("dense"):  # eigenvalue 1 - h ||W||^2 = -1 + 4e-9 (the norm's margin): tight
        assert norm >= 1 - max(tol, 1e-8)


@pytest.mark.parametrize("name,make,shape", CASES, ids=IDS)
def test_eval_layer_never_expands_pairs(name, make, shape, device, dtype, tol):
    layer = build(make, device, dtype)
    sample = lambda: torch.randn(shape(), device=device, dtype=dtype)  # noqa: E731
    with torch.no_grad():
        for _ in range(20):
            x = sample()
            y = x + 0.1 * sample()
            assert (layer(x) - layer(y)).norm() <= (x - y).norm() * (1 + tol)
        # sharp pairs: all ReLUs active (a bias large enough, small enough not to drown float32 differences),
        # difference along the top right-singular vector of W
        layer.bias.fill_(50.0)
        x = 0.1 * sample()
    v = torch.linalg.svd(operator_matrix(layer, x).cpu()).Vh[0].reshape(x.shape).to(device, dtype)
    with torch.no_grad():
        y = x + 0.1 * v
        assert bool((pre_activation(layer, x) > 0).all() and (pre_activation(layer, y) > 0).all())
        ratio = ((layer(x) - layer(y)).norm() / (x - y).norm()).item()
    expected = abs(1 - layer.step_size().double().item() * exact_operator_norm(layer, x) ** 2)
    assert ratio == pytest.approx(expected, abs=100 * tol)
    assert ratio <= 1 + 100 * tol


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_step_times_exact_norm_squared_is_at_most_two(kind, dt):
    """The eval-mode layer is 1-Lipschitz iff h ||W||^2 <= 2, for the h and W it holds (exact arithmetic).
    With h = 2 / sigma_up^2 rounded to nearest in float32 it exceeds 2 / sigma_up^2 by up to 6e-8 for about
    half the layers, more than the 2e-9 that sigma_up's margin leaves: h must be rounded down."""
    for seed in range(12):
        torch.manual_seed(seed)
        layer = (
            (
                ConvexPotentialLinear(7, 5)
                if kind == "dense"
                else ConvexPotentialConv2d(3, 2, input_size=(5, 5))
            )
            .to(dt)
            .eval()
        )
        x = torch.zeros((1, 7) if kind == "dense" else (1, 3, 5, 5), dtype=torch.float64)
        exact = Fraction(exact_operator_norm(layer, x))  # the stored weight, exactly in float64
        h = layer.step_size()  # the step the forward uses (float32 for float32 and lower weights)
        assert Fraction(h.item()) * exact**2 <= 2 * (1 - Fraction(1, 10**9)), seed
        assert h.item() <= layer.eval_step()  # every rounding of h goes down
        assert layer.lipschitz_bound() == 1.0  # computed exactly: 1, not 1 + a rounding error
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an autocast forward rounds h down to bf16
        z = layer(torch.randn(x.shape).to(dt))
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("name,make,shape", CASES, ids=IDS)
def test_check_fails_when_step_is_one_percent_too_large(name, make, shape):
    layer = build(make, "cpu", torch.float64)
    x = torch.randn(shape(), dtype=torch.float64)
    exact = exact_operator_norm(layer, x)
    # h = 1.01 * 2 / ||W||^2 with the exact norm of W
    layer.step_scale = 1.01 * (layer.eval_spectral_norm().item() / exact) ** 2
    sharp_point(layer, x)
    assert jacobian_norm(layer, x) > 1.005
    assert lipschitz_upper_bound(layer) > 1.005


def test_power_iteration_eval_norm_is_not_sound():
    """A layer normalised by a 1-iteration estimate expands some pair: why certificates need upper bounds."""
    torch.manual_seed(3)
    layer = ConvexPotentialLinear(10, 10, eval_norm="power", n_eval_iter=1).double().eval()
    x = sharp_point(layer, torch.randn(10, dtype=torch.float64))
    assert jacobian_norm(layer, x) > 1.01
    assert lipschitz_upper_bound(layer) > 1.01
    sound = ConvexPotentialLinear(10, 10).double().eval()
    sound.load_state_dict(layer.state_dict())
    assert jacobian_norm(sound, x) <= 1 + 1e-9


# --------------------------------------------------------------------- the official evaluation (power)
def official_evaluation(op, adj, u, n_iter):
    """The official code's evaluation, restated: n_iter iterations v = Wu/(|Wu| + 1e-12),
    u = W^T v/(|W^T v| + 1e-12) from the persistent u, the estimate <W u, v>, h = 2 / (sigma^2 + 1e-4)."""
    for _ in range(n_iter):
        v = op(u)
        v = v / (torch.sqrt(torch.sum(v * v)) + 1e-12)
        u = adj(v)
        u = u / (torch.sqrt(torch.sum(u * u)) + 1e-12)
    sigma = torch.sum(op(u) * v)
    return sigma, u, 2 / (sigma * sigma + 1e-4)


def official_operators(layer):
    """The official code's operators: ``F.linear`` for dense layers; for convolutions, zero-pad by one pixel
    and convolve without padding, and the full transposed convolution cropped by one pixel."""
    w = layer.weight.detach()
    if isinstance(layer, ConvexPotentialLinear):
        return (lambda u: F.linear(u, w)), (lambda v: F.linear(v, w.T))
    return (
        (lambda u: F.conv2d(F.pad(u, (1, 1, 1, 1)), w)),
        (lambda v: F.conv_transpose2d(v, w)[:, :, 1:-1, 1:-1]),
    )


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_power_mode_reproduces_the_official_evaluation(kind, dtype):
    torch.manual_seed(0)
    layer = (
        ConvexPotentialLinear(12, 9, eval_norm="power")
        if kind == "dense"
        else ConvexPotentialConv2d(4, 5, input_size=(8, 8), eval_norm="power")
    ).to(dtype)
    x = torch.randn((6, 12) if kind == "dense" else (6, 4, 8, 8), dtype=dtype)
    layer.train()
    layer(x)  # one training step moves the persistent vector
    u0 = layer.u.clone()
    sigma, u, h = official_evaluation(*official_operators(layer), u0, 100)
    layer.eval()
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    assert layer.eval_spectral_norm().item() == pytest.approx(sigma.item(), rel=rtol)
    assert torch.allclose(layer.u, u, rtol=0, atol=100 * rtol)  # the evaluation advanced the vector
    assert layer.step_size().item() == pytest.approx(h.item(), rel=rtol)
    op, adj = official_operators(layer)
    with torch.no_grad():
        b = layer.bias if kind == "dense" else layer.bias[:, None, None]
        assert torch.allclose(layer(x), x - h * adj(F.relu(op(x) + b)), atol=10 * rtol)
    u1 = layer.u.clone()
    layer(x)  # cached: no second evaluation, the vector stays
    assert torch.equal(layer.u, u1)
    layer.train()
    layer(x)
    layer.eval()
    sigma2, _, _ = official_evaluation(*official_operators(layer), layer.u.clone(), 100)
    assert layer.eval_spectral_norm().item() == pytest.approx(sigma2.item(), rel=rtol)  # recomputed


def test_power_estimate_is_power_iteration_and_leaves_the_buffer():
    torch.manual_seed(1)
    layer = ConvexPotentialConv2d(3, 4, input_size=(6, 6)).double()
    u0 = layer.u.clone()
    start = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    w = layer.weight.detach()
    ref, _ = power_iteration(
        lambda v: F.conv2d(v, w, padding=1), lambda v: F.conv_transpose2d(v, w, padding=1), start, n_iter=7
    )
    assert layer.power_estimate(7, start=start).item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.equal(layer.u, u0)
    est = layer.power_estimate(1)  # from the persistent vector
    assert not est.requires_grad and torch.equal(layer.u, u0)
    assert layer.power_estimate(500).item() <= layer.sound_spectral_norm().item()
    with pytest.raises(ValueError, match="shape of the persistent vector"):
        layer.power_estimate(1, start=torch.randn(1, 3, 5, 5))


def test_training_mode_one_power_step_and_gradient_through_h():
    layer = ConvexPotentialConv2d(4, 3, input_size=(8, 8)).train()
    u0 = layer.u.clone()
    x = torch.randn(2, 4, 8, 8)
    layer(x).square().sum().backward()
    assert not torch.equal(u0, layer.u)
    assert layer.weight.grad is not None
    sigma = layer.spectral_norm()
    assert sigma.requires_grad  # the estimate is differentiable, as in the paper
    assert layer.step_size().requires_grad
    # the training estimate never exceeds the sound bound
    assert sigma.item() <= layer.sound_spectral_norm().item() * (1 + 1e-5)


def test_conv_layer_sound_norm_where_the_unenlarged_circular_norm_fails():
    """Kernel [1, -1, 1] x [1, -1, 1] on 5x5: the circular norm on the 5x5 grid is below the zero-padded
    norm (1 + sqrt 3)^2; the layer's evaluation norm must not be, or the layer expands the top direction."""
    layer = ConvexPotentialConv2d(1, 1, input_size=(5, 5)).double().eval()
    row = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.outer(row, row)[None, None])
    x = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    exact = exact_operator_norm(layer, x)
    assert exact == pytest.approx((1 + math.sqrt(3)) ** 2, rel=1e-12)
    assert layer.eval_spectral_norm().item() >= exact
    assert jacobian_norm(layer, sharp_point(layer, x)) <= 1 + 1e-12


# ------------------------------------------------------------------------------- the functional step
def layer_and_input(kind, dtype, bias=True, **kw):
    if kind == "dense":
        return ConvexPotentialLinear(7, 5, bias=bias, **kw).to(dtype), torch.randn(4, 7, dtype=dtype)
    layer = ConvexPotentialConv2d(3, 4, input_size=(6, 6), bias=bias, **kw).to(dtype)
    return layer, torch.randn(2, 3, 6, 6, dtype=dtype)


def functional_step(layer, x, step, weight=None, bias=None):
    """The public function of the layer's step, with the layer's weight and bias unless given."""
    w = layer.weight if weight is None else weight
    b = layer.bias if bias is None else bias
    if isinstance(layer, ConvexPotentialLinear):
        return convex_potential_linear(x, w, b, step)
    return convex_potential_conv2d(x, w, b, step, layer.padding)


def explicit_step(layer, x, step):
    """x - h M^T ReLU(M x + b) in float64 with M the explicit matrix of W (built from the weight alone)."""
    m = operator_matrix(layer, x[:1])
    flat = x.detach().double().reshape(x.shape[0], -1)
    b = torch.zeros(m.shape[0], dtype=torch.float64)
    if layer.bias is not None:
        b = layer.bias.detach().double().repeat_interleave(m.shape[0] // layer.bias.numel())
    return (flat - float(step.detach()) * F.relu(flat @ m.T + b) @ m).reshape(x.shape)


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_functional_step_is_the_layer_forward(kind, mode, bias, dtype, tol):
    layer, x = layer_and_input(kind, dtype, bias)
    layer.train(mode == "train")
    # the step the forward takes: in training mode from a copy (a training forward advances u)
    h = copy.deepcopy(layer).step_size() if mode == "train" else layer.step_size()
    out = layer(x)
    assert torch.equal(functional_step(layer, x, h), out)
    assert torch.allclose(out.double(), explicit_step(layer, x, h), rtol=0, atol=10 * tol)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_autocast_eval_forward_is_the_functional_step_with_h_rounded_down(kind):
    """Under bfloat16 autocast the eval-mode forward applies h rounded *down* to bfloat16 (the dtype
    h * W^T ReLU(W x + b) is computed in), bit for bit: nearest rounding would go up for some layers."""
    for seed in range(8):
        torch.manual_seed(seed)
        layer, x = layer_and_input(kind, torch.float32)
        layer.eval()
        h = cast_down(torch.tensor(layer.eval_step(), dtype=torch.float64), torch.bfloat16)
        assert h.item() <= layer.eval_step()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
            expected = functional_step(layer, x, h)
        assert out.dtype == expected.dtype and torch.equal(out, expected), seed


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_functional_steps_are_differentiable_and_work_in_torch_func(kind):
    torch.manual_seed(0)
    layer, x = layer_and_input(kind, torch.float64)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    h = torch.tensor(0.3, dtype=torch.float64)
    # every argument, against finite differences
    args = tuple(t.clone().requires_grad_(True) for t in (x[:2], w, b, h))
    assert torch.autograd.gradcheck(lambda *a: functional_step(layer, a[0], a[3], a[1], a[2]), args)
    # the Jacobian in x is I - h M^T D M, D the active ReLUs, M the explicit matrix of W
    x1 = x[:1]
    jac = torch.func.jacrev(lambda z: functional_step(layer, z, h, w, b))(x1).reshape(x1.numel(), -1)
    m = operator_matrix(layer, x1)
    active = (pre_activation(layer, x1) > 0).double().flatten()
    expected = torch.eye(x1.numel(), dtype=torch.float64) - h * m.T @ torch.diag(active) @ m
    assert torch.allclose(jac, expected, rtol=0, atol=1e-12)
    # vmap over the examples (each (d,) or (C, H, W)) is the batched call
    batched = torch.func.vmap(lambda xi: functional_step(layer, xi, h, w, b))(x)
    assert torch.allclose(batched, functional_step(layer, x, h, w, b), rtol=0, atol=1e-12)
    assert torch.equal(functional_step(layer, x, 0.3, w, b), functional_step(layer, x, h, w, b))
    with pytest.raises(ValueError, match="0-dim tensor"):
        functional_step(layer, x, torch.full((1,), 0.3))
    with pytest.raises(ValueError, match="weight must be"):
        functional_step(layer, x[..., 1:] if kind == "dense" else x[:, 1:], h)


# ------------------------------------------------------------------------------- the other pieces
def test_bad_inputs_give_clear_errors():
    conv = ConvexPotentialConv2d(4, 2, input_size=(8, 8))
    with pytest.raises(ValueError, match="4 channels"):
        conv(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        conv(torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match="input_size"):
        conv(torch.randn(1, 4, 16, 16))
    dense = ConvexPotentialLinear(10, 5)
    with pytest.raises(ValueError, match=r"\(\.\.\., 10\).*features=9"):
        dense(torch.randn(3, 9))
    with pytest.raises(ValueError, match="odd"):
        ConvexPotentialConv2d(4, 2, kernel_size=4)
    with pytest.raises(ValueError, match="eval_norm"):
        ConvexPotentialLinear(4, eval_norm="svd")
    with pytest.raises(ValueError, match="n_eval_iter >= 1"):
        ConvexPotentialLinear(4, eval_norm="power", n_eval_iter=0).eval()(torch.randn(2, 4))


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
    net = nn.Sequential(
        ChannelPad(4),
        ConvexPotentialConv2d(4, 2, input_size=(8, 8)),
        LipschitzAvgPool2d(4),
        nn.Flatten(),
        ConvexPotentialLinear(16, 8),
        FirstCoordinates(3),
    ).eval()
    assert lipschitz_upper_bound(net) == 1.0
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 3)

    class Unknown(nn.Module):  # no rule and no lipschitz_bound(): refused
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="Unknown"):
        lipschitz_upper_bound(nn.Sequential(Unknown()).eval())
    assert cpl_mini.layers.lipschitz_upper_bound is lipschitz_upper_bound  # still importable from layers


def test_avg_pool_refuses_sizes_it_would_crop():
    """avg_pool2d drops the last rows and columns of a size that is not a multiple of k: refused."""
    pool = LipschitzAvgPool2d(4)
    for shape in [(1, 2, 30, 30), (1, 2, 32, 30), (1, 2, 30, 32), (2, 30, 32)]:
        with pytest.raises(ValueError, match=r"divisible by 4.*Crop or pad the input.*kernel size"):
            pool(torch.randn(shape))
    assert pool(torch.randn(1, 2, 28, 32)).shape == (1, 2, 7, 8)
    assert pool(torch.randn(2, 8, 8)).shape == (2, 2, 2)


def exact_pairwise(v):
    """||v_i - v_j|| for float64 rows, as exact squared distances (fractions); float64 nearest values."""
    rows = [[Fraction(t) for t in row] for row in v.tolist()]
    k = len(rows)
    squares = [[sum((a - b) ** 2 for a, b in zip(rows[i], rows[j])) for j in range(k)] for i in range(k)]
    return squares


def test_pairwise_lipschitz_of_nearly_parallel_rows_is_an_upper_bound():
    """100 rows that differ by ~1e-7 (a CIFAR-100 head after training can look like this): torch.cdist's
    matrix-product formula cancels there and under-estimates; the explicit differences do not."""
    torch.manual_seed(0)
    k, d = 100, 16
    base = torch.randn(d)
    head = RowNormalizedLinear(d, k, bias=False)
    with torch.no_grad():
        head.weight.copy_(base + 1e-7 * torch.randn(k, d))
    v = head.normalized_weight().detach().double()  # the rows the forward applies, exactly
    got = head.pairwise_lipschitz()
    assert (
        got.dtype == torch.float64
        and got.shape == (k, k)
        and torch.equal(got.diagonal(), torch.zeros(k, dtype=torch.float64))
    )
    exact = exact_pairwise(v)
    worst = 0.0
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            g = Fraction(got[i, j].item())
            assert g * g >= exact[i][j], (i, j)  # never below the exact distance
            worst = max(worst, float(g * g / exact[i][j]) - 1)
    assert worst < 1e-9  # and tight


def test_docstring_examples():
    result = doctest.testmod(cpl_mini.layers, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 6 and result.failed == 0


def test_deepcopy_keeps_a_working_cache():
    layer = ConvexPotentialLinear(5, 4).eval()
    n0 = layer.eval_spectral_norm().item()
    other = copy.deepcopy(layer)
    with torch.no_grad():
        other.weight.mul_(2.0)
    assert other.eval_spectral_norm().item() == pytest.approx(2 * n0, rel=1e-12)
    assert layer.eval_spectral_norm().item() == n0
