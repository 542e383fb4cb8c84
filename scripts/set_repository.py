"""Point the book at a GitHub repository: every Colab button, install line and link follows.

    python scripts/set_repository.py OWNER/NAME          # rewrite every place that names the repository
    python scripts/set_repository.py --check OWNER/NAME  # exit 1 unless every place names OWNER/NAME

The repository's address is written in a few places that must agree (a test keeps them equal):
``repository.url`` in ``_config.yml`` (the Colab and repository buttons), ``REPO_URL`` in
``cpl_mini/utils.py``, the install line of every chapter's set-up cell, and the README, preface,
teaching page and contributor guide. A fork runs the first command once and commits the result; the
publishing workflow runs the second with the repository it runs in.
"""

import argparse
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: Where the address may appear (globs relative to the repository root).
PLACES = (
    "_config.yml",
    "cpl_mini/utils.py",
    "pyproject.toml",
    "README.md",
    "CONTRIBUTING.md",
    "book/*.md",
    "book/*.ipynb",
)
_SLUG = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}$")
_CURRENT = re.compile(r'^REPO_URL = "https://github\.com/([^"]+)"', re.M)


def current_slug(root: pathlib.Path = ROOT) -> str:
    """The ``OWNER/NAME`` that ``cpl_mini/utils.py`` names today."""
    match = _CURRENT.search((root / "cpl_mini/utils.py").read_text(encoding="utf-8"))
    if match is None:
        raise SystemExit("cpl_mini/utils.py has no line 'REPO_URL = \"https://github.com/OWNER/NAME\"'")
    return match.group(1).rstrip("/")


def files(root: pathlib.Path = ROOT):
    """The files that may name the repository, in a stable order."""
    seen = []
    for pattern in PLACES:
        for path in sorted(root.glob(pattern)):
            if path.is_file() and path not in seen:
                seen.append(path)
    return seen


def _address(slug: str) -> str:
    return f"https://github.com/{slug}"


def set_repository(slug: str, root: pathlib.Path = ROOT) -> list:
    """Replace the current address by ``https://github.com/<slug>`` everywhere; returns the files changed."""
    old = _address(current_slug(root))
    new = _address(slug)
    changed = []
    for path in files(root):
        text = path.read_text(encoding="utf-8")
        # the old address, not followed by more of a longer name (".git" and "/" may follow)
        updated = re.sub(re.escape(old) + r"(?![A-Za-z0-9_-])", new, text)
        if updated != text:
            path.write_text(updated, encoding="utf-8")
            changed.append(path.relative_to(root).as_posix())
    return changed


#: The contexts in which a GitHub address names this book's own repository.
_DESIGNATIONS = (
    re.compile(r"""git\+https://github\.com/([A-Za-z0-9._/-]+?)(?:\.git)?(?=[\\"'\s@]|$)"""),  # installs
    re.compile(r"^\s*url:\s*https://github\.com/(\S+?)/?$", re.M),  # _config.yml repository.url
    re.compile(r'^REPO_URL = "https://github\.com/([^"]+?)/?"', re.M),  # cpl_mini/utils.py
    re.compile(r"url\s*=\s*\{https://github\.com/([^}]+?)/?\}"),  # the preface's citation
)


def mismatches(slug: str, root: pathlib.Path = ROOT) -> list:
    """``(file, OWNER/NAME)`` for every place that names another repository than ``slug``."""
    found = set()
    for path in files(root):
        text = path.read_text(encoding="utf-8")
        for pattern in _DESIGNATIONS:
            for match in pattern.finditer(text):
                if match.group(1) != slug:
                    found.add((path.relative_to(root).as_posix(), match.group(1)))
    return sorted(found)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "slug", metavar="OWNER/NAME", help="the GitHub repository, e.g. my-org/lipschitz-book"
    )
    parser.add_argument(
        "--check", action="store_true", help="only check; exit 1 if a place names another one"
    )
    parser.add_argument("--root", type=pathlib.Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    slug = args.slug.strip().removeprefix("https://github.com/").removesuffix(".git").strip("/")
    if not _SLUG.match(slug):
        print(f"error: {args.slug!r} is not OWNER/NAME (for example my-org/lipschitz-book)", file=sys.stderr)
        return 2
    if args.check:
        bad = mismatches(slug, args.root)
        if bad:
            print(f"The book names another repository than {slug}:", file=sys.stderr)
            for path, other in bad:
                print(f"  {path}: {other}", file=sys.stderr)
            print(f"Fix: python scripts/set_repository.py {slug}  (then commit the result)", file=sys.stderr)
            return 1
        print(f"every place names {slug}")
        return 0
    changed = set_repository(slug, args.root)
    print(
        f"repository set to {slug}: {len(changed)} files changed"
        + (": " + ", ".join(changed) if changed else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
