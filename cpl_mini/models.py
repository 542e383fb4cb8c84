"""The CPL networks of the paper (sizes S, M, L, XL), the book's CPU network and a small XS for tests.

Architecture (as in the official code): optionally an input normalisation ``(u - mean) / std``
(:class:`~cpl_mini.normalization.InputNormalization`, Lipschitz ``1 / min(std)``, 1 without std);
zero-pad the 3 input channels to ``C``; ``depth``
convolutional CPL layers at full resolution (inner width 5, kernel 3); a norm-1 average pool
(``4 x 4`` windows, sum / 4) to 8 x 8; flatten; ``depth_linear`` dense CPL layers on ``C * 64``
features with inner width ``features``; the first ``num_classes`` coordinates as logits. Every piece
is 1-Lipschitz in evaluation mode, so the whole network is (``lipschitz_upper_bound`` returns 1, times
the normalisation's constant when there is one).
"""

import re
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .layers import (
    ChannelPad,
    ConvexPotentialConv2d,
    ConvexPotentialLinear,
    FirstCoordinates,
    LipschitzAvgPool2d,
    RowNormalizedLinear,
)
from .normalization import InputNormalization

__all__ = [
    "SIZES",
    "SIZE_FORMS",
    "parse_size",
    "cpl_network",
    "count_parameters",
    "describe",
    "use_channels_last",
]

#: name -> (conv CPL layers, dense CPL layers, channels C, dense inner width). S, M, L and XL are the
#: paper's sizes (from the authors' code); XS (for tests) and CPU (the book's CPU run) are this package's.
SIZES = {
    "XS": (4, 2, 16, 256),
    # The book's CPU network: what 10 epochs of CIFAR-10 allow in about an hour on 2 AVX2 cores
    # (S costs ~5.5 s a step there, 18 min an epoch; this one ~1.8 s). See benchmarks/RESULTS.md.
    "CPU": (8, 3, 32, 1024),
    "S": (20, 7, 45, 2048),
    "M": (30, 10, 60, 2048),
    "L": (50, 10, 90, 2048),
    "XL": (70, 15, 120, 2048),
}


#: The spellings of a size that :func:`parse_size` accepts (also the text of its error).
SIZE_FORMS = (
    f"a name ({', '.join(SIZES)}) or four whole numbers depth,depth_linear,channels,features "
    "written 20,7,45,2048 or (20, 7, 45, 2048) or 20x7x45x2048"
)


_SIZE_TEXT = re.compile(r"\(?\s*(\d+)\s*([,x])\s*(\d+)\s*\2\s*(\d+)\s*\2\s*(\d+)\s*\)?")


def parse_size(size: Union[str, Sequence[int]]) -> Tuple[str, Tuple[int, int, int, int]]:
    """``(canonical text, (depth, depth_linear, channels, features))`` of a network size.

    Accepted: a name of :data:`SIZES` (any case: ``"xs"`` -> ``"XS"``), four whole numbers as text
    (``"20,7,45,2048"``, ``"(20, 7, 45, 2048)"``, ``"20x7x45x2048"``) or as a sequence; the canonical
    text of numbers is ``"20,7,45,2048"`` (even when they equal a named size). ``depth`` and
    ``depth_linear`` are >= 0, ``channels`` and ``features`` >= 1. Anything else: ``ValueError`` (one
    line listing the accepted forms).

    Examples:
        >>> parse_size("xs")
        ('XS', (4, 2, 16, 256))
        >>> parse_size("(20, 7, 45, 2048)")
        ('20,7,45,2048', (20, 7, 45, 2048))
    """
    if isinstance(size, str):
        text = size.strip()
        if text.upper() in SIZES:
            return text.upper(), SIZES[text.upper()]
        match = _SIZE_TEXT.fullmatch(text.lower())
        parens = text.startswith("(") == text.endswith(")")
        values = tuple(int(match.group(i)) for i in (1, 3, 4, 5)) if match and parens else None
    else:
        try:
            values = tuple(size)
        except TypeError:
            values = None
        ok = values is not None and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        values = values if ok else None
    if values is None or len(values) != 4 or min(values[:2]) < 0 or min(values[2:]) < 1:
        raise ValueError(f"unknown size {size!r}: give {SIZE_FORMS}")
    return ",".join(map(str, values)), values


def cpl_network(
    size: Union[str, Sequence[int]] = "S",
    num_classes: int = 10,
    conv_inner: int = 5,
    kernel_size: int = 3,
    input_size: int = 32,
    in_channels: int = 3,
    pool: int = 4,
    head: str = "first",
    mean=None,
    std=None,
    **layer_kwargs,
) -> nn.Sequential:
    """Build a CPL network as an ``nn.Sequential`` (input ``(N, 3, 32, 32)``, output ``(N, num_classes)``).

    Args:
        size: ``"XS"``, ``"CPU"``, ``"S"``, ``"M"``, ``"L"``, ``"XL"`` or a tuple
            ``(depth, depth_linear, channels, features)``, also as text (:func:`parse_size`:
            ``"20,7,45,2048"``, ``"(20, 7, 45, 2048)"``, ``"20x7x45x2048"``).
        num_classes: number of logits.
        conv_inner: inner width of the convolutional CPL layers (5 in the paper).
        head: ``"first"`` (first ``num_classes`` coordinates, the paper's default) or ``"lln"``
            (a row-normalised linear layer; certify pairwise).
        mean, std: per-channel statistics (``in_channels`` values each) of the training pictures; when
            ``mean`` is given the first layer is ``InputNormalization(mean, std)`` and the network takes
            raw pixels (its Lipschitz bound then includes ``1 / min(std)``). ``std=None``: subtract only.
        layer_kwargs: passed to every CPL layer (e.g. ``eval_norm="power"``).
    """
    name, (depth, depth_linear, channels, features) = parse_size(size)
    if input_size % pool:
        raise ValueError(f"input_size {input_size} must be divisible by the pool size {pool}")
    if head not in ("first", "lln"):
        raise ValueError(f"head must be 'first' or 'lln', got {head!r}")
    if channels < in_channels:
        raise ValueError(f"channels ({channels}) must be >= the input channels ({in_channels})")
    flat = channels * (input_size // pool) ** 2
    if head == "first" and flat < num_classes:
        raise ValueError(f"{flat} features cannot hold {num_classes} logits")
    if std is not None and mean is None:
        raise ValueError("std without mean: pass mean too (mean=torch.zeros(3) to divide only)")
    layers = [] if mean is None else [InputNormalization(mean, std)]
    if layers and layers[0].channels != in_channels:
        raise ValueError(f"mean has {layers[0].channels} values, the input has {in_channels} channels")
    layers += [ChannelPad(channels)]
    layers += [
        ConvexPotentialConv2d(channels, conv_inner, kernel_size, (input_size, input_size), **layer_kwargs)
        for _ in range(depth)
    ]
    layers += [LipschitzAvgPool2d(pool), nn.Flatten()]
    layers += [ConvexPotentialLinear(flat, features, **layer_kwargs) for _ in range(depth_linear)]
    layers += [FirstCoordinates(num_classes) if head == "first" else RowNormalizedLinear(flat, num_classes)]
    model = nn.Sequential(*layers)
    model.config = {
        "size": name,
        "depth": depth,
        "depth_linear": depth_linear,
        "channels": channels,
        "features": features,
        "conv_inner": conv_inner,
        "kernel_size": kernel_size,
        "input_size": input_size,
        "num_classes": num_classes,
        "head": head,
        "input_normalization": None if mean is None else ("mean" if std is None else "mean_std"),
    }
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(model: nn.Sequential) -> List[Tuple[int, str, Tuple[int, ...], int]]:
    """Rows ``(index, layer, output shape, parameters)`` for a table of the network's layers."""
    cfg = getattr(model, "config", {})
    n = cfg.get("input_size", 32)
    x = torch.zeros(1, 3, n, n, device=next(model.parameters()).device)
    rows = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i, layer in enumerate(model):
            x = layer(x)
            params = sum(p.numel() for p in layer.parameters())
            rows.append((i, type(layer).__name__, tuple(x.shape[1:]), params))
    model.train(was_training)
    return rows


def use_channels_last(setting: Union[str, bool, None], device: Union[str, torch.device]) -> bool:
    """Resolve a ``channels_last`` setting (``"auto"``, ``"on"``/``"off"`` or a bool) for ``device``.

    ``"auto"`` means the layout that measured faster for these networks: channels-last on GPUs and
    CPUs (1.1-1.3x on training and 1.4x on inference for channel counts that are multiples of 16;
    ``benchmarks/RESULTS.md`` has the one case, S with 45 channels on an AVX2-only CPU, where NCHW won),
    NCHW elsewhere (MPS).
    """
    if setting is None or setting == "auto":
        return torch.device(device).type in ("cuda", "cpu")
    if isinstance(setting, str):
        if setting.lower() not in _SWITCH:
            raise ValueError(f"channels_last must be auto, on or off, got {setting!r}")
        return _SWITCH[setting.lower()]
    return bool(setting)


_SWITCH = {
    "on": True,
    "true": True,
    "yes": True,
    "1": True,
    "off": False,
    "false": False,
    "no": False,
    "0": False,
}
