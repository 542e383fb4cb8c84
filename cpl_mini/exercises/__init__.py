"""Self-checks for the book's exercises: say whether an answer is right without revealing the solution.

In a chapter, after working an exercise out::

    from cpl_mini.exercises import check
    check("5.2", my_answer)      # prints "Exercise 5.2: right." or "Exercise 5.2: not yet - <hint>"

A teacher grades with the same checks: :func:`grade` returns a :class:`Feedback` instead of printing.
Each chapter's checks live in ``cpl_mini.exercises.chNN`` (``ch05`` for chapter 5) and are registered
with :func:`register`; :func:`available` lists them.
"""

from .checking import Feedback, available, check, grade, register

__all__ = ["Feedback", "available", "check", "grade", "register"]
