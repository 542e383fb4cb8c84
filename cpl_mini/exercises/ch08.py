"""Self-checks for the exercises of chapter 8 (training a 1-Lipschitz network on CIFAR-10).

Each checker computes its reference with the package (``certified_radius``, ``channel_stats`` and
``InputNormalization``, ``lr_at``, ``SIZES``, ``count_parameters`` of ``cpl_network``) and compares the
student's answer with a tolerance; its hint says where to look, never what the answer is.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .checking import as_number, is_close, register

__all__ = [
    "check_8_1",
    "check_8_2",
    "check_8_3",
    "check_8_4",
    "check_8_5",
    "cost_model_8_4",
    "MARGIN",
    "BATCH",
]

#: The margin of the hinge loss (Exercise 8.1) and the batch size of the cost model (Exercise 8.4).
MARGIN = 0.7
BATCH = 256


# ----------------------------------------------------------------------------- Exercise 8.1
@register("8.1")
def check_8_1(answer: Any) -> tuple[bool, str]:
    """The certified radius that zero hinge loss (margin ``m = 0.7``) guarantees a 1-Lipschitz net."""
    from ..certify import certified_radius

    value, hint = as_number(answer, "a radius in pixel units")
    if value is None:
        return False, hint
    # zero loss: every competing logit is at least m below the true one; the worst case is a gap of m
    logits = torch.tensor([[MARGIN, 0.0, 0.0]], dtype=torch.float64)
    reference = float(certified_radius(logits, torch.tensor([0]), 1.0))
    if is_close(value, reference):
        return True, ""
    if is_close(value, MARGIN):
        return False, "that is the margin itself: a margin is not yet a radius (the certificate of chapter 1)"
    if is_close(value, MARGIN * math.sqrt(2)) or is_close(value, MARGIN / 2):
        return False, "check the constant: which Lipschitz constant does the difference of two logits have?"
    return False, "zero loss bounds every logit gap from below; turn that margin into a radius"


# ----------------------------------------------------------------------------- Exercise 8.2
@register("8.2")
def check_8_2(answer: Any, images: torch.Tensor | None = None) -> tuple[bool, str]:
    """The Lipschitz constant of ``x -> (x - mean) / std`` with the statistics of ``images`` (uint8)."""
    from ..loader import channel_stats
    from ..normalization import InputNormalization

    if images is None:
        raise ValueError("pass the pictures the statistics come from: check('8.2', answer, images=...)")
    value, hint = as_number(answer, "a Lipschitz constant")
    if value is None:
        return False, hint
    mean, std = channel_stats(images)
    reference = InputNormalization(mean, std).lipschitz_bound()
    if is_close(value, reference):
        return True, ""
    if any(is_close(value, v) for v in (1 / float(std.max()), 1 / float(std.mean()))):
        return False, "a diagonal map stretches most along its largest entry: which channel is that?"
    if any(is_close(value, v) for v in (float(std.min()), float(std.max()))):
        return False, "dividing by a number below 1 stretches: the constant is above 1"
    if is_close(value, 1.0):
        return False, "subtracting the mean is an isometry, but dividing by the std is not"
    return False, "compute the per-channel std on the [0, 1] scale (channel_stats), then the map's constant"


# ----------------------------------------------------------------------------- Exercise 8.3
@register("8.3")
def check_8_3(answer: Any, peak: float = 1e-3) -> tuple[bool, str]:
    """The learning rate of the piecewise-linear schedule at 60 % of training (peak ``peak``)."""
    from ..train import lr_at

    value, hint = as_number(answer, "a learning rate")
    if value is None:
        return False, hint
    total = 10_000
    reference = lr_at(0.6 * total - 0.5, total, peak)  # lr_at evaluates the middle of a step
    if is_close(value, reference, rel=1e-2):
        return True, ""
    if any(is_close(value, v, rel=1e-2) for v in (peak, peak / 20, 0.0)):
        return False, "at 60 % the schedule is between two of its corners: interpolate"
    return False, "the corners are at 0, 2/5, 4/5 and 1 of training, with values 0, lr, lr/20 and 0"


# ----------------------------------------------------------------------------- Exercise 8.4
def cost_model_8_4(size: str = "S", batch: int = BATCH) -> tuple[int, int]:
    """Multiply-adds of one forward pass of one conv CPL layer and of one dense CPL layer of ``size``.

    A conv CPL layer: ``conv2d`` C -> 5 channels (3 x 3 kernel) on 32 x 32 and its adjoint
    ``conv_transpose2d``: ``2 * batch * 32^2 * C * 5 * 9``. A dense CPL layer on ``64 C`` features with
    inner width ``F``: ``W x`` and ``W^T y``: ``2 * batch * 64 C * F``. (Biases and ReLU are not counted.)
    """
    from ..models import SIZES

    _, _, channels, features = SIZES[size]
    conv = 2 * batch * 32 * 32 * channels * 5 * 3 * 3
    dense = 2 * batch * (64 * channels) * features
    return conv, dense


@register("8.4")
def check_8_4(answer: Any) -> tuple[bool, str]:
    """``(conv, dense)``: multiply-adds of one conv CPL layer and one dense CPL layer of S, batch 256."""
    if answer is None:
        return False, "replace None by a pair (conv multiply-adds, dense multiply-adds)"
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        return False, "the answer is a pair (conv multiply-adds, dense multiply-adds)"
    values = []
    for item, what in zip(answer, ("conv", "dense")):
        value, hint = as_number(item, f"the {what} multiply-adds")
        if value is None:
            return False, hint
        values.append(value)
    conv, dense = cost_model_8_4()
    ok_conv, ok_dense = is_close(values[0], conv, 1e-2), is_close(values[1], dense, 1e-2)
    if ok_conv and ok_dense:
        return True, ""
    if is_close(values[0], dense, 1e-2) and is_close(values[1], conv, 1e-2):
        return False, "the two numbers are swapped: conv layer first"
    wrong = "conv" if not ok_conv else "dense"
    ref, got = (conv, values[0]) if not ok_conv else (dense, values[1])
    if is_close(got, ref / 2, 1e-2):
        return False, f"the {wrong} count is half of it: a CPL layer applies its operator and its adjoint"
    if is_close(got, ref / BATCH, 1e-2):
        return False, f"the {wrong} count is for one picture: the batch has {BATCH}"
    return False, f"the {wrong} count is off: count the multiply-adds of each output value, then the outputs"


# ----------------------------------------------------------------------------- Exercise 8.5
@register("8.5")
def check_8_5(answer: Any) -> tuple[bool, str]:
    """A function ``(depth, depth_linear, channels, features) -> parameters`` of ``cpl_network``."""
    from ..models import SIZES, count_parameters, cpl_network

    if answer is None:
        return False, "replace None by your function n_params(depth, depth_linear, channels, features)"
    if not callable(answer):
        return False, f"the answer should be a function, got {type(answer).__name__}"
    func: Callable[..., Any] = answer
    cases = list(SIZES.values()) + [(1, 1, 4, 3), (3, 0, 16, 64), (0, 2, 8, 100)]
    for sizes in cases:
        # the reference: the package's network, built on the meta device (no memory, no init cost)
        reference = count_parameters(cpl_network(tuple(sizes), device="meta"))
        got = func(*sizes)
        if got is None:
            return False, "your function returned None: return the number of parameters"
        if isinstance(got, torch.Tensor):
            got = got.item()
        if got != reference:
            depth, depth_linear, channels, features = sizes
            return False, (
                f"wrong for depth={depth}, depth_linear={depth_linear}, channels={channels}, "
                f"features={features}: count the weight AND the bias of each layer, and the "
                "input size of the dense layers after pooling"
            )
    return True, ""
