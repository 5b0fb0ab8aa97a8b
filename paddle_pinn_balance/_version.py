"""The one version string of the package: ``setup.py`` reads it (as text) and ``paddle_pinn_balance.__version__``
imports it."""

__version__ = "0.1.0"
