"""Tests of cpl_mini.toy: the toy 2-D sets lie on their curves, are balanced and seeded."""

import numpy as np
import pytest
import torch

from cpl_mini.toy import make_circles, make_moons, make_spirals


@pytest.mark.parametrize("make", [make_moons, make_circles, make_spirals])
@pytest.mark.parametrize("n", [200, 201])
def test_toy_shapes_balance_seed(make, n):
    X, y = make(n, seed=1)
    assert X.shape == (n, 2) and X.dtype == torch.float32 and y.shape == (n,) and y.dtype == torch.int64
    counts = torch.bincount(y, minlength=2)
    assert counts.sum() == n and abs(int(counts[0]) - int(counts[1])) <= 1
    X2, y2 = make(n, seed=1)
    assert torch.equal(X, X2) and torch.equal(y, y2)
    assert not torch.equal(X, make(n, seed=2)[0])


def test_toy_curves_without_noise():
    X, y = make_moons(100, noise=0.0)
    X = X.double()
    a, b = X[y == 0], X[y == 1]
    one = torch.ones(50, dtype=torch.float64)
    assert torch.allclose(a.norm(dim=1), one, atol=1e-6) and (a[:, 1] >= -1e-6).all()
    c = b - torch.tensor([1.0, 0.5], dtype=torch.float64)
    assert torch.allclose(c.norm(dim=1), one, atol=1e-6) and (c[:, 1] <= 1e-6).all()

    X, y = make_circles(100, noise=0.0, factor=0.3)
    r = X.double().norm(dim=1)
    assert torch.allclose(r[y == 0], torch.ones(50, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(r[y == 1], torch.full((50,), 0.3, dtype=torch.float64), atol=1e-6)

    turns = 1.5
    X, y = make_spirals(100, noise=0.0, turns=turns)
    X = X.double()
    X = torch.where((y == 1)[:, None], -X, X)  # class 1 is class 0 turned by pi
    r = X.norm(dim=1)
    theta = 2 * np.pi * turns * r
    assert torch.allclose(X, torch.stack([r * theta.cos(), r * theta.sin()], 1), atol=1e-5)
