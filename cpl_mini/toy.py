"""Toy 2-D data sets for the chapters' pictures: two moons, two circles, two spirals.

Each returns ``X`` float32 ``(n, 2)`` and balanced labels ``y`` int64 ``(n,)`` (``ceil(n/2)`` zeros,
``floor(n/2)`` ones), shuffled; the points are exact curves (computed in float64) plus Gaussian noise of
std ``noise``, all draws from ``seed``.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

__all__ = ["make_moons", "make_circles", "make_spirals"]


def _split_counts(n: int) -> Tuple[int, int]:
    if n < 2:
        raise ValueError(f"need n >= 2 points (one per class), got {n}")
    return n - n // 2, n // 2


def _finish(X0, X1, noise: float, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    X = torch.cat([X0, X1]).to(torch.float64)
    y = torch.cat([torch.zeros(len(X0), dtype=torch.int64), torch.ones(len(X1), dtype=torch.int64)])
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if noise:
        X = X + noise * torch.randn(X.shape, generator=g, dtype=torch.float64)
    perm = torch.randperm(len(y), generator=g)
    return X[perm].to(torch.float32), y[perm]


def make_moons(n: int, noise: float = 0.1, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved half circles.

    Class 0: ``(cos t, sin t)``, class 1: ``(1 - cos t, 1/2 - sin t)``, ``t`` evenly spaced in
    ``[0, pi]``, plus Gaussian noise of std ``noise``; shuffled.

    Returns:
        ``X`` float32 ``(n, 2)``, ``y`` int64 ``(n,)`` with ``ceil(n/2)`` zeros and ``floor(n/2)`` ones.
    """
    n0, n1 = _split_counts(n)
    g = torch.Generator().manual_seed(int(seed))
    t0 = torch.linspace(0, math.pi, n0, dtype=torch.float64)
    t1 = torch.linspace(0, math.pi, n1, dtype=torch.float64)
    X0 = torch.stack([t0.cos(), t0.sin()], 1)
    X1 = torch.stack([1 - t1.cos(), 0.5 - t1.sin()], 1)
    return _finish(X0, X1, noise, g)


def make_circles(
    n: int, noise: float = 0.05, factor: float = 0.5, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two concentric circles: class 0 of radius 1, class 1 of radius ``factor`` (``0 < factor < 1``).

    Angles evenly spaced in ``[0, 2 pi)``, Gaussian noise of std ``noise``; shuffled.

    Returns:
        ``X`` float32 ``(n, 2)``, ``y`` int64 ``(n,)`` (balanced).
    """
    if not 0 < factor < 1:
        raise ValueError(f"factor must be in (0, 1), got {factor}")
    n0, n1 = _split_counts(n)
    g = torch.Generator().manual_seed(int(seed))
    a0 = torch.arange(n0, dtype=torch.float64) * (2 * math.pi / n0)
    a1 = torch.arange(n1, dtype=torch.float64) * (2 * math.pi / n1)
    X0 = torch.stack([a0.cos(), a0.sin()], 1)
    X1 = factor * torch.stack([a1.cos(), a1.sin()], 1)
    return _finish(X0, X1, noise, g)


def make_spirals(
    n: int, noise: float = 0.1, turns: float = 1.5, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved Archimedean spirals.

    Class 0: ``r (cos theta, sin theta)`` with ``r`` evenly spaced in ``[0.1, 1]`` and
    ``theta = 2 pi turns r``; class 1 is class 0 turned by ``pi`` (``-x``). Gaussian noise of std
    ``noise`` (relative to the outer radius 1); shuffled.

    Returns:
        ``X`` float32 ``(n, 2)``, ``y`` int64 ``(n,)`` (balanced).
    """
    n0, n1 = _split_counts(n)
    g = torch.Generator().manual_seed(int(seed))

    def arm(m):
        r = torch.linspace(0.1, 1.0, m, dtype=torch.float64)
        th = 2 * math.pi * turns * r
        return torch.stack([r * th.cos(), r * th.sin()], 1)

    return _finish(arm(n0), -arm(n1), noise, g)
