r"""Plot helpers: decision regions, certified l2 balls, vector fields, transported grids, network diagrams.

All but the last work on *2-D inputs* (points of the plane, shape ``(n, 2)``); each draws with
matplotlib on an ``Axes`` you pass (a new one is made when ``ax`` is omitted). Each function returns
what it drew on, so cells can add labels and titles.

* :func:`decision_grid` and :func:`plot_decision_boundary`: the predicted class of a classifier
  ``model: (n, 2) -> (n, K)`` (logits) on a grid, filled regions and the boundary curve.
* :func:`plot_certified_balls`: circles of given l2 radii around points (equal aspect, so a circle
  looks round), and :func:`ball_prediction_changes`, a *sampled* check that the prediction is
  constant on each ball (evidence, not a proof: the proof is the margin certificate).
* :func:`plot_vector_field`: the arrows of a field ``F(t, x)``.
* :func:`plot_transported_grid`: the image of a square grid of lines under a map ``phi: (n, 2) -> (n, 2)``.
* :func:`plot_network_diagram`: a CPL network of the CIFAR chapters as a chain of blocks with shapes.

Models and maps are called under ``torch.no_grad()``, in batches, and never have their mode changed.
Inputs are sent in the dtype and to the device of the module's first floating parameter (or buffer);
for a plain callable (a ``lambda``) in ``torch.get_default_dtype()`` on the CPU, unless ``dtype`` is
given (e.g. ``dtype=torch.float64`` for a lambda around a float64 flow).
"""

import math

import torch

__all__ = [
    "decision_grid",
    "plot_decision_boundary",
    "plot_certified_balls",
    "ball_prediction_changes",
    "plot_vector_field",
    "plot_transported_grid",
    "plot_network_diagram",
]


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots()
    return ax


def _as_points(x, name="x"):
    x = torch.as_tensor(x)
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"{name} must be points of the plane, shape (n, 2); got {tuple(x.shape)}")
    return x


def _target(model, dtype=None):
    """(dtype, device) of the model's first floating parameter or buffer, else the default dtype on
    the CPU; an explicit ``dtype`` wins."""
    if dtype is not None:
        device = torch.device("cpu")
        if isinstance(model, torch.nn.Module):
            for t in list(model.parameters()) + list(model.buffers()):
                device = t.device
                break
        return dtype, device
    if isinstance(model, torch.nn.Module):
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def _apply(fn, x, batch_size=65536, dtype=None):
    """``fn`` on ``x`` (n, 2) in batches, without gradient; returns a detached CPU tensor."""
    dtype, device = _target(fn, dtype)
    x = x.detach().to(device=device, dtype=dtype)
    outs = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            outs.append(fn(x[start : start + batch_size]).detach().cpu())
    return torch.cat(outs)


def _limits(lim, X, k, pad=0.15):
    if lim is not None:
        return float(lim[0]), float(lim[1])
    if X is None:
        raise ValueError("give the plot window (xlim and ylim) or points X to fit it around")
    lo, hi = float(X[:, k].min()), float(X[:, k].max())
    span = hi - lo if hi > lo else 1.0
    return lo - pad * span, hi + pad * span


def decision_grid(model, xlim, ylim, resolution=200, dtype=None):
    """The classifier on a ``resolution x resolution`` grid of the window ``xlim x ylim``.

    Args:
        model: callable ``(n, 2) -> (n, K)`` (logits, ``K >= 2``) or ``(n,)``/``(n, 1)`` (a score whose
            sign is the class: ``score > 0`` is class 1).
        xlim, ylim: ``(min, max)`` of each axis.
        resolution: grid points per axis.
        dtype: dtype of the inputs sent to ``model`` (default: see the module docstring).

    Returns:
        ``(xx, yy, pred, score)``: ``xx, yy`` of shape ``(resolution, resolution)`` (``meshgrid``,
        ``indexing="xy"``), ``pred`` the predicted class (int64, same shape), and ``score`` the
        margin of the top class over the runner-up (``max - second max`` of the logits; ``|score|``
        for a single score), zero on the decision boundary.
    """
    if resolution < 2:
        raise ValueError(f"resolution must be at least 2, got {resolution}")
    xs = torch.linspace(float(xlim[0]), float(xlim[1]), resolution, dtype=torch.float64)
    ys = torch.linspace(float(ylim[0]), float(ylim[1]), resolution, dtype=torch.float64)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    out = _apply(model, pts, dtype=dtype).double()
    if out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1):
        s = out.reshape(-1)
        pred = (s > 0).long()
        score = s.abs()
    elif out.dim() == 2:
        top2 = out.topk(2, dim=1).values
        pred = out.argmax(1)
        score = top2[:, 0] - top2[:, 1]
    else:
        raise ValueError(f"model must return (n, K) logits or (n,) scores, got shape {tuple(out.shape)}")
    shape = (resolution, resolution)
    return xx, yy, pred.reshape(shape), score.reshape(shape)


def plot_decision_boundary(
    model,
    X=None,
    y=None,
    ax=None,
    xlim=None,
    ylim=None,
    resolution=200,
    cmap="coolwarm",
    alpha=0.25,
    boundary_color="k",
    point_size=12,
    show_margin=False,
    dtype=None,
):
    """Filled decision regions of a 2-D classifier, its decision boundary, and the points ``(X, y)``.

    Args:
        model: as in :func:`decision_grid`.
        X, y: optional points ``(n, 2)`` and labels ``(n,)`` scattered on top (coloured by label).
        xlim, ylim: the window; by default fitted around ``X`` with a 15% margin.
        show_margin: also draw contour lines of the logit margin (``max - second max``), labelled.
        dtype: dtype of the inputs sent to ``model`` (default: see the module docstring).

    Returns:
        The ``Axes`` (aspect equal: distances look like distances, circles look round).
    """
    import numpy as np

    ax = _axes(ax)
    if X is not None:
        X = _as_points(X, "X").detach().cpu()
    xlim, ylim = _limits(xlim, X, 0), _limits(ylim, X, 1)
    xx, yy, pred, score = decision_grid(model, xlim, ylim, resolution, dtype=dtype)
    n_classes = int(max(int(pred.max()), int(y.max()) if y is not None else 0)) + 1
    levels = np.arange(-0.5, max(n_classes, 2) + 0.5)
    ax.contourf(xx.numpy(), yy.numpy(), pred.numpy(), levels=levels, cmap=cmap, alpha=alpha)
    if int(pred.min()) != int(pred.max()):
        # the boundary: where the predicted class changes (level sets between class indices)
        ax.contour(
            xx.numpy(), yy.numpy(), pred.numpy(), levels=levels[1:-1], colors=boundary_color, linewidths=1.5
        )
    if show_margin:
        cs = ax.contour(
            xx.numpy(), yy.numpy(), score.numpy(), levels=6, colors="grey", linewidths=0.6, alpha=0.8
        )
        ax.clabel(cs, fontsize=7, fmt="%.2g")
    if X is not None:
        c = None if y is None else torch.as_tensor(y).cpu().numpy()
        ax.scatter(
            X[:, 0].numpy(),
            X[:, 1].numpy(),
            c=c,
            cmap=cmap,
            s=point_size,
            edgecolors="k",
            linewidths=0.4,
            vmin=0,
            vmax=max(n_classes - 1, 1),
            zorder=3,
        )
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    return ax


def plot_certified_balls(
    centers, radii, ax=None, color="k", fill_alpha=0.15, linewidth=1.0, min_radius=0.0, **kwargs
):
    """Draw the l2 balls ``B(c_i, r_i)`` (circles) on ``ax``; the aspect is set equal.

    Args:
        centers: ``(n, 2)``; radii: ``(n,)`` (non-negative; balls with ``r_i <= min_radius`` are
            skipped, e.g. misclassified points whose radius is 0).
        color, fill_alpha, linewidth: look of the circles; extra ``kwargs`` go to
            ``matplotlib.patches.Circle``.

    Returns:
        The ``Axes``. The circles are ``ax.patches`` (one per drawn ball, in the order of ``centers``).
    """
    from matplotlib.patches import Circle

    centers = _as_points(centers, "centers").detach().cpu().double()
    radii = torch.as_tensor(radii).detach().cpu().double().reshape(-1)
    if radii.shape[0] != centers.shape[0]:
        raise ValueError(f"one radius per center: got {radii.shape[0]} radii for {centers.shape[0]} centers")
    if (radii < 0).any() or not torch.isfinite(radii).all():
        raise ValueError("radii must be finite and non-negative")
    ax = _axes(ax)
    for (cx, cy), r in zip(centers.tolist(), radii.tolist()):
        if r <= min_radius:
            continue
        ax.add_patch(
            Circle(
                (cx, cy),
                r,
                facecolor=color,
                alpha=None,
                edgecolor=color,
                fill=False,
                linewidth=linewidth,
                **kwargs,
            )
        )
        if fill_alpha > 0:
            ax.add_patch(Circle((cx, cy), r, facecolor=color, edgecolor="none", alpha=fill_alpha))
    ax.set_aspect("equal")
    return ax


def ball_prediction_changes(model, centers, radii, n_angles=256, n_rings=8, dtype=None):
    """For each ball ``B(c_i, r_i)``: does the predicted class change somewhere on it? (sampled)

    Evaluates ``model`` at ``n_rings`` concentric circles of radii ``r_i k / n_rings`` (``k = 1..n_rings``,
    so the boundary circle is included) with ``n_angles`` points each, and compares the argmax with
    the one at the center. ``True`` means a point of the ball with another prediction was *found*
    (so ``r_i`` is not a valid certified radius); ``False`` means none was found among the samples,
    which is evidence, not a proof.

    Args:
        model: callable ``(n, 2) -> (n, K)`` logits (``K >= 2``).
        centers: ``(n, 2)``; radii: ``(n,)``.
        dtype: dtype of the inputs sent to ``model`` (default: see the module docstring).

    Returns:
        Bool tensor ``(n,)``.
    """
    centers = _as_points(centers, "centers").detach().cpu().double()
    radii = torch.as_tensor(radii).detach().cpu().double().reshape(-1)
    if radii.shape[0] != centers.shape[0]:
        raise ValueError(f"one radius per center: got {radii.shape[0]} radii for {centers.shape[0]} centers")
    if n_angles < 1 or n_rings < 1:
        raise ValueError("n_angles and n_rings must be positive")
    ang = torch.arange(n_angles, dtype=torch.float64) * (2 * math.pi / n_angles)
    unit = torch.stack([ang.cos(), ang.sin()], 1)  # (A, 2)
    fr = torch.arange(1, n_rings + 1, dtype=torch.float64) / n_rings  # (R,)
    offsets = (fr[:, None, None] * unit[None]).reshape(-1, 2)  # (R*A, 2)
    pts = centers[:, None, :] + radii[:, None, None] * offsets[None]  # (n, R*A, 2)
    c_pred = _apply(model, centers, dtype=dtype).argmax(1)
    p_pred = _apply(model, pts.reshape(-1, 2), dtype=dtype).argmax(1).reshape(centers.shape[0], -1)
    return (p_pred != c_pred[:, None]).any(1)


def plot_vector_field(
    field, xlim, ylim, n=20, t=0.0, ax=None, normalize=False, color="0.4", dtype=None, **kwargs
):
    """Quiver plot of a vector field ``F(t, x)`` on an ``n x n`` grid (``field(t, x)`` with ``x: (m, 2)``).

    Args:
        field: a :class:`cpl_mini.flows.VectorField` or any callable ``(t, x) -> (m, 2)``.
        normalize: draw unit arrows (direction only).
        dtype: dtype of the points sent to ``field`` (default: see the module docstring).

    Returns:
        The ``Axes`` (aspect equal).
    """
    ax = _axes(ax)
    xs = torch.linspace(float(xlim[0]), float(xlim[1]), n, dtype=torch.float64)
    ys = torch.linspace(float(ylim[0]), float(ylim[1]), n, dtype=torch.float64)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    dtype, device = _target(field, dtype)
    with torch.no_grad():
        x = pts.to(device=device, dtype=dtype)
        v = field(torch.as_tensor(t, dtype=dtype, device=device), x).detach().cpu().double()
    if v.shape != pts.shape:
        raise ValueError(f"the field must map (m, 2) to (m, 2), got {tuple(v.shape)}")
    if normalize:
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ax.quiver(
        pts[:, 0].numpy(),
        pts[:, 1].numpy(),
        v[:, 0].numpy(),
        v[:, 1].numpy(),
        color=color,
        angles="xy",
        **kwargs,
    )
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    return ax


def plot_transported_grid(
    phi,
    xlim,
    ylim,
    n_lines=11,
    n_points=100,
    ax=None,
    color="C0",
    linewidth=0.8,
    show_original=True,
    original_color="0.8",
    dtype=None,
):
    """Draw the image under ``phi`` of the square grid of ``n_lines`` horizontal and ``n_lines``
    vertical lines of the window ``xlim x ylim`` (each line sampled at ``n_points`` points).

    Args:
        phi: callable ``(m, 2) -> (m, 2)``, e.g. ``lambda x: flow(field, x, t)[-1]``.
        show_original: also draw the grid itself, in light grey.
        dtype: dtype of the points sent to ``phi`` (default: see the module docstring).

    Returns:
        ``(ax, lines)``: the ``Axes`` and the transported lines, a tensor ``(2 * n_lines, n_points, 2)``
        (first the ``n_lines`` lines of constant ``x_1``, then those of constant ``x_2``).
    """
    if n_lines < 2 or n_points < 2:
        raise ValueError("n_lines and n_points must be at least 2")
    ax = _axes(ax)
    s = torch.linspace(0.0, 1.0, n_points, dtype=torch.float64)
    ux = torch.linspace(float(xlim[0]), float(xlim[1]), n_lines, dtype=torch.float64)
    uy = torch.linspace(float(ylim[0]), float(ylim[1]), n_lines, dtype=torch.float64)
    ys = float(ylim[0]) + s * (float(ylim[1]) - float(ylim[0]))
    xs = float(xlim[0]) + s * (float(xlim[1]) - float(xlim[0]))
    vertical = torch.stack([ux[:, None].expand(-1, n_points), ys[None].expand(n_lines, -1)], -1)
    horizontal = torch.stack([xs[None].expand(n_lines, -1), uy[:, None].expand(-1, n_points)], -1)
    grid = torch.cat([vertical, horizontal])  # (2L, P, 2)
    moved = _apply(phi, grid.reshape(-1, 2), dtype=dtype).double()
    if moved.shape != (grid.shape[0] * n_points, 2):
        raise ValueError(f"phi must map (m, 2) to (m, 2), got {tuple(moved.shape)}")
    moved = moved.reshape(grid.shape)
    if show_original:
        for line in grid:
            ax.plot(line[:, 0].numpy(), line[:, 1].numpy(), color=original_color, linewidth=0.6, zorder=1)
    for line in moved:
        ax.plot(line[:, 0].numpy(), line[:, 1].numpy(), color=color, linewidth=linewidth, zorder=2)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    return ax, moved


# ----------------------------------------------------------------------------- network diagram
_BLOCK_COLORS = {
    "input": "0.9",
    "normalisation": "#e8e0f0",
    "channel pad": "#eeeeee",
    "conv CPL": "#cfe2f3",
    "pool": "#eeeeee",
    "flatten": "#eeeeee",
    "dense CPL": "#fce5cd",
    "head": "#d9ead3",
}


def _layer_block(layer, shape):
    """``(kind, detail, output shape)`` of one layer of a CPL network fed inputs of ``shape`` (no batch)."""
    from torch import nn

    from .layers import (
        ChannelPad,
        ConvexPotentialConv2d,
        ConvexPotentialLinear,
        FirstCoordinates,
        LipschitzAvgPool2d,
        RowNormalizedLinear,
    )
    from .normalization import InputNormalization

    if isinstance(layer, InputNormalization):
        return "normalisation", "x \u2212 mean" if layer.std is None else "(x \u2212 mean) / std", shape
    if isinstance(layer, ChannelPad):
        out = (layer.channels,) + tuple(shape[1:])
        return "channel pad", f"{shape[0]} \u2192 {layer.channels} channels", out
    if isinstance(layer, ConvexPotentialConv2d):
        k = layer.kernel_size
        return "conv CPL", f"{k}\u00d7{k}, inner {layer.inner_channels}", shape
    if isinstance(layer, LipschitzAvgPool2d):
        k = layer.kernel_size
        return "pool", f"{k}\u00d7{k} sum / {k}", (shape[0], shape[1] // k, shape[2] // k)
    if isinstance(layer, nn.Flatten):
        return "flatten", "", (math.prod(shape),)
    if isinstance(layer, ConvexPotentialLinear):
        return "dense CPL", f"inner {layer.inner_features}", shape
    if isinstance(layer, FirstCoordinates):
        return "head", f"first {layer.k} logits", (layer.k,)
    if isinstance(layer, RowNormalizedLinear):
        return "head", "row-normalised", (layer.out_features,)
    raise ValueError(
        f"plot_network_diagram does not know the layer {type(layer).__name__}; it draws the "
        "networks of cpl_network (CPL layers, ChannelPad, pooling, Flatten, heads)"
    )


def _model_blocks(model, input_shape):
    shape, blocks = tuple(input_shape), []
    for layer in model:
        kind, detail, shape = _layer_block(layer, shape)
        if kind.endswith("CPL") and blocks and blocks[-1][:2] == [kind, detail]:
            blocks[-1][3] += 1
        else:
            blocks.append([kind, detail, shape, 1])
    return blocks


def _config_blocks(config, input_shape):
    """The blocks of ``cpl_network(size, ...)`` from a size name, its 4 numbers, or a run configuration."""
    from .models import SIZES

    size = getattr(config, "size", config)
    sizes = SIZES.get(size) if isinstance(size, str) else None
    if sizes is None and isinstance(size, (tuple, list)) and len(size) == 4:
        sizes = tuple(int(v) for v in size)
    if sizes is None:
        raise ValueError(
            f"give a network (nn.Sequential from cpl_network), a size name among "
            f"{sorted(SIZES)}, its 4 numbers (depth, depth_linear, channels, features) or a run "
            f"configuration; got {config!r}"
        )
    depth, depth_linear, channels, features = sizes
    c, h, w = input_shape
    flat = channels * (h // 4) * (w // 4)
    blocks = []
    if hasattr(config, "size"):  # a run configuration: its network starts with the input normalisation
        std = bool(getattr(config, "std_normalize", False))
        blocks.append(["normalisation", "(x \u2212 mean) / std" if std else "x \u2212 mean", (c, h, w), 1])
    blocks.append(["channel pad", f"{c} \u2192 {channels} channels", (channels, h, w), 1])
    if depth:
        blocks.append(["conv CPL", "3\u00d73, inner 5", (channels, h, w), depth])
    blocks += [["pool", "4\u00d74 sum / 4", (channels, h // 4, w // 4), 1], ["flatten", "", (flat,), 1]]
    if depth_linear:
        blocks.append(["dense CPL", f"inner {features}", (flat,), depth_linear])
    lln = getattr(config, "head", "first") == "lln"
    blocks.append(["head", "row-normalised" if lln else "first 10 logits", (10,), 1])
    return blocks


def plot_network_diagram(model_or_config, ax=None, input_shape=(3, 32, 32), fontsize=8):
    """Draw a CPL network as a chain of blocks, each with its output shape (channels x height x width).

    Args:
        model_or_config: an ``nn.Sequential`` made by :func:`~cpl_mini.cpl_network` (the shapes
            are propagated through its layers), a size name of ``SIZES`` (``"CPU"``, ``"S"``, ...; the
            bare ``cpl_network(size)``), its 4 numbers ``(depth, depth_linear, channels, features)``,
            or a run configuration with a ``size`` attribute (its network starts with the input
            normalisation, dividing by the std when ``std_normalize`` is set).
        ax: the ``Axes`` to draw on (a new wide figure when omitted).
        input_shape: ``(C, H, W)`` of the input pictures.

    Returns:
        the ``Axes``. Each block is a rounded box whose text reads ``kind`` (prefixed by ``"k \u00d7 "``
        for ``k`` consecutive CPL layers), a detail line and, last, the output shape such as
        ``32\u00d732\u00d732``.
    """
    from matplotlib.patches import FancyBboxPatch

    if isinstance(model_or_config, torch.nn.Sequential):
        blocks = _model_blocks(model_or_config, input_shape)
    else:
        blocks = _config_blocks(model_or_config, tuple(input_shape))
    blocks = [["input", "pixels in [0, 1]", tuple(input_shape), 1]] + blocks
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(1.55 * len(blocks), 1.6))
    width, gap = 1.55, 0.3
    for i, (kind, detail, shape, count) in enumerate(blocks):
        x0 = i * (width + gap)
        ax.add_patch(
            FancyBboxPatch(
                (x0, 0),
                width,
                1,
                boxstyle="round,pad=0.03,rounding_size=0.08",
                facecolor=_BLOCK_COLORS.get(kind, "white"),
                edgecolor="0.3",
            )
        )
        title = f"{count} \u00d7 {kind}" if count > 1 else kind
        lines = [title, detail, "\u00d7".join(str(s) for s in shape)]
        ax.text(x0 + width / 2, 0.5, "\n".join(lines), ha="center", va="center", fontsize=fontsize)
        if i:
            ax.annotate(
                "",
                xy=(x0 - 0.02, 0.5),
                xytext=(x0 - gap + 0.02, 0.5),
                arrowprops={"arrowstyle": "->", "color": "0.3"},
            )
    ax.set_xlim(-0.1, len(blocks) * (width + gap) - gap + 0.1)
    ax.set_ylim(-0.1, 1.1)
    ax.set_axis_off()
    return ax
