#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU and PyTorch, in under 8 minutes,
#   1. the unit tests, whose property tests add CUDA to their devices when it is present,
#   2. chapters 5, 8 and 9 in quick mode on the GPU (with Jupyter when it is installed, else plain Python),
#   3. the S network's training step benchmark on the GPU (bf16, eager and torch.compile) and the
#      certification of 10,000 images with sound norms.
# Everything it prints goes to RESULTS_DIR/gpu_check.log (default: gpu_check_results/), with the
# benchmark's JSON beside it. Uses the Python on PATH (PYTHON=... to choose); CIFAR-10 from
# $CPL_MINI_DATA, or, when absent, a synthetic archive in the official format (random pictures: the
# chapters then test the code path, not accuracy).
#
#   bash scripts/gpu_check.sh                 # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${RESULTS_DIR:-gpu_check_results}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=agg
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, remember failures
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
  [ "$rc" = 0 ] || status=1
}

step environment 60 "$PY" -c "
import platform, torch
assert torch.cuda.is_available(), 'no CUDA device: this check is for a GPU machine'
p = torch.cuda.get_device_properties(0)
print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)
print('GPU', p.name, '| compute capability', f'{p.major}.{p.minor}', '| memory', round(p.total_memory / 2**30), 'GiB')
"
if [ $status != 0 ]; then echo "gpu_check: no usable CUDA GPU here; nothing else was run" | tee -a "$LOG"; exit 1; fi

if [ -z "${CPL_MINI_DATA:-}" ] || [ ! -e "$CPL_MINI_DATA/cifar-10-python.tar.gz" ]; then
  export CPL_MINI_DATA="$OUT_DIR/synthetic-cifar"
  step synthetic-data 120 "$PY" - "$CPL_MINI_DATA" <<'EOF'
import io, pickle, sys, tarfile, pathlib
import numpy as np
root = pathlib.Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
def batch(n):
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz", compresslevel=1) as tar:
    files = {f"data_batch_{i}": batch(10000) for i in range(1, 6)}
    files["test_batch"] = batch(10000)
    files["batches.meta"] = {b"label_names": [c.encode() for c in ("airplane", "automobile", "bird", "cat",
                             "deer", "dog", "frog", "horse", "ship", "truck")]}
    for name, obj in files.items():
        data = pickle.dumps(obj, protocol=2)
        info = tarfile.TarInfo(f"cifar-10-batches-py/{name}"); info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
print("synthetic CIFAR-10 archive (random pictures) in", root)
EOF
fi

PYTEST_ARGS=(-q -p no:cacheprovider -x --ignore=tests/test_book.py --ignore=tests/test_handouts.py)
if "$PY" -c "import pytest" 2>/dev/null; then
  step unit-tests 240 "$PY" -m pytest "${PYTEST_ARGS[@]}" tests
else
  echo "pytest is not installed: unit tests skipped" | tee -a "$LOG"; status=1
fi

if "$PY" -c "import nbclient, ipykernel" 2>/dev/null; then RUNNER=(); else RUNNER=(--plain); fi
for chapter in 05_convex_potential_layer 08_training_cifar10 09_certifying_robustness; do
  tmp=$(mktemp -d)
  cp "book/$chapter.ipynb" "$tmp/"
  step "chapter-$chapter" 150 "$PY" scripts/execute_notebook.py --quick "${RUNNER[@]}" "$tmp/$chapter.ipynb"
  rm -rf "$tmp"
done

step benchmark-S 240 "$PY" benchmarks/train_step.py --size S --device cuda --steps 20 --warmup 3 \
  --variants default --compile --certify-n 10000 --json "$OUT_DIR/train_step_S_cuda.json"

echo "gpu_check: $([ $status = 0 ] && echo 'all steps passed' || echo 'some steps FAILED') (log: $LOG)" | tee -a "$LOG"
exit $status
