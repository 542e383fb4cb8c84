#!/usr/bin/env bash
# Set up .venv (and Debian's chromium and TeX packages for the browser and PDF tests), then run every test:
#   - ruff: lint and format of the package, tests, scripts, benchmarks and chapters (pyproject.toml,
#     book/ruff.toml),
#   - the package's unit tests (tests/) and the doctests in its docstrings, on the offline CIFAR-10
#     copy in ../shared/data
#     (or $CPL_MINI_DATA),
#   - every chapter notebook with nbval in quick mode (CPL_MINI_QUICK=1: smaller data, fewer epochs,
#     same code), comparing the cells tagged nbval-check-output,
#   - `jupyter-book build . -W` (warnings are errors), the built HTML opened in headless Chromium, and
#     the PDF of the whole book (tests/test_scripts.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser --pdf
. .venv/bin/activate
if [ -z "${CPL_MINI_DATA:-}" ] && [ -e ../shared/data/cifar-10-python.tar.gz ]; then
  export CPL_MINI_DATA="$(cd ../shared/data && pwd)"
fi
export CPL_MINI_QUICK=1 MPLBACKEND=agg PYTHONWARNINGS="ignore::DeprecationWarning"
echo "[test] ruff (lint and format)"
ruff check .
ruff format --check .
echo "[test] building the book (jupyter-book build . -W)"
jupyter-book build . -W -q
echo "[test] unit tests, notebooks (nbval, quick mode), browser test"
python -m pytest -p no:cacheprovider -q --durations=15 tests book/*.ipynb --nbval-lax "$@"
