"""cpl_mini.exercises.checking: the registry, the verdicts, and the common answer parsing."""

import math

import numpy as np
import pytest
import torch

from cpl_mini.exercises import Feedback, available, check, grade
from cpl_mini.exercises.checking import as_number, is_close


def test_every_chapter_has_at_least_three_self_checks():
    for chapter in range(1, 11):
        assert len(available(chapter)) >= 3, chapter


def test_verdicts_print_without_the_answer(capsys):
    check("1.2", None)
    out = capsys.readouterr().out
    assert out.startswith("Exercise 1.2: not yet -") and out.count("\n") == 1
    fb = grade("1.2", None)
    assert isinstance(fb, Feedback) and not fb.ok


def test_unknown_exercises_and_bad_names_are_refused():
    with pytest.raises(KeyError, match="has no self-check"):
        grade("1.99", 0)
    with pytest.raises(ValueError, match="N.M"):
        grade("one", 0)


def test_a_raising_answer_is_a_wrong_answer():
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    fb = grade("2.1", broken)
    assert not fb.ok and "RuntimeError" in fb.hint


@pytest.mark.parametrize(
    "answer", [3, 3.0, np.float64(3.0), np.int64(3), torch.tensor(3.0), torch.tensor([3.0])]
)
def test_as_number_accepts_one_number(answer):
    assert as_number(answer, "x") == (3.0, "")


@pytest.mark.parametrize("answer", [None, True, "3", torch.ones(2), math.inf, float("nan"), [3.0]])
def test_as_number_refuses_what_is_not_one_finite_number(answer):
    value, hint = as_number(answer, "a radius")
    assert value is None and "a radius" in hint


def test_is_close_is_relative():
    assert is_close(1.0005, 1.0) and not is_close(1.002, 1.0)
    assert is_close(1000.5, 1000.0) and not is_close(1e-9, 0.0)
