"""Normalization (with adapt), Rescaling, Flatten, GaussianNoise,
GaussianDropout, AlphaDropout and Identity.

1. forward and backward against float64 NumPy references in both dtypes,
   the noise from a NumPy version of the documented generator
2. finite-difference gradients (float64, relative error < 1e-6)
3. edge values, refused arguments, configs, saving and loading
4. agreement with real Keras (JAX backend, float64): values, adapted
   statistics, and training from the same initial weights; the noise
   layers, whose random numbers differ, by their moments
"""
import numpy as np
import pytest

import fastgrad as fg
from fastgrad import layers as L


F32, F64 = np.float32, np.float64
DTYPES = [pytest.param(F64, id="float64"), pytest.param(F32, id="float32")]
SELU_ALPHA, SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def tol(dtype):
    return dict(rtol=1e-6, atol=1e-6) if dtype == F32 else dict(rtol=1e-14, atol=1e-14)


def splitmix(seed, offset, n):
    pos = np.uint64(offset) + np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (pos + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def normals(seed, offset, n):
    """Box-Muller on the two 32-bit halves of each draw (csrc/fastgrad_impl.h)."""
    r = splitmix(seed, offset, n)
    u1 = ((r >> np.uint64(32)).astype(F64) + 1.0) * 2.0 ** -32
    u2 = (r & np.uint64(0xFFFFFFFF)).astype(F64) * 2.0 ** -32
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def keep_mask(seed, offset, n, rate):
    return (splitmix(seed, offset, n) >> np.uint64(32)) < np.uint64(int((1 - rate) * 2.0 ** 32))


def ready(layer, F, B, dtype, weights=None, seed=0):
    """A layer built for F features, with work buffers for B rows."""
    layer.build(F)
    layer.allocate(B, dtype, True)
    layer.bind({k: np.asarray(v, dtype) for k, v in (weights or {}).items()}, {})
    layer.init_random(np.random.default_rng(seed))
    return layer


def fresh(seed=0):
    return np.random.default_rng(seed)


# -- 1. references -------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("invert", [False, True])
def test_normalization_forward_backward_match_the_formula(dtype, invert):
    rng = fresh(1)
    x = (rng.standard_normal((9, 6)) * 3 + 100).astype(dtype)
    mean, var = rng.standard_normal(6) + 100, rng.uniform(0, 4, 6)
    var[2] = 0.0   # the 1e-7 floor of the divisor
    layer = ready(L.Normalization(invert=invert), 6, 9, dtype,
                  {"mean": mean, "variance": var})
    y = layer.forward(x, training=True)
    m, v = mean.astype(dtype).astype(F64), var.astype(dtype).astype(F64)
    d = np.maximum(np.sqrt(v), 1e-7)
    want = x * d + m if invert else (x - m) / d
    np.testing.assert_allclose(y, want, **tol(dtype))
    g = rng.standard_normal((9, 6)).astype(dtype)
    np.testing.assert_allclose(layer.backward(g, True), g * d if invert else g / d,
                               rtol=tol(dtype)["rtol"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rescaling_and_identity(dtype):
    rng = fresh(2)
    x = rng.standard_normal((7, 5)).astype(dtype) * 100
    r = ready(L.Rescaling(1 / 255, offset=-0.5), 5, 7, dtype)
    np.testing.assert_allclose(r.forward(x), x.astype(F64) / 255 - 0.5, **tol(dtype))
    g = rng.standard_normal((7, 5)).astype(dtype)
    np.testing.assert_allclose(r.backward(g), g.astype(F64) / 255, rtol=tol(dtype)["rtol"])
    assert r.backward(g, need_dx=False) is None
    ident = ready(L.Identity(), 5, 7, dtype)
    assert ident.forward(x, training=True) is x and ident.backward(g) is g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("multiply", [False, True], ids=["GaussianNoise", "GaussianDropout"])
def test_gaussian_noise_matches_the_documented_generator(dtype, multiply):
    rng = fresh(3)
    x = rng.standard_normal((6, 7)).astype(dtype)
    layer = (L.GaussianDropout(0.3, seed=11) if multiply else L.GaussianNoise(0.2, seed=11))
    layer = ready(layer, 7, 6, dtype)
    layer.counter = 1000
    y = layer.forward(x, training=True)
    z = normals(11, 1000, x.size).reshape(x.shape)
    s = np.sqrt(0.3 / 0.7) if multiply else 0.2
    e = (s * z).astype(dtype).astype(F64)
    want = x * (1 + e) if multiply else x + e
    np.testing.assert_allclose(y, want, **tol(dtype))
    assert layer.counter == 1000 + x.size
    g = rng.standard_normal(x.shape).astype(dtype)
    np.testing.assert_allclose(layer.backward(g.copy()), g * (1 + e) if multiply else g,
                               **tol(dtype))
    # inference: the identity, and no draw
    assert layer.forward(x, training=False) is x and layer.counter == 1000 + x.size


@pytest.mark.parametrize("dtype", DTYPES)
def test_alpha_dropout_matches_the_formula_with_dropouts_mask(dtype):
    rng = fresh(4)
    rate = 0.25
    x = rng.standard_normal((8, 9)).astype(dtype)
    layer = ready(L.AlphaDropout(rate, seed=5), 9, 8, dtype)
    y = layer.forward(x, training=True)
    keep = keep_mask(5, 0, x.size, rate).reshape(x.shape)
    ap = -SELU_ALPHA * SELU_SCALE
    a = ((1 - rate) * (1 + rate * ap ** 2)) ** -0.5
    b = -a * ap * rate
    want = a * np.where(keep, x.astype(F64), ap) + b
    np.testing.assert_allclose(y, want, **tol(dtype))
    g = rng.standard_normal(x.shape).astype(dtype)
    np.testing.assert_allclose(layer.backward(g), np.where(keep, a * g, 0.0), **tol(dtype))
    # the same mask as Dropout's at the same seed and position
    drop = ready(L.Dropout(rate, seed=5), 9, 8, dtype)
    assert np.array_equal(drop.forward(np.ones_like(x), training=True) != 0, keep)


def test_noise_statistics_alpha_dropout_keeps_selu_moments():
    x = fg.ops.activation_forward(fresh(5).standard_normal((400, 250)), "selu")
    layer = ready(L.AlphaDropout(0.2, seed=1), 250, 400, F64)
    y = layer.forward(x, training=True)
    assert abs(y.mean() - x.mean()) < 0.01 and abs(y.var() - x.var()) < 0.02
    for cls, arg, sd in ((L.GaussianNoise, 0.5, 0.5), (L.GaussianDropout, 0.2, 0.5)):
        layer = ready(cls(arg, seed=2), 250, 400, F64)
        noise = layer.forward(np.ones((400, 250)), training=True) - 1.0
        assert abs(noise.mean()) < 0.005 and abs(noise.std() - sd) < 0.005
        assert np.abs(noise).max() < 6.7 * sd   # Box-Muller on 32 bits stays within 6.7


# -- 2. finite differences -----------------------------------------------------
def fd_check(layer, x, training=True):
    rng = fresh(6)
    w = rng.standard_normal(x.shape)
    c0 = getattr(layer, "counter", None)

    def f(xx):
        if c0 is not None:
            layer.counter = c0
        return float(np.sum(w * layer.forward(xx, training=training)))

    f(x)
    dx = np.array(layer.backward(w.copy(), True))
    num = np.zeros_like(x)
    h = 1e-5
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        num[i] = (f(xp) - f(xm)) / (2 * h)
    err = np.abs(dx - num).max() / np.abs(num).max()
    assert err < 1e-6, err


@pytest.mark.parametrize("make,weights", [
    (lambda: L.Normalization(), {"mean": [0.5, -1, 2, 0], "variance": [4, 0.25, 1, 9]}),
    (lambda: L.Normalization(invert=True), {"mean": [0.5, -1, 2, 0], "variance": [4, 0.25, 1, 9]}),
    (lambda: L.Rescaling(-2.5, 0.75), None),
    (lambda: L.GaussianNoise(0.3, seed=3), None),
    (lambda: L.GaussianDropout(0.4, seed=3), None),
    (lambda: L.AlphaDropout(0.3, seed=3), None),
    (lambda: L.Identity(), None),
], ids=["Normalization", "Normalization-invert", "Rescaling", "GaussianNoise",
        "GaussianDropout", "AlphaDropout", "Identity"])
def test_gradients_match_finite_differences(make, weights):
    x = fresh(7).standard_normal((5, 4))
    fd_check(ready(make(), 4, 5, F64, weights), x)


def test_flatten_first_layer_gradient_through_a_model():
    rng = fresh(8)
    x, y = rng.standard_normal((6, 2, 3)), rng.standard_normal((6, 2))
    model = fg.Sequential([L.Flatten(input_shape=(2, 3)), L.Dense(2)], dtype="float64", seed=0)
    model.compile("sgd", "mse")
    flat = fg.Sequential([L.Dense(2, input_dim=6)], dtype="float64", seed=0)
    flat.compile("sgd", "mse")
    flat.set_weights(model.get_weights())
    model.train_on_batch(x, y)
    flat.train_on_batch(x.reshape(6, -1), y)
    for a, b in zip(model.get_weights(), flat.get_weights()):
        assert a.tobytes() == b.tobytes()
    assert model.predict(x).tobytes() == flat.predict(x.reshape(6, -1)).tobytes()


# -- 3. edges, arguments, configs, files ---------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_values_pass_and_nan_propagates(dtype):
    tiny = np.finfo(dtype).smallest_subnormal
    x = np.array([[0.0, -0.0, tiny, -tiny, 1e20 if dtype == F64 else 1e30, -1e20, np.nan]],
                 dtype)
    r = ready(L.Rescaling(2.0), 7, 1, dtype)
    y = r.forward(x)
    want = x[0, :6] * dtype(2) + dtype(0)   # -0 * 2 + 0 is +0, in Keras's order too
    np.testing.assert_array_equal(y[0, :6], want)
    assert np.array_equal(np.signbit(y[0, :6]), np.signbit(want)) and np.isnan(y[0, 6])
    n = ready(L.Normalization(), 7, 1, dtype, {"mean": np.zeros(7), "variance": np.ones(7)})
    y = n.forward(x)
    np.testing.assert_array_equal(y[0, :6], x[0, :6])
    assert np.signbit(y[0, 1]) and np.isnan(y[0, 6])
    for layer in (L.GaussianDropout(0.5, seed=1), L.AlphaDropout(0.5, seed=1)):
        out = ready(layer, 7, 1, dtype).forward(x, training=True)
        assert np.isnan(out[0, 6]) or layer.kind == "AlphaDropout"   # dropped NaN: a constant


@pytest.mark.parametrize("make,arg", [
    (lambda: L.GaussianNoise(1.5), "stddev"), (lambda: L.GaussianNoise(-0.1), "stddev"),
    (lambda: L.GaussianDropout(1.0), "rate"), (lambda: L.AlphaDropout(-0.1), "rate"),
    (lambda: L.AlphaDropout(0.1, noise_shape=(None, 1)), "noise_shape"),
    (lambda: L.GaussianNoise(0.1, seed=-1), "seed"),
    (lambda: L.Normalization(axis=0), "axis"),
    (lambda: L.Normalization(mean=1.0), "mean, variance"),
    (lambda: L.Normalization(mean=[1.0, np.nan], variance=[1, 1]), "mean"),
    (lambda: L.Normalization(mean=0.0, variance=-1.0), "variance"),
    (lambda: L.Rescaling(np.inf), "scale"), (lambda: L.Rescaling(1.0, offset=np.nan), "offset"),
    (lambda: L.Flatten(input_shape=(8, 0)), "input_shape"),
    (lambda: L.Flatten(data_format="channels_first"), "data_format"),
])
def test_bad_arguments_raise_naming_them(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_adapt_accumulates_in_float64_from_arrays_and_batches():
    rng = fresh(9)
    data = (rng.standard_normal((1000, 3)) * [1e-3, 1.0, 50.0] + [1e4, -2.0, 0.0]).astype(F32)
    ref_m, ref_v = data.astype(F64).mean(0), data.astype(F64).var(0)
    one = L.Normalization()
    one.adapt(data)
    np.testing.assert_allclose(one._values[0], ref_m, rtol=1e-15)
    np.testing.assert_allclose(one._values[1], ref_v, rtol=1e-12)
    parts = L.Normalization()
    parts.adapt([data[:123], data[123:700], data[700:]])
    np.testing.assert_allclose(parts._values[0], ref_m, rtol=1e-14)
    np.testing.assert_allclose(parts._values[1], ref_v, rtol=1e-10)
    with pytest.raises(ValueError, match="data"):
        parts.adapt(data[:, :2].tolist() + [[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="data"):
        parts.adapt(np.full((3, 3), np.nan))
    # after build: into the model's non-trainable state, and saved with it
    model = fg.Sequential([L.Normalization(input_dim=3), L.Dense(1)], seed=0)
    model.compile("adam", "mse")
    model.build(3)
    model.layers[0].adapt(data)
    np.testing.assert_allclose(model.get_weights()[1], ref_v.astype(F32), rtol=1e-6)
    with pytest.raises(ValueError, match="features"):
        model.layers[0].adapt(data[:, :2])


def test_flatten_takes_images_and_refuses_the_wrong_shape():
    model = fg.Sequential([L.Flatten(input_shape=(8, 8)), L.Dense(3)], seed=0)
    model.compile("adam", "mse")
    x = fresh(10).standard_normal((4, 8, 8))
    assert model.predict(x).shape == (4, 3)
    with pytest.raises(ValueError, match="x: expected samples of shape"):
        model.predict(x[:, :7])
    plain = fg.Sequential([L.Dense(3)], seed=0)
    plain.compile("adam", "mse")
    with pytest.raises(ValueError, match="Flatten"):
        plain.predict(x)


def test_every_new_layer_saves_loads_and_resumes_bit_identically(tmp_path):
    rng = fresh(11)
    x, y = rng.standard_normal((48, 4, 2)), rng.integers(0, 3, 48)

    def build():
        m = fg.Sequential([L.Flatten(input_shape=(4, 2)), L.Rescaling(0.5, 0.1),
                           L.Normalization(), L.GaussianNoise(0.1),
                           L.Dense(8, activation="selu", kernel_initializer="lecun_normal"),
                           L.AlphaDropout(0.1), L.GaussianDropout(0.1), L.Identity(),
                           L.Dense(3, activation="softmax")], seed=3)
        m.layers[2].adapt(x.reshape(48, -1) * 0.5 + 0.1)
        m.compile(fg.optimizers.Lion(1e-3), "sparse_categorical_crossentropy")
        return m

    a = build()
    a.fit(x, y, batch_size=16, epochs=1, verbose=0)
    a.save(tmp_path / "m.fg")
    b = fg.load_model(tmp_path / "m.fg")
    assert [type(la).__name__ for la in b.layers] == [type(la).__name__ for la in a.layers]
    assert [la.get_config() for la in b.layers] == [la.get_config() for la in a.layers]
    for m in (a, b):
        m.fit(x, y, batch_size=16, epochs=2, verbose=0)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        assert wa.tobytes() == wb.tobytes()
    for layer in a.layers:   # registered: the configs rebuild each layer
        again = L.deserialize(L.serialize(layer))
        assert type(again) is type(layer) and again.get_config() == layer.get_config()


# -- 4. Keras --------------------------------------------------------------------
@pytest.mark.parametrize("invert", [False, True])
def test_normalization_adapt_and_values_agree_with_keras(keras64, invert):
    keras = keras64
    data = fresh(12).standard_normal((200, 5)) * [1, 2, 3, 4, 1e-9] + 7
    kl = keras.layers.Normalization(invert=invert)
    kl.adapt(data)
    ours = L.Normalization(invert=invert)
    ours.adapt(data)
    np.testing.assert_allclose(ours._values[0], np.asarray(kl.mean).ravel(), rtol=1e-13)
    np.testing.assert_allclose(ours._values[1], np.asarray(kl.variance).ravel(), rtol=1e-10)
    model = fg.Sequential([ours, L.Identity()], dtype="float64")
    np.testing.assert_allclose(model.predict(data), np.asarray(kl(data)), rtol=1e-13, atol=1e-13)
    given = keras.layers.Normalization(mean=2.0, variance=9.0)
    mine = fg.Sequential([L.Normalization(mean=2.0, variance=9.0)], dtype="float64")
    np.testing.assert_allclose(mine.predict(data), np.asarray(given(data)), rtol=1e-14)


def test_normalization_mean_and_variance_attributes_agree_with_keras():
    """layer.mean and layer.variance as Keras gives them: None before the
    layer is built or adapted, then (1, features) in float32."""
    keras = pytest.importorskip("keras", reason="needs Keras 3 with JAX, the cross-check "
                                "peers: pip install '.[peers]'")
    data = fresh(14).standard_normal((50, 4)) * [1, 2, 3, 4] + 3
    kl, ours = keras.layers.Normalization(), L.Normalization()
    assert kl.mean is None and ours.mean is None and ours.variance is None
    kl.adapt(data)
    ours.adapt(data)
    for theirs, mine in ((kl.mean, ours.mean), (kl.variance, ours.variance)):
        theirs = np.asarray(theirs)
        assert mine.shape == theirs.shape == (1, 4) and mine.dtype == theirs.dtype
        np.testing.assert_allclose(mine, theirs, rtol=1e-6)
    fg.Sequential([fg.Input((4,)), ours]).build()   # the model's weights now
    np.testing.assert_allclose(ours.mean, np.asarray(kl.mean), rtol=1e-6)
    ours.mean[0, 0] = 1e9                   # a copy: the layer is unchanged
    assert ours.mean[0, 0] != 1e9
    given_k = keras.layers.Normalization(mean=2.0, variance=9.0)
    given = L.Normalization(mean=2.0, variance=9.0)
    assert given_k.mean is None and given.mean is None   # set when built
    given_k.build((None, 3))
    fg.Sequential([fg.Input((3,)), given]).build()
    np.testing.assert_array_equal(given.variance, np.asarray(given_k.variance))


@pytest.mark.parametrize("first", ["flatten", "rescaling", "normalization", "identity"])
def test_training_through_the_layer_agrees_with_keras(keras64, keras_mse, first):
    keras = keras64
    rng = fresh(13)
    x, y = rng.standard_normal((48, 3, 2)) * 4 + 1, rng.standard_normal((48, 2))
    flat = x.reshape(48, 6)
    m, v = flat.mean(0), flat.var(0)
    ours, theirs = {
        "flatten": (L.Flatten(input_shape=(3, 2)), keras.layers.Flatten()),
        "rescaling": (L.Rescaling(0.25, -0.5), keras.layers.Rescaling(0.25, -0.5)),
        "normalization": (L.Normalization(mean=m, variance=v),
                          keras.layers.Normalization(mean=m, variance=v)),
        "identity": (L.Identity(), keras.layers.Identity()),
    }[first]
    model = fg.Sequential([ours, L.Dense(5, activation="sigmoid"), L.Dense(2)],
                          dtype="float64", seed=2)
    model.compile(fg.optimizers.Nadam(0.01), "mse")
    model.build(6)
    km = keras.Sequential([keras.Input((3, 2) if first == "flatten" else (6,)), theirs,
                           keras.layers.Dense(5, activation="sigmoid"), keras.layers.Dense(2)])
    dense = model.get_weights()[-4:]
    km.layers[1].set_weights(dense[:2])
    km.layers[2].set_weights(dense[2:])
    km.compile(keras.optimizers.Nadam(0.01), keras_mse)
    xin = x if first == "flatten" else flat
    for i in range(6):
        rows = slice(i * 16 % 48, i * 16 % 48 + 16)
        model.train_on_batch(xin[rows], y[rows])
        km.train_on_batch(xin[rows], y[rows])
    got = model.get_weights()[-4:]
    want = km.layers[1].get_weights() + km.layers[2].get_weights()
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(model.predict(xin), np.asarray(km(xin)), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name,args", [("GaussianNoise", (0.3,)), ("GaussianDropout", (0.3,)),
                                       ("AlphaDropout", (0.3,))])
def test_noise_layers_agree_with_keras_in_inference_and_in_moments(keras64, name, args):
    keras = keras64
    x = fg.ops.activation_forward(fresh(14).standard_normal((300, 200)), "selu")
    kl = getattr(keras.layers, name)(*args, seed=1)
    model = fg.Sequential([getattr(L, name)(*args, seed=1)], dtype="float64")
    np.testing.assert_array_equal(model.predict(x), np.asarray(kl(x, training=False)))
    layer = ready(getattr(L, name)(*args, seed=1), 200, 300, F64)
    ours = layer.forward(x, training=True) - x
    theirs = np.asarray(kl(x, training=True)) - x
    assert abs(ours.mean() - theirs.mean()) < 0.01
    assert abs(ours.std() / theirs.std() - 1) < 0.02
    assert layer.get_config()["seed"] == kl.get_config()["seed"]


# -- diagnose knows when BatchNormalization cannot help -------------------------
def _deep_sigmoid(bn=False):
    layers = []
    for i in range(12):
        first = {"input_dim": 8} if i == 0 else {}
        if bn:
            layers += [L.Dense(16, use_bias=False, **first), L.BatchNormalization(),
                       L.Activation("sigmoid")]
        else:
            layers.append(L.Dense(16, activation="sigmoid", **first))
    model = fg.Sequential(layers + [L.Dense(3, activation="softmax")], seed=0)
    model.compile(fg.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    return model


@pytest.mark.parametrize("bn", [False, True])
def test_diagnose_suggests_layer_normalization_for_small_batches(bn):
    rng = fresh(15)
    x, y = rng.standard_normal((64, 8)), rng.integers(0, 3, 64)
    model = _deep_sigmoid(bn)
    small = fg.diagnose(model, x[:4], y[:4]) if not bn else fg.diagnose(model, x, y, batch_size=4)
    large = fg.diagnose(model, x, y)
    if not bn:   # the plain sigmoid network vanishes at any batch size
        assert small.status == large.status == "vanishing"
    text_small, text_large = " ".join(small.suggestions), " ".join(large.suggestions)
    # with BatchNormalization, whatever the status (here: healthy)
    assert "fg.layers.LayerNormalization" in text_small and "4 rows" in text_small
    assert ("Replace BatchNormalization with" in text_small) == bn
    assert "LayerNormalization" not in text_large
    if not bn:
        assert "Add BatchNormalization" in text_large
