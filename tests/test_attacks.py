"""Soundness of the certificates against an l2 PGD attack, and checks of the attack itself.

A certified radius ``r(x) = m(x) / (sqrt(2) L)`` is a *lower* bound of the distance to the nearest
adversarial example; the distance PGD finds is an *upper* bound of it. So, for a trained CPL network
with the package's sound norms: no certified point is flipped inside ``0.99 r``, the margin never
falls faster than ``sqrt(2) L`` per unit of l2 distance, and ``r`` never exceeds the PGD distance.
These checks have teeth: the same attack refutes a radius only twice too large, fools an ordinary MLP
inside the radius its margin would claim if it were 1-Lipschitz, and on a linear model (float64) finds
the exact minimal distance ``min_j (f_y - f_j) / ||w_y - w_j||``.
"""

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cpl_mini.attacks import margin, minimal_adversarial_l2, pgd_l2
from cpl_mini.certify import certified_accuracy
from cpl_mini.models import cpl_network
from cpl_mini.train import margin_loss

SQRT2 = math.sqrt(2.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small tensors: one thread is faster, and the machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _norms(z):
    return z.flatten(1).norm(dim=1)


def _prototype_images(n, size=8, seed=0):
    """Ten classes of ``(3, size, size)`` images: a fixed random prototype per class plus noise."""
    g = torch.Generator().manual_seed(1234)
    protos = 0.2 * torch.randn(10, 3, size, size, generator=g)
    g.manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return protos[y] + 0.1 * torch.randn(n, 3, size, size, generator=g), y


def _train(model, x, y, steps, lr, loss_fn, batch=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _cifar_8x8(root):
    """Real CIFAR-10 pictures read by cpl_mini.cifar, mean-subtracted, then averaged to 8x8 (cheap)."""
    from cpl_mini import ArchiveChecksumWarning, DeviceLoader, load_cifar

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ArchiveChecksumWarning)  # the offline copy is a known JPEG decode
        data = load_cifar("cifar10", root=root, download=False)
    train = DeviceLoader(
        data.train_images, data.train_labels, 2000, train=False, limit=2000, channels_last=False
    )
    test = DeviceLoader(
        data.test_images, data.test_labels, 200, train=False, mean=train.mean, limit=200, channels_last=False
    )
    (xtr, ytr), (xte, yte) = next(iter(train)), next(iter(test))
    return F.avg_pool2d(xtr, 4), ytr, F.avg_pool2d(xte, 4), yte


@pytest.fixture(scope="module", params=["synthetic", "cifar10"])
def trained_cpl(request):
    """A small CPL network (2 conv + 1 dense layer) trained a few hundred steps: real margins."""
    if request.param == "synthetic":
        xtr, ytr = _prototype_images(2000, seed=0)
        xte, yte = _prototype_images(200, seed=1)
    else:
        xtr, ytr, xte, yte = _cifar_8x8(request.getfixturevalue("cifar_root"))
    torch.manual_seed(0)
    model = cpl_network((2, 1, 16, 64), input_size=8)
    _train(model, xtr, ytr, 300, 1e-2, lambda out, t: margin_loss(out, t, 0.7))
    res = certified_accuracy(model, (xte, yte))
    return {
        "name": request.param,
        "model": model,
        "x": xte,
        "y": yte,
        "radii": res["radii"],
        "lipschitz": res["lipschitz"],
        "accuracy": res["accuracy"],
    }


# ---------------------------------------------------------------------------------------------
# soundness of the certificates
# ---------------------------------------------------------------------------------------------
def test_no_certified_point_is_flipped_inside_its_radius(trained_cpl):
    model, x, y, r, lip = (trained_cpl[k] for k in ("model", "x", "y", "radii", "lipschitz"))
    assert 1.0 <= lip < 1.0 + 1e-5  # sound norms of a CPL network: Lipschitz 1 up to the rounding margin
    cert = r > 0
    assert cert.sum() >= 40 and r[cert].median() > 0.02, "the network must have real margins for this test"
    x, y, r = x[cert][:100], y[cert][:100], r[cert][:100]
    m0 = margin(model(x), y).detach()
    x_adv, fooled = pgd_l2(model, x, y, 0.99 * r, steps=50, restarts=2, n_targets=2, seed=1)
    assert not fooled.any(), f"{int(fooled.sum())} certified points flipped inside 0.99 of their radius"
    dist = _norms(x_adv - x)
    assert (dist <= 0.99 * r * (1 + 1e-5) + 1e-6).all()  # float32 rounding of x + delta
    m_adv = margin(model(x_adv), y).detach()
    # never faster than the certificate allows: m(x') >= m(x) - sqrt(2) L ||x' - x||
    rate = (m0 - m_adv) / (SQRT2 * lip * dist)
    assert (m_adv >= m0 - SQRT2 * lip * dist - 1e-5).all() and rate.max() <= 1 + 1e-4
    # the attack did push: the perturbations use the whole budget, at a good part of the largest rate
    assert (dist > 0.98 * r).float().mean() > 0.9
    assert rate.median() > 0.3
    # the same attack refutes a radius three times too large (a claimed Lipschitz constant of 1/3)
    _, fooled_3r = pgd_l2(model, x, y, 3 * 0.99 * r, steps=50, seed=1)
    assert fooled_3r.float().mean() > 0.5


def test_certified_radius_never_exceeds_the_nearest_adversarial_pgd_finds(trained_cpl):
    model, x, y, r = (trained_cpl[k] for k in ("model", "x", "y", "radii"))
    correct = r > 0
    x, y, r = x[correct][:100], y[correct][:100], r[correct][:100].double()
    dist, x_adv = minimal_adversarial_l2(model, x, y, steps=30, search_steps=8, eps_init=0.5, seed=2)
    assert torch.isfinite(dist).all()
    assert (r <= dist).all(), f"certified radius above a PGD distance: min ratio {(dist / r).min():.4f}"
    # the witnesses are real: at the returned distance, and not classified y with a positive margin
    assert torch.allclose(_norms((x_adv - x).double()), dist, rtol=1e-5)
    assert (margin(model(x_adv), y) <= 1e-5).all()
    # the attack is strong enough for the comparison to mean something: the certificate is tight to ~2x
    assert (dist / r).median() < 3.0


# ---------------------------------------------------------------------------------------------
# the attack works
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_mlp():
    xtr, ytr = _prototype_images(2000, seed=0)
    xte, yte = _prototype_images(200, seed=1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(192, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    _train(model, xtr, ytr, 200, 1e-3, F.cross_entropy)
    with torch.no_grad():
        keep = model(xte).argmax(1) == yte
    return model, xte[keep], yte[keep]


def test_pgd_fools_an_unconstrained_mlp(trained_mlp):
    model, x, y = trained_mlp
    assert len(y) > 150  # it learnt the task
    with torch.no_grad():
        naive = margin(model(x), y) / SQRT2  # a "radius" that would hold only if the MLP were 1-Lipschitz
    x_adv, fooled = pgd_l2(model, x, y, 0.99 * naive, steps=30)
    assert fooled.float().mean() > 0.9
    dist, x_min = minimal_adversarial_l2(model, x, y, steps=30, search_steps=8, eps_init=0.5)
    assert torch.isfinite(dist).all() and (dist < 0.5 * naive).all()
    # gradient-driven, not luck: random directions of the same length fool almost none
    u = torch.randn_like(x)
    x_rand = x + u / _norms(u).view(-1, 1, 1, 1) * dist.float().view(-1, 1, 1, 1)
    with torch.no_grad():
        assert (margin(model(x_rand), y) <= 0).float().mean() < 0.1
    # the cross-entropy objective works too
    _, fooled_ce = pgd_l2(model, x, y, 0.99 * naive, steps=30, loss="ce")
    assert fooled_ce.float().mean() > 0.9


def test_targeted_attack_reaches_the_target(trained_mlp):
    model, x, y = trained_mlp
    target = (y + 1) % 10
    x_adv, hit = pgd_l2(model, x, target, 5.0, steps=30, targeted=True)
    assert hit.float().mean() > 0.9
    with torch.no_grad():
        assert (model(x_adv[hit]).argmax(1) == target[hit]).all()


def _linear_problem(n=60, d=20, k=10, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(d, k).double()
    x = torch.randn(n, d, dtype=torch.float64)
    with torch.no_grad():
        f = lin(x)
    y = f.argmax(1)
    w = lin.weight.detach()
    ratio = (f.gather(1, y[:, None]) - f) / (w[y][:, None, :] - w[None]).norm(dim=2)
    ratio[torch.arange(n), y] = math.inf
    return lin, x, y, ratio.min(dim=1).values  # exact distance to the nearest other class region


def test_minimal_distance_on_a_linear_model_matches_the_exact_value():
    lin, x, y, exact = _linear_problem()
    dist, x_adv = minimal_adversarial_l2(lin, x, y, steps=10, search_steps=12, n_targets=9, shrink_steps=30)
    ratio = dist / exact
    assert (ratio >= 1 - 1e-9).all()  # no adversarial example is nearer than the exact distance
    assert (ratio <= 1 + 1e-4).all(), f"max ratio {ratio.max():.6f}"
    assert (margin(lin(x_adv), y) <= 1e-9).all()
    # without the target sweep the margin can lock onto the runner-up class: exact for most, never below
    dist0, _ = minimal_adversarial_l2(lin, x, y, steps=20, search_steps=12, shrink_steps=30)
    ratio0 = dist0 / exact
    assert (ratio0 >= 1 - 1e-9).all() and (ratio0 <= 1 + 1e-3).float().mean() >= 0.8


def test_pgd_on_a_linear_model_succeeds_exactly_beyond_the_exact_distance():
    lin, x, y, exact = _linear_problem(seed=1)
    _, inside = pgd_l2(lin, x, y, exact * (1 - 1e-6), steps=20, restarts=2, n_targets=9)
    _, outside = pgd_l2(lin, x, y, exact * 1.01, steps=20, n_targets=9)
    assert not inside.any() and outside.all()


# ---------------------------------------------------------------------------------------------
# contract of pgd_l2
# ---------------------------------------------------------------------------------------------
def test_pgd_respects_ball_box_and_model_state(trained_mlp):
    model, x, y = trained_mlp
    x, y = x[:40], y[:40]
    eps = torch.linspace(0.0, 3.0, 40)  # one radius per example, 0 included
    lower, upper = x.min() - 0.05, x.max() + 0.05
    model.train()
    model.zero_grad(set_to_none=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    x_adv, fooled = pgd_l2(model, x, y, eps, steps=10, restarts=3, seed=5, lower=lower, upper=upper)
    assert model.training  # state restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())  # gradients w.r.t. the input only
    assert torch.equal(torch.get_rng_state(), rng)  # private generator
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (_norms(x_adv - x) <= eps * (1 + 1e-5) + 1e-7).all()
    assert (x_adv >= lower).all() and (x_adv <= upper).all()
    assert not fooled[0] and torch.equal(x_adv[0], x[0])  # eps = 0 changes nothing
    model.eval()
    with torch.no_grad():
        assert torch.equal(fooled, margin(model(x_adv), y) <= 0)
    x_again, fooled_again = pgd_l2(model, x, y, eps, steps=10, restarts=3, seed=5, lower=lower, upper=upper)
    assert torch.equal(x_again, x_adv) and torch.equal(fooled_again, fooled)  # seeded


def test_pgd_in_eval_mode_does_not_touch_the_power_iteration_vector():
    model = cpl_network((1, 1, 8, 32), input_size=8).train()
    u = [b.clone() for name, b in model.named_buffers() if name.endswith(".u")]
    x, y = _prototype_images(8)
    pgd_l2(model, x, y, 0.5, steps=3, restarts=2)
    assert model.training
    after = [b for n, b in model.named_buffers() if n.endswith(".u")]
    assert all(torch.equal(a, b) for a, b in zip(u, after))


def test_clear_errors(trained_mlp):
    model, x, y = trained_mlp
    x, y = x[:4], y[:4]
    with pytest.raises(ValueError, match="one value per example"):
        pgd_l2(model, x, y, torch.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        pgd_l2(model, x, y, -1.0)
    with pytest.raises(ValueError, match="outside the box"):
        pgd_l2(model, x, y, 1.0, lower=0.0, upper=1.0)
    with pytest.raises(ValueError, match="restarts"):
        pgd_l2(model, x, y, 1.0, restarts=0)
    with pytest.raises(ValueError, match="untargeted"):
        pgd_l2(model, x, y, 1.0, targeted=True, n_targets=3)
    with pytest.raises(ValueError, match="loss"):
        pgd_l2(model, x, y, 1.0, loss="hinge")
    with pytest.raises(ValueError, match="labels"):
        pgd_l2(model, x, y[:2], 1.0)


def test_attacks_run_in_ieee_float32():
    """PGD evaluates the same function the certificate is computed for: float32 without TF32 (the switches
    exist on CPUs too), whatever the caller enabled, and the caller's setting comes back afterwards."""
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            seen.append(torch.backends.cuda.matmul.allow_tf32)
            return self.lin(x)

    model = Probe()
    x, y = torch.randn(6, 4), torch.zeros(6, dtype=torch.long)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        pgd_l2(model, x, y, 0.5, steps=2)
        minimal_adversarial_l2(model, x, y, steps=2, search_steps=1, max_doublings=1, shrink_steps=1)
        after = torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert seen and not any(seen) and after is True
