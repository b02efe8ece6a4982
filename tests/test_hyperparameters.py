"""Every hyperparameter of every class is checked when it is set, in the
constructor and by assignment later, and a learning-rate schedule's value is
checked at every step. A refused value raises ValueError whose message
starts with the argument's name, and leaves the object as it was.

Every registry (activations, losses, optimizers, metrics, initializers,
regularizers, constraints, schedules, layers) has Keras 3's get /
serialize / deserialize with one error policy, and reads Keras' own
configurations (checked against keras when it is installed).
"""
import functools
import importlib.util
import json
import math
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import (activations, callbacks, constraints, initializers, layers, losses,
                      metrics, optimizers, regularizers, schedules)

NAN, INF = math.nan, math.inf
NONFINITE = (NAN, INF, -INF)


def _cases():
    """(constructor with its required arguments as keywords, argument, bad
    values)."""
    p = functools.partial
    decay = (*NONFINITE, -0.1, 1.0, "0.9")          # [0, 1)
    positive = (*NONFINITE, 0.0, -1.0, "1", 10**400)  # (0, inf); an int beyond float
    non_negative = (*NONFINITE, -1e-3, None)         # [0, inf)
    seed = (-1, 1.5, True, "0")
    exponential = p(schedules.ExponentialDecay, initial_learning_rate=0.1, decay_steps=10,
                    decay_rate=0.5)
    piecewise = p(schedules.PiecewiseConstantDecay, boundaries=[5], values=[0.1, 0.01])
    cosine = p(schedules.CosineDecay, initial_learning_rate=0.1, decay_steps=10)
    table = [
        # optimizers
        (optimizers.SGD, "momentum", decay),
        (optimizers.SGD, "weight_decay", (*NONFINITE, -1e-3)),
        (optimizers.SGD, "clipnorm", positive),
        (optimizers.SGD, "clipvalue", positive),
        (optimizers.SGD, "global_clipnorm", positive),
        (optimizers.SGD, "nonfinite", ("ignore", None)),
        (optimizers.RMSprop, "rho", decay),
        (optimizers.RMSprop, "momentum", decay),
        (optimizers.RMSprop, "epsilon", positive),
        (optimizers.Adam, "beta_1", decay),
        (optimizers.Adam, "beta_2", decay),
        (optimizers.Adam, "epsilon", positive),
        (optimizers.AdamW, "weight_decay", (*NONFINITE, -1e-3)),
        (optimizers.Adagrad, "initial_accumulator_value", non_negative),
        (optimizers.Adagrad, "epsilon", positive),
        # schedules
        (exponential, "initial_learning_rate", non_negative),
        (exponential, "decay_steps", positive),
        (exponential, "decay_rate", positive),
        (piecewise, "values",
         ([NAN, 0.01], [0.1, -0.01], [INF, 0.1], [0.1, "0.01"])),
        (piecewise, "boundaries",
         ([NAN], [INF], ["5"])),
        (cosine, "initial_learning_rate", non_negative),
        (cosine, "decay_steps", positive),
        (cosine, "alpha", non_negative),
        (cosine, "warmup_target", (*NONFINITE, -0.1)),
        (p(schedules.CosineDecay, initial_learning_rate=0.1, decay_steps=10,
           warmup_target=0.2), "warmup_steps",
         non_negative),
        # initializers
        (initializers.VarianceScaling, "scale", positive),
        (initializers.VarianceScaling, "mode", ("fan_sum", None)),
        (initializers.VarianceScaling, "distribution", ("normal", None)),
        (initializers.VarianceScaling, "seed", seed),
        (initializers.HeNormal, "seed", seed),
        (initializers.Orthogonal, "gain", NONFINITE),
        (initializers.Orthogonal, "seed", seed),
        (initializers.RandomNormal, "mean", NONFINITE),
        (initializers.RandomNormal, "stddev", non_negative),
        (initializers.RandomNormal, "seed", seed),
        (initializers.RandomUniform, "minval", NONFINITE),
        (initializers.RandomUniform, "maxval", NONFINITE),
        (initializers.RandomUniform, "seed", seed),
        (initializers.Constant, "value", NONFINITE),
        # regularizers, constraints, losses, metrics
        (regularizers.L1, "l1", non_negative),
        (regularizers.L2, "l2", non_negative),
        (regularizers.L1L2, "l1", non_negative),
        (regularizers.L1L2, "l2", non_negative),
        (constraints.MaxNorm, "max_value", positive),
        (constraints.MaxNorm, "axis", (2, -2, True, 0.0)),
        (constraints.ClipValue, "clip_value", positive),
        (losses.Huber, "delta", positive),
        (metrics.BinaryAccuracy, "threshold", (*NONFINITE, 0.0, 1.0)),
        # layers
        (p(layers.Dense, units=3), "units", (0, -3, True, 2.5)),
        (p(layers.Dense, units=3), "input_dim", (0, -1, True, 2.5)),
        (layers.BatchNormalization, "momentum", (*NONFINITE, -0.1, 1.5)),
        (layers.BatchNormalization, "epsilon", positive),
        (p(layers.Dropout, rate=0.5), "seed", seed),
        (p(layers.Dropout, rate=0.5), "rate", decay),
        # callbacks
        (callbacks.EarlyStopping, "min_delta", (*NONFINITE, "0.1")),
        (callbacks.EarlyStopping, "patience", (-1, 1.5, True)),
        (callbacks.EarlyStopping, "baseline", NONFINITE),
        (callbacks.EarlyStopping, "start_from_epoch", (-1, 0.5)),
        (callbacks.GradientMonitor, "every", (0, -1, 1.5, True)),
    ]
    out = []
    for make, arg, bads in table:
        name = getattr(make, "func", make).__name__
        out += [pytest.param(make, arg, bad, id=f"{name}-{arg}={bad!r:.24}") for bad in bads]
    return out


@pytest.mark.parametrize("make,arg,bad", _cases())
def test_every_hyperparameter_is_checked_when_set(make, arg, bad):
    message = rf"^{re.escape(arg)}\b"
    with pytest.raises(ValueError, match=message):
        make(**{arg: bad})
    obj = make()
    before = getattr(obj, arg)
    with pytest.raises(ValueError, match=message):
        setattr(obj, arg, bad)
    assert getattr(obj, arg) == before


class _Spoiled(schedules.LearningRateSchedule):
    """0.01 for the first ``at`` steps, then ``bad``."""

    def __init__(self, at, bad):
        self.at, self.bad, self.name = at, bad, "spoiled"

    def __call__(self, step):
        return 0.01 if step < self.at else self.bad


def _model(schedule):
    model = fg.Sequential([layers.Dense(4, activation="relu", input_dim=3),
                           layers.BatchNormalization(), layers.Dropout(0.25),
                           layers.Dense(2)], seed=0)
    model.compile(optimizers.Adam(schedule, amsgrad=True), "mse")
    return model


def _state(model):
    opt = model.optimizer
    return ([w.copy() for w in model.get_weights()],
            {k: v.copy() for k, v in opt.variables().items()},
            opt.iterations, opt.skipped_steps)


def _assert_same_state(model, before):
    weights, moments, iterations, skipped = before
    now = _state(model)
    for a, b in zip(weights, now[0]):
        np.testing.assert_array_equal(a, b)
    assert moments.keys() == now[1].keys()
    for k in moments:
        np.testing.assert_array_equal(moments[k], now[1][k])
    assert (iterations, skipped) == now[2:]


@pytest.mark.parametrize("bad", [NAN, INF, -0.01, -INF, "fast"])
@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_a_schedule_gone_bad_mid_training_refuses_the_step(bad, nonfinite):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((8, 3)), rng.standard_normal((8, 2))
    model = _model(_Spoiled(3, bad))
    model.optimizer.nonfinite = nonfinite
    for _ in range(3):
        model.train_on_batch(x, y)
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no misleading "overflowed" warning either
        for _ in range(2):   # refused each time, not counted as a skipped step
            with pytest.raises(ValueError, match=r"^learning_rate: the schedule _Spoiled "
                                                 r"'spoiled' gave .* at step 3\b"):
                model.train_on_batch(x, y)
            _assert_same_state(model, before)
        with pytest.raises(ValueError, match="at step 3"):
            model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    _assert_same_state(model, before)


def test_a_schedule_overflowing_refuses_the_step():
    # 10.0 ** (step / 0.0025) is 1 at step 0, and at step 1 Python's float
    # power raises OverflowError: an infinite rate, refused
    model = _model(schedules.ExponentialDecay(1e-3, 0.0025, 10.0))
    x, y = np.ones((4, 3)), np.ones((4, 2))
    model.train_on_batch(x, y)
    before = _state(model)
    with pytest.raises(ValueError, match=r"ExponentialDecay .* gave inf at step 1\b"):
        model.train_on_batch(x, y)
    _assert_same_state(model, before)


# ---------------------------------------------------------------------------
# registries
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("module,arg,name,class_name,config", [
    (losses, "loss", "huber", "Huber", {}),
    (optimizers, "optimizer", "adam", "Adam", {}),
    (metrics, "metrics", "mae", "MeanAbsoluteError", {}),
    (initializers, "initializer", "he_normal", "HeNormal", {}),
    (regularizers, "regularizer", "l1_l2", "L1L2", {}),
    (constraints, "constraint", "non_neg", "NonNeg", {}),
    (schedules, "schedule", "CosineDecay", "CosineDecay", {"initial_learning_rate": 0.1,
                                                            "decay_steps": 10}),
    (layers, "layer", "dense", "Dense", {"units": 2}),
], ids=lambda v: getattr(v, "__name__", None))
def test_registries_share_one_error_policy(module, arg, name, class_name, config):
    known = rf"expected one of (.*, )?{name}\b"
    with pytest.raises(ValueError, match=rf"^{arg}: unknown name 'no_such'; {known}"):
        module.get("no_such")
    with pytest.raises(ValueError, match=rf"^{arg}: unknown name 'no_such'; {known}"):
        module.deserialize("no_such")
    with pytest.raises(ValueError, match=rf"^{arg}: unknown class_name 'NoSuch'; expected "
                                         rf"one of (.*, )?{class_name}\b"):
        module.deserialize({"class_name": "NoSuch", "config": {}})
    for bad in (2.5, [name], object()):
        with pytest.raises(TypeError, match=rf"^{arg}: expected"):
            module.get(bad)
        with pytest.raises(TypeError, match=rf"^{arg}: expected"):
            module.deserialize(bad)
        with pytest.raises(TypeError, match=rf"^{arg}: expected"):
            module.serialize(bad)
    with pytest.raises(TypeError, match=rf"^{arg}: expected 'config' to be a dict"):
        module.deserialize({"class_name": class_name, "config": [1.0]})
    # the class name, or the lower-case name (Keras 3 reads "adam" so)
    for key in (class_name, name):
        obj = module.deserialize({"class_name": key, "config": config})
        assert type(obj).__name__ == class_name


def test_activations_serialize_to_names_and_share_the_error_policy():
    for name in ("relu", "GELU", "swish", "softmax", None):
        fn = activations.get(name)
        assert activations.deserialize(activations.serialize(fn)) is fn
    assert activations.serialize(activations.swish) == "silu"   # Keras' name for it
    assert activations.get(None) is activations.linear
    with pytest.raises(ValueError, match=r"^activation: unknown name 'no_such'; expected "
                                         r"one of .*\brelu\b"):
        activations.deserialize("no_such")
    for bad in (2.5, {"class_name": "relu"}):
        with pytest.raises(TypeError, match="^activation: expected"):
            activations.deserialize(bad)
        with pytest.raises(TypeError, match="^activation: expected"):
            activations.serialize(bad)


def _behaviour(obj):
    """What the object computes, on fixed inputs."""
    w = np.linspace(-2.0, 2.0, 12).reshape(3, 4)
    if isinstance(obj, schedules.LearningRateSchedule):
        return [obj(step) for step in range(20)]
    if isinstance(obj, initializers.Initializer):
        return obj((3, 4))
    if isinstance(obj, (regularizers.Regularizer, constraints.Constraint)):
        return obj(w)
    if isinstance(obj, (losses.Loss, metrics.Metric)):
        return obj((w > 0.3).astype(np.float32), (0.2 * w + 0.5).astype(np.float32))
    return None


@pytest.mark.parametrize("make", [
    lambda: optimizers.SGD(0.05, momentum=0.9, nesterov=True, clipnorm=1.0),
    lambda: optimizers.Adam(schedules.CosineDecay(0.1, 10, warmup_target=0.2, warmup_steps=3),
                            amsgrad=True, weight_decay=0.01, nonfinite="raise"),
    lambda: optimizers.RMSprop(rho=0.8, momentum=0.5, centered=True, global_clipnorm=2.0),
    lambda: optimizers.AdamW(weight_decay=0.1, clipvalue=0.5),
    lambda: optimizers.Adagrad(initial_accumulator_value=0.2, epsilon=1e-6),
    lambda: losses.Huber(0.5),
    lambda: losses.BinaryCrossentropy(from_logits=True),
    lambda: losses.MeanSquaredError(),
    lambda: metrics.BinaryAccuracy(threshold=0.7),
    lambda: metrics.MeanAbsoluteError(),
    lambda: initializers.RandomNormal(0.1, 0.2, seed=3),
    lambda: initializers.RandomUniform(-0.1, 0.3, seed=3),
    lambda: initializers.Orthogonal(0.5, seed=1),
    lambda: initializers.HeNormal(seed=5),
    lambda: initializers.VarianceScaling(2.0, "fan_out", "uniform", seed=4),
    lambda: initializers.Constant(0.3),
    lambda: regularizers.L1L2(0.1, 0.2),
    lambda: regularizers.l2(0.3),
    lambda: constraints.MaxNorm(1.5),
    lambda: constraints.non_neg(),
    lambda: constraints.ClipValue(0.1),
    lambda: schedules.ExponentialDecay(0.1, 10, 0.5, True),
    lambda: schedules.PiecewiseConstantDecay([5, 9], [0.1, 0.01, 0.001], name="steps"),
    lambda: layers.Dense(4, activation="gelu", kernel_regularizer="l2",
                         kernel_constraint="max_norm", input_dim=3, name="d"),
    lambda: layers.BatchNormalization(momentum=0.9, epsilon=1e-2, center=False),
    lambda: layers.Dropout(0.3, seed=7),
    lambda: layers.Activation("tanh"),
], ids=lambda make: make.__code__.co_names[1])   # the class's name, from the lambda
def test_serialize_and_deserialize_round_trip_through_json(make):
    obj = make()
    module = sys.modules[type(obj).__module__]
    config = module.serialize(obj)
    assert config == {"class_name": type(obj).__name__, "config": obj.get_config()}
    for back in (module.deserialize(json.loads(json.dumps(config))), module.get(config)):
        assert type(back) is type(obj)
        assert back.get_config() == obj.get_config()
        np.testing.assert_array_equal(_behaviour(back), _behaviour(obj))
    assert module.serialize(None) is None


KERAS_NAMES = {
    "optimizers": ["sgd", "rmsprop", "adam", "adamw", "adagrad"],
    "initializers": ["glorot_uniform", "glorot_normal", "he_uniform", "he_normal",
                     "lecun_uniform", "lecun_normal", "orthogonal", "random_normal",
                     "random_uniform", "zeros", "ones", "variance_scaling"],
    "regularizers": ["l1", "l2", "l1l2"],
    "constraints": ["max_norm", "non_neg"],
}
KERAS_OBJECTS = [   # (where in keras, class, arguments), the same in fastgrad
    ("optimizers.schedules", "ExponentialDecay", (0.1, 10, 0.5, True)),
    ("optimizers.schedules", "PiecewiseConstantDecay", ([5, 9], [0.1, 0.01, 0.001])),
    ("optimizers.schedules", "CosineDecay", (0.1, 10, 0.1, "cos", 0.2, 3)),
    ("regularizers", "L1", (0.1,)), ("regularizers", "L2", (0.2,)),
    ("regularizers", "L1L2", (0.1, 0.2)),
    ("constraints", "MaxNorm", (1.5,)), ("constraints", "NonNeg", ()),
    ("initializers", "RandomNormal", (0.1, 0.2, 3)),
    ("initializers", "RandomUniform", (-0.1, 0.2, 3)),
    ("initializers", "Orthogonal", (0.5, 1)), ("initializers", "Constant", (0.3,)),
    ("initializers", "Zeros", ()),
]
# Keras runs in a child process: JAX starts threads, and a process that has
# them must not fork (which other tests of the suite do).
_KERAS_SIDE = """
import functools, json, os, sys
os.environ.setdefault("KERAS_BACKEND", "jax")
import keras
request = json.load(sys.stdin)
names = {m: {n: type(getattr(keras, m).get(n)).__name__ for n in ns}
         for m, ns in request["names"].items()}
objects = []
for (where, cls, args), ours in zip(request["objects"], request["ours"]):
    kmod = functools.reduce(getattr, where.split("."), keras)
    obj = getattr(kmod, cls)(*args)
    objects.append({
        "serialized": kmod.serialize(obj),
        "config": obj.get_config(),
        "ours_read_back": kmod.deserialize(ours).get_config(),
        "values": [float(obj(s)) for s in range(15)] if where.endswith("schedules") else None,
    })
json.dump({"names": names, "objects": objects}, sys.stdout)
"""


def _module(where):
    return getattr(fg, where.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def keras_side():
    if importlib.util.find_spec("keras") is None:
        pytest.skip("needs Keras 3 with JAX, the cross-check peers: pip install '.[peers]'")
    ours = [_module(w).serialize(getattr(_module(w), cls)(*args))
            for w, cls, args in KERAS_OBJECTS]
    done = subprocess.run([sys.executable, "-c", _KERAS_SIDE], capture_output=True, text=True,
                          input=json.dumps({"names": KERAS_NAMES, "objects": KERAS_OBJECTS,
                                            "ours": ours}), timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("module", list(KERAS_NAMES))
def test_names_resolve_to_the_classes_keras_gives(keras_side, module):
    theirs = keras_side["names"][module]
    for name in KERAS_NAMES[module]:
        for key in (name, name.upper()):
            assert type(getattr(fg, module).get(key)).__name__ == theirs[name], key
    assert (regularizers.l1, regularizers.l2, regularizers.l1_l2) == (
        regularizers.L1, regularizers.L2, regularizers.L1L2)
    assert (constraints.max_norm, constraints.non_neg) == (constraints.MaxNorm,
                                                           constraints.NonNeg)


@pytest.mark.parametrize("i", range(len(KERAS_OBJECTS)),
                         ids=[cls for _, cls, _ in KERAS_OBJECTS])
def test_keras_configurations_load_and_go_back(keras_side, i):
    where, cls, _ = KERAS_OBJECTS[i]
    theirs = keras_side["objects"][i]
    # Keras' own serialize dict, with its "module" and "registered_name" keys
    obj = _module(where).deserialize(theirs["serialized"])
    assert type(obj).__name__ == cls and obj.get_config() == theirs["config"]
    # and Keras reads fastgrad's back into the same object
    assert theirs["ours_read_back"] == theirs["config"]
    if theirs["values"] is not None:
        np.testing.assert_allclose([obj(s) for s in range(15)], theirs["values"], rtol=1e-6)
