"""Tests of saving and loading: round trips, bit-identical resume, atomic
saves, and the loader against damaged, foreign and hostile files.

Model files are taken apart and rebuilt by hand from the documented layout
(an 8-byte magic, a version, the header length, a JSON header, the arrays).

Layout of this file:
  5. save / load ..... round trip, bit-identical resume, float64
  6. atomic save ..... failures during the write
  7. loader .......... damaged and foreign files
  8. hostile files ... overflowing sizes, unknown names, trailing bytes,
                       values that break training later; save faults
"""
import errno
import json
import os
import pickle
import re
import struct
import zipfile

import numpy as np
import pytest
from _models import (
    F32,
    F64,
    assert_same_bits,
    blobs,
    bn_dropout_model,
    classifier,
    mlp,
    np_accuracy,
    same_bits,
)

import fastgrad as fg
import fastgrad.saving
from fastgrad.layers import BatchNormalization, Dense, Dropout

# ---------------------------------------------------------------------------
# 5. save / load
# ---------------------------------------------------------------------------

def _resume_model(dtype="float32"):
    model = bn_dropout_model(seed=21, dtype=dtype)
    sched = fg.schedules.ExponentialDecay(0.02, decay_steps=5, decay_rate=0.8)
    model.compile(fg.optimizers.Adam(sched, global_clipnorm=0.5),
                  "sparse_categorical_crossentropy", ["accuracy"])
    return model


def _assert_same_model(a, b):
    assert_same_bits(a.get_weights(), b.get_weights())
    assert a.dtype == b.dtype and a.seed == b.seed and a.name == b.name
    assert [l.kind for l in a.layers] == [l.kind for l in b.layers]
    assert [l.get_config() for l in a.layers] == [l.get_config() for l in b.layers]
    if a.optimizer is None:
        assert b.optimizer is None
        return
    assert type(a.optimizer) is type(b.optimizer)
    assert a.optimizer.get_config() == b.optimizer.get_config()
    va, vb = a.optimizer.variables(), b.optimizer.variables()
    assert sorted(va) == sorted(vb)
    assert_same_bits([va[k] for k in sorted(va)], [vb[k] for k in sorted(vb)])
    assert a.optimizer.iterations == b.optimizer.iterations
    assert a.optimizer.skipped_steps == b.optimizer.skipped_steps
    assert type(a.loss) is type(b.loss) and a.loss.get_config() == b.loss.get_config()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_round_trip(tmp_path, dtype):
    x, y = blobs(60, d=5, dtype=F64 if dtype == "float64" else F32)
    model = _resume_model(dtype)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert any(np.any(v != 0) for v in model.optimizer.variables().values())
    path = tmp_path / "model.fgm"
    model.save(str(path))
    loaded = fg.load_model(str(path))
    _assert_same_model(model, loaded)
    assert loaded.get_weights()[0].dtype == np.dtype(dtype)
    p, q = model.predict(x), loaded.predict(x)
    assert p.dtype == q.dtype == np.dtype(dtype)
    assert p.tobytes() == q.tobytes()
    assert model.evaluate(x, y, verbose=0) == loaded.evaluate(x, y, verbose=0)
    # also through fg.models.load_model and a pathlib path
    _assert_same_model(model, fg.models.load_model(path))


def test_metric_objects_are_saved_with_their_configuration(tmp_path):
    x, labels = blobs(120, k=2, seed=4)
    y = labels.reshape(-1, 1).astype(F32)
    model = mlp(k=1, out_act="sigmoid", seed=1)
    model.compile(fg.optimizers.Adam(0.05), "mse",
                  metrics=[fg.metrics.BinaryAccuracy(threshold=0.9), "mae",
                           fg.metrics.MeanSquaredError()])
    model.fit(x, y, epochs=3, batch_size=32, verbose=0)
    path = tmp_path / "m.fgm"
    model.save(str(path))
    loaded = fg.load_model(str(path))
    acc = loaded.metrics[0]
    # a BinaryAccuracy with its threshold, not the accuracy the loss (mse) implies
    assert type(acc) is fg.metrics.BinaryAccuracy and acc.threshold == 0.9
    assert [type(m) for m in loaded.metrics] == [type(m) for m in model.metrics]
    assert loaded.evaluate(x, y, verbose=0) == model.evaluate(x, y, verbose=0)
    p = model.predict(x)
    assert model.evaluate(x, y, verbose=0)[1] == pytest.approx(
        np_accuracy("binary", p, y, threshold=0.9), abs=1e-12)
    # a saved model saves the same way again
    loaded.save(str(tmp_path / "again.fgm"))
    assert fg.load_model(str(tmp_path / "again.fgm")).metrics[0].threshold == 0.9


def test_files_with_metric_names_only_still_load(tmp_path, small_file):
    """Files written before metric objects were saved with their
    configuration hold names; they load as before."""
    data, _weights = small_file
    _, _, header, _ = split_file(data)
    assert header["compile"]["metrics"] == ["accuracy"]
    m = load_bytes(tmp_path, data)
    assert type(m.metrics[0]) is fg.metrics.SparseCategoricalAccuracy

    def bad(h):
        h["compile"]["metrics"] = [{"class_name": "F1Score", "config": {}}]

    with pytest.raises(ValueError, match="F1Score"):
        load_bytes(tmp_path, _edit(data, bad), "bad.fgm")

    def bad_threshold(h):
        h["compile"]["metrics"] = [{"class_name": "BinaryAccuracy",
                                    "config": {"threshold": 2.0}}]

    with pytest.raises(ValueError, match="threshold"):
        load_bytes(tmp_path, _edit(data, bad_threshold), "bad2.fgm")


def test_binary_accuracy_threshold_is_checked():
    for bad in (0.0, 1.0, -0.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="threshold"):
            fg.metrics.BinaryAccuracy(threshold=bad)


def test_save_load_uncompiled_and_overwrite(tmp_path):
    model = mlp(seed=3)
    model.build()
    path = str(tmp_path / "m.fgm")
    model.save(path)
    loaded = fg.load_model(path)
    _assert_same_model(model, loaded)
    x, y = blobs(40)
    assert model.predict(x).tobytes() == loaded.predict(x).tobytes()
    loaded.compile("adam", "sparse_categorical_crossentropy")
    loaded.fit(x, y, epochs=1, verbose=0)
    loaded.save(path)    # overwrites
    again = fg.load_model(path)
    _assert_same_model(loaded, again)
    assert not same_bits(again.get_weights(), model.get_weights())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_resume_after_save_is_bit_identical(tmp_path, dtype):
    x, y = blobs(150, d=5, dtype=F64 if dtype == "float64" else F32)
    xv, yv = blobs(30, d=5, seed=4)
    straight = _resume_model(dtype)
    hs = straight.fit(x, y, epochs=4, batch_size=32, shuffle=True, verbose=0,
                      validation_data=(xv, yv))

    first = _resume_model(dtype)
    h1 = first.fit(x, y, epochs=2, batch_size=32, shuffle=True, verbose=0,
                   validation_data=(xv, yv))
    path = str(tmp_path / "half.fgm")
    first.save(path)
    resumed = fg.load_model(path)
    h2 = resumed.fit(x, y, epochs=4, initial_epoch=2, batch_size=32, shuffle=True, verbose=0,
                     validation_data=(xv, yv))
    _assert_same_model(straight, resumed)
    assert max(hs.gradients["clip_rate"]) > 0      # global_clipnorm did act
    for k in hs.history:
        assert hs.history[k] == h1.history[k] + h2.history[k], k
    # the test can fail: without the random state (a fresh model with the same
    # weights and optimizer state) the shuffles and dropout masks differ
    fresh = _resume_model(dtype)
    fresh.set_weights(first.get_weights())
    for k, v in fresh.optimizer.variables().items():
        v[...] = first.optimizer.variables()[k]
    fresh.optimizer.iterations = first.optimizer.iterations
    fresh.fit(x, y, epochs=2, batch_size=32, shuffle=True, verbose=0)
    assert not same_bits(fresh.get_weights(), straight.get_weights())


@pytest.mark.parametrize("opt,loss,out", [
    (lambda: fg.optimizers.SGD(0.05, momentum=0.9, nesterov=True, clipnorm=0.5), "mse", None),
    (lambda: fg.optimizers.RMSprop(0.01, momentum=0.5, centered=True, clipvalue=0.1),
     "huber", None),
    (lambda: fg.optimizers.AdamW(fg.schedules.CosineDecay(0.01, 20, warmup_target=0.02,
                                                         warmup_steps=3), amsgrad=True),
     "binary_crossentropy", "sigmoid"),
    (lambda: fg.optimizers.Adagrad(0.1, weight_decay=0.01),
     fg.losses.BinaryCrossentropy(from_logits=True), None),
    (lambda: fg.optimizers.Adam(fg.schedules.PiecewiseConstantDecay([4, 8], [0.02, 0.01, 0.005])),
     "mae", "tanh"),
])
def test_resume_across_optimizers_losses_and_weight_options(tmp_path, opt, loss, out):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((50, 4)).astype(F32)
    y = (x[:, :1] * x[:, 1:2] > 0).astype(F32)

    def make():
        m = fg.Sequential([
            Dense(6, activation="elu", input_dim=4,
                  kernel_regularizer=fg.regularizers.L1L2(l1=0.001, l2=0.01),
                  kernel_constraint=fg.constraints.MaxNorm(1.5),
                  bias_constraint=fg.constraints.NonNeg()),
            Dropout(0.2),
            Dense(1, activation=out, kernel_initializer="he_uniform"),
        ], seed=12)
        m.compile(opt(), loss, metrics=["mae"])
        return m

    straight = make()
    straight.fit(x, y, epochs=4, batch_size=16, verbose=0)
    half = make()
    half.fit(x, y, epochs=2, batch_size=16, verbose=0)
    path = str(tmp_path / "h.fgm")
    half.save(path)
    resumed = fg.load_model(path)
    _assert_same_model(half, resumed)
    resumed.fit(x, y, epochs=2, batch_size=16, verbose=0)
    _assert_same_model(straight, resumed)


def test_saving_an_unbuilt_model_raises(tmp_path):
    model = fg.Sequential([Dense(3), Dense(2)])
    model.compile("adam", "mse")
    path = tmp_path / "unbuilt.fgm"
    with pytest.raises(ValueError):
        model.save(str(path))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# 6. atomic save
# ---------------------------------------------------------------------------

class _NumpyProxy:
    """Stands in for numpy inside fastgrad.saving: the arrays it returns for
    the data section fail in tobytes() on the ``fail_at``-th call."""

    def __init__(self, fail_at, exc):
        self.calls, self.fail_at, self.exc = 0, fail_at, exc

    def __getattr__(self, name):
        return getattr(np, name)

    def ascontiguousarray(self, a, dtype=None):
        arr = np.ascontiguousarray(a, dtype=dtype)
        if dtype is None:
            return arr
        proxy = self

        class Failing:
            def __getattr__(self, name):
                return getattr(arr, name)

            def tobytes(self):
                proxy.calls += 1
                if proxy.calls >= proxy.fail_at:
                    raise proxy.exc
                return arr.tobytes()

        return Failing()


def _boom(*a, **k):
    raise OSError("simulated disk failure")


@pytest.mark.parametrize("how", ["tobytes_first", "tobytes_late", "tobytes_interrupt",
                                 "fsync", "replace"])
def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch, how):
    x, y = blobs(64)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, verbose=0)
    path = tmp_path / "model.fgm"
    model.save(str(path))
    old = model.get_weights()
    old_bytes = path.read_bytes()
    model.fit(x, y, epochs=2, verbose=0)
    assert not same_bits(old, model.get_weights())

    exc_type = OSError
    if how.startswith("tobytes"):
        exc_type = KeyboardInterrupt if how == "tobytes_interrupt" else OSError
        proxy = _NumpyProxy({"tobytes_first": 1, "tobytes_late": 4,
                             "tobytes_interrupt": 3}[how], exc_type("simulated"))
        monkeypatch.setattr(fastgrad.saving, "np", proxy)
    elif how == "fsync":
        monkeypatch.setattr(fastgrad.saving.os, "fsync", _boom)
    else:
        monkeypatch.setattr(fastgrad.saving.os, "replace", _boom)
    with pytest.raises(exc_type):
        model.save(str(path))
    if how.startswith("tobytes"):
        assert proxy.calls >= 1
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model.fgm"]          # no temporary file left
    assert path.read_bytes() == old_bytes
    assert_same_bits(fg.load_model(str(path)).get_weights(), old)
    # and a failed save to a new name leaves nothing at all
    monkeypatch.setattr(fastgrad.saving.os, "replace", _boom)
    with pytest.raises(OSError):
        model.save(str(tmp_path / "new.fgm"))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model.fgm"]
    # a save that works replaces the file
    model.save(str(path))
    assert_same_bits(fg.load_model(str(path)).get_weights(), model.get_weights())
    assert os.listdir(tmp_path) == ["model.fgm"]


# ---------------------------------------------------------------------------
# 7. the loader against damaged and foreign files
# ---------------------------------------------------------------------------

PREFIX = struct.Struct("<8sIQ")   # magic, version, header_len (documented layout)


def split_file(data):
    magic, version, hlen = PREFIX.unpack_from(data)
    base = PREFIX.size + hlen
    return magic, version, json.loads(data[PREFIX.size:base].decode("utf-8")), data[base:]


def join_file(header, body, magic=b"FGMODEL\0", version=1, header_len=None, text=None):
    """A model file from its parts; text, if given, is the header verbatim."""
    blob = (text if text is not None else json.dumps(header)).encode("utf-8")
    hl = len(blob) if header_len is None else header_len
    return PREFIX.pack(magic, version, hl) + blob + body


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    """A small trained model with BN and Dropout, Adam with a schedule."""
    x, y = blobs(40, d=3, k=2, seed=1)
    model = fg.Sequential([Dense(4, activation="relu", input_dim=3), BatchNormalization(),
                           Dropout(0.25), Dense(2, activation="softmax")], seed=1)
    model.compile(fg.optimizers.Adam(fg.schedules.ExponentialDecay(0.01, 10, 0.9)),
                  "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = tmp_path_factory.mktemp("small") / "small.fgm"
    model.save(str(path))
    return path.read_bytes(), model.get_weights()


def load_bytes(tmp_path, data, name="m.fgm"):
    p = tmp_path / name
    p.write_bytes(data)
    return fg.load_model(str(p))


def test_rebuilt_file_loads(tmp_path, small_file):
    """Control for the tests below: taking the file apart and putting it
    together again by hand gives a loadable file with the same weights."""
    data, weights = small_file
    magic, version, header, body = split_file(data)
    assert magic == b"FGMODEL\0" and version == 1
    assert_same_bits(load_bytes(tmp_path, data).get_weights(), weights)
    assert_same_bits(load_bytes(tmp_path, join_file(header, body)).get_weights(), weights)
    names = [e["name"] for e in header["arrays"]]
    assert any(n.endswith("kernel") for n in names)


def test_a_file_whose_schedule_has_no_name_loads(tmp_path, small_file):
    """Files written before schedules took Keras' name= still load."""
    data, weights = small_file

    def drop_name(h):
        del h["compile"]["optimizer"]["config"]["learning_rate"]["config"]["name"]

    m = load_bytes(tmp_path, _edit(data, drop_name))
    assert_same_bits(m.get_weights(), weights)
    assert m.optimizer._learning_rate.name == "ExponentialDecay"
    assert m.optimizer._learning_rate(7) == fg.schedules.ExponentialDecay(0.01, 10, 0.9)(7)


def test_truncated_files_raise_value_error(tmp_path, small_file):
    data, _ = small_file
    cuts = sorted(set(range(0, len(data), 7)) | {1, 8, 19, 20, len(data) - 1})
    for cut in cuts:
        with pytest.raises(ValueError):
            load_bytes(tmp_path, data[:cut])


def test_flipped_bytes_raise_value_error_or_load(tmp_path, small_file):
    data, _ = small_file
    base = len(data) - len(split_file(data)[3])
    loaded_positions = []
    for pos in range(0, len(data), 5):
        bad = bytearray(data)
        bad[pos] ^= 0xFF          # 0xFF never appears in UTF-8: a header hit must fail
        try:
            load_bytes(tmp_path, bytes(bad))
        except ValueError:
            continue
        loaded_positions.append(pos)
    assert all(p >= base for p in loaded_positions), \
        f"flips in the prefix/header loaded: {[p for p in loaded_positions if p < base]}"
    assert loaded_positions, "no flip in the array data loaded"


def test_single_bit_flips_in_the_header_raise_value_error_or_load(tmp_path, small_file):
    data, _ = small_file
    base = len(data) - len(split_file(data)[3])
    for pos in range(0, base, 3):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        try:
            load_bytes(tmp_path, bytes(bad))
        except ValueError:
            pass
        # any other exception fails the test


def _edit(data, fn):
    _magic, _version, header, body = split_file(data)
    header = json.loads(json.dumps(header))
    fn(header)
    return join_file(header, body)


def _array(header, suffix):
    return next(e for e in header["arrays"] if e["name"].endswith(suffix))


def _set_layer(header, i, **kw):
    header["model"]["config"]["layers"][i].update(kw)


def _swap_kernel_shape(h):
    e = _array(h, "dense/kernel")
    e["shape"] = e["shape"][::-1]


def _shrink_nbytes(h):
    _array(h, "dense/kernel")["nbytes"] -= 4


def _shape_without_nbytes(h):
    _array(h, "dense/kernel")["shape"][1] += 1


def _overlap(h):
    h["arrays"][1]["offset"] = h["arrays"][0]["offset"]


def _unknown_layer(h):
    _set_layer(h, 0, class_name="Lambda")


def _layer_with_code(h):
    h["model"]["config"]["layers"][3]["config"]["function"] = "__import__('os').system('x')"


def _dup_array_name(h):
    h["arrays"][1]["name"] = h["arrays"][0]["name"]


def _bad_dtype(h):
    _array(h, "dense/kernel")["dtype"] = "object"


def _negative_offset(h):
    h["arrays"][0]["offset"] = -64


def _float_shape(h):
    _array(h, "dense/kernel")["shape"] = [3.0, 4.0]


def _bool_shape(h):
    _array(h, "dense/bias")["shape"] = [True] * 4


def _giant_units(h):
    # claims 2**45 units: more memory than any address space
    h["model"]["config"]["layers"][0]["config"]["units"] = 2 ** 45


def _missing_weight(h):
    h["arrays"] = [e for e in h["arrays"] if not e["name"].endswith("dense/bias")]


def _bad_rng(h):
    h["rng"] = {"bit_generator": "MT19937", "state": {}}


def _rng_not_dict(h):
    h["rng"] = "PCG64"


def _bad_rng_state(h):
    h["rng"]["state"] = {"state": "zero", "inc": []}


def _bad_dropout_counter(h):
    for v in h["layers_random"].values():
        v["counter"] = -1


def _missing_layers_random(h):
    del h["layers_random"]


def _bad_optimizer(h):
    h["compile"]["optimizer"]["class_name"] = "os.system"


def _bad_loss(h):
    h["compile"]["loss"]["class_name"] = "Eval"


def _bad_lr(h):
    h["compile"]["optimizer"]["config"]["learning_rate"] = -1.0


def _bad_schedule(h):
    h["compile"]["optimizer"]["config"]["learning_rate"] = {"class_name": "Eval", "config": {}}


def _bad_iterations(h):
    h["compile"]["iterations"] = -3


def _bad_metric(h):
    h["compile"]["metrics"] = ["nope"]


def _bad_dtype_model(h):
    h["model"]["config"]["dtype"] = "float16"


def _bad_model_class(h):
    h["model"]["class_name"] = "Functional"


def _bad_format(h):
    h["format"] = "something.else"


def _layers_not_list(h):
    h["model"]["config"]["layers"] = 7


def _arrays_not_list(h):
    h["arrays"] = {"a": 1}


def _array_entry_not_dict(h):
    h["arrays"][0] = "weights"


def _bad_input_dim(h):
    h["model"]["config"]["input_dim"] = 0


def _nan_momentum(h):
    h["model"]["config"]["layers"][1]["config"]["momentum"] = float("nan")


def _extra_array(h):
    last = h["arrays"][-1]
    h["arrays"].append(dict(last, name="extra", offset=last["offset"] + 10 ** 6))


@pytest.mark.parametrize("edit", [
    _swap_kernel_shape, _shrink_nbytes, _shape_without_nbytes, _overlap, _unknown_layer,
    _layer_with_code, _dup_array_name, _bad_dtype, _negative_offset, _float_shape,
    _bool_shape, _giant_units, _missing_weight, _bad_rng, _rng_not_dict, _bad_rng_state,
    _bad_dropout_counter, _missing_layers_random, _bad_optimizer, _bad_loss, _bad_lr,
    _bad_schedule, _bad_iterations, _bad_metric, _bad_dtype_model, _bad_model_class,
    _bad_format, _layers_not_list, _arrays_not_list, _array_entry_not_dict, _bad_input_dim,
    _nan_momentum, _extra_array,
], ids=lambda f: f.__name__.strip("_"))
def test_edited_headers_raise_value_error(tmp_path, small_file, edit):
    data, _ = small_file
    with pytest.raises(ValueError):
        load_bytes(tmp_path, _edit(data, edit))


def test_swapped_same_size_arrays_of_wrong_shape(tmp_path, small_file):
    """Shapes (3, 4) and (4, 3) hold the same bytes: only the architecture
    check can catch the swap."""
    data, _ = small_file
    bad = _edit(data, _swap_kernel_shape)
    with pytest.raises(ValueError, match="kernel"):
        load_bytes(tmp_path, bad)


def test_prefix_damage(tmp_path, small_file):
    data, _ = small_file
    magic, version, hlen = PREFIX.unpack_from(data)
    rest = data[PREFIX.size:]
    cases = {
        "version 2": PREFIX.pack(magic, 2, hlen) + rest,
        "version 0": PREFIX.pack(magic, 0, hlen) + rest,
        "version max": PREFIX.pack(magic, 2 ** 32 - 1, hlen) + rest,
        "magic": PREFIX.pack(b"FGMODEL\1", version, hlen) + rest,
        "magic lower": PREFIX.pack(b"fgmodel\0", version, hlen) + rest,
        "header_len = file": PREFIX.pack(magic, version, len(data)) + rest,
        "header_len + 1": PREFIX.pack(magic, version, len(data) - PREFIX.size + 1) + rest,
        "header_len huge": PREFIX.pack(magic, version, 2 ** 64 - 1) + rest,
        "header_len short": PREFIX.pack(magic, version, hlen - 5) + rest,
        "header_len 0": PREFIX.pack(magic, version, 0) + rest,
        "trailing 1": data + b"\0",
        "trailing 64": data + b"\0" * 64,
        "trailing text": data + b"#!/bin/sh\n",
        "deep json": PREFIX.pack(magic, version, 200000) + b"[" * 200000,
        "json list": join_file([1, 2], b""),
        "json null": join_file(None, b""),
        "json empty arrays": join_file({"arrays": []}, b""),
        "not utf-8": PREFIX.pack(magic, version, 4) + b"\xff\xfe\xfd\xfc",
    }
    for blob in cases.values():
        with pytest.raises(ValueError):
            load_bytes(tmp_path, blob)
    with pytest.raises(ValueError, match="version"):
        load_bytes(tmp_path, cases["version 2"])


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_foreign_files_raise_value_error(tmp_path):
    x = np.arange(12, dtype=F32).reshape(3, 4)
    np.savez(tmp_path / "a.npz", kernel=x, bias=x[0])
    np.save(tmp_path / "a.npy", x)
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("config.json", json.dumps({"class_name": "Sequential"}))
        z.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n")
    (tmp_path / "empty.fgm").write_bytes(b"")
    (tmp_path / "text.fgm").write_text("hello, I am not a model\n")
    (tmp_path / "h5.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    (tmp_path / "json.fgm").write_text(json.dumps({"format": "fastgrad.model"}))
    (tmp_path / "zeros.fgm").write_bytes(b"\0" * 4096)
    (tmp_path / "magic_only.fgm").write_bytes(b"FGMODEL\0")
    for name in ["a.npz", "a.npy", "a.zip", "empty.fgm", "text.fgm", "h5.h5", "json.fgm",
                 "zeros.fgm", "magic_only.fgm"]:
        with pytest.raises(ValueError):
            fg.load_model(str(tmp_path / name))
    # a folder
    with pytest.raises(ValueError):
        fg.load_model(str(tmp_path))


def test_pickle_files_are_never_unpickled(tmp_path):
    # control: unpickling this payload does create its marker file
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_Touch(str(control))))
    assert control.exists()
    marker = tmp_path / "marker"
    payload = pickle.dumps(_Touch(str(marker)))
    for _i, (name, blob) in enumerate([
        ("p.pkl", payload),
        ("p.fgm", payload),
        ("p2.fgm", pickle.dumps(_Touch(str(marker)), protocol=2)),
        ("magic-then-pickle.fgm", PREFIX.pack(b"FGMODEL\0", 1, len(payload)) + payload),
    ]):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError):
            fg.load_model(str(tmp_path / name))
        assert not marker.exists(), name
    # a .npy / .npz holding a pickled object array
    obj = np.empty(1, dtype=object)
    obj[0] = _Touch(str(marker))
    np.save(tmp_path / "obj.npy", obj, allow_pickle=True)
    np.savez(tmp_path / "obj.npz", w=obj)
    for name in ("obj.npy", "obj.npz"):
        with pytest.raises(ValueError):
            fg.load_model(str(tmp_path / name))
        assert not marker.exists(), name


# ---------------------------------------------------------------------------
# 8. hostile files: a larger model, every field pushed to its limit
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    rng = np.random.default_rng(51)
    x = rng.standard_normal((48, 10)).astype(F32)
    m = classifier()
    m.fit(x, rng.integers(0, 4, 48), epochs=1, batch_size=8, verbose=0)
    path = tmp_path_factory.mktemp("saved") / "model.fgm"
    m.save(str(path))
    return path.read_bytes(), m.get_weights()


def _entry(h, suffix="dense/kernel"):
    return next(e for e in h["arrays"] if e["name"].endswith(suffix))


def _set(key, value, suffix="dense/kernel"):
    def fn(h):
        _entry(h, suffix)[key] = value
    return fn


def test_control_the_saved_file_loads(tmp_path, saved):
    data, weights = saved
    assert same_bits(load_bytes(tmp_path, data).get_weights(), weights)
    _, _, header, body = split_file(data)
    assert same_bits(load_bytes(tmp_path, join_file(header, body)).get_weights(), weights)


@pytest.mark.parametrize("hlen", [2**63, 2**63 - 1, 2**62, 2**32 + 40, 2**64 - 2**32])
def test_header_length_that_would_overflow_is_refused(tmp_path, saved, hlen):
    data, _ = saved
    bad = PREFIX.pack(b"FGMODEL\0", 1, hlen) + data[PREFIX.size:]
    with pytest.raises(fastgrad.saving.ModelFileError, match=rf"header length {hlen}"):
        load_bytes(tmp_path, bad)


@pytest.mark.parametrize("what, fn, message", [
    ("nbytes 2**62", _set("nbytes", 2**62), r"holds 4611686018427387904 bytes"),
    ("nbytes 2**63", _set("nbytes", 2**63), r"holds 9223372036854775808 bytes"),
    ("nbytes 2**64 - 4", _set("nbytes", 2**64 - 4), r"holds \d+ bytes but its shape"),
    ("nbytes 2**64 + 24", _set("nbytes", 2**64 + 24), r"holds \d+ bytes but its shape"),
    # the product of the dims overflows int64: 2**96 elements; with nbytes the
    # wrapped-around product (0) and the true one
    ("shape 2**32 x 3, wrapped nbytes",
     lambda h: _entry(h).update(shape=[2**32, 2**32, 2**32], nbytes=0), r"need \d{20,}"),
    ("shape 2**32 x 3, true nbytes",
     lambda h: _entry(h).update(shape=[2**32, 2**32, 2**32], nbytes=2**96 * 4),
     r"extends past the end of the file"),
    ("shape 2**39 x 8", lambda h: _entry(h).update(shape=[2**39] * 8, nbytes=0),
     r"holds 0 bytes"),
    ("shape -> 2**63 elements, nbytes wraps to 0",
     lambda h: _entry(h).update(shape=[2**31, 2**32], nbytes=0), r"holds 0 bytes"),
    ("shape dim 2**40", lambda h: _entry(h).update(shape=[2**40, 1], nbytes=2**42),
     r"invalid shape"),
    ("shape dim 2**64", lambda h: _entry(h).update(shape=[2**64], nbytes=2**66),
     r"invalid shape"),
    ("shape 9 dims", lambda h: _entry(h).update(shape=[1] * 9), r"invalid shape"),
    ("negative dim", lambda h: _entry(h).update(shape=[-10, -16], nbytes=640),
     r"invalid shape"),
    ("offset 2**64 - 64", _set("offset", 2**64 - 64), r"extends past the end"),
    ("offset 2**63", _set("offset", 2**63), r"extends past the end"),
    ("offset + nbytes wraps",
     lambda h: _entry(h, "dense_1/bias").update(offset=2**64 - 8), r"extends past the end"),
    ("offset float", _set("offset", 64.0), r"invalid offset or size"),
    ("nbytes string", _set("nbytes", "160"), r"invalid offset or size"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_array_sizes_that_would_overflow_are_refused(tmp_path, saved, what, fn, message):
    data, _ = saved
    with pytest.raises(fastgrad.saving.ModelFileError, match=message):
        load_bytes(tmp_path, _edit(data, fn))


@pytest.mark.parametrize("dtype", ["float16", "<f4", "f4", "int32", "uint8", "complex64",
                                   "", "FLOAT32", None, 4, True, ["float32"],
                                   {"name": "float32"}],
                         ids=repr)
def test_unknown_array_dtypes_are_refused(tmp_path, saved, dtype):
    data, _ = saved
    with pytest.raises(fastgrad.saving.ModelFileError, match="unknown dtype"):
        load_bytes(tmp_path, _edit(data, _set("dtype", dtype)))


@pytest.mark.parametrize("name", ["Conv2D", "LSTM", "", "dense", "Layer", "Sequential",
                                  "__class__", "WeightSpec", "Dense ", None, 3,
                                  ["Dense"], {"a": 1}], ids=repr)
def test_unknown_layer_types_are_refused(tmp_path, saved, name):
    data, _ = saved

    def fn(h):
        h["model"]["config"]["layers"][1]["class_name"] = name

    with pytest.raises(fastgrad.saving.ModelFileError,
                       match=r"unknown layer type|invalid model description"):
        load_bytes(tmp_path, _edit(data, fn))


@pytest.mark.parametrize("tail", [b"\0", b"\0" * 63, b"\0" * 64, b"\0" * 4096,
                                  b"FGMODEL\0", "copy"], ids=repr)
def test_trailing_bytes_are_refused(tmp_path, saved, tail):
    data, _ = saved
    tail = data if tail == "copy" else tail
    with pytest.raises(fastgrad.saving.ModelFileError,
                       match=rf"{len(tail)} bytes after the last array"):
        load_bytes(tmp_path, data + tail)


def test_trailing_bytes_after_the_json_inside_the_header_are_refused(tmp_path, saved):
    data, _ = saved
    _, _, header, body = split_file(data)
    text = json.dumps(header)
    for junk in ["\0", " x", "}", "{}", " " * 7 + "\n\0"]:
        with pytest.raises(fastgrad.saving.ModelFileError, match="not valid JSON"):
            load_bytes(tmp_path, join_file(None, body, text=text + junk))


def test_numbers_too_long_to_convert_are_a_model_file_error(tmp_path, saved):
    """JSON integers of more digits than Python converts (4300 by default)
    must still give ModelFileError naming the file, like any damaged header."""
    data, _ = saved
    _, _, header, body = split_file(data)
    text = json.dumps(header, separators=(",", ":"))
    assert '"input_dim":10' in text
    for field in ('"input_dim":10', '"units":16', '"iterations":6'):
        assert field in text, field
        bad = text.replace(field, field.split(":")[0] + ":" + "9" * 5000, 1)
        p = tmp_path / "long.fgm"
        p.write_bytes(join_file(None, body, text=bad))
        with pytest.raises(fastgrad.saving.ModelFileError, match=re.escape(str(p))):
            fg.load_model(str(p))


@pytest.mark.parametrize("what, fn", [
    ("optimizer iterations 2**63 - 1", lambda h: h["compile"].update(iterations=2**63 - 1)),
    ("optimizer iterations 2**64", lambda h: h["compile"].update(iterations=2**64)),
    ("dropout counter 2**64 - 10",
     lambda h: next(iter(h["layers_random"].values())).update(counter=2**64 - 10)),
    # JSON as Python reads it allows -Infinity and NaN; the writer does not
    ("model name -Infinity", lambda h: h["model"]["config"].update(name=float("-inf"))),
    ("layer name NaN", lambda h: h["model"]["config"]["layers"][0]["config"].update(
        name=float("nan"))),
], ids=["iterations 2**63-1", "iterations 2**64", "dropout counter 2**64-10",
        "model name -Infinity", "layer name NaN"])
def test_loaded_values_either_refused_or_the_model_trains(tmp_path, saved, what, fn):
    """What the loader accepts, fit must be able to continue from and save
    must be able to write again: a header value that later makes training or
    saving fail should have been refused at load time with ModelFileError."""
    data, _ = saved
    try:
        model = load_bytes(tmp_path, _edit(data, fn))
    except ValueError:
        return
    rng = np.random.default_rng(52)
    x, y = rng.standard_normal((32, 10)).astype(F32), rng.integers(0, 4, 32)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    model.save(str(tmp_path / "again.fgm"))
    fg.load_model(str(tmp_path / "again.fgm"))


# -- save faults -------------------------------------------------------------

def _listing(folder):
    return sorted(os.listdir(folder))


@pytest.fixture
def two_states(tmp_path):
    """A model saved at path, then trained further (so that a new save would
    change the file)."""
    rng = np.random.default_rng(53)
    x, y = rng.standard_normal((48, 10)).astype(F32), rng.integers(0, 4, 48)
    m = classifier()
    m.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = tmp_path / "model.fgm"
    m.save(str(path))
    old_bytes, old_weights = path.read_bytes(), m.get_weights()
    m.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert not same_bits(old_weights, m.get_weights())
    return m, path, old_bytes, old_weights


def _assert_untouched(path, old_bytes, old_weights):
    assert _listing(path.parent) == [path.name], "a temporary file was left behind"
    assert path.read_bytes() == old_bytes
    assert same_bits(fg.load_model(str(path)).get_weights(), old_weights)


class _FailingFile:
    """Wraps the file object saving writes to: after `budget` bytes every
    write fails (as a full disk does) with `exc`; `at_close` fails close()
    instead, the way a buffered write can report ENOSPC only then."""

    def __init__(self, f, budget, exc, at_close=False):
        self._f, self._budget, self._exc, self._at_close = f, budget, exc, at_close
        self.written = 0

    def write(self, b):
        n = len(b)
        if not self._at_close and self.written + n > self._budget:
            keep = max(0, self._budget - self.written)
            self._f.write(b[:keep])       # a partial write, then the failure
            self.written += keep
            raise self._exc
        self.written += n
        return self._f.write(b)

    def close(self):
        self._f.close()
        if self._at_close:
            raise self._exc

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __getattr__(self, name):
        return getattr(self._f, name)


def _patch_fdopen(monkeypatch, budget, exc, at_close=False):
    real = os.fdopen
    opened = []

    def fake(fd, *a, **k):
        f = _FailingFile(real(fd, *a, **k), budget, exc, at_close)
        opened.append(f)
        return f

    monkeypatch.setattr(fastgrad.saving.os, "fdopen", fake)
    return opened


@pytest.mark.parametrize("budget", [0, 10, 20, 500, 2000, 10**9], ids=lambda b: f"after{b}")
def test_a_full_disk_during_save_keeps_the_previous_file(monkeypatch, two_states, budget):
    m, path, old_bytes, old_weights = two_states
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    opened = _patch_fdopen(monkeypatch, budget, full, at_close=budget == 10**9)
    with pytest.raises(OSError) as info:
        m.save(str(path))
    assert info.value.errno == errno.ENOSPC
    assert opened and (budget == 10**9 or opened[0].written <= budget)
    monkeypatch.undo()
    _assert_untouched(path, old_bytes, old_weights)
    # and the next save, with space again, works
    m.save(str(path))
    assert same_bits(fg.load_model(str(path)).get_weights(), m.get_weights())
    assert _listing(path.parent) == [path.name]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), MemoryError(), KeyboardInterrupt(),
                                 ValueError("odd")], ids=lambda e: type(e).__name__)
def test_an_exception_in_the_middle_of_writing_reaches_the_caller(monkeypatch, two_states,
                                                                   exc):
    m, path, old_bytes, old_weights = two_states
    _patch_fdopen(monkeypatch, 700, exc)
    with pytest.raises(type(exc)):
        m.save(str(path))
    monkeypatch.undo()
    _assert_untouched(path, old_bytes, old_weights)


def test_a_full_disk_when_creating_the_temporary_file(monkeypatch, two_states):
    m, path, old_bytes, old_weights = two_states

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fastgrad.saving.tempfile, "mkstemp", no_space)
    with pytest.raises(OSError) as info:
        m.save(str(path))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    _assert_untouched(path, old_bytes, old_weights)


def test_saving_into_a_read_only_folder_raises_and_leaves_nothing(two_states, monkeypatch):
    m, path, old_bytes, old_weights = two_states
    folder = path.parent
    if getattr(os, "geteuid", lambda: 0)() == 0:
        # root ignores folder permissions: refuse the temporary file as the
        # kernel would for anyone else
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(folder))
        monkeypatch.setattr(fg.saving.tempfile, "mkstemp", refuse)
    os.chmod(folder, 0o555)
    try:
        with pytest.raises(PermissionError):
            m.save(str(path))
        with pytest.raises(PermissionError):
            m.save(str(folder / "new.fgm"))
        assert _listing(folder) == [path.name]
    finally:
        os.chmod(folder, 0o755)
    _assert_untouched(path, old_bytes, old_weights)


def test_saving_over_a_folder_or_into_a_missing_folder(two_states):
    m, path, old_bytes, _old_weights = two_states
    target = path.parent / "a_folder"
    target.mkdir()
    (target / "inside").write_bytes(b"keep")
    with pytest.raises(OSError):
        m.save(str(target))
    assert (target / "inside").read_bytes() == b"keep"
    with pytest.raises(OSError):
        m.save(str(path.parent / "missing" / "m.fgm"))
    target_listing = _listing(path.parent)
    assert target_listing == sorted([path.name, "a_folder"]), target_listing
    assert path.read_bytes() == old_bytes


def test_load_model_takes_keras_arguments(tmp_path):
    """compile=False gives the architecture and weights uncompiled;
    custom_objects must be empty; the flags must be booleans."""
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    m = fg.Sequential([fg.layers.Dense(5, "relu", input_dim=4),
                       fg.layers.BatchNormalization(), fg.layers.Dense(2)], seed=1)
    m.compile("adam", "mse")
    m.fit(x, np.ones((6, 2), np.float32), epochs=2, verbose=0)
    m.save(tmp_path / "m.fgm")
    bare = fg.load_model(tmp_path / "m.fgm", compile=False, safe_mode=True, custom_objects={})
    assert bare.optimizer is None and m.optimizer is not None
    np.testing.assert_array_equal(bare.predict(x, verbose=0), m.predict(x, verbose=0))
    for a, b in zip(bare.get_weights(), m.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="custom_objects: .*'Mine'"):
        fg.load_model(tmp_path / "m.fgm", custom_objects={"Mine": object})
    with pytest.raises(TypeError, match="compile: expected True or False"):
        fg.load_model(tmp_path / "m.fgm", compile="no")
