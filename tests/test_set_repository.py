"""scripts/set_repository.py: one command points every Colab button, install line and link at a fork."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "set_repository.py"
sys.path.insert(0, str(ROOT / "scripts"))
import set_repository  # noqa: E402


@pytest.fixture
def tree(tmp_path):
    """A copy of the files that name the repository (the real tree is never changed)."""
    for name in ("_config.yml", "pyproject.toml", "README.md", "CONTRIBUTING.md", "cpl_mini/utils.py"):
        if (ROOT / name).exists():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "book", tmp_path / "book", ignore=shutil.ignore_patterns("_build", "runs"))
    return tmp_path


def _run(*args, root):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--root", str(root)], capture_output=True, text=True
    )


def test_real_tree_is_consistent():
    slug = set_repository.current_slug(ROOT)
    assert set_repository.mismatches(slug, ROOT) == []


def test_rewrites_every_place(tree):
    old = set_repository.current_slug(tree)
    result = _run("my-org/lipschitz-book", root=tree)
    assert result.returncode == 0, result.stderr
    assert set_repository.current_slug(tree) == "my-org/lipschitz-book"
    assert set_repository.mismatches("my-org/lipschitz-book", tree) == []
    copied = [
        p for p in tree.rglob("*") if p.is_file() and p.suffix in (".md", ".yml", ".py", ".toml", ".ipynb")
    ]
    assert len([p for p in copied if p.suffix == ".ipynb"]) >= 10
    for path in copied:
        assert f"github.com/{old}" not in path.read_text(encoding="utf-8"), path
    config = (tree / "_config.yml").read_text(encoding="utf-8")
    assert "url: https://github.com/my-org/lipschitz-book" in config
    for nb_path in sorted((tree / "book").glob("*.ipynb")):
        nb = json.loads(nb_path.read_text(encoding="utf-8"))  # still valid JSON
        setup = next(c for c in nb["cells"] if c["cell_type"] == "code")
        assert 'cpl_mini @ git+https://github.com/my-org/lipschitz-book"' in "".join(setup["source"]), (
            nb_path.name
        )


def test_check_fails_with_the_fix_and_passes_after(tree):
    before = _run("--check", "my-org/lipschitz-book", root=tree)
    assert before.returncode == 1
    assert "python scripts/set_repository.py my-org/lipschitz-book" in before.stderr
    assert "_config.yml" in before.stderr and "cpl_mini/utils.py" in before.stderr
    assert _run("my-org/lipschitz-book", root=tree).returncode == 0
    assert _run("--check", "my-org/lipschitz-book", root=tree).returncode == 0
    # idempotent: a second run changes nothing
    again = _run("my-org/lipschitz-book", root=tree)
    assert "0 files changed" in again.stdout


def test_one_stale_install_line_is_caught(tree):
    nb_path = tree / "book" / "05_convex_potential_layer.ipynb"
    text = nb_path.read_text(encoding="utf-8")
    slug = set_repository.current_slug(tree)
    nb_path.write_text(text.replace(f"git+https://github.com/{slug}", "git+https://github.com/someone/else"))
    bad = set_repository.mismatches(slug, tree)
    assert ("book/05_convex_potential_layer.ipynb", "someone/else") in bad


@pytest.mark.parametrize("slug", ["no-slash", "a/b/c", "-bad/name", ""])
def test_refuses_what_is_not_owner_name(tree, slug):
    result = _run(slug, root=tree)
    assert result.returncode == 2
    assert "OWNER/NAME" in result.stderr
