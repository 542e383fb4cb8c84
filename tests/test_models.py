"""cpl_mini.models: the paper's sizes, the 1-Lipschitz certificate of the whole network, the input
normalisation as its first layer, the memory layout."""

import pytest
import torch

from cpl_mini.layers import lipschitz_upper_bound
from cpl_mini.lipschitz import random_pairs_lower_bound
from cpl_mini.models import SIZES, count_parameters, cpl_network, describe, parse_size, use_channels_last
from cpl_mini.normalization import InputNormalization


def test_paper_sizes_and_parameter_count():
    assert SIZES["S"] == (20, 7, 45, 2048) and SIZES["XL"] == (70, 15, 120, 2048)
    # S: 7 dense layers 2048 x 2880 (+bias) and 20 conv layers 5 x 45 x 3 x 3 (+bias)
    expected = 7 * (2048 * 2880 + 2048) + 20 * (5 * 45 * 9 + 5)
    assert count_parameters(cpl_network("S")) == expected
    assert abs(expected / 1e6 - 41.3) < 0.1  # the S network has 41.3M parameters


@pytest.mark.parametrize("head", ["first", "lln"])
def test_network_is_one_lipschitz(head):
    torch.manual_seed(0)
    net = cpl_network((2, 2, 8, 32), num_classes=10, input_size=8, head=head).double().eval()
    body = net[:-1].eval() if head == "lln" else net  # a slice is a new container, in training mode
    bound = lipschitz_upper_bound(body)
    assert bound == pytest.approx(1.0, abs=1e-6)
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    lower = random_pairs_lower_bound(body, x, n_pairs=200)
    assert lower <= bound + 1e-9


def test_describe_and_errors():
    net = cpl_network("XS")
    rows = describe(net)
    assert rows[0][2] == (16, 32, 32) and rows[-1][2] == (10,)
    assert sum(r[3] for r in rows) == count_parameters(net)
    with pytest.raises(ValueError, match="unknown size"):
        cpl_network("XXL")
    with pytest.raises(ValueError, match="head"):
        cpl_network("XS", head="softmax")


@pytest.mark.parametrize(
    "size, expected",
    [
        ("S", ("S", (20, 7, 45, 2048))),
        ("xl", ("XL", (70, 15, 120, 2048))),
        ("20,7,45,2048", ("20,7,45,2048", (20, 7, 45, 2048))),
        (" ( 2, 0, 8, 32 ) ", ("2,0,8,32", (2, 0, 8, 32))),
        ("2X1x8x32", ("2,1,8,32", (2, 1, 8, 32))),
        ((2, 1, 8, 32), ("2,1,8,32", (2, 1, 8, 32))),
    ],
)
def test_parse_size_accepts_names_and_the_four_numbers(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize(
    "size",
    ["XXL", "2,1,8", "2,1,8,32,5", "2;1;8;32", "(2,1,8,32", "2,1x8,32", "-1,1,8,32", (2, 1, 8.0, 32), 7],
)
def test_parse_size_refuses_other_spellings_in_one_line(size):
    with pytest.raises(ValueError, match="unknown size") as err:
        parse_size(size)
    assert len(str(err.value).splitlines()) == 1 and "20x7x45x2048" in str(err.value)


def test_a_size_as_text_builds_the_same_network_as_the_tuple():
    torch.manual_seed(0)
    a = cpl_network("(2, 1, 8, 32)", input_size=8)
    torch.manual_seed(0)
    b = cpl_network((2, 1, 8, 32), input_size=8)
    assert a.config == b.config and a.config["size"] == "2,1,8,32"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert cpl_network("xs").config["size"] == "XS"


def test_input_normalization_is_the_first_layer_and_enters_the_bound():
    torch.manual_seed(0)
    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.2, 0.26])
    net = cpl_network((2, 2, 8, 32), input_size=8, mean=mean, std=std).eval()
    assert isinstance(net[0], InputNormalization) and net.config["input_normalization"] == "mean_std"
    plain = cpl_network((2, 2, 8, 32), input_size=8)
    shifted = {}  # the same weights, one layer earlier
    for key, value in net.state_dict().items():
        index, rest = key.split(".", 1)
        if index != "0":
            shifted[f"{int(index) - 1}.{rest}"] = value
    plain.load_state_dict(shifted)
    plain.eval()
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(net(x), plain((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)), atol=1e-6)
    # the whole network: 1 (CPL layers) x 1/min(std) (normalisation), rounded up
    stored = float(net[0].std.min())  # float32 0.2
    bound = lipschitz_upper_bound(net)
    assert bound == pytest.approx(1 / stored, rel=1e-6) and bound >= 1 / stored
    only_mean = cpl_network((2, 2, 8, 32), input_size=8, mean=mean).eval()
    assert only_mean.config["input_normalization"] == "mean"
    assert lipschitz_upper_bound(only_mean) == pytest.approx(1.0, abs=1e-6)
    assert plain.config["input_normalization"] is None and not isinstance(plain[0], InputNormalization)
    with pytest.raises(ValueError, match="std without mean"):
        cpl_network("XS", std=std)


@pytest.mark.parametrize(
    "setting, device, expected",
    [
        ("auto", "cpu", True),
        ("auto", "cuda", True),
        ("auto", "mps", False),
        ("on", "mps", True),
        ("off", "cpu", False),
        (True, "cpu", True),
        ("false", "cuda", False),
        (None, "cpu", True),
    ],
)
def test_use_channels_last(setting, device, expected):
    assert use_channels_last(setting, device) is expected


def test_use_channels_last_refuses_unknown_settings():
    with pytest.raises(ValueError, match="auto, on or off"):
        use_channels_last("sometimes", "cpu")
