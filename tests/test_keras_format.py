"""Keras 3 files both ways (fastgrad.keras_format), checked against Keras.

Round trips use the real Keras 3 (JAX backend) as the reference: a model
saved by one library is loaded by the other, which must predict the same
within float32 rounding, hold the same optimizer state, take the same next
training step, and be able to go on training. Hostile archives (zip bombs,
traversal names, oversized or lying headers, custom objects, Lambda layers,
truncated members, wrong shapes and dtypes in the HDF5 weights) must raise
ValueError, never anything else, and never run code.

Layout:
  helpers
  1. fastgrad -> .keras -> Keras
  2. Keras -> .keras -> fastgrad
  3. .weights.h5 both ways
  4. file names and the h5py extra
  5. hostile archives and weights
"""
import io
import json
import os
import struct
import sys
import zipfile

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")

import fastgrad as fg
from _layer_cases import LAYER_KINDS, layer_model
from fastgrad import keras_format

h5py = pytest.importorskip("h5py", reason="needs h5py, the keras extra: "
                           "pip install '.[keras]'")

F32_TOL = {"rtol": 2e-5, "atol": 2e-6}


def _keras():
    return pytest.importorskip("keras", reason="needs Keras 3 with JAX, the cross-check "
                               "peer: pip install keras jax")


def data(n=64, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((d, k)), axis=1)
    return x, y


def fg_model(opt, dtype="float32", dropout=True, seed=0):
    layers = [fg.layers.Dense(8, activation="gelu", input_dim=5,
                              kernel_regularizer=fg.regularizers.L2(1e-3),
                              kernel_constraint=fg.constraints.MaxNorm(3.0)),
              fg.layers.BatchNormalization(momentum=0.9, epsilon=1e-2)]
    if dropout:
        layers.append(fg.layers.Dropout(0.1))
    layers += [fg.layers.Activation("selu"), fg.layers.Dense(6, activation="leaky_relu",
                                                             use_bias=False),
               fg.layers.Dense(3, activation="softmax")]
    m = fg.Sequential(layers, dtype=dtype, seed=seed)
    m.compile(opt, "sparse_categorical_crossentropy", metrics=["accuracy"])
    return m


OPTIMIZERS = {
    "sgd": lambda: fg.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    "rmsprop": lambda: fg.optimizers.RMSprop(1e-3, momentum=0.5, centered=True),
    "adam": lambda: fg.optimizers.Adam(1e-2, amsgrad=True, clipnorm=1.0),
    "adamw": lambda: fg.optimizers.AdamW(
        learning_rate=fg.schedules.ExponentialDecay(1e-2, 10, 0.9)),
    "adagrad": lambda: fg.optimizers.Adagrad(0.05),
    "nadam": lambda: fg.optimizers.Nadam(2e-3, beta_1=0.8, epsilon=1e-6),
    "adamax": lambda: fg.optimizers.Adamax(2e-3, beta_2=0.99),
    "adadelta": lambda: fg.optimizers.Adadelta(0.5, rho=0.9),
    "lion": lambda: fg.optimizers.Lion(1e-3, beta_1=0.85),
}


def keras_optimizer(keras, name):
    return {"sgd": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
            "rmsprop": lambda: keras.optimizers.RMSprop(1e-3, momentum=0.5, centered=True),
            "adam": lambda: keras.optimizers.Adam(1e-2, amsgrad=True, clipnorm=1.0),
            "adamw": lambda: keras.optimizers.AdamW(
                learning_rate=keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.9)),
            "adagrad": lambda: keras.optimizers.Adagrad(0.05),
            "nadam": lambda: keras.optimizers.Nadam(2e-3, beta_1=0.8, epsilon=1e-6),
            "adamax": lambda: keras.optimizers.Adamax(2e-3, beta_2=0.99),
            "adadelta": lambda: keras.optimizers.Adadelta(0.5, rho=0.9),
            "lion": lambda: keras.optimizers.Lion(1e-3, beta_1=0.85)}[name]()


def keras_model(keras, name, dropout=True, layer_norm=False):
    layers = [keras.Input((5,)), keras.layers.Dense(8, activation="relu"),
              keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-2)]
    if dropout:
        layers.append(keras.layers.Dropout(0.2))
    if layer_norm:
        layers.append(keras.layers.LayerNormalization(epsilon=1e-2))
    layers.append(keras.layers.Dense(3, activation="softmax"))
    m = keras.Sequential(layers)
    m.compile(keras_optimizer(keras, name), "sparse_categorical_crossentropy",
              metrics=["accuracy"])
    return m


def fg_slots(model):
    """fastgrad's moments in Keras' optimizer-variable order (after the
    step count and the learning rate)."""
    return keras_format._optimizer_vars(model)


def assert_same_state_after_one_step(fgm, km, x, y):
    """Both libraries take one step from the states they hold: the weights
    agree within float32 rounding of a step."""
    fgm.train_on_batch(x, y)
    km.train_on_batch(x, y)
    for a, b in zip(fgm.get_weights(), km.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# 1. fastgrad -> .keras -> Keras
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fastgrad_to_keras_predicts_the_same_holds_the_state_and_trains(tmp_path, name):
    keras = _keras()
    x, y = data()
    m = fg_model(OPTIMIZERS[name]())
    m.fit(x, y, epochs=2, batch_size=16, verbose=0)
    path = tmp_path / "m.keras"
    m.save(path)
    assert zipfile.is_zipfile(path)
    k = keras.models.load_model(path)
    np.testing.assert_allclose(k.predict(x, verbose=0), m.predict(x), **F32_TOL)
    for a, b in zip(k.get_weights(), m.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(k.optimizer.iterations) == m.optimizer.iterations == 8
    assert type(k.optimizer).__name__ == type(m.optimizer).__name__
    kvars = [np.asarray(v) for v in k.optimizer.variables]
    ours = fg_slots(m)
    assert len(kvars) == len(ours)
    for a, b in zip(kvars[1:], ours[1:]):
        np.testing.assert_array_equal(a, np.asarray(b, a.dtype))
    # Keras can continue training the loaded model
    hist = k.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert np.isfinite(hist.history["loss"][0])
    assert int(k.optimizer.iterations) == 12


@pytest.fixture
def jax_x64():
    """JAX keeps float64 only with x64 enabled (else it truncates to float32)."""
    jax = pytest.importorskip("jax", reason="needs Keras 3 with JAX, the cross-check "
                              "peer: pip install keras jax")
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fastgrad_state_read_by_keras_takes_the_same_next_step(tmp_path, name):
    keras = _keras()
    x, y = data(seed=8)
    m = fg_model(OPTIMIZERS[name](), dropout=False)
    m.fit(x, y, epochs=2, batch_size=16, verbose=0)
    m.save(tmp_path / "m.keras")
    k = keras.models.load_model(tmp_path / "m.keras")
    assert_same_state_after_one_step(m, k, x[:16], y[:16])


def test_float64_and_every_activation_reach_keras(tmp_path, jax_x64):
    keras = _keras()
    x, y = data()
    acts = ["linear", "relu", "leaky_relu", "elu", "selu", "gelu", "silu", "sigmoid", "tanh"]
    for dtype in ("float32", "float64"):
        layers = [fg.layers.Dense(6, activation=acts[0], input_dim=5)]
        layers += [fg.layers.Dense(6, activation=a) for a in acts[1:]]
        layers += [fg.layers.BatchNormalization(center=False), fg.layers.Dense(3)]
        m = fg.Sequential(layers, dtype=dtype, seed=1)
        m.compile(fg.optimizers.SGD(0.01), fg.losses.Huber(delta=0.5), metrics=["mae"])
        m.fit(x.astype(dtype), np.eye(3)[y], epochs=1, verbose=0)
        m.save(tmp_path / f"{dtype}.keras")
        k = keras.models.load_model(tmp_path / f"{dtype}.keras")
        assert k.get_weights()[0].dtype == np.dtype(dtype)
        for a, b in zip(k.get_weights(), m.get_weights()):
            np.testing.assert_array_equal(a, b)
        # k(x), not k.predict(x): predict casts its input to float32. Keras'
        # own float64 tanh and BatchNormalization (JAX backend) are good to
        # about 1e-7 only, so float64 is held to float32 rounding as well
        np.testing.assert_allclose(np.asarray(k(x.astype(dtype))), m.predict(x), **F32_TOL)
        # Keras computes the Huber loss with the saved delta
        yt, yp = np.eye(3)[y[:8]], m.predict(x[:8])
        np.testing.assert_allclose(float(k.loss(yt, yp)), fg.losses.huber(yt, yp, 0.5).mean(),
                                   rtol=1e-5)
        assert not np.isclose(fg.losses.huber(yt, yp, 0.5).mean(),
                              fg.losses.huber(yt, yp, 1.0).mean())
        k.fit(x.astype(dtype), np.eye(3)[y], epochs=1, verbose=0)


def test_an_uncompiled_model_reaches_keras_without_an_optimizer(tmp_path):
    keras = _keras()
    m = fg.Sequential([fg.layers.Dense(4, activation="tanh", input_dim=5),
                       fg.layers.Dense(2, activation="sigmoid")], seed=2)
    m.build()
    m.save(tmp_path / "u.keras")
    k = keras.models.load_model(tmp_path / "u.keras")
    x, _ = data()
    np.testing.assert_allclose(k.predict(x, verbose=0), m.predict(x), **F32_TOL)
    again = fg.load_model(tmp_path / "u.keras")
    assert again.optimizer is None
    np.testing.assert_array_equal(again.predict(x), m.predict(x))


def test_a_constraint_keras_lacks_is_refused_before_writing(tmp_path):
    m = fg.Sequential([fg.layers.Dense(2, input_dim=3,
                                       kernel_constraint=fg.constraints.ClipValue(0.5))])
    m.build()
    with pytest.raises(ValueError, match="ClipValue"):
        m.save(tmp_path / "c.keras")
    assert not (tmp_path / "c.keras").exists()


def _f32(config):
    """config with a Normalization's given statistics as float32 values:
    the file holds the ones the model computes with."""
    return {k: np.float32(v).tolist() if k in ("mean", "variance") and v is not None else v
            for k, v in config.items()}


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_every_layer_reaches_keras_and_keras_file_of_it_comes_back(tmp_path, kind):
    keras = _keras()
    m, x = layer_model(kind, "float32")
    x = x.astype(np.float32)
    want = m.predict(x, verbose=0)
    m.save(tmp_path / "m.keras")
    k = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(k.predict(x, verbose=0), want, **F32_TOL)
    # Keras' own file of the same model, read by fastgrad: the same weights,
    # so the same outputs to the bit
    k.save(tmp_path / "k.keras")
    back = fg.load_model(tmp_path / "k.keras")
    assert [l.kind for l in back.layers] == [l.kind for l in m.layers]
    assert [_f32(l.get_config()) for l in back.layers] == \
        [_f32(l.get_config()) for l in m.layers]
    for a, b in zip(back.get_weights(), m.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.predict(x, verbose=0), want)


# ---------------------------------------------------------------------------
# 2. Keras -> .keras -> fastgrad
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_keras_to_fastgrad_predicts_the_same_and_steps_like_keras(tmp_path, name):
    keras = _keras()
    x, y = data(seed=3)
    k = keras_model(keras, name, layer_norm=True)
    k.fit(x, y, epochs=2, batch_size=16, verbose=0)
    k.save(tmp_path / "k.keras")
    m = fg.load_model(tmp_path / "k.keras")
    assert [l.kind for l in m.layers] == ["Dense", "BatchNormalization", "Dropout",
                                          "LayerNormalization", "Dense"]
    assert type(m.optimizer).__name__ == type(k.optimizer).__name__
    assert m.optimizer.iterations == int(k.optimizer.iterations) == 8
    np.testing.assert_allclose(m.predict(x), k.predict(x, verbose=0), **F32_TOL)
    # the state read from the file is Keras' state, variable for variable
    kvars, fvars = [np.asarray(v) for v in k.optimizer.variables], fg_slots(m)
    assert len(kvars) == len(fvars)
    if name == "nadam":   # its product of momentum factors: fastgrad's in double
        np.testing.assert_allclose(kvars.pop(), fvars.pop(), rtol=1e-6)
    for a, b in zip(kvars[1:], fvars[1:]):
        np.testing.assert_array_equal(a, np.asarray(b, a.dtype))
    hist = m.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert np.isfinite(hist.history["loss"][0])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_keras_state_read_by_fastgrad_takes_the_same_next_step(tmp_path, name):
    keras = _keras()
    x, y = data(seed=4)
    k = keras_model(keras, name, dropout=False)
    k.fit(x, y, epochs=2, batch_size=16, verbose=0)
    k.save(tmp_path / "k.keras")
    m = fg.load_model(tmp_path / "k.keras")
    assert_same_state_after_one_step(m, k, x[:16], y[:16])


def test_keras_models_of_the_newer_layers_load(tmp_path):
    keras = _keras()
    K = keras.layers
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((64, 2, 3)) * 2 + 1).astype(np.float32)
    adapted = K.Normalization()
    adapted.adapt(x.reshape(64, 6))   # Keras' own statistics, and its count variable
    k = keras.Sequential([
        keras.Input((2, 3)), K.Flatten(), adapted, K.Dense(8),
        K.PReLU(alpha_initializer=keras.initializers.RandomUniform(-0.5, 1.5)),
        K.LayerNormalization(epsilon=0.01),
        K.ReLU(max_value=1.5, negative_slope=0.3, threshold=0.5),
        K.Rescaling(0.5, offset=-0.2), K.Dense(6), K.LeakyReLU(0.1), K.ELU(0.7),
        K.GaussianNoise(0.1), K.GaussianDropout(0.2), K.AlphaDropout(0.1), K.Identity(),
        K.Normalization(mean=0.5, variance=2.0, invert=True), K.Dense(3), K.Softmax()])
    k.compile(keras.optimizers.Adam(1e-2), "mse")
    k.fit(x, rng.standard_normal((64, 3)).astype(np.float32), epochs=2, verbose=0)
    k.save(tmp_path / "k.keras")
    m = fg.load_model(tmp_path / "k.keras")
    assert [l.kind for l in m.layers] == [type(l).__name__ for l in k.layers]
    assert m.layers[0].sample_shape == (2, 3)
    np.testing.assert_allclose(m.layers[1].get_weights()[0], np.asarray(adapted.mean).ravel())
    np.testing.assert_allclose(m.predict(x, verbose=0), k.predict(x, verbose=0), **F32_TOL)
    m.fit(x, rng.standard_normal((64, 3)), epochs=1, verbose=0)   # and it trains on


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_keras_model_compiled_but_never_trained_loads_with_a_fresh_optimizer(tmp_path, name):
    # Keras saves an optimizer it never built as its step count (and
    # learning rate) alone
    keras = _keras()
    x, y = data(seed=8)
    k = keras_model(keras, name, dropout=False)
    k.save(tmp_path / "k.keras")
    m = fg.load_model(tmp_path / "k.keras")
    assert type(m.optimizer).__name__ == type(k.optimizer).__name__
    assert m.optimizer.iterations == 0
    np.testing.assert_allclose(m.predict(x), k.predict(x, verbose=0), **F32_TOL)
    assert_same_state_after_one_step(m, k, x[:16], y[:16])


@pytest.mark.parametrize("loss", sorted(fg.losses.REGISTRY.classes))
def test_every_loss_goes_to_keras_and_back_with_the_same_value(tmp_path, loss):
    keras = _keras()
    rng = np.random.default_rng(5)
    x, y = rng.random((8, 4)).astype(np.float32), rng.random((8, 3)).astype(np.float32)
    if loss == "SparseCategoricalCrossentropy":
        y = np.argmax(y, axis=1)
    m = fg.Sequential([fg.layers.Dense(3, "softmax", input_dim=4)], seed=0)
    m.compile("adam", getattr(fg.losses, loss)())
    m.fit(x, y, epochs=1, verbose=0)
    m.save(tmp_path / "m.keras")
    k = keras.models.load_model(tmp_path / "m.keras")
    assert type(k.loss).__name__ == loss
    np.testing.assert_allclose(k.evaluate(x, y, verbose=0), m.evaluate(x, y, verbose=0),
                               rtol=1e-5)
    k.save(tmp_path / "k.keras")
    assert type(fg.load_model(tmp_path / "k.keras").loss).__name__ == loss


SCHEDULES = {
    "ExponentialDecay": dict(initial_learning_rate=0.01, decay_steps=3, decay_rate=0.5),
    "PiecewiseConstantDecay": dict(boundaries=[2, 5], values=[0.01, 0.005, 0.001]),
    "CosineDecay": dict(initial_learning_rate=0.01, decay_steps=7, alpha=0.1),
    "InverseTimeDecay": dict(initial_learning_rate=0.01, decay_steps=3, decay_rate=0.5),
    "PolynomialDecay": dict(initial_learning_rate=0.01, decay_steps=4, power=2.0, cycle=True),
    "CosineDecayRestarts": dict(initial_learning_rate=0.01, first_decay_steps=3, t_mul=2.0),
}


@pytest.mark.parametrize("name", sorted(fg.schedules.REGISTRY.classes))
def test_every_schedule_goes_to_keras_and_back(tmp_path, name):
    keras = _keras()
    x, y = data(seed=9)
    m = fg_model(fg.optimizers.Adam(getattr(fg.schedules, name)(**SCHEDULES[name])))
    m.fit(x, y, epochs=1, batch_size=16, verbose=0)
    m.save(tmp_path / "m.keras")
    k = keras.models.load_model(tmp_path / "m.keras")
    sched = k.optimizer._learning_rate
    assert type(sched).__name__ == name
    for step in (0, 1, 4, 9):
        assert float(sched(step)) == pytest.approx(m.optimizer._learning_rate(step), rel=1e-6)
    k.save(tmp_path / "k.keras")
    back = fg.load_model(tmp_path / "k.keras")
    assert back.optimizer._learning_rate.get_config() == m.optimizer._learning_rate.get_config()


def test_keras_uncompiled_and_float64_models_load(tmp_path, jax_x64):
    keras = _keras()
    x, _ = data()
    k = keras.Sequential([keras.Input((5,)),
                          keras.layers.Dense(4, activation="elu", dtype="float64"),
                          keras.layers.Activation("softmax", dtype="float64")])
    k.save(tmp_path / "k64.keras")
    m = fg.load_model(tmp_path / "k64.keras")
    assert m.dtype == np.float64 and m.optimizer is None
    np.testing.assert_allclose(m.predict(x), np.asarray(k(x.astype(np.float64))),
                               rtol=1e-12, atol=1e-14)


def test_keras_losses_and_metrics_given_as_functions_load_by_name(tmp_path):
    keras = _keras()
    x, y = data(seed=6)
    k = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    k.compile("sgd", loss=keras.losses.mean_squared_error,
              metrics=[keras.metrics.mean_absolute_error])
    k.fit(x, np.eye(3)[y], epochs=1, verbose=0)
    k.save(tmp_path / "f.keras")
    m = fg.load_model(tmp_path / "f.keras")
    assert m.loss.name == "mse" and type(m.metrics[0]).__name__ == "MeanAbsoluteError"
    np.testing.assert_allclose(m.evaluate(x, np.eye(3)[y], verbose=0),
                               k.evaluate(x, np.eye(3)[y], verbose=0), rtol=1e-5)


# ---------------------------------------------------------------------------
# 3. .weights.h5 both ways
# ---------------------------------------------------------------------------

def test_weights_files_go_both_ways(tmp_path):
    keras = _keras()
    x, y = data(seed=5)
    m = fg_model(fg.optimizers.Adam(1e-2), dropout=False, seed=6)
    m.fit(x, y, epochs=1, verbose=0)
    k = keras.Sequential([keras.Input((5,)),
                          keras.layers.Dense(8, activation="gelu"),
                          keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-2),
                          keras.layers.Activation("selu"),
                          keras.layers.Dense(6, activation="leaky_relu", use_bias=False),
                          keras.layers.Dense(3, activation="softmax")])
    m.save_weights(tmp_path / "f.weights.h5")
    k.load_weights(tmp_path / "f.weights.h5")
    np.testing.assert_allclose(k.predict(x, verbose=0), m.predict(x), **F32_TOL)
    # and back: Keras' changed weights into a fresh fastgrad model
    k.set_weights([w * 0.5 for w in k.get_weights()])
    k.save_weights(tmp_path / "k.weights.h5")
    fresh = fg_model(fg.optimizers.Adam(1e-2), dropout=False, seed=7)
    fresh.build()
    fresh.load_weights(tmp_path / "k.weights.h5")
    np.testing.assert_allclose(fresh.predict(x), k.predict(x, verbose=0), **F32_TOL)
    for a, b in zip(fresh.get_weights(), k.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_load_weights_skips_an_optimizer_state_that_does_not_fit_with_a_warning(tmp_path):
    x, y = data()
    m = fg_model(fg.optimizers.Adam(1e-2), dropout=False)
    m.fit(x, y, epochs=1, verbose=0)
    m.save_weights(tmp_path / "a.weights.h5")
    other = fg_model(fg.optimizers.SGD(0.1), dropout=False, seed=9)
    other.build()
    with pytest.warns(UserWarning, match="optimizer"):
        other.load_weights(tmp_path / "a.weights.h5")
    for a, b in zip(other.get_weights(), m.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert other.optimizer.iterations == 0
    same = fg_model(fg.optimizers.Adam(1e-2), dropout=False, seed=9)
    same.build()
    same.load_weights(tmp_path / "a.weights.h5")
    assert same.optimizer.iterations == m.optimizer.iterations == 2
    for k, v in m.optimizer.variables().items():
        np.testing.assert_array_equal(same.optimizer.variables()[k], v)


def test_load_weights_refuses_another_architecture_and_changes_nothing(tmp_path):
    m = fg_model("adam", dropout=False)
    m.build()
    m.save_weights(tmp_path / "a.weights.h5")
    other = fg.Sequential([fg.layers.Dense(8, input_dim=5), fg.layers.Dense(2)])
    other.build()
    before = other.get_weights()
    with pytest.raises(ValueError):
        other.load_weights(tmp_path / "a.weights.h5")
    for a, b in zip(before, other.get_weights()):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# 4. file names and the h5py extra
# ---------------------------------------------------------------------------

def test_save_dispatches_on_the_name_and_load_model_on_the_content(tmp_path):
    x, y = data()
    m = fg_model("adam")
    m.fit(x, y, epochs=1, verbose=0)
    m.save(tmp_path / "m.fgm")
    assert (tmp_path / "m.fgm").read_bytes()[:8] == b"FGMODEL\0"
    m.save(str(tmp_path / "m.keras"))
    assert zipfile.is_zipfile(tmp_path / "m.keras")
    # content decides, not the name
    os.replace(tmp_path / "m.keras", tmp_path / "renamed.bin")
    np.testing.assert_array_equal(fg.load_model(tmp_path / "renamed.bin").predict(x),
                                  m.predict(x))
    for bad in ("m.h5", "m.hdf5", "m.weights.h5"):
        with pytest.raises(ValueError, match="save_weights"):
            m.save(tmp_path / bad)
    m.save_weights(tmp_path / "w.weights.h5")
    with pytest.raises(ValueError, match="load_weights"):
        fg.load_model(tmp_path / "w.weights.h5")
    with pytest.raises(ValueError, match="weights.h5"):
        m.save_weights(tmp_path / "w.h5")
    with pytest.raises(ValueError, match="weights.h5"):
        m.load_weights(tmp_path / "m.fgm")


def test_without_h5py_the_error_names_the_extra(tmp_path, monkeypatch):
    m = fg_model("adam")
    m.build()
    monkeypatch.setitem(sys.modules, "h5py", None)
    for call in (lambda: m.save(tmp_path / "m.keras"),
                 lambda: m.save_weights(tmp_path / "m.weights.h5")):
        with pytest.raises(ImportError, match=r"fastgrad\[keras\]"):
            call()
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------
# 5. hostile archives and weights
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A valid archive's members (name -> bytes) and its file bytes."""
    x, y = data()
    m = fg_model(fg.optimizers.Adam(1e-2))
    m.fit(x, y, epochs=1, verbose=0)
    path = tmp_path_factory.mktemp("valid") / "m.keras"
    m.save(path)
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    return members, path.read_bytes()


def zip_bytes(members, compression=zipfile.ZIP_STORED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, blob in members:
            zf.writestr(name, blob)
    return buf.getvalue()


def load_bytes(tmp_path, blob, name="x.keras"):
    """Load blob from a file in tmp_path, named by a relative path: error
    messages start with the path, and tmp_path holds the test's name, which
    a match= below must not match by accident."""
    (tmp_path / name).write_bytes(blob)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        return fg.load_model(name)
    finally:
        os.chdir(cwd)


def refused(tmp_path, blob, match=None):
    with pytest.raises(ValueError, match=match):
        load_bytes(tmp_path, blob)


def with_config(members, edit):
    config = json.loads(members["config.json"])
    edit(config)
    out = dict(members, **{"config.json": json.dumps(config).encode()})
    return zip_bytes(out.items())


def test_the_valid_archive_loads(tmp_path, archive):
    members, blob = archive
    assert sorted(members) == ["config.json", "metadata.json", "model.weights.h5"]
    assert load_bytes(tmp_path, blob).optimizer.iterations == 2


def test_zip_bombs_are_refused(tmp_path, archive):
    members, _ = archive
    # a member that deflates from a few KB to 20 MB
    bomb = dict(members, **{"config.json": b" " * (20 << 20)})
    refused(tmp_path, zip_bytes(bomb.items(), zipfile.ZIP_DEFLATED), "config.json")
    # weights expanding more than MAX_RATIO times
    padded = dict(members, **{"model.weights.h5": members["model.weights.h5"]
                              + b"\0" * (4 << 20)})
    refused(tmp_path, zip_bytes(padded.items(), zipfile.ZIP_DEFLATED), "decompression bomb")


def test_a_member_larger_than_it_declares_is_refused(tmp_path, archive):
    members, _ = archive
    blob = bytearray(zip_bytes(members.items()))
    # the central directory's uncompressed size of config.json, made smaller
    at = blob.find(b"PK\x01\x02" , 0)
    while at >= 0:
        name_len = struct.unpack_from("<H", blob, at + 28)[0]
        if blob[at + 46:at + 46 + name_len] == b"config.json":
            size = struct.unpack_from("<I", blob, at + 24)[0]
            struct.pack_into("<I", blob, at + 24, size - 10)
        at = blob.find(b"PK\x01\x02", at + 4)
    refused(tmp_path, bytes(blob))


@pytest.mark.parametrize("name", ["../config.json", "/etc/passwd", "C:/x.json",
                                  "a/../../b", "..\\evil"])
def test_traversal_names_are_refused_by_name(tmp_path, archive, name):
    members, _ = archive
    blob = zip_bytes(list(members.items()) + [(name, b"x")])
    with pytest.raises(ValueError, match="path traversal"):
        load_bytes(tmp_path, blob)


def test_unexpected_duplicate_and_missing_members_are_refused(tmp_path, archive):
    members, _ = archive
    refused(tmp_path, zip_bytes(list(members.items()) + [("evil.py", b"import os")]),
            "evil.py")
    refused(tmp_path, zip_bytes([(n, b) for n, b in members.items()
                                 if n != "model.weights.h5"]), "model.weights.h5")
    with pytest.warns(UserWarning):   # zipfile's own warning on a duplicate name
        blob = zip_bytes(list(members.items()) + [("config.json", b"{}")])
    refused(tmp_path, blob, "twice")


def test_too_many_members_and_lying_end_records_are_refused(tmp_path, archive):
    members, _ = archive
    many = [(f"assets/{i}", b"") for i in range(keras_format.MAX_MEMBERS + 1)]
    refused(tmp_path, zip_bytes(list(members.items()) + many), "announces 20 members")
    blob = bytearray(zip_bytes(members.items()))
    end = blob.rfind(b"PK\x05\x06")
    for total in (0xFFFF, 5000):   # ZIP64 marker, then a huge count
        edited = bytearray(blob)
        struct.pack_into("<HH", edited, end + 8, total, total)
        refused(tmp_path, bytes(edited))
    edited = bytearray(blob)
    struct.pack_into("<I", edited, end + 12, 0x7FFFFFF0)   # directory size
    refused(tmp_path, bytes(edited))


def test_huge_json_headers_are_refused(tmp_path, archive):
    members, _ = archive
    big = json.loads(members["config.json"])
    big["padding"] = "x" * (keras_format.MAX_JSON + 1)
    refused(tmp_path, zip_bytes(dict(members, **{"config.json": json.dumps(big).encode()}
                                     ).items()), "config.json")
    deep = b"[" * 100000 + b"]" * 100000
    refused(tmp_path, zip_bytes(dict(members, **{"config.json": deep}).items()), "JSON")
    nan = members["config.json"].replace(b'"momentum": 0.9', b'"momentum": NaN')
    assert nan != members["config.json"]
    refused(tmp_path, zip_bytes(dict(members, **{"config.json": nan}).items()), "NaN")


def _layers(config):
    return config["config"]["layers"]


@pytest.mark.parametrize("edit, match", [
    (lambda c: _layers(c).__setitem__(1, {"module": "keras.layers", "class_name": "Lambda",
                                          "config": {"function": "eval"}}), "Lambda"),
    (lambda c: _layers(c)[1].update(module="my_package.layers"), "my_package"),
    (lambda c: _layers(c)[1].update(registered_name="Custom>Dense"), "Custom>Dense"),
    (lambda c: _layers(c)[1].update(class_name="Conv2D"), "Conv2D"),
    (lambda c: _layers(c)[1].update(class_name="UnitNormalization"), "UnitNormalization"),
    (lambda c: _layers(c)[1]["config"].update(activation={
        "module": "builtins", "class_name": "function", "config": "eval"}), "'eval'"),
    (lambda c: _layers(c)[1]["config"].update(activation={
        "module": "os", "class_name": "function", "config": "relu"}), "function entries hold code"),
    (lambda c: _layers(c)[1]["config"].update(kernel_initializer={
        "module": "evil", "class_name": "GlorotUniform", "config": {}}), "evil"),
    (lambda c: _layers(c)[1]["config"].update(activation="my_activation"), "my_activation"),
    (lambda c: _layers(c)[1]["config"].update(lora_rank=4), "lora_rank"),
    (lambda c: _layers(c)[1]["config"].update(trainable="no"), "trainable"),
    (lambda c: _layers(c)[1]["config"].update(surprise=1), "surprise"),
    (lambda c: _layers(c)[1]["config"].update(units=10**400), "dense/kernel"),
    (lambda c: _layers(c)[1]["config"].update(units=10**9), r"dense/kernel \(5, 1000000000\)"),
    (lambda c: c["compile_config"].update(loss={"module": "losses_of_mine",
                                                "class_name": "MyLoss"}), "losses_of_mine"),
    (lambda c: c["compile_config"]["optimizer"].update(class_name="Adafactor"), "Adafactor"),
    (lambda c: c["compile_config"]["optimizer"]["config"].update(loss_scale_factor=2.0),
     "loss_scale_factor"),
    (lambda c: c["compile_config"].update(metrics=[{"module": "keras.metrics",
                                                    "class_name": "F1Score"}]), "F1Score"),
    (lambda c: c["config"]["layers"].clear(), "no layers"),
    (lambda c: c.update(class_name="Functional"), "Functional"),
])
def test_custom_objects_code_and_unknown_entries_are_refused_by_name(tmp_path, archive,
                                                                     edit, match):
    members, _ = archive
    with pytest.raises(ValueError, match=match):
        load_bytes(tmp_path, with_config(members, edit))


def test_a_frozen_keras_layer_loads_frozen(tmp_path, archive):
    members, _ = archive
    model = load_bytes(tmp_path, with_config(
        members, lambda c: _layers(c)[1]["config"].update(trainable=False)))
    assert not model.layers[0].trainable
    assert all(v.trainable for layer in model.layers[1:] for v in layer.variables
               if v.name in ("kernel", "bias"))


def test_loading_never_runs_code(tmp_path, archive):
    members, _ = archive
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w')"

    def edit(c):
        _layers(c)[1] = {"module": "keras.layers", "class_name": "Lambda",
                         "config": {"function": {"class_name": "__lambda__",
                                                 "config": {"code": code}}}}
        c["compile_config"]["loss"] = {"module": "builtins", "class_name": "eval",
                                       "config": code}
    with pytest.raises(ValueError):
        load_bytes(tmp_path, with_config(members, edit))
    assert not marker.exists()


def test_truncated_archives_raise_value_error(tmp_path, archive):
    _, blob = archive
    for cut in list(range(0, len(blob), max(1, len(blob) // 60))) + [len(blob) - 1]:
        refused(tmp_path, blob[:cut])


def test_random_damage_raises_only_value_error(tmp_path, archive):
    _, blob = archive
    rng = np.random.default_rng(0)
    loaded = 0
    for _ in range(150):
        b = bytearray(blob)
        for _ in range(rng.integers(1, 6)):
            b[rng.integers(0, len(b))] = rng.integers(0, 256)
        try:
            load_bytes(tmp_path, bytes(b))
            loaded += 1
        except ValueError:
            pass
    assert loaded < 150   # most damage is found (stored members carry CRCs)


def h5_edit(members, edit):
    """The archive with its weights rewritten by edit(h5py.File)."""
    buf = io.BytesIO(members["model.weights.h5"])
    out = io.BytesIO()
    out.write(buf.getvalue())
    with h5py.File(out, "r+") as f:
        edit(f)
    return zip_bytes(dict(members, **{"model.weights.h5": out.getvalue()}).items())


@pytest.mark.parametrize("edit, match", [
    (lambda f: (f["layers/dense/vars"].__delitem__("0"),
                f["layers/dense/vars"].create_dataset("0", data=np.zeros((4, 8), "f4"))),
     "shape"),
    (lambda f: (f["layers/dense/vars"].__delitem__("1"),
                f["layers/dense/vars"].create_dataset("1", data=np.zeros(8, "i4"))), "dtype"),
    (lambda f: (f["layers/dense/vars"].__delitem__("1"),
                f["layers/dense/vars"].create_dataset("1", data=np.zeros(8, "f4"),
                                                      compression="gzip")), "filtered"),
    (lambda f: f["layers/dense/vars"].create_dataset("9", data=np.zeros(1)), "'9'"),
    (lambda f: f["layers/dense/vars"].__delitem__("1"), "1 arrays"),
    (lambda f: f.create_group("extra"), "extra"),
    (lambda f: f["layers"].create_group("conv2d"), "conv2d"),
    (lambda f: f["layers/dense/vars"].__setitem__("2", h5py.SoftLink("/layers/dense/vars/0")),
     "SoftLink"),
    (lambda f: f["layers/dense/vars"].__setitem__("2", h5py.ExternalLink("/etc/passwd", "/")),
     "ExternalLink"),
    (lambda f: f["optimizer/vars"].__delitem__("3"), "optimizer"),
    (lambda f: (f["optimizer/vars"].__delitem__("0"),
                f["optimizer/vars"].create_dataset("0", data=np.int64(-5))), "step count"),
])
def test_hostile_weights_are_refused(tmp_path, archive, edit, match):
    members, _ = archive
    with pytest.raises(ValueError, match=match):
        load_bytes(tmp_path, h5_edit(members, edit))


def test_a_weights_member_that_is_not_hdf5_is_refused(tmp_path, archive):
    members, _ = archive
    for blob in (b"", b"not hdf5", members["model.weights.h5"][:200],
                 b"\x89HDF\r\n\x1a\n" + b"\0" * 100):
        refused(tmp_path, zip_bytes(dict(members, **{"model.weights.h5": blob}).items()))
