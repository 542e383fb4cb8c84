"""Small helpers shared by the package and the book's chapters: device, seeding, quick mode, set-up."""

import os
import random

#: The book's repository: every Colab link and install line derives from it.
REPO_URL = "https://github.com/cpl-mini/lipschitz-flows-book"
#: The branch the book is published from.
REPO_BRANCH = "main"


def device(prefer=None):
    """Return the best available ``torch.device``: CUDA, then Apple MPS, then CPU.

    ``prefer`` (e.g. ``"cpu"``) forces a device; the environment variable ``CPL_MINI_DEVICE`` does too.
    """
    import torch

    prefer = prefer or os.environ.get("CPL_MINI_DEVICE")
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed=0):
    """Seed Python's, NumPy's and PyTorch's generators (all devices). Returns ``seed``."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return seed


def quick_mode():
    """True when the environment variable ``CPL_MINI_QUICK`` is set to 1/true/yes.

    Chapters read this one switch: quick mode (CI) only shrinks work (data subsets, epochs, grid
    sizes); the code path is the same.
    """
    return os.environ.get("CPL_MINI_QUICK", "").strip().lower() in ("1", "true", "yes", "on")


def colab_url(notebook_path, repo_url=REPO_URL, branch=REPO_BRANCH):
    """The Colab address that opens ``notebook_path`` (relative to the repository root)."""
    slug = repo_url.rstrip("/").split("github.com/")[-1]
    return f"https://colab.research.google.com/github/{slug}/blob/{branch}/{notebook_path}"


def setup(seed=0, threads=None, verbose=True):
    """The set-up every chapter runs first: seeds, picks the device, styles plots, and reports.

    In Colab, it warns when no GPU runtime is attached (Runtime > Change runtime type > GPU).
    Returns the ``torch.device`` to use.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    dev = device()
    try:
        import matplotlib.pyplot as plt

        plt.rcParams.update(
            {"figure.figsize": (6.0, 4.0), "figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3}
        )
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        pass
    if verbose:
        in_colab = "COLAB_RELEASE_TAG" in os.environ or "COLAB_GPU" in os.environ
        mode = "quick mode (CI: smaller data and fewer epochs)" if quick_mode() else "full mode"
        print(
            f"cpl_mini ready | torch {torch.__version__.split('+')[0]} | device: {dev.type} | {mode} "
            f"| seed {seed}"
        )
        if in_colab and dev.type != "cuda":
            print(
                "No GPU attached: in Colab choose Runtime > Change runtime type > GPU "
                "for the training chapters."
            )
    return dev


def glue(name, value, display=False):
    """Store ``value`` under ``name`` for the book's text and return it.

    In the book, ``{glue:text}`name``` in a chapter's markdown shows the value stored by the executed
    cell (myst-nb's glue), so the prose quotes the run instead of a typed number. Where myst-nb is not
    installed (Colab runs only need ``cpl_mini``), nothing is stored and ``value`` is returned.
    """
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # NumPy and torch scalars are glued as plain Python numbers
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return value
    myst_glue(name, value, display=display)
    return value
