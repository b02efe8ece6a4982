"""Pickling, deep copies and joblib (fastgrad.pickling): every model, compiled
or not, trained or not, built or not, goes through the bytes of fastgrad's
own model format; the copy predicts bit-identically and continues training
bit-identically with the original (the reference: the original model trained
on the same batches)."""
import copy
import io
import pickle
import pickletools

import numpy as np
import pytest

import fastgrad as fg
import fastgrad.pickling


def data(n=48, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    return x, np.argmax(x @ rng.standard_normal((d, k)), axis=1)


def make(kind):
    layers = [fg.layers.Dense(8, activation="relu",
                              input_dim=None if kind == "unbuilt" else 5),
              fg.layers.BatchNormalization(), fg.layers.Dropout(0.25),
              fg.layers.Dense(3, activation="softmax")]
    m = fg.Sequential(layers, dtype="float64" if kind == "float64" else "float32", seed=4)
    opt = {"sgd": fg.optimizers.SGD(0.05, momentum=0.9),
           "rmsprop": fg.optimizers.RMSprop(centered=True, momentum=0.3),
           "adagrad": fg.optimizers.Adagrad(0.1),
           "adamw": fg.optimizers.AdamW(
               learning_rate=fg.schedules.CosineDecay(1e-2, 100))}.get(kind, "adam")
    if kind != "uncompiled":
        m.compile(opt, "sparse_categorical_crossentropy", metrics=["accuracy"])
    if kind not in ("unbuilt", "untrained", "uncompiled"):
        x, y = data()
        m.fit(x, y, epochs=2, batch_size=16, verbose=0)
    return m


KINDS = ["unbuilt", "uncompiled", "untrained", "trained", "sgd", "rmsprop", "adagrad",
         "adamw", "float64"]


def joblib_copy(m):
    joblib = pytest.importorskip("joblib", reason="needs joblib (pip install joblib)")
    buf = io.BytesIO()
    joblib.dump(m, buf)
    buf.seek(0)
    return joblib.load(buf)


COPIES = {
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "pickle-protocol-2": lambda m: pickle.loads(pickle.dumps(m, protocol=2)),
    "deepcopy": copy.deepcopy,
    "copy": copy.copy,
    "joblib": joblib_copy,
}


def assert_same_bits(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert u.tobytes() == v.tobytes()


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("kind", KINDS)
def test_a_copy_predicts_and_trains_bit_identically(kind, how):
    m = make(kind)
    c = COPIES[how](m)
    assert c is not m and isinstance(c, fg.Sequential)
    assert c.built == m.built
    x, y = data(seed=1)
    np.testing.assert_array_equal(c.predict(x), m.predict(x))
    if m.optimizer is None:
        return
    assert type(c.optimizer) is type(m.optimizer)
    assert c.optimizer.iterations == m.optimizer.iterations
    hm = m.fit(x, y, epochs=2, batch_size=8, verbose=0)
    hc = c.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert hm.history["loss"] == hc.history["loss"]
    assert_same_bits(c.get_weights(), m.get_weights())
    vm, vc = m.optimizer.variables(), c.optimizer.variables()
    assert sorted(vm) == sorted(vc)
    assert_same_bits([vc[k] for k in sorted(vc)], [vm[k] for k in sorted(vm)])


def test_the_copy_shares_nothing_with_the_original():
    m = make("trained")
    c = copy.deepcopy(m)
    c.params[:] = 0
    assert np.abs(m.params).sum() > 0
    assert c.optimizer is not m.optimizer and c.layers[0] is not m.layers[0]


def _parts(blob):
    """(imports, byte strings) of a pickle: the globals it names and the
    bytes objects it holds."""
    ops = list(pickletools.genops(blob))
    imports = [arg for op, arg, _ in ops if op.name == "GLOBAL"]
    for i, (op, _, _) in enumerate(ops):
        if op.name == "STACK_GLOBAL":
            strings = [arg for _, arg, _ in ops[:i] if isinstance(arg, str)]
            imports.append(" ".join(strings[-2:]))
    return imports, [arg for _, arg, _ in ops if isinstance(arg, bytes)]


@pytest.mark.parametrize("protocol", [3, 4, pickle.HIGHEST_PROTOCOL])
def test_the_pickle_holds_only_the_loader_and_the_model_file(tmp_path, protocol):
    m = make("trained")
    imports, payload = _parts(pickle.dumps(m, protocol=protocol))
    assert imports == ["fastgrad.pickling restore"]
    # one bytes object: exactly the file model.save writes
    m.save(tmp_path / "m.fgm")
    assert payload == [(tmp_path / "m.fgm").read_bytes()]


def test_a_damaged_pickle_payload_raises_value_error():
    m = make("trained")
    blob = pickle.dumps(m)
    _, (payload,) = _parts(blob)
    # damage of the same length keeps the pickle itself well-formed
    for old, new in ((b'"Dense"', b'"Evil1"'), (b'"float32"', b'"float16"'),
                     (b'"arrays"', b'"arrayz"')):
        assert old in payload
        with pytest.raises(ValueError):
            pickle.loads(blob.replace(payload, payload.replace(old, new, 1)))
    for bad in (payload[:100], payload[:-4], b"", payload + b"\0" * 64):
        with pytest.raises(ValueError):
            fastgrad.pickling.restore(bad)
    with pytest.raises(TypeError, match="data"):
        fastgrad.pickling.restore("not bytes")


def test_only_pickles_may_hold_an_unbuilt_model(tmp_path):
    m = make("unbuilt")
    _, (payload,) = _parts(pickle.dumps(m))
    (tmp_path / "unbuilt.fgm").write_bytes(payload)
    with pytest.raises(ValueError, match="input_dim"):   # save refuses them too
        fg.load_model(tmp_path / "unbuilt.fgm")
    assert not pickle.loads(pickle.dumps(m)).built
