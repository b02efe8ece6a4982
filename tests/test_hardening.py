"""Hardening tests: memory layouts, sizes, extreme values, properties,
threads, and a short run of the fuzz harnesses in tests/fuzz/fuzz.py
(hostile model files and save faults are in test_saving.py).

Every kernel result is checked against the float64 NumPy references of
_reference.py (the ``ref_*`` functions), computed from the same
already-rounded inputs, with a tolerance per dtype scaled by an error bound
(the sum of the magnitudes that enter each result) or in units in the last
place.

Layout of this file:
  helpers ........... strict floating-point mode, data
  1. layouts ........ kernels and model methods on every memory layout;
                      out= buffers of the wrong shape, dtype or layout
  2. sizes .......... 1..33 on every axis, and 1029 x 917
  3. values ......... +-0, subnormals, +-1e20, inf and NaN, no warnings
  4. properties ..... hypothesis, zero-sized sides included
  5. threads ........ shared models, concurrent kernels, errors per thread
  6. fuzz ........... tests/fuzz/fuzz.py for ~3 s per harness
"""
import importlib.util
import itertools
import math
import os
import re
import sys
import threading
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from _models import classifier
from _reference import (
    DTYPE_IDS,
    DTYPES,
    F32,
    F64,
    LAYOUTS,
    SELU_ALPHA,
    SELU_SCALE,
    check,
    layout,
    one_hot,
    ref_act,
    ref_act_vjp,
    ref_bn_backward,
    ref_bn_forward,
    ref_dense_backward,
    ref_dense_forward,
    ref_dropout,
    ref_loss,
    ref_loss_value,
    ref_optimizer_run,
    same_bits,
    ulp_error,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastgrad as fg
import fastgrad.saving
from fastgrad import _core, ops
from fastgrad.layers import Dense

ACTS = list(ops.ACTIVATIONS)
# the losses referenced here; the later ones (log_cosh to the focal losses)
# have their sizes, layouts and edge values in test_new_losses.py
LOSSES = [k for k in ops.LOSSES if k in ("mse", "mae", "huber", "binary_crossentropy",
                                         "categorical_crossentropy",
                                         "sparse_categorical_crossentropy")]
DT_IDS = DTYPE_IDS
# elu and selu compute alpha * (exp(z) - 1): near z = 0 its error is absolute,
# on the scale of alpha (see test_elu_and_selu_are_accurate_near_zero)
EXP_SCALE = {"elu": 3.0, "selu": 2.0}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

@contextmanager
def strict():
    """Every warning an error, and NumPy's floating-point errors raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            yield


def rnd(rng, shape, dt, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dt)


def probs(rng, shape, dt):
    p = rng.uniform(0.05, 1.0, shape)
    return (p / p.sum(axis=1, keepdims=True)).astype(dt)


# ---------------------------------------------------------------------------
# 1. layouts
# ---------------------------------------------------------------------------

# Each case: a builder (rng, dt) -> (call, inputs, expect) where call(**inputs)
# returns everything the kernel produces (outputs and updated buffers),
# inputs maps the names of its read-only array arguments to arrays, and
# expect(got, dt, **inputs) checks a result against the float64 references.

def _matmul_expect(trans_a, trans_b):
    def expect(got, dt, a, b):
        a = np.asarray(a, F64).T if trans_a else np.asarray(a, F64)
        b = np.asarray(b, F64).T if trans_b else np.asarray(b, F64)
        check(got, a @ b, dt, np.abs(a) @ np.abs(b), "matmul")
    return expect


def _case_matmul(trans_a, trans_b):
    def build(rng, dt):
        a = rnd(rng, (7, 5) if trans_a else (5, 7), dt)
        b = rnd(rng, (6, 7) if trans_b else (7, 6), dt)
        return ((lambda a, b: ops.matmul(a, b, trans_a=trans_a, trans_b=trans_b)),
                {"a": a, "b": b}, _matmul_expect(trans_a, trans_b))
    return build


def _expect_dense_forward(act):
    def expect(got, dt, x, kernel, bias):
        out, pre = got
        z, _ = ref_dense_forward(x, kernel, bias, act)
        zb = np.abs(np.asarray(x, F64)) @ np.abs(np.asarray(kernel, F64)) + np.abs(bias)
        check(pre, z, dt, zb, "pre")
        # the activation of the kernel's own z: its error apart from the GEMM's
        check(out, ref_act(act, pre), dt, out.max(axis=-1, keepdims=True) if act == "softmax" else 0.0,
              "out")
    return expect


def _case_dense_forward(act):
    def build(rng, dt):
        x, k, b = rnd(rng, (9, 6), dt), rnd(rng, (6, 5), dt), rnd(rng, 5, dt)

        def call(x, kernel, bias):
            pre = np.empty((9, 5), dt)
            out = ops.dense_forward(x, kernel, bias, act, pre=pre)
            return out, pre
        return call, {"x": x, "kernel": k, "bias": b}, _expect_dense_forward(act)
    return build


def _case_dense_backward(act):
    def build(rng, dt):
        x, k, b = rnd(rng, (9, 6), dt), rnd(rng, (6, 5), dt), rnd(rng, 5, dt)
        pre = np.empty((9, 5), dt)
        out = ops.dense_forward(x, k, b, act, pre=pre)
        dout = rnd(rng, (9, 5), dt)

        def call(dout, x, kernel, out, pre):
            return ops.dense_backward(dout, x, kernel, out, act, pre=pre)

        def expect(got, dt, dout, x, kernel, out, pre):
            *want, bounds = ref_dense_backward(dout, x, kernel, pre, act, y=out)
            for g, w, b, what in zip(got, want, bounds, ("dx", "dkernel", "dbias")):
                check(g, w, dt, b, what)
        return call, {"dout": dout, "x": x, "kernel": k, "out": out, "pre": pre}, expect
    return build


def _case_activation_forward(rng, dt):
    x = rnd(rng, (8, 7), dt, 3.0)

    def call(x):
        return [ops.activation_forward(x, a) for a in ACTS]

    def expect(got, dt, x):
        for a, y in zip(ACTS, got):
            check(y, ref_act(a, x), dt, what=a)
    return call, {"x": x}, expect


def _case_activation_backward(rng, dt):
    x = rnd(rng, (8, 7), dt, 3.0)
    outs = {a: ops.activation_forward(x, a) for a in ACTS}
    dout = rnd(rng, (8, 7), dt)

    def call(dout, x, **outs_):
        return [ops.activation_backward(dout, outs_["out_" + a], a, x=x) for a in ACTS]

    def expect(got, dt, dout, x, **outs_):
        for a, dx in zip(ACTS, got):
            want, bound = ref_act_vjp(a, x, dout, y=outs_["out_" + a], bound=True)
            check(dx, want, dt, bound, a)
    return call, {"dout": dout, "x": x, **{"out_" + a: o for a, o in outs.items()}}, expect


def _case_loss(kind, from_logits=False):
    def build(rng, dt):
        B, O = 8, 5
        if kind == "sparse_categorical_crossentropy":
            yt = rng.integers(0, O, B)
        elif kind in ("categorical_crossentropy",):
            yt = one_hot(rng.integers(0, O, B), O).astype(dt)
        elif kind == "binary_crossentropy":
            yt = rng.integers(0, 2, (B, O)).astype(dt)
        else:
            yt = rnd(rng, (B, O), dt)
        yp = rnd(rng, (B, O), dt) if from_logits or kind in ("mse", "mae", "huber") \
            else probs(rng, (B, O), dt)

        def call(y_true, y_pred):
            return ops.loss_forward_backward(y_true, y_pred, kind, from_logits=from_logits,
                                             per_sample=True)

        def expect(got, dt, y_true, y_pred):
            mean, rows, d, rb, db = ref_loss(kind, y_true, y_pred, from_logits)
            check(got[0], mean, dt, rb.mean(), "loss")
            check(got[1], d, dt, db, "dy_pred")
            check(got[2], rows, dt, rb, "per-sample losses")
        return call, {"y_true": yt, "y_pred": yp}, expect
    return build


def _case_bn_forward(training):
    def build(rng, dt):
        x = rnd(rng, (9, 6), dt, 2.0) + 3
        gamma, beta = rnd(rng, 6, dt), rnd(rng, 6, dt)
        mm, mv = rnd(rng, 6, dt), np.abs(rnd(rng, 6, dt)) + 0.5

        def call(x, gamma, beta):
            m, v = mm.copy(), mv.copy()
            out = ops.batchnorm_forward(x, gamma, beta, m, v, training=training, momentum=0.9)
            return out, m, v

        def expect(got, dt, x, gamma, beta):
            (out, mean, rstd), m, v = got
            want, wmean, wrstd, wm, wv = ref_bn_forward(x, gamma, beta, mm, mv, training, 0.9)
            # out sums gamma (x - mean) rstd and beta: its error is relative to
            # their magnitudes; the statistics are relative to their own value
            x64 = np.abs(np.asarray(x, F64))
            out_bound = np.abs(gamma) * wrstd * (x64 + np.abs(wmean)) + np.abs(beta)
            check(out, want, dt, out_bound, "out")
            check(mean, wmean, dt, x64.mean(axis=0), "mean")
            for g, w, what in ((rstd, wrstd, "rstd"), (m, wm, "moving_mean"),
                               (v, wv, "moving_variance")):
                check(g, w, dt, np.abs(mm) + np.abs(wmean) if what == "moving_mean" else 0.0,
                      what)
        return call, {"x": x, "gamma": gamma, "beta": beta}, expect
    return build


def _case_bn_backward(rng, dt):
    x = rnd(rng, (9, 6), dt, 2.0) + 3
    gamma = rnd(rng, 6, dt)
    _, mean, rstd = ops.batchnorm_forward(x, gamma)
    dout = rnd(rng, (9, 6), dt)

    def call(dout, x, mean, rstd, gamma):
        return ops.batchnorm_backward(dout, x, mean, rstd, gamma)

    def expect(got, dt, dout, x, mean, rstd, gamma):
        dx, dg, db, bound = ref_bn_backward(dout, x, mean, rstd, gamma)
        xhat = (np.asarray(x, F64) - mean) * rstd
        check(got[0], dx, dt, bound, "dx")
        check(got[1], dg, dt, np.abs(dout * xhat).sum(axis=0), "dgamma")   # sums
        check(got[2], db, dt, np.abs(np.asarray(dout, F64)).sum(axis=0), "dbeta")
    return call, {"dout": dout, "x": x, "mean": mean, "rstd": rstd, "gamma": gamma}, expect


def _case_dropout(rng, dt):
    x = rnd(rng, (9, 7), dt)

    def expect(got, dt, x):
        check(got, ref_dropout(x, 0.3, 1234, 77), dt, 0.0, "dropout")
    return (lambda x: ops.dropout(x, 0.3, 1234, 77)), {"x": x}, expect


def _case_sum_squares(rng, dt):
    x = rnd(rng, (9, 7), dt)

    def expect(got, dt, x):
        check(got, np.sum(np.asarray(x, F64) ** 2), dt, 0.0, "sum_squares")
    return ops.sum_squares, {"x": x}, expect


def _expect_step(cfg, w0, state, step, offsets):
    tensors = [(f"t{i}", a, (b - a,), None, None)
               for i, (a, b) in enumerate(itertools.pairwise(offsets))]

    def expect(got, dt, grads):
        w, st, (rec,) = ref_optimizer_run(cfg, w0, [grads], tensors, state=state, t0=step - 1)
        check(got[0], w, dt, what="params")
        for name, buf in zip(state, got[1:-1]):
            check(buf, st[name], dt, what=name)
        check(got[-1]["grad_norms"], rec["norms"], dt, 0.0, "grad_norms")
    return expect


def _case_sgd(rng, dt):
    p0, g = rnd(rng, 40, dt), rnd(rng, 40, dt)
    vel0 = rnd(rng, 40, dt)

    def call(grads):
        p, vel = p0.copy(), vel0.copy()
        rec = ops.sgd_step(p, grads, learning_rate=0.1, momentum=0.9, nesterov=True,
                           velocity=vel, offsets=[0, 15, 40], clipnorm=1.0)
        return p, vel, rec
    cfg = {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "clipnorm": 1.0}
    return call, {"grads": g}, _expect_step(cfg, p0, {"v": vel0}, 1, [0, 15, 40])


def _case_adam(rng, dt):
    p0, g = rnd(rng, 40, dt), rnd(rng, 40, dt)
    m0, v0 = rnd(rng, 40, dt), np.abs(rnd(rng, 40, dt))

    def call(grads):
        p, m, v, vmax = p0.copy(), m0.copy(), v0.copy(), v0.copy()
        rec = ops.adam_step(p, grads, m, v, step=3, amsgrad=True, vmax=vmax,
                            global_clipnorm=2.0, weight_decay=0.01)
        return p, m, v, vmax, rec
    cfg = {"kind": "adam", "lr": 0.001, "amsgrad": True, "global_clipnorm": 2.0, "wd": 0.01}
    return call, {"grads": g}, _expect_step(cfg, p0, {"m": m0, "v": v0, "vmax": v0}, 3,
                                            [0, 40])


KERNEL_CASES = {
    "matmul": _case_matmul(False, False),
    "matmul_ta": _case_matmul(True, False),
    "matmul_tb": _case_matmul(False, True),
    "matmul_tatb": _case_matmul(True, True),
    "dense_forward_gelu": _case_dense_forward("gelu"),
    "dense_forward_softmax": _case_dense_forward("softmax"),
    "dense_forward_relu": _case_dense_forward("relu"),
    "dense_backward_silu": _case_dense_backward("silu"),
    "dense_backward_softmax": _case_dense_backward("softmax"),
    "dense_backward_elu": _case_dense_backward("elu"),
    "activation_forward": _case_activation_forward,
    "activation_backward": _case_activation_backward,
    **{f"loss_{k}": _case_loss(k) for k in LOSSES},
    **{f"loss_{k}_logits": _case_loss(k, True) for k in LOSSES if "crossentropy" in k},
    "batchnorm_forward_train": _case_bn_forward(True),
    "batchnorm_forward_infer": _case_bn_forward(False),
    "batchnorm_backward": _case_bn_backward,
    "dropout": _case_dropout,
    "sum_squares": _case_sum_squares,
    "sgd_step": _case_sgd,
    "adam_step": _case_adam,
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_cases_match_the_references(case):
    """The control for the layout test below: each case, C-contiguous,
    matches the float64 references."""
    for dt in DTYPES:
        rng = np.random.default_rng(zlib.crc32(case.encode()))
        call, inputs, expect = KERNEL_CASES[case](rng, dt)
        expect(call(**inputs), dt, **inputs)


@pytest.mark.parametrize("kind", LAYOUTS[1:])
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernels_give_bit_identical_results_for_every_input_layout(case, kind):
    """Each read-only array argument in turn, in each layout: the result
    matches the float64 references computed from the same values (and is
    bit-identical to the result on a C-contiguous copy, since non-contiguous
    inputs are copied and the same arithmetic runs). The inputs are not
    modified."""
    failures = []
    for dt in DTYPES:
        rng = np.random.default_rng(zlib.crc32(case.encode()))
        call, inputs, expect = KERNEL_CASES[case](rng, dt)
        for name in inputs:
            if kind in ("fortran", "transposed") and inputs[name].ndim < 2:
                continue
            odd = layout(inputs[name], kind)
            before = odd.copy()
            args = dict(inputs)
            args[name] = odd
            got = call(**args)
            try:
                expect(got, dt, **{**args, name: np.array(odd)})
            except AssertionError as e:
                failures.append(f"{np.dtype(dt).name} {name}: {e}")
            args[name] = np.ascontiguousarray(odd)
            if not same_bits(got, call(**args)):
                failures.append(f"{np.dtype(dt).name} {name}: differs from a contiguous copy")
            if not same_bits(odd, before):
                failures.append(f"{np.dtype(dt).name} {name} was modified")
    assert not failures, f"{case} with {kind} inputs: {failures}"


def test_sparse_labels_in_every_layout_and_integer_type():
    rng = np.random.default_rng(5)
    yp = rnd(rng, (12, 4), F32)
    labels = rng.integers(0, 4, 12)
    want = ops.loss_forward_backward(labels, yp, "sparse_categorical_crossentropy")
    for kind in ["strided", "negative", "broadcast", "readonly", "unaligned"]:
        for dtype in (np.int64, np.int32, np.uint8, np.int16, np.uint64, F64, F32):
            lab = layout(labels.astype(dtype), kind)
            ref = ops.loss_forward_backward(np.ascontiguousarray(lab).astype(np.int64), yp,
                                            "sparse_categorical_crossentropy")
            got = ops.loss_forward_backward(lab, yp, "sparse_categorical_crossentropy")
            assert same_bits(got, ref), (kind, dtype)
            got = ops.loss_forward_backward(layout(lab.reshape(-1, 1), "fortran"), yp,
                                            "sparse_categorical_crossentropy")
            assert same_bits(got, ref), (kind, dtype, "column")
    assert same_bits(ops.loss_forward_backward(labels, yp, "sparse_categorical_crossentropy"),
                     want)


def test_sum_squares_takes_any_shape_and_layout():
    rng = np.random.default_rng(2)
    for dt in DTYPES:
        a = rnd(rng, (4, 5, 6), dt)
        want = ops.sum_squares(np.ascontiguousarray(a))
        for v in (a.transpose(2, 0, 1), a[:, ::-1, ::2], np.asfortranarray(a), a.reshape(-1)):
            assert ops.sum_squares(v) == ops.sum_squares(np.ascontiguousarray(v))
        check(want, np.sum(a.astype(F64) ** 2), dt)
        assert ops.sum_squares(np.zeros((0, 3), dt)) == 0.0
        assert ops.sum_squares(np.asarray(dt(3.0))) == 9.0


def test_batchnorm_inference_accepts_read_only_moving_statistics():
    """In inference the moving statistics are only read; like every other
    input they should be accepted in any layout and give the same output."""
    rng = np.random.default_rng(3)
    for dt in DTYPES:
        x = rnd(rng, (6, 4), dt)
        mm, mv = rnd(rng, 4, dt), np.abs(rnd(rng, 4, dt)) + 1
        want = ops.batchnorm_forward(x, None, None, mm.copy(), mv.copy(), training=False)
        for kind in ["strided", "negative", "readonly", "unaligned"]:
            got = ops.batchnorm_forward(x, None, None, layout(mm, kind), layout(mv, kind),
                                        training=False)
            assert same_bits(got, want), kind


# -- out= buffers ----------------------------------------------------------

def _bad_buffers(shape, dt):
    """(description, buffer, expected exception) for a buffer that must be
    refused where an out-style array of `shape` and `dt` is expected."""
    other = F64 if dt == F32 else F32
    n = int(np.prod(shape))
    bad = [
        ("wrong shape", np.empty(tuple(s + 1 for s in shape), dt), ValueError),
        ("wrong ndim", np.empty(shape + (1,), dt), ValueError),
        ("other float dtype", np.empty(shape, other), TypeError),
        ("int32", np.empty(shape, np.int32), TypeError),
        ("float16", np.empty(shape, np.float16), TypeError),
        ("list", np.zeros(shape, dt).tolist(), TypeError),
        ("strided", np.empty((2 * shape[0],) + shape[1:], dt)[::2], ValueError),
        ("negative", np.empty(shape, dt)[::-1], ValueError),
        ("broadcast", np.broadcast_to(np.zeros((1,) + shape[1:], dt), shape), ValueError),
        ("read-only", layout(np.zeros(shape, dt), "readonly"), ValueError),
    ]
    if len(shape) == 2:
        bad.append(("fortran", np.asfortranarray(np.empty(shape, dt)), ValueError))
        bad.append(("transposed", np.empty(shape[::-1], dt).T, ValueError))
    assert n > 1 and all(s > 1 for s in shape)   # so that every layout above is not C-contiguous
    return bad


def _out_cases(dt):
    """name -> (call(buffer) -> result, buffer shape, other writable buffers
    whose contents must not change when the call is refused)."""
    rng = np.random.default_rng(11)
    x, k, b = rnd(rng, (5, 4), dt), rnd(rng, (4, 3), dt), rnd(rng, 3, dt)
    z = np.empty((5, 3), dt)
    y = ops.dense_forward(x, k, b, "silu", pre=z)
    d = rnd(rng, (5, 3), dt)
    _, mean, rstd = ops.batchnorm_forward(x)
    mm, mv = np.zeros(4, dt), np.ones(4, dt)
    p, g = rnd(rng, 12, dt), rnd(rng, 12, dt)
    m, v = np.zeros(12, dt), np.zeros(12, dt)
    s = (12,)
    return {
        "matmul/out": (lambda o: ops.matmul(x, k, out=o), (5, 3), []),
        "dense_forward/out": (lambda o: ops.dense_forward(x, k, b, "relu", out=o), (5, 3), []),
        "dense_forward/pre": (lambda o: ops.dense_forward(x, k, b, "gelu", pre=o), (5, 3), []),
        "dense_backward/dkernel": (lambda o: ops.dense_backward(d, x, k, y, "silu", pre=z,
                                                                dkernel=o), (4, 3), []),
        "dense_backward/dx": (lambda o: ops.dense_backward(d, x, k, y, "silu", pre=z, dx=o),
                              (5, 4), []),
        "dense_backward/dbias": (lambda o: ops.dense_backward(d, x, k, y, "silu", pre=z,
                                                              dbias=o), (3,), []),
        "activation_forward/out": (lambda o: ops.activation_forward(x, "tanh", out=o), (5, 4),
                                   []),
        "activation_forward/pre": (lambda o: ops.activation_forward(x, "tanh", pre=o), (5, 4),
                                   []),
        "activation_backward/dx": (lambda o: ops.activation_backward(x, x, "tanh", dx=o), (5, 4),
                                   []),
        "batchnorm_forward/out": (lambda o: ops.batchnorm_forward(x, None, None, mm, mv, out=o),
                                  (5, 4), [mm, mv]),
        "batchnorm_forward/moving_mean": (lambda o: ops.batchnorm_forward(x, None, None, o, mv),
                                          (4,), [mv]),
        "batchnorm_forward/moving_variance": (lambda o: ops.batchnorm_forward(x, None, None, mm,
                                                                              o), (4,), [mm]),
        "batchnorm_backward/dx": (lambda o: ops.batchnorm_backward(x, x, mean, rstd, dx=o),
                                  (5, 4), []),
        "dropout/out": (lambda o: ops.dropout(x, 0.5, 1, out=o), (5, 4), []),
        "sgd_step/params": (lambda o: ops.sgd_step(o, g), s, []),
        "sgd_step/velocity": (lambda o: ops.sgd_step(p, g, momentum=0.9, velocity=o), s, [p]),
        "rmsprop_step/v": (lambda o: ops.rmsprop_step(p, g, o), s, [p]),
        "rmsprop_step/m": (lambda o: ops.rmsprop_step(p, g, v, centered=True, m=o), s, [p, v]),
        "rmsprop_step/momentum_buffer": (lambda o: ops.rmsprop_step(
            p, g, v, momentum=0.5, momentum_buffer=o), s, [p, v]),
        "adam_step/params": (lambda o: ops.adam_step(o, g, m, v, 1), s, [m, v]),
        "adam_step/m": (lambda o: ops.adam_step(p, g, o, v, 1), s, [p, v]),
        "adam_step/v": (lambda o: ops.adam_step(p, g, m, o, 1), s, [p, m]),
        "adam_step/vmax": (lambda o: ops.adam_step(p, g, m, v, 1, amsgrad=True, vmax=o), s,
                           [p, m, v]),
        "adagrad_step/accumulator": (lambda o: ops.adagrad_step(p, g, o), s, [p]),
    }


@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", list(_out_cases(F32)))
def test_out_buffers_of_the_wrong_shape_dtype_or_layout_are_refused(case, dt):
    """Refused with TypeError (type, dtype) or ValueError (shape, layout,
    read-only), the message starting with the argument's name, and nothing
    written: neither the buffer nor any other state."""
    call, shape, others = _out_cases(dt)[case]
    name = case.split("/")[1]
    # control: a good buffer works
    good = np.zeros(shape, dt)
    call(good)
    for what, buf, exc in _bad_buffers(shape, dt):
        if name == "params" and what in ("wrong shape", "other float dtype"):
            continue    # params sets the size and dtype: then grads has the wrong one
        call, _, others = _out_cases(dt)[case]     # fresh state for each attempt
        before = [o.copy() for o in others]
        snapshot = np.array(buf, copy=True) if isinstance(buf, np.ndarray) else None
        with pytest.raises(exc, match=rf"^{re.escape(name)}:"):
            call(buf)
        if snapshot is not None:
            assert same_bits(np.asarray(buf), snapshot), f"{what}: the refused buffer changed"
        assert all(same_bits(o, b) for o, b in zip(others, before)), \
            f"{what}: state changed before the refusal"


def _overlap_case(dt):
    """Inputs of the three GEMM kernels (in = units = 6, batch 6, so every
    array is 6 x 6 but the bias) inside one buffer, and views of that
    buffer: the same memory as an input, or shifted from it by one row."""
    rng = np.random.default_rng(4)
    buf = rng.standard_normal(8 * 36).astype(dt)
    sq = [buf[36 * i:36 * (i + 1)].reshape(6, 6) for i in range(8)]
    x, kernel, dout, out, pre = sq[0], sq[2], sq[4], sq[5], sq[6]
    bias = sq[7][0]
    shifted = [buf[36 * i + 6:36 * (i + 1) + 6].reshape(6, 6) for i in range(7)]
    return buf, x, kernel, bias, dout, out, pre, sq, shifted


def _fresh(dt, shape):
    return np.zeros(shape, dt)


# (case, output buffer refused, call(x, kernel, bias, dout, out, pre, sq, shifted))
OVERLAPS = [
    ("matmul-out-is-a", "out", lambda x, k, b, d, o, p, sq, sh: ops.matmul(x, k, out=x)),
    ("matmul-out-is-b", "out", lambda x, k, b, d, o, p, sq, sh: ops.matmul(x, k, out=k)),
    ("matmul-out-a-plus-one-row", "out",
     lambda x, k, b, d, o, p, sq, sh: ops.matmul(x, k, out=sh[0])),
    ("matmul-out-over-the-first-row-of-b", "out",
     lambda x, k, b, d, o, p, sq, sh: ops.matmul(x, k, out=sh[1])),
    ("dense_forward-out-is-x", "out",
     lambda x, k, b, d, o, p, sq, sh: ops.dense_forward(x, k, b, "relu", out=x)),
    ("dense_forward-out-is-kernel", "out",
     lambda x, k, b, d, o, p, sq, sh: ops.dense_forward(x, k, b, "relu", out=k)),
    ("dense_forward-out-x-plus-one-row", "out",
     lambda x, k, b, d, o, p, sq, sh: ops.dense_forward(x, k, b, "relu", out=sh[0])),
    ("dense_forward-out-over-bias", "out",
     lambda x, k, b, d, o, p, sq, sh: ops.dense_forward(x, k, b, "relu", out=sh[6])),
    ("dense_forward-pre-is-out", "pre",
     lambda x, k, b, d, o, p, sq, sh: ops.dense_forward(x, k, b, "gelu", out=o, pre=o)),
    ("dense_forward-pre-kernel-plus-one-row", "pre",
     lambda x, k, b, d, o, p, sq, sh: ops.dense_forward(x, k, b, "gelu", out=o, pre=sh[2])),
    ("dense_backward-dx-is-dout", "dx",
     lambda x, k, b, d, o, p, sq, sh: ops.dense_backward(d, x, k, o, "gelu", pre=p, dx=d)),
    ("dense_backward-dx-is-x", "dx",
     lambda x, k, b, d, o, p, sq, sh: ops.dense_backward(d, x, k, o, "gelu", pre=p, dx=x)),
    ("dense_backward-dx-pre-plus-one-row", "dx",
     lambda x, k, b, d, o, p, sq, sh: ops.dense_backward(d, x, k, o, "gelu", pre=p, dx=sh[6])),
    ("dense_backward-dkernel-is-kernel", "dkernel",
     lambda x, k, b, d, o, p, sq, sh: ops.dense_backward(d, x, k, o, "relu", dkernel=k)),
    ("dense_backward-dkernel-dout-plus-one-row", "dkernel",
     lambda x, k, b, d, o, p, sq, sh: ops.dense_backward(d, x, k, o, "relu", dkernel=sh[4])),
    ("dense_backward-dbias-in-x", "dbias",
     lambda x, k, b, d, o, p, sq, sh: ops.dense_backward(d, x, k, o, "relu", dbias=x[3])),
    ("dense_backward-dbias-in-out", "dbias",
     lambda x, k, b, d, o, p, sq, sh: ops.dense_backward(d, x, k, o, "relu", dbias=o[1])),
    ("dense_backward-dkernel-is-dx", "dkernel",
     lambda x, k, b, d, o, p, sq, sh: ops.dense_backward(d, x, k, o, "relu", dkernel=sq[1],
                                                         dx=sq[1])),
    ("dense_backward-dkernel-over-dbias", "dkernel",
     lambda x, k, b, d, o, p, sq, sh: ops.dense_backward(d, x, k, o, "relu", dkernel=sq[3],
                                                         dbias=sq[3][5])),
    ("dense_backward-dx-over-dbias", "dx",
     lambda x, k, b, d, o, p, sq, sh: ops.dense_backward(d, x, k, o, "relu", dx=sq[3],
                                                         dbias=sq[3][2])),
]


@pytest.mark.parametrize("case, name, call", OVERLAPS, ids=[c[0] for c in OVERLAPS])
def test_overlapping_outputs_are_refused_by_name(case, name, call, dtype):
    """matmul, dense_forward and dense_backward refuse an output that shares
    memory with an input (or another output), whether it is that input or
    shifted from it by a row, with a message naming the output, before
    anything is written."""
    buf, x, kernel, bias, dout, out, pre, sq, shifted = _overlap_case(dtype)
    if name != "pre" and "backward" not in case:
        out = _fresh(dtype, out.shape)   # only the output under test overlaps
    before = buf.copy()
    with pytest.raises(ValueError,
                       match=rf"^{name}: overlaps an input; pass a separate array$"):
        call(x, kernel, bias, dout, out, pre, sq, shifted)
    assert same_bits(buf, before), "a refused call wrote into its buffers"


def test_separate_outputs_are_accepted_and_correct():
    """The control for the refusals: the same calls with separate outputs
    are accepted and match the float64 references."""
    for dt in DTYPES:
        _, x, kernel, bias, dout, _, _, _, _ = _overlap_case(dt)
        check(ops.matmul(x, kernel, out=_fresh(dt, (6, 6))),
              x.astype(F64) @ kernel.astype(F64), dt, np.abs(x.astype(F64)) @ np.abs(kernel),
              "matmul")
        pre = _fresh(dt, (6, 6))
        out = ops.dense_forward(x, kernel, bias, "gelu", out=_fresh(dt, (6, 6)), pre=pre)
        _z, y = ref_dense_forward(x, kernel, bias, "gelu")
        check(out, y, dt, what="dense_forward")
        dx, dk, db = ops.dense_backward(dout, x, kernel, out, "gelu", pre=pre,
                                        dkernel=_fresh(dt, (6, 6)), dbias=_fresh(dt, 6),
                                        dx=_fresh(dt, (6, 6)))
        rdx, rdk, rdb, bounds = ref_dense_backward(dout, x, kernel, pre, "gelu")
        for got, want, b, what in zip((dx, dk, db), (rdx, rdk, rdb), bounds,
                                      ("dx", "dkernel", "dbias")):
            check(got, want, dt, b, what)


@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
def test_elementwise_kernels_take_an_input_as_their_output(dt):
    """activation_forward/backward, dropout and batchnorm_forward/backward
    may write over their input: the same bits as into a separate array."""
    rng = np.random.default_rng(5)
    x, g = rnd(rng, (7, 9), dt), rnd(rng, (7, 9), dt)
    for act in sorted(ops.ACTIVATIONS):
        y = ops.activation_forward(x, act)
        a = x.copy()
        ops.activation_forward(a, act, out=a)
        assert same_bits(a, y), act
        kw = {"x": x} if act in ops.NEEDS_PRE else {}
        dx = ops.activation_backward(g, y, act, **kw)
        d = g.copy()
        ops.activation_backward(d, y, act, dx=d, **kw)
        assert same_bits(d, dx), act
    want = ops.dropout(x, 0.3, seed=11)
    a = x.copy()
    ops.dropout(a, 0.3, seed=11, out=a)
    assert same_bits(a, want)
    out, mean, rstd = ops.batchnorm_forward(x, training=True)
    a = x.copy()
    ops.batchnorm_forward(a, training=True, out=a)
    assert same_bits(a, out)
    dx, _, _ = ops.batchnorm_backward(g, x, mean, rstd)
    d = g.copy()
    ops.batchnorm_backward(d, x, mean, rstd, dx=d)
    assert same_bits(d, dx)


# -- model methods -----------------------------------------------------------

def _regressor(dtype="float64", seed=8):
    m = fg.Sequential([Dense(12, activation="tanh", input_dim=10), Dense(3)], dtype=dtype,
                      seed=seed)
    m.compile(fg.optimizers.SGD(0.05, momentum=0.9), "mse", ["mae"])
    return m


def _model_run(make, x, y, shuffle):
    """Everything the four methods give, on a fresh model, for (x, y)."""
    out = {}
    m = make()
    hist = m.fit(x, y, epochs=2, batch_size=16, shuffle=shuffle, verbose=0)
    out["history"] = hist.history
    out["fit_weights"] = m.get_weights()
    out["train_on_batch"] = m.train_on_batch(x, y)
    out["tob_weights"] = m.get_weights()
    out["evaluate"] = m.evaluate(x, y, batch_size=16, verbose=0)
    out["predict"] = m.predict(x, batch_size=16)
    # against the float64 references from the final weights, not only
    # against the same run on contiguous copies
    dt = np.dtype(m.dtype).type
    want, terms = np_predict(m, np.array(x), terms=True)
    check(out["predict"], want, dt, terms, what="predict")
    loss = "sparse_categorical_crossentropy" if np.ndim(y) == 1 else "mse"
    check(out["evaluate"][0], ref_loss_value(loss, np.array(y), want), dt, what="evaluate")
    return out


@pytest.mark.parametrize("model", ["classifier_f32", "regressor_f64", "regressor_f32"])
def test_model_methods_are_bit_identical_for_every_input_layout(model):
    rng = np.random.default_rng(9)
    n = 48
    if model == "classifier_f32":
        make = classifier
        x = rnd(rng, (n, 10), F32)
        y = rng.integers(0, 4, n)
    else:
        dt = "float64" if model.endswith("f64") else "float32"
        make = lambda: _regressor(dt)
        x = rnd(rng, (n, 10), F64)
        y = rnd(rng, (n, 3), F64)
    failures = []
    for shuffle in (True, False):
        for kind in LAYOUTS[1:]:
            for which in ("x", "y", "both"):
                xv = layout(x, kind) if which != "y" else x
                yv = layout(y, kind) if which != "x" else y
                if kind in ("fortran", "transposed") and which == "y" and y.ndim == 1:
                    continue
                want = _model_run(make, np.ascontiguousarray(xv), np.ascontiguousarray(yv),
                                  shuffle)
                got = _model_run(make, xv, yv, shuffle)
                if not same_bits(got, want):
                    diff = [k for k in want if not same_bits(got[k], want[k])]
                    failures.append(f"{kind} {which} shuffle={shuffle}: {diff}")
        # a[::-1] with the matching targets
        want = _model_run(make, x[::-1].copy(), y[::-1].copy(), shuffle)
        got = _model_run(make, x[::-1], y[::-1], shuffle)
        if not same_bits(got, want):
            failures.append(f"x[::-1], y[::-1] shuffle={shuffle}")
    assert not failures, failures


# ---------------------------------------------------------------------------
# 2. sizes
# ---------------------------------------------------------------------------

def _check_dense(rng, dt, B, I, U, act, use_bias=True, scale=1.0):
    """dense_forward / dense_backward against the references."""
    x, k = rnd(rng, (B, I), dt, scale), rnd(rng, (I, U), dt)
    b = rnd(rng, U, dt) if use_bias else None
    pre = np.empty((B, U), dt)
    out = ops.dense_forward(x, k, b, act, pre=pre)
    z, y = ref_dense_forward(x, k, b, act)
    zb = np.abs(x.astype(F64)) @ np.abs(k.astype(F64)) + (0 if b is None else np.abs(b))
    tag = f"{np.dtype(dt).name} B={B} I={I} U={U} {act}"
    check(pre, z, dt, zb, f"pre {tag}")
    row_bound = zb.max(axis=1, keepdims=True) if U else zb
    check(out, y, dt, row_bound * (2.0 if act == "softmax" else 1.2) + EXP_SCALE.get(act, 0),
          f"out {tag}")
    dout = rnd(rng, (B, U), dt)
    dx, dk, db = ops.dense_backward(dout, x, k, out, act, pre=pre, use_bias=use_bias)
    # the reference backward starts from the kernel's own forward (z, y)
    rdx, rdk, rdb, (bdx, bdk, bdb) = ref_dense_backward(dout, x, k, pre, act, y=out)
    check(dk, rdk, dt, bdk, f"dkernel {tag}")
    check(dx, rdx, dt, bdx, f"dx {tag}")
    if use_bias:
        check(db, rdb, dt, bdb, f"dbias {tag}")
    else:
        assert db is None


def _check_loss(rng, dt, B, O, kind, from_logits):
    if kind == "sparse_categorical_crossentropy":
        yt = rng.integers(0, O, B)
    elif kind == "categorical_crossentropy":
        yt = one_hot(rng.integers(0, O, B), O).astype(dt)
    elif kind == "binary_crossentropy":
        yt = rng.uniform(0, 1, (B, O)).astype(dt)
    else:
        yt = rnd(rng, (B, O), dt)
    if from_logits or kind in ("mse", "mae", "huber"):
        yp = rnd(rng, (B, O), dt, 3.0)
    elif kind == "binary_crossentropy":
        yp = rng.uniform(0, 1, (B, O)).astype(dt)
    else:
        yp = probs(rng, (B, O), dt)
    value, d, rows = ops.loss_forward_backward(yt, yp, kind, from_logits=from_logits,
                                               per_sample=True)
    rv, rrows, rd, rb, db = ref_loss(kind, yt, yp, from_logits)
    tag = f"{np.dtype(dt).name} {kind} logits={from_logits} B={B} O={O}"
    check(value, rv, dt, rb.mean() if B else 0.0, f"loss {tag}")
    check(rows, rrows, dt, rb, f"rows {tag}")
    check(d, rd, dt, db, f"grad {tag}")


def _loss_kinds():
    return [(k, False) for k in LOSSES] + [(k, True) for k in LOSSES if "crossentropy" in k]


def _check_bn(rng, dt, B, F, scale=1.0, shift=0.0, affine=True):
    x = rnd(rng, (B, F), dt, scale) + dt(shift)
    gamma = rnd(rng, F, dt) if affine else None
    beta = rnd(rng, F, dt) if affine else None
    mm, mv = rnd(rng, F, dt), (np.abs(rnd(rng, F, dt)) + 0.5).astype(dt)
    tag = f"{np.dtype(dt).name} B={B} F={F}"
    for training in ((True, False) if B >= 1 else (False,)):
        m, v = mm.copy(), mv.copy()
        out, mean, rstd = ops.batchnorm_forward(x, gamma, beta, m, v, training=training,
                                                momentum=0.9, epsilon=1e-3)
        rout, rmean, rrstd, rmm, rmv = ref_bn_forward(x, gamma, beta, mm, mv, training, 0.9,
                                                      1e-3)
        assert mean.dtype == F64 and rstd.dtype == F64
        xs = np.abs(x.astype(F64)).max() if x.size else 1.0
        check(mean, rmean, F32 if dt == F32 else F64, xs, f"mean {tag} {training}")
        check(rstd, rrstd, dt, 0.0, f"rstd {tag} {training}")
        gb = 1.0 if gamma is None else np.abs(gamma.astype(F64))
        xhat_bound = (np.abs(x.astype(F64)) + np.abs(rmean)) * rrstd
        check(out, rout, dt, gb * xhat_bound + 1.0, f"out {tag} {training}")
        check(m, rmm, dt, 0.0, f"moving_mean {tag} {training}")
        check(v, rmv, dt, 0.0, f"moving_variance {tag} {training}")
    if B >= 1:
        _, mean, rstd = ops.batchnorm_forward(x, gamma, beta)
        dout = rnd(rng, (B, F), dt)
        dx, dgamma, dbeta = ops.batchnorm_backward(dout, x, mean, rstd, gamma)
        rdx, rdg, rdb, bound = ref_bn_backward(dout, x, mean, rstd, gamma)
        xhat = (x.astype(F64) - mean) * rstd
        check(dx, rdx, dt, bound, f"bn dx {tag}")
        check(dgamma, rdg, dt, np.abs(dout * xhat).sum(axis=0), f"dgamma {tag}")
        check(dbeta, rdb, dt, np.abs(dout.astype(F64)).sum(axis=0), f"dbeta {tag}")
    else:
        with pytest.raises(ValueError, match="^x:"):
            ops.batchnorm_forward(x, gamma, beta)


SIZES = list(range(1, 34))


@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
def test_dense_every_size_1_to_33_on_each_axis(dt):
    rng = np.random.default_rng(21)
    for n in SIZES:
        for act in ACTS:
            for B, I, U in ((n, 5, 3), (4, n, 3), (3, 4, n)):
                _check_dense(rng, dt, B, I, U, act, use_bias=(n + len(act)) % 3 != 0)


@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
def test_matmul_every_size_1_to_33_on_each_axis(dt):
    rng = np.random.default_rng(22)
    for n in SIZES:
        for m, k, p in ((n, 3, 4), (3, n, 4), (3, 4, n), (n, n, n)):
            for ta in (False, True):
                for tb in (False, True):
                    a = rnd(rng, (k, m) if ta else (m, k), dt)
                    b = rnd(rng, (p, k) if tb else (k, p), dt)
                    a64, b64 = a.astype(F64), b.astype(F64)
                    oa, ob = (a64.T if ta else a64), (b64.T if tb else b64)
                    check(ops.matmul(a, b, trans_a=ta, trans_b=tb), oa @ ob, dt,
                          np.abs(oa) @ np.abs(ob), f"matmul {m}x{k}x{p} {ta} {tb}")


@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
def test_activations_every_size_1_to_33(dt):
    rng = np.random.default_rng(23)
    for n in SIZES:
        for shape in ((n, 3), (2, n)):
            x = rnd(rng, shape, dt, 3.0)
            g = rnd(rng, shape, dt)
            for act in ACTS:
                y = ops.activation_forward(x, act)
                check(y, ref_act(act, x), dt, 0.0, f"{act} {shape}")
                dx = ops.activation_backward(g, y, act, x=x)
                want, bound = ref_act_vjp(act, x, g, y=y, bound=True)
                check(dx, want, dt, bound, f"{act}' {shape}")


@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
def test_losses_every_size_1_to_33(dt):
    rng = np.random.default_rng(24)
    for n in SIZES:
        for kind, logits in _loss_kinds():
            for B, O in ((n, 4), (3, n)):
                _check_loss(rng, dt, B, O, kind, logits)


@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
def test_batchnorm_every_size_1_to_33(dt):
    rng = np.random.default_rng(25)
    for n in SIZES:
        _check_bn(rng, dt, n, 5, affine=n % 2 == 0)
        _check_bn(rng, dt, 6, n, affine=n % 2 == 1)


@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
def test_dropout_and_sum_squares_every_size_1_to_33(dt):
    rng = np.random.default_rng(26)
    for n in SIZES:
        for shape in ((n, 3), (3, n), (n, n)):
            x = rnd(rng, shape, dt) + dt(5.0)      # no zeros, so kept entries are seen
            for rate in (0.0, 0.25, 0.9):
                out = ops.dropout(x, rate, seed=n, offset=3)
                kept = out != 0
                check(out[kept], x[kept].astype(F64) / (1 - rate), dt, 0.0, "dropout scale")
                if rate == 0:
                    assert kept.all()
                # the backward (the same call) masks the same entries
                assert np.array_equal(ops.dropout(np.ones_like(x), rate, n, 3) != 0, kept)
            want = float(np.sum(x.astype(F64) ** 2))
            check(ops.sum_squares(x), want, dt, 0.0, "sum_squares")


@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
def test_large_odd_case_1029_by_917(dt):
    rng = np.random.default_rng(27)
    B, I, U = 1029, 917, 129
    for act in ("relu", "softmax"):
        _check_dense(rng, dt, B, I, U, act)
    _check_bn(rng, dt, B, I, scale=3.0, shift=100.0)
    for kind, logits in _loss_kinds():
        _check_loss(rng, dt, B, I, kind, logits)
    x = rnd(rng, (B, I), dt, 3.0)
    for act in ("gelu", "softmax"):
        y = ops.activation_forward(x, act)
        check(y, ref_act(act, x), dt, 0.0, act)


# ---------------------------------------------------------------------------
# 3. values
# ---------------------------------------------------------------------------

def _special_values(dt):
    tiny = np.finfo(dt).smallest_subnormal
    return np.array([[0.0, -0.0, tiny, -tiny, 3 * tiny, np.finfo(dt).tiny / 2,
                      1e20, -1e20, 1.0, -1.0, 40.0, -40.0]], dt)


@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
def test_activations_of_zeros_subnormals_and_1e20(dt):
    with strict():
        x = _special_values(dt)
        for act in ACTS:
            y = ops.activation_forward(x, act)
            finite = act != "exponential"   # e^(1e20) is inf, as it should be
            assert np.isfinite(y).all() or not finite, act
            check(y, ref_act(act, x), dt, 0.0, act)
            dx = ops.activation_backward(np.ones_like(x), y, act, x=x)
            assert np.isfinite(dx).all() or not finite, act
        lin = ops.activation_forward(x, "linear")
        assert same_bits(lin, x)                       # -0 and subnormals kept exactly
        relu = ops.activation_forward(x, "relu")
        assert relu[0, 2] == x[0, 2] and relu[0, 4] == x[0, 4]   # no flush to zero
        assert relu[0, 3] == 0 and relu[0, 1] == 0


@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
def test_nan_propagates_and_infinities_saturate(dt):
    inf, nan = np.inf, np.nan
    with strict():
        x = np.array([[nan, inf, -inf, 1.0]], dt)
        y = {a: ops.activation_forward(x, a) for a in ACTS if a != "softmax"}
        for act, v in y.items():
            assert np.isnan(v[0, 0]), f"{act}(NaN) = {v[0, 0]}"
        assert y["relu"][0, 1] == inf and y["relu"][0, 2] == 0
        assert y["linear"][0, 1] == inf and y["linear"][0, 2] == -inf
        assert y["leaky_relu"][0, 1] == inf and y["leaky_relu"][0, 2] == -inf
        assert y["sigmoid"][0, 1] == 1 and y["sigmoid"][0, 2] == 0
        assert y["tanh"][0, 1] == 1 and y["tanh"][0, 2] == -1
        assert y["elu"][0, 1] == inf and y["elu"][0, 2] == -1
        check(y["selu"][0, 2], -SELU_SCALE * SELU_ALPHA, dt, 0.0, "selu(-inf)")
        assert y["gelu"][0, 1] == inf and y["silu"][0, 1] == inf
        # gelu(-inf) and silu(-inf) are -inf * 0 (NaN in fastgrad, as in
        # PyTorch's gelu): not asserted either way.

        # softmax: a NaN poisons its row only; +inf gives NaN or a one-hot row;
        # -inf entries get probability 0
        rows = np.array([[1.0, nan, 2.0], [1.0, inf, 2.0], [1.0, -inf, 2.0],
                         [-inf, 0.0, -inf], [3.0, 1.0, 2.0]], dt)
        s = ops.activation_forward(rows, "softmax")
        assert np.isnan(s[0]).all()
        assert np.isnan(s[1]).all() or same_bits(s[1], np.array([0, 1, 0], dt))
        check(s[2], [1 / (1 + math.e), 0.0, math.e / (1 + math.e)], dt, 0.0, "softmax -inf")
        assert same_bits(s[3], np.array([0, 1, 0], dt))
        check(s[4], ref_act("softmax", rows[4:]).ravel(), dt, 0.0, "softmax clean row")

        # the backward propagates NaN gradients instead of hiding them
        g = np.array([[nan, 1.0, 1.0, 1.0]], dt)
        for act in ACTS:
            dx = ops.activation_backward(g, ops.activation_forward(np.ones((1, 4), dt), act),
                                         act, x=np.ones((1, 4), dt))
            assert np.isnan(dx[0, 0]), f"{act}: dx = {dx[0, 0]} for a NaN gradient"


@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
def test_cross_entropy_from_logits_stays_finite_for_1e4(dt):
    with strict():
        z = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [-1e4, 1e4, -1e4]], dt)
        labels = np.array([1, 0, 1])
        t = one_hot(labels, 3).astype(dt)
        for kind, yt in (("categorical_crossentropy", t),
                         ("sparse_categorical_crossentropy", labels),
                         ("binary_crossentropy", t)):
            value, d, rows = ops.loss_forward_backward(yt, z, kind, from_logits=True,
                                                       per_sample=True)
            assert np.isfinite(value) and np.isfinite(d).all() and np.isfinite(rows).all(), kind
            rv, rrows, rd, rb, db = ref_loss(kind, yt, z, True)
            check(value, rv, dt, rb.mean(), kind)
            check(rows, rrows, dt, rb, kind)
            check(d, rd, dt, db, kind)
        # probabilities of exactly 0 and 1 are clipped, not log(0)
        p = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dt)
        for kind in ("categorical_crossentropy", "binary_crossentropy"):
            value, d = ops.loss_forward_backward(one_hot([1, 2], 3).astype(dt), p, kind)
            assert np.isfinite(value) and np.isfinite(d).all()


@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
def test_1e20_through_dense_batchnorm_losses_and_steps(dt):
    """Values near 1e20 stay finite wherever the result is representable;
    sums of squares are accumulated in float64."""
    rng = np.random.default_rng(31)
    with strict():
        x = rnd(rng, (6, 5), dt) * dt(1e20)
        k = rnd(rng, (5, 3), dt) * dt(0.1)
        for act in ("relu", "tanh", "sigmoid", "softmax", "elu", "linear"):
            out = ops.dense_forward(x, k, None, act)
            assert np.isfinite(out).all(), act
            check(out, ref_dense_forward(x, k, None, act)[1], dt,
                  (np.abs(x.astype(F64)) @ np.abs(k.astype(F64))).max(axis=1, keepdims=True),
                  act)
        out, mean, rstd = ops.batchnorm_forward(x)
        assert np.isfinite(out).all() and np.isfinite(rstd).all()
        check(out, ref_bn_forward(x)[0], dt, 10.0, "batchnorm 1e20")
        dx, _dg, _db = ops.batchnorm_backward(np.ones_like(x), x, mean, rstd)
        assert np.isfinite(dx).all()
        s = ops.sum_squares(x)
        assert np.isfinite(s)
        check(s, np.sum(x.astype(F64) ** 2), dt, 0.0, "sum_squares 1e20")
        value, d = ops.loss_forward_backward(np.zeros_like(x), x, "mse")
        assert np.isfinite(value) and np.isfinite(d).all()
        value, d = ops.loss_forward_backward(np.zeros_like(x), x, "huber")
        assert np.isfinite(value) and np.isfinite(d).all()
        p = np.zeros(30, dt)
        g = np.full(30, 1e20, dt)
        ops.adam_step(p, g, np.zeros(30, dt), np.zeros(30, dt), 1)
        assert np.isfinite(p).all()
        tiny = np.full(30, np.finfo(dt).smallest_subnormal, dt)
        p = np.ones(30, dt)
        ops.sgd_step(p, tiny, learning_rate=1.0)
        assert np.isfinite(p).all()


@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
def test_elu_and_selu_are_accurate_near_zero(dt):
    """elu(z) = alpha (e^z - 1) for small negative z: computed as exp(z) - 1
    it cancels (float32: ~1e-3 relative error at z = -1e-5; float64: z =
    -1e-135 gives 0); expm1 (as Keras and PyTorch use) keeps full precision.
    Allowed: 8 ulps relative."""
    z = -np.array([[1e-5, 3e-4, 1e-7, 1e-10, 1e-20]], dt)
    rel = 8 * np.finfo(dt).eps
    problems = []
    for act in ("elu", "selu"):
        got = ops.activation_forward(z, act).astype(F64)
        want = ref_act(act, z)
        err = np.abs(got - want) / np.abs(want)
        for zi, g, w, e in zip(z.ravel(), got.ravel(), want.ravel(), err.ravel()):
            if e > rel:
                problems.append(f"{act}({zi:.0e}) = {g!r}, expected {w!r} (relative error {e:.1e})")
    assert not problems, problems


# Units in the last place allowed for each activation's forward output,
# against the float64 reference of the same rounded input, wherever the
# result is a normal number (smaller results are compared absolutely, within
# the smallest normal number). Measured today: float32 at most 0.6 (gelu,
# leaky_relu), 1.5 (elu), 2.2 (selu), 2.5 (sigmoid), 2.6 (tanh), 2.9 (silu);
# float64 at most 2 (elu), 3 (selu, sigmoid, tanh), 4 (silu, and gelu, whose
# kernel corrects the rounding of erfc's argument -z / sqrt 2: uncorrected it
# cost about z^2 ulps, 503 at z = -32.8). Where a fixed
# bound cannot hold, ACT_ULPS_EXTRA gives the growth with z (see below).
ACT_ULPS = {
    F32: {"linear": 0, "relu": 0, "leaky_relu": 1, "elu": 2, "selu": 3, "gelu": 1,
          "silu": 4, "sigmoid": 3, "tanh": 3},
    F64: {"linear": 0, "relu": 0, "leaky_relu": 1, "elu": 3, "selu": 4, "gelu": 4,
          "silu": 5, "sigmoid": 4, "tanh": 4},
}


def _act_ulps_extra(act, dt, z):
    """Where a fixed ulp bound cannot hold today, the bound's growth:
    - float32 silu: for z below about -80, z sigmoid(z) loses precision as
      e^z nears the bottom of float32's normal range (12 ulps near z = -88,
      46 near -92, 52 near -104; the result is below 1e-33). This bounds
      today's kernel explicitly; it is a candidate for a kernel fix."""
    z = np.asarray(z, F64)
    if act == "gelu" and dt == F64:
        # below z = -37 the result nears the bottom of the normal range
        # (gelu(-37.5) = 1.6e-306), where the C library's erfc loses bits
        return np.where(z < -37, 32.0, 0.0)
    if act == "silu" and dt == F32:
        return np.where(z < -80, 60.0, 0.0)
    return 0.0


def _ulp_grid(dt):
    lin = np.linspace(-100, 100, 40001)
    small = np.geomspace(1e-30, 10, 2001)
    return np.concatenate([lin, small, -small]).astype(dt).reshape(1, -1)


# the activations added with softplus have their ulp tests in test_new_activations.py
@pytest.mark.parametrize("act", [a for a in ACTS if a in ACT_ULPS[F32]])
def test_activations_within_ulps_of_the_reference(act, dtype):
    """Element-wise activations over [-100, 100] and tiny magnitudes, in
    units in the last place: a relative bound that holds for small outputs
    (sigmoid(-9) = 1.2e-4 is held to a few ulps, not to an absolute 5e-5)."""
    dt = dtype
    z = _ulp_grid(dt)
    got = ops.activation_forward(z, act)
    want = ref_act(act, z)
    tiny = np.finfo(dt).tiny
    normal = np.abs(want) >= tiny
    allowed = ACT_ULPS[dt][act] + _act_ulps_extra(act, dt, z)
    err = ulp_error(got, want, dt)
    bad = normal & ~(err <= allowed)
    assert not bad.any(), (
        f"{act}: {int(bad.sum())} outputs over their ulp bound; worst at z = "
        f"{z[bad][np.argmax(err[bad])]!r}: {err[bad].max():.3g} ulps")
    sub = ~normal
    assert (np.abs(got[sub].astype(F64) - want[sub]) <= tiny).all(), f"{act}: below normal"


def test_softmax_within_ulps_of_the_reference(dtype, rng):
    """Softmax probabilities down to the bottom of the normal range, in
    ulps. A probability e^(z - max) carries the rounding of z - max, which
    is about |z - max| ulps in any implementation in that precision (33 ulps
    for a float32 probability near 1e-15): allowed 6 + |z - max| ulps."""
    dt = dtype
    z = rng.uniform(-3, 3, (400, 10))
    z[:, 0] -= np.repeat([0.0, 10.0, 20.0, 34.0, 60.0], 80)   # tiny probabilities
    z = z.astype(dt)
    got = ops.activation_forward(z, "softmax")
    want = ref_act("softmax", z)
    allowed = 6 + np.abs(z.astype(F64) - z.max(axis=1, keepdims=True))
    err = ulp_error(got, want, dt)
    normal = want >= np.finfo(dt).tiny
    bad = normal & ~(err <= allowed)
    assert not bad.any(), (f"{int(bad.sum())} probabilities over their ulp bound; worst "
                           f"{err[bad].max():.3g} ulps at p = {want[bad][np.argmax(err[bad])]!r}")


def test_model_methods_with_zeros_subnormals_and_1e20_raise_no_warnings():
    rng = np.random.default_rng(32)
    for dtype in ("float32", "float64"):
        m = classifier(dtype)
        x = rnd(rng, (40, 10), F64)
        x[0] = 0.0
        x[1] = -0.0
        x[2] = np.finfo(dtype).smallest_subnormal
        x[3] = 1e20
        x[4] = -1e20
        y = rng.integers(0, 4, 40)
        with strict():
            m.fit(x, y, epochs=2, batch_size=8, verbose=0)
            m.train_on_batch(x, y)
            m.evaluate(x, y, verbose=0)
            p = m.predict(x)
        assert np.isfinite(p).all()
        assert all(np.isfinite(w).all() for w in m.get_weights())


def test_invalid_numbers_are_refused_with_value_error_and_no_warnings():
    """Refusing bad values must not first trip NumPy's floating-point
    warnings: under warnings-as-errors the caller must still get the
    documented ValueError."""
    yp = np.zeros((2, 3), F32)
    m = fg.Sequential([Dense(2, input_dim=2)], seed=0)
    m.compile("sgd", "mse")
    cases = {
        "float labels 1e30": lambda: ops.loss_forward_backward(
            np.array([1e30, 0.0]), yp, "sparse_categorical_crossentropy"),
        "float labels -9.3e18": lambda: ops.loss_forward_backward(
            np.array([-9.3e18, 0.0]), yp, "sparse_categorical_crossentropy"),
        "x beyond float32 with a NaN": lambda: m.predict(np.array([[1e300, np.nan]])),
        "y beyond float32": lambda: m.evaluate(np.zeros((1, 2)), np.array([[1e300, 0.0]]),
                                               verbose=0),
    }
    problems = []
    for name, fn in cases.items():
        try:
            with strict():
                fn()
        except ValueError:
            continue
        except Exception as e:     # noqa: BLE001 - the point is which one
            problems.append(f"{name}: {type(e).__name__}: {e}")
        else:
            problems.append(f"{name}: accepted")
    assert not problems, "\n".join(problems)


def test_label_errors_name_the_label_the_caller_gave():
    yp = np.zeros((2, 3), F32)
    big = np.array([2**63 + 5, 0], np.uint64)
    with pytest.raises(ValueError, match="y_true") as info:
        ops.loss_forward_backward(big, yp, "sparse_categorical_crossentropy")
    assert str(2**63 + 5) in str(info.value), str(info.value)


# ---------------------------------------------------------------------------
# 4. properties
# ---------------------------------------------------------------------------

# FASTGRAD_HYPOTHESIS_EXAMPLES raises the number of examples for a longer run
PROP = settings(max_examples=int(os.environ.get("FASTGRAD_HYPOTHESIS_EXAMPLES", "50")),
                deadline=None, database=None, suppress_health_check=list(HealthCheck))


def _arr(draw, dt, shape, lo=-8.0, hi=8.0):
    width = 32 if dt == F32 else 64
    if dt == F32:   # bounds hypothesis accepts: representable, inside [lo, hi]
        lo32, hi32 = F32(lo), F32(hi)
        lo = float(lo32 if lo32 >= lo else np.nextafter(lo32, F32(np.inf)))
        hi = float(hi32 if hi32 <= hi else np.nextafter(hi32, F32(-np.inf)))
    return draw(hnp.arrays(dt, shape, elements=st.floats(lo, hi, width=width)))


@PROP
@given(data=st.data(), dt=st.sampled_from(DTYPES), act=st.sampled_from(ACTS),
       B=st.integers(0, 9), I=st.integers(0, 9), U=st.integers(0, 9), use_bias=st.booleans(),
       need_dx=st.booleans())
def test_property_dense_forward_backward(data, dt, act, B, I, U, use_bias, need_dx):
    x, k = _arr(data.draw, dt, (B, I)), _arr(data.draw, dt, (I, U), -2, 2)
    b = _arr(data.draw, dt, (U,)) if use_bias else None
    pre = np.empty((B, U), dt)
    with strict():
        out = ops.dense_forward(x, k, b, act, pre=pre)
    z, y = ref_dense_forward(x, k, b, act)
    zb = np.abs(x.astype(F64)) @ np.abs(k.astype(F64)) + (0 if b is None else np.abs(b))
    check(pre, z, dt, zb, "pre")
    check(out, y, dt, (zb.max(axis=1, keepdims=True) if U else zb) * 2 + EXP_SCALE.get(act, 0),
          "out")
    dout = _arr(data.draw, dt, (B, U))
    with strict():
        dx, dk, db = ops.dense_backward(dout, x, k, out, act, pre=pre, use_bias=use_bias,
                                        need_dx=need_dx)
    rdx, rdk, rdb, (bdx, bdk, bdb) = ref_dense_backward(dout, x, k, pre, act, y=out)
    check(dk, rdk, dt, bdk, "dkernel")
    assert (dx is None) == (not need_dx) and (db is None) == (not use_bias)
    if need_dx:
        check(dx, rdx, dt, bdx, "dx")
    if use_bias:
        check(db, rdb, dt, bdb, "dbias")


@PROP
@given(data=st.data(), dt=st.sampled_from(DTYPES), act=st.sampled_from(ACTS),
       B=st.integers(0, 9), O=st.integers(0, 9),
       alpha=st.one_of(st.none(), st.floats(0, 3)))
def test_property_activation_forward_backward(data, dt, act, B, O, alpha):
    x = _arr(data.draw, dt, (B, O), -20, 20)
    g = _arr(data.draw, dt, (B, O))
    with strict():
        y = ops.activation_forward(x, act, alpha=alpha)
        dx = ops.activation_backward(g, y, act, x=x, alpha=alpha)
    a = alpha if act in ("leaky_relu", "elu") else None
    check(y, ref_act(act, x, a), dt, np.abs(x) + EXP_SCALE.get(act, 0), "forward")
    want, bound = ref_act_vjp(act, x, g, a, y=y, bound=True)
    check(dx, want, dt, bound, "backward")


@PROP
@given(data=st.data(), dt=st.sampled_from(DTYPES), kind=st.sampled_from(_loss_kinds()),
       B=st.integers(0, 9), O=st.integers(1, 9), delta=st.floats(0.1, 3))
def test_property_losses(data, dt, kind, B, O, delta):
    kind, logits = kind
    draw = data.draw
    if kind == "sparse_categorical_crossentropy":
        yt = np.array(draw(st.lists(st.integers(0, O - 1), min_size=B, max_size=B)), np.int64)
    elif kind in ("binary_crossentropy", "categorical_crossentropy"):
        yt = _arr(draw, dt, (B, O), 0, 1)
    else:
        yt = _arr(draw, dt, (B, O))
    if logits or kind in ("mse", "mae", "huber"):
        yp = _arr(draw, dt, (B, O), -30, 30)
    elif kind == "binary_crossentropy":
        yp = _arr(draw, dt, (B, O), 0, 1)
    else:
        yp = _arr(draw, dt, (B, O), 1e-3, 1)
    with strict():
        value, d, rows = ops.loss_forward_backward(yt, yp, kind, from_logits=logits,
                                                   delta=delta, per_sample=True)
    rv, rrows, rd, rb, db = ref_loss(kind, yt, yp, logits, delta)
    assert isinstance(value, float) and d.shape == (B, O) and rows.shape == (B,)
    check(value, rv, dt, rb.mean() if B else 0.0, "loss")
    check(rows, rrows, dt, rb, "rows")
    check(d, rd, dt, db, "grad")


def test_losses_over_zero_outputs_do_not_crash():
    """O = 0 with rows: the means over outputs are 0/0 (NaN, as NumPy's mean
    of nothing) and the sums over outputs are 0; the gradient is empty."""
    for dt in DTYPES:
        for kind, logits in _loss_kinds():
            yt = np.zeros(3, np.int64) if kind.startswith("sparse") else np.zeros((3, 0), dt)
            if kind.startswith("sparse"):
                with pytest.raises(ValueError, match="y_true"):
                    ops.loss_forward_backward(yt, np.zeros((3, 0), dt), kind,
                                              from_logits=logits)
                continue
            with strict():
                value, d = ops.loss_forward_backward(yt, np.zeros((3, 0), dt), kind,
                                                     from_logits=logits)
            assert d.shape == (3, 0)
            assert math.isnan(value) or value == 0.0, (kind, value)


@PROP
@given(data=st.data(), dt=st.sampled_from(DTYPES), B=st.integers(0, 9), F=st.integers(0, 9),
       training=st.booleans(), affine=st.booleans(), momentum=st.floats(0, 1),
       eps=st.floats(1e-5, 1.0))
def test_property_batchnorm(data, dt, B, F, training, affine, momentum, eps):
    draw = data.draw
    x = _arr(draw, dt, (B, F))
    gamma = _arr(draw, dt, (F,), -3, 3) if affine else None
    beta = _arr(draw, dt, (F,)) if affine else None
    mm = _arr(draw, dt, (F,))
    mv = _arr(draw, dt, (F,), 0, 4)
    m, v = mm.copy(), mv.copy()
    if training and B < 1:
        with pytest.raises(ValueError, match="^x:"):
            ops.batchnorm_forward(x, gamma, beta, m, v, training=True)
        assert same_bits(m, mm) and same_bits(v, mv)
        return
    with strict():
        out, mean, rstd = ops.batchnorm_forward(x, gamma, beta, m, v, training=training,
                                                momentum=momentum, epsilon=eps)
    rout, rmean, rrstd, rmm, rmv = ref_bn_forward(x, gamma, beta, mm, mv, training,
                                                  momentum, eps)
    check(mean, rmean, dt, 8.0, "mean")
    check(rstd, rrstd, dt, 0.0, "rstd")
    gb = 1.0 if gamma is None else np.abs(gamma.astype(F64))
    check(out, rout, dt, gb * (np.abs(x.astype(F64)) + np.abs(rmean)) * rrstd + 8, "out")
    check(m, rmm, dt, 8.0, "moving_mean")
    check(v, rmv, dt, 8.0, "moving_variance")
    if training:
        dout = _arr(draw, dt, (B, F))
        with strict():
            dx, dg, db = ops.batchnorm_backward(dout, x, mean, rstd, gamma)
        rdx, rdg, rdb, bound = ref_bn_backward(dout, x, mean, rstd, gamma)
        xhat = (x.astype(F64) - mean) * rstd
        check(dx, rdx, dt, bound, "dx")
        check(dg, rdg, dt, np.abs(dout * xhat).sum(axis=0), "dgamma")
        check(db, rdb, dt, np.abs(dout.astype(F64)).sum(axis=0), "dbeta")


# ---------------------------------------------------------------------------
# 5. threads
# ---------------------------------------------------------------------------

def _run_threads(targets):
    """Start every target at once (behind a barrier); return the exceptions
    raised in each thread."""
    barrier = threading.Barrier(len(targets))
    errors = [None] * len(targets)

    def wrap(i, fn):
        try:
            barrier.wait()
            fn()
        except BaseException as e:   # noqa: BLE001 - reported to the test
            errors[i] = e

    threads = [threading.Thread(target=wrap, args=(i, fn)) for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return errors


def np_predict(model, x, terms=False):
    """Inference of a Dense/BatchNormalization/Dropout/Activation stack in
    float64 from get_weights(). With terms, also the magnitudes summed into
    each output of a last Dense without activation, |h| |k| + |b| (0
    otherwise): the scale of its rounding errors where the sum cancels."""
    w = list(model.get_weights())
    h = np.asarray(x, F64)
    scale = 0.0
    for layer in model.layers:
        scale = 0.0
        if layer.kind == "Dense":
            k = w.pop(0)
            b = w.pop(0) if layer.use_bias else 0.0
            if layer.activation == "linear":
                scale = np.abs(h) @ np.abs(k.astype(F64)) + np.abs(b)
            h = ref_act(layer.activation, h @ k.astype(F64) + b)
        elif layer.kind == "BatchNormalization":
            gamma = w.pop(0) if layer.scale else 1.0
            beta = w.pop(0) if layer.center else 0.0
            mm, mv = w.pop(0), w.pop(0)
            h = ref_bn_forward(h, gamma, beta, mm, mv, training=False,
                               epsilon=layer.epsilon)[0]
        elif layer.kind == "Activation":
            h = ref_act(layer.activation, h)
    return (h, scale) if terms else h


def test_sixteen_threads_predicting_on_one_model_match_a_sequential_run():
    rng = np.random.default_rng(41)
    m = classifier()
    x = rnd(rng, (300, 10), F32)
    m.fit(x, rng.integers(0, 4, 300), epochs=1, verbose=0)
    want = m.predict(x, batch_size=24)
    results = [[] for _ in range(16)]

    def work(i):
        return lambda: [results[i].append(m.predict(x, batch_size=24)) for _ in range(4)]

    errors = _run_threads([work(i) for i in range(16)])
    assert errors == [None] * 16
    assert all(len(r) == 4 and all(same_bits(p, want) for p in r) for r in results)


def test_fit_while_other_threads_predict_and_fit_never_corrupts_the_model():
    rng = np.random.default_rng(42)
    m = classifier()
    x = rnd(rng, (128, 10), F32)
    y = rng.integers(0, 4, 128)
    m.fit(x, y, epochs=1, batch_size=32, verbose=0)
    steps0 = m.optimizer.iterations
    preds, losses = [], []
    fits = {"main": 0, "other": 0, "tob": 0}

    def main_fit():
        for _ in range(3):
            m.fit(x, y, epochs=2, batch_size=32, verbose=0)
            fits["main"] += 2 * 4

    def other_fit():
        for _ in range(2):
            m.fit(x[:64], y[:64], epochs=1, batch_size=16, shuffle=False, verbose=0)
            fits["other"] += 4

    def tob():
        for _ in range(10):
            losses.append(m.train_on_batch(x[:20], y[:20]))
            fits["tob"] += 1

    def predictor():
        for _ in range(10):
            p = m.predict(x[:50], batch_size=7)
            preds.append(p)

    errors = _run_threads([main_fit, other_fit, tob] + [predictor] * 5)
    assert errors == [None] * 8, errors
    # every step of every caller was applied once: none lost, none doubled
    assert m.optimizer.iterations == steps0 + sum(fits.values())
    assert all(p.shape == (50, 4) and np.isfinite(p).all() for p in preds)
    assert len(losses) == 10 and all(np.isfinite(np.asarray(v, F64)).all() for v in losses)
    final = m.predict(x)
    assert np.isfinite(final).all()
    check(final, np_predict(m, x), F32, 0.0, "predict vs NumPy from get_weights")
    # and a fresh model given these weights predicts the same bits: nothing
    # outside get_weights() (work buffers, layer state) was left inconsistent
    clone = classifier(seed=99)
    clone.set_weights(m.get_weights())
    assert same_bits(clone.predict(x), final)
    m.fit(x, y, epochs=1, batch_size=32, verbose=0)
    assert np.isfinite(m.predict(x)).all()


def test_models_in_parallel_threads_match_sequential_runs():
    """No hidden shared state between models (or in the kernels): each
    thread's seeded fit gives the same bits as alone."""
    rng = np.random.default_rng(43)
    x = rnd(rng, (96, 10), F32)
    y = rng.integers(0, 4, 96)

    def run(seed):
        m = classifier(seed=seed)
        m.fit(x, y, epochs=3, batch_size=16, verbose=0)
        return m.get_weights(), m.predict(x)

    want = [run(s) for s in range(6)]
    got = [None] * 6

    def work(s):
        return lambda: got.__setitem__(s, run(s))

    errors = _run_threads([work(s) for s in range(6)])
    assert errors == [None] * 6
    assert all(same_bits(g, w) for g, w in zip(got, want))


def test_small_products_leave_the_blas_thread_count_as_it_was():
    """Products under 2**21 multiply-adds hold SciPy's OpenBLAS to one thread
    while they run; from many threads at once, the count before comes back
    (the user's, also one set with fg.threads)."""
    threadpoolctl = pytest.importorskip(
        "threadpoolctl", reason="needs the sklearn extra (threadpoolctl) to read the count")
    from fastgrad import _core
    if not _core.BLAS_ONE_THREAD:
        pytest.skip("this BLAS has no openblas_set_num_threads_local")
    ctl = threadpoolctl.ThreadpoolController().select(user_api="blas")

    def counts():
        return [lib["num_threads"] for lib in ctl.info()]

    rng = np.random.default_rng(45)
    a, b = rnd(rng, (32, 64), F32), rnd(rng, (64, 256), F32)   # 0.5M multiply-adds
    want = ops.matmul(a, b)
    before = counts()

    def work():
        for _ in range(300):
            assert np.array_equal(ops.matmul(a, b), want)

    with fg.threads(2):
        two = counts()
        assert _run_threads([work] * 6) == [None] * 6
        assert counts() == two
    with fg.threads(1):
        ops.matmul(a, b)
        assert counts() == [1] * len(two)
    assert counts() == before


def test_kernels_called_concurrently_give_the_sequential_results():
    rng = np.random.default_rng(44)
    a, b = rnd(rng, (300, 257), F32), rnd(rng, (257, 199), F32)
    a64, b64 = a.astype(F64), b.astype(F64)
    x, k = rnd(rng, (301, 129), F64), rnd(rng, (129, 67), F64)
    labels = rng.integers(0, 67, 301)
    calls = [
        lambda: ops.matmul(a, b),
        lambda: ops.matmul(a64, b64, trans_b=False),
        lambda: ops.dense_forward(x, k, None, "softmax"),
        lambda: ops.dense_backward(np.ones((301, 67)), x, k, ops.dense_forward(x, k), "linear"),
        lambda: ops.batchnorm_forward(x),
        lambda: ops.loss_forward_backward(labels, x @ k, "sparse_categorical_crossentropy",
                                          from_logits=True),
        lambda: ops.activation_forward(x, "gelu"),
        lambda: ops.sum_squares(a),
    ]
    want = [c() for c in calls]
    got = [[] for _ in range(16)]

    def work(i):
        def fn():
            for r in range(3):
                j = (i + r) % len(calls)
                got[i].append((j, calls[j]()))
        return fn

    errors = _run_threads([work(i) for i in range(16)])
    assert errors == [None] * 16
    bad = [(i, j) for i in range(16) for j, r in got[i] if not same_bits(r, want[j])]
    assert not bad


def _one_blas_thread():
    threadpoolctl = pytest.importorskip(
        "threadpoolctl", reason="needs threadpoolctl (pip install threadpoolctl) to "
                                "limit BLAS to one thread")
    return threadpoolctl.threadpool_limits(1)


def _big_dense_models(rng):
    """Two models of one Dense(2048, tanh) on 2048 features, and a
    512-row input for each: one 512 x 2048 x 2048 GEMM per predict call."""
    models = [fg.Sequential([Dense(2048, activation="tanh", input_dim=2048)], seed=s)
              for s in (1, 2)]
    return models, [rnd(rng, (512, 2048), F32) for _ in models]


def _longest_pause_of_a_python_thread(fn):
    """(seconds fn() took, the longest time a pure-Python thread running
    meanwhile went without a step): a call that holds the GIL stops that
    thread for all its length."""
    import time
    ticks, done = [], threading.Event()

    def ticker():
        while not done.is_set():
            ticks.append(time.perf_counter())

    t = threading.Thread(target=ticker)
    t.start()
    while not ticks:
        time.sleep(0.001)
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    done.set()
    t.join()
    inside = [a for a in ticks if t0 <= a <= t1]
    return t1 - t0, float(np.diff([t0, *inside, t1]).max())


@pytest.mark.slow
def test_kernels_release_the_gil_while_they_run():
    """While a model's predict or ops.dense_forward runs one large GEMM, a
    pure-Python thread keeps running: its longest pause is a small part of
    the call (a call holding the GIL would stop it for the whole call).
    This holds on a loaded machine and on one core, where a speed-up cannot
    be measured."""
    rng = np.random.default_rng(48)
    models, xs = _big_dense_models(rng)
    kernel = models[0].get_weights()[0]
    with _one_blas_thread():
        for what, fn in [("predict", lambda: models[0].predict(xs[0], batch_size=512)),
                         ("dense_forward", lambda: ops.dense_forward(xs[1], kernel, None,
                                                                     "tanh"))]:
            runs = [_longest_pause_of_a_python_thread(fn) for _ in range(3)]
            took, pause = sorted(runs, key=lambda r: r[1] / r[0])[1]   # the median run
            assert pause < 0.5 * took, (
                f"{what}: a Python thread stood still for {pause:.3f} s of a {took:.3f} s "
                "call: the kernel seems to hold the GIL")


@pytest.mark.slow
def test_two_models_run_their_kernels_in_parallel_threads():
    """Two threads, each predicting with its own model (a 512 x 2048 x 2048
    GEMM and a tanh per call, BLAS limited to one thread so that any overlap
    comes from the two Python threads), take clearly less wall time together
    than one after the other, and give the same bits as alone. Timing on a
    shared machine is noisy: each try times sequential, parallel, sequential
    and compares the parallel time with the faster sequential one; up to
    three tries. Two NumPy products (which release the GIL) timed the same
    way are the control: the test fails when fastgrad's best ratio is over
    0.85 and clearly worse (by 0.2) than NumPy's, and is skipped when NumPy
    did no better, as no second core was free."""
    import time

    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores")
    rng = np.random.default_rng(47)
    models, xs = _big_dense_models(rng)
    kernels = [m.get_weights()[0] for m in models]
    runs = {"fastgrad": lambda i: models[i].predict(xs[i], batch_size=512),
            "numpy": lambda i: xs[i] @ kernels[i]}

    def timed_pair(fn, parallel):
        got = [None, None]

        def run(i):
            def job():
                got[i] = [fn(i) for _ in range(2)]
            return job
        t = time.perf_counter()
        if parallel:
            assert _run_threads([run(0), run(1)]) == [None, None]
        else:
            run(0)()
            run(1)()
        return time.perf_counter() - t, got

    ratios = {"fastgrad": [], "numpy": []}
    with _one_blas_thread():
        want = [runs["fastgrad"](i) for i in range(2)]
        for _ in range(3):
            for name, fn in runs.items():
                seq1, _ = timed_pair(fn, False)
                par, got = timed_pair(fn, True)
                seq2, _ = timed_pair(fn, False)
                ratios[name].append(par / min(seq1, seq2))
                if name == "fastgrad":
                    assert all(same_bits(p, want[i]) for i in range(2) for p in got[i])
            if ratios["fastgrad"][-1] < 0.85:
                return
    shown = {k: [round(r, 2) for r in v] for k, v in ratios.items()}
    if min(ratios["fastgrad"]) > min(ratios["numpy"]) + 0.2:
        pytest.fail(f"two threads on two models took {shown['fastgrad']} of the sequential "
                    f"time, while NumPy's products took {shown['numpy']}: the kernels do "
                    "not run concurrently")
    # NumPy did no better: the machine had no second core free long enough
    pytest.skip(f"no free second core: parallel / sequential time {shown}")


def test_errors_in_compiled_code_surface_in_the_calling_thread():
    rng = np.random.default_rng(45)
    yp = rnd(rng, (64, 5), F32)
    good_labels = rng.integers(0, 5, 64)
    bad_labels = good_labels.copy()
    bad_labels[17] = 5
    want = ops.loss_forward_backward(good_labels, yp, "sparse_categorical_crossentropy")
    results = {}

    def bad_ops(i):
        def fn():
            for _ in range(20):
                with pytest.raises(ValueError, match="label 5 at row 17"):
                    ops.loss_forward_backward(bad_labels, yp, "sparse_categorical_crossentropy")
            results[i] = "raised"
        return fn

    def bad_core(i):
        # past ops' checks: the compiled module's own checks and status codes
        def fn():
            d = np.empty_like(yp)
            for _ in range(20):
                with pytest.raises(ValueError, match="label"):
                    _core.loss_forward_backward(yp, None, bad_labels, None, d, None, 5, False,
                                                1.0)
                with pytest.raises(ValueError, match="out"):
                    _core.matmul(yp, yp.T.copy(), np.empty((3, 3), F32))
                with pytest.raises(ValueError, match="activation"):
                    _core.bias_act_forward(yp, None, d, None, 99, 0.0)
            results[i] = "raised"
        return fn

    def good(i):
        def fn():
            for _ in range(20):
                assert same_bits(ops.loss_forward_backward(
                    good_labels, yp, "sparse_categorical_crossentropy"), want)
            results[i] = "ok"
        return fn

    targets = [bad_ops(i) if i % 3 == 0 else bad_core(i) if i % 3 == 1 else good(i)
               for i in range(12)]
    errors = _run_threads(targets)
    assert errors == [None] * 12, errors
    assert [results[i] for i in range(12)] == ["raised", "raised", "ok"] * 4


def test_a_model_error_in_one_thread_leaves_the_others_working():
    rng = np.random.default_rng(46)
    m = classifier()
    x = rnd(rng, (60, 10), F32)
    y = rng.integers(0, 4, 60)
    m.fit(x, y, epochs=1, verbose=0)
    bad_y = y.copy()
    bad_y[3] = 9
    before = m.get_weights()

    def bad():
        for _ in range(10):
            with pytest.raises(ValueError, match="^y: label 9 at row 3"):
                m.fit(x, bad_y, epochs=1, verbose=0)
            with pytest.raises(ValueError, match="features"):
                m.predict(x[:, :5])

    want = m.predict(x)

    def pred():
        for _ in range(10):
            assert same_bits(m.predict(x), want)

    errors = _run_threads([bad, pred, bad, pred])
    assert errors == [None] * 4, errors
    assert same_bits(m.get_weights(), before)


# ---------------------------------------------------------------------------
# 6. fuzz harnesses, briefly
# ---------------------------------------------------------------------------

def _fuzz_module():
    path = Path(__file__).parent / "fuzz" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("fastgrad_tests_fuzz", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("target", ["load_model", "ops"] + (
    ["load_keras"] if importlib.util.find_spec("h5py") else []))
def test_fuzz_harness_briefly(target, tmp_path):
    fuzz = _fuzz_module()
    stats = fuzz.run_random(target, seconds=3.0, seed=12345, workdir=str(tmp_path))
    # a Keras archive goes through zip and HDF5 each time: a few dozen a
    # minute under the sanitizers, so there a handful is enough here (the
    # fuzz run of CI gives it a minute)
    assert stats.iterations >= (2 if target == "load_keras" else 50), stats.iterations
    if stats.failures:
        pytest.fail(f"{len(stats.failures)} failures in {stats.iterations} iterations; the "
                    "distinct ones:\n\n"
                    + "\n\n".join(f.describe() for f in stats.unique.values()), pytrace=False)
