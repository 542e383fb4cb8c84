r"""Empirical **lower** bounds of a network's Lipschitz constant (l2 -> l2).

For ``f: R^n -> R^m`` the Lipschitz constant is

.. math::  \mathrm{Lip}(f) = \sup_{a \ne b} \frac{\|f(a) - f(b)\|}{\|a - b\|}
           = \sup_x \|J_f(x)\|_2 \quad (f \text{ differentiable a.e.}).

Every function here evaluates that ratio at pairs it actually found, or the Jacobian's norm at points
it actually visited, from below. So each result is a **lower bound** of ``Lip(f)`` (up to rounding):
it can show that a network is *not* 1-Lipschitz, never that it is. A certificate needs an upper
bound (see :mod:`cpl_mini.spectral` and :func:`cpl_mini.bounds.lipschitz_upper_bound`).

Conventions: ``model`` is any callable on a batch ``x`` of shape ``(batch, *features)`` that treats
examples independently (no batch statistics: use ``eval()`` for BatchNorm); norms are taken over all
non-batch dimensions. Inputs are moved to the model's device and dtype. The model's mode is never
changed and its parameters' ``.grad`` are never touched (gradients are taken with respect to inputs
only). Random draws use a private ``torch.Generator`` seeded by ``seed`` (the global RNG is untouched).

The estimators run the model under :func:`~cpl_mini.frozen_power_iteration`: no forward writes
its layers' power-iteration vectors. In training mode every forward is then the same function (each layer
takes one power step from its stored vector, the step the next training forward takes) and the estimates
are of that function's constant; in evaluation mode, of the function the next evaluation forward
computes. The model's buffers are left as they were, and ``torch.func`` can differentiate a model in
training mode.
"""

import contextlib
import warnings

import torch
import torch.nn as nn

from .spectral import frozen_power_iteration

__all__ = [
    "pair_ratio",
    "random_pairs_lower_bound",
    "jacobian_spectral_norm",
    "exact_jacobian_norm",
    "worst_pair_search",
]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _like_model(model, x):
    """``x`` detached, on the model's device and in its floating dtype (when it has parameters)."""
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a tensor of shape (batch, *features), got {type(x).__name__}")
    x = x.detach()
    if isinstance(model, nn.Module):
        p = next(model.parameters(), None)
        if p is None:
            p = next(model.buffers(), None)
        if p is not None and p.is_floating_point():
            x = x.to(device=p.device, dtype=p.dtype)
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if x.dim() < 2:
        raise ValueError(
            f"x must be a batch of shape (batch, *features), got shape {tuple(x.shape)}; "
            f"add a batch dimension with x.unsqueeze(0)"
        )
    return x


def _frozen(model):
    """:func:`~cpl_mini.frozen_power_iteration` for a module; nothing for a plain function."""
    return frozen_power_iteration(model) if isinstance(model, nn.Module) else contextlib.nullcontext()


def _randn(shape, like, generator):
    """Standard normal draws from a CPU generator (reproducible on any device), shaped ``shape``."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.randn(shape, generator=generator, dtype=dtype).to(like)


def _flat_norm(z):
    return torch.linalg.vector_norm(z.flatten(1), dim=1)


def _unit(z, eps=1e-30):
    return z / _flat_norm(z).clamp_min(eps).view(-1, *([1] * (z.dim() - 1)))


def pair_ratio(model, a, b):
    """``||f(a_i) - f(b_i)|| / ||a_i - b_i||`` for each pair, shape ``(batch,)``: each value is a
    **lower bound** of ``Lip(f)``. One forward of ``cat([a, b])``; differentiable in ``a`` and ``b``."""
    n = a.shape[0]
    out = model(torch.cat([a, b]))
    return _flat_norm(out[:n] - out[n:]) / _flat_norm(a - b)


# ---------------------------------------------------------------------------------------------
# estimators
# ---------------------------------------------------------------------------------------------
def random_pairs_lower_bound(model, x, n_pairs=1000, scale=0.1, seed=0, batch_size=512):
    """A **lower bound** of ``Lip(f)``: the largest ratio ``||f(a) - f(b)|| / ||a - b||`` over
    random pairs.

    Two families of ``n_pairs`` pairs each:

    * local pairs ``(x_i, x_i + scale * u)``, ``i`` random, ``u`` a random unit direction
      (so ``||a - b|| = scale``);
    * pairs of given points ``(x_i, x_j)``, ``i != j`` random (only when ``x`` has 2+ examples).

    Args:
        model: callable on batches ``(batch, *features)``.
        x: points ``(n, *features)``.
        batch_size: number of pairs per forward pass.

    Returns:
        A float: the best ratio found (a lower bound, never an upper bound).
    """
    x = _like_model(model, x)
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    with torch.no_grad(), _frozen(model):
        for start in range(0, n_pairs, batch_size):
            k = min(batch_size, n_pairs - start)
            idx = torch.randint(n, (k,), generator=g).to(x.device)
            a = x[idx]
            b = a + scale * _unit(_randn(a.shape, x, g))
            r = pair_ratio(model, a, b)
            if n >= 2:
                i = torch.randint(n, (k,), generator=g)
                j = (i + torch.randint(1, n, (k,), generator=g)) % n
                a2, b2 = x[i.to(x.device)], x[j.to(x.device)]
                keep = _flat_norm(a2 - b2) > 0  # skip duplicated points
                if keep.any():
                    r = torch.cat([r, pair_ratio(model, a2[keep], b2[keep])])
            best = max(best, float(r.max()))
    return best


def jacobian_spectral_norm(model, x, n_iter=50, seed=0):
    r"""Per-example **lower bounds** of the local Lipschitz constant: ``||J_f(x_i)||_2`` by power
    iteration.

    ``v <- J^T J v / ||J^T J v||`` (``n_iter`` times, from a random unit ``v`` per example), then the
    estimate ``||J v||``, which never exceeds ``||J||_2`` (``||v|| = 1``) and increases to it as the
    iteration converges. ``J v`` comes from one ``torch.func.jvp`` and ``J^T u`` from one
    ``torch.func.vjp`` on the *whole batch*: since examples are independent the batch Jacobian is
    block-diagonal, and the normalisation is done per example.

    Works on a model in training mode too: the transforms run under
    :func:`~cpl_mini.frozen_power_iteration`, so each CPL layer takes its one power step from
    the stored vector without writing it back, and the result is the Jacobian norm of the training-mode
    function the next training forward would compute (the buffers are left unchanged). In evaluation
    mode with ``eval_norm="power"`` and no cached norm yet, the norm comes from the stored vector too.

    Args:
        model: callable on batches; must treat examples independently.
        x: points ``(batch, *features)``.

    Returns:
        Tensor ``(batch,)`` (detached, model's dtype): estimates of ``||J_f(x_i)||_2``, each a lower
        bound of the local (and hence global) Lipschitz constant.
    """
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    x = _like_model(model, x)
    g = torch.Generator().manual_seed(seed)
    v = _unit(_randn(x.shape, x, g))
    with warnings.catch_warnings(), _frozen(model):
        # torch's first forward-mode call loads decompositions through the deprecated
        # torch.jit.script and warns about it: internal to torch, nothing for the caller to do.
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        _, vjp_fn = torch.func.vjp(model, x)
        for _ in range(n_iter):
            _, jv = torch.func.jvp(model, (x,), (v,))
            (jtjv,) = vjp_fn(jv.detach())
            v = _unit(jtjv.detach())
        _, jv = torch.func.jvp(model, (x,), (v,))
    return _flat_norm(jv.detach())


def exact_jacobian_norm(model, x):
    """The largest singular value of the full Jacobian at each example, in float64: the exact local
    Lipschitz constant at that point, hence a **lower bound** of the global one.

    Builds ``J_f(x_i)`` of shape ``(out_numel, in_numel)`` with ``torch.autograd.functional.jacobian``
    (one example at a time, the model in its own dtype), casts it to float64 and takes
    ``torch.linalg.matrix_norm(J, 2)`` (SVD). For small inputs only: it is the independent reference
    the tests compare :func:`jacobian_spectral_norm` with.

    Args:
        x: ``(batch, *features)``; a single example needs a batch dimension of 1.

    Returns:
        Tensor ``(batch,)``, float64, on the model's device.
    """
    x = _like_model(model, x)
    norms = []

    def f(z):
        return model(z.unsqueeze(0)).flatten()

    with _frozen(model):
        for xi in x:
            jac = torch.autograd.functional.jacobian(f, xi.clone())
            jac = jac.reshape(jac.shape[0], -1).detach().to(torch.float64)
            norms.append(torch.linalg.matrix_norm(jac, ord=2))
    return torch.stack(norms)


def worst_pair_search(model, x, y=None, steps=200, lr=0.01, seed=0, noise=0.01):
    """A **lower bound** of ``Lip(f)`` by gradient ascent on ``r(a, b) = ||f(a) - f(b)|| / ||a - b||``.

    Starts from the pairs ``(x_i, y_i)`` (``y`` defaults to ``x + noise * u``, ``u`` random unit
    directions), then runs ``steps`` Adam steps (step size ``lr``) on the inputs ``a`` and ``b``,
    maximising ``sum_i log r(a_i, b_i)`` (each pair moves on its own). The best pair visited,
    starting pairs included, is returned, so the result is at least the best starting ratio.

    Pairs whose distance falls below ``sqrt(eps_dtype) * (1 + ||a||)`` are not recorded, so that
    rounding in ``f(a) - f(b)`` cannot inflate the ratio.

    Args:
        model: callable on batches ``(batch, *features)``.
        x: starting points ``(n, *features)``; ``y``: same shape, ``y_i != x_i``.

    Returns:
        ``(ratio, a, b)``: the best ratio (float, a lower bound of ``Lip(f)``, never an upper bound)
        and its pair, each of shape ``(1, *features)`` so that ``model(a)`` works.
    """
    x = _like_model(model, x)
    if y is None:
        g = torch.Generator().manual_seed(seed)
        y = x + noise * _unit(_randn(x.shape, x, g))
    else:
        y = _like_model(model, y)
        if y.shape != x.shape:
            raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    if (_flat_norm(x - y) == 0).any():
        raise ValueError("every starting pair needs y_i != x_i (the ratio is undefined otherwise)")

    tiny = torch.finfo(x.dtype).eps ** 0.5
    a = x.clone().requires_grad_(True)
    b = y.clone().requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=lr, maximize=True)
    best, best_a, best_b = 0.0, x[:1].clone(), y[:1].clone()  # ratio >= 0 always
    for k in range(steps + 1):
        with torch.enable_grad(), _frozen(model):
            r = pair_ratio(model, a, b)
        with torch.no_grad():
            valid = (_flat_norm(a - b) > tiny * (1 + _flat_norm(a))) & torch.isfinite(r)
            if valid.any():
                rv = torch.where(valid, r.detach(), torch.full_like(r.detach(), -1.0))
                i = int(rv.argmax())
                if float(rv[i]) > best:
                    best = float(rv[i])
                    best_a, best_b = a[i : i + 1].detach().clone(), b[i : i + 1].detach().clone()
        if k == steps:
            break
        objective = torch.where(valid, r, torch.ones_like(r)).log().sum()
        grad_a, grad_b = torch.autograd.grad(objective, [a, b])
        a.grad, b.grad = grad_a, grad_b
        opt.step()
    return best, best_a, best_b
