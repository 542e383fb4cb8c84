"""The self-checks of chapter 1's exercises: right answers pass, typical wrong ones fail with a hint
that does not give the answer away. References are independent (explicit matrices, closed forms)."""

import math

import torch
import torch.nn as nn

from cpl_mini.exercises import available, grade

DT = torch.float64


def _hint_hides(feedback, *numbers):
    for value in numbers:
        for digits in (2, 3, 4):
            assert f"{value:.{digits}f}" not in feedback.hint, (value, feedback.hint)


def test_chapter_1_has_three_self_checks_or_more():
    assert len(available(1)) >= 3


def test_1_1_zero_product_of_unit_norm_matrices():
    e1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=DT)
    e2 = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=DT)
    assert grade("1.1", (e1, e2)).ok
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=DT)
    assert grade("1.1", (rot @ e1, e1)).ok  # another right answer: W1 = e2 e1^T, W2 = e1 e1^T
    wrong_product = grade("1.1", (torch.eye(2, dtype=DT), torch.eye(2, dtype=DT)))  # W2 W1 = I
    assert not wrong_product.ok and "not 0" in wrong_product.hint
    wrong_norm = grade("1.1", (2 * e1, e2))  # product 0 but ||W1|| = 2
    assert not wrong_norm.ok and "norm 1" in wrong_norm.hint
    assert not grade("1.1", (e2, e1 + e2)).ok  # (e1 + e2) e2 = e2 != 0
    assert not grade("1.1", None).ok


def test_1_2_certified_radius_of_given_logits():
    radius = (2.0 - 1.2) / (math.sqrt(2) * 2.0)  # by hand: runner-up 1.2, L = 2
    assert grade("1.2", radius).ok
    forgot_sqrt2 = grade("1.2", (2.0 - 1.2) / 2.0)
    wrong_runner_up = grade("1.2", (2.0 - 0.5) / (math.sqrt(2) * 2.0))
    assert not forgot_sqrt2.ok and not wrong_runner_up.ok
    _hint_hides(forgot_sqrt2, radius)
    _hint_hides(wrong_runner_up, radius)


def test_1_3_distance_to_the_diagonal():
    d = 1.0 / math.sqrt(2)  # distance from (1, 0) to the line x1 = x2
    assert grade("1.3", d).ok
    margin_itself, other = grade("1.3", 1.0), grade("1.3", 0.5)
    assert not margin_itself.ok and not other.ok
    _hint_hides(margin_itself, d)
    _hint_hides(other, d)


def test_1_5_jacobian_of_a_relu_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    x = torch.tensor([[0.3, -0.2]], dtype=DT)
    lin = [m for m in net if isinstance(m, nn.Linear)]
    z1 = lin[0](x)
    z2 = lin[1](torch.relu(z1))
    d1, d2 = torch.diag((z1[0] > 0).to(DT)), torch.diag((z2[0] > 0).to(DT))
    assert (d1.diag() == 0).any() or (d2.diag() == 0).any()  # some unit is off: the masks matter
    jac = (lin[2].weight @ d2 @ lin[1].weight @ d1 @ lin[0].weight).detach()
    assert grade("1.5", jac, model=net, x=x).ok
    transposed = grade("1.5", jac.T, model=net, x=x)
    no_masks = grade("1.5", (lin[2].weight @ lin[1].weight @ lin[0].weight).detach(), model=net, x=x)
    assert not transposed.ok and "transpose" in transposed.hint
    assert not no_masks.ok
    assert not grade("1.5", None, model=net, x=x).ok
