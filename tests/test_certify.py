"""cpl_mini.certify: the margin certificate against independent computations."""
import math

import pytest
import torch
import torch.nn as nn

from cpl_mini.certify import certified_accuracy, certified_radius, certified_radius_pairwise, network_lipschitz
from cpl_mini.layers import FirstCoordinates, RowNormalizedLinear
from cpl_mini.models import cpl_network


def test_certified_radius_formula():
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2, 0])
    r = certified_radius(logits, labels, lipschitz=2.0)
    assert r[0].item() == pytest.approx(2.0 / (math.sqrt(2) * 2.0))
    assert r[1].item() < 0  # misclassified: no certificate
    assert r[2].item() == 0  # tie: no certificate
    with pytest.raises(ValueError, match="logits"):
        certified_radius(logits[0], labels)


def test_radius_is_exact_distance_for_a_one_lipschitz_linear_map():
    """f(x) = Q x with Q having orthonormal rows: the certificate is a true lower bound of the distance
    to the decision boundary, and the pairwise certificate equals it exactly."""
    torch.manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))
    head = RowNormalizedLinear(6, 3, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(q.T)
    x = torch.randn(50, 6, dtype=torch.float64)
    logits = head(x)
    labels = logits.argmax(1)
    pairwise = certified_radius_pairwise(logits, labels, head.pairwise_lipschitz()).double()
    v = head.normalized_weight()
    # exact distance to the nearest boundary f_y = f_j: min_j (f_y - f_j) / ||v_y - v_j||
    exact = torch.tensor([min(((logits[i, labels[i]] - logits[i, j]) / (v[labels[i]] - v[j]).norm()).item()
                              for j in range(3) if j != labels[i]) for i in range(50)])
    assert torch.allclose(pairwise, exact.double(), rtol=1e-6)
    plain = certified_radius(logits, labels, lipschitz=1.0).double()
    # the generic sqrt(2) certificate never exceeds the exact distance (equal here: ||v_y - v_j|| = sqrt 2)
    assert (plain <= exact.double() * (1 + 1e-6)).all()
    assert torch.allclose(plain, exact.double(), rtol=1e-5)


def test_certified_accuracy_consistent_with_radii_and_normalisation():
    torch.manual_seed(0)
    net = cpl_network("XS").eval()
    x = torch.randn(64, 3, 32, 32)
    y = net(x).argmax(1)
    y[:10] = (y[:10] + 1) % 10  # some wrong labels
    res = certified_accuracy(net, (x, y), eps=(0.0, 0.01, 0.1), batch_size=16)
    radii = res["radii"]
    assert res["n"] == 64 and radii.shape == (64,)
    assert res["accuracy"] == pytest.approx((radii > 0).float().mean().item())
    assert res["certified"][0.01] == pytest.approx((radii > 0.01).float().mean().item())
    assert res["lipschitz"] == pytest.approx(1.0, abs=1e-6)
    # an input normalisation with Lipschitz constant 4 divides every radius by 4
    res4 = certified_accuracy(net, (x, y), eps=(0.01,), input_lipschitz=4.0)
    assert torch.allclose(res4["radii"], radii / 4, rtol=1e-5)
    assert net.training is False


def test_network_lipschitz_with_row_normalized_head():
    net = cpl_network("XS", head="lln").eval()
    lip, pairwise = network_lipschitz(net, input_lipschitz=2.0)
    assert lip == pytest.approx(2.0, abs=1e-5)
    assert pairwise.shape == (10, 10) and torch.allclose(pairwise.diagonal(), torch.zeros(10, dtype=torch.float64))
    with pytest.raises(TypeError):
        network_lipschitz(nn.Sequential(nn.Conv2d(3, 3, 3), FirstCoordinates(2)))
