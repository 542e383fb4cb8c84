"""scripts/make_handouts.py: student copies keep no solution and keep every self-check.

On a small synthetic chapter (every form a solution takes: a tagged dropdown cell, a tagged hidden code
cell with outputs, dropdowns in untagged markdown with nested fences and colon fences) and on the real
chapters: no text that only a solution holds survives, the self-check cells survive unchanged with their
outputs, the copies are valid nbformat, and a solution left in an untagged cell stops the command with
the chapter and the cell named. The teacher's copy (``--solutions end``) moves every solution after
the exercises.
"""

import importlib.util
import pathlib
import re

import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_handouts", REPO / "scripts" / "make_handouts.py")
handouts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(handouts)

CHAPTERS = sorted((REPO / "book").glob("[0-9][0-9]_*.ipynb"))
v4 = nbformat.v4


def _md(text, tags=()):
    cell = v4.new_markdown_cell(text)
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def _code(text, outputs=(), tags=()):
    cell = v4.new_code_cell(text, outputs=list(outputs))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def _stream(text):
    return v4.new_output("stream", name="stdout", text=text)


def synthetic():
    """A chapter with every form of solution; SECRET_* only ever appears inside solutions."""
    glue = v4.new_output(
        "display_data",
        data={"application/papermill.record/text/plain": "'SECRET_G'"},
        metadata={"scrapbook": {"name": "secret", "mime_prefix": "application/papermill.record/"}},
    )
    cells = [
        _md("# A chapter\n\n```{admonition} What you will learn\n:class: tip\n- things\n```"),
        _code("x = 1\nprint(x)", [_stream("1\n")]),
        _md("```{dropdown} Proof\nA proof that stays.\n```"),
        _md("## Exercises"),
        _md("### Exercise 9.1 (check)\n\nCompute the answer."),
        _code(
            'from cpl_mini.exercises import check\nanswer = None  # your answer\ncheck("9.1", answer)',
            [_stream("Exercise 9.1: not yet - the hint.\n")],
        ),
        _md("```{dropdown} Solution\nThe answer is SECRET_A.\n```", tags=["solution"]),
        _code(
            'answer = 42  # SECRET_B\ncheck("9.1", answer)',
            [_stream("Exercise 9.1: right.\n"), glue],
            tags=["hide-cell", "solution"],
        ),
        _md(
            "### Exercise 9.2 (prove)\n\nShow it.\n\n````{dropdown} Solution\nSECRET_C holds:\n"
            "```{math}\nx = 1\n```\n````\n\nThe statement goes on after the dropdown."
        ),
        _md(
            "### Exercise 9.3 (explore)\n\nExplore.\n\n"
            ":::{dropdown} Solution to exercise 3\n:open:\nSECRET_D\n:::\n"
        ),
        _md("```{dropdown} Solution\nSECRET_E alone in an untagged cell\n```"),
        _md("## References\n\nA reference."),
    ]
    return v4.new_notebook(
        cells=cells,
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )


def _all_text(nb):
    parts = []
    for cell in nb.cells:
        parts.append(cell.source)
        for out in cell.get("outputs", []):
            parts.append(str(out.get("text", "")) + str(out.get("data", "")))
    return "\n".join(parts)


def test_student_copy_of_a_synthetic_chapter():
    nb = synthetic()
    nbformat.validate(nb)
    copy, report = handouts.make_handout(nb, "99_synthetic.ipynb")
    nbformat.validate(copy)
    text = _all_text(copy)
    assert "SECRET" not in text, [line for line in text.splitlines() if "SECRET" in line]
    assert report == {"removed_cells": 2, "stripped_blocks": 3, "self_checks": 1}
    # kept: the statements, the proof dropdown, the text after a stripped dropdown, the self-check cell
    for kept in (
        "Compute the answer.",
        "A proof that stays.",
        "The statement goes on after the dropdown.",
        "### Exercise 9.3 (explore)",
        "## References",
    ):
        assert kept in text
    checks = [c for c in copy.cells if c.cell_type == "code" and 'check("9.1"' in c.source]
    assert len(checks) == 1 and checks[0].outputs[0]["text"] == "Exercise 9.1: not yet - the hint.\n"
    assert "right." not in text  # the removed cell's outputs are gone with it
    assert not any(c.source.strip() == "" for c in copy.cells), "a cell left empty was kept"
    assert len(nb.cells) == 12 and "SECRET_A" in _all_text(nb), "the original was modified"


@pytest.mark.parametrize(
    "cell",
    [
        _code("# Solution to Exercise 9.1\nanswer = 42"),
        _code("answer = 42", tags=["hide-cell"]),
        _md("### Solution\n\nThe answer is 42."),
        _md("The syntax, shown:\n\n````markdown\n```{dropdown} Solution\n42\n```\n````"),
    ],
    ids=["code-comment", "hidden-code-cell", "heading", "shown-as-code"],
)
def test_a_surviving_solution_stops_the_handout(cell, tmp_path):
    nb = synthetic()
    nb.cells.insert(5, cell)  # among the exercises, untagged
    with pytest.raises(handouts.SolutionLeft, match=r"99_synthetic\.ipynb: cell 5 "):
        handouts.make_handout(nb, "99_synthetic.ipynb")
    book = tmp_path / "book"
    book.mkdir()
    nbformat.write(nb, book / "99_synthetic.ipynb")
    nbformat.write(synthetic(), book / "98_clean.ipynb")
    out = tmp_path / "out"
    assert handouts.main([str(out), "--book", str(book)]) == 1
    assert not out.exists(), "nothing may be written when one chapter would keep a solution"


def test_command_writes_every_chapter(tmp_path, capsys):
    book = tmp_path / "book"
    book.mkdir()
    for name in ("01_one.ipynb", "02_two.ipynb"):
        nbformat.write(synthetic(), book / name)
    assert handouts.main([str(tmp_path / "out"), "--book", str(book)]) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["01_one.ipynb", "02_two.ipynb"]
    assert handouts.main([str(tmp_path / "one"), "--book", str(book), "--chapters", "2"]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["02_two.ipynb"]
    assert "SECRET" not in _all_text(nbformat.read(tmp_path / "out" / "01_one.ipynb", as_version=4))


def test_fences_nest_as_myst_parses_them():
    text = (
        "````{dropdown} Solution\nA\n```\ncode\n```\n````\n"  # a bare ``` cannot close ````
        "```python\n```{dropdown} Solution\n```\n"  # a literal block: nothing opens inside it
        "```{dropdown} Solution\nunclosed"
    )
    lines = text.splitlines(keepends=True)
    blocks = handouts.solution_blocks(text)
    assert [(b.start, b.end) for b in blocks] == [(0, 5), (9, 10)]
    assert handouts.block_body(lines, blocks[0]) == "A\n```\ncode\n```"
    stripped, n = handouts.strip_solution_blocks(text)
    assert n == 2 and stripped == "```python\n```{dropdown} Solution\n```\n"


def test_teacher_copy_moves_the_solutions_after_the_exercises():
    copy = handouts.solutions_at_end(synthetic(), "99_synthetic.ipynb")
    nbformat.validate(copy)
    sources = [c.source for c in copy.cells]
    start = sources.index("## Solutions")
    assert sources.index("## References\n\nA reference.") == len(sources) - 1
    before, after = "\n".join(sources[:start]), "\n".join(sources[start:])
    assert "SECRET" not in before
    for secret in ("SECRET_A", "SECRET_B", "SECRET_C", "SECRET_D", "SECRET_E"):
        assert secret in after
    headings = [s for s in sources[start:] if s.startswith("### ")]
    assert headings[:3] == [
        "### Solution to Exercise 9.1",
        "### Solution to Exercise 9.2",
        "### Solution to Exercise 9.3",
    ]
    assert not re.search(r"\{dropdown\} Solution", after), "solutions are printed unfolded"
    code = [c for c in copy.cells if c.cell_type == "code" and "SECRET_B" in c.source][0]
    assert code.outputs and "hide-cell" not in code.metadata["tags"]
    assert "The statement goes on after the dropdown." in before


# ----------------------------------------------------------------------------- the real chapters
def _solution_only_lines(nb):
    """Lines (30+ characters) that appear in a solution of ``nb`` and nowhere else in it."""
    solution, other = [], []
    for cell in nb.cells:
        text = cell.source
        if "solution" in cell.get("metadata", {}).get("tags", []):
            solution.append(text)
            continue
        lines = text.splitlines(keepends=True)
        for block in handouts.solution_blocks(text):
            solution.append("".join(lines[block.start : block.end + 1]))
        other.append(handouts.strip_solution_blocks(text)[0] if cell.cell_type == "markdown" else text)
    seen = {line.strip() for text in other for line in text.splitlines()}
    return {
        line.strip()
        for text in solution
        for line in text.splitlines()
        if len(line.strip()) >= 30 and line.strip() not in seen
    }


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_student_copy_of_each_chapter(path):
    nb = nbformat.read(path, as_version=4)
    copy, report = handouts.make_handout(nb, path.name)  # raises, naming the cells, if a solution survives
    nbformat.validate(copy)
    lines = {line.strip() for line in _all_text(copy).splitlines()}
    left = sorted(_solution_only_lines(nb) & lines)
    assert not left, f"{path.name}: solution text left in the student copy: {left[:3]}"
    checks = [
        (c.source, c.outputs)
        for c in nb.cells
        if c.cell_type == "code"
        and "solution" not in c.metadata.get("tags", [])
        and handouts.CHECK_CALL.search(c.source)
    ]
    kept = [
        (c.source, c.outputs)
        for c in copy.cells
        if c.cell_type == "code" and handouts.CHECK_CALL.search(c.source)
    ]
    assert kept == checks, f"{path.name}: the self-check cells must survive unchanged, with their outputs"
    assert report["self_checks"] == len(checks)
