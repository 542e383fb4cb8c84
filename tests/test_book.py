"""The published book, tested as a reader sees it.

Static checks (no browser): the repository URL is the same everywhere (``_config.yml``,
``cpl_mini.utils.REPO_URL``, each chapter's install line) and every notebook in ``_toc.yml`` is
ready to publish (executed top to bottom, outputs present, no error output, kernel ``python3``).

Browser checks: ``_build/html`` (rebuilt with ``jupyter-book build . -W -q`` when a book source is
newer than the last build) is served on 127.0.0.1 and every page of ``_toc.yml`` (plus the
index) is opened once in headless Chromium (Debian's ``/usr/bin/chromium`` driven by playwright).
Per page: HTTP 200 and no failed request, no page error and no console error, math typeset by
MathJax with no raw TeX left, every image loaded and (chapters with code) at least one figure from
the notebook's outputs, every internal link and anchor resolving, and the Colab launch link naming
that chapter's notebook on ``main``.

Convention checks (static, per chapter; CONTRIBUTING.md, "How a chapter is shaped"): figure metadata
(caption, ``fig-`` name, alt text that is not a path), the "What you will learn" admonition, exercise
headings ``### Exercise N.M (kind)`` numbered 1, 2, ..., solutions only in cells tagged ``solution``,
code lines <= 88 characters, the flat public API and no private attribute, glued names that a cell of
the notebook glues (and that myst-nb can format), ``check("N.M")`` under its own exercise. In the
browser, also: figures captioned "Fig. N.M" with real alt text, no raw ``{glue:text}``/``{numref}``.

The browser tests are skipped only when ``/usr/bin/chromium`` is missing outside CI (``CI`` unset);
in CI they must run. ``BOOK_SCREENSHOT_DIR=/some/dir`` saves a full-page screenshot of every page.
"""

import html.parser
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from cpl_mini import utils

REPO = pathlib.Path(__file__).resolve().parents[1]
HTML = REPO / "_build" / "html"
CHROMIUM = pathlib.Path("/usr/bin/chromium")
IN_CI = bool(os.environ.get("CI"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Known and harmless: Sphinx 7.4 + sphinx-thebe declare THEBE_JS_URL twice on every page.
# Allowed by its exact text, nothing else is.
ALLOWED_ERRORS = {"Identifier 'THEBE_JS_URL' has already been declared"}
COLAB_PREFIX = "https://colab.research.google.com/"
# Raw TeX that must not survive in a page's visible text once MathJax has run.
RAW_TEX = ("$$", "\\[", "\\]", "\\(", "\\)", "\\begin{")


# ----------------------------------------------------------------------------- the book's pages
def _toc_files():
    """Every page of ``_toc.yml`` (root first), as paths relative to the repo without suffix."""
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []) or []:
                    walk(child)

    walk(toc)
    return [str(pathlib.PurePosixPath(f).with_suffix("")) for f in files]


def _source(stem):
    """The source file of a toc entry (``.ipynb`` or ``.md``), or None when missing."""
    for suffix in (".ipynb", ".md"):
        path = REPO / (stem + suffix)
        if path.exists():
            return path
    return None


def _read_nb(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _code_cells(nb):
    return [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]


def _text(cell):
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


TOC = _toc_files()
NOTEBOOKS = [s for s in TOC if (REPO / (s + ".ipynb")).exists()]
# The figure check is strict, but only for notebooks with code (the placeholders have none).
WITH_CODE = {s for s in NOTEBOOKS if _code_cells(_read_nb(REPO / (s + ".ipynb")))}
# The pages a reader can open: every toc page, and the index (a redirect to the root page).
PAGES = ["index"] + TOC


# ----------------------------------------------------------------------------- static checks
def test_repository_url_is_the_single_source():
    config = yaml.safe_load((REPO / "_config.yml").read_text())
    assert config["repository"]["url"].rstrip("/") == utils.REPO_URL.rstrip("/"), (
        "_config.yml repository.url and cpl_mini.utils.REPO_URL differ: change one to match the other"
    )
    assert str(config["repository"].get("branch", "main")) == utils.REPO_BRANCH
    assert config.get("launch_buttons", {}).get("colab_url") == COLAB_PREFIX.rstrip("/")


def test_toc_entries_exist():
    missing = [s for s in TOC if _source(s) is None]
    assert not missing, f"_toc.yml lists pages with no .ipynb or .md source: {missing}"
    not_nb = [s for s in TOC if re.match(r"\d\d_", pathlib.PurePosixPath(s).name) and s not in NOTEBOOKS]
    assert not not_nb, f"chapters must be notebooks (.ipynb) so their Colab button works: {not_nb}"


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_notebook_ready_to_publish(stem):
    """Executed top to bottom in one kernel, outputs committed, no error output, kernel python3."""
    import nbformat

    path = REPO / (stem + ".ipynb")
    nbformat.validate(nbformat.read(path, as_version=4))
    nb = _read_nb(path)
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", (
        f"{path.name}: kernelspec must be python3"
    )
    widgets = nb["metadata"].get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    has_widget_state = bool(widgets.get("state"))
    assert not has_widget_state, (
        f"{path.name}: saved ipywidgets state (e.g. a tqdm.auto bar) makes its page load widget JavaScript "
        "from a CDN; drop metadata['widgets'] (nbclient: store_widget_state=False)"
    )
    code = _code_cells(nb)
    if not code:
        return  # a placeholder: nothing to run
    counts = [c.get("execution_count") for c in code]
    assert None not in counts, (
        f"{path.name}: {counts.count(None)} code cell(s) never executed; run "
        f"`python scripts/execute_notebook.py {stem}.ipynb` before committing"
    )
    assert counts == sorted(counts) and len(set(counts)) == len(counts), (
        f"{path.name}: execution counts {counts} are not one top-to-bottom run; re-execute it with "
        "scripts/execute_notebook.py"
    )
    assert any(c.get("outputs") for c in code), f"{path.name}: no outputs committed"
    errors = [
        (i, o.get("ename"))
        for i, c in enumerate(code)
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors, f"{path.name}: error outputs in code cells (index, error): {errors}"


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_setup_cell_installs_from_the_repository(stem):
    """The set-up cell (first code cell) installs cpl_mini from REPO_URL; no other repo is named."""
    nb = _read_nb(REPO / (stem + ".ipynb"))
    code = _code_cells(nb)
    pattern = re.compile(r"git\+(https?://[^\s\"'@#]+)")
    for cell in nb["cells"]:  # any install line anywhere must name the book's repository
        for url in pattern.findall(_text(cell)):
            assert url.rstrip("/").removesuffix(".git") == utils.REPO_URL, (
                f"{stem}.ipynb installs from {url}, not from {utils.REPO_URL}"
            )
    if not code:
        return
    setup = _text(code[0])
    assert "cpl_mini.setup(" in setup, f"{stem}.ipynb: the first code cell must be the set-up cell"
    installs = [line for line in setup.splitlines() if "pip install" in line]
    assert installs, f"{stem}.ipynb: the set-up cell has no install line"
    for line in installs:
        assert f"cpl_mini @ git+{utils.REPO_URL}" in line, (
            f'{stem}.ipynb: install line {line.strip()!r} must install "cpl_mini @ git+{utils.REPO_URL}"'
        )


# ----------------------------------------------------------------------------- the chapters' conventions
# Static checks of the conventions every chapter follows (CONTRIBUTING.md, "How a chapter is shaped").
CHAPTERS = [s for s in NOTEBOOKS if re.match(r"\d\d_", pathlib.PurePosixPath(s).name)]
EXERCISE_KINDS = ("check", "prove", "explore", "project")
EXERCISE_HEADING = re.compile(r"^###\s+Exercise\b.*$", re.M)
EXERCISE_FORMAT = re.compile(r"^### Exercise (\d+)\.(\d+) \((" + "|".join(EXERCISE_KINDS) + r")\)(?:\s|$)")
FENCE = re.compile(r"^\s*(`{3,}|:{3,})\s*\{(?P<name>[\w:-]+)\}\s*(?P<arg>.*)$", re.M)
CHECK_CALL = re.compile(r"\bcheck\(\s*[\"'](\d+\.\d+)[\"']")
CODE_LINE_MAX = 88
# A role or directive that reads a glued value: {glue}`name`, {glue:text}`name:.2f`, ```{glue:figure} name
GLUE_ROLE = re.compile(r"\{glue(?::\w+)?\}`([^`]+)`")
GLUE_DIRECTIVE = re.compile(r"^\s*(?:`{3,}|:{3,})\s*\{glue(?::\w+)?\}\s+(\S+)", re.M)
# What an image's alt text must not be: a file name or path (myst-nb's default alt text is the path).
PATH_LIKE = re.compile(r"\S*\.(png|jpe?g|svg|gif|pdf)|\S*/\S*", re.I)


def _chapter_number(stem):
    return int(pathlib.PurePosixPath(stem).name[:2])


def _cells(stem):
    return _read_nb(REPO / (stem + ".ipynb"))["cells"]


def _tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def _markdown(stem):
    return [(i, _text(c)) for i, c in enumerate(_cells(stem)) if c.get("cell_type") == "markdown"]


@pytest.mark.parametrize("stem", CHAPTERS)
def test_figures_have_caption_name_and_alt_text(stem):
    """Every figure output sits in a cell whose metadata gives a caption, a name and real alt text."""
    bad = []
    for i, cell in enumerate(_cells(stem)):
        if cell.get("cell_type") != "code":
            continue
        n_figures = sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))
        if not n_figures:
            continue
        meta = cell.get("metadata", {}).get("mystnb", {})
        figure, image = meta.get("figure", {}), meta.get("image", {})
        alt = str(image.get("alt", "")).strip()
        problems = [
            what
            for what, ok in (
                ("one figure per cell", n_figures == 1),
                ("mystnb.figure.caption", str(figure.get("caption", "")).strip()),
                ("mystnb.figure.name (fig-...)", str(figure.get("name", "")).startswith("fig-")),
                ("mystnb.image.alt", alt),
                ("alt text that is not a file path", alt and not PATH_LIKE.fullmatch(alt)),
            )
            if not ok
        ]
        if problems:
            bad.append(f"cell {i}: needs {', '.join(problems)}")
    assert not bad, f"{stem}.ipynb figures (see CONTRIBUTING.md, Figures):\n" + "\n".join(bad)


def test_figure_names_unique_across_the_book():
    names = {}
    for stem in CHAPTERS:
        for cell in _cells(stem):
            name = cell.get("metadata", {}).get("mystnb", {}).get("figure", {}).get("name")
            if name:
                names.setdefault(name, []).append(stem)
    dups = {n: s for n, s in names.items() if len(s) > 1}
    assert not dups, f"figure names used more than once: {dups}"


@pytest.mark.parametrize("stem", CHAPTERS)
def test_what_you_will_learn_admonition(stem):
    """One "What you will learn" admonition, right after the title (first markdown cells)."""
    md = _markdown(stem)
    everywhere = sum(len(re.findall(r"\{admonition\}\s*What you will learn", t)) for _, t in md)
    assert everywhere == 1, f"{stem}.ipynb: {everywhere} 'What you will learn' admonitions, expected one"
    head = "\n".join(t for _, t in md[:2])
    assert re.search(r"\{admonition\}\s*What you will learn", head), (
        f"{stem}.ipynb: the 'What you will learn' admonition must follow the title"
    )
    title = next((line for _, t in md for line in t.splitlines() if line.startswith("# ")), "")
    assert not re.match(r"# \d", title), f"{stem}.ipynb: title {title!r} must not carry the chapter number"


def _exercises(stem):
    """[(cell index, heading line)] of the ### Exercise headings of a chapter, in order."""
    return [(i, m.group(0).strip()) for i, t in _markdown(stem) for m in EXERCISE_HEADING.finditer(t)]


@pytest.mark.parametrize("stem", CHAPTERS)
def test_exercise_headings(stem):
    """Exercises are "### Exercise N.M (check|prove|explore|project)", N the chapter, M = 1, 2, 3, ..."""
    n = _chapter_number(stem)
    has_section = any(re.search(r"^## Exercises\s*$", t, re.M) for _, t in _markdown(stem))
    headings = _exercises(stem)
    assert has_section and headings, (
        f"{stem}.ipynb: no '## Exercises' section with '### Exercise {n}.M' headings"
    )
    bad, numbers = [], []
    for i, line in headings:
        match = EXERCISE_FORMAT.match(line)
        if match is None:
            bad.append(f"cell {i}: {line!r} is not '### Exercise {n}.M (kind)', kind in {EXERCISE_KINDS}")
            continue
        if int(match.group(1)) != n:
            bad.append(f"cell {i}: {line!r} is numbered for chapter {match.group(1)}, not {n}")
        numbers.append(int(match.group(2)))
    if numbers and numbers != list(range(1, len(numbers) + 1)):
        bad.append(f"exercise numbers {numbers} are not 1, 2, ..., {len(numbers)}")
    assert not bad, f"{stem}.ipynb:\n" + "\n".join(bad)


@pytest.mark.parametrize("stem", CHAPTERS)
def test_solutions_sit_in_solution_cells(stem):
    """Every {dropdown} Solution (and every code cell saying '# Solution') is in a cell tagged solution,
    so that scripts/make_handouts.py removes it."""
    bad = []
    for i, cell in enumerate(_cells(stem)):
        if "solution" in _tags(cell):
            continue
        text = _text(cell)
        if cell.get("cell_type") == "markdown":
            for m in FENCE.finditer(text):
                if m["name"] in ("dropdown", "admonition", "toggle") and re.match(
                    r"(solution|answer)", m["arg"], re.I
                ):
                    bad.append(f"cell {i} (markdown): {m.group(0).strip()!r}")
        elif re.search(r"^\s*#+\s*(solution|answer)\b", text, re.I | re.M):
            bad.append(f"cell {i} (code): {text.strip().splitlines()[0][:60]!r}")
    assert not bad, f"{stem}.ipynb: solutions outside cells tagged 'solution':\n" + "\n".join(bad)


@pytest.mark.parametrize("stem", CHAPTERS)
def test_code_lines_fit_the_page(stem):
    """Code lines of at most 88 characters (the set-up cell, the same in every chapter, is checked above)."""
    code = [(i, c) for i, c in enumerate(_cells(stem)) if c.get("cell_type") == "code"][1:]
    long = [
        (i, k + 1, len(line))
        for i, c in code
        for k, line in enumerate(_text(c).splitlines())
        if len(line) > CODE_LINE_MAX
    ]
    assert not long, (
        f"{stem}.ipynb: code lines over {CODE_LINE_MAX} characters (cell, line, length): {long[:10]}"
        f"{' ...' if len(long) > 10 else ''}; run `ruff format {stem}.ipynb` (it wraps code; "
        "shorten long comments and strings by hand)"
    )


@pytest.mark.parametrize("stem", CHAPTERS)
def test_public_api_only(stem):
    """cpl_mini is imported through its flat API only, and no private attribute is used (read from the
    code's syntax tree, so that a string such as "python -m cpl_mini.train" is not an import)."""
    import ast

    import cpl_mini

    public = set(cpl_mini.__all__) | {"__version__"}
    bad = []
    for i, cell in enumerate(_cells(stem)):
        if cell.get("cell_type") != "code":
            continue
        # IPython magics and shell lines (%pip, !ls) are not Python: blank them, keep the line numbers
        code = "\n".join(
            "" if line.lstrip().startswith(("%", "!")) else line for line in _text(cell).splitlines()
        )
        try:
            tree = ast.parse(code)
        except SyntaxError as exc:
            bad.append(f"cell {i}: does not parse as Python ({exc.msg}, line {exc.lineno})")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cpl_mini."):
                names = {alias.name for alias in node.names}
                if node.module != "cpl_mini.exercises" or names - {"check"}:
                    bad.append(
                        f"cell {i}: from {node.module} import {', '.join(sorted(names))} "
                        "(use `from cpl_mini import ...`; from cpl_mini.exercises only check)"
                    )
            elif isinstance(node, ast.Import):
                bad += [
                    f"cell {i}: import {a.name} (use `import cpl_mini`)"
                    for a in node.names
                    if a.name.startswith("cpl_mini.")
                ]
            elif isinstance(node, ast.Attribute):
                if (
                    isinstance(node.value, ast.Name)
                    and node.value.id == "cpl_mini"
                    and node.attr not in public
                ):
                    bad.append(f"cell {i}: cpl_mini.{node.attr} is not a public name of cpl_mini")
                elif re.match(r"_[a-z]", node.attr):
                    bad.append(f"cell {i}: private attribute .{node.attr} (line {node.lineno})")
    assert not bad, f"{stem}.ipynb:\n" + "\n".join(sorted(set(bad), key=bad.index))


def _glued(cells):
    """{name: text/plain} of the values stored by myst_nb.glue in a notebook's outputs (output metadata
    ``scrapbook.name``; the data under ``application/papermill.record/text/plain``, or ``text/plain``
    when glued with display=True)."""
    values = {}
    for cell in cells:
        for out in cell.get("outputs", []):
            scrap = out.get("metadata", {}).get("scrapbook", {})
            if scrap.get("name"):
                data = out.get("data", {})
                text = data.get(scrap.get("mime_prefix", "") + "text/plain", data.get("text/plain", ""))
                values[scrap["name"]] = "".join(text) if isinstance(text, list) else text
    return values


@pytest.mark.parametrize("stem", CHAPTERS)
def test_glued_names_exist(stem):
    """Every value quoted with {glue:text}`name` is glued by an executed cell of the same notebook."""
    from myst_nb.core.variables import format_plain_text

    cells = _cells(stem)
    glued = _glued(cells)
    used = []
    captions = [
        (i, str(c.get("metadata", {}).get("mystnb", {}).get("figure", {}).get("caption", "")))
        for i, c in enumerate(cells)
    ]
    for i, text in _markdown(stem) + captions:
        used += [(i, m.group(1).split(":", 1)[0].strip(), m.group(1)) for m in GLUE_ROLE.finditer(text)]
        used += [(i, m.group(1), m.group(1)) for m in GLUE_DIRECTIVE.finditer(text)]
    bad = [
        f"cell {i}: {{glue}} `{raw}`" + (" (glue reads only this notebook)" if "::" in raw else "")
        for i, name, raw in used
        if name not in glued or "::" in raw
    ]
    assert not bad, (
        f"{stem}.ipynb: glued names no cell glues (glued: {sorted(glued)}); run the cell "
        "with cpl_mini.glue(name, value) and commit its output:\n" + "\n".join(bad)
    )
    for i, name, raw in used:  # what the build does with the stored text (myst-nb's own formatter)
        value = glued[name]
        spec = raw.split(":", 1)[1] if ":" in raw else ""
        try:
            format_plain_text(value, spec)
        except Exception as exc:
            bad.append(f"cell {i}: {{glue:text}} `{raw}`: the stored {value!r} cannot be formatted ({exc})")
        if re.match(r"(np\.\w+|tensor|array)\(", value):
            bad.append(f"cell {i}: `{name}` was glued as {value[:40]!r}: glue a Python number (float(x))")
    assert not bad, f"{stem}.ipynb: glued values the book cannot show:\n" + "\n".join(bad)


@pytest.mark.parametrize("stem", CHAPTERS)
def test_self_checks_use_their_exercise_number(stem):
    """A check("N.M", ...) call sits under the heading of Exercise N.M (its own number)."""
    current, bad = None, []
    for i, cell in enumerate(_cells(stem)):
        text = _text(cell)
        if cell.get("cell_type") == "markdown":
            for line in text.splitlines():
                if line.startswith("## "):
                    current = None
                match = EXERCISE_FORMAT.match(line)
                if match:
                    current = f"{match.group(1)}.{match.group(2)}"
            continue
        for number in CHECK_CALL.findall(text):
            if number != current:
                where = f"under Exercise {current}" if current else "outside any exercise"
                bad.append(f"cell {i}: check({number!r}) {where}")
    assert not bad, f"{stem}.ipynb:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- build and serve
SOURCE_SUFFIXES = {".ipynb", ".md", ".bib", ".png", ".jpg", ".jpeg", ".svg", ".gif"}


def _book_sources():
    """What the HTML is built from (not the run folders that chapters write under book/)."""
    yield REPO / "_config.yml"
    yield REPO / "_toc.yml"
    for path in (REPO / "book").rglob("*"):
        if (
            path.suffix in SOURCE_SUFFIXES
            and path.is_file()
            and not {".ipynb_checkpoints", "runs"} & set(path.relative_to(REPO).parts)
        ):
            yield path
    yield from (REPO / "cpl_mini").rglob("*.py")  # the API reference is built from the docstrings


def _build_is_stale():
    """True when the HTML is missing or a book source is newer than the last build.

    ``index.html`` (a redirect) is written only by the first build, so the time of the last build is
    read from ``.buildinfo``, which Sphinx rewrites at the end of every build that changed anything.
    """
    stamp = HTML / ".buildinfo"
    if not (HTML / "index.html").exists() or not stamp.exists():
        return True
    built = stamp.stat().st_mtime
    return any(p.stat().st_mtime > built for p in _book_sources())


@pytest.fixture(scope="session")
def browser_available():
    if not CHROMIUM.exists():
        msg = f"{CHROMIUM} not found (apt-get install -y chromium; scripts/setup.sh --browser does it)"
        if IN_CI:
            pytest.fail("CI must run the browser tests: " + msg)
        pytest.skip(msg)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        if IN_CI:
            pytest.fail(f"CI must run the browser tests: {exc} (pip install -e '.[test]')")
        pytest.skip(f"playwright missing: {exc}")


@pytest.fixture(scope="session")
def built_book(browser_available):
    if _build_is_stale():
        proc = subprocess.run(
            ["jupyter-book", "build", ".", "-W", "-q"], cwd=REPO, capture_output=True, text=True, timeout=1200
        )
        if proc.returncode != 0:
            pytest.fail("jupyter-book build . -W -q failed:\n" + (proc.stdout + proc.stderr)[-4000:])
    assert (HTML / "index.html").exists()
    return HTML


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def server(built_book):
    """``python -m http.server`` on 127.0.0.1 serving _build/html; yields its base URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            str(port),
            "--directory",
            str(built_book),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(base + "index.html", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"http.server did not start on port {port}")
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def browser(browser_available):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


# ----------------------------------------------------------------------------- one visit per page
_COLLECT_JS = r"""() => {
  const article = document.querySelector('article.bd-article') || document.querySelector('main')
      || document.body;
  const clone = article.cloneNode(true);
  clone.querySelectorAll('pre, code, script, style, mjx-container, .highlight, .cell_input')
      .forEach(e => e.remove());
  const maths = [...document.querySelectorAll('.math')];
  return {
    url: location.href,
    text: clone.textContent,
    math: maths.length,
    math_unrendered: maths.filter(m => !m.querySelector('mjx-container'))
        .map(m => m.textContent.slice(0, 80)),
    mjx: document.querySelectorAll('mjx-container').length,
    // TeX errors render as merror; undefined macros (MathJax's noundefined) as red mtext "\\name"
    mjx_errors: [...document.querySelectorAll('mjx-merror, mjx-assistive-mml merror')]
        .map(e => e.getAttribute('data-mjx-error') || e.textContent.slice(0, 80))
        .concat([...document.querySelectorAll('mjx-assistive-mml mtext[mathcolor="red"]')]
        .map(e => e.textContent).filter(t => t.startsWith('\\'))),
    images: [...document.querySelectorAll('img')].map(i => {
        const cap = i.closest('figure') && i.closest('figure').querySelector('figcaption');
        return {src: i.currentSrc || i.src, width: i.naturalWidth, output: !!i.closest('.cell_output'),
                alt: i.getAttribute('alt') || '', caption: cap ? cap.textContent.trim() : null};
    }),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  };
}"""


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key == "id" or (tag == "a" and key == "name"):
                self.ids.add(value)


_ID_CACHE = {}


def _ids_of(path):
    if path not in _ID_CACHE:
        parser = _Ids()
        parser.feed(path.read_text(encoding="utf-8", errors="replace"))
        _ID_CACHE[path] = parser.ids
    return _ID_CACHE[path]


def _visit(browser, base, name):
    """Open one page once and record everything the checks need."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    # Chromium asks for /favicon.ico on its own (at a moment that varies) and the book has none:
    # answer that one automatic request so its 404 cannot make the console check flaky.
    context.route(base + "favicon.ico", lambda route: route.fulfill(status=204, body=""))
    page = context.new_page()
    rec = {"errors": [], "allowed": [], "bad_requests": []}

    def on_console(msg):
        if msg.type == "error":
            text = msg.text
            where = (msg.location or {}).get("url", "")
            (rec["allowed"] if _allowed(text) else rec["errors"]).append(f"console: {text} [{where}]")

    def on_pageerror(err):
        text = getattr(err, "message", str(err))
        (rec["allowed"] if _allowed(text) else rec["errors"]).append(f"page error: {text}")

    def on_response(resp):
        if resp.status >= 400:
            rec["bad_requests"].append(f"{resp.status} {resp.url}")

    page.on("console", on_console)
    page.on("pageerror", on_pageerror)
    page.on("requestfailed", lambda req: rec["bad_requests"].append(f"failed {req.url} ({req.failure})"))
    page.on("response", on_response)
    try:
        url = base + ("index.html" if name == "index" else name + ".html")
        response = page.goto(url, wait_until="load", timeout=30_000)
        rec["status"] = response.status if response else None
        if name == "index":  # a meta refresh to the root page
            root = base + TOC[0] + ".html"
            page.wait_for_url(root, timeout=15_000)
            page.wait_for_load_state("load")
        if page.evaluate("() => document.querySelectorAll('.math').length") > 0:
            page.wait_for_function(
                "() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=20_000
            )
            page.evaluate("() => MathJax.startup.promise.then(() => true)")
        # images inside closed dropdowns still have to load: open them, then wait for every image
        page.evaluate("() => document.querySelectorAll('details').forEach(d => d.open = true)")
        page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=15_000)
        rec.update(page.evaluate(_COLLECT_JS))
        shots = os.environ.get("BOOK_SCREENSHOT_DIR")
        if shots:
            pathlib.Path(shots).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(pathlib.Path(shots) / (name.replace("/", "_") + ".png")), full_page=True)
    finally:
        context.close()
    return rec


def _allowed(text):
    text = re.sub(r"^(Uncaught )?(SyntaxError: )?", "", text.strip())
    return text in ALLOWED_ERRORS


@pytest.fixture(scope="session")
def visits(browser, server):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _visit(browser, server, name)
        return cache[name]

    get.base = server
    return get


# ----------------------------------------------------------------------------- browser checks
@pytest.mark.parametrize("name", PAGES)
def test_page_loads_cleanly(visits, name):
    rec = visits(name)
    assert rec["status"] == 200, f"{name}: HTTP {rec['status']}"
    assert not rec["errors"], f"{name}: JavaScript errors:\n" + "\n".join(rec["errors"])
    assert not rec["bad_requests"], f"{name}: failed requests:\n" + "\n".join(rec["bad_requests"])


@pytest.mark.parametrize("name", PAGES)
def test_math_rendered(visits, name):
    rec = visits(name)
    raw = [tok for tok in RAW_TEX if tok in rec["text"]]
    assert not raw, f"{name}: raw TeX {raw} left in the page's text (math not parsed or not typeset)"
    if rec["math"]:
        assert rec["mjx"] > 0, f"{name}: {rec['math']} math elements but MathJax rendered none"
        assert not rec["math_unrendered"], f"{name}: math left untypeset: {rec['math_unrendered'][:5]}"
        assert not rec["mjx_errors"], (
            f"{name}: MathJax errors or undefined macros: {sorted(set(rec['mjx_errors']))[:5]}"
        )


@pytest.mark.parametrize("name", PAGES)
def test_images_and_figures(visits, name):
    rec = visits(name)
    broken = [i["src"] for i in rec["images"] if i["width"] == 0]
    assert not broken, f"{name}: images that did not load: {broken}"
    if name in WITH_CODE:
        figures = [i for i in rec["images"] if i["output"]]
        assert figures, f"{name}: a chapter with code but no figure among its cell outputs"


@pytest.mark.parametrize("name", PAGES)
def test_internal_links_resolve(visits, name):
    rec = visits(name)
    base = urllib.parse.urlsplit(visits.base)
    bad = []
    for href in sorted(set(rec["links"])):
        parts = urllib.parse.urlsplit(href)
        if parts.scheme not in ("http", "https") or parts.netloc != base.netloc:
            continue  # external links are not checked (no network)
        rel = urllib.parse.unquote(parts.path).lstrip("/")
        target = HTML / rel
        if rel == "" or rel.endswith("/"):
            target = target / "index.html"
        if not target.is_file():
            bad.append(f"{href}: no file {target.relative_to(HTML)}")
            continue
        fragment = urllib.parse.unquote(parts.fragment)
        if fragment and target.suffix == ".html" and fragment not in _ids_of(target):
            bad.append(f"{href}: no id {fragment!r} in {target.relative_to(HTML)}")
    assert not bad, f"{name}: broken internal links:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", PAGES)
def test_colab_link(visits, name):
    rec = visits(name)
    colab = sorted({h for h in rec["links"] if h.startswith(COLAB_PREFIX)})
    if name in NOTEBOOKS:
        expected = utils.colab_url(name + ".ipynb")
        assert colab == [expected], f"{name}: Colab launch link(s) {colab}, expected [{expected}]"
    else:
        assert not colab, f"{name}: not a notebook, yet has Colab link(s) {colab}"


@pytest.mark.parametrize("name", CHAPTERS)
def test_figures_numbered_with_alt_text(visits, name):
    """Every figure of a chapter's outputs has a numbered caption "Fig. N.M" and alt text, not a path."""
    n = _chapter_number(name)
    bad = []
    for image in visits(name)["images"]:
        if not image["output"]:
            continue
        src = image["src"].rsplit("/", 1)[-1][:16]
        caption = image["caption"] or ""
        if not re.match(rf"Fig\.\s*{n}\.\d+", caption):
            bad.append(f"{src}...: caption {caption[:40]!r} is not numbered 'Fig. {n}.M'")
        if not image["alt"].strip() or PATH_LIKE.fullmatch(image["alt"].strip()):
            bad.append(f"{src}...: alt text {image['alt'][:40]!r} is empty or a file path")
    assert not bad, f"{name}: figures:\n" + "\n".join(bad)


RAW_ROLE = re.compile(r"\{(glue(:\w*)?|numref|prf:ref|eq|doc|ref|cite(:\w+)?)\}")


@pytest.mark.parametrize("name", PAGES)
def test_no_raw_roles_on_the_page(visits, name):
    """No role left unparsed in the text a reader sees ({glue:text}, {numref}, ... printed as is)."""
    raw = sorted(set(m.group(0) for m in RAW_ROLE.finditer(visits(name)["text"])))
    assert not raw, f"{name}: raw roles in the page's text: {raw}"
