"""Pickling of models through fastgrad's own format.

``pickle.dumps(model)``, ``copy.deepcopy(model)`` and joblib store a
reference to ``restore`` and the bytes ``model.save`` would write
(fastgrad.saving): architecture, weights, optimizer state and random-generator
state. Unpickling reads those bytes through the same checks as
``load_model``, so a pickled model holds no pickled internals, and the copy
continues training bit-identically with the original. Models that are not
built yet (no weights) are stored with their layers and compile settings.
``copy.copy`` goes the same way, so it too gives an independent model.
"""
from fastgrad import saving


def reduce(model):
    """``Sequential.__reduce__``: (restore, (bytes,))."""
    return restore, (saving.to_bytes(*saving.describe(model)),)


def restore(data):
    """The model of bytes written by ``reduce``, checked as a model file."""
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"data: expected the bytes of a model file, got "
                        f"{type(data).__name__}")
    return saving.from_description(*saving.from_bytes(bytes(data), "<pickled model>"),
                                   "<pickled model>", unbuilt=True)
