"""cpl_mini.models: the paper's sizes, the 1-Lipschitz certificate of the whole network."""
import pytest
import torch

from cpl_mini.layers import lipschitz_upper_bound
from cpl_mini.lipschitz import random_pairs_lower_bound
from cpl_mini.models import SIZES, count_parameters, cpl_network, describe


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
    bound = lipschitz_upper_bound(net[:-1] if head == "lln" else net)
    assert bound == pytest.approx(1.0, abs=1e-6)
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    lower = random_pairs_lower_bound(net[:-1] if head == "lln" else net, x, n_pairs=200)
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
