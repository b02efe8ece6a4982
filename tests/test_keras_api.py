"""Keras 3's model, layer, optimizer and utility API, checked against real
Keras (JAX backend) from the same initial weights, with shuffle=False.

Covered: Input/InputLayer and ``built``; model(x), predict_on_batch,
test_on_batch, return_dict, metrics_names; variables (weights,
trainable_weights, non_trainable_weights, kernel, bias, assign);
get_layer, pop; layer get/set_weights; trainable=False (frozen tensors
skipped by the compiled step, a frozen BatchNormalization in inference
mode, no penalty for frozen weights); get_config/from_config, to_json,
model_from_json, clone_model; optimizer.learning_rate under a schedule,
iterations, configs; set_random_seed, to_categorical; fit's batch_size=None,
steps_per_epoch, validation_freq, validation_batch_size; compile's Keras
arguments; BatchNormalization on a one-row batch.

The allocation test of the prediction fast path needs no Keras.
"""
import json
import os
import itertools
import tracemalloc
import warnings

import numpy as np
import pytest

import fastgrad as fg
from fastgrad.layers import BatchNormalization, Dense, Dropout

os.environ.setdefault("KERAS_BACKEND", "jax")


def _keras():
    return pytest.importorskip("keras", reason="needs Keras 3 with JAX, the cross-check peers: pip install '.[peers]'")


def _data(n=65, d=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (np.argmax(x @ rng.normal(size=(d, k)), axis=1)).astype(np.int64)
    return x, y


# (kind, units or rate, activation, extra) -> the same layer in both libraries
_ARCH = [("dense", 8, "relu"), ("bn", None, None), ("dense", 6, "tanh"), ("dense", 3, "softmax")]


def _pair(arch=_ARCH, d=4, seed=1, freeze=(), l2=None):
    """(fastgrad model, keras model) with the same layers, names and
    initial weights (fastgrad's, copied into Keras); layers whose index is
    in freeze are frozen in both before compile."""
    keras = _keras()
    fl, kl = [fg.Input(shape=(d,))], [keras.Input(shape=(d,))]
    for i, (kind, n, act) in enumerate(arch):
        name = f"l{i}"
        if kind == "dense":
            reg = {} if l2 is None else {"kernel_regularizer": l2}
            fl.append(Dense(n, activation=act, name=name,
                            **({"kernel_regularizer": fg.regularizers.L2(l2)} if reg else {})))
            kl.append(keras.layers.Dense(n, activation=act, name=name,
                                         **({"kernel_regularizer": keras.regularizers.L2(l2)}
                                            if reg else {})))
        else:
            fl.append(BatchNormalization(name=name, momentum=0.9))
            kl.append(keras.layers.BatchNormalization(name=name, momentum=0.9))
    fm = fg.Sequential(fl, seed=seed, name="m")
    km = keras.Sequential(kl, name="m")
    km.set_weights(fm.get_weights())
    for i in freeze:
        fm.layers[i].trainable = False
        km.layers[i].trainable = False
    return fm, km


def _compile_both(fm, km, metrics=("accuracy",), lr=0.01):
    keras = _keras()
    fm.compile(optimizer=fg.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
               metrics=list(metrics))
    km.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
               metrics=list(metrics))


def _close(a, b, rtol=2e-5, atol=2e-6):
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# 1. Input, InputLayer, built
# ---------------------------------------------------------------------------

def test_input_first_or_added_builds_the_model_as_keras_does():
    keras = _keras()
    cases = [
        (lambda m: fg.Sequential([m.Input(shape=(5,)), m.layers.Dense(3)]),
         lambda: keras.Sequential([keras.Input(shape=(5,)), keras.layers.Dense(3)])),
        (lambda m: fg.Sequential([fg.layers.InputLayer(shape=(5,)), m.layers.Dense(3)]),
         lambda: keras.Sequential([keras.layers.InputLayer(shape=(5,)),
                                   keras.layers.Dense(3)])),
        (lambda m: fg.Sequential([fg.layers.Input(shape=(5,)), m.layers.Dense(3)]),
         lambda: keras.Sequential([keras.layers.Input(shape=(5,)), keras.layers.Dense(3)])),
        (lambda m: fg.Sequential([m.layers.Dense(3, input_shape=(5,))]),
         lambda: keras.Sequential([keras.layers.Dense(3, input_shape=(5,))])),
        (lambda m: fg.Sequential([m.layers.Dense(3)]),
         lambda: keras.Sequential([keras.layers.Dense(3)])),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # Keras warns about input_shape=
        for make_fg, make_keras in cases:
            f, k = make_fg(fg), make_keras()
            assert f.built == k.built
            if k.built:
                assert [w.shape for w in f.get_weights()] == \
                    [tuple(w.shape) for w in k.get_weights()]
                assert f.input_shape == tuple(k.input_shape)
    # through add, one layer at a time, as the Sequential guide writes it
    f = fg.Sequential()
    k = keras.Sequential()
    f.add(fg.Input(shape=(5,)))
    k.add(keras.Input(shape=(5,)))
    for units in (4, 2):
        f.add(Dense(units, activation="relu"))
        k.add(keras.layers.Dense(units, activation="relu"))
        assert f.built == k.built
        assert [w.shape for w in f.weights] == [tuple(w.shape) for w in k.weights]
    # build((None, features)), as Keras takes it
    f2, k2 = fg.Sequential([Dense(3)]), keras.Sequential([keras.layers.Dense(3)])
    f2.build((None, 6))
    k2.build((None, 6))
    assert f2.built and k2.built and f2.input_shape == tuple(k2.input_shape)
    assert [w.shape for w in f2.weights] == [tuple(w.shape) for w in k2.weights]
    # a second Input, or an Input after layers, is refused
    with pytest.raises(ValueError, match="InputLayer"):
        f.add(fg.Input(shape=(2,)))
    with pytest.raises(ValueError, match="shape"):
        fg.Input(shape=(3, 4))
    with pytest.raises(ValueError, match="shape"):
        fg.Input()


def test_layers_added_after_the_weights_exist_keep_the_earlier_weights():
    x, _ = _data(10, 5)
    f = fg.Sequential([fg.Input(shape=(5,)), Dense(4, activation="relu")], seed=0)
    before = f.get_weights()
    out = f.predict(x)
    f.add(Dense(2))
    assert all(np.array_equal(a, b) for a, b in zip(before, f.get_weights()[:2]))
    w2, b2 = f.get_weights()[2:]
    np.testing.assert_allclose(f.predict(x), out @ w2 + b2, rtol=1e-5, atol=1e-6)
    popped = f.pop()
    assert popped.name == "dense_1" and len(f.layers) == 1
    assert [w.shape for w in popped.get_weights()] == [(4, 2), (2,)]
    np.testing.assert_array_equal(f.predict(x), out)


# ---------------------------------------------------------------------------
# 2. one batch: model(x), predict_on_batch, test_on_batch, return_dict
# ---------------------------------------------------------------------------

def test_batch_methods_and_return_dict_match_keras():
    x, y = _data()
    fm, km = _pair()
    _compile_both(fm, km)
    _close([fm(x)], [np.asarray(km(x))])
    _close([fm.predict_on_batch(x[:7])], [km.predict_on_batch(x[:7])])
    assert isinstance(fm(x[:2]), np.ndarray) and fm(x[:2]).dtype == np.float32
    ft, kt = fm.test_on_batch(x, y, return_dict=True), km.test_on_batch(x, y, return_dict=True)
    assert set(ft) == set(kt) == {"loss", "accuracy"}
    _close([ft["loss"], ft["accuracy"]], [kt["loss"], kt["accuracy"]])
    assert fm.test_on_batch(x, y) == [ft["loss"], ft["accuracy"]]
    for _ in range(3):
        fr = fm.train_on_batch(x[:32], y[:32], return_dict=True)
        kr = km.train_on_batch(x[:32], y[:32], return_dict=True)
        assert set(fr) == set(kr)
        _close([fr["loss"]], [kr["loss"]])
    _close(fm.get_weights(), km.get_weights())
    fe = fm.evaluate(x, y, verbose=0, return_dict=True)
    ke = km.evaluate(x, y, verbose=0, return_dict=True)
    _close([fe["loss"], fe["accuracy"]], [ke["loss"], ke["accuracy"]])
    assert fm.metrics_names == ["loss", "accuracy"]
    # model(x, training=True): batch statistics, moving statistics moved, as Keras
    _close([fm(x, training=True)], [np.asarray(km(x, training=True))])
    _close(fm.get_weights(), km.get_weights())


def _fast_path_models():
    """A model of Dense layers only (one compiled call) and one of other layers."""
    return [fg.Sequential([fg.Input(shape=(16,)), Dense(64, activation="relu"),
                           BatchNormalization(), Dropout(0.5), Dense(10, activation="softmax")],
                          seed=0),
            fg.Sequential([fg.Input(shape=(16,)), Dense(64, activation="relu"),
                           Dense(10, activation="softmax")], seed=0)]


def test_prediction_fast_path_allocates_only_its_output():
    """model(x) and predict_on_batch allocate no array but their output once
    the work buffers have grown: what tracemalloc sees beyond the output is
    the layers' small Python view objects, a few kilobytes at most at 1 row
    and at 256 (nothing grows with the batch)."""
    x, _ = _data(256, 16)
    extra = {}
    for rows, model in itertools.product((256, 1), _fast_path_models()):
        xb = x[:rows]
        ref = model.predict(xb)
        for name, call in (("call", model), ("predict_on_batch", model.predict_on_batch)):
            call(xb)                                   # work buffers grow once
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                out = call(xb)
                peak = tracemalloc.get_traced_memory()[1] - before
            finally:
                tracemalloc.stop()
            np.testing.assert_array_equal(out, ref)
            extra[name, rows, id(model)] = peak - out.nbytes
    # 256 rows x 64 units of float32 would be 64 KiB: far above this bound
    assert max(extra.values()) <= 4096, extra


# ---------------------------------------------------------------------------
# 3. variables, get_layer, layer weights
# ---------------------------------------------------------------------------

def test_variables_match_keras_and_assign_in_place():
    fm, km = _pair()
    for attr in ("weights", "trainable_weights", "non_trainable_weights"):
        fv, kv = getattr(fm, attr), getattr(km, attr)
        assert [v.path for v in fv] == [v.path for v in kv]
        assert [v.name for v in fv] == [v.name for v in kv]
        assert [v.shape for v in fv] == [tuple(v.shape) for v in kv]
        assert [v.dtype for v in fv] == [v.dtype for v in kv]
        _close([v.numpy() for v in fv], [v.numpy() for v in kv], rtol=0, atol=0)
    dense = fm.get_layer("l0")
    assert dense is fm.get_layer(index=0) is fm.layers[0]
    assert km.get_layer("l0").name == dense.name
    kernel = dense.kernel
    assert kernel.path == km.get_layer("l0").kernel.path
    new = np.arange(kernel.size if hasattr(kernel, "size") else 32, dtype=np.float32)
    new = new[:4 * 8].reshape(4, 8) / 10
    kernel.assign(new)
    np.testing.assert_array_equal(fm.get_weights()[0], new)
    assert np.shares_memory(kernel.value, fm.params)
    for bad, exc in ((np.full((4, 8), np.nan), ValueError), (np.ones((8, 4)), ValueError),
                     (np.full((4, 8), 1e39), ValueError), (np.full((4, 8), "a"), TypeError)):
        with pytest.raises(exc, match="value"):
            kernel.assign(bad)
    np.testing.assert_array_equal(kernel.numpy(), new)
    with pytest.raises(ValueError):
        kernel.value[0, 0] = 1.0                        # read-only: assign writes
    # layer get_weights / set_weights
    ws = dense.get_weights()
    np.testing.assert_array_equal(ws[1], dense.bias.numpy())
    dense.set_weights([w * 2 for w in ws])
    np.testing.assert_array_equal(dense.kernel.numpy(), 2 * new)
    with pytest.raises(ValueError, match="weights"):
        dense.set_weights(ws[:1])
    with pytest.raises(ValueError, match="index"):
        fm.get_layer(index=9)
    with pytest.raises(ValueError, match="no layer"):
        fm.get_layer("zzz")
    with pytest.raises(ValueError):
        fm.get_layer()


# ---------------------------------------------------------------------------
# 4. trainable = False
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("freeze", [(0,), (1,), (0, 1), (2,)])
def test_frozen_layers_train_as_in_keras(freeze):
    x, y = _data()
    fm, km = _pair(freeze=freeze, l2=0.01)
    _compile_both(fm, km)
    start = fm.get_weights()
    assert [v.path for v in fm.trainable_weights] == [v.path for v in km.trainable_weights]
    fh = fm.fit(x, y, epochs=3, batch_size=16, shuffle=False, verbose=0)
    kh = km.fit(x, y, epochs=3, batch_size=16, shuffle=False, verbose=0)
    _close(fh.history["loss"], kh.history["loss"], rtol=3e-5)
    _close(fm.get_weights(), km.get_weights(), rtol=5e-5, atol=5e-6)
    for i in freeze:   # frozen: bit for bit as they were, moving statistics included
        names = [v.path for v in fm.layers[i].variables]
        for w0, v in zip([w for w, v in zip(start, fm.weights) if v.path in names],
                         fm.layers[i].variables):
            np.testing.assert_array_equal(w0, v.numpy())


def test_a_frozen_flag_changes_nothing_for_the_other_tensors():
    x, y = _data()
    runs = []
    for freeze in (False, True):
        m = fg.Sequential([fg.Input(shape=(4,)), Dense(8, activation="relu"), Dense(3)], seed=2)
        m.compile(fg.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
        if freeze:
            m.layers[0].trainable = False
            m.layers[0].trainable = True    # thawed again: bit-identical to never frozen
        m.fit(x, y, epochs=2, batch_size=16, verbose=0)
        runs.append(m.get_weights())
    assert all(np.array_equal(a, b) for a, b in zip(*runs))
    m.trainable = False
    before = m.get_weights()
    m.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, m.get_weights()))
    assert m.trainable_weights == [] and len(m.non_trainable_weights) == 4
    lines = []
    m.summary(print_fn=lines.append)
    assert " Trainable params: 0" in lines and " Non-trainable params: 67" in lines


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop", "adagrad"])
def test_the_other_tensors_train_bit_for_bit_as_beside_weights_held_fixed(optimizer):
    """The compiled step's update of each tensor depends only on that
    tensor's gradient and moments (without clipping by norm), so a model
    with its first layer frozen must train its other tensors bit for bit
    like a twin whose first layer is put back after every step."""
    x, y = _data(64)

    def make():
        m = fg.Sequential([fg.Input(shape=(4,)), Dense(8, activation="relu"),
                           BatchNormalization(), Dense(3)], seed=5)
        m.compile(optimizer, "sparse_categorical_crossentropy")
        return m

    frozen, twin = make(), make()
    frozen.layers[0].trainable = False
    fixed = twin.layers[0].get_weights()
    for step in range(6):
        rows = slice(8 * step, 8 * step + 8)
        frozen.train_on_batch(x[rows], y[rows])
        twin.train_on_batch(x[rows], y[rows])
        twin.layers[0].set_weights(fixed)
    for a, b in zip(frozen.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)
    grads = frozen.optimizer.last_step.grad_norms
    assert grads[0] == grads[1] == 0 and grads[2] > 0   # frozen tensors: no norm


# ---------------------------------------------------------------------------
# 5. configurations
# ---------------------------------------------------------------------------

def test_config_json_and_clone_round_trip():
    fm, km = _pair()
    fm.layers[1].trainable = False
    cfg = fm.get_config()
    kcfg = km.get_config()
    assert [entry["class_name"] for entry in cfg["layers"]] == \
        [entry["class_name"] for entry in kcfg["layers"]]
    assert [entry["config"]["name"] for entry in cfg["layers"][1:]] == \
        [entry["config"]["name"] for entry in kcfg["layers"][1:]]
    again = fg.Sequential.from_config(cfg)
    assert again.get_config() == cfg and again.built and not again.layers[1].trainable
    text = fm.to_json()
    assert json.loads(text)["class_name"] == "Sequential"
    loaded = fg.models.model_from_json(text)
    assert loaded.get_config() == cfg
    assert [w.shape for w in loaded.get_weights()] == [w.shape for w in fm.get_weights()]
    clone = fg.models.clone_model(fm)
    assert clone.get_config() == cfg and clone.optimizer is None
    assert all(a is not b for a, b in zip(clone.layers, fm.layers))
    clone.set_weights(fm.get_weights())
    x, _ = _data(9)
    np.testing.assert_array_equal(clone.predict(x), fm.predict(x))
    for layer in fm.layers:
        assert type(layer).from_config(layer.get_config()).get_config() == layer.get_config()
    with pytest.raises(ValueError):
        fg.models.model_from_json('{"class_name": "Functional", "config": {}}')


# ---------------------------------------------------------------------------
# 6. optimizers
# ---------------------------------------------------------------------------

def test_optimizer_learning_rate_under_a_schedule_and_iterations_match_keras():
    keras = _keras()
    x, y = _data()
    fm, km = _pair()
    fsched = fg.schedules.ExponentialDecay(0.05, 3, 0.5)
    ksched = keras.optimizers.schedules.ExponentialDecay(0.05, 3, 0.5)
    fm.compile(fg.optimizers.Adam(fsched), "sparse_categorical_crossentropy")
    km.compile(keras.optimizers.Adam(ksched), "sparse_categorical_crossentropy")
    assert fm.optimizer.learning_rate == pytest.approx(float(km.optimizer.learning_rate))
    fm.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
    km.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
    assert fm.optimizer.iterations == int(km.optimizer.iterations) == 10
    assert fm.optimizer.learning_rate == pytest.approx(float(km.optimizer.learning_rate),
                                                       rel=1e-6)
    _close(fm.get_weights(), km.get_weights(), rtol=5e-5, atol=5e-6)
    # configs: fastgrad's round trip, and Keras's serialized form read by fastgrad
    opt = fg.optimizers.deserialize(fg.optimizers.serialize(fm.optimizer))
    assert opt.get_config() == fm.optimizer.get_config()
    assert type(opt).from_config(opt.get_config()).get_config() == opt.get_config()
    from_keras = fg.optimizers.deserialize(keras.optimizers.serialize(km.optimizer))
    assert isinstance(from_keras, fg.optimizers.Adam)
    assert from_keras.learning_rate == pytest.approx(0.05)
    assert keras.optimizers.get("adam").get_config()["name"].startswith(
        fg.optimizers.get("adam").get_config()["name"])
    ema = fg.optimizers.deserialize(keras.optimizers.serialize(
        keras.optimizers.Adam(use_ema=True, ema_momentum=0.9)))
    assert ema.use_ema and ema.ema_momentum == pytest.approx(0.9)
    bad = keras.optimizers.serialize(keras.optimizers.Adam(loss_scale_factor=2.0))
    with pytest.raises(ValueError, match="loss_scale_factor"):
        fg.optimizers.deserialize(bad)
    assert fg.optimizers.schedules is fg.schedules


# ---------------------------------------------------------------------------
# 7. utilities and fit's Keras arguments
# ---------------------------------------------------------------------------

def test_to_categorical_and_set_random_seed():
    keras = _keras()
    for labels, n in (([0, 2, 1, 2], None), ([[1], [0]], 4), (np.array([3.0, 1.0]), None)):
        np.testing.assert_array_equal(fg.utils.to_categorical(labels, n),
                                      keras.utils.to_categorical(labels, n))
    with pytest.raises(ValueError):
        fg.utils.to_categorical([0, 3], 2)
    with pytest.raises(ValueError):
        fg.utils.to_categorical([-1, 0])
    weights = []
    for _ in range(2):
        fg.utils.set_random_seed(123)
        a = fg.Sequential([Dense(3, input_dim=2)])
        b = fg.Sequential([Dense(3, input_dim=2)])
        weights.append((a.get_weights()[0], b.get_weights()[0], np.random.rand()))
    assert np.array_equal(weights[0][0], weights[1][0])
    assert np.array_equal(weights[0][1], weights[1][1])
    assert not np.array_equal(weights[0][0], weights[0][1])
    assert weights[0][2] == weights[1][2]
    with pytest.raises(ValueError, match="seed"):
        fg.utils.set_random_seed(-1)


def _fit_both(fit_kwargs, epochs=3):
    x, y = _data()
    fm, km = _pair()
    _compile_both(fm, km)
    val = (x[:20], y[:20])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # both warn when steps_per_epoch runs out of data
        fh = fm.fit(x, y, epochs=epochs, shuffle=False, verbose=0, validation_data=val,
                    **fit_kwargs)
        kh = km.fit(x, y, epochs=epochs, shuffle=False, verbose=0, validation_data=val,
                    **fit_kwargs)
    return fm, km, fh, kh


@pytest.mark.parametrize("fit_kwargs", [
    {"batch_size": None},
    {"batch_size": 16, "steps_per_epoch": 3},
    {"batch_size": 16, "steps_per_epoch": 5},
    {"batch_size": 16, "steps_per_epoch": 7},
    {"batch_size": 8, "validation_freq": 2},
    {"batch_size": 8, "validation_freq": [1, 3]},
    {"batch_size": 8, "validation_batch_size": 7},
])
def test_fit_keras_arguments_match_keras(fit_kwargs):
    fm, km, fh, kh = _fit_both(fit_kwargs)
    assert fm.optimizer.iterations == int(km.optimizer.iterations)
    for key in ("loss", "val_loss", "val_accuracy"):
        assert len(fh.history[key]) == len(kh.history[key]), key
        _close(fh.history[key], kh.history[key], rtol=5e-5)
    _close(fm.get_weights(), km.get_weights(), rtol=5e-5, atol=5e-6)


def test_compile_takes_keras_arguments_where_harmless():
    fm, _ = _pair()
    fm.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"],
               loss_weights=None, weighted_metrics=[], run_eagerly=True, jit_compile=False,
               steps_per_execution=4, auto_scale_loss=True)
    for kwargs, exc, name in (({"loss_weights": [2.0]}, ValueError, "loss_weights"),
                              ({"weighted_metrics": ["accuracy"]}, ValueError,
                               "weighted_metrics"),
                              ({"run_eagerly": "yes"}, TypeError, "run_eagerly"),
                              ({"jit_compile": "xla"}, ValueError, "jit_compile"),
                              ({"steps_per_execution": 0}, ValueError, "steps_per_execution")):
        opt = fm.optimizer
        with pytest.raises(exc, match=name):
            fm.compile(optimizer="sgd", loss="mse", **kwargs)
        assert fm.optimizer is opt


# ---------------------------------------------------------------------------
# 8. BatchNormalization on a one-row batch
# ---------------------------------------------------------------------------

def test_batch_normalization_one_row_batch_matches_keras():
    keras = _keras()
    x, y = _data()
    fm, km = _pair()
    for f, k in ((fm, km),):
        f.compile(fg.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
        k.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    # the layer's output for one row in training is beta; no gradient below it
    fl = fm.train_on_batch(x[:1], y[:1])
    kl = km.train_on_batch(x[:1], y[:1])
    _close([fl], [kl])
    _close(fm.get_weights(), km.get_weights(), rtol=1e-5, atol=1e-7)
    # 65 rows at batch 32: a last batch of one row, trained in both
    fh = fm.fit(x, y, epochs=2, batch_size=32, shuffle=False, verbose=0)
    kh = km.fit(x, y, epochs=2, batch_size=32, shuffle=False, verbose=0)
    assert fm.optimizer.iterations == int(km.optimizer.iterations) == 7
    _close(fh.history["loss"], kh.history["loss"], rtol=5e-5)
    _close(fm.get_weights(), km.get_weights(), rtol=5e-5, atol=5e-6)


def test_save_and_load_keep_frozen_layers_frozen(tmp_path):
    x, y = _data()
    m = fg.Sequential([fg.Input(shape=(4,)), Dense(8, activation="relu"), Dense(3)], seed=0)
    m.layers[0].trainable = False
    m.compile("adam", "sparse_categorical_crossentropy")
    path = str(tmp_path / "m.fgm")
    m.save(path)
    loaded = fg.load_model(path)
    assert not loaded.layers[0].trainable and loaded.layers[1].trainable
    before = loaded.get_weights()
    loaded.fit(x, y, epochs=1, verbose=0)
    after = loaded.get_weights()
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    assert not np.array_equal(before[2], after[2])


def test_save_model_functions_write_files_the_other_library_reads(tmp_path):
    """keras.models.save_model / keras.saving.save_model (Keras's names,
    with filepath= and overwrite=) and model.save(filepath, overwrite=True):
    each library reads the other's file and predicts the same."""
    keras = _keras()
    pytest.importorskip("h5py", reason="needs h5py, the keras extra: pip install '.[keras]'")
    x, y = _data()
    fm, km = _pair()
    _compile_both(fm, km)
    for m in (fm, km):   # the optimizer's state exists in both files
        m.fit(x, y, epochs=1, shuffle=False, verbose=0)
    ours, theirs = str(tmp_path / "ours.keras"), str(tmp_path / "theirs.keras")
    assert fg.models.save_model is fg.saving.save_model
    fg.models.save_model(fm, filepath=ours, overwrite=True)
    fm.save(ours, overwrite=True)   # replaced
    keras.saving.save_model(km, theirs, overwrite=True)
    _close([keras.models.load_model(ours).predict(x, verbose=0)], [fm.predict(x)])
    _close([fg.models.load_model(theirs).predict(x)], [km.predict(x, verbose=0)])
