"""Write student copies of the chapters: every solution removed, the self-checks kept.

    python scripts/make_handouts.py OUT_DIR                      # every chapter of book/
    python scripts/make_handouts.py OUT_DIR --chapters 01,05     # some chapters
    python scripts/make_handouts.py OUT_DIR --solutions end      # teacher's copy: solutions at the end

A student copy (the default, ``--solutions drop``) of ``book/NN_name.ipynb`` is written to
``OUT_DIR/NN_name.ipynb`` with

- every cell tagged ``solution`` removed, with its outputs (the ``{dropdown} Solution`` markdown cells
  and the hidden code cells that compute an answer);
- every remaining ``{dropdown} Solution`` block (also ``{admonition} Solution``, ``:::`` fences) cut out
  of untagged markdown cells, and a cell left empty by that removed;
- everything else kept as committed: the statements, the self-check cells (``check("N.M", answer)``)
  and their outputs.

Before anything is written, each copy is searched for what still looks like a solution (a fence titled
"Solution" or "Answer", a heading "Solution", a code comment ``# Solution``). If one is found, nothing is
written and the command exits with status 1, naming the chapter and the cell (its index in the committed
notebook): tag that cell ``solution`` in the chapter.

``--solutions end`` writes a teacher's copy instead: each solution is moved, unfolded, to a section
"Solutions" after the chapter's exercises, under "Solution to Exercise N.M". The PDF of the book
(``scripts/build_pdf.sh``) is built from such copies, so that it prints no expanded solution in the
middle of the exercises.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import re
import sys
from typing import List, NamedTuple, Optional, Tuple

import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOLUTION_TAG = "solution"
#: A fence line of MyST: ``` or ~~~ are code/directives, ::: (colon_fence) directives.
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,}|:{3,})(?P<info>.*)$")
#: The directive line of a solution block: ```{dropdown} Solution, ```{admonition} Answer to 5.2, ...
SOLUTION_INFO = re.compile(r"^\{(dropdown|admonition|toggle|card)\}\s*(solution|answer)", re.IGNORECASE)
SOLUTION_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(solution|answer)s?\b", re.IGNORECASE)
SOLUTION_COMMENT = re.compile(r"^\s*#+\s*(solution|answer)s?\b", re.IGNORECASE)
EXERCISE_HEADING = re.compile(r"^\s{0,3}###\s+Exercise\s+(\d+\.\d+)\b")
OPTION_LINE = re.compile(r"^\s*:[\w-]+:")
CHECK_CALL = re.compile(r"\bcheck\(\s*[\"']\d+\.\d+[\"']")  # a self-check: check("5.2", answer)
HIDE_TAGS = {"hide-cell", "hide-input", "hide-output", "remove-cell", "remove-input"}


class SolutionLeft(Exception):
    """A student copy would still hold a solution."""


class Block(NamedTuple):
    """A fenced block: lines ``start`` (the opening fence) to ``end`` (its closing fence)."""

    start: int
    end: int
    info: str
    indent: str


def _text(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _tags(cell) -> List[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def fenced_blocks(lines: List[str]) -> List[Block]:
    """Every fenced block of a markdown text (nested ones too), in the order they close.

    A fence closes the innermost open one when it has the same character, at least its length and no
    info string. Inside a literal code block (an info string not starting with ``{``) nothing opens;
    inside a directive (``{name}``) fences nest, as MyST parses them. An unclosed block runs to the end.
    """
    stack: List[Tuple[str, int, int, str, str]] = []  # (char, length, start, info, indent)
    blocks: List[Block] = []
    for i, line in enumerate(lines):
        match = FENCE.match(line.rstrip("\n"))
        if match is None:
            continue
        fence, info, indent = match["fence"], match["info"].strip(), match["indent"]
        if stack:
            char, length, start, open_info, open_indent = stack[-1]
            if not info and fence[0] == char and len(fence) >= length:
                stack.pop()
                blocks.append(Block(start, i, open_info, open_indent))
                continue
            if not open_info.startswith("{"):
                continue  # literal code: its lines are text
        if fence[0] == "`" and "`" in info:
            continue  # not a fence (CommonMark): inline code
        stack.append((fence[0], len(fence), i, info, indent))
    while stack:
        _, _, start, info, indent = stack.pop()
        blocks.append(Block(start, len(lines) - 1, info, indent))
    return blocks


def solution_blocks(text: str) -> List[Block]:
    """The outermost fenced blocks titled Solution/Answer, sorted by position."""
    lines = text.splitlines(keepends=True)
    found = sorted((b for b in fenced_blocks(lines) if SOLUTION_INFO.match(b.info)), key=lambda b: b.start)
    outer: List[Block] = []
    for block in found:
        if not outer or block.start > outer[-1].end:
            outer.append(block)
    return outer


def block_body(lines: List[str], block: Block) -> str:
    """The content of a block, without its fences and directive options, dedented to its fence."""
    body = lines[block.start + 1 : block.end]
    while body and OPTION_LINE.match(body[0]):
        body = body[1:]
    width = len(block.indent)
    return "".join(line[width:] if line[:width].strip() == "" else line for line in body).strip("\n")


def block_title(block: Block) -> str:
    """The directive's argument: "Solution to exercise 2" for ```{dropdown} Solution to exercise 2."""
    return re.sub(r"^\{[^}]*\}\s*", "", block.info).strip()


def strip_solution_blocks(text: str) -> Tuple[str, int]:
    """``text`` without its solution blocks (and without the blank lines they leave); and their number."""
    lines = text.splitlines(keepends=True)
    blocks = solution_blocks(text)
    for block in reversed(blocks):
        del lines[block.start : block.end + 1]
    out = re.sub(r"\n{3,}", "\n\n", "".join(lines))
    return (out.strip() + "\n" if out.strip() else ""), len(blocks)


def solution_traces(cell) -> List[str]:
    """Lines of a cell that look like a solution (empty when none)."""
    text = _text(cell)
    if cell.get("cell_type") == "code":
        return [line.strip() for line in text.splitlines() if SOLUTION_COMMENT.match(line)]
    traces = []
    for line in text.splitlines():
        match = FENCE.match(line)
        if (match and SOLUTION_INFO.match(match["info"].strip())) or SOLUTION_HEADING.match(line):
            traces.append(line.strip())
    return traces


def _in_exercises(text: str, state: bool) -> bool:
    """Whether the text after this markdown is in the section "## Exercises" (``state``: before it)."""
    for line in text.splitlines():
        if line.startswith("## "):
            state = line.strip().lower().startswith("## exercises")
    return state


def _first_line(cell) -> str:
    lines = _text(cell).strip().splitlines()
    return (lines[0][:70] + ("..." if len(lines[0]) > 70 else "")) if lines else "(empty)"


def make_handout(nb, name: str = "notebook"):
    """A student copy of ``nb``; raises :class:`SolutionLeft` when a solution would survive.

    Returns ``(copy, report)`` with ``report`` a dict of counts (cells removed, blocks stripped, checks kept).
    """
    out = copy.deepcopy(nb)
    kept, problems = [], []
    report = {"removed_cells": 0, "stripped_blocks": 0, "self_checks": 0}
    in_exercises = False
    for index, cell in enumerate(out.cells):
        if cell.cell_type == "markdown":
            in_exercises = _in_exercises(_text(cell), in_exercises)
        if SOLUTION_TAG in _tags(cell):
            report["removed_cells"] += 1
            continue
        if cell.cell_type == "markdown":
            text, n = strip_solution_blocks(_text(cell))
            report["stripped_blocks"] += n
            if n and not text.strip():
                continue
            cell.source = text if n else cell.source
        traces = solution_traces(cell)
        if in_exercises and cell.cell_type == "code" and "hide-cell" in _tags(cell):
            traces.append("a hidden code cell (tag hide-cell) among the exercises")
        if traces:
            where = f"{name}: cell {index} ({cell.cell_type}, starts {_first_line(cell)!r})"
            problems.append(
                f"{where} still holds a solution ({'; '.join(traces)}): tag that cell 'solution'."
            )
        if cell.cell_type == "code" and CHECK_CALL.search(_text(cell)):
            report["self_checks"] += 1
        kept.append(cell)
    if problems:
        raise SolutionLeft("\n".join(problems))
    out.cells = kept
    nbformat.validate(out)
    return out, report


def _exercise_at(lines: List[str], upto: int, current: Optional[str]) -> Optional[str]:
    """The exercise number of the last "### Exercise N.M" heading in ``lines[:upto]`` (or ``current``)."""
    for line in lines[:upto]:
        match = EXERCISE_HEADING.match(line)
        if match:
            current = match.group(1)
    return current


def _solutions_section_index(cells) -> int:
    """Where the "Solutions" section goes: before the first level-2 heading after "## Exercises".

    A markdown cell that holds that heading below other text is split at the heading.
    """
    seen_exercises = False
    for index, cell in enumerate(cells):
        if cell.cell_type != "markdown":
            continue
        lines = _text(cell).splitlines(keepends=True)
        for k, line in enumerate(lines):
            if not line.startswith("## "):
                continue
            if line.strip().lower().startswith("## exercises"):
                seen_exercises = True
            elif seen_exercises:
                if k == 0:
                    return index
                cell.source = "".join(lines[:k]).rstrip() + "\n"
                cells.insert(index + 1, nbformat.v4.new_markdown_cell("".join(lines[k:])))
                return index + 1
    return len(cells)


def solutions_at_end(nb, name: str = "notebook"):
    """A teacher's copy of ``nb``: every solution unfolded in a section "Solutions" after the exercises."""
    out = copy.deepcopy(nb)
    moved: List[Tuple[str, object]] = []  # (heading, cell)
    kept, current = [], None
    for cell in out.cells:
        tagged = SOLUTION_TAG in _tags(cell)
        if cell.cell_type == "markdown":
            text = _text(cell)
            lines = text.splitlines(keepends=True)
            blocks = solution_blocks(text)
            for block in blocks:
                number = _exercise_at(lines, block.start, current)
                title = block_title(block)
                heading = f"Solution to Exercise {number}" if number else (title or "Solution")
                moved.append((heading, nbformat.v4.new_markdown_cell(block_body(lines, block))))
            rest, _ = strip_solution_blocks(text)
            current = _exercise_at(lines, len(lines), current)
            if tagged and rest.strip():
                moved.append(
                    (
                        f"Solution to Exercise {current}" if current else "Solution",
                        nbformat.v4.new_markdown_cell(rest),
                    )
                )
            elif not tagged and rest.strip():
                cell.source = rest if blocks else cell.source
                kept.append(cell)
            continue
        if tagged:
            cell.metadata["tags"] = [t for t in _tags(cell) if t not in HIDE_TAGS]
            moved.append((f"Solution to Exercise {current}" if current else "Solution", cell))
            continue
        kept.append(cell)
    if moved:
        section = [nbformat.v4.new_markdown_cell("## Solutions")]
        last = None
        for heading, cell in moved:
            if heading != last or not heading.startswith("Solution to Exercise"):
                section.append(nbformat.v4.new_markdown_cell(f"### {heading}"))
                last = heading
            section.append(cell)
        at = _solutions_section_index(kept)
        kept[at:at] = section
    out.cells = kept
    nbformat.validate(out)
    return out


def chapters(book: pathlib.Path, only: Optional[List[str]] = None) -> List[pathlib.Path]:
    """The chapter notebooks ``book/NN_*.ipynb``, optionally only those whose number is in ``only``."""
    paths = sorted(book.glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {n.strip().zfill(2) for n in only if n.strip()}
        unknown = wanted - {p.name[:2] for p in paths}
        if unknown:
            raise SystemExit(f"no chapter numbered {', '.join(sorted(unknown))} in {book}")
        paths = [p for p in paths if p.name[:2] in wanted]
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=pathlib.Path, help="folder for the copies (created)")
    parser.add_argument("--chapters", help="comma-separated chapter numbers, e.g. 01,05 (default: all)")
    parser.add_argument(
        "--solutions",
        choices=("drop", "end"),
        default="drop",
        help="drop: student copies (default); end: teacher's copies, solutions at the end",
    )
    parser.add_argument("--book", type=pathlib.Path, default=ROOT / "book", help="folder of the chapters")
    args = parser.parse_args(argv)
    paths = chapters(args.book, args.chapters.split(",") if args.chapters else None)
    if not paths:
        print(f"no chapter notebooks (NN_name.ipynb) in {args.book}", file=sys.stderr)
        return 2
    copies, failures = [], []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if args.solutions == "end":
            copies.append((path, solutions_at_end(nb, path.name), None))
            continue
        try:
            handout, report = make_handout(nb, path.name)
        except SolutionLeft as exc:
            failures.append(str(exc))
            continue
        copies.append((path, handout, report))
    if failures:
        print("No handout written: solutions would survive.\n" + "\n".join(failures), file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for path, nb, report in copies:
        nbformat.write(nb, args.out_dir / path.name)
        if report:
            print(
                f"{path.name}: {report['removed_cells']} solution cells and {report['stripped_blocks']} "
                f"solution blocks removed, {report['self_checks']} self-check cells kept"
            )
        else:
            print(f"{path.name}: solutions moved to the end")
    print(f"{len(copies)} notebooks written to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
