r"""1-Lipschitz changes of the image size and of the number of channels.

* :class:`InvertibleDownsampling` (the "invertible down-sampling" of i-RevNet, Jacobsen et al. 2018,
  used by the SOC and SLL networks): each ``f x f`` block of pixels becomes ``f^2`` channels,

  .. math::  y_{c f^2 + i f + j,\; h,\; w} = x_{c,\; f h + i,\; f w + j}, \qquad
             (N, C, H, W) \to (N, C f^2, H / f, W / f),

  (``nn.PixelUnshuffle``). It moves coordinates without changing them: a permutation matrix, so
  orthogonal (``||y|| = ||x||``, all singular values 1, Lipschitz constant exactly 1), and its
  inverse is ``nn.PixelShuffle(f)``.
* :class:`ChannelSlice`: keep the first ``k`` channels, ``(N, C, H, W) -> (N, k, H, W)``,
  ``y = x_{:k}``; an orthogonal projection, Lipschitz constant 1 (``||y|| <= ||x||``).

Both have ``lipschitz_bound() = 1.0`` (read by :func:`cpl_mini.bounds.lipschitz_upper_bound`).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["InvertibleDownsampling", "ChannelSlice"]


class InvertibleDownsampling(nn.Module):
    r"""Space-to-channel down-sampling ``(N, C, H, W) -> (N, C f^2, H / f, W / f)``, an orthogonal map.

    ``y[:, c f^2 + i f + j, h, w] = x[:, c, f h + i, f w + j]`` for ``0 <= i, j < f`` (as
    ``nn.PixelUnshuffle(f)``); :meth:`inverse` (``nn.PixelShuffle(f)``) undoes it exactly.

    Args:
        factor: ``f >= 1``; ``H`` and ``W`` must be multiples of it.

    Shape: input ``(N, C, H, W)``, output ``(N, C f^2, H / f, W / f)``.
    """

    def __init__(self, factor: int = 2):
        super().__init__()
        if int(factor) != factor or factor < 1:
            raise ValueError(f"factor must be a positive integer, got {factor!r}")
        self.factor = int(factor)

    def _check_input(self, x):
        f = self.factor
        if x.dim() != 4:
            raise ValueError(
                f"InvertibleDownsampling expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}; "
                "add a batch dimension with x.unsqueeze(0) for a single image."
            )
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"InvertibleDownsampling({f}) needs H and W divisible by {f}, got {x.shape[2]}x{x.shape[3]}; "
                f"pad or crop the input to a multiple of {f} (F.pad) or choose a factor dividing H and W."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return F.pixel_unshuffle(x, self.factor)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``x`` from ``y = self(x)``: ``(N, C f^2, h, w) -> (N, C, f h, f w)`` (``nn.PixelShuffle``)."""
        if y.dim() != 4 or y.shape[1] % (self.factor**2):
            raise ValueError(
                f"InvertibleDownsampling({self.factor}).inverse expects (N, C*{self.factor**2}, h, w), "
                f"got {tuple(y.shape)}"
            )
        return F.pixel_shuffle(y, self.factor)

    def lipschitz_bound(self) -> float:
        """1: a permutation of the coordinates."""
        return 1.0

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class ChannelSlice(nn.Module):
    """Keep the first ``channels`` channels: ``(N, C, H, W) -> (N, channels, H, W)``, a projection.

    Args:
        channels: number of channels kept (``1 <= channels <= C``).
    """

    def __init__(self, channels: int):
        super().__init__()
        if int(channels) != channels or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        self.channels = int(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] < self.channels:
            raise ValueError(
                f"ChannelSlice({self.channels}) expects inputs (N, C, ...) with C >= {self.channels}, "
                f"got {tuple(x.shape)}; keep fewer channels or pad the input first (ChannelPad)."
            )
        return x[:, : self.channels]

    def lipschitz_bound(self) -> float:
        """1: a coordinate projection."""
        return 1.0

    def extra_repr(self) -> str:
        return str(self.channels)
