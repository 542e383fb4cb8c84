#!/usr/bin/env bash
# Build the whole book as a PDF, offline: _build/pdf/book.pdf.
#   bash scripts/build_pdf.sh              # set up .venv and Debian's TeX packages when missing, then build
#   bash scripts/build_pdf.sh --no-setup   # use the active environment (jupyter-book and TeX installed)
# Jupyter Book's LaTeX builder (Sphinx's standard LaTeX writer) and pdflatex via latexmk; the chapters
# are not re-executed. Each solution is printed in a section "Solutions" at the end of its chapter.
# The build fails on an undefined reference or citation, a "??" or a character the fonts lack
# (scripts/pdf_book.py lists them). First run: about 40 s to install TeX; then 1-2 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  --no-setup) shift ;;
  -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
  *)
    bash scripts/setup.sh --pdf
    . .venv/bin/activate
    ;;
esac
start=$(date +%s)
python scripts/pdf_book.py "$@"
echo "[pdf] done in $(( $(date +%s) - start )) s: _build/pdf/book.pdf"
