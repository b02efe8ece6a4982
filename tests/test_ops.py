"""Reference tests for the compiled kernels, through ``fastgrad.ops``.

Every kernel is compared with an independent float64 NumPy implementation of
its documented formula (the ``ref_*`` functions below), and every gradient is
also checked against central finite differences of the kernel's own forward
value. Layout, dtype and argument validation are covered at the end.

Layout of this file:
  references ......... in _reference.py: ref_act, ref_act_vjp, ref_loss
  helpers ............ data generators, tolerances, finite differences
  1. activations ..... forward / backward vs NumPy
  2. finite diffs .... activations (direct and through dense), losses
  3. losses .......... values, per-sample rows, large logits, clipping
  4. dense, matmul ... vs NumPy, bias/dx options, column blocking
  5. sgd_step
  6. sum_squares
  7. validation ...... TypeError / ValueError naming the argument,
                       non-contiguous inputs
"""
import numpy as np
import pytest
from _reference import (
    DEFAULT_ALPHA,
    DTYPE_IDS,
    DTYPES,
    EPS,
    F32,
    F64,
    LAYOUTS_1D,
    LAYOUTS_2D,
    SELU_ALPHA,
    SELU_SCALE,
    ncdf_pdf,
    check,
    layout,
    numerical_grad,
    one_hot,
    ref_act,
    ref_act_vjp,
    ref_dense_backward,
    ref_dense_forward,
    ref_loss,
    ref_optimizer_run,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fastgrad import _core, ops

# Relative tolerances for a result computed in `dtype`, compared with a
# float64 reference computed from the same (already rounded) inputs: relative
# to each value, or to the magnitudes of the terms a result sums (see
# assert_close); never an absolute floor, which would hide errors in small
# values such as sigmoid(-9).
RTOL = {F32: 1e-5, F64: 1e-12}

FD_TOL = 1e-6


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def assert_close(got, want, dtype, bound=0.0, factor=1.0):
    """|got - want| <= RTOL[dtype] * factor * (|want| + bound) elementwise:
    relative to each value, unless a bound (the magnitudes of the terms
    summed into each result, which rounding errors scale with) is given."""
    check(got, want, dtype, bound, tol=RTOL[dtype] * factor)


def normal(rng, shape, dtype=F64, std=2.0):
    return (std * rng.standard_normal(shape)).astype(dtype)


def away_from_zero(z, margin=0.1):
    """Push values at least `margin` away from 0 (the kinks of relu & co)."""
    return np.where(z >= 0, z + margin, z - margin)


def assert_grad_close(analytic, numeric, what):
    a = np.asarray(analytic, F64)
    n = np.asarray(numeric, F64)
    assert a.shape == n.shape
    err = np.max(np.abs(a - n)) / max(float(np.max(np.abs(a) + np.abs(n))), 1e-300)
    assert err < FD_TOL, f"{what}: relative error {err:.3g} between analytic and numeric"


def ref_rows_grad(*args, **kw):
    """(per-row losses, gradient of the mean) of ref_loss."""
    return ref_loss(*args, **kw)[1:3]


def relayout(a, how):
    """The same values as `a` in a non-C-contiguous layout."""
    r = layout(a, how)
    np.testing.assert_array_equal(r, a)
    assert not r.flags.c_contiguous
    return r


def readonly(a):
    return layout(a, "readonly")


# Activation cases: every activation with its default alpha, plus explicit
# alphas for the two that take one.
ACT_CASES = [pytest.param(name, None, id=name) for name in ops.ACTIVATIONS] + [
    pytest.param("leaky_relu", 0.05, id="leaky_relu-a0.05"),
    pytest.param("leaky_relu", 0.0, id="leaky_relu-a0"),
    pytest.param("elu", 0.5, id="elu-a0.5"),
    pytest.param("elu", 2.0, id="elu-a2"),
]

# Loss cases: (loss, from_logits, delta)
LOSS_CASES = [pytest.param(name, False, 1.0, id=name) for name in (
    "log_cosh", "kl_divergence", "poisson", "hinge", "squared_hinge", "categorical_hinge",
    "mape", "msle", "cosine_similarity", "binary_focal_crossentropy",
    "categorical_focal_crossentropy")] + [
    pytest.param("binary_focal_crossentropy", True, 1.0, id="bfce-logits"),
    pytest.param("categorical_focal_crossentropy", True, 1.0, id="cfce-logits"),
    pytest.param("mse", False, 1.0, id="mse"),
    pytest.param("mae", False, 1.0, id="mae"),
    pytest.param("huber", False, 1.0, id="huber"),
    pytest.param("huber", False, 0.3, id="huber-d0.3"),
    pytest.param("binary_crossentropy", False, 1.0, id="bce"),
    pytest.param("binary_crossentropy", True, 1.0, id="bce-logits"),
    pytest.param("categorical_crossentropy", False, 1.0, id="cce"),
    pytest.param("categorical_crossentropy", True, 1.0, id="cce-logits"),
    pytest.param("sparse_categorical_crossentropy", False, 1.0, id="scce"),
    pytest.param("sparse_categorical_crossentropy", True, 1.0, id="scce-logits"),
]
LOGIT_LOSSES = ["binary_crossentropy", "categorical_crossentropy",
                "binary_focal_crossentropy", "categorical_focal_crossentropy",
                "sparse_categorical_crossentropy"]


def make_loss_data(loss, from_logits, shape, rng, delta=1.0):
    """(y_true, y_pred) in float64 (labels int64 for the sparse loss), with
    predictions away from every kink and clip edge of the loss."""
    B, O = shape
    if loss in ("mse", "mae", "huber"):
        t = rng.standard_normal(shape)
        # |error| in [0.1, 0.8] or [1.2, 2.5] times delta: off 0 and off delta
        mag = np.where(rng.random(shape) < 0.5, rng.uniform(0.1, 0.8, shape),
                       rng.uniform(1.2, 2.5, shape)) * delta
        p = t + np.where(rng.random(shape) < 0.5, -mag, mag)
        return t, p
    if loss == "binary_crossentropy":
        t = rng.uniform(0.0, 1.0, shape)
        t[rng.random(shape) < 0.3] = 1.0  # some hard targets too
        p = normal(rng, shape, std=3.0) if from_logits else rng.uniform(0.05, 0.95, shape)
        return t, p
    if loss == "categorical_crossentropy":
        t = rng.uniform(0.0, 1.0, shape)  # soft, not normalized: sum(t) != 1
    elif loss == "sparse_categorical_crossentropy":
        t = rng.integers(0, O, size=B)
    elif loss == "categorical_focal_crossentropy":
        t = one_hot(rng.integers(0, O, size=B), O)
    else:
        return make_new_loss_data(loss, from_logits, shape, rng)
    p = normal(rng, shape, std=3.0) if from_logits else rng.uniform(0.2, 1.0, shape)
    return t, p


def make_new_loss_data(loss, from_logits, shape, rng):
    """(y_true, y_pred) for the losses of ref_new_loss, off their kinks."""
    B, O = shape
    if loss == "binary_focal_crossentropy":
        t = (rng.random(shape) < 0.5).astype(F64)
        p = normal(rng, shape, std=3.0) if from_logits else rng.uniform(0.05, 0.95, shape)
        return t, p
    if loss in ("hinge", "squared_hinge"):
        t = (rng.random(shape) < 0.5).astype(F64)   # {0, 1}: mapped to {-1, 1}
        # 1 - t' p off 0: |p| away from 1
        mag = np.where(rng.random(shape) < 0.5, rng.uniform(0.1, 0.8, shape),
                       rng.uniform(1.2, 2.5, shape))
        return t, mag * np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    if loss == "categorical_hinge":
        t = one_hot(rng.integers(0, O, size=B), O)
        return t, normal(rng, shape, std=0.3)
    if loss in ("kl_divergence", "poisson", "msle"):
        return rng.uniform(0.05, 0.95, shape), rng.uniform(0.05, 0.95, shape)
    if loss in ("log_cosh", "mape", "cosine_similarity"):
        t = normal(rng, shape) + np.where(rng.random(shape) < 0.5, -1.0, 1.0)
        return t, t + rng.uniform(0.1, 1.0, shape) * np.where(rng.random(shape) < 0.5, -1, 1)
    raise KeyError(loss)


def test_tables_are_covered_by_the_references():
    """A new activation or loss in the tables must come with a reference."""
    z = np.linspace(-2, 2, 12).reshape(3, 4)
    for name in ops.ACTIVATIONS:
        ref_act(name, z)
        ref_act_vjp(name, z, z)
    for name in ops.LOSSES:
        t, p = make_loss_data(name, False, (3, 4), np.random.default_rng(0))
        ref_loss(name, t, p)
    assert ops.NEEDS_PRE == {"gelu", "silu", "swish", "softplus", "softsign", "hard_silu",
                             "hard_swish", "mish"}
    codes = [code for code, _ in ops.ACTIVATIONS.values()]
    assert sorted(codes) == list(range(len(codes)))
    assert sorted(ops.LOSSES.values()) == list(range(len(ops.LOSSES)))
    assert {k: v[1] for k, v in ops.ACTIVATIONS.items() if v[1]} == DEFAULT_ALPHA


# ---------------------------------------------------------------------------
# 1. Activations vs NumPy
# ---------------------------------------------------------------------------

ACT_SHAPES = [(1, 1), (7, 13), (64, 600), (3, 1100), (0, 5)]


@pytest.mark.parametrize("shape", ACT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act, alpha", ACT_CASES)
def test_activation_forward(act, alpha, dtype, shape):
    rng = np.random.default_rng([len(act), shape[0], shape[1]])
    z = normal(rng, shape, dtype)
    want = ref_act(act, z, alpha)

    assert_close(ops.activation_forward(z, act, alpha=alpha), want, dtype)

    out = np.full(shape, np.nan, dtype)
    pre = np.full(shape, np.nan, dtype)
    got = ops.activation_forward(z, act, out=out, pre=pre, alpha=alpha)
    assert_close(got, want, dtype)
    assert_close(out, want, dtype)  # written in place
    np.testing.assert_array_equal(pre, z)


@pytest.mark.parametrize("shape", ACT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act, alpha", ACT_CASES)
def test_activation_backward(act, alpha, dtype, shape):
    rng = np.random.default_rng([len(act), shape[0], shape[1], 1])
    z = normal(rng, shape, dtype)
    g = normal(rng, shape, dtype, std=1.0)
    y = ref_act(act, z, alpha).astype(dtype)  # the forward output
    # the documented slope from the same rounded y, relative to its terms
    want, bound = ref_act_vjp(act, z, g, alpha, y=y, bound=True)
    x = z if act in ops.NEEDS_PRE else None  # the others work from y alone

    assert_close(ops.activation_backward(g, y, act, x=x, alpha=alpha), want, dtype, bound)

    dx = np.full(shape, np.nan, dtype)
    got = ops.activation_backward(g, y, act, x=x, alpha=alpha, dx=dx)
    assert_close(got, want, dtype, bound)
    assert_close(dx, want, dtype, bound)  # written in place


@settings(max_examples=40, deadline=None)
@given(data=st.data(), act=st.sampled_from(sorted(ops.ACTIVATIONS)))
def test_activation_property_wide_range(data, act):
    """Forward and backward in float64 over arbitrary values in [-60, 60]."""
    shape = data.draw(st.tuples(st.integers(1, 4), st.integers(1, 6)), label="shape")
    elems = st.floats(-60, 60, allow_nan=False, allow_subnormal=False)
    z = data.draw(hnp.arrays(F64, shape, elements=elems), label="z")
    g = data.draw(hnp.arrays(F64, shape, elements=st.floats(-2, 2)), label="g")
    y = ops.activation_forward(z, act)
    assert np.all(np.isfinite(y))
    assert_close(y, ref_act(act, z), F64)
    y = ref_act(act, z)
    dx = ops.activation_backward(g, y, act, x=z)
    want, bound = ref_act_vjp(act, z, g, y=y, bound=True)
    assert_close(dx, want, F64, bound)


def _ref_long(act, z):
    """The activation in long double (80-bit on x86), rounded once at the end."""
    zl = z.astype(np.longdouble)
    if act == "sigmoid":
        e = np.exp(-np.abs(zl))
        return np.where(zl >= 0, 1 / (1 + e), e / (1 + e))
    if act == "tanh":
        return np.tanh(zl)
    if act == "elu":
        return np.where(zl > 0, zl, np.expm1(zl))
    return np.where(zl > 0, SELU_SCALE * zl, SELU_SCALE * SELU_ALPHA * np.expm1(zl))


@pytest.mark.parametrize("act", ["sigmoid", "tanh", "elu", "selu"])
@pytest.mark.parametrize("dtype,low", [(F32, -110.0), (F64, -750.0)])
def test_own_exponentials_within_three_ulp_over_the_whole_range(act, dtype, low):
    """sigmoid, tanh, elu and selu run on fastgrad's own exponential (plain
    arithmetic, so that it vectorizes): within 3 ulp of a correctly rounded
    reference everywhere, near zero and for subnormal results too, with
    -0, +-inf and NaN handled as the C library would."""
    z = np.concatenate([np.linspace(low, 40.0, 300_001), np.linspace(-1e-3, 1e-3, 20_001),
                        np.linspace(-1e-30, 1e-30, 2_001)]).astype(dtype)
    y = ops.activation_forward(z.reshape(1, -1), act).ravel()
    ref = _ref_long(act, z)
    ulp = np.spacing(np.abs(ref.astype(dtype))).astype(np.longdouble)
    assert float(np.max(np.abs(y.astype(np.longdouble) - ref) / ulp)) <= 3.0
    special = np.array([[-0.0, np.inf, -np.inf, np.nan]], dtype)
    got = ops.activation_forward(special, act)[0]
    with np.errstate(all="ignore"):
        want = _ref_long(act, special[0]).astype(dtype)
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[0]) == (act != "sigmoid")   # -0 stays -0, sigmoid(-0) = 0.5


@pytest.mark.parametrize("dtype", [F32, F64])
def test_gelu_accurate_over_the_whole_range(dtype):
    """gelu(z) = z Phi(z) accurate relative to its size, the left tail
    included, where 0.5 z (1 + erf(z / sqrt 2)) keeps no correct digit
    (from z = -5 in float32): within one ulp in float32, 4 in float64, of a
    reference good to an ulp (_reference.ncdf_pdf). The derivative
    Phi(z) + z phi(z) is held to 2 ulp in float32 and 8 in float64 of the
    larger of its two terms, which cancel near z = -0.75."""
    z = np.concatenate([np.linspace(-16.0 if dtype == F32 else -37.0, 10.0, 400_001),
                        np.linspace(-1e-3, 1e-3, 20_001)]).astype(dtype)
    z64 = z.astype(F64)
    cdf, pdf = ncdf_pdf(z64)
    zpdf = z64 * pdf
    y = ops.activation_forward(z.reshape(1, -1), "gelu").ravel()
    want = z64 * cdf
    live = np.abs(want) >= np.finfo(dtype).tiny   # not subnormal
    ulp = np.spacing(np.abs(want.astype(dtype))).astype(F64)
    bound = 1.0 if dtype == F32 else 4.0
    assert np.all((np.abs(y - want) / ulp <= bound)[live])
    dz = ops.activation_backward(np.ones((1, z.size), dtype), y.reshape(1, -1), "gelu",
                                 x=z.reshape(1, -1)).ravel()
    big = np.maximum(np.abs(cdf), np.abs(zpdf))
    live = big >= np.finfo(dtype).tiny
    scale = np.spacing(big.astype(dtype)).astype(F64)
    bound = 2.0 if dtype == F32 else 8.0
    assert np.all((np.abs(dz - (cdf + zpdf)) / scale <= bound)[live])
    special_z = np.array([[-0.0, np.inf, np.nan]], dtype)
    got = ops.activation_forward(special_z, "gelu")[0]
    assert got[0] == 0 and np.signbit(got[0]) and got[1] == np.inf and np.isnan(got[2])


def _act_bytes(name, z, dy, bias):
    """Every output of the activation passes on z (and of the dense epilogue
    with bias), as bytes."""
    pre = z if name in ops.NEEDS_PRE else None
    y = ops.activation_forward(z, name)
    got = [y, ops.activation_backward(dy, y, name, x=pre)]
    out, zb = np.empty_like(z), np.empty_like(z)
    _core.bias_act_forward(z, bias, out, zb, ops.ACTIVATIONS[name][0], ops.ACTIVATIONS[name][1])
    dpre, dbias = np.empty_like(z), np.empty_like(bias)
    _core.act_backward(dy, out, zb, dpre, dbias, ops.ACTIVATIONS[name][0],
                       ops.ACTIVATIONS[name][1])
    return [a.tobytes() for a in (*got, out, zb, dpre, dbias)]


@pytest.mark.parametrize("shape", [(301, 613), (3, 50001), (4001, 37)],
                         ids=["rows", "long-rows", "short-rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_large_activation_passes_do_not_depend_on_the_thread_count(dtype, shape):
    """From 131072 elements the activation passes go in shares over the
    kernel threads: the bits are those of one thread, and those of the same
    rows taken alone (a call too small to be split)."""
    rng = np.random.default_rng(21)
    z = (4 * rng.standard_normal(shape)).astype(dtype)
    z.ravel()[::997] = np.array([np.nan, np.inf, -np.inf, -0.0, 90.0, -120.0], dtype)[
        np.arange(z.ravel()[::997].size) % 6]
    dy = rng.standard_normal(shape).astype(dtype)
    bias = rng.standard_normal(shape[1]).astype(dtype)
    assert z.size >= 131072
    k = max(1, 60000 // shape[1])   # rows in a call below the threshold
    try:
        for name in ops.ACTIVATIONS:
            _core.set_kernel_threads(1)
            one = _act_bytes(name, z, dy, bias)
            part = _act_bytes(name, z[:k], dy[:k], bias)
            for got, small in zip(one[:5], part[:5]):   # all but dbias, a sum over rows
                row_bytes = len(small) // k
                assert got[:len(small)] == small, name
                assert len(got) == row_bytes * shape[0]
            for n in (2, 3, 7):
                _core.set_kernel_threads(n)
                assert _act_bytes(name, z, dy, bias) == one, (name, n)
    finally:
        _core.set_kernel_threads(0)


# ---------------------------------------------------------------------------
# 2. Finite-difference gradient checks (float64)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("act, alpha", ACT_CASES)
def test_fd_activation_backward(act, alpha):
    rng = np.random.default_rng([len(act), 11])
    z = away_from_zero(normal(rng, (4, 5)))
    g = normal(rng, (4, 5), std=1.0)

    def f():
        return float(np.sum(g * ops.activation_forward(z, act, alpha=alpha)))

    y = ops.activation_forward(z, act, alpha=alpha)
    analytic = ops.activation_backward(g, y, act, x=z, alpha=alpha)
    assert_grad_close(analytic, numerical_grad(f, z), f"{act}: dx")


def _dense_fd_data(seed, shape=(3, 4, 5), margin=0.05):
    """x, kernel, bias, dout with every z = x @ kernel + bias at least
    `margin` away from 0 (relu's kink), found by trying seeds in order."""
    B, I, O = shape
    for s in range(100):
        rng = np.random.default_rng([seed, s])
        x, k, b = normal(rng, (B, I), std=1.0), normal(rng, (I, O), std=1.0), normal(rng, O, std=1.0)
        if np.min(np.abs(x @ k + b)) > margin:
            return x, k, b, normal(rng, (B, O), std=1.0)
    raise AssertionError("no seed gave z away from 0")


@pytest.mark.parametrize("act, alpha", ACT_CASES)
def test_fd_dense_backward(act, alpha):
    x, k, b, g = _dense_fd_data(len(act))
    B, O = g.shape

    def f():
        return float(np.sum(g * ops.dense_forward(x, k, b, activation=act, alpha=alpha)))

    pre = np.empty((B, O))
    out = ops.dense_forward(x, k, b, activation=act, pre=pre, alpha=alpha)
    dx, dk, db = ops.dense_backward(g, x, k, out, activation=act, pre=pre, alpha=alpha)
    assert_grad_close(dk, numerical_grad(f, k), f"{act}: dkernel")
    assert_grad_close(db, numerical_grad(f, b), f"{act}: dbias")
    assert_grad_close(dx, numerical_grad(f, x), f"{act}: dx")


@pytest.mark.parametrize("loss, from_logits, delta", LOSS_CASES)
def test_fd_loss(loss, from_logits, delta):
    rng = np.random.default_rng([len(loss), from_logits, 7])
    t, p = make_loss_data(loss, from_logits, (3, 4), rng, delta)

    def f():
        return ops.loss_forward_backward(t, p, loss, from_logits=from_logits,
                                         delta=delta, grad=False)[0]

    _, d = ops.loss_forward_backward(t, p, loss, from_logits=from_logits, delta=delta)
    assert_grad_close(d, numerical_grad(f, p), f"{loss} from_logits={from_logits}: dy_pred")


# ---------------------------------------------------------------------------
# 3. Losses vs NumPy
# ---------------------------------------------------------------------------

# rows of 16 classes or more take the vectorized exponential, in blocks of 512
LOSS_SHAPES = [(1, 1), (1, 3), (7, 13), (32, 10), (5, 600), (3, 520)]


@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("loss, from_logits, delta", LOSS_CASES)
def test_loss_vs_numpy(loss, from_logits, delta, dtype, shape):
    rng = np.random.default_rng([len(loss), from_logits, shape[0], shape[1]])
    t, p = make_loss_data(loss, from_logits, shape, rng, delta)
    p = p.astype(dtype)
    if loss != "sparse_categorical_crossentropy":
        t = t.astype(dtype)  # the kernel computes on targets of y_pred's dtype
    rows_want, grad_want = ref_rows_grad(loss, t, p, from_logits, delta)

    value, d, rows = ops.loss_forward_backward(t, p, loss, from_logits=from_logits,
                                               delta=delta, per_sample=True)
    assert isinstance(value, float)
    np.testing.assert_allclose(value, rows_want.mean(), rtol=RTOL[dtype], atol=0)
    assert rows.dtype == dtype and d.dtype == dtype
    assert_close(rows, rows_want, dtype, bound=np.max(np.abs(rows_want)))
    assert_close(d, grad_want, dtype, bound=np.max(np.abs(grad_want)))

    value2, d2 = ops.loss_forward_backward(t, p, loss, from_logits=from_logits,
                                           delta=delta, grad=False)
    assert d2 is None
    assert value2 == value


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_huber_delta_changes_the_loss(dtype):
    rng = np.random.default_rng(3)
    t = rng.standard_normal((5, 6)).astype(dtype)
    p = (t + 3 * rng.standard_normal((5, 6))).astype(dtype)
    for delta in (0.1, 1.0, 5.0):
        value, d = ops.loss_forward_backward(t, p, "huber", delta=delta)
        rows, grad = ref_rows_grad("huber", t, p, delta=delta)
        np.testing.assert_allclose(value, rows.mean(), rtol=RTOL[dtype])
        assert_close(d, grad, dtype, bound=np.max(np.abs(grad)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("loss", LOGIT_LOSSES)
def test_loss_large_logits(loss, dtype):
    """Logits of magnitude ~1e4: finite and equal to the float64 reference."""
    rng = np.random.default_rng([len(loss), 99])
    shape = (6, 5)
    t, _ = make_loss_data(loss, True, shape, rng)
    z = (1e4 * rng.standard_normal(shape)).astype(dtype)
    z[0] = np.array([1e4, -1e4, 1e4, -1e4, 0.0])  # ties and exact extremes
    if loss != "sparse_categorical_crossentropy":
        t = t.astype(dtype)
    rows_want, grad_want = ref_rows_grad(loss, t, z, from_logits=True)
    assert np.all(np.isfinite(rows_want))

    value, d, rows = ops.loss_forward_backward(t, z, loss, from_logits=True, per_sample=True)
    assert np.isfinite(value) and np.all(np.isfinite(rows)) and np.all(np.isfinite(d))
    np.testing.assert_allclose(value, rows_want.mean(), rtol=RTOL[dtype])
    assert_close(rows, rows_want, dtype, bound=np.max(np.abs(rows_want)))
    assert_close(d, grad_want, dtype, bound=np.max(np.abs(grad_want)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bce_clip_at_0_and_1(dtype):
    p = np.array([[0.0, 1.0, 0.0, 1.0, 0.5],
                  [1.0, 0.0, 0.3, 1e-9, 1 - 1e-9]], dtype)
    t = np.array([[0.0, 1.0, 1.0, 0.0, 0.5],
                  [0.3, 0.7, 1.0, 1.0, 0.0]], dtype)
    rows_want, grad_want = ref_rows_grad("binary_crossentropy", t, p)
    value, d, rows = ops.loss_forward_backward(t, p, "binary_crossentropy", per_sample=True)
    assert np.isfinite(value) and np.all(np.isfinite(d))
    np.testing.assert_allclose(value, rows_want.mean(), rtol=RTOL[dtype])
    assert_close(rows, rows_want, dtype, bound=np.max(rows_want))
    # no gradient through the clip at exactly 0 and 1
    clipped = (p.astype(F64) < EPS) | (p.astype(F64) > 1 - EPS)
    assert np.all(d[clipped] == 0)
    assert_close(d, grad_want, dtype, bound=np.max(np.abs(grad_want)))
    # -log(eps) where the target disagrees completely with a clipped 0 or 1
    assert rows[0] == pytest.approx((2 * -np.log(EPS) + 2 * -np.log1p(-EPS) + np.log(2)) / 5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("loss", ["categorical_crossentropy", "sparse_categorical_crossentropy"])
def test_cce_clip_at_0_and_1(loss, dtype):
    p = np.array([[1.0, 0.0, 0.0],     # q = (1, 0, 0): both clip edges
                  [0.0, 0.5, 0.5],     # q_0 = 0 under the target: -log(eps)
                  [0.2, 0.3, 0.5]], dtype)
    labels = np.array([0, 0, 2])
    t = one_hot(labels, 3).astype(dtype) if loss == "categorical_crossentropy" else labels
    rows_want, grad_want = ref_rows_grad(loss, t, p)
    value, d, rows = ops.loss_forward_backward(t, p, loss, per_sample=True)
    assert np.isfinite(value) and np.all(np.isfinite(d)) and np.all(np.isfinite(rows))
    assert rows[1] == pytest.approx(-np.log(EPS), rel=RTOL[dtype])
    np.testing.assert_allclose(value, rows_want.mean(), rtol=RTOL[dtype])
    assert_close(rows, rows_want, dtype, bound=np.max(rows_want))
    assert_close(d, grad_want, dtype, bound=np.max(np.abs(grad_want)))


def test_sparse_labels_match_one_hot_and_accept_column():
    rng = np.random.default_rng(5)
    p = rng.uniform(0.1, 1.0, (6, 4))
    labels = rng.integers(0, 4, 6)
    for from_logits in (False, True):
        want = ops.loss_forward_backward(one_hot(labels, 4), p, "categorical_crossentropy",
                                         from_logits=from_logits, per_sample=True)
        for lab in (labels, labels.reshape(6, 1), labels.astype(np.int32),
                    labels.astype(F64), list(labels)):
            got = ops.loss_forward_backward(lab, p, "sparse_categorical_crossentropy",
                                            from_logits=from_logits, per_sample=True)
            assert got[0] == pytest.approx(want[0], rel=1e-14)
            np.testing.assert_allclose(got[1], want[1], rtol=1e-14, atol=0)
            np.testing.assert_allclose(got[2], want[2], rtol=1e-14, atol=0)


def test_sparse_labels_out_of_range_refused_in_every_layout():
    # contiguous int64 labels take a one-pass range check, the rest NumPy's
    p = np.full((6, 4), 0.25)
    base = np.array([0, 1, 2, 3, 2, 1], np.int64)
    for row, value in ((0, -1), (5, 4), (3, 2**40)):
        bad = base.copy()
        bad[row] = value
        wide = np.stack([bad, bad], axis=1)[:, 0]          # strided int64
        for lab in (bad, wide, bad.astype(np.int32) if abs(value) < 2**31 else bad,
                    bad.astype(F64)):
            with pytest.raises(ValueError, match=f"at row {row} is outside"):
                ops.loss_forward_backward(lab, p, "sparse_categorical_crossentropy")
    assert ops.loss_forward_backward(base, p, "sparse_categorical_crossentropy")[0] == \
        pytest.approx(np.log(4.0), rel=1e-15)
    # the compiled range check itself refuses a misaligned buffer
    raw = np.zeros(6 * 8 + 1, np.uint8)[1:].view(np.int64)
    assert not raw.flags.aligned
    with pytest.raises(ValueError, match="aligned"):
        _core.label_range(raw)
    assert _core.label_range(base) == (0, 3)


# ---------------------------------------------------------------------------
# 4. dense_forward / dense_backward / matmul vs NumPy
# ---------------------------------------------------------------------------

# (batch, in, units): size 1, odd sizes, > 512 units (column blocks of the
# bias reduction), an empty batch and an empty input.
DENSE_SIZES = [(1, 1, 1), (33, 17, 29), (5, 3, 600), (4, 2, 1100), (0, 3, 4), (3, 0, 4)]
DENSE_FACTOR = {F32: 10.0, F64: 1.0}  # float32 GEMM sums of up to 33 terms


def _dense_data(act, dtype, size):
    B, I, O = size
    rng = np.random.default_rng([len(act), B, I, O])
    x = normal(rng, (B, I), dtype, std=1.0)
    k = normal(rng, (I, O), dtype, std=1.0)
    b = normal(rng, O, dtype, std=1.0)
    g = normal(rng, (B, O), dtype, std=1.0)
    return x, k, b, g


@pytest.mark.parametrize("size", DENSE_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act, alpha", ACT_CASES)
def test_dense_forward(act, alpha, dtype, size):
    """pre = x @ kernel + bias against float64 within a bound of the
    magnitudes summed; out = act(pre) relative to each value, from the
    kernel's own pre (so that the GEMM's rounding is not counted twice)."""
    x, k, b, _ = _dense_data(act, dtype, size)
    f = DENSE_FACTOR[dtype]
    x64, k64, b64 = x.astype(F64), k.astype(F64), b.astype(F64)
    for bias, z, zb in [(b, x64 @ k64 + b64, np.abs(x64) @ np.abs(k64) + np.abs(b64)),
                        (None, x64 @ k64, np.abs(x64) @ np.abs(k64))]:
        out = np.full((size[0], size[2]), np.nan, dtype)
        pre = np.full((size[0], size[2]), np.nan, dtype)
        got = ops.dense_forward(x, k, bias, activation=act, out=out, pre=pre, alpha=alpha)
        assert got is out
        assert_close(pre, z, dtype, zb, factor=f)
        # softmax sums its row: relative to the row's largest probability
        assert_close(out, ref_act(act, pre, alpha), dtype,
                     out.max(axis=1, keepdims=True) if act == "softmax" and out.size else 0.0)
        assert_close(ops.dense_forward(x, k, bias, activation=act, alpha=alpha), out, dtype)


@pytest.mark.parametrize("size", DENSE_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act, alpha", ACT_CASES)
def test_dense_backward(act, alpha, dtype, size):
    x, k, b, g = _dense_data(act, dtype, size)
    B, I, O = size
    x64, k64 = x.astype(F64), k.astype(F64)
    z = x64 @ k64 + b.astype(F64)
    out, pre = ref_act(act, z, alpha).astype(dtype), z.astype(dtype)
    *want, bounds = ref_dense_backward(g, x, k, pre, act, alpha, y=out)
    f = DENSE_FACTOR[dtype]

    def assert_grads(dx, dk, db):
        for got, w, bd in zip((dx, dk, db), want, bounds):
            assert_close(got, w, dtype, bd, factor=f)

    # outputs pre-filled with NaN: the kernels must overwrite, not accumulate
    bufs = {"dkernel": np.full((I, O), np.nan, dtype), "dbias": np.full(O, np.nan, dtype),
                "dx": np.full((B, I), np.nan, dtype)}
    dx, dk, db = ops.dense_backward(g, x, k, out, activation=act, alpha=alpha,
                                    pre=pre if act in ops.NEEDS_PRE else None, **bufs)
    assert dx is bufs["dx"] and dk is bufs["dkernel"] and db is bufs["dbias"]
    assert_grads(dx, dk, db)

    # with pre= given to every activation, and fresh outputs
    dx, dk, db = ops.dense_backward(g, x, k, out, activation=act, alpha=alpha, pre=pre)
    assert dx.dtype == dk.dtype == db.dtype == dtype
    assert_grads(dx, dk, db)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("use_bias, need_dx", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("act", ["linear", "relu", "gelu", "softmax"])
def test_dense_backward_options(act, use_bias, need_dx, dtype):
    size = (9, 5, 7)
    x, k, _, g = _dense_data(act, dtype, size)
    x64, k64 = x.astype(F64), k.astype(F64)
    z = x64 @ k64
    pre = z.astype(dtype)
    out = ops.dense_forward(x, k, None, activation=act)
    rdx, rdk, rdb, (bx, bk, bb) = ref_dense_backward(g, x, k, pre, act, y=out)
    dx, dk, db = ops.dense_backward(g, x, k, out, activation=act, pre=pre,
                                    use_bias=use_bias, need_dx=need_dx)
    f = DENSE_FACTOR[dtype]
    assert_close(dk, rdk, dtype, bk, factor=f)
    if use_bias:
        assert_close(db, rdb, dtype, bb, factor=f)
    else:
        assert db is None
    if need_dx:
        assert_close(dx, rdx, dtype, bx, factor=f)
    else:
        assert dx is None


# one row past 131072 matrix elements: the product is split over threads
# (by terms of the sum, or by outputs; not by terms past 1024 outputs); from
# 2^19 multiply-adds, by output columns (N >= M) or rows, in uneven shares
MATMUL_SIZES = [(1, 1, 1), (33, 17, 29), (2, 700, 3), (5, 0, 3), (0, 4, 2), (4, 3, 0),
                (1, 517, 263), (1, 130, 1100), (40, 150, 90), (130, 90, 50)]


@pytest.mark.parametrize("mkn", MATMUL_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("trans_a", [False, True], ids=["N", "T"])
@pytest.mark.parametrize("trans_b", [False, True], ids=["N", "T"])
def test_matmul(trans_a, trans_b, dtype, mkn):
    m, k, n = mkn
    rng = np.random.default_rng([m, k, n, trans_a, trans_b])
    a = normal(rng, (k, m) if trans_a else (m, k), dtype, std=1.0)
    b = normal(rng, (n, k) if trans_b else (k, n), dtype, std=1.0)
    a64, b64 = a.astype(F64), b.astype(F64)
    op_a, op_b = (a64.T if trans_a else a64), (b64.T if trans_b else b64)
    want, bound = op_a @ op_b, np.abs(op_a) @ np.abs(op_b)
    f = 10.0 if dtype == F32 else 1.0

    assert_close(ops.matmul(a, b, trans_a=trans_a, trans_b=trans_b), want, dtype, bound, f)
    out = np.full((m, n), np.nan, dtype)
    got = ops.matmul(a, b, out=out, trans_a=trans_a, trans_b=trans_b)
    assert_close(got, want, dtype, bound, f)
    assert_close(out, want, dtype, bound, f)  # written in place


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("trans_a", [False, True], ids=["N", "T"])
@pytest.mark.parametrize("trans_b", [False, True], ids=["N", "T"])
@pytest.mark.parametrize("mkn", [(1, 777, 333), (70, 300, 333), (333, 300, 70)],
                         ids=["one-row", "by-columns", "by-rows"])
def test_split_products_do_not_depend_on_the_thread_count(mkn, trans_b, trans_a, dtype):
    m, k, n = mkn
    rng = np.random.default_rng(4)
    a = normal(rng, (k, m) if trans_a else (m, k), dtype, std=1.0)
    b = normal(rng, (n, k) if trans_b else (k, n), dtype, std=1.0)
    try:
        _core.set_kernel_threads(1)
        want = ops.matmul(a, b, trans_a=trans_a, trans_b=trans_b).tobytes()
        for threads in (2, 3, 4):
            _core.set_kernel_threads(threads)
            for _ in range(3):
                got = ops.matmul(a, b, trans_a=trans_a, trans_b=trans_b)
                assert got.tobytes() == want, threads
    finally:
        _core.set_kernel_threads(0)


# ---------------------------------------------------------------------------
# 5. sgd_step
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.0, True), (0.9, False),
                                                (0.9, True), (0.5, True)])
def test_sgd_step(momentum, nesterov, dtype):
    rng = np.random.default_rng([int(10 * momentum), nesterov])
    n, lr = 37, 0.05
    params = rng.standard_normal(n).astype(dtype)
    velocity = np.zeros(n, dtype) if momentum else None
    p_ref, v_ref = params.astype(F64), np.zeros(n)
    for _ in range(6):
        g = rng.standard_normal(n).astype(dtype)
        g64 = g.astype(F64)
        if momentum == 0:
            p_ref = p_ref - lr * g64
        else:
            v_ref = momentum * v_ref - lr * g64
            p_ref = p_ref + (momentum * v_ref - lr * g64 if nesterov else v_ref)
        report = ops.sgd_step(params, g, lr, momentum=momentum, nesterov=nesterov,
                              velocity=velocity)
        assert_close(params, p_ref, dtype)  # updated in place
        if momentum:
            assert_close(velocity, v_ref, dtype)
        # the returned report: the gradient's norm, nothing clipped
        assert report["global_norm"] == pytest.approx(np.linalg.norm(g64), rel=1e-6)
        np.testing.assert_allclose(report["grad_norms"], [np.linalg.norm(g64)], rtol=1e-6)
        assert not report["clipped"] and not report["nonfinite"]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_step_skips_non_finite_gradients(momentum):
    """Documented: a step with a non-finite gradient changes nothing."""
    params, velocity = np.linspace(-1, 1, 5), np.full(5, 0.25)
    for bad in (np.nan, np.inf):
        g = np.array([1.0, 2.0, bad, 3.0, 4.0])
        report = ops.sgd_step(params, g, 0.1, momentum=momentum,
                              velocity=velocity if momentum else None)
        assert report["nonfinite"]
        np.testing.assert_array_equal(params, np.linspace(-1, 1, 5))
        np.testing.assert_array_equal(velocity, 0.25)


def test_sgd_nesterov_differs_from_plain_momentum():
    p1, p2 = np.ones(4), np.ones(4)
    v1, v2 = np.full(4, 0.5), np.full(4, 0.5)
    g = np.array([1.0, -2.0, 0.5, 0.0])
    ops.sgd_step(p1, g, 0.1, momentum=0.9, nesterov=False, velocity=v1)
    ops.sgd_step(p2, g, 0.1, momentum=0.9, nesterov=True, velocity=v2)
    np.testing.assert_allclose(v1, 0.9 * 0.5 - 0.1 * g, rtol=1e-15)
    np.testing.assert_allclose(v2, v1, rtol=1e-15)
    np.testing.assert_allclose(p1, 1 + v1, rtol=1e-15)
    np.testing.assert_allclose(p2, 1 + 0.9 * v2 - 0.1 * g, rtol=1e-15)


# ---------------------------------------------------------------------------
# 6. sum_squares
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_any_abs_above_matches_numpy_across_block_edges(dtype):
    """clipvalue's record: whether some |x| > limit, in blocks of 1024."""
    from fastgrad import _core
    rng = np.random.default_rng(21)
    for n in (0, 1, 1023, 1024, 1025, 5000):
        for where in ([] if n == 0 else [0, n // 2, n - 1]) + [None]:
            x = rng.uniform(-0.5, 0.5, n).astype(dtype)
            if where is not None:
                x[where] = -0.75 if where % 2 else 0.75
            assert _core.any_abs_above(x, 0.6) == bool(np.any(np.abs(x) > 0.6))
            if n > 1:   # NaN, elsewhere, is never above
                x[(where or 0) + 1 if (where or 0) + 1 < n else 0] = np.nan
                assert _core.any_abs_above(x, 0.6) == (where is not None)


def test_sum_squares_float32_accumulates_in_double():
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(1_000_000) + 3.0).astype(F32)
    want = np.sum(x.astype(F64) ** 2)
    got = ops.sum_squares(x)
    assert isinstance(got, float)
    # a float32 accumulator would be off by ~1e-4 relative here
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(0,), (1,), (3,), (7,), (1001,), (13, 17), (2, 3, 5), ()])
def test_sum_squares_shapes(shape, dtype):
    rng = np.random.default_rng(len(shape))
    x = rng.standard_normal(shape).astype(dtype)
    assert ops.sum_squares(x) == pytest.approx(np.sum(x.astype(F64) ** 2), rel=1e-13, abs=0)


# ---------------------------------------------------------------------------
# Return values: the documented ``out`` array itself
# ---------------------------------------------------------------------------

def _ret_matmul(dt, out):
    return ops.matmul(np.ones((2, 3), dt), np.ones((3, 4), dt), out=out)


def _ret_dense_forward(dt, out):
    return ops.dense_forward(np.ones((2, 3), dt), np.ones((3, 4), dt), np.ones(4, dt), out=out)


def _ret_activation_forward(dt, out):
    return ops.activation_forward(np.ones((2, 4), dt), "tanh", out=out)


def _ret_activation_backward(dt, out):
    return ops.activation_backward(np.ones((2, 4), dt), np.full((2, 4), 0.5, dt), "tanh", dx=out)


@pytest.mark.parametrize("with_out", [False, True], ids=["new", "given"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("call", [_ret_matmul, _ret_dense_forward, _ret_activation_forward,
                                  _ret_activation_backward],
                         ids=lambda f: f.__name__[len("_ret_"):])
def test_returns_the_out_ndarray(call, dtype, with_out):
    """"Returns ``out``": a NumPy array of the computation's dtype, and the
    caller's buffer itself when one is given."""
    out = np.full((2, 4), np.nan, dtype) if with_out else None
    got = call(dtype, out)
    assert isinstance(got, np.ndarray), f"returned {type(got).__name__}, not an ndarray"
    assert got.dtype == dtype and got.shape == (2, 4)
    if with_out:
        assert got is out


def test_dense_backward_and_sgd_return_values():
    x, k, g = np.ones((2, 3)), np.ones((3, 4)), np.ones((2, 4))
    dx, dk, db = ops.dense_backward(g, x, k, g)
    assert all(isinstance(a, np.ndarray) for a in (dx, dk, db))
    report = ops.sgd_step(np.ones(3), np.ones(3), 0.1)
    assert isinstance(report, dict)
    assert {"grad_norms", "global_norm", "clip_scale", "clipped", "nonfinite"} <= set(report)


# ---------------------------------------------------------------------------
# 7. Validation and layouts
# ---------------------------------------------------------------------------

def _a(*shape, dtype=F64):
    return np.ones(shape, dtype)


def _fortran(*shape, dtype=F64):
    return np.asfortranarray(np.ones(shape, dtype))


def _strided(*shape, dtype=F64):
    return np.ones(tuple(2 * s for s in shape), dtype)[(slice(None, None, 2),) * len(shape)]


# (id, call, exception, message pattern: the argument's name opens the message)
_BAD = [
    # matmul
    ("matmul-a-int", lambda: ops.matmul(_a(2, 3, dtype=np.int64), _a(3, 2)), TypeError, "^a:"),
    ("matmul-a-list", lambda: ops.matmul([[1.0, 2.0]], _a(2, 2)), TypeError, "^a:"),
    ("matmul-b-mixed", lambda: ops.matmul(_a(2, 3), _a(3, 2, dtype=F32)), TypeError, "^b:"),
    ("matmul-b-list", lambda: ops.matmul(_a(2, 3), [[1.0]] * 3), TypeError, "^b:"),
    ("matmul-a-1d", lambda: ops.matmul(_a(3), _a(3, 2)), ValueError, "^a:"),
    ("matmul-b-3d", lambda: ops.matmul(_a(2, 3), _a(3, 2, 1)), ValueError, "^b:"),
    ("matmul-inner", lambda: ops.matmul(_a(2, 3), _a(4, 2)), ValueError, "^b:"),
    ("matmul-inner-T", lambda: ops.matmul(_a(2, 3), _a(3, 2), trans_a=True), ValueError, "^b:"),
    ("matmul-out-shape", lambda: ops.matmul(_a(2, 3), _a(3, 4), out=_a(2, 3)), ValueError, "^out:"),
    ("matmul-out-fortran", lambda: ops.matmul(_a(2, 3), _a(3, 4), out=_fortran(2, 4)), ValueError, "^out:"),
    ("matmul-out-strided", lambda: ops.matmul(_a(2, 3), _a(3, 4), out=_strided(2, 4)), ValueError, "^out:"),
    ("matmul-out-readonly", lambda: ops.matmul(_a(2, 3), _a(3, 4), out=readonly(_a(2, 4))), ValueError, "^out:"),
    ("matmul-out-dtype", lambda: ops.matmul(_a(2, 3), _a(3, 4), out=_a(2, 4, dtype=F32)), TypeError, "^out:"),
    # dense_forward
    ("dfwd-x-int", lambda: ops.dense_forward(_a(2, 3, dtype=np.int32), _a(3, 4)), TypeError, "^x:"),
    ("dfwd-x-list", lambda: ops.dense_forward([[1.0, 2.0, 3.0]], _a(3, 4)), TypeError, "^x:"),
    ("dfwd-kernel-mixed", lambda: ops.dense_forward(_a(2, 3), _a(3, 4, dtype=F32)), TypeError, "^kernel:"),
    ("dfwd-kernel-list", lambda: ops.dense_forward(_a(2, 3), [[1.0]] * 3), TypeError, "^kernel:"),
    ("dfwd-bias-mixed", lambda: ops.dense_forward(_a(2, 3), _a(3, 4), _a(4, dtype=F32)), TypeError, "^bias:"),
    ("dfwd-x-1d", lambda: ops.dense_forward(_a(3), _a(3, 4)), ValueError, "^x:"),
    ("dfwd-kernel-rows", lambda: ops.dense_forward(_a(2, 3), _a(4, 4)), ValueError, "^kernel:"),
    ("dfwd-kernel-1d", lambda: ops.dense_forward(_a(2, 3), _a(3)), ValueError, "^kernel:"),
    ("dfwd-bias-shape", lambda: ops.dense_forward(_a(2, 3), _a(3, 4), _a(3)), ValueError, "^bias:"),
    ("dfwd-bias-2d", lambda: ops.dense_forward(_a(2, 3), _a(3, 4), _a(1, 4)), ValueError, "^bias:"),
    ("dfwd-act-unknown", lambda: ops.dense_forward(_a(2, 3), _a(3, 4), activation="swishy"), ValueError, "^activation:"),
    ("dfwd-act-type", lambda: ops.dense_forward(_a(2, 3), _a(3, 4), activation=1), TypeError, "^activation:"),
    ("dfwd-alpha-neg", lambda: ops.dense_forward(_a(2, 3), _a(3, 4), activation="leaky_relu", alpha=-0.1), ValueError, "^alpha:"),
    ("dfwd-out-shape", lambda: ops.dense_forward(_a(2, 3), _a(3, 4), out=_a(4, 2)), ValueError, "^out:"),
    ("dfwd-out-fortran", lambda: ops.dense_forward(_a(2, 3), _a(3, 4), out=_fortran(2, 4)), ValueError, "^out:"),
    ("dfwd-out-readonly", lambda: ops.dense_forward(_a(2, 3), _a(3, 4), out=readonly(_a(2, 4))), ValueError, "^out:"),
    ("dfwd-out-dtype", lambda: ops.dense_forward(_a(2, 3), _a(3, 4), out=_a(2, 4, dtype=F32)), TypeError, "^out:"),
    ("dfwd-pre-shape", lambda: ops.dense_forward(_a(2, 3), _a(3, 4), pre=_a(2, 3)), ValueError, "^pre:"),
    ("dfwd-pre-strided", lambda: ops.dense_forward(_a(2, 3), _a(3, 4), pre=_strided(2, 4)), ValueError, "^pre:"),
    ("dfwd-pre-readonly", lambda: ops.dense_forward(_a(2, 3), _a(3, 4), pre=readonly(_a(2, 4))), ValueError, "^pre:"),
    # dense_backward(dout, x, kernel, out)
    ("dbwd-dout-int", lambda: ops.dense_backward(_a(2, 4, dtype=np.int64), _a(2, 3), _a(3, 4), _a(2, 4)), TypeError, "^dout:"),
    ("dbwd-dout-list", lambda: ops.dense_backward([[0.0] * 4] * 2, _a(2, 3), _a(3, 4), _a(2, 4)), TypeError, "^dout:"),
    ("dbwd-x-mixed", lambda: ops.dense_backward(_a(2, 4), _a(2, 3, dtype=F32), _a(3, 4), _a(2, 4)), TypeError, "^x:"),
    ("dbwd-kernel-mixed", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4, dtype=F32), _a(2, 4)), TypeError, "^kernel:"),
    ("dbwd-out-mixed", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4), _a(2, 4, dtype=F32)), TypeError, "^out:"),
    ("dbwd-pre-mixed", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4), _a(2, 4), activation="gelu", pre=_a(2, 4, dtype=F32)), TypeError, "^pre:"),
    ("dbwd-dout-shape", lambda: ops.dense_backward(_a(2, 5), _a(2, 3), _a(3, 4), _a(2, 4)), ValueError, "^dout:"),
    ("dbwd-out-shape", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4), _a(3, 4)), ValueError, "^out:"),
    ("dbwd-kernel-rows", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(2, 4), _a(2, 4)), ValueError, "^kernel:"),
    ("dbwd-x-1d", lambda: ops.dense_backward(_a(2, 4), _a(3), _a(3, 4), _a(2, 4)), ValueError, "^x:"),
    ("dbwd-pre-missing-gelu", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4), _a(2, 4), activation="gelu"), ValueError, "^pre:"),
    ("dbwd-pre-missing-silu", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4), _a(2, 4), activation="silu"), ValueError, "^pre:"),
    ("dbwd-pre-shape", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4), _a(2, 4), activation="silu", pre=_a(4, 2)), ValueError, "^pre:"),
    ("dbwd-act-unknown", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4), _a(2, 4), activation="Relu"), ValueError, "^activation:"),
    ("dbwd-dkernel-shape", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4), _a(2, 4), dkernel=_a(4, 3)), ValueError, "^dkernel:"),
    ("dbwd-dkernel-fortran", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4), _a(2, 4), dkernel=_fortran(3, 4)), ValueError, "^dkernel:"),
    ("dbwd-dkernel-readonly", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4), _a(2, 4), dkernel=readonly(_a(3, 4))), ValueError, "^dkernel:"),
    ("dbwd-dkernel-dtype", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4), _a(2, 4), dkernel=_a(3, 4, dtype=F32)), TypeError, "^dkernel:"),
    ("dbwd-dbias-shape", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4), _a(2, 4), dbias=_a(3)), ValueError, "^dbias:"),
    ("dbwd-dbias-strided", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4), _a(2, 4), dbias=_strided(4)), ValueError, "^dbias:"),
    ("dbwd-dbias-readonly", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4), _a(2, 4), dbias=readonly(_a(4))), ValueError, "^dbias:"),
    ("dbwd-dx-shape", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4), _a(2, 4), dx=_a(2, 4)), ValueError, "^dx:"),
    ("dbwd-dx-fortran", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4), _a(2, 4), dx=_fortran(2, 3)), ValueError, "^dx:"),
    ("dbwd-dx-readonly", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4), _a(2, 4), dx=readonly(_a(2, 3))), ValueError, "^dx:"),
    ("dbwd-dx-dtype", lambda: ops.dense_backward(_a(2, 4), _a(2, 3), _a(3, 4), _a(2, 4), dx=_a(2, 3, dtype=F32)), TypeError, "^dx:"),
    # activation_forward(x, activation)
    ("afwd-x-int", lambda: ops.activation_forward(_a(2, 3, dtype=np.int64), "relu"), TypeError, "^x:"),
    ("afwd-x-float16", lambda: ops.activation_forward(_a(2, 3, dtype=np.float16), "relu"), TypeError, "^x:"),
    ("afwd-x-list", lambda: ops.activation_forward([[1.0, -1.0]], "relu"), TypeError, "^x:"),
    ("afwd-x-3d", lambda: ops.activation_forward(_a(2, 3, 4), "relu"), ValueError, "^x:"),
    ("afwd-x-1d", lambda: ops.activation_forward(_a(3), "softmax"), ValueError, "^x:"),
    ("afwd-act-unknown", lambda: ops.activation_forward(_a(2, 3), "softplux"), ValueError, "^activation:"),
    ("afwd-act-none", lambda: ops.activation_forward(_a(2, 3), None), TypeError, "^activation:"),
    ("afwd-alpha-neg", lambda: ops.activation_forward(_a(2, 3), "elu", alpha=-1.0), ValueError, "^alpha:"),
    ("afwd-out-shape", lambda: ops.activation_forward(_a(2, 3), "relu", out=_a(3, 2)), ValueError, "^out:"),
    ("afwd-out-fortran", lambda: ops.activation_forward(_a(2, 3), "relu", out=_fortran(2, 3)), ValueError, "^out:"),
    ("afwd-out-readonly", lambda: ops.activation_forward(_a(2, 3), "relu", out=readonly(_a(2, 3))), ValueError, "^out:"),
    ("afwd-out-dtype", lambda: ops.activation_forward(_a(2, 3), "relu", out=_a(2, 3, dtype=F32)), TypeError, "^out:"),
    ("afwd-out-list", lambda: ops.activation_forward(_a(2, 3), "relu", out=[[0.0] * 3] * 2), TypeError, "^out:"),
    ("afwd-pre-shape", lambda: ops.activation_forward(_a(2, 3), "gelu", pre=_a(2, 4)), ValueError, "^pre:"),
    ("afwd-pre-strided", lambda: ops.activation_forward(_a(2, 3), "gelu", pre=_strided(2, 3)), ValueError, "^pre:"),
    ("afwd-pre-readonly", lambda: ops.activation_forward(_a(2, 3), "gelu", pre=readonly(_a(2, 3))), ValueError, "^pre:"),
    # activation_backward(dout, out, activation)
    ("abwd-dout-int", lambda: ops.activation_backward(_a(2, 3, dtype=np.int64), _a(2, 3), "relu"), TypeError, "^dout:"),
    ("abwd-dout-list", lambda: ops.activation_backward([[1.0]], _a(1, 1), "relu"), TypeError, "^dout:"),
    ("abwd-out-mixed", lambda: ops.activation_backward(_a(2, 3), _a(2, 3, dtype=F32), "relu"), TypeError, "^out:"),
    ("abwd-out-shape", lambda: ops.activation_backward(_a(2, 3), _a(3, 2), "relu"), ValueError, "^out:"),
    ("abwd-x-mixed", lambda: ops.activation_backward(_a(2, 3), _a(2, 3), "gelu", x=_a(2, 3, dtype=F32)), TypeError, "^x:"),
    ("abwd-x-shape", lambda: ops.activation_backward(_a(2, 3), _a(2, 3), "gelu", x=_a(2, 4)), ValueError, "^x:"),
    ("abwd-x-missing-gelu", lambda: ops.activation_backward(_a(2, 3), _a(2, 3), "gelu"), ValueError, "^x:"),
    ("abwd-x-missing-silu", lambda: ops.activation_backward(_a(2, 3), _a(2, 3), "silu"), ValueError, "^x:"),
    ("abwd-act-unknown", lambda: ops.activation_backward(_a(2, 3), _a(2, 3), "hard_sigmoidal"), ValueError, "^activation:"),
    ("abwd-dx-shape", lambda: ops.activation_backward(_a(2, 3), _a(2, 3), "relu", dx=_a(2, 2)), ValueError, "^dx:"),
    ("abwd-dx-fortran", lambda: ops.activation_backward(_a(2, 3), _a(2, 3), "relu", dx=_fortran(2, 3)), ValueError, "^dx:"),
    ("abwd-dx-readonly", lambda: ops.activation_backward(_a(2, 3), _a(2, 3), "relu", dx=readonly(_a(2, 3))), ValueError, "^dx:"),
    ("abwd-dx-dtype", lambda: ops.activation_backward(_a(2, 3), _a(2, 3), "relu", dx=_a(2, 3, dtype=F32)), TypeError, "^dx:"),
    # loss_forward_backward(y_true, y_pred, loss)
    ("loss-unknown", lambda: ops.loss_forward_backward(_a(2, 3), _a(2, 3), "cross_entropy"), ValueError, "^loss:"),
    ("loss-not-str", lambda: ops.loss_forward_backward(_a(2, 3), _a(2, 3), 0), ValueError, "^loss:"),
    ("loss-pred-int", lambda: ops.loss_forward_backward(_a(2, 3), _a(2, 3, dtype=np.int64), "mse"), TypeError, "^y_pred:"),
    ("loss-pred-list", lambda: ops.loss_forward_backward(_a(1, 2), [[0.5, 0.5]], "mse"), TypeError, "^y_pred:"),
    ("loss-pred-1d", lambda: ops.loss_forward_backward(_a(3), _a(3), "mse"), ValueError, "^y_pred:"),
    ("loss-true-shape", lambda: ops.loss_forward_backward(_a(2, 4), _a(2, 3), "mse"), ValueError, "^y_true:"),
    ("loss-true-1d", lambda: ops.loss_forward_backward(_a(2), _a(2, 3), "categorical_crossentropy"), ValueError, "^y_true:"),
    ("loss-true-str", lambda: ops.loss_forward_backward(np.array([["a", "b"]]), _a(1, 2), "mae"), TypeError, "^y_true:"),
    ("loss-logits-mse", lambda: ops.loss_forward_backward(_a(2, 3), _a(2, 3), "mse", from_logits=True), ValueError, "^from_logits:"),
    ("loss-logits-huber", lambda: ops.loss_forward_backward(_a(2, 3), _a(2, 3), "huber", from_logits=True), ValueError, "^from_logits:"),
    ("loss-delta-zero", lambda: ops.loss_forward_backward(_a(2, 3), _a(2, 3), "huber", delta=0.0), ValueError, "^delta:"),
    ("loss-delta-neg", lambda: ops.loss_forward_backward(_a(2, 3), _a(2, 3), "huber", delta=-1.0), ValueError, "^delta:"),
    ("scce-label-neg", lambda: ops.loss_forward_backward(np.array([0, -1]), _a(2, 3), "sparse_categorical_crossentropy"), ValueError, "^y_true:"),
    ("scce-label-high", lambda: ops.loss_forward_backward(np.array([3, 0]), _a(2, 3), "sparse_categorical_crossentropy"), ValueError, "^y_true:"),
    ("scce-label-high-logits", lambda: ops.loss_forward_backward(np.array([0, 7]), _a(2, 3), "sparse_categorical_crossentropy", from_logits=True), ValueError, "^y_true:"),
    ("scce-label-frac", lambda: ops.loss_forward_backward(np.array([0.5, 1.0]), _a(2, 3), "sparse_categorical_crossentropy"), ValueError, "^y_true:"),
    ("scce-label-nan", lambda: ops.loss_forward_backward(np.array([np.nan, 1.0]), _a(2, 3), "sparse_categorical_crossentropy"), ValueError, "^y_true:"),
    ("scce-label-count", lambda: ops.loss_forward_backward(np.array([0, 1, 2]), _a(2, 3), "sparse_categorical_crossentropy"), ValueError, "^y_true:"),
    ("scce-label-onehot", lambda: ops.loss_forward_backward(_a(2, 3), _a(2, 3), "sparse_categorical_crossentropy"), ValueError, "^y_true:"),
    ("scce-label-str", lambda: ops.loss_forward_backward(np.array(["0", "1"]), _a(2, 3), "sparse_categorical_crossentropy"), TypeError, "^y_true:"),
    # sgd_step(params, grads, learning_rate)
    ("sgd-params-int", lambda: ops.sgd_step(_a(3, dtype=np.int64), _a(3), 0.1), TypeError, "^params:"),
    ("sgd-params-list", lambda: ops.sgd_step([1.0, 2.0], _a(2), 0.1), TypeError, "^params:"),
    ("sgd-grads-mixed", lambda: ops.sgd_step(_a(3), _a(3, dtype=F32), 0.1), TypeError, "^grads:"),
    ("sgd-grads-list", lambda: ops.sgd_step(_a(3), [1.0, 2.0, 3.0], 0.1), TypeError, "^grads:"),
    ("sgd-params-2d", lambda: ops.sgd_step(_a(2, 3), _a(2, 3), 0.1), ValueError, "^params:"),
    ("sgd-params-strided", lambda: ops.sgd_step(_strided(3), _a(3), 0.1), ValueError, "^params:"),
    ("sgd-params-readonly", lambda: ops.sgd_step(readonly(_a(3)), _a(3), 0.1), ValueError, "^params:"),
    ("sgd-grads-shape", lambda: ops.sgd_step(_a(3), _a(4), 0.1), ValueError, "^grads:"),
    ("sgd-momentum-one", lambda: ops.sgd_step(_a(3), _a(3), 0.1, momentum=1.0, velocity=_a(3)), ValueError, "^momentum:"),
    ("sgd-lr-neg", lambda: ops.sgd_step(_a(3), _a(3), -0.1), ValueError, "^learning_rate:"),
    ("sgd-momentum-neg", lambda: ops.sgd_step(_a(3), _a(3), 0.1, momentum=-0.5, velocity=_a(3)), ValueError, "^momentum:"),
    ("sgd-velocity-missing", lambda: ops.sgd_step(_a(3), _a(3), 0.1, momentum=0.9), ValueError, "^velocity:"),
    ("sgd-velocity-shape", lambda: ops.sgd_step(_a(3), _a(3), 0.1, momentum=0.9, velocity=_a(2)), ValueError, "^velocity:"),
    ("sgd-velocity-strided", lambda: ops.sgd_step(_a(3), _a(3), 0.1, momentum=0.9, velocity=_strided(3)), ValueError, "^velocity:"),
    ("sgd-velocity-readonly", lambda: ops.sgd_step(_a(3), _a(3), 0.1, momentum=0.9, velocity=readonly(_a(3))), ValueError, "^velocity:"),
    ("sgd-velocity-dtype", lambda: ops.sgd_step(_a(3), _a(3), 0.1, momentum=0.9, velocity=_a(3, dtype=F32)), TypeError, "^velocity:"),
    ("sgd-velocity-list", lambda: ops.sgd_step(_a(3), _a(3), 0.1, momentum=0.9, velocity=[0.0] * 3), TypeError, "^velocity:"),
    # sum_squares(x)
    ("sumsq-int", lambda: ops.sum_squares(np.arange(4)), TypeError, "^x:"),
    ("sumsq-list", lambda: ops.sum_squares([1.0, 2.0]), TypeError, "^x:"),
    ("sumsq-complex", lambda: ops.sum_squares(np.ones(3, np.complex128)), TypeError, "^x:"),
]


@pytest.mark.parametrize("call, exc, match",
                         [pytest.param(c, e, m, id=i) for i, c, e, m in _BAD])
def test_validation_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_failed_validation_writes_nothing():
    params, velocity = np.ones(3), np.full(3, 0.5)
    with pytest.raises(ValueError):
        ops.sgd_step(params, np.ones(4), 0.1, momentum=0.9, velocity=velocity)
    np.testing.assert_array_equal(params, 1.0)
    np.testing.assert_array_equal(velocity, 0.5)
    dk = np.full((3, 4), 7.0)
    with pytest.raises(ValueError):
        ops.dense_backward(np.ones((2, 4)), np.ones((2, 3)), np.ones((3, 4)), np.ones((2, 4)),
                           dkernel=dk, dbias=np.ones(5))
    np.testing.assert_array_equal(dk, 7.0)


# Non-contiguous inputs give the same results as contiguous copies. Every
# result is computed twice (once from C-contiguous copies), so the only
# possible difference would come from the layout.

def _check_all(got, want, bounds, dtype, names):
    for g, w, b, what in zip(got, want, bounds, names):
        check(g, w, dtype, b, what)


# The layout tests compare results on non-contiguous inputs with the float64
# references computed from the same values (not with fastgrad on a
# contiguous copy, which would only test the copy).

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("how", LAYOUTS_2D)
def test_layout_matmul_and_dense(how, dtype):
    rng = np.random.default_rng(len(how))
    x, k = normal(rng, (6, 5), dtype), normal(rng, (5, 7), dtype)
    b, g = normal(rng, 7, dtype), normal(rng, (6, 7), dtype)
    L = lambda a: relayout(a, how)
    Lb = lambda a: relayout(a, "strided" if how in ("fortran", "transposed") else how)
    x64, k64 = x.astype(F64), k.astype(F64)

    for ta in (False, True):
        for tb in (False, True):
            a = np.ascontiguousarray(x.T) if ta else x
            bb = np.ascontiguousarray(k.T) if tb else k
            check(ops.matmul(L(a), L(bb), trans_a=ta, trans_b=tb), x64 @ k64, dtype,
                  np.abs(x64) @ np.abs(k64), f"matmul trans_a={ta} trans_b={tb}")

    for act in ("relu", "gelu", "softmax"):
        pre = np.empty((6, 7), dtype)
        out = ops.dense_forward(L(x), L(k), Lb(b), activation=act, pre=pre)
        z, _y = ref_dense_forward(x, k, b, act)
        check(pre, z, dtype, np.abs(x64) @ np.abs(k64) + np.abs(b), f"{act}: pre")
        check(out, ref_act(act, pre), dtype, what=f"{act}: out")
        got = ops.dense_backward(L(g), L(x), L(k), L(out), activation=act, pre=L(pre))
        *want, bounds = ref_dense_backward(g, x, k, pre, act, y=out)
        _check_all(got, want, bounds, dtype, [f"{act}: {n}" for n in ("dx", "dkernel", "dbias")])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("how", LAYOUTS_2D)
def test_layout_activations(how, dtype):
    rng = np.random.default_rng(len(how) + 1)
    z, g = normal(rng, (5, 8), dtype), normal(rng, (5, 8), dtype)
    for act in ops.ACTIVATIONS:
        y = ops.activation_forward(relayout(z, how), act)
        check(y, ref_act(act, z), dtype, what=f"{act} forward")
        dx = ops.activation_backward(relayout(g, how), relayout(y, how), act, x=relayout(z, how))
        want, bound = ref_act_vjp(act, z, g, y=y, bound=True)
        check(dx, want, dtype, bound, f"{act} backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("how", LAYOUTS_2D)
@pytest.mark.parametrize("loss, from_logits, delta", LOSS_CASES)
def test_layout_losses(loss, from_logits, delta, how, dtype):
    rng = np.random.default_rng(len(loss) + len(how))
    t, p = make_loss_data(loss, from_logits, (6, 4), rng, delta)
    p = p.astype(dtype)
    if loss != "sparse_categorical_crossentropy":
        t = t.astype(dtype)
    t_nc = t if loss == "sparse_categorical_crossentropy" else relayout(t, how)
    got = ops.loss_forward_backward(t_nc, relayout(p, how), loss, from_logits=from_logits,
                                    delta=delta, per_sample=True)
    mean, rows, d, rb, db = ref_loss(loss, t, p, from_logits, delta)
    _check_all(got, (mean, d, rows), (rb.mean(), db, rb), dtype,
               ("loss", "dy_pred", "per-sample losses"))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("how", LAYOUTS_1D)
def test_layout_sgd_and_sum_squares(how, dtype):
    rng = np.random.default_rng(len(how) + 2)
    g = normal(rng, 9, dtype)
    p0 = normal(rng, 9, dtype)
    p, v = p0.copy(), np.zeros(9, dtype)
    for _ in range(3):
        ops.sgd_step(p, relayout(g, how), 0.1, momentum=0.9, nesterov=True, velocity=v)
    cfg = {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True}
    w, st, _ = ref_optimizer_run(cfg, p0, [g] * 3, [("w", 0, (9,), None, None)])
    check(p, w, dtype, what="params")
    check(v, st["v"], dtype, what="velocity")

    x = normal(rng, (7, 6), dtype)
    want = np.sum(x.astype(F64) ** 2)
    for nc in (relayout(x, "fortran"), relayout(x, "strided"), relayout(x, "negative"), x.T):
        check(ops.sum_squares(nc), want, dtype, 0.0, "sum_squares")
    check(ops.sum_squares(relayout(g, how)), np.sum(g.astype(F64) ** 2), dtype, 0.0,
          "sum_squares of a vector")
