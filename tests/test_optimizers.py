"""Tests of the optimizers' fused step against NumPy float64 references.

An optimizer is bound to flat buffers with ``opt.build(params, grads,
tensors)`` (tensors: (name, offset, shape, regularizer, constraint)) and
``opt.apply()`` runs one step after the gradients were written into
``grads``. Every result is compared with ``ref_run`` below, a NumPy float64
implementation of the formulas documented in fastgrad/optimizers.py and
csrc/fastgrad_impl.h (Keras 3 forms), written independently of the C code.

Layout of this file:
  reference ......... ref_run (regularize, clip, decay, update, constrain)
  1. update rules ... SGD / RMSprop / Adam / AdamW / Adagrad, float64 and float32
  2. clipping ....... clipvalue, clipnorm, global_clipnorm, StepRecord
  3. regularizers, weight decay, constraints
  4. schedules ...... closed forms, and as learning_rate
  5. non-finite gradients
  6. determinism, model integration
  7. arguments ...... bad values, fg.optimizers.get, defaults
"""
import inspect
import math
import platform
import re

import numpy as np
import pytest
from _reference import F32, F64, ref_optimizer_run, tensor_slices, tensor_table

import fastgrad as fg
from fastgrad import constraints, optimizers, regularizers, schedules
from fastgrad.layers import Dense

RTOL, ATOL = 1e-12, 1e-14

LAYOUT = [("dense/kernel", (3, 4)), ("dense/bias", (4,)),
          ("dense_1/kernel", (4, 2)), ("dense_1/bias", (2,))]


def make_tensors(layout=LAYOUT, regs=None, cons=None):
    return tensor_table(layout, regs, cons)


TENSORS, SIZE = make_tensors()


def grad_sequence(rng, size, steps, scale=1.0, decay=1.0):
    return [scale * decay ** k * rng.normal(size=size) for k in range(steps)]


ref_run = ref_optimizer_run   # the float64 reference of every optimizer's step


def fg_run(opt, w0, grads, tensors=TENSORS, dtype=F64):
    params = np.array(w0, dtype)
    buf = np.zeros_like(params)
    opt.build(params, buf, tensors)
    recs = []
    for g in grads:
        buf[...] = g
        rec = opt.apply()
        recs.append({"norms": rec.grad_norms.copy(), "total": rec.global_norm,
                     "scale": np.array(rec.clip_scale, copy=True), "clipped": rec.clipped,
                     "penalty": rec.penalty, "lr": rec.learning_rate,
                     "nonfinite": rec.nonfinite, "step": rec.step})
    return params, recs


# ---------------------------------------------------------------------------
# 1. update rules
# ---------------------------------------------------------------------------

CASES = [
    ("sgd", lambda: optimizers.SGD(0.1), {"kind": "sgd", "lr": 0.1}),
    ("sgd-momentum", lambda: optimizers.SGD(0.05, momentum=0.8),
     {"kind": "sgd", "lr": 0.05, "momentum": 0.8}),
    ("sgd-nesterov", lambda: optimizers.SGD(0.05, momentum=0.7, nesterov=True),
     {"kind": "sgd", "lr": 0.05, "momentum": 0.7, "nesterov": True}),
    ("rmsprop", lambda: optimizers.RMSprop(0.01, rho=0.8, epsilon=1e-2),
     {"kind": "rmsprop", "lr": 0.01, "rho": 0.8, "eps": 1e-2}),
    ("rmsprop-centered", lambda: optimizers.RMSprop(0.01, rho=0.85, epsilon=1e-3,
                                                     centered=True),
     {"kind": "rmsprop", "lr": 0.01, "rho": 0.85, "eps": 1e-3, "centered": True}),
    ("rmsprop-momentum", lambda: optimizers.RMSprop(0.01, momentum=0.6, epsilon=1e-2),
     {"kind": "rmsprop", "lr": 0.01, "momentum": 0.6, "eps": 1e-2}),
    ("rmsprop-centered-momentum",
     lambda: optimizers.RMSprop(0.02, rho=0.7, momentum=0.5, centered=True),
     {"kind": "rmsprop", "lr": 0.02, "rho": 0.7, "momentum": 0.5, "centered": True}),
    ("adam", lambda: optimizers.Adam(0.02, beta_1=0.8, beta_2=0.95, epsilon=1e-3),
     {"kind": "adam", "lr": 0.02, "b1": 0.8, "b2": 0.95, "eps": 1e-3}),
    ("adam-defaults", lambda: optimizers.Adam(), {"kind": "adam", "lr": 0.001}),
    ("adam-amsgrad", lambda: optimizers.Adam(0.02, beta_2=0.6, epsilon=1e-3, amsgrad=True),
     {"kind": "adam", "lr": 0.02, "b2": 0.6, "eps": 1e-3, "amsgrad": True}),
    ("adamw", lambda: optimizers.AdamW(0.02, weight_decay=0.1, beta_1=0.85),
     {"kind": "adam", "lr": 0.02, "b1": 0.85, "wd": 0.1}),
    ("adamw-default-decay", lambda: optimizers.AdamW(0.05),
     {"kind": "adam", "lr": 0.05, "wd": 0.004}),
    ("adagrad", lambda: optimizers.Adagrad(0.1, epsilon=1e-2),
     {"kind": "adagrad", "lr": 0.1, "eps": 1e-2}),
    ("adagrad-init", lambda: optimizers.Adagrad(0.05, initial_accumulator_value=0.5),
     {"kind": "adagrad", "lr": 0.05, "init": 0.5}),
]


def _grads_for(case_id, rng, steps=5):
    if case_id == "adam-amsgrad":
        # shrinking gradients make v fall, so that max(vmax, v) matters
        return grad_sequence(rng, SIZE, steps, decay=0.3)
    return grad_sequence(rng, SIZE, steps)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_update_rule_matches_numpy_float64(case):
    case_id, make, cfg = case
    rng = np.random.default_rng(len(case_id))
    w0 = rng.normal(size=SIZE)
    grads = _grads_for(case_id, rng)
    opt = make()
    got, recs = fg_run(opt, w0, grads)
    ref, st, _ = ref_run(cfg, w0, grads, TENSORS)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    assert not np.allclose(got, w0)  # the steps did something
    assert opt.iterations == 5 and [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert opt.skipped_steps == 0
    var = opt.variables()
    if cfg["kind"] == "adam":
        np.testing.assert_allclose(var["m"], st["m"], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(var["v"], st["v"], rtol=RTOL, atol=ATOL)
    elif cfg["kind"] == "adagrad" or (cfg["kind"] == "sgd" and cfg.get("momentum")):
        np.testing.assert_allclose(var["v"], st["v"], rtol=RTOL, atol=ATOL)


def test_amsgrad_case_discriminates():
    # the amsgrad reference run differs from plain Adam on the same gradients
    rng = np.random.default_rng(len("adam-amsgrad"))
    w0 = rng.normal(size=SIZE)
    grads = _grads_for("adam-amsgrad", rng)
    cfg = dict(CASES[9][2])
    a, _, _ = ref_run(cfg, w0, grads, TENSORS)
    cfg["amsgrad"] = False
    b, _, _ = ref_run(cfg, w0, grads, TENSORS)
    assert np.max(np.abs(a - b)) > 1e-4
    got, _ = fg_run(optimizers.Adam(0.02, beta_2=0.6, epsilon=1e-3), w0, grads)
    np.testing.assert_allclose(got, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in
                                  ("sgd-nesterov", "rmsprop-centered-momentum", "adam",
                                   "adam-amsgrad", "adagrad", "adamw")],
                         ids=lambda c: c[0])
def test_update_rule_float32_buffers(case):
    case_id, make, cfg = case
    rng = np.random.default_rng(7)
    w0 = rng.normal(size=SIZE).astype(F32)
    grads = [g.astype(F32) for g in _grads_for(case_id, rng)]
    got, _ = fg_run(make(), w0, grads, dtype=F32)
    assert got.dtype == F32
    ref, _, _ = ref_run(cfg, w0, grads, TENSORS)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)


# 37,433 elements: past the 32768 from which the update runs in shares over
# the kernel threads, with shares that cross the tensors' boundaries
BIG_LAYOUT = [("dense/kernel", (150, 200)), ("dense/bias", (200,)),
              ("dense_1/kernel", (200, 36)), ("dense_1/bias", (33,))]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_update_rule_in_shares_matches_numpy_float64(case):
    case_id, make, cfg = case
    tensors, size = make_tensors(BIG_LAYOUT)
    rng = np.random.default_rng(len(case_id) + 1)
    w0 = rng.normal(size=size)
    grads = grad_sequence(rng, size, 3, decay=0.3 if case_id == "adam-amsgrad" else 1.0)
    got, _ = fg_run(make(), w0, grads, tensors)
    ref, _, _ = ref_run(cfg, w0, grads, tensors)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def test_update_in_shares_leaves_a_frozen_tensor_alone():
    tensors, size = make_tensors(BIG_LAYOUT)
    rng = np.random.default_rng(3)
    params = rng.normal(size=size)
    before = params.copy()
    grads = rng.normal(size=size)
    opt = optimizers.Adam(0.1)
    opt.build(params, grads, tensors, frozen=np.array([0, 1, 0, 0], np.uint8))
    opt.apply()
    frozen = slice(30000, 30200)   # dense/bias
    np.testing.assert_array_equal(params[frozen], before[frozen])
    assert not np.any(opt.variables()["m"][frozen])
    changed = np.ones(size, bool)
    changed[frozen] = False
    assert np.all(params[changed] != before[changed])


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("make", [lambda: optimizers.Adam(0.01),
                                  lambda: optimizers.RMSprop(0.01, momentum=0.5)],
                         ids=["adam", "rmsprop"])
def test_update_in_shares_does_not_depend_on_the_thread_count(make, dtype):
    """Gradients down to the subnormal range, where the step flushes to
    zero: a share computed on a worker thread must see the same floating-
    point mode as the calling thread. The workers are started first by a
    pass outside any step, as a model's predict would start them."""
    from fastgrad import _core, ops
    ops.activation_forward(np.ones((1, 300_000), dtype), "tanh")
    # large enough that a worker wakes up in time to take shares
    tensors, size = make_tensors([("kernel", (1000, 999)), ("bias", (999,))])
    rng = np.random.default_rng(5)
    low = -25 if dtype == F32 else -170
    grads = [(rng.choice([-1.0, 1.0], size) * 10.0 ** rng.uniform(low, 1, size)).astype(dtype)
             for _ in range(4)]
    w0 = rng.normal(size=size).astype(dtype)
    runs = []
    try:
        for threads in (1, 2, 3, 1):
            _core.set_kernel_threads(threads)
            opt = make()
            got, _ = fg_run(opt, w0, grads, tensors, dtype=dtype)
            runs.append(got.tobytes() + b"".join(v.tobytes() for v in opt.variables().values()
                                                 if isinstance(v, np.ndarray)))
    finally:
        _core.set_kernel_threads(0)
    assert runs[1:] == runs[:1] * 3


# a large model; and one with more tensors than the parts fastgrad's step
# lists (160), whose tracked update runs on the calling thread
TRACKED_LAYOUTS = {
    "large": [("kernel", (1000, 999)), ("bias", (999,)), ("kernel_1", (999, 3)),
              ("bias_1", (3,))],
    "many": [(f"kernel_{i}", (17, 12)) for i in range(170)],
}


@pytest.mark.parametrize("layout", sorted(TRACKED_LAYOUTS))
@pytest.mark.parametrize("dtype", [F32, F64])
def test_tracked_update_in_shares(dtype, layout):
    """With update ratios tracked, a large model's update runs in parts of
    its tensors over the threads: the weights are those of the untracked
    step, bit for bit, the ratios |w_new - w_old| / |w_new| per tensor
    match NumPy's, and neither depends on the thread count."""
    from fastgrad import _core
    tensors, size = make_tensors(TRACKED_LAYOUTS[layout])
    rng = np.random.default_rng(6)
    w0 = rng.normal(size=size).astype(dtype)
    grads = [g.astype(dtype) for g in grad_sequence(rng, size, 3)]
    plain, _ = fg_run(optimizers.Adam(0.01), w0, grads, tensors, dtype=dtype)
    results = []
    try:
        for threads in (1, 2, 3):
            _core.set_kernel_threads(threads)
            opt = optimizers.Adam(0.01)
            opt.track_updates(True)
            params, buf = w0.copy(), np.zeros_like(w0)
            opt.build(params, buf, tensors)
            for g in grads:
                before = params.astype(F64)
                buf[...] = g
                rec = opt.apply()
            assert params.tobytes() == plain.tobytes()
            results.append(rec.update_ratio.tobytes())
    finally:
        _core.set_kernel_threads(0)
    assert results[1:] == results[:1] * 2
    after = params.astype(F64)
    want = [np.linalg.norm(after[sl] - before[sl]) / np.linalg.norm(after[sl])
            for sl, *_ in tensor_slices(tensors)]
    np.testing.assert_allclose(rec.update_ratio, want, rtol=1e-6 if dtype == F32 else 1e-12)


def test_apply_before_build_raises():
    with pytest.raises(RuntimeError):
        optimizers.Adam().apply()


# ---------------------------------------------------------------------------
# 2. clipping
# ---------------------------------------------------------------------------

def _scaled_grads(rng, scales):
    """One gradient whose tensors have the given L2 norms."""
    parts = []
    for (_name, shape), s in zip(LAYOUT, scales):
        p = rng.normal(size=int(np.prod(shape)))
        parts.append(p * s / np.linalg.norm(p))
    return np.concatenate(parts)


@pytest.mark.parametrize("mode", ["clipvalue", "clipnorm", "global_clipnorm"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_clipping_matches_numpy(mode, kind):
    rng = np.random.default_rng(3)
    w0 = rng.normal(size=SIZE)
    # tensor norms on both sides of the clip value 1 (3rd step: all below)
    grads = [_scaled_grads(rng, [3.0, 0.5, 1.5, 0.2]),
             _scaled_grads(rng, [0.4, 2.5, 0.9, 4.0]),
             _scaled_grads(rng, [0.1, 0.2, 0.1, 0.05])]
    clip = {mode: 1.0 if mode != "clipvalue" else 0.5}
    if kind == "sgd":
        opt, cfg = optimizers.SGD(0.5, **clip), {"kind": "sgd", "lr": 0.5, **clip}
    else:
        opt = optimizers.Adam(0.05, beta_2=0.9, epsilon=1e-3, **clip)
        cfg = {"kind": "adam", "lr": 0.05, "b2": 0.9, "eps": 1e-3, **clip}
    got, recs = fg_run(opt, w0, grads)
    ref, _, refrecs = ref_run(cfg, w0, grads, TENSORS)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    # the reference without clipping is clearly different: clipping happened
    noclip, _, _ = ref_run({k: v for k, v in cfg.items() if k != mode}, w0, grads, TENSORS)
    assert np.max(np.abs(noclip - ref)) > 1e-3
    for _k, (r, e, g) in enumerate(zip(recs, refrecs, grads)):
        raw = np.array([np.linalg.norm(g[sl]) for sl, *_ in tensor_slices(TENSORS)])
        np.testing.assert_allclose(r["norms"], raw, rtol=1e-13)  # before clipping
        assert r["total"] == pytest.approx(np.linalg.norm(g), rel=1e-13)
        if mode == "clipvalue":
            np.testing.assert_array_equal(r["scale"], 1.0)
            assert r["clipped"] == bool(np.max(np.abs(g)) > 0.5)
        else:
            np.testing.assert_allclose(r["scale"], e["scale"], rtol=1e-13)
            assert r["clipped"] == bool(np.any(e["scale"] < 1))
    assert recs[0]["clipped"] and recs[1]["clipped"]
    assert not recs[2]["clipped"]


def test_clipvalue_is_elementwise():
    w0 = np.zeros(SIZE)
    g = np.linspace(-2, 2, SIZE)
    got, _ = fg_run(optimizers.SGD(1.0, clipvalue=0.75), w0, [g])
    np.testing.assert_array_equal(got, -np.clip(g, -0.75, 0.75))


def test_clipnorm_is_per_tensor_and_global_is_joint():
    w0 = np.zeros(SIZE)
    g = np.concatenate([np.full(12, 1.0), np.full(4, 0.1), np.full(8, 0.0), np.full(2, 3.0)])
    got, recs = fg_run(optimizers.SGD(1.0, clipnorm=1.0), w0, [g])
    norms = [np.sqrt(12), 0.2, 0.0, np.sqrt(18)]
    exp = np.concatenate([-g[:12] / norms[0], -g[12:16], -g[16:24], -g[24:] / norms[3]])
    np.testing.assert_allclose(got, exp, rtol=1e-14)
    np.testing.assert_allclose(recs[0]["scale"], [1 / norms[0], 1, 1, 1 / norms[3]],
                               rtol=1e-14)
    got, recs = fg_run(optimizers.SGD(1.0, global_clipnorm=1.0), w0, [g])
    total = np.linalg.norm(g)
    np.testing.assert_allclose(got, -g / total, rtol=1e-14)
    np.testing.assert_allclose(recs[0]["scale"], 1 / total, rtol=1e-14)
    assert recs[0]["total"] == pytest.approx(total, rel=1e-14)


@pytest.mark.parametrize("pair", [("clipnorm", "clipvalue"), ("clipnorm", "global_clipnorm"),
                                  ("clipvalue", "global_clipnorm")])
@pytest.mark.parametrize("cls", [optimizers.SGD, optimizers.Adam, optimizers.RMSprop,
                                 optimizers.Adagrad, optimizers.AdamW])
def test_more_than_one_clip_is_an_error(cls, pair):
    with pytest.raises(ValueError):
        cls(**{pair[0]: 1.0, pair[1]: 1.0})


# ---------------------------------------------------------------------------
# 3. regularizers, weight decay, constraints
# ---------------------------------------------------------------------------

REGS = {"dense/kernel": regularizers.L1(0.05), "dense/bias": regularizers.L2(0.1),
        "dense_1/kernel": regularizers.L1L2(0.03, 0.2)}


@pytest.mark.parametrize("clip", [{}, {"clipnorm": 0.8}, {"global_clipnorm": 1.0},
                                  {"clipvalue": 0.3}], ids=["none", "clipnorm", "global",
                                                            "clipvalue"])
def test_regularizers_inside_the_step(clip):
    rng = np.random.default_rng(4)
    tensors, _ = make_tensors(regs=REGS)
    w0 = rng.normal(size=SIZE)
    w0[0] = 0.0  # sign(0) = 0 for L1
    grads = grad_sequence(rng, SIZE, 4, scale=0.3)
    opt = optimizers.SGD(0.2, **clip)
    got, recs = fg_run(opt, w0, grads, tensors)
    ref, _, refrecs = ref_run({"kind": "sgd", "lr": 0.2, **clip}, w0, grads, tensors)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    plain, _, _ = ref_run({"kind": "sgd", "lr": 0.2, **clip}, w0, grads, TENSORS)
    assert np.max(np.abs(plain - ref)) > 1e-3  # the regularizers mattered
    for r, e in zip(recs, refrecs):
        # norms see the regularized gradient (before clipping); penalty at the
        # weights before the step
        np.testing.assert_allclose(r["norms"], e["norms"], rtol=1e-12)
        assert r["penalty"] == pytest.approx(e["penalty"], rel=1e-12)
    assert recs[0]["penalty"] == pytest.approx(
        0.05 * np.abs(w0[:12]).sum() + 0.1 * (w0[12:16] ** 2).sum()
        + 0.03 * np.abs(w0[16:24]).sum() + 0.2 * (w0[16:24] ** 2).sum(), rel=1e-12)


def test_penalty_is_zero_without_regularizers():
    rng = np.random.default_rng(0)
    _, recs = fg_run(optimizers.SGD(0.1), rng.normal(size=SIZE), [rng.normal(size=SIZE)])
    assert recs[0]["penalty"] == 0.0


@pytest.mark.parametrize("kind,make", [
    ("sgd", lambda: optimizers.SGD(0.1, weight_decay=0.05)),
    ("sgd-momentum", lambda: optimizers.SGD(0.1, momentum=0.9, weight_decay=0.05)),
    ("rmsprop", lambda: optimizers.RMSprop(0.01, weight_decay=0.05)),
    ("adam", lambda: optimizers.Adam(0.02, weight_decay=0.05)),
    ("adagrad", lambda: optimizers.Adagrad(0.1, weight_decay=0.05)),
])
def test_weight_decay_before_the_update(kind, make):
    rng = np.random.default_rng(5)
    w0 = rng.normal(size=SIZE)
    grads = grad_sequence(rng, SIZE, 5)
    cfg = {"sgd": {"kind": "sgd", "lr": 0.1}, "sgd-momentum": {"kind": "sgd", "lr": 0.1,
                                                                 "momentum": 0.9},
           "rmsprop": {"kind": "rmsprop", "lr": 0.01}, "adam": {"kind": "adam", "lr": 0.02},
           "adagrad": {"kind": "adagrad", "lr": 0.1}}[kind]
    got, _ = fg_run(make(), w0, grads)
    ref, _, _ = ref_run({**cfg, "wd": 0.05}, w0, grads, TENSORS)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    nodecay, _, _ = ref_run(cfg, w0, grads, TENSORS)
    assert np.max(np.abs(nodecay - ref)) > 1e-4


def test_weight_decay_with_zero_gradient_is_exact_shrink():
    w0 = np.linspace(-1, 1, SIZE)
    got, _ = fg_run(optimizers.SGD(0.5, weight_decay=0.1), w0, [np.zeros(SIZE)] * 3)
    np.testing.assert_allclose(got, w0 * (1 - 0.05) ** 3, rtol=1e-15)


def test_adamw_equals_adam_with_weight_decay():
    rng = np.random.default_rng(6)
    w0, grads = rng.normal(size=SIZE), grad_sequence(rng, SIZE, 5)
    a, _ = fg_run(optimizers.AdamW(0.01, weight_decay=0.2), w0, grads)
    b, _ = fg_run(optimizers.Adam(0.01, weight_decay=0.2), w0, grads)
    np.testing.assert_array_equal(a, b)


CONS = {"dense/kernel": constraints.MaxNorm(0.5), "dense/bias": constraints.NonNeg(),
        "dense_1/kernel": constraints.ClipValue(0.05)}


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_constraints_after_the_update(kind):
    rng = np.random.default_rng(8)
    tensors, _ = make_tensors(cons=CONS)
    w0 = rng.normal(size=SIZE) * 0.3
    grads = grad_sequence(rng, SIZE, 4)
    if kind == "sgd":
        opt, cfg = optimizers.SGD(0.3), {"kind": "sgd", "lr": 0.3}
    else:
        opt, cfg = optimizers.Adam(0.1), {"kind": "adam", "lr": 0.1}
    got, _ = fg_run(opt, w0, grads, tensors)
    ref, _, _ = ref_run(cfg, w0, grads, tensors)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    kernel = got[:12].reshape(3, 4)
    assert np.all(np.linalg.norm(kernel, axis=0) <= 0.5 + 1e-12)
    # some columns are below the cap and some at it: per column, not per tensor
    unconstrained, _, _ = ref_run(cfg, w0, grads, TENSORS)
    assert np.all(got[12:16] >= 0) and np.any(got[12:16] == 0)
    assert np.all(np.abs(got[16:24]) <= 0.05) and np.any(np.abs(got[16:24]) == 0.05)
    assert np.max(np.abs(unconstrained - ref)) > 1e-3


def test_max_norm_per_column_keras_formula_including_small_columns():
    # a column below the cap is multiplied by n / (1e-7 + n), as Keras does
    layout = [("dense/kernel", (2, 3))]
    tensors, size = make_tensors(layout, cons={"dense/kernel": constraints.MaxNorm(1.0)})
    w0 = np.array([[3.0, 0.1, 0.0], [4.0, 0.2, 0.0]]).reshape(-1)
    got, _ = fg_run(optimizers.SGD(0.1), w0, [np.zeros(size)], tensors)
    n = np.array([5.0, np.sqrt(0.05), 0.0])
    exp = w0.reshape(2, 3) * np.clip(n, 0, 1.0) / (1e-7 + n)
    np.testing.assert_allclose(got.reshape(2, 3), exp, rtol=1e-14, atol=0)
    assert got[1] != 0.1  # the small column was scaled too


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_max_norm_on_a_bias_vector_uses_one_norm(kind):
    # MaxNorm(axis=0) of a 1-D tensor: one L2 norm over the whole vector (Keras,
    # constraints.MaxNorm.__call__, and the "a vector: one norm over it all"
    # comment of the compiled max_norm)
    layout = [("dense/kernel", (3, 4)), ("dense/bias", (4,))]
    tensors, size = make_tensors(layout, cons={"dense/bias": constraints.MaxNorm(0.25)})
    w0 = np.concatenate([np.zeros(12), [0.3, 0.4, 0.0, 0.01]])
    zero = np.zeros(size)
    opt = optimizers.SGD(0.1) if kind == "sgd" else optimizers.Adam(0.1)
    got, _ = fg_run(opt, w0, [zero], tensors)
    bias = w0[12:]
    n = np.linalg.norm(bias)  # 0.5001
    exp = bias * 0.25 / (1e-7 + n)  # [0.15, 0.2, 0, 0.005]
    np.testing.assert_allclose(got[12:], exp, rtol=1e-12)
    np.testing.assert_allclose(got[12:], constraints.MaxNorm(0.25)(bias), rtol=1e-12)


def test_max_norm_on_a_wide_kernel():
    # more columns than one block of the compiled kernel (FG_COLS = 512)
    layout = [("dense/kernel", (3, 1100)), ("dense/bias", (1100,))]
    tensors, size = make_tensors(layout, cons={"dense/kernel": constraints.MaxNorm(0.4)})
    rng = np.random.default_rng(9)
    w0 = rng.normal(size=size) * 0.3
    grads = grad_sequence(rng, size, 2)
    got, _ = fg_run(optimizers.SGD(0.1), w0, grads, tensors)
    ref, _, _ = ref_run({"kind": "sgd", "lr": 0.1}, w0, grads, tensors)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def test_constraint_objects_apply_the_same_formula():
    rng = np.random.default_rng(10)
    w = rng.normal(size=(4, 6))
    n = np.sqrt((w ** 2).sum(axis=0, keepdims=True))
    np.testing.assert_allclose(constraints.MaxNorm(1.0)(w), w * np.clip(n, 0, 1) / (1e-7 + n),
                               rtol=1e-14)
    np.testing.assert_array_equal(constraints.NonNeg()(w), np.where(w < 0, 0.0, w))
    np.testing.assert_array_equal(constraints.ClipValue(0.5)(w), np.clip(w, -0.5, 0.5))
    assert regularizers.L1L2(0.1, 0.2)(w) == pytest.approx(
        0.1 * np.abs(w).sum() + 0.2 * (w ** 2).sum(), rel=1e-14)


# ---------------------------------------------------------------------------
# 4. schedules
# ---------------------------------------------------------------------------

STEPS = [0, 1, 2, 5, 9, 10, 11, 19, 20, 21, 37, 100, 150, 1000]


def test_exponential_decay():
    s = schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    st = schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5, staircase=True)
    for k in STEPS:
        assert s(k) == pytest.approx(0.1 * 0.5 ** (k / 10), rel=1e-14)
        assert st(k) == pytest.approx(0.1 * 0.5 ** (k // 10), rel=1e-14)
    assert st(9) == pytest.approx(0.1) and st(10) == pytest.approx(0.05)


def test_piecewise_constant_decay():
    s = schedules.PiecewiseConstantDecay([10, 20], [1.0, 0.5, 0.1])
    for k in STEPS:
        assert s(k) == (1.0 if k <= 10 else 0.5 if k <= 20 else 0.1)
    with pytest.raises(ValueError):
        schedules.PiecewiseConstantDecay([10, 20], [1.0, 0.5])


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_cosine_decay(alpha):
    s = schedules.CosineDecay(0.1, decay_steps=100, alpha=alpha)
    for k in STEPS:
        c = 0.5 * (1 + math.cos(math.pi * min(k, 100) / 100))
        assert s(k) == pytest.approx(0.1 * ((1 - alpha) * c + alpha), rel=1e-12, abs=1e-15)
    assert s(0) == pytest.approx(0.1)
    assert s(100) == pytest.approx(0.1 * alpha, abs=1e-15)
    assert s(1000) == pytest.approx(0.1 * alpha, abs=1e-15)


def test_cosine_decay_with_warmup():
    s = schedules.CosineDecay(0.01, decay_steps=100, alpha=0.1, warmup_target=0.2,
                              warmup_steps=10)
    for k in STEPS:
        if k < 10:
            exp = 0.01 + (0.2 - 0.01) * k / 10
        else:
            c = 0.5 * (1 + math.cos(math.pi * min(k - 10, 100) / 100))
            exp = 0.2 * ((1 - 0.1) * c + 0.1)
        assert s(k) == pytest.approx(exp, rel=1e-12)
    assert s(10) == pytest.approx(0.2)
    assert s(110) == pytest.approx(0.02) and s(1000) == pytest.approx(0.02)


def keras_cosine_decay(step, initial, decay_steps, alpha=0.0, warmup_target=None,
                       warmup_steps=0):
    """NumPy form of the formula in Keras 3's CosineDecay docstring."""
    step = np.asarray(step, F64)

    def decayed(s, start):
        s = np.minimum(s, decay_steps)
        return start * ((1 - alpha) * 0.5 * (1 + np.cos(np.pi * s / decay_steps)) + alpha)

    if warmup_target is None:      # no warmup: warmup_steps plays no part
        return decayed(step, initial)
    warm = initial + (warmup_target - initial) * step / max(warmup_steps, 1)
    return np.where(step < warmup_steps, warm, decayed(step - warmup_steps, warmup_target))


@pytest.mark.parametrize("args", [
    {"initial": 1.0, "decay_steps": 10, "warmup_steps": 5},
    {"initial": 0.1, "decay_steps": 40, "alpha": 0.2, "warmup_steps": 7},
    {"initial": 0.1, "decay_steps": 40, "alpha": 0.2},
    {"initial": 0.0, "decay_steps": 30, "alpha": 0.1, "warmup_target": 0.3, "warmup_steps": 8},
    {"initial": 0.05, "decay_steps": 25, "warmup_target": 0.01, "warmup_steps": 0},
])
def test_cosine_decay_matches_the_keras_formula(args):
    s = schedules.CosineDecay(args["initial"], args["decay_steps"], args.get("alpha", 0.0),
                              warmup_target=args.get("warmup_target"),
                              warmup_steps=args.get("warmup_steps", 0))
    steps = np.arange(0, 120)
    ref = keras_cosine_decay(steps, **args)
    np.testing.assert_allclose([s(int(k)) for k in steps], ref, rtol=1e-13, atol=1e-16)
    if "warmup_target" not in args:
        assert s(0) == pytest.approx(args["initial"])
    # the example: CosineDecay(1.0, 10, warmup_steps=5)(5) is half way down
    assert schedules.CosineDecay(1.0, 10, warmup_steps=5)(5) == pytest.approx(0.5, rel=1e-15)


# Keras 3 signatures: (name, default) in order; E marks "no default"
E = inspect.Parameter.empty
KERAS_SIGNATURES = {
    schedules.ExponentialDecay: [
        ("initial_learning_rate", E), ("decay_steps", E), ("decay_rate", E),
        ("staircase", False), ("name", "ExponentialDecay")],
    schedules.PiecewiseConstantDecay: [
        ("boundaries", E), ("values", E), ("name", "PiecewiseConstant")],
    schedules.CosineDecay: [
        ("initial_learning_rate", E), ("decay_steps", E), ("alpha", 0.0),
        ("name", "CosineDecay"), ("warmup_target", None), ("warmup_steps", 0)],
}


@pytest.mark.parametrize("cls", list(KERAS_SIGNATURES), ids=lambda c: c.__name__)
def test_schedule_signatures_are_keras_3(cls):
    params = inspect.signature(cls).parameters.values()
    assert [(p.name, p.default) for p in params] == KERAS_SIGNATURES[cls]


def test_schedule_positions_names_and_configs():
    c = schedules.CosineDecay(0.1, 10, 0.2, "warm", 0.5, 3)
    assert (c.alpha, c.name, c.warmup_target, c.warmup_steps) == (0.2, "warm", 0.5, 3)
    e = schedules.ExponentialDecay(0.1, 10, 0.5, True, "exp")
    p = schedules.PiecewiseConstantDecay([5], [0.1, 0.01], "steps")
    for sched, name in ((c, "warm"), (e, "exp"), (p, "steps")):
        cfg = schedules.serialize(sched)
        assert cfg["config"]["name"] == name
        back = schedules.deserialize(cfg)
        assert type(back) is type(sched) and back.get_config() == sched.get_config()
        assert [back(k) for k in range(20)] == [sched(k) for k in range(20)]
        # a config from before schedules had names gets the default name
        old = {"class_name": cfg["class_name"],
               "config": {k: v for k, v in cfg["config"].items() if k != "name"}}
        assert schedules.deserialize(old).name == dict(KERAS_SIGNATURES[type(sched)])["name"]
    for make in (lambda: schedules.CosineDecay(0.1, 10, name=3),
                 lambda: schedules.ExponentialDecay(0.1, 10, 0.5, name=["x"]),
                 lambda: schedules.PiecewiseConstantDecay([1], [1.0, 0.5], name=1.5)):
        with pytest.raises(TypeError, match="name"):
            make()


SCHEDS = [lambda: schedules.ExponentialDecay(0.2, 2, 0.5),
          lambda: schedules.ExponentialDecay(0.2, 2, 0.5, staircase=True),
          lambda: schedules.PiecewiseConstantDecay([1, 3], [0.3, 0.1, 0.02]),
          lambda: schedules.CosineDecay(0.2, 4, alpha=0.1),
          lambda: schedules.CosineDecay(0.0, 4, warmup_target=0.3, warmup_steps=2)]


@pytest.mark.parametrize("make", SCHEDS, ids=["exp", "exp-stair", "piecewise", "cosine",
                                              "cosine-warmup"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_schedule_as_learning_rate(make, kind):
    rng = np.random.default_rng(11)
    w0 = rng.normal(size=SIZE)
    grads = grad_sequence(rng, SIZE, 7)
    sched = make()
    opt = optimizers.SGD(sched) if kind == "sgd" else optimizers.Adam(sched)
    got, recs = fg_run(opt, w0, grads)
    fn = make()
    ref, _, _ = ref_run({"kind": kind}, w0, grads, TENSORS, lr=fn)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    # step k (0-based) used schedule(k)
    assert [r["lr"] for r in recs] == pytest.approx([fn(k) for k in range(7)], rel=1e-15)
    const, _, _ = ref_run({"kind": kind}, w0, grads, TENSORS, lr=fn(0))
    assert np.max(np.abs(const - ref)) > 1e-6


# ---------------------------------------------------------------------------
# 5. non-finite gradients
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("make,cfg", [
    (lambda: optimizers.Adam(0.05, amsgrad=True, global_clipnorm=1.0,),
     {"kind": "adam", "lr": 0.05, "amsgrad": True, "global_clipnorm": 1.0}),
    (lambda: optimizers.SGD(0.1, momentum=0.9, weight_decay=0.01),
     {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "wd": 0.01}),
    (lambda: optimizers.RMSprop(0.01, centered=True, momentum=0.5, clipnorm=1.0),
     {"kind": "rmsprop", "lr": 0.01, "centered": True, "momentum": 0.5, "clipnorm": 1.0}),
    (lambda: optimizers.Adagrad(0.1, clipvalue=0.5),
     {"kind": "adagrad", "lr": 0.1, "clipvalue": 0.5}),
], ids=["adam", "sgd", "rmsprop", "adagrad"])
def test_nonfinite_gradient_skips_the_step(make, cfg, bad):
    rng = np.random.default_rng(12)
    tensors, _ = make_tensors(regs={"dense/kernel": regularizers.L2(0.01)})
    w0 = rng.normal(size=SIZE)
    grads = grad_sequence(rng, SIZE, 5)
    grads[2] = grads[2].copy()
    grads[2][17] = bad          # in dense_1/kernel
    grads[2][25] = np.nan       # and in dense_1/bias: the first one is named
    opt = make()
    params = np.array(w0)
    buf = np.zeros_like(params)
    opt.build(params, buf, tensors)
    for k, g in enumerate(grads):
        buf[...] = g
        if k == 2:
            p_before = params.copy()
            v_before = {n: a.copy() for n, a in opt.variables().items()}
        rec = opt.apply()
        if k == 2:
            np.testing.assert_array_equal(params, p_before)
            for n, a in opt.variables().items():
                np.testing.assert_array_equal(a, v_before[n])
            assert rec.nonfinite is True and opt.last_step is rec
            assert rec.bad_tensor == "dense_1/kernel"
            assert opt.skipped_steps == 1 and opt.iterations == 2
        else:
            assert rec.nonfinite is False
    assert opt.skipped_steps == 1 and opt.iterations == 4
    ref, _, _ = ref_run(cfg, w0, grads, tensors, skip={2})
    np.testing.assert_allclose(params, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("index,name", [(0, "dense/kernel"), (13, "dense/bias"),
                                        (25, "dense_1/bias")])
def test_nonfinite_raise_names_the_tensor(index, name):
    rng = np.random.default_rng(13)
    opt = optimizers.Adam(0.01, nonfinite="raise")
    params = rng.normal(size=SIZE)
    buf = np.zeros_like(params)
    opt.build(params, buf, TENSORS)
    buf[...] = rng.normal(size=SIZE)
    opt.apply()
    before = params.copy()
    moments = {n: a.copy() for n, a in opt.variables().items()}
    buf[...] = rng.normal(size=SIZE)
    buf[index] = np.inf
    with pytest.raises(FloatingPointError, match=name):
        opt.apply()
    np.testing.assert_array_equal(params, before)
    for n, a in opt.variables().items():
        np.testing.assert_array_equal(a, moments[n])
    assert opt.iterations == 1


def _refused_step_changes_nothing(model, x, y, mode, match=None):
    """One train_on_batch whose gradients are not finite: skipped (counted)
    or raised, with every weight as before. Returns those weights."""
    before = model.get_weights()
    if mode == "skip":
        model.train_on_batch(x, y)
        assert model.optimizer.skipped_steps == 1
    else:
        with pytest.raises(FloatingPointError, match=match):
            model.train_on_batch(x, y)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    return before


def test_nonfinite_through_a_model():
    rng = np.random.default_rng(14)
    x = rng.normal(size=(8, 3))
    y = rng.normal(size=(8, 2))
    for mode in ("skip", "raise"):
        model = fg.Sequential([Dense(4, input_dim=3), Dense(2)], dtype="float64", seed=0)
        model.compile(optimizer=optimizers.Adam(0.01, nonfinite=mode), loss="mse")
        # finite inputs, but outputs near 1e300 make the gradients overflow
        w = model.get_weights()
        w[0][...] = 1e300
        model.set_weights(w)
        _refused_step_changes_nothing(model, x, y, mode, "gradient of dense/kernel")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_non_neg_zeroes_every_negative_however_small(dtype):
    dt = np.dtype(dtype)
    tiny = np.finfo(dt).smallest_subnormal
    bias = np.array([-5e-4, -1e-6, -1e-30, -tiny, -0.0, 1e-6, 2.0], dt)
    model = fg.Sequential([Dense(7, input_dim=3, bias_constraint=fg.constraints.NonNeg())],
                          dtype=dtype, seed=0)
    model.compile(optimizer=optimizers.SGD(0.0), loss="mse")   # lr 0: only the constraint acts
    w = model.get_weights()
    model.set_weights([w[0], bias])
    x, y = np.ones((4, 3), dt), np.zeros((4, 7), dt)
    model.train_on_batch(x, y)
    np.testing.assert_array_equal(model.get_weights()[1], np.maximum(bias, 0))


def test_a_refused_step_leaves_the_moving_statistics_too():
    """The forward pass moves BatchNormalization's statistics before the
    gradients are known; a step refused for non-finite gradients (skipped or
    raised) puts them back, so every weight is as before."""
    rng = np.random.default_rng(16)
    x, y = rng.normal(size=(8, 3)), rng.normal(size=(8, 2))
    for mode in ("skip", "raise"):
        model = fg.Sequential([Dense(4, input_dim=3), fg.layers.BatchNormalization(),
                               Dense(2)], dtype="float64", seed=0)
        model.compile(optimizer=optimizers.SGD(0.01, nonfinite=mode), loss="mse")
        model.train_on_batch(x, y)            # a finite step moves the statistics
        w = model.get_weights()
        w[0][...] = 1e300                     # batch variance overflows: gradients are not finite
        model.set_weights(w)
        before = _refused_step_changes_nothing(model, x, y, mode)
        w[0][...] = 0.5                       # finite again: the next step moves them
        model.set_weights(w)
        model.train_on_batch(x, y)
        assert not np.array_equal(model.get_weights()[4], before[4])


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("make", [
    # (optimizer for the type's largest value big, gradient of the bad element)
    lambda nf, big: (optimizers.SGD(big ** 0.6, nonfinite=nf), -big ** 0.45),
    lambda nf, big: (optimizers.SGD(big ** 0.6, momentum=0.9, nonfinite=nf), -big ** 0.45),
    lambda nf, big: (optimizers.Adagrad(0.75 * big, nonfinite=nf), -1.0)],
    ids=["sgd", "momentum", "adagrad"])
def test_an_update_that_overflows_is_reported(make, track, dtype):
    """Finite gradients (with a finite norm) whose update leaves the type's
    range: the step is applied (nothing can undo it in place) but never
    silently: the record names the first such tensor, with a RuntimeWarning
    or a FloatingPointError."""
    big = float(np.finfo(dtype).max)
    for mode in ("skip", "raise"):
        opt, g = make(mode, big)
        params = np.full(SIZE, 0.5 * big, dtype)
        grads = np.zeros(SIZE, dtype)
        opt.build(params, grads, TENSORS)
        opt.track_updates(track)
        opt.apply()     # a finite step first
        assert opt.last_step.overflow is None and np.all(np.isfinite(params))
        grads[13] = g   # dense/bias: w - lr g passes the maximum
        if mode == "skip":
            with pytest.warns(RuntimeWarning, match="update of dense/bias overflowed"):
                rec = opt.apply()
            assert rec.overflow == "dense/bias" and not rec.nonfinite
        else:
            with pytest.raises(FloatingPointError, match="update of dense/bias overflowed"):
                opt.apply()
        assert not np.isfinite(params[13]) and opt.iterations == 2
        assert np.all(np.isfinite(np.delete(params, 13)))


def test_clip_value_constraint_mends_an_overflow_so_none_is_reported():
    rng = np.random.default_rng(15)
    clip = fg.constraints.ClipValue(1.0)
    model = fg.Sequential([Dense(2, input_dim=3, kernel_constraint=clip,
                                 bias_constraint=clip)], seed=0)
    model.compile(optimizer=optimizers.SGD(1e38, nonfinite="raise"), loss="mse")
    x, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 2)) * 100
    model.train_on_batch(x, y)    # would raise if the clipped kernel were reported
    assert model.optimizer.last_step.overflow is None
    assert all(np.all(np.abs(w) <= 1.0) for w in model.get_weights())


# ---------------------------------------------------------------------------
# 6. determinism and model integration
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: optimizers.Adam(0.01, global_clipnorm=5.0),
                                  lambda: optimizers.RMSprop(0.01, clipnorm=1.0,
                                                             centered=True),
                                  lambda: optimizers.SGD(0.1, momentum=0.9, nesterov=True)],
                         ids=["adam", "rmsprop", "sgd"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_same_inputs_bit_identical(make, dtype):
    layout = [("a/kernel", (300, 200)), ("a/bias", (200,)), ("b/kernel", (200, 7))]
    tensors, size = make_tensors(layout, regs={"a/kernel": regularizers.L1L2(1e-3, 1e-3)})
    rng = np.random.default_rng(15)
    w0 = rng.normal(size=size).astype(dtype)
    grads = [g.astype(dtype) for g in grad_sequence(rng, size, 3)]
    a, ra = fg_run(make(), w0, grads, tensors, dtype)
    b, rb = fg_run(make(), w0, grads, tensors, dtype)
    np.testing.assert_array_equal(a, b)
    for x, y in zip(ra, rb):
        np.testing.assert_array_equal(x["norms"], y["norms"])
        assert x["total"] == y["total"] and x["penalty"] == y["penalty"]


def test_step_flushes_subnormals_on_x86_and_restores_the_callers_mode():
    # Adam under a zero gradient: v += (1 - beta_2)(0 - v). On x86-64
    # subnormal inputs are read as zero and subnormal results written as
    # zero, so no moment is left in the slow subnormal range; elsewhere the
    # step is plain IEEE arithmetic.
    tiny = np.finfo(F32).tiny
    params, grads, m = np.ones(64, F32), np.zeros(64, F32), np.zeros(64, F32)
    v = np.full(64, 3 * tiny, F32)
    v[32:] = tiny / 4                                   # subnormal already
    v0 = v.copy()
    fg.ops.adam_step(params, grads, m, v, step=1)
    if platform.machine().lower() in ("x86_64", "amd64"):
        # (1 - beta_2) * 3 tiny is subnormal: flushed, so v keeps its value
        np.testing.assert_array_equal(v[:32], np.float32(3 * tiny))
        np.testing.assert_array_equal(v[32:], 0.0)
    else:
        keep = F32(1) - F32(0.999)
        np.testing.assert_array_equal(v, v0 + keep * (F32(0) - v0))
    np.testing.assert_array_equal(params, 1.0)
    # the thread's floating-point mode is restored: NumPy still makes
    # subnormals after the step
    assert np.float32(tiny) / np.float32(4) > 0


@pytest.mark.parametrize("make,cfg", [
    (lambda: optimizers.SGD(0.1), {"kind": "sgd", "lr": 0.1}),
    (lambda: optimizers.Adam(0.01), {"kind": "adam", "lr": 0.01}),
])
def test_model_step_equals_optimizer_on_model_gradients(make, cfg):
    rng = np.random.default_rng(16)
    model = fg.Sequential([Dense(5, "tanh", input_dim=3,
                                 kernel_regularizer=regularizers.L2(0.02)), Dense(2)],
                          dtype="float64", seed=1)
    model.compile(optimizer=make(), loss="mse")
    w0 = model.get_weights()
    grads, tensors = [], []
    batches = [(rng.normal(size=(6, 3)), rng.normal(size=(6, 2))) for _ in range(3)]
    ref_w = np.concatenate([w.reshape(-1) for w in w0])
    layout = [(n, w.shape) for n, w in zip(model.weight_names, w0)]
    tensors, _ = make_tensors(layout, regs={"dense/kernel": regularizers.L2(0.02)})
    for x, y in batches:
        _, g = model.compute_gradients(x, y)
        grads.append(np.concatenate([a.reshape(-1) for a in g]))
        model.train_on_batch(x, y)
    # the same gradients replayed through the reference: only valid step by
    # step since each gradient depends on the weights, which are equal
    ref, _, _ = ref_run(cfg, ref_w, grads, tensors)
    got = np.concatenate([w.reshape(-1) for w in model.get_weights()])
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def test_model_constraint_holds_after_training():
    rng = np.random.default_rng(17)
    model = fg.Sequential([Dense(8, "relu", input_dim=4,
                                 kernel_constraint=constraints.MaxNorm(0.3),
                                 bias_constraint=constraints.NonNeg()), Dense(1)], seed=0)
    model.compile(optimizer=optimizers.SGD(0.5), loss="mse")
    model.fit(rng.normal(size=(64, 4)), rng.normal(size=(64, 1)) * 5, epochs=3, verbose=0)
    k, b = model.get_weights()[:2]
    assert np.all(np.linalg.norm(k.astype(F64), axis=0) <= 0.3 * (1 + 1e-6))
    assert np.all(b >= 0)


@pytest.mark.parametrize("make,exc,pattern", [
    (lambda: Dense(3, kernel_constraint=constraints.MaxNorm(axis=-1)), ValueError,
     r"kernel_constraint.*axis=-1.*axis=0"),
    (lambda: Dense(3, kernel_constraint=constraints.MaxNorm(axis=1)), ValueError,
     r"kernel_constraint.*axis=1"),
    (lambda: Dense(3, kernel_constraint={"class_name": "MaxNorm", "config": {"axis": -1}}),
     ValueError, r"kernel_constraint.*axis"),
    (lambda: Dense(3, bias_constraint=constraints.MaxNorm(axis=1)), ValueError,
     r"bias_constraint.*axis=1"),
    (lambda: fg.layers.BatchNormalization(gamma_constraint=constraints.MaxNorm(axis=1)),
     ValueError, r"gamma_constraint.*axis"),
    (lambda: Dense(3, kernel_constraint=type("Custom", (constraints.Constraint,), {})()),
     TypeError, r"kernel_constraint.*Custom"),
    (lambda: constraints.MaxNorm(axis=2), ValueError, r"\baxis\b"),
    (lambda: constraints.MaxNorm(axis=True), ValueError, r"\baxis\b"),
])
def test_constraints_the_step_cannot_apply_are_refused_when_the_layer_is_made(make, exc,
                                                                              pattern):
    with pytest.raises(exc) as info:
        make()
    assert re.search(pattern, str(info.value)), str(info.value)


def test_max_norm_on_vectors_takes_axis_0_or_minus_1_alike():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(32, 4)), rng.normal(size=(32, 3)) * 5
    got = []
    for axis in (0, -1):
        m = fg.Sequential([Dense(3, input_dim=4,
                                 bias_constraint=constraints.MaxNorm(0.1, axis=axis))], seed=2)
        m.compile(optimizers.SGD(0.5), "mse")
        m.fit(x, y, epochs=2, verbose=0)
        got.append(m.get_weights())
    for a, b in zip(*got):
        np.testing.assert_array_equal(a, b)
    assert np.linalg.norm(got[0][1].astype(F64)) <= 0.1 * (1 + 1e-6)


# ---------------------------------------------------------------------------
# 7. arguments
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: optimizers.SGD(learning_rate=-0.1),
    lambda: optimizers.Adam(learning_rate=-1e-3),
    lambda: optimizers.Adam(learning_rate=float("nan")),
    lambda: optimizers.Adam(learning_rate="fast"),
    lambda: optimizers.Adam(beta_1=1.0),
    lambda: optimizers.Adam(beta_1=1.5),
    lambda: optimizers.Adam(beta_2=1.0),
    lambda: optimizers.Adam(beta_1=-0.1),
    lambda: optimizers.AdamW(beta_1=1.0),
    lambda: optimizers.AdamW(weight_decay=None),
    lambda: optimizers.SGD(momentum=1.0),
    lambda: optimizers.SGD(momentum=-0.5),
    lambda: optimizers.RMSprop(rho=1.0),
    lambda: optimizers.RMSprop(momentum=1.0),
    lambda: optimizers.Adam(epsilon=-1e-7),
    lambda: optimizers.Adam(clipnorm=-1.0),
    lambda: optimizers.Adam(clipvalue=0.0),
    lambda: optimizers.Adam(global_clipnorm=float("inf")),
    lambda: optimizers.Adam(weight_decay=-0.1),
    lambda: optimizers.Adam(nonfinite="ignore"),
    lambda: optimizers.Adagrad(initial_accumulator_value=-1.0),
    lambda: optimizers.get("adafactor"),
    lambda: optimizers.get(""),
])
def test_bad_arguments_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_bad_argument_messages_name_the_argument():
    with pytest.raises(ValueError, match="learning_rate"):
        optimizers.SGD(learning_rate=-0.1)
    with pytest.raises(ValueError, match="beta_1"):
        optimizers.Adam(beta_1=1.0)
    with pytest.raises(ValueError, match="optimizer"):
        optimizers.get("adafactor")


@pytest.mark.parametrize("name,cls,defaults", [
    ("sgd", optimizers.SGD, {"learning_rate": 0.01, "momentum": 0.0, "nesterov": False}),
    ("rmsprop", optimizers.RMSprop, {"learning_rate": 0.001, "rho": 0.9, "momentum": 0.0,
                                     "epsilon": 1e-7}),
    ("adam", optimizers.Adam, {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999,
                               "epsilon": 1e-7, "amsgrad": False}),
    ("adamw", optimizers.AdamW, {"learning_rate": 0.001, "weight_decay": 0.004,
                                 "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}),
    ("adagrad", optimizers.Adagrad, {"learning_rate": 0.001,
                                     "initial_accumulator_value": 0.1, "epsilon": 1e-7}),
])
def test_get_resolves_names_with_keras_defaults(name, cls, defaults):
    for key in (name, name.upper()):
        opt = optimizers.get(key)
        assert type(opt) is cls
        for k, v in defaults.items():
            assert getattr(opt, k) == v, k
        assert opt.clipnorm is None and opt.clipvalue is None and opt.global_clipnorm is None
    inst = cls()
    assert optimizers.get(inst) is inst
    assert fg.optimizers is optimizers


def test_get_rejects_other_types():
    with pytest.raises((TypeError, ValueError)):
        optimizers.get(3)
    with pytest.raises((TypeError, ValueError)):
        optimizers.get(None)
