"""Five programs written from keras.io guides, run with real Keras and, with
only their import lines rewritten, with fastgrad; they must compute the
same things.

The programs, in ``tests/guides/``, follow:

  sequential_model.py ........... "The Sequential model"
  training_with_built_in_methods.py
                                  "Training & evaluation with the built-in
                                  methods"
  writing_your_own_callbacks.py . "Writing your own callbacks"
  serialization_and_saving.py ... "Save, serialize, and export models"
  structured_data_classification.py
                                  "Structured data classification from
                                  scratch" (binary classification)

with scikit-learn's bundled data sets in place of downloads. Each program
says in its docstring which parts of its guide it leaves out (the
functional API, subclassed models, custom train steps, tf.data, ...: what
fastgrad, a library of dense Sequential models, does not have).

Each program is run twice by the same harness code (``_HARNESS``): with
Keras (JAX backend) in a child process (JAX starts threads, and other tests
of the suite fork), then here with fastgrad. The harness, never the
program, makes both runs start from the same weights: the Keras run
records each model's ``get_weights()`` when the model is first used (built
from that call's input if it was not), and the fastgrad run gives its
models those weights, in the same order, at their first use. Models read
from files keep the weights they were read with. Data are identical, the
programs call ``fit`` with ``shuffle=False``, and Dropout runs at rate 0
in the compared runs (the libraries draw different masks; the
structured-data program also runs with its own rate, unchecked against
Keras). Keras's steps are compiled by JAX with its compilation cache on, so
that models of one architecture compile once. Each program fills a dict
``results``; the test compares the two: the same keys, strings and
integers (history keys, hook sequences, layer names, shapes, epoch counts)
equal, floats (losses, metrics, predictions, learning rates) to float32
rounding.
"""
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from keras_peer import REASON

import fastgrad as fg

H5_REASON = "needs h5py, the keras extra: pip install '.[keras]'"
SKLEARN_REASON = "needs scikit-learn's bundled data sets, the sklearn extra: pip install '.[sklearn]'"
GUIDES = pathlib.Path(__file__).parent / "guides"
PROGRAMS = ["sequential_model", "training_with_built_in_methods", "writing_your_own_callbacks",
            "serialization_and_saving", "structured_data_classification"]
# the programs that write .keras or .weights.h5 files
NEEDS_H5 = {"training_with_built_in_methods", "serialization_and_saving"}

# Run on both sides, ``lib`` the library's top module; the Keras run fills
# ``record`` with each model's initial weights, the fastgrad run consumes it.
_HARNESS = r'''
import contextlib
import os

import numpy as np

_FIRST_USE = ("__call__", "fit", "evaluate", "predict", "train_on_batch", "test_on_batch",
              "predict_on_batch", "get_weights", "set_weights", "load_weights", "save",
              "save_weights")


def plain(value):
    """The results as JSON: arrays and NumPy scalars become lists and floats."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    value = np.asarray(value)
    if value.dtype.kind in "iub":
        return value.tolist()
    return np.asarray(value, np.float64).tolist()


@contextlib.contextmanager
def same_weights(lib, record, keras_side, no_dropout):
    """Patch lib's Sequential so that each model is synchronised at its
    first use: the Keras run appends the model's weights to record, the
    fastgrad run sets the next entry of record (the Keras run's list). A
    model not yet built is built from that call's input first. Models from
    load_model keep the weights read. With no_dropout, every Dropout has
    rate 0."""
    cls = lib.Sequential
    originals = {name: getattr(cls, name) for name in _FIRST_USE}
    own = {name for name in _FIRST_USE if name in vars(cls)}   # the rest are inherited
    busy = []

    def sync(model, args, kwargs):
        if getattr(model, "_guide_synced", False) or busy:
            return
        busy.append(True)   # the calls below must not synchronise again
        try:
            if not model.built:
                x = args[0] if args else kwargs.get("x")
                if not hasattr(x, "shape"):
                    return   # nothing to build from: not synchronised yet
                model.build((None, x.shape[-1]) if keras_side else x.shape[-1])
            if keras_side:
                record.append([np.asarray(w) for w in originals["get_weights"](model)])
            else:
                assert record, "fastgrad used more models than the Keras run"
                weights = record.pop(0)
                if len(weights) != len(originals["get_weights"](model)):
                    # Keras's Normalization has a third weight, a count kept
                    # for old files (shape (), an integer, 0), that fastgrad's
                    # has not
                    weights = [w for w in weights if not (w.ndim == 0 and w.dtype.kind == "i")]
                originals["set_weights"](model, weights)
            model._guide_synced = True
        finally:
            busy.pop()

    def wrap(name):
        method = originals[name]

        def patched(self, *args, **kwargs):
            sync(self, args, kwargs)
            return method(self, *args, **kwargs)
        return patched

    loaders = [(mod, "load_model") for mod in (lib, lib.models, lib.saving)
               if hasattr(mod, "load_model")]
    old_loaders = [getattr(mod, name) for mod, name in loaders]

    def wrap_loader(load):
        def patched(*args, **kwargs):
            busy.append(True)   # the loader's own calls are not first uses
            try:
                model = load(*args, **kwargs)
            finally:
                busy.pop()
            model._guide_synced = True
            return model
        return patched

    dropout_init = lib.layers.Dropout.__init__

    def dropout_at_zero(self, rate, *args, **kwargs):
        dropout_init(self, 0.0, *args, **kwargs)

    try:
        for name in _FIRST_USE:
            setattr(cls, name, wrap(name))
        for (mod, name), load in zip(loaders, old_loaders):
            setattr(mod, name, wrap_loader(load))
        if no_dropout:
            lib.layers.Dropout.__init__ = dropout_at_zero
        yield
    finally:
        for name, method in originals.items():
            if name in own:
                setattr(cls, name, method)
            else:
                delattr(cls, name)
        for (mod, name), load in zip(loaders, old_loaders):
            setattr(mod, name, load)
        lib.layers.Dropout.__init__ = dropout_init


def run(lib, text, name, folder, record, keras_side, no_dropout=True):
    """Run one program's text in folder; returns its results dict.
    Dropout masks come from each library's own generator, so the runs
    compared have every Dropout at rate 0 (no_dropout); the program's own
    rate runs in test_the_guide_with_its_dropout_runs."""
    here = os.getcwd()
    os.chdir(folder)
    try:
        namespace = {"__name__": "__guide__"}
        with same_weights(lib, record, keras_side, no_dropout):
            exec(compile(text, name + ".py", "exec"), namespace)
        return plain(namespace["results"])
    finally:
        os.chdir(here)
'''

_KERAS_SIDE = r'''
import json
import sys
import tempfile

import jax
import keras

exec(HARNESS, globals())
request = json.load(sys.stdin)
# JAX's compilation cache, in a fresh folder: the programs make many models
# of one architecture, whose steps XLA then compiles once instead of once
# per model (what takes most of the Keras run's time)
jax.config.update("jax_compilation_cache_dir", request["cache"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
out = {}
for name, text in request["programs"].items():
    record = []
    keras.utils.set_random_seed(0)   # the same initial weights at every run
    with tempfile.TemporaryDirectory() as folder:
        results = run(keras, text, name, folder, record, True)
    out[name] = {"results": results,
                 "weights": [[[str(w.dtype), w.tolist()] for w in ws] for ws in record]}
with open(request["out"], "w") as f:
    json.dump(out, f)
'''
_NS = {}
exec(_HARNESS, _NS)

# the import lines of Keras code and their fastgrad forms; nothing else of a
# program changes
_IMPORTS = [(re.compile(r"^import keras$"), "import fastgrad as keras"),
            (re.compile(r"^import keras as (\w+)$"), r"import fastgrad as \1"),
            (re.compile(r"^from keras import "), "from fastgrad import "),
            (re.compile(r"^from keras\.([\w.]+) import "), r"from fastgrad.\1 import ")]


def to_fastgrad(text):
    """The program with its Keras imports made fastgrad's."""
    lines = []
    for line in text.splitlines(keepends=True):
        for pattern, replacement in _IMPORTS:
            line = pattern.sub(replacement, line)
        lines.append(line)
    return "".join(lines)


def _source(name):
    return (GUIDES / f"{name}.py").read_text()


@pytest.fixture(scope="module")
def keras_runs(tmp_path_factory):
    """Every program's results and recorded initial weights, from Keras."""
    if importlib.util.find_spec("keras") is None:
        pytest.skip(REASON)
    programs = {name: _source(name) for name in PROGRAMS}
    if importlib.util.find_spec("h5py") is None:
        programs = {k: v for k, v in programs.items() if k not in NEEDS_H5}
    if importlib.util.find_spec("sklearn") is None:
        programs = {k: v for k, v in programs.items() if "sklearn" not in v}
    folder = tmp_path_factory.mktemp("keras")
    out = folder / "runs.json"
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    done = subprocess.run([sys.executable, "-c", f"HARNESS = {_HARNESS!r}\n" + _KERAS_SIDE],
                          input=json.dumps({"programs": programs, "out": str(out),
                                           "cache": str(folder / "cache")}),
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def _ours(name, weights, folder, no_dropout=True):
    record = [[np.asarray(w, dtype) for dtype, w in ws] for ws in weights]
    results = _NS["run"](fg, to_fastgrad(_source(name)), name, str(folder), record, False,
                         no_dropout)
    assert record == [], "fewer models were used than in the Keras run"
    return results


# Floats agree to float32 rounding. Before training, outputs agree to a few
# 1e-7 (sums of float32 products taken in different orders). Adam and
# RMSprop divide each gradient by its own root mean square, which gives a
# rounding-level difference in a small gradient an effect of its full step
# size, so the two runs drift apart by about 1e-7 relative per step: after
# the 50 to 100 steps of a program, losses agree to about 1e-5 and single
# predictions of the trained model to about 3e-5 (measured). Hence 5e-5,
# plus 1e-6 for values near 0; a wrong formula (an epsilon, a bias
# correction, a reduction) shows at 1e-3 or more.
RTOL, ATOL = 5e-5, 1e-6


def _floats(values):
    """Whether values is a (nested) list of floats, at least one."""
    flat = np.asarray(values, dtype=object).ravel() if values else ()
    return (len(flat) > 0 and all(isinstance(v, (float, int)) and not isinstance(v, bool)
                                  for v in flat)
            and any(isinstance(v, float) for v in flat))


def _same(ours, theirs, where="results"):
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), where
        assert sorted(ours) == sorted(theirs), (where, sorted(ours), sorted(theirs))
        for key in theirs:
            _same(ours[key], theirs[key], f"{where}[{key!r}]")
    elif isinstance(theirs, list) and _floats(theirs):
        # an array (predictions, a history): a value's rounding error comes
        # from the weights and inputs it is computed with, so it is relative
        # to the array's scale, not to the value itself (which may be ~0)
        b = np.asarray(theirs, np.float64)
        a = np.asarray(ours, np.float64)
        assert a.shape == b.shape, (where, a.shape, b.shape)
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=max(ATOL, RTOL * np.abs(b).max()),
                                   err_msg=where)
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), (where, ours, theirs)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, float):
        assert isinstance(ours, (float, int)) and not isinstance(ours, bool), (where, ours)
        np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL, err_msg=where)
    else:   # strings, integers, booleans, None: exactly
        assert ours == theirs, (where, ours, theirs)


@pytest.mark.parametrize("name", PROGRAMS)
def test_only_the_import_lines_change(name):
    before = _source(name).splitlines()
    after = to_fastgrad(_source(name)).splitlines()
    assert len(before) == len(after)
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert changed   # every program imports Keras
    for a, b in changed:
        assert a.startswith(("import keras", "from keras")), a
        assert b.startswith(("import fastgrad", "from fastgrad")), b
    assert not re.search(r"^(import|from) fastgrad", _source(name), re.M)
    # no Keras import left behind, indented ones included
    assert not re.search(r"^\s*(import|from)\s+keras\b", to_fastgrad(_source(name)), re.M)


@pytest.mark.parametrize("name", PROGRAMS)
def test_the_guide_gives_the_same_results(keras_runs, name, tmp_path):
    if name not in keras_runs:
        pytest.skip(H5_REASON if name in NEEDS_H5 and importlib.util.find_spec("h5py") is None
                    else SKLEARN_REASON)
    theirs = keras_runs[name]
    _same(_ours(name, theirs["weights"], tmp_path), theirs["results"])


def test_the_guide_with_its_dropout_runs(tmp_path):
    """The classifier of the structured-data guide with its Dropout(0.5):
    masks differ between the libraries, so only the run itself is checked
    (its losses finite and falling, its history keys Keras's)."""
    pytest.importorskip("sklearn", reason=SKLEARN_REASON)
    namespace = {"__name__": "__guide__"}
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(to_fastgrad(_source("structured_data_classification")), "guide", "exec"),
             namespace)
    finally:
        os.chdir(here)
    history = namespace["results"]["history"]
    assert sorted(history) == ["accuracy", "loss", "val_accuracy", "val_loss"]
    assert np.all(np.isfinite(history["loss"])) and history["loss"][-1] < history["loss"][0]
