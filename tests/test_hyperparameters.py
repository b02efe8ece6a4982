"""Every hyperparameter of every class is checked when it is set, in the
constructor and by assignment later, and a learning-rate schedule's value is
checked at every step.

A refused value raises ValueError whose message starts with the argument's
name, and leaves the object as it was.
"""
import functools
import math
import re
import warnings

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import (callbacks, constraints, initializers, layers, losses, metrics,
                      optimizers, regularizers, schedules)

NAN, INF = math.nan, math.inf
NONFINITE = (NAN, INF, -INF)


def _cases():
    """(constructor with its required arguments as keywords, argument, bad
    values)."""
    p = functools.partial
    decay = (*NONFINITE, -0.1, 1.0, "0.9")          # [0, 1)
    positive = (*NONFINITE, 0.0, -1.0, "1")          # (0, inf)
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
        out += [pytest.param(make, arg, bad, id=f"{name}-{arg}={bad!r}") for bad in bads]
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
