#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv.
#   - installs torch==2.13.0 only when the environment has no torch yet
#     (on the project's machines that is a CPU build on local disk; an unpinned
#     resolve would pull a multi-GB CUDA build);
#   - then installs this package with its book and test extras (editable);
#   - with --browser, installs Debian's chromium when it is missing (browser test);
#   - with --pdf, installs Debian's TeX packages for the PDF of the book when they are missing
#     (about 40 s and 310 MB; scripts/build_pdf.sh).
#   - with --system-only, installs only the Debian packages asked for (--browser, --pdf), for an
#     environment whose Python packages are installed otherwise (the publishing workflow).
# Options combine (bash scripts/setup.sh --browser --pdf). Safe to run again: it only installs
# what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
BROWSER=0
PDF=0
PYTHON_TOO=1
for arg in "$@"; do
  case "$arg" in
    --browser) BROWSER=1 ;;
    --pdf) PDF=1 ;;
    --system-only) PYTHON_TOO=0 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "[setup] unknown option $arg (known: --browser, --pdf, --system-only)" >&2; exit 2 ;;
  esac
done
# The TeX Live packages of the PDF build: Sphinx's LaTeX writer (texlive-latex-extra), its fonts
# (tex-gyre: tgtermes.sty and friends), latexmk to run pdflatex until the references settle.
TEX_PACKAGES="texlive-latex-recommended texlive-latex-extra texlive-fonts-recommended texlive-plain-generic tex-gyre latexmk"

apt_install() {
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

tex_missing() {
  command -v pdflatex >/dev/null 2>&1 || return 0
  command -v latexmk >/dev/null 2>&1 || return 0
  for sty in tgtermes.sty capt-of.sty fncychap.sty; do
    [ -n "$(kpsewhich "$sty" 2>/dev/null)" ] || return 0
  done
  return 1
}

python_env() {
  PY=${PYTHON:-python3}
  VENV=${VENV:-.venv}
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  . "$VENV/bin/activate"
  python -m pip install -q --upgrade pip >/dev/null
  if ! python -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch==2.13.0"
    python -m pip install -q torch==2.13.0
  fi
  echo "[setup] installing cpl_mini with its book and test extras"
  python -m pip install -q -e ".[book,test]"
}

if [ "$PYTHON_TOO" = 1 ]; then python_env; fi
if [ "$BROWSER" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  echo "[setup] installing Debian's chromium for the browser test"
  apt_install chromium
fi
if [ "$PDF" = 1 ] && tex_missing; then
  echo "[setup] installing Debian's TeX packages for the PDF: $TEX_PACKAGES"
  # shellcheck disable=SC2086
  apt_install $TEX_PACKAGES
fi
if [ "$PYTHON_TOO" = 1 ]; then
  echo "[setup] done: $(python -c 'import torch, cpl_mini; print("torch", torch.__version__, "| cpl_mini", cpl_mini.__version__)')"
else
  echo "[setup] done (Debian packages only)"
fi
