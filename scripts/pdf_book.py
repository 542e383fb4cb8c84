"""Build the PDF of the whole book with Jupyter Book's LaTeX builder and pdflatex (offline).

    python scripts/pdf_book.py            # writes _build/pdf/book.pdf (scripts/build_pdf.sh calls this)
    python scripts/pdf_book.py --out DIR  # build in DIR instead (its book.pdf)

Steps, each timed:

1. **Prepare** a LaTeX-side copy of the book in ``_build/pdf/src``: the chapters as teacher's copies
   (``make_handouts.solutions_at_end``: each solution unfolded in a section "Solutions" after the
   exercises, not printed open in the middle of them); a table of contents whose root is a title page,
   with the preface as an unnumbered chapter (``\\frontmatter``), one ``\\part`` for each part of
   ``_toc.yml`` (``\\mainmatter`` before the first) and unnumbered back matter (``\\backmatter``);
   the ``book`` document class, one-sided, A4.
2. **LaTeX**: ``jupyter-book build _build/pdf/src --builder latex -W`` (Sphinx's standard LaTeX writer,
   ``latex: use_jupyterbook_latex: false`` in ``_config.yml``; the notebooks are not executed).
3. **PDF**: ``latexmk -pdf`` on ``book.tex`` (reruns pdflatex until the references settle).
4. **Check** ``book.log``: an undefined reference or citation, a ``??``, or a character the fonts
   lack fails the build, with the list of what went wrong. The PDF is copied to ``_build/pdf/book.pdf``.

Needs Debian's TeX packages (``bash scripts/setup.sh --pdf`` installs them).
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import nbformat
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_handouts import solutions_at_end  # noqa: E402  (a script next to this one)

ROOT = pathlib.Path(__file__).resolve().parents[1]
# jupyter-book of this interpreter's environment, whatever PATH says.
JUPYTER_BOOK = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())"]
OUT = ROOT / "_build" / "pdf"
COPY_IGNORE = shutil.ignore_patterns("runs", ".ipynb_checkpoints", "__pycache__", "*.pt", "*.ckpt")
# Characters that occur in prose or outputs and that pdflatex's T1 fonts lack: typeset them as math.
UNICODE_MATH = {
    "00B0": r"^\circ",
    "2264": r"\le",
    "2265": r"\ge",
    "2248": r"\approx",
    "2260": r"\neq",
    "00D7": r"\times",
    "2212": "-",
    "221A": r"\surd",
    "2192": r"\to",
    "2190": r"\leftarrow",
    "2016": r"\|",
    "221E": r"\infty",
    "2208": r"\in",
    "2211": r"\sum",
    "2202": r"\partial",
    "2207": r"\nabla",
    "03B1": r"\alpha",
    "03B2": r"\beta",
    "03B3": r"\gamma",
    "03B4": r"\delta",
    "03B5": r"\varepsilon",
    "03B8": r"\theta",
    "03BB": r"\lambda",
    "03BC": r"\mu",
    "03C0": r"\pi",
    "03C1": r"\rho",
    "03C3": r"\sigma",
    "03C4": r"\tau",
    "03C6": r"\varphi",
    "03A3": r"\Sigma",
    "0394": r"\Delta",
    "2713": r"\checkmark",
    "2717": r"\times",
}
TEXT_CHARS = {"2026": r"\ldots{}", "2588": r"\rule{0.6em}{1.6ex}", "258F": r"\rule{0.1em}{1.6ex}"}


# The bibliography page already opens a chapter "Bibliography": the list follows it without a second one.
BIBLIOGRAPHY = r"""\makeatletter
\renewenvironment{sphinxthebibliography}[1]{\let\chapter\@gobbletwo\begin{thebibliography}{#1}}%
  {\end{thebibliography}}
\makeatother"""


def latex_preamble() -> str:
    """The preamble: "Contents" as the toc's name, one bibliography chapter, the Unicode characters."""
    lines = [r"\addto\captionsenglish{\renewcommand{\contentsname}{Contents}}", BIBLIOGRAPHY]
    lines += [
        rf"\DeclareUnicodeCharacter{{{code}}}{{\ensuremath{{{tex}}}}}" for code, tex in UNICODE_MATH.items()
    ]
    lines += [rf"\DeclareUnicodeCharacter{{{code}}}{{{tex}}}" for code, tex in TEXT_CHARS.items()]
    return "\n".join(lines) + "\n"


# The toc pages, then \frontmatter for the preface (unnumbered, roman page numbers).
TABLE_OF_CONTENTS = (
    "\\frontmatter\n\\begingroup\\parskip 0pt\\sphinxtableofcontentshook\\tableofcontents\\endgroup\n"
    "\\clearpage\n"
)


def pdf_config(config: dict) -> dict:
    """The book's ``_config.yml`` with the LaTeX side's own look."""
    config = copy.deepcopy(config)
    sphinx = config.setdefault("sphinx", {}).setdefault("config", {})
    sphinx["latex_docclass"] = {"manual": "book"}
    sphinx["latex_domain_indices"] = False  # no "Proof Index" chapter
    sphinx["latex_elements"] = {
        "papersize": "a4paper",
        "pointsize": "10pt",
        "extraclassoptions": "openany,oneside",
        "tableofcontents": TABLE_OF_CONTENTS,
        "preamble": latex_preamble(),
    }
    config["exclude_patterns"] = ["_build/*", "**.ipynb_checkpoints"]
    return config


def part_title(caption: str) -> str:
    """ "Part II: The Convex Potential Layer" -> "The Convex Potential Layer" (LaTeX prints "Part II")."""
    return re.sub(r"^Part\s+[IVXLC\d]+\s*[:.-]\s*", "", caption).strip()


def pdf_toc(toc: dict) -> tuple:
    """The PDF's toc (root: a title page; the preface first, unnumbered) and the raw LaTeX to put
    before the first page of each part, as ``{file: latex}``."""
    parts = [{"caption": "Preface", "chapters": [{"file": toc["root"]}]}] + copy.deepcopy(toc["parts"])
    # Sections are numbered in the numbered parts only, to the depth of ``numbered`` (2: "5.3", as in
    # the HTML); the preface and the back matter have no numbers.
    raw, seen_numbered = {toc["root"]: "\\setcounter{secnumdepth}{-1}\n"}, False
    for part in parts[1:]:
        first = part["chapters"][0]["file"]
        if part.get("numbered"):
            depth = 4 if part["numbered"] is True else int(part["numbered"])
            latex = "" if seen_numbered else "\\mainmatter\n"
            latex += f"\\setcounter{{secnumdepth}}{{{depth - 1}}}\n"
            raw[first] = latex + f"\\part{{{part_title(part.get('caption', ''))}}}\n"
            seen_numbered = True
        elif seen_numbered:
            raw[first] = "\\backmatter\n\\setcounter{secnumdepth}{-1}\n"
    return {"format": toc.get("format", "jb-book"), "root": "pdf_title", "parts": parts}, raw


def _raw_block(latex: str) -> str:
    return "```{raw} latex\n" + latex + "```\n"


def prepare(src: pathlib.Path) -> pathlib.Path:
    """Write the LaTeX-side copy of the book into ``src``; returns ``src``."""
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    shutil.copytree(ROOT / "book", src / "book", ignore=COPY_IGNORE)
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    (src / "_config.yml").write_text(yaml.safe_dump(pdf_config(config), sort_keys=False), encoding="utf-8")
    toc, raw = pdf_toc(yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8")))
    (src / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False), encoding="utf-8")
    (src / "pdf_title.md").write_text(f"# {config.get('title', 'Book')}\n", encoding="utf-8")
    for path in sorted((src / "book").glob("[0-9][0-9]_*.ipynb")):
        nbformat.write(solutions_at_end(nbformat.read(path, as_version=4), path.name), path)
    for stem, latex in raw.items():
        for suffix in (".ipynb", ".md"):
            path = src / (stem + suffix)
            if not path.exists():
                continue
            if suffix == ".md":
                path.write_text(_raw_block(latex) + "\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
            else:
                nb = nbformat.read(path, as_version=4)
                nb.cells.insert(0, nbformat.v4.new_markdown_cell(_raw_block(latex)))
                nbformat.write(nb, path)
    return src


LOG_PROBLEMS = (
    (
        re.compile(r"LaTeX Warning: (?:Reference|Citation|Hyper reference) `[^']*' on page \S+ undefined"),
        "undefined reference",
    ),
    (re.compile(r"There were undefined (?:references|citations)"), "undefined references"),
    (re.compile(r"Missing character: There is no .*"), "a character the fonts lack"),
    (re.compile(r".*\?\?.*"), "'??' in the log"),
)


def log_problems(log: str) -> list:
    """What in a pdflatex log makes the PDF unfit: unresolved references, '??', missing characters."""
    found = []
    for pattern, what in LOG_PROBLEMS:
        for match in pattern.finditer(log):
            item = f"{what}: {match.group(0).strip()}"
            if item not in found:
                found.append(item)
    return found


def _run(cmd, cwd, log_path, env=None) -> float:
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        text = re.sub(
            r"\x1b\[[0-9;]*m", "", pathlib.Path(log_path).read_text(encoding="utf-8", errors="replace")
        )
        # Sphinx's warnings and TeX's errors ("! ..."), else the end of the log
        lines = text.splitlines()
        causes = [
            line
            for k, line in enumerate(lines)
            if re.search(r"WARNING|ERROR|^! |\.tex:\d+:", line) or (k and "treated as error" in lines[k - 1])
        ]
        detail = "\n".join(causes[:20]) if causes else text[-3000:]
        raise SystemExit(
            f"{' '.join(map(str, cmd[-5:]))} failed (exit {proc.returncode}); {log_path}:\n{detail}"
        )
    return time.time() - start


def summary(tex: str, log: str) -> str:
    pages = re.search(r"Output written on \S+ \((\d+) pages", log)
    return (
        f"{pages.group(1) if pages else '?'} pages, {tex.count(chr(92) + 'chapter{')} chapters, "
        f"{tex.count('sphinxincludegraphics')} figures, {tex.count(chr(92) + 'begin{equation')} "
        "numbered equations"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=pathlib.Path, default=OUT, help="build folder (default _build/pdf)")
    args = parser.parse_args(argv)
    missing = [tool for tool in ("pdflatex", "latexmk", "kpsewhich") if shutil.which(tool) is None]
    if missing:
        print(
            f"{', '.join(missing)} not found: run `bash scripts/setup.sh --pdf` (Debian's TeX packages)",
            file=sys.stderr,
        )
        return 2
    start = time.time()
    src = prepare(args.out / "src")
    t_prep = time.time() - start
    latex_dir = src / "_build" / "latex"
    t_sphinx = _run(
        [*JUPYTER_BOOK, "build", str(src), "--builder", "latex", "-W", "-q"], ROOT, args.out / "sphinx.log"
    )
    env = dict(os.environ, LATEXOPTS="")
    t_tex = _run(
        ["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", "book.tex"],
        latex_dir,
        args.out / "latexmk.log",
        env=env,
    )
    log = (latex_dir / "book.log").read_text(encoding="latin-1")
    problems = log_problems(log)
    if problems:
        print(f"The PDF has {len(problems)} problem(s) (see {latex_dir / 'book.log'}):", file=sys.stderr)
        print("\n".join("  " + p for p in problems), file=sys.stderr)
        return 1
    shutil.copy2(latex_dir / "book.pdf", args.out / "book.pdf")
    tex = (latex_dir / "book.tex").read_text(encoding="utf-8")
    print(
        f"{args.out / 'book.pdf'}: {summary(tex, log)}; prepared in {t_prep:.0f} s, LaTeX written in "
        f"{t_sphinx:.0f} s, pdflatex {t_tex:.0f} s, total {time.time() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
