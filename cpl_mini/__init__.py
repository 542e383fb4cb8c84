"""cpl_mini: 1-Lipschitz networks from a dynamical-system perspective."""
__version__ = "0.1.0"
