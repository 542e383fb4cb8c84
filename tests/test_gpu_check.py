"""scripts/gpu_check.sh: valid bash; on a machine without CUDA it says so and runs nothing else."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check really runs")
def test_refuses_without_cuda(tmp_path):
    env = {**os.environ, "RESULTS_DIR": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    log = (tmp_path / "gpu_check.log").read_text()
    assert "no usable CUDA GPU here" in log
    assert "unit-tests" not in log  # nothing else ran
