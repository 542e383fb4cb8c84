"""The API reference (``book/api.md``, written by ``scripts/make_api_page.py``) follows ``_API``.

- The committed page is what the generator writes now (``--check``): a public name added to ``_API``, or
  one removed from it, makes this test fail until the page is regenerated.
- Every name of ``_API`` is documented on the page exactly once, under its flat name, in the section of
  its module; the sections come in the order in which the modules first appear in ``_API``; the two
  names outside ``_API`` (``cpl_mini.train.train``, ``cpl_mini.exercises.check``) are there too.
- ``--check`` fails, naming the name, on a page that lacks one name or documents one too many.
- The page is in the table of contents, in the back matter (not numbered).
"""

import importlib.util
import pathlib
import re

import pytest
import yaml

import cpl_mini

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGE = REPO / "book" / "api.md"


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_api_page", REPO / "scripts" / "make_api_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_api_page = _load_generator()


def _directive(name: str) -> str:
    """The line that documents ``cpl_mini.<name>`` (autodoc, or ``py:data`` for a constant)."""
    if "." in name:
        return rf"^\.\. auto\w+:: cpl_mini\.{re.escape(name)}$"
    return rf"^(?:\.\. auto\w+:: cpl_mini\.{name}|\.\. py:data:: {name})$"


def _sections(text: str) -> dict:
    """Section heading (module) -> its text."""
    chunks = re.split(r"^## `cpl_mini\.(\w+)`$", text, flags=re.MULTILINE)
    return dict(zip(chunks[1::2], chunks[2::2]))


@pytest.fixture(scope="module")
def expected():
    return make_api_page.render(dict(cpl_mini._API))


def test_committed_page_is_up_to_date(expected, capsys):
    code = make_api_page.check(PAGE, expected)
    assert code == 0, "book/api.md is stale: " + capsys.readouterr().err


def test_every_public_name_is_documented_once_in_its_module_section():
    text = PAGE.read_text(encoding="utf-8")
    sections = _sections(text)
    for name, module in cpl_mini._API.items():
        hits = re.findall(_directive(name), text, flags=re.MULTILINE)
        assert len(hits) == 1, f"{name}: documented {len(hits)} times on book/api.md"
        assert re.search(_directive(name), sections.get(module, ""), flags=re.MULTILINE), (
            f"{name} is not in the section of cpl_mini.{module}"
        )
    for name, module in (("train.train", "train"), ("exercises.check", "exercises")):
        assert re.search(_directive(name), sections.get(module, ""), flags=re.MULTILINE), name


def test_sections_follow_the_order_of_the_modules_in_api():
    first_seen = list(dict.fromkeys(cpl_mini._API.values()))
    headings = list(_sections(PAGE.read_text(encoding="utf-8")))
    assert [m for m in headings if m in first_seen] == first_seen
    assert headings[-1] == "exercises"


@pytest.mark.parametrize("change", ["remove", "add"])
def test_check_fails_on_a_stale_page(expected, tmp_path, capsys, change):
    name = "power_iteration"
    line = f".. autofunction:: cpl_mini.{name}\n"
    assert line in expected
    if change == "remove":
        stale, label = expected.replace(line, ""), f"missing: {name}"
    else:
        stale, label = (
            expected + "\n```{eval-rst}\n.. autofunction:: cpl_mini.gone\n```\n",
            "no longer public: gone",
        )
    page = tmp_path / "api.md"
    page.write_text(stale, encoding="utf-8")
    assert make_api_page.check(page, expected) == 1
    assert label in capsys.readouterr().err
    page.write_text(expected, encoding="utf-8")
    assert make_api_page.check(page, expected) == 0


def test_page_is_back_matter_in_the_toc():
    toc = yaml.safe_load((REPO / "_toc.yml").read_text(encoding="utf-8"))
    parts = [p for p in toc["parts"] if any(c["file"] == "book/api" for c in p["chapters"])]
    assert len(parts) == 1 and not parts[0].get("numbered"), parts
    assert toc["parts"][-1] is parts[0]


def test_generator_command_line_check_mode():
    """``python scripts/make_api_page.py --check`` is what CI can run: 0 on the committed page."""
    assert make_api_page.main(["--check"]) == 0
