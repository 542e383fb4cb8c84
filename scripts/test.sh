#!/usr/bin/env bash
# Set up .venv (and Debian's chromium for the browser test), then run every test:
#   - the package's unit tests (tests/), on the offline CIFAR-10 copy in ../shared/data
#     (or $CPL_MINI_DATA),
#   - every chapter notebook with nbval in quick mode (CPL_MINI_QUICK=1: smaller data, fewer epochs,
#     same code), comparing the cells tagged nbval-check-output,
#   - `jupyter-book build . -W` (warnings are errors) and the built HTML opened in headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser
. .venv/bin/activate
if [ -z "${CPL_MINI_DATA:-}" ] && [ -e ../shared/data/cifar-10-python.tar.gz ]; then
  export CPL_MINI_DATA="$(cd ../shared/data && pwd)"
fi
export CPL_MINI_QUICK=1 MPLBACKEND=agg PYTHONWARNINGS="ignore::DeprecationWarning"
echo "[test] building the book (jupyter-book build . -W)"
jupyter-book build . -W -q
echo "[test] unit tests, notebooks (nbval, quick mode), browser test"
python -m pytest -p no:cacheprovider -q --durations=15 tests book/*.ipynb --nbval-lax "$@"
