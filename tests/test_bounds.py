"""cpl_mini.bounds: the network bound is the product of its parts' bounds, in evaluation mode only,
checked where the claims are sharp: parts with constants above 1 whose top directions line up; each
torch rule against the exact norm of the float64 Jacobian (linear maps), a dense derivative grid
(activations), or a point where the bound is attained."""

import doctest
import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn

import cpl_mini
import cpl_mini.bounds
from cpl_mini.bounds import lipschitz_upper_bound
from cpl_mini.layers import ConvexPotentialConv2d, ConvexPotentialLinear, FirstCoordinates, LipschitzAvgPool2d
from cpl_mini.spectral import conv_spectral_norm_upper

DT = torch.float64


def linear_with_singular_values(values, u, v):
    """nn.Linear (no bias) with weight U diag(values) V^T, float64."""
    layer = nn.Linear(v.shape[0], u.shape[0], bias=False).to(DT)
    with torch.no_grad():
        s = torch.diag(torch.tensor(values, dtype=DT))
        layer.weight.copy_(u[:, : len(values)] @ s @ v[:, : len(values)].T)
    return layer


def test_sequential_bound_is_the_product_and_is_sharp():
    """B A with ||A|| = 2, ||B|| = 3 and A's top left-singular vector equal to B's top right-singular vector:
    the composition has norm exactly 6, so any bound below the product (e.g. the max, 3) is wrong."""
    torch.manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(5, 5, dtype=DT))
    q2, _ = torch.linalg.qr(torch.randn(5, 5, dtype=DT))
    q3, _ = torch.linalg.qr(torch.randn(5, 5, dtype=DT))
    a = linear_with_singular_values([2.0, 1.0, 0.5], q2, q1)
    b = linear_with_singular_values([3.0, 0.7], q3, q2)
    net = nn.Sequential(a, nn.Identity(), b).eval()
    exact = torch.linalg.svdvals(b.weight @ a.weight)[0].item()
    assert exact == pytest.approx(6.0, rel=1e-12)
    bound = lipschitz_upper_bound(net)
    assert exact <= bound <= exact * (1 + 1e-8)
    # nested containers multiply too, and a CPL layer with step_scale 1.5 has constant exactly 2 at the worst
    cpl = ConvexPotentialLinear(5, 5, step_scale=1.5).double().eval()
    deep = nn.Sequential(nn.Sequential(a, nn.ReLU()), cpl, nn.Sequential(b)).eval()
    assert lipschitz_upper_bound(deep) == pytest.approx(2.0 * 2.0 * 3.0, rel=1e-8)
    assert lipschitz_upper_bound(deep) >= 12.0


def test_training_mode_is_refused():
    """In training mode dropout scales kept inputs by 1/(1-p) and the CPL layers normalise by a power
    estimate: the function differs from the evaluation-mode one the bound is for."""
    net = nn.Sequential(ConvexPotentialLinear(4), nn.Dropout(0.5), FirstCoordinates(2))
    with pytest.raises(ValueError, match=r"training mode.*call model\.eval\(\)"):
        lipschitz_upper_bound(net)  # a new module is in training mode
    net.eval()
    net[1].train()  # one part left in training mode is enough
    with pytest.raises(ValueError, match=r"1 part\(s\).*\(1\)"):
        lipschitz_upper_bound(net)
    net.eval()
    assert lipschitz_upper_bound(net) == 1.0  # evaluation-mode dropout is the identity


def test_protocol_for_a_users_module():
    class Scale(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x):
            return self.c * x

        def lipschitz_bound(self):
            return abs(self.c)

    class Unknown(nn.Module):
        def forward(self, x):
            return x

    assert lipschitz_upper_bound(nn.Sequential(Scale(3.0), nn.ReLU(), Scale(-0.5)).eval()) == 1.5
    with pytest.raises(TypeError, match="Unknown.*lipschitz_bound"):
        lipschitz_upper_bound(nn.Sequential(Scale(2.0), Unknown()).eval())
    assert math.isnan(lipschitz_upper_bound(nn.Sequential(Scale(float("nan")), Scale(2.0)).eval()))
    assert lipschitz_upper_bound(nn.Sequential(Scale(float("inf")), Scale(2.0)).eval()) == math.inf


def test_product_is_rounded_up():
    """The bound of a composition is the exact product of the parts' bounds rounded up: the smallest float
    at or above it (a product rounded to nearest can land below it)."""
    from fractions import Fraction

    class C(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c

        def lipschitz_bound(self):
            return self.c

    for a, b in [(0.1, 3.0), (1 / 3, 3.0), (0.7, 0.7), (1e-3, 7e2)]:
        got = lipschitz_upper_bound(nn.Sequential(C(a), C(b)).eval())
        exact = Fraction(a) * Fraction(b)
        assert Fraction(got) >= exact and math.nextafter(got, 0) < exact


def test_bound_runs_in_ieee_float32():
    seen = []

    class Probe(nn.Module):
        def lipschitz_bound(self):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return 1.0

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        lipschitz_upper_bound(nn.Sequential(Probe()).eval())
        after = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert seen == [(False, False)] and after == (True, True)


def test_public_names():
    assert cpl_mini.lipschitz_upper_bound is lipschitz_upper_bound
    from cpl_mini.layers import lipschitz_upper_bound as from_layers

    assert from_layers is lipschitz_upper_bound


def test_docstring_examples():
    result = doctest.testmod(cpl_mini.bounds, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


# ---------------------------------------------------------------------------------------------
# the torch rules, against independent references
# ---------------------------------------------------------------------------------------------
def jacobian_norm(f, shape, x=None):
    """Exact ||J_f(x)||_2 (float64 SVD) at ``x`` (default: a random point) of one input of ``shape``."""
    x = torch.randn(shape, dtype=DT) if x is None else x
    jac = torch.autograd.functional.jacobian(lambda z: f(z.reshape(1, *shape)).flatten(), x.flatten())
    return torch.linalg.svdvals(jac)[0].item()


def random_conv(cls, cin, cout, **kw):
    return cls(cin, cout, **kw).to(DT).eval()


CONV_VARIANTS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, padding=1, stride=2),
    dict(kernel_size=3, padding=2, dilation=2),
    dict(kernel_size=3, padding=1, groups=2),
    dict(kernel_size=(2, 3), padding="same"),  # even kernel: one more pad row below than above
    dict(kernel_size=3, padding=0, stride=(2, 1)),
    dict(kernel_size=3, padding=1, padding_mode="circular"),
    dict(kernel_size=3, padding=(2, 1), padding_mode="circular", dilation=(1, 2), stride=2, groups=2),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, padding=2, padding_mode="replicate", groups=2),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kw", CONV_VARIANTS)
def test_conv2d_bound_holds(kw):
    """exact Jacobian norm <= bound with the input size <= size-free bound, on this size and a larger one."""
    conv = random_conv(nn.Conv2d, 4, 6, **kw)
    exact = jacobian_norm(conv, (4, 5, 6))
    tight = lipschitz_upper_bound(conv, (4, 5, 6))
    free = lipschitz_upper_bound(conv)
    assert exact <= tight <= free
    assert jacobian_norm(conv, (4, 9, 8)) <= free


def test_conv2d_circular_wider_than_the_input():
    """A 5x5 circular kernel on 4x4 inputs with pad 3: taps wrap onto the same pixel (the kernel is folded)
    and the 6x6 output repeats rows of the circular convolution."""
    conv = random_conv(nn.Conv2d, 2, 3, kernel_size=5, padding=3, padding_mode="circular")
    assert jacobian_norm(conv, (2, 4, 4)) <= lipschitz_upper_bound(conv, (2, 4, 4))
    one_tap = random_conv(nn.Conv2d, 1, 1, kernel_size=5, padding=3, padding_mode="circular", bias=False)
    with torch.no_grad():  # reads pixel ((i - 3) mod 4, (j - 3) mod 4): two rows and columns twice, norm 2
        one_tap.weight.zero_()
        one_tap.weight[0, 0, 0, 0] = 1.0
    exact = jacobian_norm(one_tap, (1, 4, 4))
    assert exact == pytest.approx(2.0, rel=1e-12)
    assert exact <= lipschitz_upper_bound(one_tap, (1, 4, 4)) <= exact * (1 + 1e-8)
    assert exact <= lipschitz_upper_bound(one_tap)


@pytest.mark.parametrize("mode, pad, copies", [("reflect", 1, 2), ("replicate", 2, 3)])
def test_conv2d_reflect_replicate_bound_is_attained(mode, pad, copies):
    """A one-tap kernel (corner tap 1) reads padded pixel (i, j) straight: it repeats the pixels the padding
    copies, ``copies`` times along each axis, so its norm is ``copies`` = sqrt(copies^2), the bound."""
    conv = nn.Conv2d(1, 1, 2 * pad + 1, padding=pad, padding_mode=mode, bias=False).to(DT).eval()
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0
    exact = jacobian_norm(conv, (1, 6, 6))
    assert exact == pytest.approx(copies, rel=1e-12)
    assert exact <= lipschitz_upper_bound(conv, (1, 6, 6)) <= exact * (1 + 1e-8)
    assert exact <= lipschitz_upper_bound(conv)  # size-free: the most copies on any size


@pytest.mark.parametrize(
    "kw", [dict(padding=1), dict(padding=2, dilation=2), dict(padding=1, groups=2), dict(padding=(1, 0))]
)
def test_conv2d_bound_is_tight_where_exact(kw):
    """'same' circular padding: the exact norm; zero padding: the exact norm of the circular convolution
    on the grid enlarged by the padding (the package's FFT bound), here checked by a Jacobian SVD."""
    conv = random_conv(nn.Conv2d, 4, 6, kernel_size=(3, 1) if kw["padding"] == (1, 0) else 3, **kw)
    conv.padding_mode = "circular"
    exact = jacobian_norm(conv, (4, 5, 6))
    assert lipschitz_upper_bound(conv, (4, 5, 6)) == pytest.approx(exact, rel=1e-6)
    pad = conv.padding
    enlarged = (4, 5 + 2 * pad[0], 6 + 2 * pad[1])
    exact_enlarged = jacobian_norm(conv, enlarged)
    conv.padding_mode = "zeros"
    assert lipschitz_upper_bound(conv, (4, 5, 6)) == pytest.approx(exact_enlarged, rel=1e-6)


def test_conv2d_size_free_bound_is_the_sum_of_tap_norms():
    """sum_{a,b} ||K_ab||_2 (max over groups); for a nonnegative single-channel kernel it is sum(K), the gain
    on constant images, approached by the exact norm on large inputs."""
    conv = random_conv(nn.Conv2d, 4, 6, kernel_size=3, padding=1, groups=2)
    taps = [
        torch.linalg.svdvals(w[:, :, a, b])[0]
        for w in conv.weight.chunk(2)
        for a in range(3)
        for b in range(3)
    ]
    expected = max(sum(taps[:9]), sum(taps[9:])).item()
    assert lipschitz_upper_bound(conv) == pytest.approx(expected, rel=1e-8)
    assert lipschitz_upper_bound(conv) >= expected
    one = random_conv(nn.Conv2d, 1, 1, kernel_size=3, padding=1, bias=False)
    with torch.no_grad():
        one.weight.abs_()
    total = one.weight.sum().item()
    assert lipschitz_upper_bound(one) == pytest.approx(total, rel=1e-8)
    assert total * 0.85 <= jacobian_norm(one, (1, 16, 16)) <= total


@pytest.mark.parametrize(
    "kw",
    [dict(padding=1), dict(stride=2, padding=1, output_padding=1), dict(stride=2, dilation=2, groups=2)],
)
def test_conv_transpose2d_bound(kw):
    """The adjoint of a convolution on the transposed conv's output size: same norm bound."""
    conv = random_conv(nn.ConvTranspose2d, 4, 6, kernel_size=3, **kw)
    exact = jacobian_norm(conv, (4, 4, 5))
    tight = lipschitz_upper_bound(conv, (4, 4, 5))
    assert exact <= tight <= lipschitz_upper_bound(conv)
    if "groups" not in kw and "dilation" not in kw:
        out = conv(torch.zeros(1, 4, 4, 5, dtype=DT)).shape[2:]
        assert tight == pytest.approx(conv_spectral_norm_upper(conv.weight, tuple(out), 1).item(), rel=1e-12)


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_bound_is_the_max_ratio(affine):
    for bn, shape in [
        (nn.BatchNorm1d(5, affine=affine), (5,)),
        (nn.BatchNorm2d(3, affine=affine), (3, 2, 2)),
    ]:
        bn = bn.to(DT).eval()
        c = shape[0]
        with torch.no_grad():
            bn.running_var.copy_(torch.rand(c, dtype=DT) * 3 + 0.01)
            bn.running_mean.normal_()
            if affine:
                bn.weight.normal_()
        gamma = bn.weight.abs() if affine else torch.ones(c, dtype=DT)
        ratio = max(
            Fraction(g.item()) ** 2 / (Fraction(v.item()) + Fraction(bn.eps))
            for g, v in zip(gamma, bn.running_var)
        )
        bound = lipschitz_upper_bound(bn, shape)
        assert Fraction(bound) ** 2 >= ratio  # exact rational comparison of the squares
        exact = jacobian_norm(bn, shape)
        assert exact == pytest.approx(bound, rel=1e-12) and bound == lipschitz_upper_bound(bn)
    with pytest.raises(TypeError, match="track_running_stats=False"):
        lipschitz_upper_bound(nn.BatchNorm2d(3, track_running_stats=False).eval())
    with pytest.raises(ValueError, match="training mode"):
        lipschitz_upper_bound(nn.BatchNorm2d(3))


AVG_POOLS = [  # kernel, stride, padding, ceil_mode, count_include_pad, divisor_override
    (2, 2, 0, False, True, None),
    (3, 1, 1, False, True, None),
    (3, 2, 1, False, True, None),
    (3, 2, 1, False, False, None),
    (3, 2, 1, True, True, None),
    (3, 2, 0, True, False, None),
    (2, 1, 1, False, True, 2),
    ((3, 2), (2, 1), (1, 0), False, True, None),
]


@pytest.mark.parametrize("args", AVG_POOLS)
def test_avg_pool_bound(args):
    """With the size: the exact norm; without: a size-free bound above the exact norm on several sizes."""
    pool = nn.AvgPool2d(*args).eval()
    for shape in [(1, 5, 6), (2, 8, 8), (1, 7, 3)]:
        exact = jacobian_norm(pool, shape)
        tight = lipschitz_upper_bound(pool, shape)
        assert exact <= tight <= exact * (1 + 1e-8)
        assert tight <= lipschitz_upper_bound(pool)


def test_avg_pool_size_free_bound_is_the_schur_formula():
    assert lipschitz_upper_bound(nn.AvgPool2d(2).eval()) == 0.5  # disjoint 2x2 means: exactly 1/2
    assert lipschitz_upper_bound(nn.AvgPool2d(3, 1, 1).eval()) == 1.0  # ceil(3/1)^2 / 9
    assert lipschitz_upper_bound(nn.AvgPool2d(3, 2, 1).eval()) == pytest.approx(2 / 3, rel=1e-15)  # sqrt(4/9)
    assert jacobian_norm(nn.AvgPool2d(3, 1, 1), (1, 12, 12)) > 0.95  # nearly attained on large inputs


@pytest.mark.parametrize("sizes", [((5, 7), (2, 3)), ((4, 4), (1, 1)), ((3, 3), (5, 4))])
def test_adaptive_avg_pool_bound_is_exact(sizes):
    (h, w), out = sizes
    pool = nn.AdaptiveAvgPool2d(out).eval()
    exact = jacobian_norm(pool, (2, h, w))
    assert exact <= lipschitz_upper_bound(pool, (2, h, w)) <= exact * (1 + 1e-8)
    with pytest.raises(ValueError, match="input_shape"):
        lipschitz_upper_bound(pool)


@pytest.mark.parametrize(
    "kw, windows",
    [
        (dict(kernel_size=2), 1),
        (dict(kernel_size=3, stride=1, padding=1), 9),
        (dict(kernel_size=3, stride=2, padding=1), 4),
        (dict(kernel_size=2, stride=1, dilation=2), 4),
    ],
)
def test_max_pool_bound(kw, windows):
    """sqrt(most windows per pixel), attained where one pixel is the max of all the windows it lies in."""
    pool = nn.MaxPool2d(**kw).eval()
    bound = lipschitz_upper_bound(pool, (1, 7, 7))
    assert bound == pytest.approx(math.sqrt(windows), rel=1e-15) and bound == lipschitz_upper_bound(pool)
    peak = 0.01 * torch.randn(1, 7, 7, dtype=DT)
    peak[0, 3, 3] = 10.0
    assert jacobian_norm(pool, (1, 7, 7), peak) == pytest.approx(bound, rel=1e-12)
    for _ in range(3):
        assert jacobian_norm(pool, (1, 7, 7)) <= bound
    with pytest.raises(TypeError, match="return_indices"):
        lipschitz_upper_bound(nn.MaxPool2d(2, return_indices=True).eval())


ACTIVATIONS = [
    (nn.ReLU(), 1e-12),
    (nn.ReLU6(), 1e-12),
    (nn.Hardtanh(-2.0, 0.5), 1e-12),
    (nn.Tanh(), 1e-8),
    (nn.Sigmoid(), 1e-12),
    (nn.Hardsigmoid(), 1e-12),
    (nn.Hardswish(), 1e-4),
    (nn.Softsign(), 2e-4),
    (nn.Tanhshrink(), 1e-12),
    (nn.Softshrink(0.3), 1e-12),
    (nn.LogSigmoid(), 1e-12),
    (nn.Softplus(beta=3.0), 1e-12),
    (nn.Softplus(beta=0.5), 1e-6),
    (nn.LeakyReLU(0.1), 1e-12),
    (nn.LeakyReLU(-3.0), 1e-12),
    (nn.ELU(0.5), 1e-12),
    (nn.ELU(2.0), 1e-3),
    (nn.CELU(0.7), 1e-12),
    (nn.SELU(), 1e-3),
    (nn.GELU(), 1e-7),
    (nn.GELU(approximate="tanh"), 1e-6),
    (nn.SiLU(), 2e-6),
]


@pytest.mark.parametrize("act, slack", ACTIVATIONS, ids=lambda a: repr(a) if isinstance(a, nn.Module) else "")
def test_activation_bound_is_the_sup_of_the_slope(act, slack):
    """The largest chord slope |f(x + h) - f(x)| / h of the forward on a dense float64 grid (h = 1e-4 on
    [-30, 30]; its rounding error is below 1e-9 relative) <= bound <= it * (1 + slack): the slack covers a
    sup approached at a kink (ELU, SELU at 0^-), proven by a grid (GELU tanh, SiLU) or far out (Softplus
    with a small beta). (Chords, not autograd: some backward formulas use float32 constants.)"""
    x = torch.linspace(-30, 30, 600_001, dtype=DT)
    with torch.no_grad():
        y = act.eval()(x)
    sup = ((y[1:] - y[:-1]) / (x[1:] - x[:-1])).abs().max().item()
    bound = lipschitz_upper_bound(act)
    assert sup <= bound * (1 + 1e-9) and bound <= sup * (1 + max(slack, 1e-9))


def test_prelu_bound_is_the_largest_slope():
    act = nn.PReLU(3).to(DT).eval()
    with torch.no_grad():
        act.weight.copy_(torch.tensor([0.5, -2.5, 1.5]))
    assert lipschitz_upper_bound(act) == 2.5
    x = -torch.rand(3, 2, 2, dtype=DT)  # all negative: slopes 0.5, -2.5, 1.5
    assert jacobian_norm(act, (3, 2, 2), x) == pytest.approx(2.5, rel=1e-15)


@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.PixelUnshuffle(2), (2, 4, 6)),
        (nn.PixelShuffle(2), (8, 2, 3)),
        (nn.Flatten(), (2, 3, 3)),
        (nn.Unflatten(1, (2, 4)), (8,)),
        (nn.ChannelShuffle(2), (4, 3, 3)),
    ],
)
def test_reshapes_are_isometries(module, shape):
    assert lipschitz_upper_bound(module.eval(), shape) == 1.0
    assert jacobian_norm(module, shape) == pytest.approx(1.0, rel=1e-14)


def test_shapes_are_carried_through_a_sequential():
    """PixelUnshuffle turns (2, 6, 6) into (8, 3, 3): the convolution after it is bounded on 3x3 inputs."""
    conv = random_conv(nn.Conv2d, 8, 3, kernel_size=3, padding=1)
    net = nn.Sequential(nn.PixelUnshuffle(2), nn.Sequential(nn.Identity(), conv), nn.Tanh()).eval()
    expected = conv_spectral_norm_upper(conv.weight, (3, 3), 1).item()
    assert lipschitz_upper_bound(net, (2, 6, 6)) == pytest.approx(expected, rel=1e-12)
    assert lipschitz_upper_bound(net, torch.Size([2, 6, 6])) == lipschitz_upper_bound(net, (2, 6, 6))
    with pytest.raises(ValueError, match=r"Conv2d cannot take inputs of shape \(4, 3, 3\)"):
        lipschitz_upper_bound(net, (1, 6, 6))
    for bad in [(), (2, 0, 6), (2, 6.5, 6), "abc"]:
        with pytest.raises(ValueError, match="input_shape must be positive ints"):
            lipschitz_upper_bound(net, bad)


def test_mixed_network_bound_holds():
    """Package layers and torch layers in one float64 network on (4, 8, 8) inputs: the exact Jacobian norm
    at random points (CPL is piecewise linear) stays below the bound; the linear part's norm too."""
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_var.uniform_(0.2, 2.0)
        bn.weight.normal_()
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    net = (
        nn.Sequential(
            ConvexPotentialConv2d(4, 5, input_size=(8, 8), step_scale=1.5),
            conv,
            bn,
            LipschitzAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(24, 5),
        )
        .to(DT)
        .eval()
    )
    bound = lipschitz_upper_bound(net, (4, 8, 8))
    assert bound <= lipschitz_upper_bound(net)  # without the size: the looser conv bound
    for _ in range(3):
        assert jacobian_norm(net, (4, 8, 8)) <= bound
    linear = nn.Sequential(conv, bn, nn.AvgPool2d(2), nn.Flatten(), nn.Linear(24, 5)).to(DT).eval()
    assert jacobian_norm(linear, (4, 8, 8)) <= lipschitz_upper_bound(linear, (4, 8, 8))


class Residual(nn.Module):
    """x + f(x), with the container protocol: 1 + Lip(f), the input shape passed on."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.seen = []

    def forward(self, x):
        return x + self.f(x)

    def lipschitz_bound(self, input_shape=None):
        self.seen.append(input_shape)
        return cpl_mini.precision.float_up(1 + Fraction(lipschitz_upper_bound(self.f, input_shape)))


class Concat(nn.Module):
    """(f(x), g(x)) along channels: sqrt(Lip(f)^2 + Lip(g)^2)."""

    def __init__(self, f, g):
        super().__init__()
        self.f, self.g = f, g

    def forward(self, x):
        return torch.cat([self.f(x), self.g(x)], dim=1)

    def lipschitz_bound(self):
        lf, lg = lipschitz_upper_bound(self.f), lipschitz_upper_bound(self.g)
        return math.sqrt(lf**2 + lg**2) * (1 + 1e-15)


def test_custom_containers():
    conv = random_conv(nn.Conv2d, 3, 3, kernel_size=3, padding=1)
    block = Residual(nn.Sequential(conv, nn.GELU()))
    net = nn.Sequential(nn.Conv2d(3, 3, 1), block, Concat(nn.Tanh(), nn.Sigmoid())).to(DT).eval()
    bound = lipschitz_upper_bound(net, (3, 6, 6))
    assert block.seen == [(3, 6, 6)]
    for _ in range(3):
        assert jacobian_norm(net, (3, 6, 6)) <= bound
    assert lipschitz_upper_bound(block, (3, 6, 6)) == pytest.approx(
        1 + conv_spectral_norm_upper(conv.weight, (6, 6), 1).item() * 1.1289041451851, rel=1e-9
    )


def test_unknown_modules_are_refused():
    class Block(nn.Module):  # a container without lipschitz_bound
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return x + self.lin(x)

    class Doubling(nn.Sequential):
        def forward(self, x):
            return 2 * super().forward(x)

    class Scaled(nn.Conv2d):
        def forward(self, x):
            return 10 * super().forward(x)

    hooked = nn.Linear(3, 3)
    hooked.register_forward_hook(lambda m, inp, out: 10 * out)
    refused = [
        (Block(), "Block"),
        (Doubling(nn.ReLU()), "Doubling"),
        (Scaled(2, 2, 3), "Scaled"),
        (nn.Mish(), "Mish"),
        (nn.Softmax(dim=1), "Softmax"),
        (nn.Hardshrink(), "Hardshrink"),
        (nn.Threshold(0.1, 20.0), "Threshold"),
        (nn.Softplus(threshold=5.0), "threshold"),
        (nn.CELU(alpha=-1.0), "alpha"),
        (hooked, "hooks"),
    ]
    for module, match in refused:
        with pytest.raises(TypeError, match=match):
            lipschitz_upper_bound(nn.Sequential(nn.Identity(), module).eval())

    class Plain(nn.Conv2d):  # a subclass that keeps forward keeps the rule
        pass

    plain, conv = Plain(2, 2, 3).eval(), nn.Conv2d(2, 2, 3).eval()
    conv.load_state_dict(plain.state_dict())
    assert lipschitz_upper_bound(plain, (2, 5, 5)) == lipschitz_upper_bound(conv, (2, 5, 5))
