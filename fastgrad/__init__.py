"""fastgrad: a C-accelerated minimal neural-network engine for dense networks."""


def _use_installed_core():
    """``python -m fastgrad`` in a source checkout imports this folder, which
    holds no compiled extension unless it was built in place. Then the
    extension of the installed copy (``pip install .``) serves instead."""
    import importlib.machinery
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    if any(os.path.exists(os.path.join(here, "_core" + s)) for s in suffixes):
        return
    for entry in sys.path:
        d = os.path.abspath(os.path.join(entry or os.getcwd(), "fastgrad"))
        if d != here and any(os.path.exists(os.path.join(d, "_core" + s)) for s in suffixes):
            __path__.append(d)
            return


_use_installed_core()
from fastgrad import (activations, callbacks, constraints, export, initializers, layers,
                      losses, metrics, ops, optimizers, regularizers, saving, schedules)
from fastgrad.models import Sequential, load_model
from fastgrad.diagnostics import GradientReport, diagnose
from fastgrad import models

__version__ = "0.1.0"

__all__ = ["Sequential", "load_model", "diagnose", "GradientReport", "activations", "callbacks", "constraints", "initializers",
           "export", "layers", "losses", "metrics", "models", "ops", "optimizers", "regularizers",
           "schedules", "__version__"]
