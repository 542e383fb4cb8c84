"""cpl_mini: 1-Lipschitz networks from a dynamical-system perspective.

Companion package of the book *1-Lipschitz Networks as Dynamical Systems*. Submodules:

- :mod:`cpl_mini.spectral`  power iteration, exact and guaranteed upper-bound spectral norms
- :mod:`cpl_mini.layers`    the Convex Potential Layer (dense and convolutional) and the network pieces
- :mod:`cpl_mini.flows`     vector fields, their flows (torchdiffeq) and explicit Euler steps
- :mod:`cpl_mini.lipschitz` empirical *lower* bounds of a network's Lipschitz constant
- :mod:`cpl_mini.data`      CIFAR-10/100 read safely from the official archives, device-side loading
- :mod:`cpl_mini.models`, :mod:`cpl_mini.train`, :mod:`cpl_mini.certify`, :mod:`cpl_mini.attacks`

Submodules load lazily, so ``import cpl_mini`` is fast.
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "spectral", "layers", "flows", "lipschitz", "data", "models", "train", "certify", "attacks",
    "utils", "orthogonal", "normalized", "sll", "plotting",
)
_UTILS = ("device", "seed_everything", "quick_mode", "setup", "REPO_URL", "colab_url")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _UTILS:
        return getattr(importlib.import_module(".utils", __name__), name)
    raise AttributeError(f"module 'cpl_mini' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES) + list(_UTILS))
