"""The self-checks of chapter 8's exercises: right answers pass, typical wrong ones fail with a hint
that does not give the answer away. References are computed by hand (closed forms, explicit counts)."""

import math

import torch

from cpl_mini.exercises import available, grade


def _hint_hides(feedback, *numbers):
    for value in numbers:
        for digits in (2, 3, 4):
            assert f"{value:.{digits}f}" not in feedback.hint, (value, feedback.hint)
        assert f"{value:.3g}" not in feedback.hint, (value, feedback.hint)


def test_chapter_8_has_three_self_checks_or_more():
    assert len(available(8)) >= 3


def test_8_1_radius_of_a_zero_loss_point():
    radius = 0.7 / math.sqrt(2)  # every gap >= m = 0.7, and f_y - f_j is sqrt(2)-Lipschitz
    assert grade("8.1", radius).ok
    assert grade("8.1", torch.tensor(radius)).ok
    margin_itself = grade("8.1", 0.7)
    times_sqrt2 = grade("8.1", 0.7 * math.sqrt(2))
    other = grade("8.1", 36 / 255)
    assert not margin_itself.ok and "margin itself" in margin_itself.hint
    assert not times_sqrt2.ok and not other.ok
    for feedback in (margin_itself, times_sqrt2, other):
        _hint_hides(feedback, radius)
    assert not grade("8.1", None).ok and not grade("8.1", "0.49").ok


def _two_valued_images():
    """uint8 pictures (4, 3, 2, 2): channel c is 0 on half the pictures and a_c on the others, so its
    std on the [0, 1] scale is a_c / 510: 0.5, 0.2 and 0.1 for a = (255, 102, 51)."""
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    for c, a in enumerate((255, 102, 51)):
        images[:2, c] = a
    return images


def test_8_2_lipschitz_constant_of_the_normalisation():
    images = _two_valued_images()
    constant = 1 / 0.1  # 1 / min_c std_c
    assert grade("8.2", constant, images=images).ok
    largest_std = grade("8.2", 1 / 0.5, images=images)
    min_std = grade("8.2", 0.1, images=images)
    isometry = grade("8.2", 1.0, images=images)
    assert not largest_std.ok and "largest entry" in largest_std.hint
    assert not min_std.ok and not isometry.ok
    for feedback in (largest_std, min_std, isometry):
        _hint_hides(feedback, constant)


def test_8_3_learning_rate_at_three_fifths():
    lr = 1e-3 + (0.6 - 0.4) / (0.8 - 0.4) * (1e-3 / 20 - 1e-3)  # between the corners (2/5, lr), (4/5, lr/20)
    assert abs(lr - 5.25e-4) < 1e-12
    assert grade("8.3", lr).ok
    for wrong in (1e-3, 5e-5, 5e-4, 0.0):
        feedback = grade("8.3", wrong)
        assert not feedback.ok
        _hint_hides(feedback, lr)


def test_8_4_multiply_adds_of_the_layers_of_s():
    conv = 2 * 256 * 32 * 32 * 45 * 5 * 9  # conv2d 45 -> 5 channels, 3 x 3, and its adjoint
    dense = 2 * 256 * 2880 * 2048  # W x and W^T y, W of shape (2048, 2880)
    assert grade("8.4", (conv, dense)).ok
    assert grade("8.4", (1.06e9, 3.02e9)).ok  # rounded is fine
    swapped = grade("8.4", (dense, conv))
    half = grade("8.4", (conv / 2, dense))
    one_picture = grade("8.4", (conv, dense / 256))
    assert not swapped.ok and "swapped" in swapped.hint
    assert not half.ok and "adjoint" in half.hint
    assert not one_picture.ok and "batch" in one_picture.hint
    assert not grade("8.4", conv).ok and not grade("8.4", None).ok


def test_8_5_parameter_count_function():
    def n_params(depth, depth_linear, channels, features):
        conv = 5 * channels * 3 * 3 + 5  # kernel (5, C, 3, 3) and bias (5,)
        dense = features * 64 * channels + features  # weight (F, 64 C) and bias (F,)
        return depth * conv + depth_linear * dense

    assert n_params(8, 3, 32, 1024) == 6_306_088  # the book's CPU network, as chapter 8 prints it
    assert grade("8.5", n_params).ok
    no_bias = grade("8.5", lambda d, dl, c, f: d * 45 * c + dl * f * 64 * c)
    unpooled = grade("8.5", lambda d, dl, c, f: d * (45 * c + 5) + dl * (f * c + f))
    assert not no_bias.ok and not unpooled.ok
    assert not grade("8.5", 6_306_088).ok and not grade("8.5", None).ok
