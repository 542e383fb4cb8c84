"""The CPL networks of the paper (sizes S, M, L, XL), the book's CPU network and a small XS for tests.

Architecture (as in the official code): zero-pad the 3 input channels to ``C``; ``depth``
convolutional CPL layers at full resolution (inner width 5, kernel 3); a norm-1 average pool
(``4 x 4`` windows, sum / 4) to 8 x 8; flatten; ``depth_linear`` dense CPL layers on ``C * 64``
features with inner width ``features``; the first ``num_classes`` coordinates as logits. Every piece
is 1-Lipschitz in evaluation mode, so the whole network is (``lipschitz_upper_bound`` returns 1).
"""
import torch.nn as nn

from .layers import (ChannelPad, ConvexPotentialConv2d, ConvexPotentialLinear, FirstCoordinates,
                     LipschitzAvgPool2d, RowNormalizedLinear)

__all__ = ["SIZES", "cpl_network", "count_parameters", "describe"]

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


def cpl_network(size="S", num_classes=10, conv_inner=5, kernel_size=3, input_size=32, in_channels=3,
                pool=4, head="first", **layer_kwargs):
    """Build a CPL network as an ``nn.Sequential`` (input ``(N, 3, 32, 32)``, output ``(N, num_classes)``).

    Args:
        size: ``"XS"``, ``"CPU"``, ``"S"``, ``"M"``, ``"L"``, ``"XL"`` or a tuple
            ``(depth, depth_linear, channels, features)``.
        num_classes: number of logits.
        conv_inner: inner width of the convolutional CPL layers (5 in the paper).
        head: ``"first"`` (first ``num_classes`` coordinates, the paper's default) or ``"lln"``
            (a row-normalised linear layer; certify pairwise).
        layer_kwargs: passed to every CPL layer (e.g. ``eval_norm="power"``).
    """
    if isinstance(size, str):
        key = size.upper()
        if key not in SIZES:
            raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)} or give "
                             "(depth, depth_linear, channels, features)")
        depth, depth_linear, channels, features = SIZES[key]
        name = key
    else:
        depth, depth_linear, channels, features = (int(v) for v in size)
        name = f"custom{tuple(size)}"
    if input_size % pool:
        raise ValueError(f"input_size {input_size} must be divisible by the pool size {pool}")
    if head not in ("first", "lln"):
        raise ValueError(f"head must be 'first' or 'lln', got {head!r}")
    if channels < in_channels:
        raise ValueError(f"channels ({channels}) must be >= the input channels ({in_channels})")
    flat = channels * (input_size // pool) ** 2
    if head == "first" and flat < num_classes:
        raise ValueError(f"{flat} features cannot hold {num_classes} logits")
    layers = [ChannelPad(channels)]
    layers += [ConvexPotentialConv2d(channels, conv_inner, kernel_size, (input_size, input_size), **layer_kwargs)
               for _ in range(depth)]
    layers += [LipschitzAvgPool2d(pool), nn.Flatten()]
    layers += [ConvexPotentialLinear(flat, features, **layer_kwargs) for _ in range(depth_linear)]
    layers += [FirstCoordinates(num_classes) if head == "first" else RowNormalizedLinear(flat, num_classes)]
    model = nn.Sequential(*layers)
    model.config = {"size": name, "depth": depth, "depth_linear": depth_linear, "channels": channels,
                    "features": features, "conv_inner": conv_inner, "kernel_size": kernel_size,
                    "input_size": input_size, "num_classes": num_classes, "head": head}
    return model


def count_parameters(model):
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(model):
    """Rows ``(index, layer, output shape, parameters)`` for a table of the network's layers."""
    import torch

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
