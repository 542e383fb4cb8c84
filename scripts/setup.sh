#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv.
#   - installs torch==2.13.0 only when the environment has no torch yet
#     (on the project's machines that is a CPU build on local disk; an unpinned
#     resolve would pull a multi-GB CUDA build);
#   - then installs this package with its book and test extras (editable);
#   - with --browser, installs Debian's chromium when it is missing (browser test).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
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
if [ "${1:-}" = "--browser" ] && ! command -v chromium >/dev/null 2>&1; then
  echo "[setup] installing Debian's chromium for the browser test"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
echo "[setup] done: $(python -c 'import torch, cpl_mini; print("torch", torch.__version__, "| cpl_mini", cpl_mini.__version__)')"
