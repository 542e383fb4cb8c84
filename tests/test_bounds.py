"""cpl_mini.bounds: the network bound is the product of its parts' bounds, in evaluation mode only,
checked where the claims are sharp: parts with constants above 1 whose top directions line up."""

import doctest
import math

import pytest
import torch
import torch.nn as nn

import cpl_mini
import cpl_mini.bounds
from cpl_mini.bounds import lipschitz_upper_bound
from cpl_mini.layers import ConvexPotentialLinear, FirstCoordinates

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
