r"""Floating-point hygiene of the sound computations: IEEE float32, float64 devices, directed rounding.

A certificate is a chain of computed numbers, each of which must err on the safe side:

* **IEEE float32.** On Ampere and later GPUs, cuBLAS matmuls and cuDNN convolutions may run float32
  inputs through TF32 (10-bit mantissa) by default; oneDNN on CPUs can be told to use bf16. A
  "float32" certificate computed that way is not one. :func:`ieee_precision` switches every such
  shortcut off for the duration of a block and restores the previous settings afterwards.
* **float64 devices.** Sound norms are computed in float64; Apple's MPS has no float64, so there
  they run on the CPU (:func:`float64_device`, :func:`as_float64`).
* **Directed rounding.** A radius must be rounded *down*, a norm or a Lipschitz constant *up*.
  Tensors: :func:`sub_down` (exact error of a subtraction, Knuth's TwoSum), :func:`next_down`,
  :func:`next_up` (one step toward -inf / +inf with ``torch.nextafter``), :func:`cast_down`
  (conversion to a narrower dtype rounded toward -inf). Scalars (Python floats, exact arithmetic
  with :class:`fractions.Fraction`): :func:`float_down`, :func:`float_up`. Error bound of a sum of
  ``n`` rounded non-negative terms: :func:`gamma` (Higham's ``gamma_n = n u / (1 - n u)``).

And the input check the dense layers share, :func:`check_last_dim`.
"""

import contextlib
import math
from fractions import Fraction
from typing import Iterator, Optional, Union

import torch

__all__ = [
    "ieee_precision",
    "float64_device",
    "has_float64",
    "as_float64",
    "next_down",
    "next_up",
    "sub_down",
    "cast_down",
    "float_down",
    "float_up",
    "sqrt_up",
    "gamma",
    "check_last_dim",
]

Number = Union[int, float, Fraction]

# ---------------------------------------------------------------------------------------------
# IEEE float32
# ---------------------------------------------------------------------------------------------
#: The leaves of the ``fp32_precision`` settings (torch >= 2.9); each may allow TF32 or bf16.
_PRECISION_LEAVES = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")


def _precision_backends() -> list:
    found = []
    for path in _PRECISION_LEAVES:
        obj = torch.backends
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            found.append(obj)
    return found


def _read(getter):
    """A setting through a legacy reader, or None where torch refuses to answer (mixed settings)."""
    try:
        return getter()
    except RuntimeError:
        return None


_LEGACY = (
    (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision, "highest"),
    (
        lambda: torch.backends.cuda.matmul.allow_tf32,
        lambda v: setattr(torch.backends.cuda.matmul, "allow_tf32", v),
        False,
    ),
    (
        lambda: torch.backends.cudnn.allow_tf32,
        lambda v: setattr(torch.backends.cudnn, "allow_tf32", v),
        False,
    ),
)


@contextlib.contextmanager
def ieee_precision() -> Iterator[None]:
    """Run float32 matmuls and convolutions in IEEE float32 inside the block (no TF32, no bf16).

    Inside: ``torch.set_float32_matmul_precision("highest")``, ``torch.backends.cuda.matmul.allow_tf32
    = False``, ``torch.backends.cudnn.allow_tf32 = False`` and, with torch's ``fp32_precision`` settings
    (torch >= 2.9), every leaf of them (``cuda.matmul``, ``cudnn.conv``, ``cudnn.rnn`` and the oneDNN
    ones) set to ``"ieee"``. On exit, also when the block raises, the previous settings come back:
    first the legacy switches that could be read before, then every leaf to its previous value. Usable
    as a decorator; the settings are process-wide (not thread-local).

    Example::

        with ieee_precision():
            logits = model(x)   # no TF32 inside, whatever the caller enabled
    """
    leaves = _precision_backends()
    saved_leaves = [(b, b.fp32_precision) for b in leaves]
    saved_legacy = [(setter, _read(getter)) for getter, setter, _ in _LEGACY]
    try:
        for _, setter, ieee in _LEGACY:
            setter(ieee)
        for b in leaves:
            b.fp32_precision = "ieee"
        yield
    finally:
        for setter, value in saved_legacy:
            if value is not None:
                setter(value)
        for b, value in saved_leaves:
            if b.fp32_precision != value:
                b.fp32_precision = value


# ---------------------------------------------------------------------------------------------
# float64 devices
# ---------------------------------------------------------------------------------------------
def has_float64(device: Union[str, torch.device]) -> bool:
    """Whether tensors of ``device`` can be float64 (every device but Apple's MPS)."""
    return torch.device(device).type != "mps"


def float64_device(device: Union[str, torch.device]) -> torch.device:
    """Where float64 computations for data on ``device`` run: ``device`` itself, the CPU for MPS."""
    device = torch.device(device)
    return device if has_float64(device) else torch.device("cpu")


def as_float64(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, in float64 (exact for every float dtype), on :func:`float64_device` of its device."""
    return t.detach().to(device=float64_device(t.device), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# directed rounding of tensors
# ---------------------------------------------------------------------------------------------
def next_down(x: torch.Tensor) -> torch.Tensor:
    """The largest float of ``x``'s dtype below each entry (``-inf`` stays ``-inf``)."""
    return torch.nextafter(x, torch.full_like(x, -math.inf))


def next_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest float of ``x``'s dtype above each entry (``inf`` stays ``inf``)."""
    return torch.nextafter(x, torch.full_like(x, math.inf))


def sub_down(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""``a - b`` rounded toward ``-inf`` (never above the exact difference), same dtype.

    The rounded difference ``s = fl(a - b)`` and its exact error ``e = (a - b) - s`` come from Knuth's
    TwoSum (six rounded operations, exact in round-to-nearest arithmetic without overflow); where
    ``e < 0`` the rounded value is above the exact one and is moved one float down. So the result is
    the exact difference rounded down: ``a - b`` itself whenever it is representable.
    """
    s = a - b
    bb = s - a
    err = (a - (s - bb)) + (-b - bb)
    return torch.where(err < 0, next_down(s), s)


def cast_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` converted to ``dtype`` rounding toward ``-inf`` (``x`` itself when it fits exactly).

    The conversion rounds to nearest; where the result is above ``x`` (compared exactly, in the wider
    of the two dtypes) it is moved one float of ``dtype`` down.
    """
    y = x.to(dtype)
    if y.dtype == x.dtype:
        return y
    wide = torch.promote_types(x.dtype, dtype)
    return torch.where(y.to(wide) > x.to(wide), next_down(y), y)


# ---------------------------------------------------------------------------------------------
# directed rounding of scalars
# ---------------------------------------------------------------------------------------------
def float_down(value: Number) -> float:
    """The largest float ``<= value`` (``value`` an exact rational: int, float or Fraction)."""
    exact = Fraction(value)
    f = float(exact)
    return math.nextafter(f, -math.inf) if Fraction(f) > exact else f


def float_up(value: Number) -> float:
    """The smallest float ``>= value`` (``value`` an exact rational: int, float or Fraction)."""
    exact = Fraction(value)
    f = float(exact)
    return math.nextafter(f, math.inf) if Fraction(f) < exact else f


def sqrt_up(value: Number) -> float:
    """The smallest float whose square is ``>= value`` (``value >= 0`` an exact rational): ``sqrt(value)``
    rounded up."""
    exact = Fraction(value)
    if exact < 0:
        raise ValueError(f"sqrt_up needs a value >= 0, got {value!r}")
    root = math.sqrt(float(exact))
    while root > 0 and Fraction(math.nextafter(root, 0)) ** 2 >= exact:
        root = math.nextafter(root, 0)
    while Fraction(root) ** 2 < exact:
        root = math.nextafter(root, math.inf)
    return root


def gamma(n: int, dtype: torch.dtype = torch.float64) -> float:
    r"""Higham's ``gamma_n = n u / (1 - n u)``, rounded up, with ``u`` the unit roundoff of ``dtype``.

    A sum (in any order) of ``n`` non-negative terms, or a product of ``n`` factors, computed with
    rounding to nearest is within a relative ``gamma_n`` of the exact value (Higham, *Accuracy and
    Stability of Numerical Algorithms*, Lemma 3.1).
    """
    u = Fraction(torch.finfo(dtype).eps) / 2
    nu = n * u
    if nu >= 1:
        raise ValueError(f"gamma({n}) is undefined in {dtype}: n * u = {float(nu)} >= 1")
    return float_up(nu / (1 - nu))


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------
def check_last_dim(module: object, x: torch.Tensor, n: int, argument: Optional[str] = "in_features") -> None:
    """Raise a ``ValueError`` that says what to do unless ``x`` has shape ``(..., n)``.

    Args:
        module: the layer (its class name starts the message).
        x: the input.
        n: the size the last dimension must have.
        argument: name of the constructor argument that sets ``n`` (suggested in the message).
    """
    if x.dim() < 1 or x.shape[-1] != n:
        got = x.shape[-1] if x.dim() else "?"
        raise ValueError(
            f"{type(module).__name__} expects inputs of shape (..., {n}), got {tuple(x.shape)}; "
            f"flatten images first (nn.Flatten) or build the layer with {argument}={got}."
        )
