"""cpl_mini.certify: the margin certificate against independent computations (exact rationals, the
exact distance to the decision boundary of linear models, argmax), on every device, float32 and float64;
the two spellings of a radius; the command line and its one-line errors."""

import doctest
import json
import math
import os
import subprocess
import sys
from fractions import Fraction

import pytest
import torch
import torch.nn as nn

import cpl_mini.certify
from cpl_mini.attacks import pgd_l2
from cpl_mini.bounds import lipschitz_upper_bound
from cpl_mini.certify import (
    DEFAULT_EPS,
    certified_accuracy,
    certified_radius,
    certified_radius_pairwise,
    eps_label,
    format_table,
    main,
    network_lipschitz,
    parse_eps,
)
from cpl_mini.cifar import CifarData
from cpl_mini.custom import own_network
from cpl_mini.layers import (
    ConvexPotentialConv2d,
    ConvexPotentialLinear,
    FirstCoordinates,
    RowNormalizedLinear,
)
from cpl_mini.models import cpl_network
from cpl_mini.runs import TrainConfig, load_run_model, run_network, save_checkpoint
from cpl_mini.spectral import conv_spectral_norm_upper, dense_spectral_norm_upper
from cpl_mini.train import margin_loss

SQRT2 = math.sqrt(2)

pytestmark = pytest.mark.usefixtures("ieee")  # on GPUs too, the references are IEEE float32 arithmetic


def exact_radius(row, label, lipschitz):
    """(f_y - max_{j != y} f_j) / (sqrt(2) L) in exact arithmetic: a Fraction for the margin over L, then
    divided by sqrt(2) through its square (returned as (margin / L, sign) to compare exactly)."""
    f = [Fraction(v) for v in row]
    m = f[label] - max(v for j, v in enumerate(f) if j != label)
    return m / Fraction(lipschitz)


def radius_at_most_exact(r, m_over_l):
    """r <= (m / L) / sqrt 2, decided exactly: compare r * sqrt 2 with m / L through squares and signs."""
    r = Fraction(r)
    if m_over_l >= 0:
        return r <= 0 or 2 * r * r <= m_over_l * m_over_l
    return r < 0 and 2 * r * r >= m_over_l * m_over_l


def test_certified_radius_formula():
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2, 0])
    r = certified_radius(logits, labels, lipschitz=2.0)
    assert r[0].item() == pytest.approx(2.0 / (SQRT2 * 2.0))
    assert r[1].item() < 0  # misclassified: no certificate
    assert r[2].item() == 0  # tie: exactly 0, no certificate
    with pytest.raises(ValueError, match="logits"):
        certified_radius(logits[0], labels)
    with pytest.raises(ValueError, match="lipschitz"):
        certified_radius(logits, labels, lipschitz=0.0)


def near_tie_logits(dtype, n=300, k=4, seed=0):
    """Logits whose top two entries differ by a few ulps, at several scales, with labels on either."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.randint(-3, 4, (n, 1), generator=g)
    base = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    logits = base.to(dtype)
    top = logits.max(dim=1).values
    eps = torch.finfo(dtype).eps
    second = top * (1 - torch.randint(1, 6, (n,), generator=g).to(dtype) * eps * torch.sign(top))
    idx = torch.randint(0, k, (n,), generator=g)
    logits[torch.arange(n), idx] = torch.maximum(second, logits[torch.arange(n), idx])
    labels = torch.where(torch.rand(n, generator=g) < 0.5, logits.argmax(1), idx)
    return logits, labels


@pytest.mark.parametrize("lipschitz", [1.0, 1.7, 1 / 3])
def test_radius_near_ties_is_rounded_down(dtype, device, lipschitz):
    """Near ties the margin is a few ulps: cast to float32 it vanished or doubled (a radius up to 2x the
    true one from float64 logits); rounded to nearest it can land above the exact value. Checked against
    exact rational arithmetic: never above, and within a few ulps of it."""
    logits, labels = near_tie_logits(dtype)
    r = certified_radius(logits.to(device), labels.to(device), lipschitz)
    assert r.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert r.device.type == device.type
    out_eps = torch.finfo(r.dtype).eps
    for row, label, ri in zip(logits.tolist(), labels.tolist(), r.cpu().tolist()):
        exact = exact_radius(row, label, lipschitz)
        assert radius_at_most_exact(ri, exact), (row, label, ri)
        target = float(exact) / SQRT2
        assert ri >= target - 8 * out_eps * abs(target) - 1e-300  # and tight


def test_radius_keeps_float64_precision():
    """float64 logits 1 + 3 ulp and 1: the float64 radius is 3 ulp / sqrt 2 (float32 would say 0)."""
    ulp = 2.0**-52
    logits = torch.tensor([[1.0 + 3 * ulp, 1.0]], dtype=torch.float64)
    r = certified_radius(logits, torch.tensor([0]))
    assert r.dtype == torch.float64
    assert r.item() == pytest.approx(3 * ulp / SQRT2, rel=1e-15) and r.item() < 3 * ulp / SQRT2


def pairwise_reference(logits, labels, k_matrix, lipschitz):
    """min_{j != y} (f_y - f_j) / (L K_yj) from exact margins, as floats (nearest)."""
    out = []
    for row, y in zip(logits.tolist(), labels.tolist()):
        vals = [
            (Fraction(row[y]) - Fraction(row[j])) / (Fraction(lipschitz) * Fraction(k_matrix[y][j]))
            for j in range(len(row))
            if j != y
        ]
        out.append(min(vals))
    return out


def test_pairwise_radius_near_ties_is_rounded_down(dtype, device):
    logits, labels = near_tie_logits(dtype, n=200, k=5, seed=1)
    g = torch.Generator().manual_seed(2)
    k = torch.rand(5, 5, generator=g, dtype=torch.float64) + 0.5
    k = (k + k.T) / 2
    k.fill_diagonal_(0)
    r = certified_radius_pairwise(logits.to(device), labels.to(device), k.to(device), lipschitz=1.3)
    assert r.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    out_eps = torch.finfo(r.dtype).eps
    for ri, exact in zip(r.cpu().tolist(), pairwise_reference(logits, labels, k.tolist(), 1.3)):
        assert Fraction(ri) <= exact
        assert ri >= float(exact) - 8 * out_eps * abs(float(exact)) - 1e-300


def linear_model(d, k, c, seed, dtype=torch.float64):
    """x -> V (c Q x) + b: a body of constant exactly c (Q orthogonal) and a row-normalised head with
    random, not orthonormal rows (so the pairwise constants differ from sqrt 2 and from each other)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    body = nn.Linear(d, d, bias=False, dtype=torch.float64)
    head = RowNormalizedLinear(d, k, dtype=torch.float64)
    with torch.no_grad():
        body.weight.copy_(c * q)
        head.weight.copy_(torch.randn(k, d, generator=g, dtype=torch.float64) + 0.8)  # correlated rows
        head.bias.copy_(0.3 * torch.randn(k, generator=g, dtype=torch.float64))
    return nn.Sequential(body, head).to(dtype).eval()


def boundary_distance(model, logits, labels):
    """Per example, min over j of the distance to the hyperplane <B^T (v_y - v_j), x> + b_y - b_j = 0 of the
    linear model x -> V B x + b (float64, with the matrices the model holds): the exact l2 distance to the
    nearest change of prediction (negative for misclassified examples)."""
    v = model[1].normalized_weight().detach().double().cpu()
    body = model[0].weight.detach().double().cpu()
    z = logits.detach().double().cpu()
    out = []
    for i, y in enumerate(labels.tolist()):
        out.append(
            min(
                (z[i, y] - z[i, j]).item() / (body.T @ (v[y] - v[j])).norm().item()
                for j in range(z.shape[1])
                if j != y
            )
        )
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("c", [0.5, 3.0])
def test_pairwise_radius_is_the_exact_distance_of_a_linear_model(dtype, device, c):
    """For x -> V c Q x + b the distance to the boundary f_y = f_j is (f_y - f_j) / (c ||v_y - v_j||): the
    pairwise certificate (with the body's constant L = c) must sit just below its minimum over j. A
    certificate that ignores L is off by c, one that ignores the pairwise constants (sqrt 2) too."""
    model = linear_model(12, 6, c, seed=int(c * 10), dtype=dtype).to(device)
    x = torch.randn(80, 12, dtype=dtype, device=device)
    with torch.no_grad():
        logits = model(x)
    labels = logits.argmax(1)
    labels[:10] = (labels[:10] + 1) % 6  # some misclassified
    res = certified_accuracy(model, (x, labels), eps=(0.0, 0.05, 0.2))
    # the distance to the hyperplane <B^T (v_y - v_j), x> + b_y - b_j = 0, with the matrices the model holds
    exact = boundary_distance(model, logits, labels)
    r = res["radii"].double()
    slack = 1e-8 if dtype == torch.float64 else 2e-6
    right = exact > 0
    assert bool((r[~right] <= 0).all())  # misclassified: no certificate
    assert bool((r[right] <= exact[right]).all())  # sound
    assert torch.allclose(r[right], exact[right], rtol=slack, atol=0)  # and exact up to the norms' margins
    assert res["lipschitz"] == pytest.approx(c, rel=slack) and res["lipschitz"] >= c * (1 - 1e-7)
    # accuracy is argmax == label, computed independently
    assert res["accuracy"] == pytest.approx((logits.argmax(1) == labels).double().mean().item())
    for e in (0.0, 0.05, 0.2):
        expected = ((exact > e) & (logits.argmax(1) == labels).cpu()).double().mean().item()
        assert res["certified"][e] == pytest.approx(expected, abs=1.5 / 80)  # a radius at e: either way


def test_plain_radius_never_exceeds_the_exact_distance_of_a_linear_model():
    """The generic certificate m / (sqrt(2) L), with L the bound of the whole network (the head's norm
    included), is a lower bound of the same exact distance."""
    model = linear_model(10, 4, 2.0, seed=3)
    x = torch.randn(60, 10, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    labels = logits.argmax(1)
    lip = lipschitz_upper_bound(model)
    assert lip >= 2.0
    plain = certified_radius(logits, labels, lipschitz=lip)
    pair = certified_radius_pairwise(
        logits, labels, model[1].pairwise_lipschitz(), lipschitz=lipschitz_upper_bound(model[:1])
    )
    exact = boundary_distance(model, logits, labels)
    assert bool((plain <= exact).all()) and bool((pair <= exact).all())
    assert bool((plain < pair).any())  # the pairwise certificate is the tighter one here


def test_certified_accuracy_with_a_single_eps_and_normalisation():
    torch.manual_seed(0)
    net = cpl_network("XS").eval()
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[:5] = (y[:5] + 1) % 10
    res = certified_accuracy(net, (x, y), eps=36 / 255, batch_size=16)  # a single float
    assert list(res["certified"]) == [36 / 255]
    assert res["n"] == 32 and res["radii"].shape == (32,) and res["radii"].dtype == torch.float32
    assert res["accuracy"] == pytest.approx(27 / 32)
    assert res["lipschitz"] == 1.0
    # an input normalisation with Lipschitz constant 4 divides every radius by 4 (rounded down)
    res4 = certified_accuracy(net, (x, y), eps=(0.01,), input_lipschitz=4.0)
    assert bool((res4["radii"] <= res["radii"] / 4).all())
    assert torch.allclose(res4["radii"], res["radii"] / 4, rtol=1e-6)
    assert net.training is False
    with pytest.raises(ValueError, match="eps"):
        certified_accuracy(net, (x, y), eps=-0.1)


def test_accuracy_is_argmax_even_at_ties():
    """Accuracy is argmax == label (ties go to the first index, as torch.argmax and the official code do);
    a tie certifies nothing (radius 0), so accuracy and "radius > 0" differ exactly there."""
    logits = torch.tensor([[2.0, 2.0, 0.0], [1.0, 3.0, 3.0], [0.0, 1.0, 5.0], [4.0, 1.0, 1.0]])
    labels = torch.tensor([0, 1, 2, 1])
    res = certified_accuracy(nn.Sequential(nn.Identity()).eval(), (logits, labels), eps=0.0)
    assert res["accuracy"] == pytest.approx((logits.argmax(1) == labels).double().mean().item()) == 0.75
    assert res["radii"].tolist()[:2] == [0.0, 0.0] and res["certified"][0.0] == 0.25


def test_certified_accuracy_refuses_low_precision_and_restores_the_mode():
    net = nn.Sequential(ConvexPotentialLinear(4), FirstCoordinates(2)).train()
    x, y = torch.randn(8, 4), torch.zeros(8, dtype=torch.long)
    certified_accuracy(net, (x, y))
    assert net.training  # certified in evaluation mode, then put back
    with pytest.raises(ValueError, match=r"bfloat16.*float32 copy"):
        certified_accuracy(net.to(torch.bfloat16), (x, y))
    with pytest.raises(ValueError, match="eval"):
        network_lipschitz(net.float().train())


def test_certified_accuracy_runs_in_ieee_float32():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.backends.cuda.matmul.allow_tf32)
            return x

        def lipschitz_bound(self):
            return 1.0

    net = nn.Sequential(nn.Linear(3, 3), Probe())
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        certified_accuracy(net, (torch.randn(6, 3), torch.zeros(6, dtype=torch.long)), batch_size=3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert len(seen) >= 2 and not any(seen)  # both batches (and the shape pass of the bound) in IEEE float32


def test_bf16_trained_network_certificates_hold():
    """A CPL network trained under bf16 autocast with fused Adam (weights updated without version bumps),
    certified in float32: no certified point is flipped by PGD inside its radius."""
    torch.manual_seed(0)
    net = cpl_network((1, 1, 8, 32), input_size=8)
    x = torch.randn(256, 3, 8, 8)
    y = x.flatten(1)[:, :10].argmax(1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-2, fused=True)
    for step in range(30):
        if step % 10 == 0:  # an evaluation every "epoch", as a training loop does: fills the norm caches
            certified_accuracy(net, (x[:8], y[:8]))
        net.train()
        idx = torch.arange(step * 32, step * 32 + 32) % 256
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = margin_loss(net(x[idx]), y[idx], 0.7)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    for layer in net:  # the evaluation norms are those of the weights held now, not of the last evaluation
        if isinstance(layer, ConvexPotentialConv2d):
            fresh = conv_spectral_norm_upper(layer.weight, layer.input_size)
            assert layer.eval_spectral_norm().item() == fresh
        elif isinstance(layer, ConvexPotentialLinear):
            assert layer.eval_spectral_norm().item() == dense_spectral_norm_upper(layer.weight)
    res = certified_accuracy(net, (x[:64], y[:64]))
    r = res["radii"]
    certified = r > 0
    assert certified.sum() >= 5
    xc, yc, rc = x[:64][certified], y[:64][certified], r[certified]
    _, fooled = pgd_l2(net, xc, yc, 0.999 * rc, steps=30, restarts=2)
    assert not fooled.any()


def test_network_lipschitz_with_row_normalized_head():
    net = cpl_network("XS", head="lln").eval()
    lip, pairwise = network_lipschitz(net, input_lipschitz=2.0)
    assert lip == pytest.approx(2.0, abs=1e-6)
    assert pairwise.shape == (10, 10)
    assert torch.equal(pairwise.diagonal(), torch.zeros(10, dtype=torch.float64))

    class NoBound(nn.Module):  # a module the bounds do not know (and that gives no bound of its own)
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="NoBound"):
        network_lipschitz(nn.Sequential(NoBound(), FirstCoordinates(2)).eval())


def test_docstring_examples():
    result = doctest.testmod(cpl_mini.certify, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


# -- the two spellings of a radius ---------------------------------------------------------------------
def test_labels_of_whole_grey_levels_are_fractions_and_read_back_exactly():
    for k in range(1, 1001):
        assert eps_label(k / 255) == f"{k}/255"
        assert parse_eps(f"{k}/255") == k / 255 == parse_eps(eps_label(k / 255))
    assert eps_label(36 / 255 * (1 + 1e-15)) == "36/255"  # a float a few ulps off: still 36 grey levels
    assert [parse_eps(s) for s in (" 36 / 255 ", "36/255", "0.1", 0.1, 1, " 1e-3 ")] == [
        36 / 255,
        36 / 255,
        0.1,
        0.1,
        1.0,
        0.001,
    ]
    assert parse_eps(torch.tensor(0.25, dtype=torch.float64)) == 0.25


def test_other_radii_are_labelled_by_a_decimal_that_reads_back_exactly():
    g = torch.Generator().manual_seed(0)
    values = [0.0, 0.1, 0.5, 1e-12, 3.0, 2.5e-7, float("inf")] + torch.rand(200, generator=g).tolist()
    for e in values:
        label = eps_label(e)
        assert parse_eps(label) == e, (e, label)
        whole = round(e * 255) if math.isfinite(e) else 0
        if whole >= 1 and e * 255 == whole:
            assert label == f"{whole}/255"
        elif math.isfinite(e) and abs(e * 255 - whole) > 1e-6:
            assert "/" not in label and float(label) == e and len(label) <= len(repr(e)), (e, label)
    assert (eps_label(0.1), eps_label(0.0), eps_label(0.5)) == ("0.1", "0", "0.5")


@pytest.mark.parametrize(
    "bad",
    ["", "abc", "36/", "/255", "36/0", "36/-255", "1/2/3", "-0.1", "nan", "-1/255", "36|255", None, [0.1]],
)
def test_a_bad_radius_is_a_clear_value_error(bad):
    with pytest.raises(ValueError, match=r"eps must be .*36/255"):
        parse_eps(bad)
    with pytest.raises(ValueError, match="eps"):
        eps_label(bad)


def test_certified_accuracy_takes_either_spelling_and_keys_by_floats():
    torch.manual_seed(1)
    net = nn.Sequential(ConvexPotentialLinear(6), FirstCoordinates(3)).eval()
    x = torch.randn(64, 6)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[:8] = (y[:8] + 1) % 3
    floats = certified_accuracy(net, (x, y), eps=(36 / 255, 0.1, 72 / 255))
    texts = certified_accuracy(net, (x, y), eps=["36/255", " 0.1", 72 / 255])
    assert list(texts["certified"]) == [36 / 255, 0.1, 72 / 255]
    assert texts["certified"] == floats["certified"]
    single = certified_accuracy(net, (x, y), eps="36/255")  # one string is one radius, not its characters
    assert single["certified"] == {36 / 255: floats["certified"][36 / 255]}
    for e, value in floats["certified"].items():  # independent count: correct and radius > eps
        assert value == ((floats["radii"].double() > e) & (net(x).argmax(1) == y)).double().mean().item()
    with pytest.raises(ValueError, match="eps"):
        certified_accuracy(net, (x, y), eps=["36/255", "wide"])
    with pytest.raises(ValueError, match="eps"):
        certified_accuracy(net, (x, y), eps=None)


def test_format_table_names_the_radii_by_their_labels():
    result = {"accuracy": 0.5, "certified": {36 / 255: 0.25, 0.1: 0.125, 108 / 255: 0.0}}
    lines = format_table(result).splitlines()
    assert [line.split("|")[0].strip() for line in lines[2:]] == ["clean", "36/255", "0.1", "108/255"]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["50.00%", "25.00%", "12.50%", "0.00%"]
    long = format_table({"accuracy": 1.0, "certified": {0.123456789012345: 1.0}}).splitlines()
    assert long[2].index("|") == long[3].index("|") == long[0].index("|")  # columns stay aligned


# -- the command line ------------------------------------------------------------------------------------
def tiny_data(num_classes=10, n_test=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CifarData(
        torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, num_classes, (64,), generator=g),
        torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, num_classes, (n_test,), generator=g),
        [str(i) for i in range(num_classes)],
        "cifar10" if num_classes == 10 else "cifar100",
    )


def tiny_run(folder, config=None, model=None):
    """A run folder with an untrained XS network's checkpoint (no training: a second or so)."""
    config = config or TrainConfig(size="XS", device="cpu", batch_size=32)
    model = model or run_network(config, torch.rand(3), torch.rand(3) + 0.1)
    save_checkpoint(folder / "checkpoint.pt", model, torch.optim.Adam(model.parameters()), 1, config, [], 1)
    return folder


@pytest.fixture
def fake_cifar(monkeypatch):
    """``cpl_mini.cifar.load_cifar`` (where the command line looks it up) gives a tiny synthetic CIFAR-10."""
    calls = []

    def load(name="cifar10", root=None, download=True, **kwargs):
        calls.append((name, download))
        return tiny_data()

    monkeypatch.setattr("cpl_mini.cifar.load_cifar", load)
    return calls


def run_cli(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    except KeyboardInterrupt:  # escaped: a failure of this test, not the end of the test session
        code = "KeyboardInterrupt escaped"
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, err)


def test_a_run_folder_certifies_and_its_json_names_radii_by_their_labels(tmp_path, capsys, fake_cifar):
    run = tiny_run(tmp_path / "run")
    code, out, err = run_cli(
        [run, "--json", "--limit-test", 40, "--eps", "36/255", "0.1", "--device", "cpu"], capsys
    )
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    assert list(record["certified"]) == ["36/255", "0.1"] and record["n"] == 40
    model, loader, _ = load_run_model(run, data=tiny_data(), device="cpu", limit_test=40)
    ref = certified_accuracy(model, loader, eps=(36 / 255, 0.1))
    assert record["certified"] == {eps_label(e): v for e, v in ref["certified"].items()}
    assert record["accuracy"] == ref["accuracy"] and record["lipschitz"] == ref["lipschitz"]
    assert fake_cifar == [("cifar10", True)]
    code, out, err = run_cli([run, "--device", "cpu", "--no-download"], capsys)  # the default radii, a table
    assert code == 0 and fake_cifar[-1] == ("cifar10", False)
    assert [line.split("|")[0].strip() for line in out.splitlines()[3:]] == ["clean"] + [
        eps_label(e) for e in DEFAULT_EPS
    ]
    assert "48 test images" in out


def no_device():
    """A CUDA device this machine does not have."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["{run}", "--eps", "wide"], ["--eps", "'wide'", "36/255"]),
        (["{run}", "--eps", "36/255", "-0.1"], ["--eps", ">= 0"]),
        (["{run}", "--eps"], ["--eps"]),
        (["{run}", "--limit-test", "0"], ["--limit-test"]),
        (["{run}", "--device", no_device()], ["device"]),
        (["{run}", "--device", "banana"], ["device"]),
        (["{tmp}/nothing"], ["no run folder", "nothing"]),
        (["{tmp}"], ["no checkpoint"]),
        (["{corrupt}"], ["corrupt"]),
        (["{hundred}"], ["num_classes=100", "num_classes=10"]),
        ([], ["RUN_DIR"]),
        (["{run}", "--bogus"], ["--bogus"]),
    ],
)
def test_each_bad_input_is_one_line_and_exit_status_2(argv, words, tmp_path, capsys, fake_cifar):
    run = tiny_run(tmp_path / "run")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a whole checkpoint")
    # a checkpoint whose network has 100 outputs while its run says CIFAR-10
    hundred = tiny_run(tmp_path / "hundred", model=cpl_network("XS", num_classes=100, mean=torch.rand(3)))
    names = {"run": run, "tmp": tmp_path, "corrupt": tmp_path / "corrupt", "hundred": hundred}
    code, out, err = run_cli([a.format(**names) for a in argv], capsys)
    assert_one_line_error(code, err, *words)
    assert out == ""


def test_a_missing_data_archive_is_one_line(tmp_path, capsys):
    run = tiny_run(tmp_path / "run")
    code, _, err = run_cli(
        [run, "--data-root", tmp_path / "empty", "--no-download", "--device", "cpu"], capsys
    )
    assert_one_line_error(code, err, "CIFAR-10 not found", "cifar-10-python.tar.gz")


def test_data_of_another_class_count_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("cpl_mini.cifar.load_cifar", lambda *args, **kwargs: tiny_data(num_classes=100))
    code, _, err = run_cli([tiny_run(tmp_path / "run"), "--device", "cpu"], capsys)
    assert_one_line_error(code, err, "10 classes", "100 classes")


def test_an_interrupted_certification_exits_130(tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("cpl_mini.runs.load_checkpoint", interrupt)
    code, out, err = run_cli([tiny_run(tmp_path / "run"), "--device", "cpu"], capsys)
    assert code == 130 and err.startswith("interrupted") and len(err.strip().splitlines()) == 1
    assert out == ""


def test_the_module_command_prints_one_line_errors(tmp_path):
    """``python -m cpl_mini.certify`` itself, on a corrupt checkpoint: one line, no traceback."""
    (tmp_path / "checkpoint.pt").write_bytes(b"not a zip file")
    proc = subprocess.run(
        [sys.executable, "-m", "cpl_mini.certify", str(tmp_path), "--device", "cpu"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line_error(proc.returncode, proc.stderr, "corrupt", str(tmp_path))


def test_help_covers_every_option_its_default_and_the_exit_statuses(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in (
        "--eps",
        "--data-root",
        "--download",
        "--no-download",
        "--limit-test",
        "--model",
        "--device",
        "--json",
    ):
        assert option in text, option
    assert text.count("(default: ") == 7  # every option but --help
    assert "RUN_DIR" in text and "36/255 72/255 108/255" in text
    assert "exit status: 0 certified, 2 bad input" in text and "130 interrupted" in text


def test_certified_accuracy_bounds_plain_convolutions_on_the_input_size():
    # A plain nn.Conv2d has a tight bound only for a known input size (the size-free bound sums the
    # taps); certified_accuracy takes the size from the first batch.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).eval()
    x, y = torch.randn(20, 2, 6, 6), torch.randint(0, 4, (20,))
    res = certified_accuracy(net, (x, y), eps=0.1)
    tight = lipschitz_upper_bound(net, input_shape=(2, 6, 6))
    assert res["lipschitz"] == tight < lipschitz_upper_bound(net)
    assert certified_accuracy(net, (x[:0], y[:0]), eps=0.1)["lipschitz"] == lipschitz_upper_bound(net)


def test_a_run_of_your_own_network_certifies_with_model(tmp_path, capsys, fake_cifar, monkeypatch):
    (tmp_path / "my_nets_cert.py").write_text(
        "import torch.nn as nn\n"
        "from cpl_mini import ConvexPotentialLinear, FirstCoordinates\n"
        "def small(config):\n"
        "    return nn.Sequential(nn.Flatten(), ConvexPotentialLinear(3072, 16), FirstCoordinates(10))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from my_nets_cert import small

    config = TrainConfig(size="XS", device="cpu", batch_size=32, model="my_nets_cert:small")
    run = tiny_run(tmp_path / "run", config, own_network(small, config, torch.rand(3), torch.rand(3) + 0.1))
    code, out, err = run_cli([run, "--device", "cpu"], capsys)
    assert_one_line_error(code, err, "pass model=")  # never imports the factory the checkpoint names
    code, out, err = run_cli([run, "--json", "--model", "my_nets_cert:small", "--device", "cpu"], capsys)
    assert code == 0, err
    record = json.loads(out)
    model, loader, _ = load_run_model(run, data=tiny_data(), device="cpu", model=small)
    assert record["certified"]["36/255"] == certified_accuracy(model, loader)["certified"][36 / 255]
    code, out, err = run_cli([run, "--model", "no_such_module_here:f", "--device", "cpu"], capsys)
    assert_one_line_error(code, err, "no module")
