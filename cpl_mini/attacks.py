r"""l2 adversarial attacks: projected gradient descent on the margin, and the smallest perturbation it finds.

A certificate says that no input within l2 radius ``r(x)`` of ``x`` changes the prediction. An attack
gives the other side: an input ``x'`` that *does* change it, at distance ``||x' - x||`` from ``x``. For a
sound certificate

.. math::  r(x) \;\le\; d^\star(x) = \min \{ \|x' - x\|_2 : x' \text{ misclassified} \}
           \;\le\; \|x'_{\mathrm{PGD}} - x\|_2 ,

so the attack's distances are **upper** bounds of the distance to the nearest adversarial example and
the certified radii are **lower** bounds of it; the gap between the two is what the book plots.

The objective is the logit margin of the label ``y`` (untargeted) or of a target class ``t`` (targeted):

.. math::  m(x) = f_y(x) - \max_{j \ne y} f_j(x) , \qquad
           m_t(x) = \max_{j \ne t} f_j(x) - f_t(x) ,

and the attack succeeds when ``m <= 0`` (the input is no longer classified ``y`` with a positive
margin; ties count as successes, as :func:`cpl_mini.certify.certified_radius` counts a radius ``<= 0``
as not correct). PGD (Madry et al., 2018) minimises ``m`` over the ball ``B(x, eps) = {x' : ||x' - x||_2
<= eps}``, optionally intersected with a box ``[lower, upper]`` (the valid pixel range), by steps along
the normalised gradient:

.. math::  x'_{k+1} = \Pi\big(x'_k - \alpha\, g_k / \|g_k\|_2\big), \qquad g_k = \nabla_{x'} m(x'_k) ,

with ``Pi`` the projection on the ball (``delta -> delta * min(1, eps / ||delta||)``) followed by a
clamp to the box. The clamp keeps a point of the ball in the ball (it moves every coordinate toward
the box, which contains ``x``), so every iterate is feasible; the pair is a feasible map, not the exact
projection on the intersection.

Conventions: ``model`` maps a batch ``(N, *features)`` to logits ``(N, K)`` and treats examples
independently (no batch statistics). The attack runs it in evaluation mode, without autocast, and
restores its train/eval state; gradients are taken with respect to the input only (parameters'
``.grad`` are never touched). Random draws use a private CPU ``torch.Generator`` seeded by ``seed``
(the global RNG is untouched; results are reproducible on any device).
"""

import contextlib
import math
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .precision import has_float64, ieee_precision

Model = Callable[[torch.Tensor], torch.Tensor]
Radius = Union[float, torch.Tensor]

__all__ = ["margin", "pgd_l2", "minimal_adversarial_l2"]

_LOSSES = ("margin", "ce")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def margin(logits: torch.Tensor, y: torch.Tensor, targeted: bool = False) -> torch.Tensor:
    r"""The attack's objective per example, shape ``(N,)``; the attack succeeds where it is ``<= 0``.

    Untargeted: ``m = f_y - max_{j != y} f_j`` (``y`` the true label). Targeted: ``m = max_{j != t} f_j
    - f_t`` (``y`` holds the targets ``t``). ``logits``: ``(N, K)`` with ``K >= 2``; ``y``: ``(N,)`` int64.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"expected logits of shape (N, K) with K >= 2, got {tuple(logits.shape)}")
    own = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values
    return others - own if targeted else own - others


def _view(t, like):
    """A per-example ``(N,)`` tensor shaped to broadcast against ``like`` ``(N, ...)``."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def _flat_norm(z):
    return torch.linalg.vector_norm(z.flatten(1), dim=1)


def _per_example(value, n, like, name):
    """A float or an ``(N,)`` tensor as an ``(N,)`` tensor of ``like``'s dtype and device, checked."""
    t = torch.as_tensor(value, dtype=like.dtype if like.is_floating_point() else torch.float32)
    t = t.to(like.device)
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(
            f"{name} must be a number or a tensor of shape ({n},) (one value per example), "
            f"got shape {tuple(t.shape)}"
        )
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(
            f"{name} must be finite and >= 0, got values in [{t.min().item()}, {t.max().item()}]"
        )
    return t.clone()


def _bound(value, x, name):
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=x.dtype).to(x.device)
    try:
        torch.broadcast_shapes(t.shape, x.shape)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} does not broadcast against the inputs "
            f"{tuple(x.shape)}; give e.g. per-channel values of shape (C, 1, 1)"
        ) from None
    return t


def _prepare(model, x, y, lower, upper):
    if not torch.is_tensor(x) or x.dim() < 2:
        raise ValueError(
            "x must be a batch tensor of shape (N, *features); "
            "add a batch dimension with x.unsqueeze(0) for a single input"
        )
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point (the model's input scale), got {x.dtype}")
    if isinstance(model, nn.Module):  # the model's device and floating dtype, as lipschitz.py does
        p = next(model.parameters(), None)
        if p is not None and p.is_floating_point():
            x = x.to(device=p.device, dtype=p.dtype)
    x = x.detach()
    y = torch.as_tensor(y).to(x.device)
    if y.shape != x.shape[:1] or y.is_floating_point():
        raise ValueError(f"y must be integer labels of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
    y = y.long()
    lo, hi = _bound(lower, x, "lower"), _bound(upper, x, "upper")
    tol = 1e-5
    if lo is not None and bool((x < lo - tol).any()) or hi is not None and bool((x > hi + tol).any()):
        raise ValueError(
            "the inputs x lie outside the box [lower, upper]; pass the bounds in the model's "
            "input scale (e.g. (0 - mean) / std and (1 - mean) / std) or lower=upper=None"
        )
    return x, y, lo, hi


def _clamp(z, lo, hi):
    if lo is not None:
        z = torch.maximum(z, lo)
    if hi is not None:
        z = torch.minimum(z, hi)
    return z


def _project(x, z, eps, lo, hi):
    """``x + delta * min(1, eps / ||delta||)`` clamped to the box: a point of ``B(x, eps)`` in the box."""
    delta = z - x
    norm = _flat_norm(delta)
    scale = torch.where(norm > eps, eps / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.ones_like(norm))
    return _clamp(x + delta * _view(scale, delta), lo, hi)


@contextlib.contextmanager
def _attack_mode(model, device):
    """Evaluation mode, no autocast and IEEE float32 (no TF32) inside; the model's train/eval state
    restored on exit."""
    was_training = model.training if isinstance(model, nn.Module) else None
    if was_training:
        model.eval()
    try:
        try:
            no_autocast = torch.autocast(device.type, enabled=False)
        except RuntimeError:  # a device type autocast does not know
            no_autocast = contextlib.nullcontext()
        with torch.enable_grad(), no_autocast, ieee_precision():
            yield
    finally:
        if was_training:
            model.train(True)


def _logits(model, z):
    out = model(z)
    if out.dim() != 2:
        raise ValueError(f"the model must return logits of shape (N, K), got {tuple(out.shape)}")
    return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out


def _random_in_ball(x, eps, generator):
    """Uniform points of ``B(x, eps)``: direction ``u / ||u||`` (``u`` Gaussian), radius ``eps * U^(1/d)``."""
    n, d = x.shape[0], x[0].numel()
    u = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x)
    r = torch.rand(n, generator=generator, dtype=torch.float64).pow(1.0 / d).to(x)
    return x + u / _view(_flat_norm(u).clamp_min(1e-30), u) * _view(eps * r, u)


def _objective(logits, y, m, loss, targeted, target=None):
    """The scalar whose gradient the attack descends (a sum over examples: per-example gradients)."""
    if target is not None:  # a targeted run of an untargeted attack: the pair margin f_y - f_t
        return (logits.gather(1, y[:, None]) - logits.gather(1, target[:, None])).sum()
    if loss == "margin":
        return m.sum()
    ce = F.cross_entropy(logits, y, reduction="sum")
    return ce if targeted else -ce


def _pgd_run(
    model, x, y, eps, alpha, steps, start, generator, targeted, loss, lo, hi, stop_early, target=None
):
    """One PGD run; returns the iterate of lowest margin per example and that margin."""
    z = _project(x, _random_in_ball(x, eps, generator), eps, lo, hi) if start == "random" else x.clone()
    best_z, best_m = z.clone(), torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
    for k in range(steps + 1):
        z.requires_grad_(True)
        logits = _logits(model, z)
        m = margin(logits, y, targeted)
        with torch.no_grad():
            md = m.detach().to(x.dtype)
            better = md < best_m
            best_m = torch.where(better, md, best_m)
            best_z = torch.where(_view(better, z), z.detach(), best_z)
        if k == steps or (stop_early and bool((best_m <= 0).all())):
            break
        (g,) = torch.autograd.grad(_objective(logits, y, m, loss, targeted, target), z)
        with torch.no_grad():
            g_norm = _flat_norm(g).clamp_min(1e-30)
            z = _project(x, z.detach() - g * _view(alpha / g_norm, g), eps, lo, hi)
    return best_z, best_m


def _pgd(
    model,
    x,
    y,
    eps,
    steps,
    step_size,
    restarts,
    generator,
    targeted,
    loss,
    lo,
    hi,
    stop_early=False,
    n_targets=0,
):
    """PGD on prepared tensors, inside ``_attack_mode``; returns ``(x_adv, margin)``."""
    n = x.shape[0]
    alpha = 2.5 * eps / max(steps, 1) if step_size is None else _per_example(step_size, n, x, "step_size")
    best_z, best_m = x.clone(), torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    ranked = None
    if n_targets:  # the other classes by decreasing clean logit
        with torch.no_grad():
            clean = _logits(model, x)
        ranked = clean.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)
        n_targets = min(int(n_targets), clean.shape[1] - 1)
    runs = [("clean" if r == 0 else "random", None) for r in range(restarts)]
    runs += [("clean", k) for k in range(n_targets)]
    for r, (start, k) in enumerate(runs):
        idx = torch.arange(n, device=x.device) if r == 0 else (best_m > 0).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        z, m = _pgd_run(
            model,
            x[idx],
            y[idx],
            eps[idx],
            alpha[idx],
            steps,
            start,
            generator,
            targeted,
            loss,
            None if lo is None else _sub(lo, idx, x),
            None if hi is None else _sub(hi, idx, x),
            stop_early,
            None if k is None else ranked[idx, k],
        )
        better = m < best_m[idx]
        best_m[idx] = torch.where(better, m, best_m[idx])
        best_z[idx] = torch.where(_view(better, z), z, best_z[idx])
    return best_z, best_m


def _sub(bound, idx, x):
    """The rows ``idx`` of a box bound that may be per-example (leading dim N) or shared."""
    if bound.dim() == x.dim() and bound.shape[0] == x.shape[0] and x.shape[0] > 1:
        return bound[idx]
    return bound


def _check_common(steps, restarts, loss, n_targets=0, targeted=False):
    if int(n_targets) != n_targets or n_targets < 0:
        raise ValueError(f"n_targets must be an integer >= 0, got {n_targets!r}")
    if n_targets and targeted:
        raise ValueError("n_targets (a sweep over target classes) only applies to untargeted attacks")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if int(restarts) != restarts or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1 (the number of runs), got {restarts!r}")
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def pgd_l2(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: Radius,
    steps: int = 50,
    step_size: Optional[Radius] = None,
    restarts: int = 1,
    seed: int = 0,
    targeted: bool = False,
    loss: str = "margin",
    lower=None,
    upper=None,
    n_targets: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Projected gradient descent on the margin inside the l2 ball ``B(x, eps)`` (Madry et al., 2018).

    Each run iterates ``x'_{k+1} = Pi(x'_k - alpha g_k / ||g_k||)`` for ``steps`` steps, with ``g_k`` the
    gradient of the objective (the margin ``m`` of :func:`margin`, or the cross-entropy: ascended when
    untargeted, descended when targeted) and ``Pi`` the projection on the ball then the clamp to the box
    (module docstring). Run 0 starts at ``x``; runs ``1 .. restarts - 1`` start at uniform random points
    of the ball and attack only the examples no earlier run has fooled. Then, with ``n_targets = k``, k
    more runs (from ``x``, on the examples still not fooled) descend the pair margin ``f_y - f_t`` for
    each of the ``k`` classes ``t`` of highest clean logit besides ``y`` (the targeted sweep of
    AutoAttack): the margin ``m = min_j (f_y - f_j)`` is concave in the logits, so descending it can lock
    onto the runner-up class while another class is nearer; a sweep over all ``K - 1`` classes finds the
    exact distance of a linear model. Per example, the iterate of **lowest margin** ``m`` over all steps
    and runs is kept (so a success is never lost), whatever ``loss``.

    Args:
        model: callable ``(N, *features) -> (N, K)`` logits (an ``nn.Module`` is put in eval mode).
        x: inputs ``(N, *features)``, float32 or float64, in the model's input scale.
        y: labels ``(N,)`` (untargeted) or target classes (``targeted=True``).
        eps: radius, a number or a tensor ``(N,)`` (one radius per example, ``>= 0``).
        steps: gradient steps per run.
        step_size: ``alpha`` (number or ``(N,)``); default ``2.5 * eps / steps``.
        restarts: number of runs (``>= 1``).
        seed: seed of the random starts.
        targeted: push toward the class ``y`` instead of away from it.
        loss: ``"margin"`` (default: the quantity certificates bound) or ``"ce"``.
        lower, upper: optional box ``lower <= x' <= upper`` (tensors broadcasting against ``x``, e.g.
            ``(C, 1, 1)``, or numbers); ``x`` itself must lie in it.
        n_targets: number of targeted runs of the sweep above (untargeted attacks only; each costs a run).

    Returns:
        ``(x_adv, success)``: ``x_adv`` ``(N, *features)`` with ``||x_adv - x||_2 <= eps`` (up to
        rounding) inside the box, and ``success`` ``(N,)`` bool, ``margin(model(x_adv)) <= 0``. Where an
        example is already misclassified, ``x_adv`` may be ``x`` itself.
    """
    _check_common(steps, restarts, loss, n_targets, targeted)
    x, y, lo, hi = _prepare(model, x, y, lower, upper)
    eps = _per_example(eps, x.shape[0], x, "eps")
    generator = torch.Generator().manual_seed(int(seed))
    with _attack_mode(model, x.device):
        x_adv, m = _pgd(
            model,
            x,
            y,
            eps,
            int(steps),
            step_size,
            int(restarts),
            generator,
            targeted,
            loss,
            lo,
            hi,
            n_targets=int(n_targets),
        )
    return x_adv.detach(), m <= 0


def _shrink_along_ray(model, x, x_adv, y, targeted, iters):
    """Bisection on ``t`` in ``[0, 1]`` for the smallest ``x + t (x_adv - x)`` still fooled (forward only).

    ``x_adv`` must be fooled; the returned points are (they are the last fooled points seen). The
    segment lies in the ball and in the box, both convex.
    """
    delta = x_adv - x
    lo_t = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    hi_t = torch.ones_like(lo_t)
    with torch.no_grad():
        for _ in range(iters):
            mid = (lo_t + hi_t) / 2
            fooled = margin(_logits(model, x + delta * _view(mid, delta)), y, targeted) <= 0
            hi_t = torch.where(fooled, mid, hi_t)
            lo_t = torch.where(fooled, lo_t, mid)
    shrunk = x + delta * _view(hi_t, delta)
    return torch.where(_view(hi_t < 1, delta), shrunk, x_adv)  # x_adv itself where no shorter point was found


class _MinimalSearch:
    """The state of :func:`minimal_adversarial_l2` on one batch: best witnesses and radius brackets."""

    def __init__(self, model, x, y, boxes, settings, generator):
        self.model, self.x, self.y = model, x, y
        self.lo_box, self.hi_box = boxes
        self.steps, self.restarts, self.targeted, self.loss, self.shrink_steps, self.n_targets = settings
        self.generator = generator
        n = x.shape[0]
        self.ddt = torch.float64 if has_float64(x.device) else torch.float32
        self.dist = torch.full((n,), math.inf, dtype=self.ddt, device=x.device)
        self.x_adv = x.clone()
        self.lo = torch.zeros(n, dtype=x.dtype, device=x.device)
        self.hi = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
        self.clean = None

    def attack(self, idx, eps):
        """PGD at radius ``eps`` on the examples ``idx``; records the (shrunk) witnesses; returns success."""
        x = self.x
        z, m = _pgd(
            self.model,
            x[idx],
            self.y[idx],
            eps,
            self.steps,
            None,
            self.restarts,
            self.generator,
            self.targeted,
            self.loss,
            None if self.lo_box is None else _sub(self.lo_box, idx, x),
            None if self.hi_box is None else _sub(self.hi_box, idx, x),
            stop_early=True,
            n_targets=self.n_targets,
        )
        ok = m <= 0
        if bool(ok.any()):
            j = idx[ok]
            w = z[ok]
            if self.shrink_steps:
                w = _shrink_along_ray(self.model, x[j], w, self.y[j], self.targeted, self.shrink_steps)
            d = _flat_norm((w - x[j]).to(self.ddt))
            closer = d < self.dist[j]
            self.dist[j] = torch.where(closer, d, self.dist[j])
            self.x_adv[j] = torch.where(_view(closer, w), w, self.x_adv[j])
            self.hi[j] = torch.minimum(torch.minimum(self.hi[j], eps[ok]), self.dist[j].to(x.dtype))
        return ok

    def bracket(self, eps_init, eps_max, max_doublings):
        """Examples misclassified already get distance 0; the others: double eps until PGD succeeds."""
        with torch.no_grad():
            self.clean = margin(_logits(self.model, self.x), self.y, self.targeted) <= 0
        self.dist[self.clean] = 0.0
        self.hi[self.clean] = 0.0
        todo = (~self.clean).nonzero().squeeze(1)
        eps = torch.clamp(eps_init[todo], max=eps_max)
        for _ in range(max_doublings + 1):
            if todo.numel() == 0:
                break
            ok = self.attack(todo, eps)
            self.lo[todo[~ok]] = eps[~ok]
            keep = ~ok & ~(eps >= eps_max)
            todo, eps = todo[keep], torch.clamp(2 * eps[keep], max=eps_max)

    def bisect(self, search_steps):
        """Bisection inside ``[lo, hi]`` for the examples with a witness."""
        for _ in range(search_steps):
            idx = (torch.isfinite(self.hi) & ~self.clean & (self.hi > self.lo)).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            mid = (self.lo[idx] + self.hi[idx]) / 2
            ok = self.attack(idx, mid)
            self.lo[idx[~ok]] = mid[~ok]


def minimal_adversarial_l2(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 50,
    restarts: int = 1,
    search_steps: int = 10,
    eps_init: Radius = 1.0,
    eps_max: Optional[float] = None,
    max_doublings: int = 10,
    seed: int = 0,
    targeted: bool = False,
    loss: str = "margin",
    lower=None,
    upper=None,
    shrink_steps: int = 10,
    batch_size: Optional[int] = None,
    n_targets: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""The smallest l2 perturbation PGD finds per example: an **upper** bound of the distance to the
    nearest adversarial example ``d*(x)``, with the perturbed input as a witness.

    Per example, a bracket ``[lo, hi]`` of radii is narrowed by bisection, with :func:`pgd_l2` at each
    radius: success at ``eps`` gives a witness ``x'`` and ``hi = min(eps, ||x' - x||)``, failure gives
    ``lo = eps``. The first ``hi`` is ``eps_init``, doubled after each failure (at most
    ``max_doublings`` times, never above ``eps_max``); examples PGD cannot fool even then get distance
    ``inf``. Each witness is then pulled toward ``x`` along its ray by ``shrink_steps`` bisection steps
    on ``t`` (``x + t (x' - x)`` still fooled; forward passes only). A PGD failure proves nothing, so
    ``lo`` is not a lower bound of ``d*``: only the returned distances (attained by the witnesses)
    are guaranteed, as upper bounds.

    Args:
        model, x, y, steps, restarts, targeted, loss, lower, upper, n_targets: as in :func:`pgd_l2`.
        search_steps: bisection steps after the bracket is found (the bracket shrinks by
            ``2^search_steps``).
        eps_init: first radius tried (number or ``(N,)``; a scale where PGD should succeed helps).
        eps_max: largest radius tried (default: no limit besides ``max_doublings``).
        max_doublings: how often a failed radius is doubled before giving up.
        seed: seed of the random starts (each PGD call gets ``seed + call index``).
        shrink_steps: ray bisection steps per witness (0 to skip).
        batch_size: attack this many examples at a time (default: all).

    Returns:
        ``(distances, x_adv)``: ``distances`` ``(N,)`` float64, ``||x_adv - x||_2`` where a witness
        was found (``0`` for examples misclassified already), ``inf`` where none was; ``x_adv``
        ``(N, *features)``, the witness (``x`` itself where none was found). ``model(x_adv)`` has
        margin ``<= 0`` at every finite distance; the ray bisection stops at the decision boundary, so
        that margin can be within rounding of 0.
    """
    _check_common(steps, restarts, loss, n_targets, targeted)
    for name, v in (
        ("search_steps", search_steps),
        ("max_doublings", max_doublings),
        ("shrink_steps", shrink_steps),
    ):
        if int(v) != v or v < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    x, y, lo_box, hi_box = _prepare(model, x, y, lower, upper)
    n = x.shape[0]
    eps_init = _per_example(eps_init, n, x, "eps_init")
    if bool((eps_init <= 0).any()):
        raise ValueError("eps_init must be > 0")
    eps_max = math.inf if eps_max is None else float(eps_max)
    if batch_size is not None and batch_size < n:
        dists, advs = [], []
        for i, start in enumerate(range(0, n, int(batch_size))):
            sl = slice(start, start + int(batch_size))
            d, a = minimal_adversarial_l2(
                model,
                x[sl],
                y[sl],
                steps,
                restarts,
                search_steps,
                eps_init[sl],
                eps_max if math.isfinite(eps_max) else None,
                max_doublings,
                seed + 100003 * i,
                targeted,
                loss,
                None if lo_box is None else _sub(lo_box, sl, x),
                None if hi_box is None else _sub(hi_box, sl, x),
                shrink_steps,
                None,
                n_targets,
            )
            dists.append(d)
            advs.append(a)
        return torch.cat(dists), torch.cat(advs)

    settings = (int(steps), int(restarts), targeted, loss, int(shrink_steps), int(n_targets))
    search = _MinimalSearch(model, x, y, (lo_box, hi_box), settings, torch.Generator().manual_seed(int(seed)))
    with _attack_mode(model, x.device):
        search.bracket(eps_init, eps_max, int(max_doublings))
        search.bisect(int(search_steps))
    return search.dist, search.x_adv.detach()
