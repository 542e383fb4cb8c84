"""Tests of cpl_mini.plotting against exact geometry (linear classifiers, linear maps)."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from cpl_mini import plotting  # noqa: E402


def _linear_classifier(w, b):
    """Two logits (0, <w, x> + b): class 1 iff <w, x> + b > 0; the boundary is a line."""
    lin = nn.Linear(2, 1).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([w], dtype=torch.float64))
        lin.bias.fill_(b)
    return nn.Sequential(lin, _PadZeroLogit())


class _PadZeroLogit(nn.Module):
    def forward(self, s):
        return torch.cat([torch.zeros_like(s), s], 1)


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_decision_grid_matches_argmax_and_margin():
    model = _linear_classifier([1.0, -2.0], 0.3)
    xx, yy, pred, score = plotting.decision_grid(model, (-1, 2), (-3, 1), resolution=17)
    assert xx.shape == yy.shape == pred.shape == score.shape == (17, 17)
    # corners of the window, indexing "xy": xx varies along columns, yy along rows
    assert xx[0, 0] == -1 and xx[0, -1] == 2 and yy[0, 0] == -3 and yy[-1, 0] == 1
    s = xx - 2 * yy + 0.3
    assert torch.equal(pred, (s > 0).long())
    assert torch.allclose(score, s.abs(), atol=1e-12)


def test_decision_grid_single_score():
    xx, yy, pred, score = plotting.decision_grid(lambda x: x[:, 0] - 0.5, (0, 1), (0, 1), resolution=11)
    assert torch.equal(pred, (xx > 0.5).long())
    assert torch.allclose(score, (xx - 0.5).abs().to(score.dtype), atol=1e-6)


def test_ball_prediction_changes_exact_distance():
    # boundary x_1 = 0.25; distance of a center c to it is |c_1 - 0.25|
    model = _linear_classifier([1.0, 0.0], -0.25)
    centers = torch.tensor([[0.0, 0.0], [1.0, 3.0], [-2.0, 1.0]], dtype=torch.float64)
    dist = (centers[:, 0] - 0.25).abs()
    assert not plotting.ball_prediction_changes(model, centers, 0.99 * dist).any()
    assert plotting.ball_prediction_changes(model, centers, 1.01 * dist).all()


def test_certified_balls_are_circles_with_given_radii():
    fig, ax = plt.subplots()
    centers = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]])
    radii = torch.tensor([0.5, 0.0, 1.5])
    plotting.plot_certified_balls(centers, radii, ax=ax, fill_alpha=0)
    # the zero radius is skipped
    assert len(ax.patches) == 2
    got = sorted((p.center, p.radius) for p in ax.patches)
    assert got == sorted([((0.0, 0.0), 0.5), ((3.0, -1.0), 1.5)])
    assert ax.get_aspect() == 1.0
    with pytest.raises(ValueError, match="one radius per center"):
        plotting.plot_certified_balls(centers, radii[:2], ax=ax)
    with pytest.raises(ValueError, match="shape \\(n, 2\\)"):
        plotting.plot_certified_balls(torch.zeros(3, 3), radii, ax=ax)


def test_plot_decision_boundary_draws_regions_and_points():
    model = _linear_classifier([1.0, 1.0], 0.0)
    X = torch.randn(20, 2)
    y = (X.sum(1) > 0).long()
    ax = plotting.plot_decision_boundary(model, X, y, resolution=30)
    assert ax.get_aspect() == 1.0
    lo, hi = ax.get_xlim()
    assert lo < float(X[:, 0].min()) and hi > float(X[:, 0].max())
    assert len(ax.collections) >= 3  # filled regions, boundary, points
    with pytest.raises(ValueError, match="xlim and ylim"):
        plotting.plot_decision_boundary(model)


def test_transported_grid_is_the_image_of_the_grid():
    A = torch.tensor([[2.0, 1.0], [0.0, 0.5]], dtype=torch.float64)
    fig, ax = plt.subplots()
    _, moved = plotting.plot_transported_grid(
        lambda x: x @ A.T.to(x), (-1, 1), (0, 2), n_lines=5, n_points=7, ax=ax
    )
    _, ident = plotting.plot_transported_grid(
        lambda x: x, (-1, 1), (0, 2), n_lines=5, n_points=7, show_original=False
    )
    assert moved.shape == ident.shape == (10, 7, 2)
    # vertical lines at x_1 = -1, -0.5, ..., 1 and horizontal lines at x_2 = 0, 0.5, ..., 2
    lines = [torch.linspace(a, b, 5, dtype=torch.float64)[:, None].expand(5, 7) for a, b in ((-1, 1), (0, 2))]
    assert torch.allclose(ident[:5, :, 0], lines[0])
    assert torch.allclose(ident[5:, :, 1], lines[1])
    # a lambda is evaluated in the default dtype (float32): compare at float32 precision
    assert torch.allclose(moved, ident @ A.T, atol=1e-6)
    assert len(ax.lines) == 20  # 10 original + 10 transported
    # with dtype=float64 the lambda sees float64 points (a float64 map would fail on float32 input)
    seen = []

    def phi64(x):
        seen.append(x.dtype)
        return x @ A.T

    _, moved64 = plotting.plot_transported_grid(
        phi64, (-1, 1), (0, 2), n_lines=5, n_points=7, ax=ax, dtype=torch.float64
    )
    assert seen == [torch.float64]
    assert torch.allclose(moved64, ident @ A.T, atol=1e-14)


def test_vector_field_quiver_uses_the_field():
    from cpl_mini.flows import SkewSymmetricField

    field = SkewSymmetricField(torch.tensor([[0.0, -2.0], [0.0, 0.0]], dtype=torch.float64))
    fig, ax = plt.subplots()
    plotting.plot_vector_field(field, (-1, 1), (-1, 1), n=5, ax=ax)
    q = ax.collections[0]
    # S = [[0, -1], [1, 0]]: F(x) = (-x_2, x_1)
    xy = torch.as_tensor(q.XY if hasattr(q, "XY") else q.get_offsets())
    assert torch.allclose(torch.as_tensor(q.U), -xy[:, 1].double())
    assert torch.allclose(torch.as_tensor(q.V), xy[:, 0].double())
    with pytest.raises(ValueError, match="\\(m, 2\\)"):
        plotting.plot_vector_field(lambda t, x: x[:, :1], (-1, 1), (-1, 1), n=3, ax=ax)


def test_models_are_not_switched_and_no_grad_is_taken():
    model = _linear_classifier([1.0, 0.0], 0.0).train()
    plotting.decision_grid(model, (-1, 1), (-1, 1), resolution=5)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert math.isclose(float(plotting.decision_grid(model, (0, 1), (0, 1), 3)[3][0, -1]), 1.0)


# ----------------------------------------------------------------------------- network diagram
def _boxes(ax):
    """The text of each block of a network diagram, as its lines (kind, detail, shape)."""
    return [t.get_text().split("\n") for t in ax.texts if t.get_text()]


def _count_and_shape(lines):
    count = int(lines[0].split(" \u00d7 ")[0]) if " \u00d7 " in lines[0] else 1
    return count, tuple(int(v) for v in lines[-1].split("\u00d7"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": "XS"},
        {"size": "CPU", "mean": torch.zeros(3)},
        {"size": (2, 1, 8, 64), "head": "lln", "mean": torch.zeros(3), "std": torch.tensor([0.2, 0.25, 0.3])},
    ],
)
def test_network_diagram_shapes_are_those_of_a_forward_pass(kwargs):
    from cpl_mini import cpl_network, describe

    model = cpl_network(**kwargs)
    rows = describe(model)  # the reference: output shapes of an actual forward pass, layer by layer
    ax = plotting.plot_network_diagram(model)
    boxes = _boxes(ax)
    assert boxes[0][0] == "input" and boxes[0][-1] == "3\u00d732\u00d732"
    expanded = []
    for lines in boxes[1:]:
        count, shape = _count_and_shape(lines)
        expanded += [shape] * count
    assert expanded == [row[2] for row in rows]
    runs = [name for i, name in enumerate(r[1] for r in rows) if i == 0 or rows[i - 1][1] != name]
    assert len(boxes) == 1 + len(runs)  # consecutive layers of one kind share a box
    assert len(ax.patches) == len(boxes)


def test_network_diagram_from_a_size_or_a_configuration_matches_the_model():
    from types import SimpleNamespace

    from cpl_mini import cpl_network

    draw = plotting.plot_network_diagram
    assert _boxes(draw("CPU")) == _boxes(draw(cpl_network("CPU")))
    sizes = (3, 2, 16, 128)
    assert _boxes(draw(sizes)) == _boxes(draw(cpl_network(sizes)))
    config = SimpleNamespace(size="XS", std_normalize=True, head="lln")
    model = cpl_network("XS", head="lln", mean=torch.zeros(3), std=torch.ones(3))
    assert _boxes(draw(config)) == _boxes(draw(model))
    subtract_only = _boxes(draw(SimpleNamespace(size="XS")))
    assert subtract_only[1][:2] == ["normalisation", "x \u2212 mean"]


def test_network_diagram_refuses_what_it_cannot_draw():
    with pytest.raises(ValueError, match="size name"):
        plotting.plot_network_diagram("XXL")
    with pytest.raises(ValueError, match="does not know the layer ReLU"):
        plotting.plot_network_diagram(nn.Sequential(nn.Flatten(), nn.ReLU()))
