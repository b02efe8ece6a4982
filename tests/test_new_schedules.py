"""InverseTimeDecay, PolynomialDecay (with cycle) and CosineDecayRestarts:
float64 references written from the formulas, edge values, refused
arguments, configurations, and agreement with real Keras (JAX backend,
float64), alone and driving a training run."""
import math

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import schedules


STEPS = list(range(0, 130)) + [1000, 12345]


def ref_inverse_time(step, lr0, decay_steps, rate, staircase=False):
    p = step / decay_steps
    return lr0 / (1.0 + rate * (math.floor(p) if staircase else p))


def ref_polynomial(step, lr0, decay_steps, end=0.0001, power=1.0, cycle=False):
    if cycle:
        span = decay_steps * max(1, math.ceil(step / decay_steps))
    else:
        span, step = decay_steps, min(step, decay_steps)
    return (lr0 - end) * (1.0 - step / span) ** power + end


def ref_restarts(step, lr0, first, t_mul=2.0, m_mul=1.0, alpha=0.0):
    """Walks the periods one by one: period i spans first * t_mul**i steps."""
    start, length, i = 0.0, float(first), 0
    while step >= start + length:
        start += length
        length *= t_mul
        i += 1
    frac = (step - start) / length
    return lr0 * ((1 - alpha) * 0.5 * m_mul ** i * (1 + math.cos(math.pi * frac)) + alpha)


CASES = [
    (schedules.InverseTimeDecay, (0.1, 10, 0.5), ref_inverse_time),
    (schedules.InverseTimeDecay, (0.1, 7, 2.0, True), ref_inverse_time),
    (schedules.PolynomialDecay, (0.1, 20), ref_polynomial),
    (schedules.PolynomialDecay, (0.1, 20, 0.01, 2.0), ref_polynomial),
    (schedules.PolynomialDecay, (0.1, 15, 0.001, 0.5, True), ref_polynomial),
    (schedules.CosineDecayRestarts, (0.1, 10), ref_restarts),
    (schedules.CosineDecayRestarts, (0.1, 7, 1.0, 0.5, 0.1), ref_restarts),
    (schedules.CosineDecayRestarts, (0.2, 5, 1.5, 0.8, 0.05), ref_restarts),
    (schedules.CosineDecayRestarts, (0.2, 3, 3.0), ref_restarts),
]
IDS = [f"{c.__name__}{args}" for c, args, _ in CASES]


@pytest.mark.parametrize("cls,args,ref", CASES, ids=IDS)
def test_values_match_the_float64_formula(cls, args, ref):
    sched = cls(*args)
    got = np.array([sched(s) for s in STEPS])
    want = np.array([ref(s, *args) for s in STEPS])
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-16)
    assert np.isfinite(got).all() and (got >= 0).all()


def test_restart_boundaries_start_a_new_period_exactly():
    # periods of 10, 20, 40, 80 ... steps: a restart at 10, 30, 70, 150, 310
    sched = schedules.CosineDecayRestarts(1.0, 10, t_mul=2.0, m_mul=0.5)
    for i, b in enumerate([10, 30, 70, 150, 310, 630, 1270]):
        assert sched(b) == pytest.approx(0.5 ** (i + 1), rel=1e-15)
        assert sched(b - 1) < 0.5 ** i * 0.025   # the end of the period before
    # t_mul = 1.5 lands on boundaries only through rounding: periods 2, 3, 4.5
    s2 = schedules.CosineDecayRestarts(1.0, 2, t_mul=1.5)
    assert s2(5) == pytest.approx(1.0, rel=1e-15) and s2(4.999) < 1e-5


def test_polynomial_cycle_restarts_from_a_lower_peak():
    s = schedules.PolynomialDecay(1.0, 10, end_learning_rate=0.0, cycle=True)
    assert s(0) == 1.0 and s(10) == 0.0 and s(11) == pytest.approx(1 - 11 / 20)
    flat = schedules.PolynomialDecay(1.0, 10, end_learning_rate=0.25)
    assert flat(10) == flat(1e9) == 0.25


@pytest.mark.parametrize("make,arg", [
    (lambda: schedules.InverseTimeDecay(0.1, 0, 0.5), "decay_steps"),
    (lambda: schedules.InverseTimeDecay(0.1, 10, -0.5), "decay_rate"),
    (lambda: schedules.InverseTimeDecay(-0.1, 10, 0.5), "initial_learning_rate"),
    (lambda: schedules.PolynomialDecay(0.1, -5), "decay_steps"),
    (lambda: schedules.PolynomialDecay(0.1, 5, power=-1.0), "power"),
    (lambda: schedules.PolynomialDecay(0.1, 5, end_learning_rate=math.nan), "end_learning_rate"),
    (lambda: schedules.CosineDecayRestarts(0.1, 0), "first_decay_steps"),
    (lambda: schedules.CosineDecayRestarts(0.1, 5, t_mul=0.0), "t_mul"),
    (lambda: schedules.CosineDecayRestarts(0.1, 5, m_mul=-1.0), "m_mul"),
    (lambda: schedules.CosineDecayRestarts(0.1, 5, alpha=math.inf), "alpha"),
])
def test_bad_arguments_raise_naming_them(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


@pytest.mark.parametrize("cls,args,ref", CASES, ids=IDS)
def test_serialize_round_trip_and_optimizer_config(cls, args, ref):
    sched = cls(*args)
    again = schedules.deserialize(schedules.serialize(sched))
    assert type(again) is cls and again.get_config() == sched.get_config()
    opt = fg.optimizers.Nadam(learning_rate=sched)
    opt2 = fg.optimizers.deserialize(fg.optimizers.serialize(opt))
    sched2 = schedules.deserialize(opt2.get_config()["learning_rate"])
    assert [sched2(s) for s in STEPS] == [sched(s) for s in STEPS]


@pytest.mark.parametrize("cls,args,ref", CASES, ids=IDS)
def test_values_and_configs_agree_with_keras(keras64, cls, args, ref):
    kcls = getattr(keras64.optimizers.schedules, cls.__name__)
    ks, ours = kcls(*args), cls(*args)
    assert ours.get_config() == ks.get_config()
    mine = schedules.deserialize(keras64.optimizers.schedules.serialize(ks))
    assert mine.get_config() == ks.get_config()
    # Keras finds the restart with a floored logarithm, which can round to the
    # period before at an exact restart (its value is then the end of that
    # period): compare away from restarts there
    steps = [s for s in STEPS[::3]   # Keras evaluates each step eagerly: slow
             if cls is not schedules.CosineDecayRestarts or ref(s - 1e-9, *args) > ref(s, *args)
             or s == 0]
    np.testing.assert_allclose([ours(s) for s in steps], [float(ks(s)) for s in steps],
                               **keras_tol(cls))


def keras_tol(cls):
    """Keras's CosineDecayRestarts works in float32 part of the way even when
    floatx is float64 (its values are float32-rounded); the others are exact."""
    if cls is schedules.CosineDecayRestarts:
        return dict(rtol=2e-6, atol=1e-7)
    return dict(rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("cls,args,ref", CASES[::2], ids=IDS[::2])
def test_training_with_the_schedule_agrees_with_keras(keras64, keras_mse, cls, args, ref):
    keras = keras64
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((64, 4)), rng.standard_normal((64, 2))
    model = fg.Sequential([fg.layers.Dense(5, activation="sigmoid", input_dim=4),
                           fg.layers.Dense(2)], dtype="float64", seed=1)
    model.compile(fg.optimizers.SGD(cls(*args), momentum=0.5), "mse")
    model.build(4)
    km = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="sigmoid"),
                           keras.layers.Dense(2)])
    km.set_weights(model.get_weights())
    kcls = getattr(keras.optimizers.schedules, cls.__name__)
    km.compile(keras.optimizers.SGD(kcls(*args), momentum=0.5), keras_mse)
    for i in range(12):
        rows = slice(i * 16 % 64, i * 16 % 64 + 16)
        model.train_on_batch(x[rows], y[rows])
        km.train_on_batch(x[rows], y[rows])
    for a, b in zip(model.get_weights(), km.get_weights()):
        tol = keras_tol(cls)
        np.testing.assert_allclose(a, b, rtol=tol["rtol"], atol=10 * tol["atol"])
