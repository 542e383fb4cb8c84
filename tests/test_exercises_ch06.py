"""The self-checks of chapter 6's exercises: right answers pass, typical wrong ones fail with a hint
that does not give the answer away. References are independent of the checkers (SVDs, explicit
matrices of convolutions, closed forms)."""

import math

import torch
import torch.nn.functional as F

from cpl_mini.exercises import available, grade

DT = torch.float64


def test_chapter_6_has_three_self_checks_or_more():
    assert len(available(6)) >= 3


def test_6_1_norm_of_a_one_by_one_convolution():
    assert grade("6.1", lambda k: torch.linalg.svdvals(k[:, :, 0, 0])[0]).ok
    frobenius = grade("6.1", lambda k: torch.linalg.matrix_norm(k[:, :, 0, 0]).item())
    largest_entry = grade("6.1", lambda k: k.abs().max().item())
    assert not frobenius.ok and not largest_entry.ok
    for fb in (frobenius, largest_entry):
        assert "svdvals" not in fb.hint and "dense_spectral_norm" not in fb.hint and fb.hint
    assert not grade("6.1", lambda k: None).ok


def _flipped(kernel, p):
    # by hand: the adjoint is a cross-correlation with the spatially flipped, channel-swapped kernel
    return kernel.flip(2, 3).transpose(0, 1), kernel.shape[-1] - 1 - p


def test_6_2_adjoint_as_a_convolution():
    # the reference itself, against an explicit adjoint through autograd on one case
    kernel = torch.randn(3, 2, 5, 5, dtype=DT, generator=torch.Generator().manual_seed(0))
    y = torch.randn(1, 3, 6, 6, dtype=DT)
    x = torch.zeros(1, 2, 6, 6, dtype=DT, requires_grad=True)
    (adjoint,) = torch.autograd.grad((F.conv2d(x, kernel, padding=2) * y).sum(), x)
    k_t, pad = _flipped(kernel, 2)
    assert torch.allclose(F.conv2d(y, k_t, padding=pad), adjoint, atol=1e-12)

    assert grade("6.2", _flipped).ok
    no_flip = grade("6.2", lambda k, p: (k.transpose(0, 1), k.shape[-1] - 1 - p))
    same_padding = grade("6.2", lambda k, p: (k.flip(2, 3).transpose(0, 1), p))
    assert not no_flip.ok and not same_padding.ok
    for fb in (no_flip, same_padding):
        assert "k - 1 - p" not in fb.hint and "flip(2, 3)" not in fb.hint
    assert not grade("6.2", lambda k, p: k).ok  # not a pair
    assert not grade("6.2", lambda k, p: None).ok


def test_6_3_gram_steps_for_one_percent():
    # by hand: 45^(1/2^(t+1)) <= 1.01 needs 2^(t+1) >= ln 45 / ln 1.01 = 382.6..., so t = 8
    t = next(s for s in range(30) if 2 ** (s + 1) >= math.log(45) / math.log(1.01))
    assert t == 8
    assert grade("6.3", t).ok
    too_few, too_many = grade("6.3", t - 1), grade("6.3", t + 2)
    assert not too_few.ok and not too_many.ok
    for fb in (too_few, too_many):
        assert "8" not in fb.hint
    assert not grade("6.3", None).ok and not grade("6.3", 7.5).ok


def _explicit_norm(n):
    r = torch.tensor([1.0, -1.0, 1.0], dtype=DT)
    kernel = torch.outer(r, r)[None, None]
    eye = torch.eye(n * n, dtype=DT).reshape(-1, 1, n, n)
    matrix = F.conv2d(eye, kernel, padding=1).reshape(n * n, -1)
    return torch.linalg.svdvals(matrix)[0].item()


def test_6_5_closed_form_of_the_alternating_kernel():
    formula = lambda n: (1 + 2 * math.cos(math.pi / (n + 1))) ** 2  # noqa: E731
    for n in (2, 5, 9):
        assert math.isclose(formula(n), _explicit_norm(n), rel_tol=1e-12)
    assert grade("6.5", formula).ok
    symbol_max = grade("6.5", lambda n: 9.0)
    bigger_grid = grade("6.5", lambda n: (1 + 2 * math.cos(math.pi / (n + 2))) ** 2)
    not_squared = grade("6.5", lambda n: 1 + 2 * math.cos(math.pi / (n + 1)))
    assert not symbol_max.ok and not bigger_grid.ok and not not_squared.ok
    for fb in (symbol_max, bigger_grid, not_squared):
        assert "cos(" not in fb.hint and "pi / (n + 1)" not in fb.hint
