import os
import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]


def _shared_data():
    env = os.environ.get("CPL_MINI_DATA")
    for cand in ([pathlib.Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (cand / "cifar-10-python.tar.gz").exists() or (cand / "cifar-10-batches-py").exists():
            return cand
    return None


@pytest.fixture(scope="session")
def cifar_root():
    """Folder holding the offline CIFAR-10 archive (CI: ../shared/data)."""
    root = _shared_data()
    if root is None:
        pytest.skip("offline CIFAR-10 archive not found (set CPL_MINI_DATA)")
    return root


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


#: Devices the property tests run on: the CPU always, CUDA when present (as torchdiffeq's tests do).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: Floating dtypes the property tests run in.
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(params=DEVICES)
def device(request):
    """Each available device in turn (``cpu``, then ``cuda`` on a machine with a GPU)."""
    return torch.device(request.param)


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request):
    """float32 and float64 in turn."""
    return request.param


@pytest.fixture
def tol(dtype):
    """Relative tolerance of a computation in ``dtype`` on inputs of size ~1 (rounding of a few dozen ops)."""
    return {torch.float32: 2e-5, torch.float64: 1e-9}[dtype]


@pytest.fixture
def ieee():
    """Run the test with TF32 off (cuDNN convolutions use TF32 by default on Ampere and later GPUs): the
    property tests check IEEE arithmetic, the arithmetic certification runs in."""
    from cpl_mini.precision import ieee_precision

    with ieee_precision():
        yield
