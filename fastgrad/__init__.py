"""fastgrad: a C-accelerated minimal neural-network engine for dense networks."""

__version__ = "0.1.0"   # the one place the version is written

try:
    from fastgrad import _core  # noqa: F401  (the compiled kernels)
except ImportError as e:
    import importlib.machinery
    import os
    import sys

    def _has_core(folder):
        return any(os.path.exists(os.path.join(folder, "_core" + suffix))
                   for suffix in importlib.machinery.EXTENSION_SUFFIXES)

    _here = os.path.dirname(os.path.abspath(__file__))
    # an installed copy is named, never used: its extension may be older
    # than this folder's Python code
    _other = [d for d in (os.path.abspath(os.path.join(p or os.getcwd(), "fastgrad"))
                          for p in sys.path) if d != _here and _has_core(d)]
    raise ImportError(
        (f"fastgrad's compiled extension fastgrad._core in {_here} failed to load ({e}); "
         if _has_core(_here) else
         f"fastgrad's compiled extension fastgrad._core is not built in {_here}; ")
        + "in a source checkout build it in place with `python setup.py build_ext --inplace`, "
        "or install the package with `pip install .` and use it from outside the checkout"
        + (f" (an installed fastgrad is at {_other[0]}: run from another folder to use it)"
           if _other else "")) from e

from fastgrad import (activations, callbacks, constraints, export, initializers, layers,  # noqa: E402
                      losses, metrics, models, ops, optimizers, regularizers, saving, schedules)
from fastgrad.diagnostics import GradientReport, diagnose  # noqa: E402
from fastgrad.models import Sequential  # noqa: E402
from fastgrad.saving import load_model  # noqa: E402
from fastgrad._threads import get_num_threads, set_num_threads, threads  # noqa: E402

__all__ = ["Sequential", "load_model", "diagnose", "GradientReport", "activations", "callbacks",
           "constraints", "export", "initializers", "layers", "losses", "metrics", "models", "ops",
           "optimizers", "regularizers", "saving", "schedules", "get_num_threads",
           "set_num_threads", "threads", "__version__"]
