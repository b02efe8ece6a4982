"""softplus, softsign, relu6, hard_sigmoid, hard_silu, mish, exponential and
log_softmax in ulps against long-double references over the whole range;
the ReLU (with options) and PReLU kernels against float64 references,
finite differences, edge values and layouts; the activation layers; and
agreement with Keras 3 over training steps. (The tables' forward, backward
and finite-difference tests of test_ops.py and the sizes, layouts and
special values of test_hardening.py run over the new activations too.)"""
import numpy as np
import pytest

import fastgrad as fg
from fastgrad import activations, ops
from fastgrad.layers import ELU, Dense, LeakyReLU, PReLU, ReLU, Softmax
from keras_peer import assert_agree, keras_or_skip, train_both

F32, F64, LD = np.float32, np.float64, np.longdouble
DTYPES = [F32, F64]
IDS = ["f32", "f64"]


def ref_long(act, z):
    """The activation in long double (80-bit on x86), rounded once at the end."""
    z = np.asarray(z).astype(LD)
    with np.errstate(all="ignore"):
        sp = np.where(z > 0, z + np.log1p(np.exp(-z)), np.log1p(np.exp(z)))
        hs = np.minimum(np.maximum(z + 3, 0), 6) / 6
        return {"softplus": lambda: sp, "softsign": lambda: z / (1 + np.abs(z)),
                "relu6": lambda: np.minimum(np.maximum(z, 0), 6),
                "hard_sigmoid": lambda: hs, "hard_silu": lambda: z * hs,
                "mish": lambda: z * np.tanh(sp), "exponential": lambda: np.exp(z)}[act]()


# within this many ulp (float32, float64): the computation's own roundings
# plus the exponential's few ulp; mish and softplus work in double for float
ULPS = {"softplus": (1, 3), "softsign": (2, 2), "relu6": (0, 0), "hard_sigmoid": (1, 1),
        "hard_silu": (2, 2), "mish": (1, 4), "exponential": (2, 2)}


def _whole_range(dtype):
    low, high = (-110.0, 95.0) if dtype == F32 else (-750.0, 715.0)
    tiny = np.finfo(dtype).tiny
    return np.concatenate([np.linspace(low, high, 300_001), np.linspace(-1e-3, 1e-3, 20_001),
                           np.linspace(-1e-30, 1e-30, 2_001),
                           [tiny / 2, -tiny / 3, 1e20, -1e20, 0.0, -0.0]]).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("act", sorted(ULPS))
def test_within_a_few_ulp_over_the_whole_range(act, dtype):
    """Every finite result within ULPS of the correctly rounded one, from
    the deepest subnormal results to overflow, +-1e20 and +-0 included
    (mish in float64 below its normal range: within |z| units of the
    smallest subnormal, as e^z there is itself subnormal); infinities where
    the reference has them."""
    z = _whole_range(dtype)
    with np.errstate(all="raise"):    # no floating-point warning from the kernel
        y = ops.activation_forward(z.reshape(1, -1), act).ravel()
    ref = ref_long(act, z)
    with np.errstate(all="ignore"):
        rounded = ref.astype(dtype)
        ulp = np.spacing(np.abs(rounded)).astype(LD)
        err = np.abs(y.astype(LD) - ref) / ulp
    finite = np.isfinite(rounded)
    np.testing.assert_array_equal(y[~finite], rounded[~finite])
    bound = np.full(z.shape, float(ULPS[act][dtype == F64]))
    if act == "mish" and dtype == F64:
        # e^z subnormal: its rounding, |z| times, in units of the smallest subnormal
        deep = z < np.log(np.finfo(dtype).tiny)
        bound[deep] = 2 * np.abs(z[deep]) * 2.0 ** -1074 / ulp[deep].astype(F64)
    assert np.all(err[finite] <= bound[finite]), float(np.max(err[finite] - bound[finite]))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("act", sorted(ULPS) + ["log_softmax"])
def test_nan_propagates_and_infinities_follow_the_formula(act, dtype):
    x = np.array([[np.nan, 1.0, -2.0]], dtype)
    assert np.isnan(ops.activation_forward(x, act)[0, 0])
    if act == "log_softmax":
        return
    x = np.array([[np.inf, -np.inf, 0.0, -0.0]], dtype)
    with np.errstate(all="ignore"):
        want = ref_long(act, x[0]).astype(dtype)
    got = ops.activation_forward(x, act)[0]
    np.testing.assert_allclose(got, want, rtol=2 * np.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_log_softmax_rows_within_a_few_ulp(dtype):
    """Rows with one dominant entry (where log sum exp is a tiny number and
    a plain log of the sum would lose it), wide rows and +-1e20."""
    rng = np.random.default_rng(1)
    rows = [rng.normal(size=9) * s for s in (0.1, 3.0, 30.0)]
    rows += [np.array([0.0, -40.0, -41.0, -60.0]), np.array([1e20, -1e20, 0.0, 5.0]),
             rng.normal(size=1000), np.array([7.0])]
    for r in rows:
        z = r.astype(dtype)
        zl = z.astype(LD)
        k = np.argmax(zl)
        rest = np.sum(np.exp(np.delete(zl, k) - zl[k]))
        want = (zl - zl[k]) - np.log1p(rest)   # log1p: 1 + rest would round
        y = ops.activation_forward(z.reshape(1, -1), "log_softmax").ravel()
        ulp = np.spacing(np.abs(want.astype(dtype))).astype(LD)
        finite = np.isfinite(want.astype(dtype)) & (want != 0)
        assert np.all(np.abs(y.astype(LD) - want)[finite] / ulp[finite] <= 4), r
        assert y[np.argmax(z)] <= 0


def test_aliases_and_keras_names():
    x = np.linspace(-4, 4, 9).reshape(1, -1)
    assert ops.activation_forward(x, "swish").tobytes() == \
        ops.activation_forward(x, "silu").tobytes()
    assert ops.activation_forward(x, "hard_swish").tobytes() == \
        ops.activation_forward(x, "hard_silu").tobytes()
    assert activations.get("swish") is activations.silu
    assert activations.get("hard_swish") is activations.hard_silu
    assert activations.serialize(activations.mish) == "mish"
    # relu with Keras 3's options
    y = activations.relu(np.array([-10.0, -5.0, 0.0, 5.0, 10.0]), negative_slope=0.5,
                         max_value=6.0, threshold=1.0)
    np.testing.assert_allclose(y, [-5.5, -3.0, -0.5, 5.0, 6.0])


# ---------------------------------------------------------------------------
# ReLU with options and PReLU: the kernels
# ---------------------------------------------------------------------------

def ref_relu(x, slope, thr, cap):
    x = np.asarray(x, F64)
    cap = np.inf if cap is None else cap
    y = np.where(x > thr, np.minimum(x, cap), slope * (x - thr))
    d = np.where(x > thr, (x < cap).astype(F64), slope)
    return y, d


RELU_OPTIONS = [(0.0, 0.0, None), (0.1, 0.0, None), (0.0, 0.0, 6.0), (0.2, 0.5, 3.0),
                (0.3, 1.0, None)]


def _away(x, points, margin=0.05):
    """x pushed at least margin away from each kink."""
    for p in points:
        x = np.where(np.abs(x - p) < margin, p + margin * np.sign(x - p + 1e-300), x)
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("slope, thr, cap", RELU_OPTIONS)
def test_relu_with_options_matches_the_reference(slope, thr, cap, dtype):
    rng = np.random.default_rng(2)
    x = _away(3.0 * rng.normal(size=(7, 13)), [thr] + ([cap] if cap else [])).astype(dtype)
    g = rng.normal(size=x.shape).astype(dtype)
    y = ops.relu_forward(x, slope, cap, thr)
    dx = ops.relu_backward(g, x, slope, cap, thr)
    want, d = ref_relu(x, slope, thr, cap)
    tol = 1e-6 if dtype == F32 else 1e-15
    np.testing.assert_allclose(y, want, rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, g * d, rtol=tol, atol=tol)
    # finite differences of sum(g * y) in float64
    x64, g64 = x.astype(F64), g.astype(F64)
    h = 1e-6
    fd = (np.sum(g64 * ops.relu_forward(x64 + h, slope, cap, thr))
          - np.sum(g64 * ops.relu_forward(x64 - h, slope, cap, thr))) / (2 * h)
    assert abs(fd - np.sum(g64 * ops.relu_backward(np.ones_like(x64), x64, slope, cap, thr))) \
        < 1e-6 * np.sum(np.abs(g64))
    # edge values: NaN passes, +-0 and +-1e20 as the formula says
    e = np.array([[np.nan, 0.0, -0.0, 1e20, -1e20, np.inf]], dtype)
    with np.errstate(all="ignore"):
        want_e = ref_relu(e, slope, thr, cap)[0].astype(dtype)
    np.testing.assert_array_equal(ops.relu_forward(e, slope, cap, thr), want_e)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_prelu_matches_the_reference_and_finite_differences(dtype):
    rng = np.random.default_rng(3)
    x = _away(rng.normal(size=(9, 600)), [0.0]).astype(dtype)   # two column blocks
    alpha = rng.uniform(-0.5, 0.5, 600).astype(dtype)
    g = rng.normal(size=x.shape).astype(dtype)
    y = ops.prelu_forward(x, alpha)
    dx, dalpha = ops.prelu_backward(g, x, alpha)
    x64, a64, g64 = x.astype(F64), alpha.astype(F64), g.astype(F64)
    np.testing.assert_allclose(y, np.where(x64 > 0, x64, a64 * x64), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dx, np.where(x64 > 0, g64, a64 * g64), rtol=1e-6, atol=1e-7)
    want = np.sum(g64 * np.minimum(x64, 0), axis=0)
    np.testing.assert_allclose(dalpha, want, rtol=1e-5 if dtype == F32 else 1e-13,
                               atol=1e-5 if dtype == F32 else 1e-13)
    xs, al, gs = x64[:3, :4].copy(), a64[:4].copy(), g64[:3, :4].copy()
    h = 1e-6
    num = np.empty(4)
    for j in range(4):
        al[j] += h
        fp = np.sum(gs * ops.prelu_forward(xs, al))
        al[j] -= 2 * h
        fm = np.sum(gs * ops.prelu_forward(xs, al))
        al[j] += h
        num[j] = (fp - fm) / (2 * h)
    got = ops.prelu_backward(gs, xs, al)[1]
    assert np.max(np.abs(got - num)) <= 1e-6 * np.max(np.abs(got) + np.abs(num))
    e = np.array([[np.nan, -0.0, 1e20, -1e20]], dtype)
    out = ops.prelu_forward(e, np.full(4, 0.5, dtype))
    assert np.isnan(out[0, 0]) and out[0, 2] == dtype(1e20) and out[0, 3] == dtype(-5e19)


def test_layouts_in_place_and_overlap():
    rng = np.random.default_rng(4)
    x, g = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    alpha = rng.normal(size=6)
    y, (dx, da) = ops.prelu_forward(x, alpha), ops.prelu_backward(g, x, alpha)
    r = ops.relu_forward(x, 0.1, 2.0, 0.5)
    for v in (np.asfortranarray(x), x[::-1].copy()[::-1], np.ascontiguousarray(x.T).T):
        assert ops.prelu_forward(v, alpha).tobytes() == y.tobytes()
        assert ops.relu_forward(v, 0.1, 2.0, 0.5).tobytes() == r.tobytes()
        b = ops.prelu_backward(np.asfortranarray(g), v, alpha)
        assert b[0].tobytes() == dx.tobytes() and b[1].tobytes() == da.tobytes()
    a = x.copy()
    ops.prelu_forward(a, alpha, out=a)
    assert a.tobytes() == y.tobytes()
    a = x.copy()
    ops.relu_forward(a, 0.1, 2.0, 0.5, out=a)
    assert a.tobytes() == r.tobytes()
    buf = np.zeros(31)
    xs, shifted = buf[:30].reshape(5, 6), buf[1:].reshape(5, 6)
    xs[...] = x
    with pytest.raises(ValueError, match="^out: overlaps x"):
        ops.relu_forward(xs, out=shifted)
    with pytest.raises(ValueError, match="^out: overlaps x"):
        ops.prelu_forward(xs, alpha, out=shifted)
    with pytest.raises(ValueError, match="^dx: overlaps"):
        ops.prelu_backward(xs, x, alpha, dx=shifted)
    for call, match in ((lambda: ops.relu_forward(x, -0.1), "^negative_slope:"),
                        (lambda: ops.relu_forward(x, threshold=-1), "^threshold:"),
                        (lambda: ops.relu_forward(x, max_value=-1), "^max_value:"),
                        (lambda: ops.relu_forward(x, max_value=np.nan), "^max_value:"),
                        (lambda: ops.prelu_forward(x, alpha[:5]), "^alpha:"),
                        (lambda: ops.relu_backward(g[:2], x), "^x:")):
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(TypeError, match="^alpha:"):
        ops.prelu_forward(x, alpha.astype(F32))


# ---------------------------------------------------------------------------
# the layers
# ---------------------------------------------------------------------------

def _layers():
    return [Dense(8, input_dim=4), PReLU(), Dense(8), ReLU(max_value=3.0, negative_slope=0.1,
                                                           threshold=0.2),
            Dense(8), LeakyReLU(), Dense(8), ELU(alpha=0.7), Dense(3), Softmax()]


def test_layers_save_load_and_configure(tmp_path):
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(20, 4)), rng.integers(0, 3, 20)
    m = fg.Sequential(_layers(), dtype="float64", seed=1)
    m.compile("adam", "sparse_categorical_crossentropy")
    m.fit(x, y, epochs=2, batch_size=5, verbose=0)
    assert [layer.name for layer in m.layers[1::2]] == ["p_re_lu", "re_lu", "leaky_re_lu",
                                                        "elu", "softmax"]
    assert not np.all(m.layers[1].weights["alpha"] == 0)      # the slope trains
    m.save(tmp_path / "m.fgm")
    m2 = fg.load_model(tmp_path / "m.fgm")
    assert [la.get_config() for la in m2.layers] == [la.get_config() for la in m.layers]
    assert m2.predict(x).tobytes() == m.predict(x).tobytes()
    assert m._fused   # a Softmax layer before the cross-entropy is fused like softmax
    for bad, match in ((lambda: ReLU(max_value=-1.0), "^max_value:"),
                       (lambda: LeakyReLU(-0.1), "^negative_slope:"),
                       (lambda: PReLU(shared_axes=[1]), "^shared_axes:"),
                       (lambda: Softmax(axis=0), "^axis:")):
        with pytest.raises(ValueError, match=match):
            bad()


def test_layer_defaults_are_keras_ones():
    keras = keras_or_skip()
    pairs = [(ReLU(), keras.layers.ReLU(), ("max_value", "negative_slope", "threshold")),
             (LeakyReLU(), keras.layers.LeakyReLU(), ("negative_slope",)),
             (ELU(), keras.layers.ELU(), ("alpha",) if "alpha" in
              keras.layers.ELU().get_config() else ())]
    for ours, theirs, keys in pairs:
        for k in keys:
            assert ours.get_config()[k] == theirs.get_config()[k], (type(ours), k)
    assert keras.layers.PReLU().get_config()["alpha_initializer"]["class_name"] == "Zeros"
    assert type(PReLU().alpha_initializer).__name__ == "Zeros"


# ---------------------------------------------------------------------------
# Keras 3: training from the same weights
# ---------------------------------------------------------------------------

KERAS_ACTIVATIONS = ["softplus", "softsign", "relu6", "hard_sigmoid", "hard_silu", "mish",
                     "exponential", "log_softmax", "swish"]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("act", KERAS_ACTIVATIONS)
def test_activation_training_agrees_with_keras(act, dtype):
    keras = keras_or_skip()
    rng = np.random.default_rng(6)
    x = rng.normal(size=(32, 5)).astype(dtype)
    y = np.eye(3)[rng.integers(0, 3, 32)].astype(dtype)
    cce = fg.losses.CategoricalCrossentropy(from_logits=True)
    result = train_both([Dense(6, activation=act), Dense(3)],
                        [keras.layers.Dense(6, activation=act), keras.layers.Dense(3)],
                        x, y, cce, keras.losses.CategoricalCrossentropy(from_logits=True),
                        dtype, learning_rate=0.1)
    assert_agree(result, dtype, 1e-11 if dtype == F64 else 3e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_activation_layers_training_agrees_with_keras(dtype):
    keras = keras_or_skip()
    rng = np.random.default_rng(7)
    x = rng.normal(size=(32, 4)).astype(dtype)
    y = np.eye(3)[rng.integers(0, 3, 32)].astype(dtype)
    kl = keras.layers
    theirs = [kl.Dense(8), kl.PReLU(alpha_initializer=keras.initializers.Constant(0.1)),
              kl.Dense(8), kl.ReLU(max_value=3.0, negative_slope=0.1, threshold=0.2),
              kl.Dense(8), kl.LeakyReLU(), kl.Dense(8), kl.ELU(alpha=0.7), kl.Dense(3),
              kl.Softmax()]
    ours = _layers()
    ours[0].input_dim = None
    ours[1] = PReLU(alpha_initializer=fg.initializers.Constant(0.1))
    result = train_both(ours, theirs, x, y, "categorical_crossentropy",
                        "categorical_crossentropy", dtype, learning_rate=0.1)
    assert_agree(result, dtype, 1e-10 if dtype == F64 else 3e-5)
