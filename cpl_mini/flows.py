r"""Vector fields ``F(t, x)``, their flows, and the explicit Euler scheme (a weight-shared ResNet).

The seed paper reads a residual network ``x_{k+1} = x_k + h F(t_k, x_k)`` as the explicit Euler
discretisation of the ODE

.. math::  \dot x(t) = F(t, x(t)), \qquad x(0) = x_0 .

Its flow is 1-Lipschitz (non-expansive) when ``F`` is *monotone-dissipative*,

.. math::  \langle F(t, x) - F(t, y),\ x - y \rangle \le 0 \quad \text{for all } t, x, y,

since then ``d/dt ||x(t) - y(t)||^2 = 2 <F(x) - F(y), x - y> <= 0``. The paper *builds* such fields
as ``F = -grad f_t + A_t x`` with ``f_t`` convex and ``A_t`` skew-symmetric: every field of that form is
monotone-dissipative (a sufficient construction, motivated by the Helmholtz decomposition), but not
every monotone-dissipative field has that form (``F(x) = (-x_1 - sin(x_2)/2, -x_2)`` is dissipative,
yet the skew part of its Jacobian varies with ``x``). This module gives those fields, a
counter-example field, and the tools to check the claims numerically:

* fields: :class:`ConvexPotentialField` (``-grad f``), :class:`SkewSymmetricField` (``S x``),
  :class:`LinearField` (``M x``, any ``M``), :class:`FunctionField` (any callable), :class:`SumField`
  (also ``field_a + field_b``);
* integrators: :func:`flow` (``torchdiffeq.odeint``) and :func:`euler` (explicit Euler);
* checks: :func:`trajectory_distance`, :func:`one_sided_lipschitz` and
  :func:`euler_step_lipschitz_lower_bound`.

Shapes: a state ``x`` has shape ``(..., d)`` (any leading batch dimensions, the last one is the
dimension of the space); a field maps it to a tensor of the same shape. Everything works in float64.
Fields hold their matrices as *buffers* (fixed objects, no gradient, moved by ``.to(...)``) and use
them in the dtype and device of the state they are applied to.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "VectorField",
    "ConvexPotentialField",
    "SkewSymmetricField",
    "LinearField",
    "FunctionField",
    "SumField",
    "flow",
    "euler",
    "trajectory_distance",
    "one_sided_lipschitz",
    "euler_step",
    "euler_step_lipschitz_lower_bound",
]


def _as_matrix(a, name, square=False):
    a = torch.as_tensor(a)
    if a.dim() != 2:
        raise ValueError(f"{name} must be a matrix (2-D tensor), got shape {tuple(a.shape)}")
    if square and a.shape[0] != a.shape[1]:
        raise ValueError(f"{name} must be square, got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        a = a.to(torch.get_default_dtype())
    return a.detach().clone()


def _check_state(x, d, name="x"):
    if x.dim() == 0 or x.shape[-1] != d:
        raise ValueError(f"{name} must have shape (..., {d}) (the field acts on R^{d}), got {tuple(x.shape)}")


class VectorField(nn.Module):
    """Base class of a vector field ``F(t, x)``: ``forward(t, x)`` returns a tensor shaped like ``x``.

    ``field_a + field_b`` is the :class:`SumField` of the two. Subclasses call it with the
    ``torchdiffeq`` convention ``field(t, x)``, ``t`` a scalar (float or 0-dim tensor).
    """

    def forward(self, t, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def __add__(self, other):
        if not isinstance(other, VectorField):
            return NotImplemented
        return SumField(self, other)


# ---------------------------------------------------------------------------------------------
# Gradient part: convex potentials
# ---------------------------------------------------------------------------------------------
def _relu_psi(z):
    return 0.5 * F.relu(z) ** 2


def _logcosh(z):
    # log cosh z = |z| + log(1 + exp(-2|z|)) - log 2, stable for large |z|.
    a = z.abs()
    return a + torch.log1p(torch.exp(-2.0 * a)) - math.log(2.0)


#: activation name -> (sigma, psi with psi' = sigma, sup of sigma').
_ACTIVATIONS = {
    "relu": (F.relu, _relu_psi, 1.0),
    "sigmoid": (torch.sigmoid, F.softplus, 0.25),
    "tanh": (torch.tanh, _logcosh, 1.0),
}


class ConvexPotentialField(VectorField):
    r"""The gradient field of a convex potential: ``F(t, x) = -W^T sigma(W x + b) = -grad f(x)``.

    .. math::  f(x) = \sum_{i=1}^m \psi(w_i^\top x + b_i), \qquad \psi' = \sigma ,
               \qquad \nabla f(x) = W^\top \sigma(W x + b),

    with ``w_i`` the rows of ``W``. ``sigma`` is non-decreasing, so ``psi`` is convex and so is ``f``;
    the field is monotone-dissipative and its flow is non-expansive. Activations (``psi`` in closed
    form, ``sup sigma'``):

    ========== ===================== ======================== ============
    activation ``sigma(z)``          ``psi(z)``               sup sigma'
    ========== ===================== ======================== ============
    "relu"     ``max(z, 0)``         ``max(z, 0)^2 / 2``      1
    "sigmoid"  ``1 / (1 + e^{-z})``  ``softplus(z)``          1/4
    "tanh"     ``tanh(z)``           ``log cosh(z)``          1
    ========== ===================== ======================== ============

    Args:
        weight: ``W``, shape ``(m, d)``.
        bias: ``b``, shape ``(m,)`` (zeros when omitted).
        activation: one of ``"relu"``, ``"sigmoid"``, ``"tanh"``.

    The one explicit Euler step of this field with ``h = 2 / ||W||_2^2`` (ReLU) is the Convex Potential
    Layer of ``cpl_mini.layers``.
    """

    def __init__(self, weight, bias=None, activation="relu"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)} (those have a closed-form convex "
                f"potential psi), got {activation!r}"
            )
        weight = _as_matrix(weight, "weight")
        m = weight.shape[0]
        if bias is None:
            bias = torch.zeros(m, dtype=weight.dtype, device=weight.device)
        bias = torch.as_tensor(bias).detach().clone().to(weight)
        if bias.shape != (m,):
            raise ValueError(
                f"bias must have shape ({m},) to match weight {tuple(weight.shape)}, got {tuple(bias.shape)}"
            )
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.activation = activation
        self._sigma, self._psi, self._sup_dsigma = _ACTIVATIONS[activation]

    @property
    def dim(self):
        """The dimension ``d`` of the space."""
        return self.weight.shape[1]

    def _preactivation(self, x):
        _check_state(x, self.dim)
        return x @ self.weight.to(x).T + self.bias.to(x)

    def forward(self, t, x):
        """``F(t, x) = -W^T sigma(W x + b)``; ``x``: ``(..., d)`` -> ``(..., d)`` (``t`` is unused)."""
        return -(self._sigma(self._preactivation(x)) @ self.weight.to(x))

    def gradient(self, x):
        """``grad f(x) = W^T sigma(W x + b)`` (so ``F = -grad f``); shape ``(..., d)``."""
        return -self.forward(0.0, x)

    def potential(self, x):
        """``f(x) = sum_i psi(w_i^T x + b_i)``; ``x``: ``(..., d)`` -> ``(...)``. Convex in ``x``."""
        return self._psi(self._preactivation(x)).sum(-1)

    def smoothness(self):
        """``L = ||W||_2^2 * sup sigma'`` (exact SVD, float): ``grad f`` is ``L``-Lipschitz.

        Proof: the Jacobian of ``grad f`` is ``W^T diag(sigma'(Wx + b)) W``, of norm at most
        ``||W||^2 sup sigma'``. For ReLU the bound is attained where all units are active.
        """
        w = self.weight.detach().to(torch.float64)
        return float(torch.linalg.matrix_norm(w, ord=2) ** 2) * self._sup_dsigma

    def extra_repr(self):
        m, d = self.weight.shape
        return f"m={m}, d={d}, activation={self.activation!r}"


# ---------------------------------------------------------------------------------------------
# Linear fields
# ---------------------------------------------------------------------------------------------
class SkewSymmetricField(VectorField):
    """The conservative field ``F(t, x) = S x`` with ``S = (A - A^T) / 2`` skew-symmetric.

    ``<S u, u> = 0`` for every ``u``, so ``d/dt ||x(t)||^2 = 0``: the flow ``x(t) = exp(t S) x0`` is an
    orthogonal map, it preserves norms and distances (one-sided Lipschitz constant exactly 0).

    Args:
        A: any square matrix, shape ``(d, d)``; only its skew part is used.
    """

    def __init__(self, A):
        super().__init__()
        A = _as_matrix(A, "A", square=True)
        self.register_buffer("S", 0.5 * (A - A.T))

    @property
    def dim(self):
        return self.S.shape[0]

    def forward(self, t, x):
        """``F(t, x) = S x``; ``x``: ``(..., d)`` -> ``(..., d)``."""
        _check_state(x, self.dim)
        return x @ self.S.to(x).T


class LinearField(VectorField):
    """The linear field ``F(t, x) = M x`` for any square ``M``; its flow is ``x(t) = exp(t M) x0``.

    Monotone-dissipative iff the symmetric part ``(M + M^T)/2`` is negative semi-definite; with a
    positive eigenvalue of that part the flow expands some distances (the book's counter-example).

    Args:
        M: shape ``(d, d)``.
    """

    def __init__(self, M):
        super().__init__()
        self.register_buffer("M", _as_matrix(M, "M", square=True))

    @property
    def dim(self):
        return self.M.shape[0]

    def forward(self, t, x):
        """``F(t, x) = M x``; ``x``: ``(..., d)`` -> ``(..., d)``."""
        _check_state(x, self.dim)
        return x @ self.M.to(x).T


class FunctionField(VectorField):
    """Wrap a callable as a field: ``F(t, x) = fn(t, x)``, or ``fn(x)`` when ``time_dependent=False``.

    ``fn`` must map a state of shape ``(..., d)`` to a tensor of the same shape (it is checked at
    each call). An ``nn.Module`` ``fn`` is registered as a submodule (moves with ``.to``).
    """

    def __init__(self, fn, time_dependent=True):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.time_dependent = bool(time_dependent)

    def forward(self, t, x):
        out = self.fn(t, x) if self.time_dependent else self.fn(x)
        if not torch.is_tensor(out) or out.shape != x.shape:
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ValueError(
                f"the wrapped function must return a tensor shaped like x {tuple(x.shape)}, got {got} "
                f"(time_dependent={self.time_dependent}: it is called as "
                f"{'fn(t, x)' if self.time_dependent else 'fn(x)'})"
            )
        return out


class SumField(VectorField):
    """``F(t, x) = sum_k F_k(t, x)``, e.g. ``ConvexPotentialField(W) + SkewSymmetricField(A)`` for the
    paper's decomposition ``F = -grad f + A x``. A sum of monotone-dissipative fields is one."""

    def __init__(self, *fields):
        super().__init__()
        if not fields:
            raise ValueError("SumField needs at least one field")
        flat = []
        for f in fields:
            if not isinstance(f, VectorField):
                raise TypeError(
                    f"SumField takes VectorField instances, got {type(f).__name__}; wrap a plain "
                    f"callable in FunctionField first"
                )
            flat.extend(f.fields if isinstance(f, SumField) else [f])
        self.fields = nn.ModuleList(flat)

    def forward(self, t, x):
        out = self.fields[0](t, x)
        for f in self.fields[1:]:
            out = out + f(t, x)
        return out


# ---------------------------------------------------------------------------------------------
# Integrators
# ---------------------------------------------------------------------------------------------
def _times(t, like):
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(
            f"t must be a 1-D tensor of at least 2 times (t[0] is the start), got shape {tuple(t.shape)}"
        )
    return t


def flow(field, x0, t, method="dopri5", rtol=1e-7, atol=1e-9, **odeint_kwargs):
    """Integrate ``dx/dt = F(t, x)``, ``x(t[0]) = x0`` with ``torchdiffeq.odeint``.

    Args:
        field: a :class:`VectorField` or any callable ``F(t, x)``.
        x0: initial states, shape ``(..., d)``.
        t: 1-D tensor (or list) of times, strictly monotone; ``t[0]`` is the initial time.
        method, rtol, atol: passed to ``odeint`` (adaptive ``dopri5`` by default).

    Returns:
        The trajectory, shape ``(len(t), *x0.shape)``; entry ``k`` is ``x(t[k])``.

    Gradients flow through the solver when ``x0`` or the field requires them; wrap the call in
    ``torch.no_grad()`` for pure checks.
    """
    from torchdiffeq import odeint

    if not torch.is_tensor(x0) or not x0.is_floating_point():
        raise TypeError("x0 must be a floating-point tensor of shape (..., d)")
    return odeint(field, x0, _times(t, x0), method=method, rtol=rtol, atol=atol, **odeint_kwargs)


def euler(field, x0, t_end=1.0, n_steps=10, return_trajectory=True):
    """Explicit Euler on ``[0, t_end]``: ``x_{k+1} = x_k + h F(t_k, x_k)``, ``h = t_end / n_steps``,
    ``t_k = k h``.

    With ``n_steps`` layers this *is* a residual network whose layers share the field's weights.

    Args:
        field: a :class:`VectorField` or any callable ``F(t, x)``.
        x0: shape ``(..., d)``.

    Returns:
        ``(n_steps + 1, *x0.shape)`` (``x_0, ..., x_n``) if ``return_trajectory`` else the final
        state ``x_n``, shape ``x0.shape``. The global error against the exact flow is ``O(h)``.
    """
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps}")
    n_steps = int(n_steps)
    h = float(t_end) / n_steps
    x = x0
    states = [x0]
    for k in range(n_steps):
        tk = torch.as_tensor(k * h, dtype=x0.dtype, device=x0.device)
        x = x + h * field(tk, x)
        if return_trajectory:
            states.append(x)
    return torch.stack(states) if return_trajectory else x


def trajectory_distance(field, x0, y0, t, method="dopri5", rtol=1e-7, atol=1e-9):
    """``||x(t_k) - y(t_k)||`` for the trajectories started at ``x0`` and ``y0``.

    Args:
        x0, y0: same shape ``(..., d)``, e.g. ``(n, d)`` for ``n`` pairs ``(x0[i], y0[i])``.
        t: 1-D times.

    Returns:
        Shape ``(len(t), ...)`` (``(len(t), n)`` for ``(n, d)`` inputs). Both trajectories are
        integrated in one ``odeint`` call (a shared adaptive step). For a monotone-dissipative field
        every column is non-increasing in ``t`` (up to the solver's tolerance).
    """
    if x0.shape != y0.shape:
        raise ValueError(f"x0 and y0 must have the same shape, got {tuple(x0.shape)} and {tuple(y0.shape)}")
    traj = flow(field, torch.stack([x0, y0]), t, method=method, rtol=rtol, atol=atol)
    return torch.linalg.vector_norm(traj[:, 0] - traj[:, 1], dim=-1)


def one_sided_lipschitz(field, x, y, t=0.0):
    """``<F(t, x) - F(t, y), x - y> / ||x - y||^2`` for each pair (pairs with ``x == y`` give nan).

    The field is monotone-dissipative iff this is ``<= 0`` for all pairs (and ``t``); its supremum is
    the one-sided Lipschitz constant ``mu``, and by Gronwall ``||x(t) - y(t)|| <= e^{mu t} ||x0 - y0||``.
    Evaluating it on samples gives a *lower* bound of ``mu``.

    Args:
        x, y: shape ``(..., d)``. Returns shape ``(...)``.
    """
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    diff = x - y
    return ((field(t, x) - field(t, y)) * diff).sum(-1) / (diff * diff).sum(-1)


def euler_step(field, h, t=0.0):
    """The map ``x -> x + h F(t, x)`` as a callable (for a :class:`ConvexPotentialField`:
    ``x -> x - h grad f(x)``, a gradient-descent step and one residual layer)."""
    h = float(h)

    def step(x):
        return x + h * field(torch.as_tensor(t, dtype=x.dtype, device=x.device), x)

    return step


def euler_step_lipschitz_lower_bound(
    field, h, x, n_pairs=1000, scale=0.1, search_steps=100, lr=0.01, t=0.0, seed=0
):
    """A measured **lower bound** of the Lipschitz constant of the step ``T_h(x) = x + h F(t, x)``.

    For ``F = -grad f`` with ``f`` convex and ``L``-smooth, ``T_h`` is 1-Lipschitz when
    ``0 <= h <= 2/L`` (Baillon-Haddad co-coercivity), and can expand beyond it (ReLU, all units
    active: the Jacobian ``I - h W^T W`` has the eigenvalue ``1 - h ||W||^2 < -1``). Plot this
    against ``h L`` to see the threshold at 2.

    The value is the larger of

    * :func:`~cpl_mini.random_pairs_lower_bound` on the points ``x`` (pairs
      ``(x_i, x_i + scale * u)`` with random unit ``u``, and pairs of given points), and
    * :func:`~cpl_mini.worst_pair_search` (``search_steps`` of gradient ascent on
      ``||T(a) - T(b)|| / ||a - b||``) started from every ``x_i`` and a random neighbour.

    Every ratio it reports is attained by an actual pair, so it is a **lower bound** of
    ``Lip(T_h)``, never an upper bound: a value ``<= 1`` is evidence, not a proof.

    Args:
        field: a field ``F(t, x)`` on ``R^d``; ``h``: the step size; ``x``: points ``(n, d)``.

    Returns:
        A float.
    """
    from .lipschitz import random_pairs_lower_bound, worst_pair_search

    if x.dim() != 2:
        raise ValueError(f"x must be a batch of points of shape (n, d), got {tuple(x.shape)}")
    step = euler_step(field, h, t)
    best = random_pairs_lower_bound(step, x, n_pairs=n_pairs, scale=scale, seed=seed)
    if search_steps > 0:
        ratio, _, _ = worst_pair_search(step, x, steps=search_steps, lr=lr, seed=seed, noise=scale)
        best = max(best, ratio)
    return best
