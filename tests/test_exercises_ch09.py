"""The self-checks of chapter 9's exercises: right answers pass, typical wrong ones fail with a hint
that does not give the answer away. References: brute force over a fine grid, power iteration by hand
on explicit matrices, explicit counts."""

import torch

from cpl_mini.exercises import available, grade

DT = torch.float64


def _hint_hides(feedback, *numbers):
    for value in numbers:
        for digits in (2, 3, 4):
            assert f"{value:.{digits}f}" not in feedback.hint, (value, feedback.hint)


def test_chapter_9_has_three_self_checks_or_more():
    assert len(available(9)) >= 3


def _half_by_grid(radii):
    """The first radius of a grid of step 5e-5 where the certified accuracy is <= half the clean one."""
    grid = torch.linspace(0, 1, 20_001, dtype=DT)
    clean = (radii > 0).double().mean()
    curve = (radii[None, :] > grid[:, None]).double().mean(1)
    return float(grid[(curve <= clean / 2).nonzero()[0, 0]])


def test_9_1_radius_of_half_the_clean_accuracy():
    radii = torch.tensor([-0.1, 0.05, 0.1, 0.2, 0.3, 0.4, -0.2], dtype=DT)
    # 5 correct pictures: at most 2.5 of them, i.e. 2, may stay certified; radii > t counts 2 from t = 0.2
    assert abs(_half_by_grid(radii) - 0.2) < 1e-4
    assert grade("9.1", 0.2, radii=radii).ok
    assert grade("9.1", 0.2 + 0.5 / 255, radii=radii.float()).ok
    in_255 = grade("9.1", 0.2 * 255, radii=radii)
    all_pictures = grade("9.1", float(radii.median()), radii=radii)  # 0.1: the median of all 7
    too_small, too_large = grade("9.1", 0.05, radii=radii), grade("9.1", 0.35, radii=radii)
    assert not in_255.ok and "pixel units" in in_255.hint
    assert not all_pictures.ok and "misclassified" in all_pictures.hint
    assert not too_small.ok and "still above" in too_small.hint
    assert not too_large.ok and "already below" in too_large.hint
    for feedback in (in_255, all_pictures, too_small, too_large):
        _hint_hides(feedback, 0.2)


def test_9_1_agrees_with_a_grid_search_on_many_radii():
    gen = torch.Generator().manual_seed(0)
    radii = torch.randn(3001, generator=gen, dtype=DT).abs() * 0.3 - 0.1
    reference = _half_by_grid(radii)
    assert grade("9.1", reference, radii=radii).ok
    assert not grade("9.1", reference + 3 / 255, radii=radii).ok
    assert not grade("9.1", None, radii=radii).ok


def _explicit_iterations(w, x0, tol=1.01):
    """Power iteration by hand in float64 on the explicit matrix W^T W: the first k with
    max(1, 2 sigma^2 / s_k^2 - 1) <= tol, sigma the exact largest singular value; also s_{k-1}, s_k."""
    w, x = w.double(), x0.double().reshape(-1)
    sigma = float(torch.linalg.matrix_norm(w, 2))
    x, previous = x / x.norm(), None
    for k in range(1, 10_000):
        x = w.T @ (w @ x)
        x = x / x.norm()
        s = float((w @ x).norm())
        if max(1.0, 2 * sigma**2 / s**2 - 1) <= tol:
            return k, previous, s, sigma
        previous = s
    raise AssertionError("no convergence")


def _dense_layer():
    from cpl_mini import ConvexPotentialLinear

    q1, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=DT))
    q2, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=DT))
    w = q1 @ torch.diag(torch.tensor([1.0, 0.97, 0.5], dtype=DT)) @ q2[:3]  # singular values 1, 0.97, 0.5
    layer = ConvexPotentialLinear(4, 3).eval()
    with torch.no_grad():
        layer.weight.copy_(w)
    start = (q2[1] + 0.05 * q2[0]).float()[None]  # mostly along the second singular vector: slow start
    return layer, w, start


def test_9_3_power_iterations_to_a_guaranteed_constant():
    layer, w, start = _dense_layer()
    k, before, after, sigma = _explicit_iterations(w, start)
    assert k > 5  # a start that needs several iterations
    # the threshold is crossed clearly, far from float32 rounding: s_{k-1} is too small, s_k is enough
    assert 2 * sigma**2 / before**2 - 1 > 1.01 + 1e-4 and 2 * sigma**2 / after**2 - 1 < 1.01 - 1e-6
    assert grade("9.3", k, layer=layer, start=start).ok
    too_few = grade("9.3", k - 3, layer=layer, start=start)
    too_many = grade("9.3", k + 3, layer=layer, start=start)
    assert not too_few.ok and "too few" in too_few.hint
    assert not too_many.ok and "too many" in too_many.hint
    assert not grade("9.3", None, layer=layer, start=start).ok
    for feedback in (too_few, too_many):
        assert str(k) not in feedback.hint.split()


def test_9_3_counts_the_iterations_of_power_estimate():
    from cpl_mini import ConvexPotentialLinear
    from cpl_mini.exercises.ch09 import iterations_needed, normalised_layer_lipschitz

    torch.manual_seed(0)
    layer = ConvexPotentialLinear(40, 30).eval()
    start = torch.randn(layer.u.shape, generator=torch.Generator().manual_seed(3))
    k = iterations_needed(layer, start)
    upper = float(layer.sound_spectral_norm())
    # what a student computes with the public estimate, one call per number of iterations
    before, at = (
        normalised_layer_lipschitz(upper, float(layer.power_estimate(n, start))) for n in (k - 1, k)
    )
    assert before > 1.01 >= at
    assert grade("9.3", k, layer=layer, start=start).ok


def test_9_4_certified_accuracy_with_a_looser_bound():
    eps = 36 / 255
    radii = torch.tensor([-0.3, 0.1, 0.2, 0.3, 0.5, 0.05, 0.15, 0.29], dtype=DT)
    # with the bound doubled every radius halves: certified at eps iff radius > 2 eps = 0.282...
    expected = 3 / 8  # 0.3, 0.5 and 0.29
    assert grade("9.4", expected, radii=radii, lipschitz=1.0, new_bound=2.0).ok
    assert grade("9.4", 0.375, radii=radii * 1.5, lipschitz=1 / 1.5, new_bound=2.0).ok
    bounds = {"radii": radii, "lipschitz": 1.0, "new_bound": 2.0}
    original = grade("9.4", float((radii > eps).double().mean()), **bounds)
    percent = grade("9.4", 100 * expected, **bounds)
    inverted = grade("9.4", float((radii * 2 > eps).double().mean()), **bounds)
    assert not original.ok and "original bound" in original.hint
    assert not percent.ok and "percentage" in percent.hint
    assert not inverted.ok and "smaller, not larger" in inverted.hint
    for feedback in (original, percent, inverted):
        _hint_hides(feedback, expected)
