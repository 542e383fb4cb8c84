"""The machinery of the exercise self-checks: a registry of checker functions and their verdicts."""

from __future__ import annotations

import importlib
import math
import re
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

__all__ = ["Feedback", "register", "grade", "check", "available", "as_number", "to_float", "is_close"]

#: A checker returns ``True`` (right), ``False`` (wrong, no hint) or ``(ok, hint)``.
CheckerResult = Union[bool, Tuple[bool, str]]
Checker = Callable[..., CheckerResult]

_REGISTRY: Dict[str, Checker] = {}
_ID = re.compile(r"^(\d+)\.(\d+)$")


class Feedback(NamedTuple):
    """The verdict on one answer: ``ok`` and a hint that never gives the solution away."""

    exercise: str
    ok: bool
    hint: str

    def __str__(self) -> str:
        if self.ok:
            return f"Exercise {self.exercise}: right."
        return f"Exercise {self.exercise}: not yet" + (f" - {self.hint}" if self.hint else ".")


def _parse(exercise: str) -> Tuple[int, int]:
    match = _ID.match(str(exercise).strip())
    if match is None:
        raise ValueError(f"exercises are named 'N.M' (chapter N, exercise M), got {exercise!r}")
    return int(match.group(1)), int(match.group(2))


def register(exercise: str) -> Callable[[Checker], Checker]:
    """Decorator: make ``func(answer, ...)`` the checker of exercise ``"N.M"``."""
    _parse(exercise)

    def decorate(func: Checker) -> Checker:
        if exercise in _REGISTRY:
            raise ValueError(f"exercise {exercise} already has a checker ({_REGISTRY[exercise].__name__})")
        _REGISTRY[exercise] = func
        return func

    return decorate


def _load_chapter(chapter: int) -> None:
    try:
        importlib.import_module(f".ch{chapter:02d}", __package__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.ch{chapter:02d}":
            raise


def _checker(exercise: str) -> Checker:
    chapter, _ = _parse(exercise)
    _load_chapter(chapter)
    if exercise not in _REGISTRY:
        known = ", ".join(available(chapter)) or "none"
        raise KeyError(f"exercise {exercise} has no self-check; chapter {chapter} has: {known}")
    return _REGISTRY[exercise]


def grade(exercise: str, answer: Any, **kwargs: Any) -> Feedback:
    """Check ``answer`` to exercise ``"N.M"``; returns a :class:`Feedback` (nothing printed).

    An answer that makes the checker raise (wrong type, wrong shape, a function that fails) is wrong,
    and the hint says what went wrong.
    """
    exercise = str(exercise).strip()
    checker = _checker(exercise)
    try:
        result = checker(answer, **kwargs)
    except Exception as exc:  # a student's answer may fail in any way: that is a wrong answer
        return Feedback(exercise, False, f"checking the answer raised {type(exc).__name__}: {exc}")
    if isinstance(result, tuple):
        ok, hint = result
    else:
        ok, hint = result, ""
    return Feedback(exercise, bool(ok), "" if ok else str(hint))


def check(exercise: str, answer: Any, **kwargs: Any) -> None:
    """Print the verdict on ``answer`` to exercise ``"N.M"`` (use ``grade`` to get it as a value)."""
    print(grade(exercise, answer, **kwargs))


def available(chapter: Optional[int] = None) -> List[str]:
    """The exercises that have a self-check (of one chapter, or of every chapter 1-10)."""
    for c in [chapter] if chapter is not None else range(1, 11):
        _load_chapter(int(c))
    names = [e for e in _REGISTRY if chapter is None or _parse(e)[0] == int(chapter)]
    return sorted(names, key=_parse)


def as_number(answer: Any, what: str) -> Tuple[Optional[float], str]:
    """``(float(answer), "")`` for one finite number (Python, NumPy or a one-element tensor), else
    ``(None, hint)``: the checkers' common first step, so an unanswered exercise says what to give."""
    if answer is None:
        return None, f"replace None by your answer ({what})"
    if isinstance(answer, (bool, str, bytes)):
        return None, f"the answer should be a number ({what}), got {type(answer).__name__}"
    if hasattr(answer, "numel") and hasattr(answer, "item"):  # a torch tensor
        if answer.numel() != 1:
            return None, f"the answer should be one number ({what}), got shape {tuple(answer.shape)}"
        answer = answer.item()
    try:
        value = float(answer)
    except (TypeError, ValueError):
        return None, f"the answer should be a number ({what}), got {type(answer).__name__}"
    if not math.isfinite(value):
        return None, f"the answer should be a finite number ({what})"
    return value, ""


def to_float(answer: Any) -> float:
    """``answer`` (a Python or NumPy number, or a one-element tensor) as a float; ``ValueError`` when it
    is not one finite number (the checker then reports the error as the hint, see ``grade``)."""
    import torch

    value = float(torch.as_tensor(answer, dtype=torch.float64).reshape(()))
    if not math.isfinite(value):
        raise ValueError("the answer must be a finite number")
    return value


def is_close(value: float, reference: float, rel: float = 1e-3) -> bool:
    """``|value - reference| <= rel * |reference|`` (with a floor of 1e-12 for a zero reference)."""
    return abs(value - reference) <= rel * max(abs(reference), 1e-12)
