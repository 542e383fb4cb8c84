"""The book's command-line scripts: the PDF build, the chapter timer and the set-up's options.

- ``scripts/pdf_book.py`` (``bash scripts/build_pdf.sh``): its log check catches every kind of unresolved
  reference, its table of contents keeps the parts, numbering and front/back matter, and the whole book
  builds to a PDF with no problem in the log. The full build (1-2 minutes) runs when ``pdflatex`` is
  installed and must run in CI (``CI`` set; ``bash scripts/setup.sh --pdf`` installs TeX).
- ``scripts/time_chapters.py``: times a small notebook on a copy (the original untouched), writes the
  table with the machine named and "not measured yet" where nothing was measured, and ``--update`` keeps
  earlier cells only for the same machine.
- ``scripts/setup.sh``: an unknown option stops it before anything is installed.
"""

import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
IN_CI = bool(os.environ.get("CI"))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return module


pdf_book = _load("pdf_book")
time_chapters = _load("time_chapters")


# ----------------------------------------------------------------------------- the PDF
@pytest.mark.parametrize(
    "line",
    [
        "LaTeX Warning: Reference `book/05_cpl:thm-x' on page 12 undefined on input line 3.",
        "LaTeX Warning: Citation `book/bibliography:id2' on page 4 undefined on input line 9.",
        "LaTeX Warning: Hyper reference `book/01:fig-a' on page 7 undefined on input line 1.",
        "LaTeX Warning: There were undefined references.",
        "Missing character: There is no ° in font cmr10!",
        "see ?? for the proof",
    ],
)
def test_log_check_catches_unresolved_references(line):
    log = "This is pdfTeX\n(./book.tex\n" + line + "\nOutput written on book.pdf (3 pages, 100 bytes).\n"
    assert pdf_book.log_problems(log), line
    assert not pdf_book.log_problems("This is pdfTeX\nOutput written on book.pdf (3 pages, 100 bytes).\n")


def test_pdf_toc_keeps_parts_and_numbering():
    import yaml

    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    pdf, raw = pdf_book.pdf_toc(toc)
    assert pdf["root"] == "pdf_title"
    assert pdf["parts"][0] == {"caption": "Preface", "chapters": [{"file": toc["root"]}]}
    assert pdf["parts"][1:] == toc["parts"], "the PDF must list the same parts and chapters as the HTML"
    numbered = [p for p in toc["parts"] if p.get("numbered")]
    assert numbered, "_toc.yml numbers no part: chapters would not number theorems and figures"
    firsts = [p["chapters"][0]["file"] for p in numbered]
    assert raw[firsts[0]].startswith("\\mainmatter")
    assert all("\\part{" in raw[f] and "Part " not in raw[f] for f in firsts)
    assert "secnumdepth}{-1}" in raw[toc["root"]], "the preface is not numbered"
    back = [p["chapters"][0]["file"] for p in toc["parts"] if not p.get("numbered")]
    assert all(raw[f].startswith("\\backmatter") for f in back)


def test_numbering_by_chapter_in_the_toc():
    """Every part with chapters is numbered (2 levels: "5" and "5.3"), except the back matter."""
    import yaml

    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    for part in toc["parts"]:
        chapters = [c["file"] for c in part["chapters"]]
        is_chapter = [bool(re.match(r"book/\d\d_", f)) for f in chapters]
        if any(is_chapter):
            assert all(is_chapter) and part.get("numbered") == 2, part
        else:
            assert not part.get("numbered"), part


@pytest.fixture(scope="module")
def tex_available():
    missing = [t for t in ("pdflatex", "latexmk", "kpsewhich") if shutil.which(t) is None]
    if missing:
        msg = f"{', '.join(missing)} not found (bash scripts/setup.sh --pdf installs Debian's TeX packages)"
        if IN_CI:
            pytest.fail("CI must build the PDF: " + msg)
        pytest.skip(msg)


def test_whole_book_builds_to_a_pdf(tex_available, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "pdf_book.py"), "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, "PDF build failed:\n" + (proc.stdout + proc.stderr)[-4000:]
    pdf = tmp_path / "book.pdf"
    assert pdf.exists() and pdf.read_bytes()[:5] == b"%PDF-"
    latex = tmp_path / "src" / "_build" / "latex"
    toc = (latex / "book.toc").read_text(encoding="latin-1")
    tex = (latex / "book.tex").read_text(encoding="utf-8")
    n_chapters = len(list((REPO / "book").glob("[0-9][0-9]_*.ipynb")))
    assert len(re.findall(r"\\contentsline \{chapter\}\{\\numberline", toc)) == n_chapters, (
        "every chapter must be a numbered entry of the PDF's table of contents"
    )
    assert toc.count("\\contentsline {part}") >= 3 and "{chapter}{Preface}" in toc
    assert "\\sphinxincludegraphics" in tex, "no figure in the PDF"
    assert "\\begin{equation" in tex or "\\[" in tex, "no displayed math in the PDF"
    assert not re.search(r"\{dropdown\}|sphinxdropdown", tex)
    assert pdf_book.log_problems((latex / "book.log").read_text(encoding="latin-1")) == []


# ----------------------------------------------------------------------------- timing the chapters
def _tiny_book(folder):
    folder.mkdir()
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# A tiny chapter"),
            nbformat.v4.new_code_cell("import os\nprint(os.environ.get('CPL_MINI_QUICK', 'full'))"),
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    nbformat.write(nb, folder / "01_tiny.ipynb")
    nbformat.write(nb, folder / "02_other.ipynb")
    return folder


def test_time_chapters_times_a_copy_and_names_the_machine(tmp_path):
    book = _tiny_book(tmp_path / "book")
    before = (book / "01_tiny.ipynb").read_bytes()
    out = tmp_path / "times.md"
    assert (
        time_chapters.main(
            ["--book", str(book), "--chapters", "01", "--modes", "quick", "--out", str(out), "--threads", "1"]
        )
        == 0
    )
    assert (book / "01_tiny.ipynb").read_bytes() == before, "the committed notebook must not be executed"
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 1. ") or line.startswith("| 2. ")]
    assert re.fullmatch(r"\| 1\. A tiny chapter \| \d+ s \| not measured yet \|", rows[0]), rows
    assert rows[1] == "| 2. A tiny chapter | not measured yet | not measured yet |"
    info = time_chapters.machine()
    assert info["cpu"] in text and f"torch {info['torch']}" in text and info["date"] in text
    assert f"{info['cores']} cores" in text and "1 torch thread)" in text


def test_time_chapters_update_keeps_cells_of_the_same_machine(tmp_path):
    info = time_chapters.machine()
    chapters = [("01_tiny", "1. A tiny chapter"), ("02_other", "2. Other")]
    out = tmp_path / "times.md"
    out.write_text(
        time_chapters.render(chapters, {"01_tiny|full": 4000.0, "02_other|quick": "failed (X)"}, info)
    )
    assert time_chapters.previous(out, info) == {"01_tiny|full": 4000.0, "02_other|quick": "failed (X)"}
    text = out.read_text()
    assert "| 1. A tiny chapter | not measured yet | 67 min |" in text
    assert "| 2. Other | failed (X) | not measured yet |" in text
    other = dict(info, cpu="another CPU")
    with pytest.raises(SystemExit, match="another machine"):
        time_chapters.previous(out, other)


def test_time_chapters_lists_the_finished_training_runs_from_their_records(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    record = {
        "status": "finished",
        "config": {"size": "S", "compile": "auto"},
        "compile": {"compiled": True},
        "autocast": "bfloat16",
        "parameters": 41342616,
        "epochs_completed": 3,
        "device": "Some CPU (2 threads)",
        "history": [{"train_seconds": t} for t in (500.0, 300.0, 2000.0)],
        "wall_time_s": 3600.0,
        "final": {"clean_acc": 0.5, "certified": {"36/255": 0.4}},
    }
    (results / "b-run.json").write_text(json.dumps(record))
    old = dict(record, compile=None, autocast=None, config={"size": "CPU", "compile": False})
    (results / "a-old.json").write_text(
        json.dumps(dict(old, history=[{"train_seconds": 60}, {"train_seconds": 120}]))
    )
    (results / "c-running.json").write_text(json.dumps(dict(record, status="running")))
    (results / "d-f32.json").write_text(json.dumps(dict(record, autocast="off")))
    rows = time_chapters.run_rows(results)
    assert rows == [
        "| `a-old.json` | CPL-CPU (41.3M) | 3 | Some CPU (2 threads), eager | 1.5 min | 60 min |",
        "| `b-run.json` | CPL-S (41.3M) | 3 | Some CPU (2 threads), compiled, bfloat16 | 8.3 min | 60 min |",
        "| `d-f32.json` | CPL-S (41.3M) | 3 | Some CPU (2 threads), compiled, float32 | 8.3 min | 60 min |",
    ]
    text = time_chapters.render([("01_tiny", "1. A tiny chapter")], {}, time_chapters.machine(), runs=rows)
    assert text.rstrip().endswith(rows[-1]) and "| record | network |" in text
    assert "| record |" not in time_chapters.render([], {}, time_chapters.machine())


@pytest.mark.parametrize("seconds, text", [(4.2, "4 s"), (89, "89 s"), (162, "2.7 min"), (4020, "67 min")])
def test_time_format(seconds, text):
    assert time_chapters.format_seconds(seconds) == text


def test_teaching_page_includes_the_measured_table():
    page = (REPO / "book" / "teaching.md").read_text()
    assert "```{include} chapter_times.md" in page
    table = (REPO / "book" / "chapter_times.md").read_text()
    assert time_chapters.DATA_LINE.search(table), (
        "book/chapter_times.md is written by scripts/time_chapters.py"
    )
    n_chapters = len(list((REPO / "book").glob("[0-9][0-9]_*.ipynb")))
    assert len(re.findall(r"^\| \d+\. ", table, re.M)) == n_chapters


# ----------------------------------------------------------------------------- set-up
def test_setup_rejects_unknown_options_before_installing_anything():
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup.sh"), "--no-such-option"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "--pdf" in proc.stderr and "[setup] creating" not in proc.stdout


def test_setup_system_only_leaves_python_alone():
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup.sh"), "--system-only"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0 and "Debian packages only" in proc.stdout and "pip" not in proc.stdout


@pytest.mark.parametrize("script", ["setup.sh", "build_pdf.sh", "build_book.sh", "test.sh"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / script)]).returncode == 0
