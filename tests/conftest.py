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
