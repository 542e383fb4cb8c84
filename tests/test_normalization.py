"""cpl_mini.normalization: the input normalisation layer, its buffers and its exact, rounded-up bound."""

import math
from fractions import Fraction

import pytest
import torch

from cpl_mini.layers import lipschitz_upper_bound
from cpl_mini.normalization import InputNormalization


def test_forward_is_the_per_channel_formula_and_keeps_the_layout():
    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])
    layer = InputNormalization(mean, std)
    assert layer.mean.shape == (1, 3, 1, 1) and layer.std.shape == (1, 3, 1, 1)
    x = torch.rand(4, 3, 5, 6)
    expected = torch.stack([(x[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)
    assert torch.allclose(layer(x), expected, rtol=1e-6, atol=1e-7)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert layer(cl).is_contiguous(memory_format=torch.channels_last)
    only_mean = InputNormalization(mean)
    assert only_mean.std is None and torch.allclose(only_mean(x), x - mean.view(1, 3, 1, 1))


def test_statistics_travel_in_the_state_dict():
    a = InputNormalization(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.6, 0.7]))
    b = InputNormalization(torch.zeros(3), torch.ones(3))
    assert set(a.state_dict()) == {"mean", "std"}
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(a(x), b(x))
    assert set(InputNormalization(torch.zeros(3)).state_dict()) == {"mean"}


def test_bound_is_the_operator_norm_of_the_map():
    """The Jacobian (a diagonal matrix) computed in float64 on a small picture: its largest singular value."""
    std = torch.tensor([0.3, 0.2, 0.7], dtype=torch.float64)
    layer = InputNormalization(torch.tensor([0.5, 0.1, 0.2], dtype=torch.float64), std)
    jac = torch.autograd.functional.jacobian(
        lambda v: layer(v.view(1, 3, 2, 2)).flatten(), torch.rand(12, dtype=torch.float64)
    )
    exact = torch.linalg.matrix_norm(jac, ord=2).item()
    assert layer.lipschitz_bound() >= exact and layer.lipschitz_bound() == pytest.approx(exact, rel=1e-15)
    assert lipschitz_upper_bound(torch.nn.Sequential(layer).eval()) == layer.lipschitz_bound()
    assert InputNormalization(torch.zeros(3)).lipschitz_bound() == 1.0


def test_bound_is_rounded_up_never_down_and_is_the_tightest_such_float():
    g = torch.Generator().manual_seed(0)
    stds = (torch.rand(200, generator=g) * 0.5 + 0.05).tolist() + [0.2470, 0.2435, 0.2616, 0.5, 0.25]
    rounded_down = 0
    for s in stds:
        layer = InputNormalization(torch.zeros(3), torch.tensor([1.0, s, 2.0]))
        stored = Fraction(float(layer.std.min()))  # the float32 value the layer divides by
        bound = layer.lipschitz_bound()
        assert Fraction(bound) >= 1 / stored, s
        assert Fraction(math.nextafter(bound, 0.0)) < 1 / stored, s  # nothing smaller would do
        rounded_down += Fraction(1.0 / float(stored)) < 1 / stored
    assert rounded_down > 0  # plain division rounds some of these down: the test can tell


@pytest.mark.parametrize(
    "mean, std, match",
    [
        (torch.zeros(3), torch.tensor([0.2, 0.0, 0.3]), "positive"),
        (torch.zeros(3), torch.tensor([0.2, 0.3]), "channels"),
        (torch.tensor([0.0, float("nan"), 0.0]), None, "finite"),
    ],
)
def test_bad_statistics_are_refused(mean, std, match):
    with pytest.raises(ValueError, match=match):
        InputNormalization(mean, std)


def test_wrong_number_of_channels_is_refused():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        InputNormalization(torch.zeros(3))(torch.rand(2, 4, 5, 5))
