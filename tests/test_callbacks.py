"""Tests of callbacks and of what fit prints.

Expected values come from a reference implementation of Keras'
EarlyStopping rule, NumPy forward passes from the recorded weights, and the
documented hook order.

Layout of this file:
  3. callbacks ....... hook order, EarlyStopping, TerminateOnNaN,
                       LearningRateScheduler, ModelCheckpoint
  4. verbose ......... what fit prints
"""
import math
import os
import re
import sys
import warnings

import numpy as np
import pytest
from _models import (
    F32,
    Inject,
    Recorder,
    assert_model_state,
    assert_same_bits,
    batch_slices,
    blobs,
    mlp,
    model_state,
    same_bits,
)

import fastgrad as fg
import fastgrad.saving
from fastgrad.layers import Dense

# ---------------------------------------------------------------------------
# 3. callbacks
# ---------------------------------------------------------------------------

def test_callback_hook_order_and_counts():
    n, bs, epochs = 100, 32, 3
    x, y = blobs(n)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy")
    r1, r2 = Recorder(), Recorder()
    model.fit(x, y, epochs=epochs, batch_size=bs, verbose=0, callbacks=[r1, r2])
    nb = math.ceil(n / bs)
    expected = [("train_begin",)]
    for e in range(epochs):
        expected.append(("epoch_begin", e))
        for b in range(nb):
            expected += [("batch_begin", b), ("batch_end", b)]
        expected.append(("epoch_end", e))
    expected.append(("train_end",))
    assert r1.events == expected
    assert r2.events == expected
    assert r1.model is model and r2.model is model
    # epoch logs carry the loss
    assert all("loss" in r1.epoch_logs[e] for e in range(epochs))
    # the base class's hooks all exist and do nothing
    cb = fg.callbacks.Callback()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    assert cb.model is model


class KerasStyle(fg.callbacks.Callback):
    """Overrides only the Keras 3 names of the batch hooks."""

    def __init__(self):
        super().__init__()
        self.events = []

    def on_train_batch_begin(self, batch, logs=None):
        self.events.append(("train_batch_begin", batch))

    def on_train_batch_end(self, batch, logs=None):
        self.events.append(("train_batch_end", batch, logs["loss"]))


class BothNames(Recorder):
    """Overrides on_train_batch_end and hands on to on_batch_end, as a Keras
    subclass calling super() does."""

    def on_train_batch_end(self, batch, logs=None):
        self.events.append(("train_batch_end", batch))
        super().on_train_batch_end(batch, logs)


def test_keras_batch_hooks_fire_and_default_to_the_old_names():
    n, bs, epochs = 50, 16, 2
    x, y = blobs(n)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy")
    keras_cb, old_names, both = KerasStyle(), Recorder(), BothNames()
    patched = fg.callbacks.Callback()
    patched_ends = []
    patched.on_batch_end = lambda batch, logs=None: patched_ends.append(batch)
    model.fit(x, y, epochs=epochs, batch_size=bs, verbose=0, shuffle=False,
              callbacks=[keras_cb, old_names, both, patched])
    nb = math.ceil(n / bs)
    assert [e[:2] for e in keras_cb.events] == [
        (k, b) for _ in range(epochs) for b in range(nb)
        for k in ("train_batch_begin", "train_batch_end")]
    losses = [e[2] for e in keras_cb.events if e[0] == "train_batch_end"]
    assert losses == old_names.batch_losses[0] + old_names.batch_losses[1]
    assert [e for e in old_names.events if "batch" in e[0]] == [
        (k, b) for _ in range(epochs) for b in range(nb) for k in ("batch_begin", "batch_end")]
    assert [e for e in both.events if "batch" in e[0]] == [
        e for _ in range(epochs) for b in range(nb)
        for e in (("batch_begin", b), ("train_batch_end", b), ("batch_end", b))]
    assert patched_ends == list(range(nb)) * epochs


def test_callbacks_get_the_keras_params_and_the_model():
    x, y = blobs(50)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy")
    cb = fg.callbacks.Callback()
    assert cb.params is None and cb.model is None
    h = model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[cb])
    assert cb.params == {"verbose": 0, "epochs": 3, "steps": 4}
    assert cb.model is model and h.params == cb.params and h.model is model
    model.fit(x, y, epochs=1, batch_size=50, verbose=2, callbacks=[cb])
    assert cb.params == {"verbose": 2, "epochs": 1, "steps": 1}


def keras_early_stopping(values, mode, min_delta, patience):
    """Keras 3's rule: returns (stopped_epoch or None, best_epoch)."""
    best, best_epoch, wait = None, None, 0
    for epoch, v in enumerate(values):
        wait += 1
        if best is None or (v + min_delta < best if mode == "min" else v - min_delta > best):
            best, best_epoch, wait = v, epoch, 0
            continue
        if wait >= patience and epoch > 0:
            return epoch, best_epoch
    return None, best_epoch


class DummyModel:
    def __init__(self):
        self.stop_training = False
        self.epoch = None
        self.restored = []
        self.optimizer = None

    def get_weights(self):
        return [np.array([float(self.epoch)])]

    def set_weights(self, w):
        self.restored.append([a.copy() for a in w])


def drive_early_stopping(cb, values, key):
    d = DummyModel()
    cb.set_model(d)
    cb.on_train_begin()
    ran = 0
    for epoch, v in enumerate(values):
        d.epoch = epoch
        cb.on_epoch_begin(epoch)
        cb.on_epoch_end(epoch, {"loss": 1.0, "val_loss": 1.0, key: v})
        ran += 1
        if d.stop_training:
            break
    cb.on_train_end()
    return d, ran


@pytest.mark.parametrize("values,monitor,mode,min_delta,patience,stop,best", [
    ([1.0, 0.8, 0.79, 0.85, 0.9, 0.1], "val_loss", "min", 0.05, 2, 3, 1),
    ([1.0, 0.8, 0.79, 0.85, 0.9, 0.1], "val_loss", "min", 0.0, 2, 4, 2),
    ([1.0, 1.0], "val_loss", "min", 0.0, 0, 1, 0),             # equal is no improvement
    ([0.5, 0.6, 0.7, 0.65, 0.6, 0.55], "val_accuracy", "auto", 0.0, 2, 4, 2),  # auto: max
    ([0.5, 0.4, 0.3, 0.2], "val_loss", "max", 0.0, 1, 1, 0),
    ([3.0, 2.0, 1.0, 0.5], "val_loss", "auto", 0.0, 0, None, 3),  # never stops
    ([5.0, 4.0, 4.5, 3.0, 3.5, 3.2, 3.1], "loss", "min", 0.0, 3, 6, 3),
])
def test_early_stopping_driven_directly(values, monitor, mode, min_delta, patience, stop, best):
    resolved = mode if mode != "auto" else ("max" if "acc" in monitor else "min")
    assert keras_early_stopping(values, resolved, min_delta, patience) == (stop, best)
    cb = fg.callbacks.EarlyStopping(monitor=monitor, min_delta=min_delta, patience=patience,
                                    mode=mode, restore_best_weights=True)
    d, ran = drive_early_stopping(cb, values, monitor)
    if stop is None:
        assert ran == len(values) and not d.stop_training
    else:
        assert ran == stop + 1 and d.stop_training
        assert cb.stopped_epoch == stop
        assert len(d.restored) == 1 and d.restored[0][0][0] == best
    assert cb.best_epoch == best
    # without restore_best_weights nothing is put back
    cb2 = fg.callbacks.EarlyStopping(monitor=monitor, min_delta=min_delta, patience=patience,
                                     mode=mode)
    d2, ran2 = drive_early_stopping(cb2, values, monitor)
    assert ran2 == ran and d2.restored == []


def test_early_stopping_matches_reference_on_random_sequences():
    rng = np.random.default_rng(0)
    for trial in range(300):
        # multiples of 1/8: every comparison is exact in binary floating point
        values = list(rng.integers(0, 16, rng.integers(2, 12)) / 8.0)
        mode = ["min", "max"][trial % 2]
        min_delta = float(rng.integers(0, 3)) / 8.0
        patience = int(rng.integers(0, 4))
        stop, best = keras_early_stopping(values, mode, min_delta, patience)
        cb = fg.callbacks.EarlyStopping(monitor="m", min_delta=min_delta, patience=patience,
                                        mode=mode, restore_best_weights=True)
        d, ran = drive_early_stopping(cb, values, "m")
        assert ran == (len(values) if stop is None else stop + 1), (values, mode, min_delta,
                                                                    patience)
        if stop is not None:
            assert d.restored[-1][0][0] == best, (values, mode, min_delta, patience)
    # the instance can be reused: on_train_begin resets it
    cb = fg.callbacks.EarlyStopping(monitor="m", patience=0)
    drive_early_stopping(cb, [1.0, 2.0], "m")
    d, ran = drive_early_stopping(cb, [5.0, 4.0, 3.0], "m")
    assert ran == 3 and not d.stop_training


def test_early_stopping_without_its_metric_warns_and_training_goes_on():
    """Keras 3: EarlyStopping() (val_loss) without validation data warns
    each epoch, naming the metric and the logged ones, and never stops."""
    x, y = blobs(60)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    es = fg.callbacks.EarlyStopping(patience=0)
    with pytest.warns(UserWarning) as record:
        h = model.fit(x, y, epochs=3, verbose=0, callbacks=[es])
    assert len(h.history["loss"]) == 3 and model.optimizer.iterations == 6
    messages = [str(w.message) for w in record]
    assert len(messages) == 3
    assert all("'val_loss'" in m and "loss" in m and "accuracy" in m for m in messages)
    # with the metric there, the same callback works as usual
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(x, y, epochs=2, verbose=0, validation_split=0.2, callbacks=[es])


def test_early_stopping_through_fit_restores_the_best_weights():
    x, y = blobs(64)
    model = mlp()
    model.compile(fg.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    seq = [0.9, 0.5, 0.6, 0.55, 0.7, 0.1, 0.1, 0.1]
    inj = Inject("crafted", seq)
    es = fg.callbacks.EarlyStopping(monitor="crafted", patience=3, mode="min",
                                    restore_best_weights=True)
    h = model.fit(x, y, epochs=len(seq), batch_size=16, verbose=0, callbacks=[inj, es])
    stop, best = keras_early_stopping(seq, "min", 0.0, 3)
    assert (stop, best) == (4, 1)
    assert len(h.history["loss"]) == stop + 1
    assert model.optimizer.iterations == (stop + 1) * 4
    assert_same_bits(model.get_weights(), inj.weights[best])
    assert not same_bits(inj.weights[stop], inj.weights[best])
    # monitoring a real logged value (val_loss) also works
    m2 = mlp()
    m2.compile(fg.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    es2 = fg.callbacks.EarlyStopping(monitor="val_loss", patience=1, min_delta=1e9)
    h2 = m2.fit(x, y, epochs=10, verbose=0, validation_data=(x, y), callbacks=[es2])
    assert len(h2.history["loss"]) == 2   # nothing improves by 1e9: stops at epoch 1


def test_terminate_on_nan_driven_directly(capsys):
    cb = fg.callbacks.TerminateOnNaN()
    d = DummyModel()
    cb.set_model(d)
    for v in (1.0, 1e300, -5.0):
        cb.on_batch_end(0, {"loss": v})
        assert not d.stop_training
    for v in (float("nan"), float("inf"), -float("inf")):
        d.stop_training = False
        cb.on_batch_end(3, {"loss": v})
        assert d.stop_training


def test_terminate_on_nan_stops_an_exploding_fit():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype(F32)
    y = rng.standard_normal((64, 1)).astype(F32)

    def run(cbs):
        m = fg.Sequential([Dense(8, input_dim=4), Dense(1)], seed=0)
        m.compile(fg.optimizers.SGD(learning_rate=100.0), "mse")
        rec = Recorder()
        h = m.fit(x, y, epochs=5, batch_size=8, verbose=0, callbacks=cbs + [rec])
        return m, h, rec

    _, _h0, rec0 = run([])
    losses = [l for e in sorted(rec0.batch_losses) for l in rec0.batch_losses[e]]
    bad = [i for i, l in enumerate(losses) if not math.isfinite(l)]
    assert bad, "the learning rate does not make the loss explode"
    first = bad[0]
    m, h, rec = run([fg.callbacks.TerminateOnNaN()])
    ran = [l for e in sorted(rec.batch_losses) for l in rec.batch_losses[e]]
    assert len(ran) == first + 1
    assert not math.isfinite(ran[-1])
    assert len(h.history["loss"]) == first // 8 + 1     # the stopping epoch is logged
    assert rec.events[-1] == ("train_end",)
    assert all(np.isfinite(w).all() for w in m.get_weights())


def test_learning_rate_scheduler_sets_the_rate_per_epoch():
    x, y = blobs(90)
    bs, epochs = 32, 4
    rates = [0.2 * 0.5 ** e for e in range(epochs)]
    model = mlp()
    model.compile(fg.optimizers.SGD(0.7), "sparse_categorical_crossentropy")
    sched = fg.callbacks.LearningRateScheduler(lambda epoch: 0.2 * 0.5 ** epoch)
    rec = Recorder()
    model.fit(x, y, epochs=epochs, batch_size=bs, shuffle=False, verbose=0,
              callbacks=[sched, rec])
    assert [rec.lr_at_epoch_begin[e] for e in range(epochs)] == pytest.approx(rates,
                                                                               rel=1e-15)
    assert model.optimizer.learning_rate == pytest.approx(rates[-1], rel=1e-15)
    # the same as SGD at those rates, step by step
    ref = mlp()
    ref.compile(fg.optimizers.SGD(rates[0]), "sparse_categorical_crossentropy")
    for e in range(epochs):
        ref.optimizer.learning_rate = rates[e]
        for s in batch_slices(90, bs):
            ref.train_on_batch(x[s], y[s])
    assert_same_bits(model.get_weights(), ref.get_weights())
    # a constant rate would give other weights
    other = mlp()
    other.compile(fg.optimizers.SGD(0.2), "sparse_categorical_crossentropy")
    other.fit(x, y, epochs=epochs, batch_size=bs, shuffle=False, verbose=0)
    assert not same_bits(model.get_weights(), other.get_weights())

    # the two-argument form receives the current rate
    seen = []

    def halve(epoch, lr):
        seen.append((epoch, lr))
        return lr / 2

    m2 = mlp()
    m2.compile(fg.optimizers.SGD(0.4), "sparse_categorical_crossentropy")
    m2.fit(x, y, epochs=3, verbose=0, callbacks=[fg.callbacks.LearningRateScheduler(halve)])
    assert [e for e, _ in seen] == [0, 1, 2]
    assert [lr for _, lr in seen] == pytest.approx([0.4, 0.2, 0.1], rel=1e-15)
    assert m2.optimizer.learning_rate == pytest.approx(0.05, rel=1e-15)


def test_learning_rate_scheduler_refuses_an_optimizer_with_a_schedule():
    """Keras raises TypeError rather than replace a schedule with a float."""
    x, y = blobs(60)
    model = mlp()
    sched = fg.schedules.CosineDecay(0.01, 100)
    model.compile(fg.optimizers.Adam(sched), "sparse_categorical_crossentropy")
    before = model_state(model)
    cb = fg.callbacks.LearningRateScheduler(lambda epoch, lr: 0.1)
    with pytest.raises(TypeError, match=r"learning_rate.*CosineDecay"):
        model.fit(x, y, epochs=2, verbose=0, callbacks=[cb])
    assert_model_state(model, before)
    assert model.optimizer._learning_rate is sched
    model.fit(x, y, epochs=1, verbose=0)      # trains on with its schedule


def test_optimizer_learning_rate_assignment_follows_keras():
    opt = fg.optimizers.SGD(fg.schedules.ExponentialDecay(0.1, 10, 0.5))
    with pytest.raises(TypeError, match=r"learning_rate.*ExponentialDecay"):
        opt.learning_rate = 0.01
    assert isinstance(opt._learning_rate, fg.schedules.ExponentialDecay)
    opt.learning_rate = fg.schedules.PiecewiseConstantDecay([5], [0.2, 0.1])  # allowed
    assert opt.current_learning_rate() == 0.2
    opt = fg.optimizers.SGD(0.1)
    opt.learning_rate = 0.05
    assert opt.learning_rate == 0.05 and opt.get_config()["learning_rate"] == 0.05
    for bad in (-0.1, float("nan"), "fast", None):
        with pytest.raises((ValueError, TypeError), match="learning_rate"):
            opt.learning_rate = bad
    assert opt.learning_rate == 0.05
    opt.learning_rate = fg.schedules.CosineDecay(0.1, 10)
    assert opt.current_learning_rate() == pytest.approx(0.1)


def test_learning_rate_scheduler_rate_is_in_the_history():
    """Keras' LearningRateScheduler adds "learning_rate" to the epoch logs,
    and History (which Keras runs after the user's callbacks) records it."""
    x, y = blobs(40)
    model = mlp()
    model.compile(fg.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    rec = Recorder()
    h = model.fit(x, y, epochs=3, verbose=0, callbacks=[
        fg.callbacks.LearningRateScheduler(lambda e: 0.1 / (e + 1)), rec])
    rates = [0.1 / (e + 1) for e in range(3)]
    assert [rec.epoch_logs[e]["learning_rate"] for e in range(3)] == pytest.approx(rates)
    assert "learning_rate" in h.history, sorted(h.history)
    assert h.history["learning_rate"] == pytest.approx(rates)


def test_model_checkpoint_every_epoch(tmp_path):
    x, y = blobs(64)
    xv, yv = blobs(20, seed=3)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    rec = Recorder()
    pattern = str(tmp_path / "ck-{epoch}.fgm")
    ck = fg.callbacks.ModelCheckpoint(pattern, save_best_only=False)
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, validation_data=(xv, yv),
              callbacks=[ck, rec])
    assert sorted(os.listdir(tmp_path)) == ["ck-1.fgm", "ck-2.fgm", "ck-3.fgm"]
    for e in range(3):
        loaded = fg.load_model(str(tmp_path / f"ck-{e + 1}.fgm"))
        assert_same_bits(loaded.get_weights(), rec.epoch_weights[e])
        assert loaded.optimizer.iterations == (e + 1) * 4
    # logged values in the name
    ck2 = fg.callbacks.ModelCheckpoint(str(tmp_path / "v-{epoch:02d}-{val_loss:.4f}.fgm"),
                                       monitor="val_loss")
    h = model.fit(x, y, epochs=2, verbose=0, validation_data=(xv, yv), callbacks=[ck2])
    for e in range(2):
        assert (tmp_path / f"v-{e + 1:02d}-{h.history['val_loss'][e]:.4f}.fgm").is_file()


def test_model_checkpoint_save_best_only(tmp_path):
    x, y = blobs(48)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy")
    seq = [3.0, 1.0, 2.0, 0.5, 0.5, 0.7]
    inj = Inject("crafted", seq)
    ck = fg.callbacks.ModelCheckpoint(str(tmp_path / "best-{epoch}.fgm"), monitor="crafted",
                                      mode="min", save_best_only=True)
    model.fit(x, y, epochs=len(seq), batch_size=16, verbose=0, callbacks=[inj, ck])
    improved = [e for e in range(len(seq)) if seq[e] < min(seq[:e], default=math.inf)]
    assert improved == [0, 1, 3]
    assert sorted(os.listdir(tmp_path)) == sorted(f"best-{e + 1}.fgm" for e in improved)
    for e in improved:
        assert_same_bits(fg.load_model(str(tmp_path / f"best-{e + 1}.fgm")).get_weights(),
                         inj.weights[e])
    # one fixed file: it ends holding the best epoch's weights; max mode
    seq2 = [0.1, 0.3, 0.2, 0.25]
    inj2 = Inject("score", seq2)
    path = tmp_path / "fixed.fgm"
    ck2 = fg.callbacks.ModelCheckpoint(str(path), monitor="score", mode="max",
                                       save_best_only=True)
    model.fit(x, y, epochs=4, verbose=0, callbacks=[inj2, ck2])
    assert_same_bits(fg.load_model(str(path)).get_weights(), inj2.weights[1])


def test_model_checkpoint_best_only_without_its_metric_warns_and_saves(tmp_path):
    """Keras 3: save_best_only with val_loss but no validation data warns each
    epoch and saves as without save_best_only; training goes on."""
    x, y = blobs(48)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy")
    ck = fg.callbacks.ModelCheckpoint(str(tmp_path / "e{epoch}.fgm"), save_best_only=True)
    with pytest.warns(UserWarning, match="'val_loss' available") as record:
        h = model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[ck])
    assert len(record) == 2 and len(h.history["loss"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["e1.fgm", "e2.fgm"]
    np.testing.assert_array_equal(fg.load_model(tmp_path / "e2.fgm").predict(x),
                                  model.predict(x))


def test_model_checkpoint_best_only_without_its_metric_saves_as_keras_does(tmp_path):
    keras = pytest.importorskip("keras", reason="needs Keras 3 with JAX, the cross-check "
                                "peers: pip install '.[peers]'")
    x, y = blobs(48)
    k = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(3)])
    k.compile("adam", "sparse_categorical_crossentropy")
    ck = keras.callbacks.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), save_best_only=True)
    with pytest.warns(UserWarning, match="val_loss available"):
        k.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[ck])
    assert sorted(os.listdir(tmp_path)) == ["e1.keras", "e2.keras"]


def test_model_checkpoint_save_freq_and_weights_only_agree_with_keras(tmp_path):
    """save_freq=n (batches counted across epochs, {batch} in the name),
    save_weights_only and initial_value_threshold: the same files as Keras
    writes, holding the same weights, from the same initial weights."""
    keras = pytest.importorskip("keras", reason="needs Keras 3 with JAX, the cross-check "
                                "peers: pip install '.[peers]'")
    pytest.importorskip("h5py", reason="needs h5py, the keras extra: pip install '.[keras]'")
    x, y = blobs(48)
    written = {}
    for lib in (keras, fg):
        folder = tmp_path / lib.__name__
        folder.mkdir()
        if lib is keras:
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                                      keras.layers.Dense(3, activation="softmax")])
            model.set_weights(mlp().get_weights())
        else:
            model = mlp()
        model.compile(lib.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
        checkpoints = [
            lib.callbacks.ModelCheckpoint(str(folder / "b-{epoch}-{batch}.keras"), save_freq=2),
            lib.callbacks.ModelCheckpoint(str(folder / "w-{epoch}.weights.h5"), monitor="loss",
                                          save_best_only=True, save_weights_only=True,
                                          initial_value_threshold=1e9),
            lib.callbacks.ModelCheckpoint(str(folder / "never.weights.h5"), monitor="loss",
                                          save_best_only=True, save_weights_only=True,
                                          initial_value_threshold=0.0)]
        model.fit(x, y, epochs=3, batch_size=16, shuffle=False, verbose=0, callbacks=checkpoints)
        names = sorted(os.listdir(folder))
        fresh = mlp(seed=9)
        weights = {}
        for name in names:   # each file read into a fresh fastgrad model
            if name.endswith(".weights.h5"):
                fresh.load_weights(str(folder / name))
                weights[name] = fresh.get_weights()
            else:
                weights[name] = fg.load_model(str(folder / name)).get_weights()
        written[lib.__name__] = weights
    assert sorted(written["fastgrad"]) == sorted(written["keras"]) == [
        "b-1-2.keras", "b-2-1.keras", "b-2-3.keras", "b-3-2.keras",
        "w-1.weights.h5", "w-2.weights.h5", "w-3.weights.h5"]
    for name, theirs in written["keras"].items():
        for a, b in zip(written["fastgrad"][name], theirs):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_model_checkpoint_refuses_bad_arguments_by_name(tmp_path):
    with pytest.raises(ValueError, match="save_freq"):
        fg.callbacks.ModelCheckpoint(str(tmp_path / "m.keras"), save_freq="batch")
    with pytest.raises(ValueError, match="save_freq"):
        fg.callbacks.ModelCheckpoint(str(tmp_path / "m.keras"), save_freq=0)
    with pytest.raises(ValueError, match="filepath"):
        fg.callbacks.ModelCheckpoint(str(tmp_path / "m.keras"), save_weights_only=True)
    with pytest.raises(ValueError, match="initial_value_threshold"):
        fg.callbacks.ModelCheckpoint(str(tmp_path / "m.keras"), initial_value_threshold="x")


# ---------------------------------------------------------------------------
# 4. verbose
# ---------------------------------------------------------------------------

def _fit_printing(capsys, verbose, epochs=3):
    x, y = blobs(70)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    capsys.readouterr()
    h = model.fit(x, y, epochs=epochs, batch_size=16, verbose=verbose,
                  validation_data=(x[:20], y[:20]))
    return h, capsys.readouterr()


def test_verbose_0_prints_nothing(capsys):
    _, out = _fit_printing(capsys, 0)
    assert out.out == "" and out.err == ""
    x, y = blobs(20)
    m = mlp()
    m.compile("adam", "sparse_categorical_crossentropy")
    m.evaluate(x, y, verbose=0)
    m.predict(x)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def _epoch_line_values(line):
    return {k: float(v) for k, v in re.findall(r"(\w+): (-?[0-9.]+(?:e[-+]?\d+)?|nan|inf)",
                                               line)}


def test_verbose_2_prints_one_line_per_epoch(capsys):
    h, out = _fit_printing(capsys, 2, epochs=3)
    lines = out.out.strip("\n").split("\n")
    assert len(lines) == 3
    for e, line in enumerate(lines):
        assert "\r" not in line
        assert line.startswith(f"Epoch {e + 1}/3")
        vals = _epoch_line_values(line)
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert vals[key] == pytest.approx(h.history[key][e], abs=5.1e-5), key


def test_verbose_1_prints_and_ends_with_the_epoch_summary(capsys):
    h, out = _fit_printing(capsys, 1, epochs=2)
    assert out.out.strip()
    last = out.out.rstrip("\n").split("\n")[-1].split("\r")[-1]
    last = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", last)
    assert last.startswith("Epoch 2/2"), repr(last)
    vals = _epoch_line_values(last)
    assert vals["loss"] == pytest.approx(h.history["loss"][-1], abs=5.1e-5)
    assert vals["val_loss"] == pytest.approx(h.history["val_loss"][-1], abs=5.1e-5)
    assert "Epoch 1/2" in out.out


def test_verbose_1_with_a_live_bar_on_a_terminal(capsys, monkeypatch):
    """On a terminal (no tqdm needed) the bar is drawn with carriage returns;
    the output still ends with the epoch summary line."""
    x, y = blobs(70)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    capsys.readouterr()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    h = model.fit(x, y, epochs=2, batch_size=16, verbose=1)
    out = capsys.readouterr().out
    monkeypatch.undo()
    last = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.rstrip("\n").split("\n")[-1].split("\r")[-1])
    assert last.startswith("Epoch 2/2"), repr(out[-300:])
    assert _epoch_line_values(last)["loss"] == pytest.approx(h.history["loss"][-1], abs=5.1e-5)


def test_evaluate_verbose_prints_the_values(capsys):
    x, y = blobs(30)
    m = mlp()
    m.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    capsys.readouterr()
    loss, acc = m.evaluate(x, y)
    vals = _epoch_line_values(capsys.readouterr().out)
    assert vals["loss"] == pytest.approx(loss, abs=5.1e-5)
    assert vals["accuracy"] == pytest.approx(acc, abs=5.1e-5)


def test_the_progress_bar_is_tqdm_when_installed(monkeypatch, capsys):
    tqdm_mod = pytest.importorskip("tqdm", reason="needs the progress extra: "
                                                  "pip install '.[progress]'")
    made = []

    class Recording(tqdm_mod.tqdm):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            self.steps_seen = getattr(self, "steps_seen", 0) + n
            return super().update(n)

    monkeypatch.setattr(tqdm_mod, "tqdm", Recording)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3)).astype(np.float32)
    y = rng.integers(0, 2, 64)
    model = fg.Sequential([fg.layers.Dense(2, activation="softmax", input_dim=3)], seed=0)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=2, batch_size=16, verbose=1)
    # one bar per epoch, counting the epoch's four steps, labelled by epoch
    assert [bar.desc for bar in made] == ["Epoch 1/2", "Epoch 2/2"]
    assert [bar.steps_seen for bar in made] == [4, 4]
    assert all(bar.total == 4 for bar in made)
    assert "Epoch 2/2" in capsys.readouterr().out
