"""cpl_mini.export: ``to_plain`` gives a network of torch.nn layers with the original's evaluation-mode
outputs (to 1e-5 in float32, 1e-12 in float64), which torch.export accepts and whose state_dict and
exported program round-trip without loss; the original is left unchanged."""

import math
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from cpl_mini.downsampling import ChannelSlice, InvertibleDownsampling
from cpl_mini.export import (
    PlainChannelPad,
    PlainChannelSlice,
    PlainFirstCoordinates,
    PlainMaxMin,
    Residual,
    to_plain,
)
from cpl_mini.layers import (
    ChannelPad,
    ConvexPotentialConv2d,
    ConvexPotentialLinear,
    FirstCoordinates,
    LipschitzAvgPool2d,
    RowNormalizedLinear,
)
from cpl_mini.models import cpl_network
from cpl_mini.normalization import InputNormalization
from cpl_mini.normalized import AOLConv2d, AOLLinear, SpectralNormLinear
from cpl_mini.orthogonal import CayleyLinear, MatrixExpLinear, MaxMin
from cpl_mini.sll import SLLConv2d, SLLLinear

pytestmark = pytest.mark.usefixtures("ieee")  # the comparisons are of IEEE float32 arithmetic, on GPUs too

#: Largest difference allowed between the plain and the original outputs (relative to max(1, |output|)).
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
HELPERS = (Residual, PlainChannelPad, PlainFirstCoordinates, PlainChannelSlice, PlainMaxMin)
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]  # CIFAR-10's statistics

LAYERS = [  # (name, constructor, input shape)
    ("cpl_linear", lambda: ConvexPotentialLinear(8, inner_features=12), (5, 8)),
    ("cpl_linear_no_bias", lambda: ConvexPotentialLinear(8, inner_features=6, bias=False), (5, 8)),
    ("cpl_linear_power", lambda: ConvexPotentialLinear(8, eval_norm="power"), (5, 8)),
    ("cpl_linear_half_step", lambda: ConvexPotentialLinear(8, step_scale=0.5), (5, 8)),
    ("cpl_conv", lambda: ConvexPotentialConv2d(4, inner_channels=5, input_size=(6, 7)), (3, 4, 6, 7)),
    (
        "cpl_conv_k5_no_bias",
        lambda: ConvexPotentialConv2d(3, inner_channels=4, kernel_size=5, input_size=6, bias=False),
        (3, 3, 6, 6),
    ),
    ("sll", lambda: SLLLinear(8, inner_features=6), (5, 8)),
    ("sll_conv", lambda: SLLConv2d(4, inner_channels=5), (3, 4, 6, 7)),
    ("sll_conv_k5_no_bias", lambda: SLLConv2d(3, inner_channels=4, kernel_size=5, bias=False), (3, 3, 6, 6)),
    ("spectral", lambda: SpectralNormLinear(8, 5), (5, 8)),
    ("spectral_power", lambda: SpectralNormLinear(6, 9, eval_norm="power"), (5, 6)),
    ("aol", lambda: AOLLinear(8, 5), (5, 8)),
    ("aol_conv", lambda: AOLConv2d(4, 5), (3, 4, 6, 7)),
    ("aol_conv_k2_stride2", lambda: AOLConv2d(4, 6, kernel_size=2, stride=2, padding=0), (3, 4, 6, 8)),
    (
        "aol_conv_stride2_no_bias",
        lambda: AOLConv2d(3, 5, kernel_size=3, stride=2, padding=1, bias=False),
        (2, 3, 7, 7),
    ),
    ("cayley", lambda: CayleyLinear(6), (5, 6)),
    ("cayley_wide", lambda: CayleyLinear(4, 7), (5, 4)),
    ("matrix_exp", lambda: MatrixExpLinear(6), (5, 6)),
    ("matrix_exp_narrow", lambda: MatrixExpLinear(7, 3, bias=False), (5, 7)),
    ("row_normalized", lambda: RowNormalizedLinear(8, 3), (5, 8)),
    ("input_normalization", lambda: InputNormalization(MEAN, STD), (2, 3, 4, 5)),
    ("input_mean_only", lambda: InputNormalization(MEAN), (2, 3, 4, 5)),
    ("channel_pad", lambda: ChannelPad(5), (2, 3, 4, 4)),
    ("avg_pool", lambda: LipschitzAvgPool2d(2), (2, 3, 4, 6)),
    ("invertible_downsampling", lambda: InvertibleDownsampling(2), (2, 3, 4, 6)),
    ("invertible_downsampling_3", lambda: InvertibleDownsampling(3), (2, 2, 6, 3)),
    ("channel_slice", lambda: ChannelSlice(2), (2, 5, 3, 3)),
    ("channel_slice_dense", lambda: ChannelSlice(3), (4, 7)),
    ("first_coordinates", lambda: FirstCoordinates(3), (5, 8)),
    ("max_min", lambda: MaxMin(), (5, 8)),
    ("max_min_channels", lambda: MaxMin(dim=1), (2, 4, 3, 3)),
    (
        "torch_nn",
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout()),
        (2, 3, 5, 5),
    ),
]


def trained(module, x, steps=3):
    """``module`` after a few Adam steps towards a random target, so that no weight is at its init."""
    if not list(module.parameters()):
        return module
    module.train()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    target = torch.randn_like(module(x))
    for _ in range(steps):
        optimizer.zero_grad()
        (module(x) - target).square().mean().backward()
        optimizer.step()
    return module


def assert_same_outputs(original, plain, x):
    """``plain(x)`` equals ``original.eval()(x)`` within :data:`TOL` (same shape and dtype)."""
    with torch.no_grad():
        expected = original.eval()(x)
        got = plain(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    err = (got - expected).abs().max().item()
    assert err <= TOL[x.dtype] * max(1.0, expected.abs().max().item()), f"max difference {err:.3g}"


def assert_plain(plain, original=None):
    """torch.nn modules and the export helpers only, all in evaluation mode, plain tensors only, and no
    storage shared with ``original``."""
    for name, m in plain.named_modules():
        assert type(m) in HELPERS or type(m).__module__.startswith("torch.nn."), (name, type(m))
        assert not m.training, name
    assert all(type(p) is nn.Parameter for p in plain.parameters())
    assert all(type(b) is torch.Tensor for b in plain.buffers())
    assert all(type(v) is torch.Tensor for v in plain.state_dict().values())
    if original is not None:
        theirs = {
            t.untyped_storage().data_ptr() for t in list(original.parameters()) + list(original.buffers())
        }
        assert not theirs & {t.untyped_storage().data_ptr() for t in plain.state_dict().values()}


def xs_network(dtype, device, normalization=None, seed=0):
    """``cpl_network("XS")`` (optionally with an input normalisation) after two training steps."""
    torch.manual_seed(seed)
    stats = {"mean": MEAN, "std": STD} if normalization == "mean_std" else {}
    stats = {"mean": MEAN} if normalization == "mean" else stats
    model = cpl_network("XS", **stats).to(device=device, dtype=dtype)
    return trained(model, torch.rand(4, 3, 32, 32, device=device, dtype=dtype), steps=2)


# ---------------------------------------------------------------------------------------------
# each layer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, make, shape", LAYERS, ids=[row[0] for row in LAYERS])
def test_each_layer_plain_output_equals_eval_output(name, make, shape, device, dtype):
    x = torch.randn(shape, device=device, dtype=dtype)
    layer = trained(make().to(device=device, dtype=dtype), x)
    plain = to_plain(layer)
    assert_plain(plain, layer)
    assert_same_outputs(layer, plain, x)
    assert_same_outputs(layer, plain, 3 * torch.randn(shape, device=device, dtype=dtype))


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_folded_step_is_the_forward_step_rounded_down(kind):
    """``-h W^T`` is formed with the ``h`` of the eval forward: the float64 step (sound norm) rounded
    *down* to float32, then multiplied in float64 and rounded once (independent reference here)."""
    if kind == "dense":
        layer, x = ConvexPotentialLinear(16, inner_features=24), torch.randn(5, 16)
    else:
        layer, x = ConvexPotentialConv2d(4, inner_channels=5, input_size=6), torch.randn(2, 4, 6, 6)
    trained(layer, x).eval()
    exact = layer.eval_step()  # float64, before rounding to float32
    h = torch.tensor(exact, dtype=torch.float64).float()
    if float(h) > exact:
        h = torch.nextafter(h, torch.tensor(-math.inf))
    w = layer.weight.detach().double()
    expected = (-float(h) * (w.t() if kind == "dense" else w)).float()
    assert torch.equal(to_plain(layer).branch[2].weight, expected)


def test_folded_sll_conv_kernel_is_minus_two_k_over_t_rounded_once():
    """The adjoint kernel is ``-2 K / t_a`` (inner channel ``a``) with the ``t`` of the forward (float32),
    formed in float64 and rounded once; the first convolution holds ``K`` and ``b`` unchanged."""
    layer = SLLConv2d(4, inner_channels=6, kernel_size=3)
    trained(layer, torch.randn(2, 4, 5, 5)).eval()
    with torch.no_grad():
        t = layer.t().double()
    w = layer.weight.detach().double()
    expected = torch.stack([-2.0 * w[a] / t[a] for a in range(6)]).float()
    conv, relu, adjoint = to_plain(layer).branch
    assert torch.equal(adjoint.weight, expected) and adjoint.bias is None
    assert torch.equal(conv.weight, layer.weight) and torch.equal(conv.bias, layer.bias)
    assert conv.padding == adjoint.padding == (1, 1) and type(relu) is nn.ReLU


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0), (2, 1)])
def test_aol_conv_plain_output_is_bit_identical(stride, padding):
    """The plain ``Conv2d`` holds the kernel the forward applies (``rescaled_kernel()``): same call, same
    bits."""
    layer = AOLConv2d(3, 5, kernel_size=3, stride=stride, padding=padding)
    x = torch.randn(2, 3, 9, 8)
    trained(layer, x).eval()
    with torch.no_grad():
        assert torch.equal(to_plain(layer)(x), layer(x))


# ---------------------------------------------------------------------------------------------
# the whole network
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalization", [None, "mean", "mean_std"])
def test_cpl_network_plain_output_equals_eval_output(normalization, device, dtype):
    model = xs_network(dtype, device, normalization)
    plain = to_plain(model)
    assert_plain(plain, model)
    assert not list(plain.buffers())  # the persistent vectors u are not carried over
    assert [name for name, _ in plain.named_children()] == [name for name, _ in model.named_children()]
    assert_same_outputs(model, plain, torch.rand(6, 3, 32, 32, device=device, dtype=dtype))


def test_torch_export_and_its_save_load_round_trip(tmp_path):
    model = xs_network(torch.float32, "cpu", "mean_std")
    x = torch.rand(3, 3, 32, 32)
    program = torch.export.export(to_plain(model), (x,))
    assert_same_outputs(model, program.module(), x)
    torch.export.save(program, tmp_path / "plain.pt2")
    loaded = torch.export.load(tmp_path / "plain.pt2")
    assert torch.equal(loaded.module()(x), program.module()(x))


def test_state_dict_round_trip_loses_nothing(tmp_path):
    """A plain state_dict loaded into the plain form of a fresh network of the same architecture (other
    weights, other input statistics) gives the same outputs, bit for bit."""
    model = xs_network(torch.float32, "cpu", "mean_std")
    plain = to_plain(model)
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    torch.manual_seed(1)
    fresh = to_plain(cpl_network("XS", mean=[0.1, 0.2, 0.3], std=[0.5, 0.6, 0.7]))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(fresh(x), plain(x))
        fresh.load_state_dict(torch.load(tmp_path / "plain.pt", weights_only=True))
        assert torch.equal(fresh(x), plain(x))
    assert_same_outputs(model, fresh, x)


def sll_aol_network(dtype=torch.float32, device="cpu", seed=0):
    """A network mixing the SLL and AOL convolutions, the down-sampling and the channel slice, on 3 x 16 x
    16 images, after two training steps."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        AOLConv2d(3, 16),
        SLLConv2d(16),
        InvertibleDownsampling(2),  # 64 x 8 x 8
        SLLConv2d(64, inner_channels=32),
        AOLConv2d(64, 32, kernel_size=2, stride=2, padding=0),  # 32 x 4 x 4
        ChannelSlice(16),
        nn.Flatten(),
        SLLLinear(256, inner_features=64),
        MaxMin(),
        FirstCoordinates(10),
    ).to(device=device, dtype=dtype)
    return trained(model, torch.rand(4, 3, 16, 16, device=device, dtype=dtype), steps=2)


def test_sll_aol_network_plain_output_equals_eval_output(device, dtype):
    model = sll_aol_network(dtype, device)
    plain = to_plain(model)
    assert_plain(plain, model)
    assert [type(m) for m in plain] == [
        nn.Conv2d,
        Residual,
        nn.PixelUnshuffle,
        Residual,
        nn.Conv2d,
        PlainChannelSlice,
        nn.Flatten,
        Residual,
        PlainMaxMin,
        PlainFirstCoordinates,
    ]
    assert_same_outputs(model, plain, torch.rand(5, 3, 16, 16, device=device, dtype=dtype))


def test_sll_aol_network_torch_export_and_state_dict_round_trip(tmp_path):
    model = sll_aol_network()
    plain = to_plain(model)
    x = torch.rand(3, 3, 16, 16)
    program = torch.export.export(plain, (x,))
    assert_same_outputs(model, program.module(), x)
    torch.export.save(program, tmp_path / "plain.pt2")
    assert torch.equal(torch.export.load(tmp_path / "plain.pt2").module()(x), program.module()(x))
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    fresh = to_plain(sll_aol_network(seed=1))
    with torch.no_grad():
        assert not torch.allclose(fresh(x), plain(x))
        fresh.load_state_dict(torch.load(tmp_path / "plain.pt", weights_only=True))
        assert torch.equal(fresh(x), plain(x))


def test_torch_jit_script():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated in favour of torch.export
        try:
            torch.jit.script(nn.Linear(2, 2))
        except Exception as error:  # pragma: no cover - a torch without TorchScript
            pytest.skip(f"this torch cannot script even nn.Linear: {error}")
        model = xs_network(torch.float64, "cpu", "mean_std")
        scripted = torch.jit.script(to_plain(model))
        scripted_maxmin = torch.jit.script(to_plain(nn.Sequential(MaxMin(), FirstCoordinates(3))))
        mixed = sll_aol_network(torch.float64)
        scripted_mixed = torch.jit.script(to_plain(mixed))
    assert_same_outputs(model, scripted, torch.rand(2, 3, 32, 32, dtype=torch.float64))
    assert_same_outputs(mixed, scripted_mixed, torch.rand(2, 3, 16, 16, dtype=torch.float64))
    x = torch.randn(4, 8, dtype=torch.float64)
    assert torch.equal(scripted_maxmin(x), nn.Sequential(MaxMin(), FirstCoordinates(3))(x))


# ---------------------------------------------------------------------------------------------
# the original, the containers, the protocol
# ---------------------------------------------------------------------------------------------
def test_original_is_unchanged():
    """Same state_dict (the power-mode vectors ``u`` advance while the norm is computed: restored) and
    the same mode in every submodule (here a mix of training and evaluation)."""
    torch.manual_seed(0)
    model = cpl_network((2, 1, 8, 32), eval_norm="power", mean=MEAN, std=STD)
    trained(model, torch.rand(2, 3, 32, 32), steps=1)
    model[3].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    plain = to_plain(model)
    assert [m.training for m in model.modules()] == modes
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert_same_outputs(model, plain, torch.rand(2, 3, 32, 32))


def test_sequential_keeps_child_names_and_nesting():
    model = nn.Sequential(
        OrderedDict(
            norm=InputNormalization(MEAN, STD),
            pad=ChannelPad(4),
            body=nn.Sequential(
                OrderedDict(cpl=ConvexPotentialConv2d(4, 2, input_size=5), pool=nn.Identity())
            ),
            flat=nn.Flatten(),
            head=FirstCoordinates(3),
        )
    )
    plain = to_plain(model)
    assert [n for n, _ in plain.named_modules()][:8] == [
        "",
        "norm",
        "pad",
        "body",
        "body.cpl",
        "body.cpl.branch",
        "body.cpl.branch.0",
        "body.cpl.branch.1",
    ]
    assert_same_outputs(model, plain, torch.rand(2, 3, 5, 5))


def test_plain_networks_convert_to_themselves():
    model = xs_network(torch.float64, "cpu", "mean")
    plain = to_plain(model)
    again = to_plain(plain)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(again(x), plain(x))


class Doubling(nn.Module):
    """``2 x``, with the extension protocol: ``to_plain()`` returns ``Linear(2 I)``."""

    def __init__(self, features):
        super().__init__()
        self.features, self.seen = features, None

    def forward(self, x):
        return 2 * x

    def to_plain(self):
        self.seen = (self.training, torch.is_grad_enabled())
        layer = nn.Linear(self.features, self.features, bias=False)
        layer.weight.copy_(2 * torch.eye(self.features))
        return layer


def test_to_plain_method_is_the_extension_protocol():
    layer = Doubling(4)
    model = nn.Sequential(nn.Linear(4, 4), layer).train()
    plain = to_plain(model)
    assert layer.seen == (False, False)  # called in evaluation mode, without gradients
    assert type(plain[1]) is nn.Linear
    assert_same_outputs(model, plain, torch.randn(3, 4))


class Scaled(ConvexPotentialLinear):
    """A subclass that changes the forward: converting it as its parent would be wrong."""

    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("module", [nn.Sequential(nn.Linear(3, 3), Scaled(3)), nn.ModuleList([Scaled(3)])])
def test_unknown_modules_raise_a_type_error_that_says_how_to_extend(module):
    with pytest.raises(TypeError, match=r"(Scaled|ModuleList).*to_plain\(self\) -> nn.Module"):
        to_plain(module)
