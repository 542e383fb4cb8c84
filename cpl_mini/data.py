"""Transitional re-export: these names moved to ``cpl_mini.cifar``, ``cpl_mini.loader``, ``cpl_mini.toy``."""

from . import cifar, loader, toy
from .cifar import *  # noqa: F401,F403
from .loader import *  # noqa: F401,F403
from .toy import *  # noqa: F401,F403

__all__ = [*cifar.__all__, *loader.__all__, *toy.__all__]
