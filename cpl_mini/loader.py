"""A device-resident loader for uint8 image sets (CIFAR), augmentation done on the device in batch.

:class:`DeviceLoader` keeps a whole uint8 split on the training device (150 MB for CIFAR-10 train) and
builds each batch there, augmentation included, with a few indexing kernels instead of a worker pool:

.. math::  x = (u / 255 - \\mu) \\oslash \\sigma ,

with ``u`` the uint8 picture, ``mu`` the per-channel mean and ``sigma`` the per-channel std (only when
asked for; otherwise ``sigma = 1``), both from :func:`channel_stats`. Dividing by ``sigma`` multiplies the
Lipschitz constant of "normalise, then network" by ``1 / min(sigma)``: :attr:`DeviceLoader.lipschitz_factor`.
:func:`cifar_loaders` builds the train/test pair of a :class:`~cpl_mini.cifar.CifarData`; with
``normalize=False`` it yields the raw pixels ``u / 255`` in ``[0, 1]``, for a model that normalises its
input itself.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import numpy as np
import torch

from .cifar import CifarData

__all__ = ["DeviceLoader", "EpochPlan", "channel_stats", "cifar_loaders"]


class EpochPlan(NamedTuple):
    """The random draws of one epoch (CPU tensors, indexed by position in the epoch).

    ``order[p]`` is the example seen at position ``p``; ``dy[p]``, ``dx[p]`` in ``[0, 2 * padding]`` the
    top-left corner of its crop inside the reflect-padded picture; ``flip[p]`` whether the crop is then
    mirrored left-right. ``dy``, ``dx``, ``flip`` are ``None`` without augmentation.
    """

    order: torch.Tensor
    dy: Optional[torch.Tensor]
    dx: Optional[torch.Tensor]
    flip: Optional[torch.Tensor]


def channel_stats(images) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of a uint8 image set on the ``[0, 1]`` scale.

    .. math::  \\mu_c = \\frac{1}{NHW} \\sum_{n,h,w} \\frac{u_{nchw}}{255}, \\qquad
               \\sigma_c^2 = \\frac{1}{NHW} \\sum_{n,h,w} \\Big(\\frac{u_{nchw}}{255} - \\mu_c\\Big)^2

    Exact: computed in float64 from the 256-bin histogram of each channel (no rounding of a long sum).

    Args:
        images: uint8 ``(N, C, H, W)`` tensor (or numpy array), ``N >= 1``.

    Returns:
        ``(mean, std)``, float32 tensors of shape ``(C,)`` on the device of ``images``.
    """
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(
            f"images must be a non-empty uint8 tensor (N, C, H, W); got {images.dtype} of shape "
            f"{tuple(images.shape)} (convert float pictures with (x * 255).round().byte())"
        )
    values = torch.arange(256, dtype=torch.float64, device=images.device) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum()
        m = (counts * values).sum() / n
        var = (counts * (values - m) ** 2).sum() / n
        means.append(m)
        stds.append(var.sqrt())
    return torch.stack(means).float(), torch.stack(stds).float()


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Map padded coordinates (``-pad .. size - 1 + pad``) to the source, as ``F.pad(mode='reflect')``."""
    i = i.abs()
    return torch.where(i > size - 1, 2 * (size - 1) - i, i)


def _epoch_seed(seed: int, epoch: int) -> int:
    state = np.random.SeedSequence([int(seed) & (2**64 - 1), int(epoch) & (2**64 - 1)])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class DeviceLoader:
    """Batches of a uint8 image split that lives on ``device``; augmentation done there, in batch.

    Each batch is ``(x, y)``: ``x`` float32 ``(B, C, H, W)`` equal to ``(u / 255 - mean) / std``
    (``std`` only when given), in ``torch.channels_last`` memory format by default; ``y`` int64 ``(B,)``.

    With ``train=True`` every epoch has a fresh permutation and (by default) the standard CIFAR
    augmentation: a random ``H x W`` crop of the picture reflect-padded by ``padding`` pixels, then a
    left-right flip with probability 1/2. All draws of epoch ``e`` depend on ``(seed, e)`` only
    (:meth:`plan`), so resuming at epoch ``e`` reproduces an uninterrupted run. ``iter(loader)`` uses
    the current ``epoch`` attribute and then advances it by one; :meth:`set_epoch` pins it (as with
    ``DistributedSampler``).

    Distributed data parallel: every process draws the same global order and cuts the same global
    batches of ``batch_size`` rows; process ``rank`` yields its contiguous ``batch_size // world_size``
    rows of each, so the shards of all ranks concatenate to the one-process batch.

    Args:
        images: uint8 ``(N, C, H, W)`` tensor (or numpy array).
        labels: integer ``(N,)``.
        batch_size: global batch size (all ranks together).
        train: shuffle every epoch; default for ``augment`` and ``drop_last``.
        device: where data and batches live (default: the device of ``images``).
        mean: per-channel mean on the ``[0, 1]`` scale; default: the mean of ``images`` (all N, before
            ``limit``).
        std: ``None``/``False``: do not divide; ``True``: the std of ``images``; or per-channel values.
        augment: random crop + flip (default: ``train``).
        seed: seed of all draws.
        drop_last: drop a final partial batch (default: ``train``).
        channels_last: return ``x`` in ``torch.channels_last`` format (else contiguous NCHW).
        rank, world_size: shard of each global batch this process yields.
        limit: use only the first ``limit`` examples.
        padding: reflect padding of the random crop (4 for CIFAR).
    """

    def __init__(
        self,
        images,
        labels,
        batch_size: int,
        *,
        train: bool,
        device: Optional[Union[str, torch.device]] = None,
        mean=None,
        std=None,
        augment: Optional[bool] = None,
        seed: int = 0,
        drop_last: Optional[bool] = None,
        channels_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        limit: Optional[int] = None,
        padding: int = 4,
    ):
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be a uint8 tensor (N, C, H, W); got {images.dtype} of shape "
                f"{tuple(images.shape)} (convert float pictures with (x * 255).round().byte())"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
            raise ValueError(
                f"labels must be an integer tensor of shape ({images.shape[0]},); got "
                f"{labels.dtype} of shape {tuple(labels.shape)}"
            )
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"batch_size {batch_size} is the global batch: it must be divisible by "
                f"world_size {world_size}"
            )
        self.device = torch.device(device) if device is not None else images.device
        self.train = bool(train)
        self.augment = self.train if augment is None else bool(augment)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.channels_last = bool(channels_last)
        self.rank, self.world_size = int(rank), int(world_size)
        self.padding = int(padding)
        self.epoch = 0
        C, H, W = images.shape[1:]
        if self.augment and not 0 <= self.padding < min(H, W):
            raise ValueError(f"reflect padding {self.padding} must be smaller than the picture ({H}x{W})")

        images = images.to(self.device)
        stats = None
        if mean is None or std is True:
            stats = channel_stats(images)
        self._mean = self._channel_tensor(stats[0] if mean is None else mean, C, "mean")
        if std is None or std is False:
            self._std = None
        else:
            self._std = self._channel_tensor(stats[1] if std is True else std, C, "std")
            if not bool((self._std > 0).all()):
                raise ValueError(f"std must be positive, got {self._std.flatten().tolist()}")

        if limit is not None:
            images, labels = images[: int(limit)], labels[: int(limit)]
        self.num_examples = int(images.shape[0])
        if self.drop_last and self.num_examples < self.batch_size:
            raise ValueError(
                f"only {self.num_examples} examples for batch_size {self.batch_size} with "
                "drop_last=True: no batch at all; lower batch_size or pass drop_last=False"
            )
        # (N, H, W, C) storage: gathers then give channels_last batches with no extra copy.
        self._nhwc = images.permute(0, 2, 3, 1).contiguous()
        self._labels = labels.to(device=self.device, dtype=torch.int64)
        self._arange_h = torch.arange(H, device=self.device)
        self._arange_w = torch.arange(W, device=self.device)
        self._mean_row = self._mean.view(C).repeat(H * W)
        self._std_row = None if self._std is None else self._std.view(C).repeat(H * W)

    def _channel_tensor(self, value, C: int, what: str) -> torch.Tensor:
        t = torch.as_tensor(value, dtype=torch.float32).flatten().to(self.device)
        if t.numel() != C:
            raise ValueError(f"{what} needs one value per channel ({C}), got {t.numel()}")
        return t.view(C, 1, 1)

    # -- properties --------------------------------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor:
        """Per-channel mean subtracted, shape ``(C, 1, 1)`` on the device (``[0, 1]`` scale)."""
        return self._mean

    @property
    def std(self) -> Optional[torch.Tensor]:
        """Per-channel divisor, shape ``(C, 1, 1)``, or ``None`` when not dividing."""
        return self._std

    @property
    def lipschitz_factor(self) -> float:
        """Lipschitz constant (l2) of the normalisation ``u -> (u - mean) / std``: ``1 / min(std)``, or 1."""
        if self._std is None:
            return 1.0
        return float(1.0 / self._std.min().item())

    def __len__(self) -> int:
        n, b = self.num_examples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` use the draws of ``epoch``."""
        self.epoch = int(epoch)

    def __repr__(self) -> str:
        return (
            f"DeviceLoader(n={self.num_examples}, batch_size={self.batch_size}, train={self.train}, "
            f"augment={self.augment}, device={self.device}, epoch={self.epoch}, "
            f"rank={self.rank}/{self.world_size})"
        )

    # -- draws -------------------------------------------------------------------------------------
    def plan(self, epoch: int) -> EpochPlan:
        """The order and augmentation draws of ``epoch`` (a function of ``(seed, epoch)`` only)."""
        n = self.num_examples
        if not self.train and not self.augment:
            return EpochPlan(torch.arange(n), None, None, None)
        g = torch.Generator(device="cpu")
        g.manual_seed(_epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        if not self.augment:
            return EpochPlan(order, None, None, None)
        span = 2 * self.padding + 1
        dy = torch.randint(0, span, (n,), generator=g)
        dx = torch.randint(0, span, (n,), generator=g)
        flip = torch.randint(0, 2, (n,), generator=g).bool()
        return EpochPlan(order, dy, dx, flip)

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        return self._batches(epoch)

    def _shard(self, start: int, stop: int) -> Tuple[int, int]:
        if self.world_size == 1:
            return start, stop
        if stop - start == self.batch_size:
            per = self.batch_size // self.world_size
            return start + self.rank * per, start + (self.rank + 1) * per
        # final partial batch: split as torch.tensor_split does (some ranks may get one row less)
        size = stop - start
        q, r = divmod(size, self.world_size)
        lo = start + self.rank * q + min(self.rank, r)
        return lo, lo + q + (1 if self.rank < r else 0)

    def _batches(self, epoch: int):
        plan = self.plan(epoch)
        sequential = not self.train
        order = None if sequential else plan.order.to(self.device)
        if self.augment:
            dy, dx, flip = (t.to(self.device) for t in (plan.dy, plan.dx, plan.flip))
        for b in range(len(self)):
            start = b * self.batch_size
            lo, hi = self._shard(start, min(start + self.batch_size, self.num_examples))
            if sequential:
                idx = slice(lo, hi)
            else:
                idx = order[lo:hi]
            if self.augment:
                x = self._crop_flip(idx, dy[lo:hi], dx[lo:hi], flip[lo:hi])
            else:
                x = self._nhwc[idx]
            y = self._labels[idx]
            yield self._normalise(x), y

    def _crop_flip(self, idx, dy, dx, flip) -> torch.Tensor:
        """Gather crops of the reflect-padded pictures, flipped where ``flip``: one indexing kernel."""
        H, W = self._nhwc.shape[1:3]
        p = self.padding
        rows = _reflect(dy[:, None] + self._arange_h[None, :] - p, H)  # (B, H)
        cols_src = torch.where(flip[:, None], (W - 1) - self._arange_w[None, :], self._arange_w[None, :])
        cols = _reflect(dx[:, None] + cols_src - p, W)  # (B, W)
        if isinstance(idx, slice):
            idx = torch.arange(idx.start, idx.stop, device=self.device)
        return self._nhwc[idx[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)

    def _normalise(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x_nhwc.shape
        # On the flat (B, H*W*C) view the per-channel constants are a plain row vector: fast kernels.
        x = x_nhwc.reshape(B, H * W * C).float().div_(255.0).sub_(self._mean_row)
        if self._std_row is not None:
            x.div_(self._std_row)
        x = x.view(B, H, W, C).permute(0, 3, 1, 2)  # NCHW shape with channels_last strides
        if not self.channels_last:
            x = x.contiguous()
        return x


def cifar_loaders(
    data: CifarData,
    batch_size: int = 256,
    device: Optional[Union[str, torch.device]] = None,
    seed: int = 0,
    std=False,
    limit_train: Optional[int] = None,
    limit_test: Optional[int] = None,
    test_batch_size: int = 500,
    *,
    normalize: bool = True,
    mean=None,
    augment: bool = True,
    channels_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
    shard_test: bool = True,
    **kwargs,
) -> Tuple[DeviceLoader, DeviceLoader]:
    """Train loader (shuffled, augmented) and test loader (in order) for ``data``.

    Each batch is ``(x, y)``, ``x`` float32 ``(B, 3, 32, 32)``, ``y`` int64 ``(B,)``, with

    .. math::  x = (u / 255 - \\mu) \\oslash \\sigma \\quad (\\texttt{normalize=True}), \\qquad
               x = u / 255 \\in [0, 1] \\quad (\\texttt{normalize=False}),

    ``mu`` the per-channel mean of the training pictures (all of them, before ``limit_train``), ``sigma``
    their std when ``std`` is true (else 1); the test loader uses the training statistics. When dividing,
    the certified radius must use ``train_loader.lipschitz_factor``. With ``normalize=False`` the raw
    pixels come out (no mean subtracted, no std, ``lipschitz_factor == 1``): the model then normalises its
    input itself, with ``mean, std = channel_stats(data.train_images)``.

    Args:
        data: the pictures, e.g. from :func:`~cpl_mini.load_cifar`.
        batch_size: global training batch size (all processes together; divisible by ``world_size``).
        device: where the data and the batches live (default: where ``data`` is).
        seed: seed of the shuffling and augmentation draws (epoch ``e`` depends on ``(seed, e)`` only).
        std: divide by the training std (``True``), by given per-channel values, or not (``False``).
        limit_train, limit_test: use only the first examples of each split.
        test_batch_size: test batch size (global too when the test set is sharded).
        normalize: ``False``: yield the raw pixels in ``[0, 1]`` (then ``std`` and ``mean`` must be unset).
        mean: per-channel mean to subtract instead of the training mean (``[0, 1]`` scale).
        augment: random crop + flip of the training batches (the test set is never augmented).
        channels_last: ``x`` in ``torch.channels_last`` memory format (else contiguous NCHW).
        rank, world_size: distributed data parallel: process ``rank`` yields its contiguous
            ``batch_size // world_size`` rows of each global training batch (the shards of all ranks
            concatenate to the one-process batch).
        shard_test: shard the test batches the same way (default, as before); ``False``: every process
            gets the whole test set.
        **kwargs: further :class:`DeviceLoader` arguments for both loaders (e.g. ``padding``).
    """
    if not normalize:
        if (std is not None and std is not False) or mean is not None:
            raise ValueError(
                "normalize=False yields raw pixels u / 255: pass neither std nor mean (the "
                "model normalises its input; get the statistics from channel_stats(images))"
            )
        mean, std = (0.0,) * data.train_images.shape[1], None
    train = DeviceLoader(
        data.train_images,
        data.train_labels,
        batch_size,
        train=True,
        device=device,
        seed=seed,
        mean=mean,
        std=std,
        augment=augment,
        limit=limit_train,
        channels_last=channels_last,
        rank=rank,
        world_size=world_size,
        **kwargs,
    )
    test_rank, test_world = (rank, world_size) if shard_test else (0, 1)
    test = DeviceLoader(
        data.test_images,
        data.test_labels,
        test_batch_size,
        train=False,
        device=device,
        seed=seed,
        mean=train.mean,
        std=train.std,
        limit=limit_test,
        channels_last=channels_last,
        rank=test_rank,
        world_size=test_world,
        **kwargs,
    )
    return train, test
