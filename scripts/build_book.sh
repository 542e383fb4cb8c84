#!/usr/bin/env bash
# Set up .venv (first run: a few minutes) and build the book's HTML into _build/html.
# The chapters are not re-executed: the book shows the outputs committed with each notebook.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
jupyter-book build . -W --keep-going
echo "Open _build/html/index.html in a browser (or: python -m http.server -d _build/html 8000)."
