"""Restricted, format-checked unpickling of CIFAR batch files.

The official CIFAR *python* release stores each batch as a pickle: a dict whose ``b"data"`` is a numpy
uint8 array ``(N, 3072)`` and whose labels are lists or integer arrays ``(N,)``; the meta file holds only
lists of class names. :func:`load_pickle` reads such a pickle without trusting it.

What it admits. The unpickler resolves exactly five globals, the ones genuine CIFAR pickles (Python 2
originals and Python 3 protocol-2 re-pickles) use: ``numpy.core.multiarray._reconstruct`` (also spelled
``numpy._core.multiarray``), ``numpy.ndarray``, ``numpy.dtype`` and ``_codecs.encode``; any other global
raises :class:`UnsafePickleError` and nothing is called. Even these are never the real callables: each
maps to a method of a :class:`PickleBudget` that checks its arguments (``_reconstruct`` only with
``(ndarray, (0,), 'b')``, only integer dtypes, ``_codecs.encode`` only str -> latin-1) and returns a
placeholder; the array is made only when the pickle gives its state, which must be numpy's own
``(shape, dtype, is_fortran, payload)`` with a shape the format allows (``(N, 3072)`` uint8 or ``(N,)``
integers for a file of ``N`` rows, none in a meta file) and a payload of exactly
``prod(shape) * itemsize`` bytes, which becomes the array by a read-only view (no copy).

Why memory stays bounded. Before unpickling, the opcodes are walked once with :mod:`pickletools`, which
builds nothing: their count and every memo slot index must stay within ``8 N + 4096``, and every counted
length must lie inside the payload (the C unpickler would allocate a counted ``bytes`` before reading it,
and grow its memo to twice the largest slot index, so a few bytes of pickle could claim gigabytes). While
unpickling, every object then comes from a bounded number of opcodes and bytes already in the payload,
arrays are views of such bytes whose size was checked against the format first, and all arrays together
may take at most ``N (3072 + 16)`` bytes (one pixel array and at most two int64 label arrays). The caller
caps the payload's size (see :mod:`cpl_mini.cifar`). A damaged pickle or one that does not fit the
format raises :class:`CorruptArchiveError` naming the file.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from typing import Optional

import numpy as np

__all__ = ["ROW_BYTES", "CorruptArchiveError", "UnsafePickleError", "PickleBudget", "load_pickle"]

ROW_BYTES = 3072  # bytes of one picture: 3 planes of 32 x 32
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_DTYPE_CODES = frozenset({"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"})


class CorruptArchiveError(ValueError):
    """The archive or folder exists but cannot be read as CIFAR (truncated, damaged, wrong content)."""


class UnsafePickleError(pickle.UnpicklingError):
    """A batch file's pickle asked for a global that the CIFAR format never needs (refused, not run)."""


class _Pending:
    """Stands for an array or dtype while unpickling: ``build`` checks the state the pickle gives it."""

    __slots__ = ("build", "value")

    def __init__(self, build, value=None):
        self.build, self.value = build, value

    def __setstate__(self, state) -> None:
        self.value = self.build(self.value, state)


class PickleBudget:
    """What one file's pickle may ask for, and the only callables it reaches.

    Each method checks its arguments against a file of ``rows`` rows (``None``: the meta file, which
    holds no array) before anything is allocated.

    Args:
        where: the file (or tar member) named in error messages.
        rows: rows of the batch file, ``None`` for the meta file.
        title: the data set's name in messages (``"CIFAR-10"``, ``"CIFAR-100"``).

    Attributes:
        max_ops: the most opcodes, and the largest memo slot index, the pickle may use (``8 rows + 4096``).
        bytes_left: array bytes still allowed (one pixel array and at most two int64 label arrays).
    """

    def __init__(self, where: str, rows: Optional[int], title: str) -> None:
        self.where, self.rows, self.title = where, rows, title
        self.max_ops = 8 * (rows or 0) + 4096
        self.bytes_left = (rows or 0) * (ROW_BYTES + 2 * 8)  # one pixel array, at most two int64 labels

    def fail(self, message: str) -> CorruptArchiveError:
        """The error to raise for this file: ``CorruptArchiveError("<where>: <message>")``."""
        return CorruptArchiveError(f"{self.where}: {message}")

    def ndarray(self, *args, **kwargs):
        """What the pickle gets for ``numpy.ndarray``: a marker for ``_reconstruct``, never to be called."""
        raise self.fail(
            "the pickle calls numpy.ndarray itself (a CIFAR batch only names it as the type to "
            "rebuild): refused before allocating anything"
        )

    def reconstruct(self, subtype, shape, code) -> _Pending:
        if subtype != self.ndarray or shape != (0,) or code not in (b"b", "b"):
            raise self.fail(
                "refused numpy's _reconstruct with other arguments than its own "
                "(ndarray, (0,), 'b'): nothing is allocated from the pickle's say-so"
            )
        return _Pending(self.build_array)

    def dtype(self, code, align=False, copy=True) -> _Pending:
        name = code.decode("ascii", "replace") if isinstance(code, bytes) else code
        if not isinstance(name, str) or name not in _DTYPE_CODES:
            raise self.fail(
                f"refused the dtype {str(name)[:20]!r}: a CIFAR batch holds only uint8 "
                "pixels and integer labels"
            )
        return _Pending(self.build_dtype, np.dtype(name))

    def encode(self, text, encoding="utf-8", errors="strict") -> bytes:
        """``_codecs.encode(str, 'latin1')``: how Python 3 writes bytes in a protocol-2 pickle."""
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
            raise self.fail("refused _codecs.encode other than str -> latin-1 bytes")
        return text.encode("latin-1")

    def build_dtype(self, dt: np.dtype, state) -> np.dtype:
        ok = isinstance(state, tuple) and len(state) == 8 and state[2:5] == (None, None, None)
        order = state[1] if ok else None
        order = order.decode("ascii", "replace") if isinstance(order, bytes) else order
        if order not in ("|", "<", ">", "="):
            raise self.fail("refused a dtype state that is not numpy's own for an integer type")
        return dt.newbyteorder(order) if order in ("<", ">") else dt

    def build_array(self, _, state) -> np.ndarray:
        """Check ``(version, shape, dtype, is_fortran, payload)`` against the format, then view it."""
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise self.fail("an array's state is not numpy's (shape, dtype, is_fortran, payload)")
        shape, dtype, fortran, raw = state[-4:]
        dt = dtype.value if isinstance(dtype, _Pending) else None
        if (
            not isinstance(dt, np.dtype)
            or not isinstance(shape, tuple)
            or type(fortran) not in (bool, int)
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise self.fail("an array's state is not numpy's (shape, dtype, is_fortran, payload)")
        nbytes = math.prod(shape) * dt.itemsize
        fits = self.rows is not None and (
            (shape == (self.rows, ROW_BYTES) and dt == np.uint8)
            or (shape == (self.rows,) and dt.kind in "iu")
        )
        if not fits:
            want = (
                (
                    f"a {self.title} file of this kind holds b'data', a uint8 array (N, 3072) with N = "
                    f"{self.rows}, and N labels"
                )
                if self.rows
                else "a meta file holds no array"
            )
            raise self.fail(
                f"refused a {dt} array of shape {shape} ({nbytes} bytes) before allocating it: " + want
            )
        if not isinstance(raw, bytes) or len(raw) != nbytes:
            got = f"{len(raw)} bytes" if isinstance(raw, bytes) else f"a {type(raw).__name__}"
            raise self.fail(
                f"refused a {dt} array of shape {shape}: its payload holds {got}, not the "
                f"{nbytes} bytes that shape needs"
            )
        self.bytes_left -= nbytes
        if self.bytes_left < 0:
            raise self.fail("holds more arrays than a CIFAR batch (one of pixels, at most two of labels)")
        return np.frombuffer(raw, dtype=dt).reshape(shape, order="F" if fortran else "C")


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` admits only checked numpy-array reconstruction."""

    # The only globals CIFAR pickles (Python 2 originals, Python 3 re-pickles) use -> PickleBudget attribute.
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
        ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
        ("numpy", "ndarray"): "ndarray",
        ("numpy", "dtype"): "dtype",
        ("_codecs", "encode"): "encode",
    }

    def __init__(self, file, budget: PickleBudget):
        super().__init__(file, encoding="bytes")
        self.budget = budget

    def find_class(self, module: str, name: str):
        attr = self.ALLOWED.get((module, name))
        if attr is None:
            raise UnsafePickleError(
                f"{self.budget.where}: refused to load the global {module}.{name}: a CIFAR batch only needs "
                "numpy array reconstruction, so this file is not a genuine CIFAR batch (it could run code). "
                "Delete it and download the archive again."
            )
        return getattr(self.budget, attr)


def _prescan(payload: bytes, budget: PickleBudget) -> None:
    """Walk the opcodes (building nothing: bounded count and memo slots, every length within the file).
    (The C unpickler allocates a counted ``bytes`` before reading it and grows its memo to twice the
    largest slot index: an 8-byte pickle could otherwise claim gigabytes.)
    """
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(io.BytesIO(payload)), 1):
            if count > budget.max_ops:
                raise budget.fail(
                    f"has more than {budget.max_ops} pickle opcodes, more than the format needs"
                )
            if op.name in _MEMO_PUTS and arg > budget.max_ops:
                raise budget.fail(f"asks for memo slot {arg}, more than the format needs ({budget.max_ops})")
    except CorruptArchiveError:
        raise
    except ValueError as exc:  # a counted length past the end, an unknown opcode, no STOP
        raise budget.fail(f"is not a valid pickle ({exc})") from exc


def load_pickle(payload: bytes, budget: PickleBudget) -> dict:
    """Unpickle one CIFAR file's ``payload`` under ``budget``, after a pre-scan of its opcodes.

    Args:
        payload: the whole file (or tar member) as bytes.
        budget: what this file may hold; use a fresh one per file.

    Returns:
        The pickled dict (keys as bytes), arrays as read-only numpy views of ``payload``.

    Raises:
        UnsafePickleError: the pickle names a global outside the five CIFAR needs.
        CorruptArchiveError: the pickle is damaged, not a dict, or asks for more than the format allows.
    """
    _prescan(payload, budget)
    try:
        obj = _RestrictedUnpickler(io.BytesIO(payload), budget).load()
    except (CorruptArchiveError, UnsafePickleError):
        raise
    except Exception as exc:  # any other failure of a damaged pickle
        raise budget.fail(f"is not a valid batch pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise budget.fail(f"expected a dict, got {type(obj).__name__}")
    return {key: value.value if isinstance(value, _Pending) else value for key, value in obj.items()}
