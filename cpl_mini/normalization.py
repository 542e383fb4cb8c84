r"""Input normalisation as the first layer of a network, with its exact Lipschitz constant.

The map from pixels ``u`` (in ``[0, 1]``) to the network's input is

.. math::  x_c = \frac{u_c - m_c}{s_c} \qquad (c = 1, \dots, C),

a translation followed by the diagonal matrix ``diag(1 / s_c)`` (each channel's value repeated over
the ``H x W`` positions). Its l2 Lipschitz constant is the largest diagonal entry, ``1 / min_c s_c``;
without division (``std=None``) it is an isometry, constant 1.

Keeping the statistics in the model (as buffers, so they travel in its ``state_dict``) means that a
trained network always sees inputs normalised as in training, whatever copy of the data set is present
when it is loaded again, and that a certificate computed by
:func:`~cpl_mini.layers.lipschitz_upper_bound` includes the normalisation: the certified radius is
then measured in pixel space.
"""

import math
from fractions import Fraction

import torch
import torch.nn as nn

__all__ = ["InputNormalization"]


def _channel_buffer(value, what: str) -> torch.Tensor:
    t = torch.as_tensor(value)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    t = t.detach().clone().reshape(-1)
    if t.numel() < 1:
        raise ValueError(f"{what} needs one value per channel, got an empty tensor")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} must be finite, got {t.tolist()}")
    return t.reshape(1, -1, 1, 1)


def _reciprocal_rounded_up(s: float) -> float:
    """The smallest float64 ``>= 1 / s`` (exact rational comparison): an upper bound never rounded down."""
    q = 1.0 / s
    if Fraction(q) * Fraction(s) < 1:
        q = math.nextafter(q, math.inf)
    return q


class InputNormalization(nn.Module):
    r"""``(x - mean) / std`` per channel on ``(N, C, H, W)`` inputs; Lipschitz constant ``1 / min(std)``.

    Args:
        mean: per-channel mean, ``C`` values (any shape with ``C`` elements), on the input's scale.
        std: per-channel divisor, ``C`` positive values, or ``None`` to subtract the mean only.

    Buffers ``mean`` and ``std`` have shape ``(1, C, 1, 1)`` (``std`` is absent when ``None``). The
    output keeps the input's shape, dtype and memory format (channels-last stays channels-last).
    """

    def __init__(self, mean, std=None):
        super().__init__()
        mean = _channel_buffer(mean, "mean")
        self.register_buffer("mean", mean)
        if std is not None:
            std = _channel_buffer(std, "std").to(mean.dtype)
            if std.numel() != mean.numel():
                raise ValueError(f"mean has {mean.numel()} channels but std has {std.numel()}")
            if not bool((std > 0).all()):
                raise ValueError(f"std must be positive, got {std.flatten().tolist()}")
            self.register_buffer("std", std)
        else:
            self.std = None

    @property
    def channels(self) -> int:
        return self.mean.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"InputNormalization expects (N, {self.channels}, H, W), got {tuple(x.shape)}")
        x = x - self.mean.to(x.dtype)
        if self.std is not None:
            x = x / self.std.to(x.dtype)
        return x

    def lipschitz_bound(self) -> float:
        """``1 / min(std)`` as a float64 rounded up (never below the exact value); 1 without division."""
        if self.std is None:
            return 1.0
        s = float(self.std.detach().double().min())  # exact: float32 -> float64 loses nothing
        return _reciprocal_rounded_up(s)

    def extra_repr(self) -> str:
        fmt = lambda t: "[" + ", ".join(f"{v:.4f}" for v in t.flatten().tolist()) + "]"  # noqa: E731
        return f"mean={fmt(self.mean)}" + (f", std={fmt(self.std)}" if self.std is not None else "")
