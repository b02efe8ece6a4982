"""fastgrad: a C-accelerated minimal neural-network engine for dense networks."""
from fastgrad import (activations, callbacks, constraints, initializers, layers, losses,
                      metrics, ops, optimizers, regularizers, saving, schedules)
from fastgrad.models import Sequential, load_model
from fastgrad.diagnostics import GradientReport, diagnose
from fastgrad import models

__version__ = "0.1.0"

__all__ = ["Sequential", "load_model", "diagnose", "GradientReport", "activations", "callbacks", "constraints", "initializers",
           "layers", "losses", "metrics", "models", "ops", "optimizers", "regularizers",
           "schedules", "__version__"]
