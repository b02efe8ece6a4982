"""Hardening tests: memory layouts, sizes, extreme values, properties,
threads, hostile model files and save faults, and a short run of the fuzz
harnesses in tests/fuzz.py.

Every kernel result is checked against a small float64 NumPy reference
written in this file (the ``ref_*`` functions), computed from the same
already-rounded inputs, with a tolerance per dtype scaled by an error bound
(the sum of the magnitudes that enter each result).

Layout of this file:
  references ........ ref_act, ref_act_vjp, ref_dense_*, ref_loss, ref_bn_*
  helpers ........... layouts, tolerances, strict floating-point mode
  1. layouts ........ kernels and model methods on every memory layout;
                      out= buffers of the wrong shape, dtype or layout
  2. sizes .......... 1..33 on every axis, and 1029 x 917
  3. values ......... +-0, subnormals, +-1e20, inf and NaN, no warnings
  4. properties ..... hypothesis, zero-sized sides included
  5. threads ........ shared models, concurrent kernels, errors per thread
  6. model files .... overflowing sizes, unknown names, trailing bytes,
                      values that break training later; save faults
  7. fuzz ........... tests/fuzz.py for ~3 s per harness
"""
import errno
import importlib.util
import json
import math
import os
import re
import struct
import sys
import threading
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import special

import fastgrad as fg
import fastgrad.saving
from fastgrad import _core, ops
from fastgrad.layers import BatchNormalization, Dense, Dropout

F32, F64 = np.float32, np.float64
DTYPES = [F32, F64]
DT_IDS = ["f32", "f64"]
ACTS = list(ops.ACTIVATIONS)
# the losses referenced below; the later ones (log_cosh to the focal
# losses) have their sizes, layouts and edge values in test_new_losses.py
LOSSES = [k for k in ops.LOSSES if k in ("mse", "mae", "huber", "binary_crossentropy",
                                         "categorical_crossentropy",
                                         "sparse_categorical_crossentropy")]

# Relative error allowed against an error bound (see check()).
TOL = {F32: 5e-5, F64: 1e-12}

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
DEFAULT_ALPHA = {"leaky_relu": 0.2, "elu": 1.0}
EPS = 1e-7   # the probability losses' clip (Keras' epsilon)
# elu and selu compute alpha * (exp(z) - 1): near z = 0 its error is absolute,
# on the scale of alpha (see test_elu_and_selu_are_accurate_near_zero)
EXP_SCALE = {"elu": 3.0, "selu": 2.0}


# ---------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------

def _alpha(name, alpha):
    return DEFAULT_ALPHA.get(name, 0.0) if alpha is None else float(alpha)


def ref_act(name, z, alpha=None):
    """y = act(z) in float64 (softmax over the last axis)."""
    z = np.asarray(z, F64)
    a = _alpha(name, alpha)
    with np.errstate(all="ignore"):
        zn = np.minimum(z, 0.0)   # the unused branch of elu & co stays finite
        if name == "linear":
            return z.copy()
        if name == "relu":
            return np.where(z > 0, z, 0.0) + np.where(np.isnan(z), z, 0.0)
        if name == "leaky_relu":
            return np.where(z > 0, z, a * z)
        if name == "elu":
            return np.where(z > 0, z, a * np.expm1(zn))
        if name == "selu":
            return SELU_SCALE * np.where(z > 0, z, SELU_ALPHA * np.expm1(zn))
        if name == "gelu":
            return 0.5 * z * (1.0 + special.erf(z / math.sqrt(2.0)))
        if name == "silu":
            return z * special.expit(z)
        if name == "sigmoid":
            return special.expit(z)
        if name == "tanh":
            return np.tanh(z)
        if name == "softmax":
            if z.shape[-1] == 0:
                return z.copy()
            e = np.exp(z - z.max(axis=-1, keepdims=True))
            return e / e.sum(axis=-1, keepdims=True)
        if name == "softplus":
            return np.logaddexp(z, 0.0)
        if name == "softsign":
            return z / (1.0 + np.abs(z))
        if name == "relu6":
            return np.where(z > 6, 6.0, np.where(z > 0, z, 0.0)) + np.where(np.isnan(z), z, 0.0)
        if name in ("hard_sigmoid", "hard_silu"):
            t = z + 3.0
            hs = (np.where(t > 6, 6.0, np.where(t > 0, t, 0.0)) + np.where(np.isnan(t), t, 0.0)) / 6
            return hs if name == "hard_sigmoid" else z * hs
        if name == "mish":
            return z * np.tanh(np.logaddexp(z, 0.0))
        if name == "exponential":
            return np.exp(z)
        if name == "log_softmax":
            if z.shape[-1] == 0:
                return z.copy()
            return z - special.logsumexp(z, axis=-1, keepdims=True)
    raise KeyError(name)


def ref_act_vjp(name, z, g, alpha=None, y=None, bound=False):
    """dz = g * act'(z) in float64. The slope comes from the forward output y
    where the documented backward uses it (relu & co: whether y > 0; elu,
    selu: y + alpha; sigmoid: y (1 - y); tanh: 1 - y^2; softmax:
    y (g - sum(g y)) per row) and y is given, else from z. With bound=True
    also returns an error bound: the magnitudes summed into each entry."""
    z = np.asarray(z, F64)
    g = np.asarray(g, F64)
    a = _alpha(name, alpha)
    zn = np.minimum(z, 0.0)
    if y is not None:
        y = np.asarray(y, F64)
    if name == "softmax":
        y = ref_act("softmax", z) if y is None else y
        dz = y * (g - np.sum(g * y, axis=-1, keepdims=True))
        b = y * (np.abs(g) + np.sum(np.abs(g) * y, axis=-1, keepdims=True))
        return (dz, b) if bound else dz
    if name == "log_softmax":
        sm = np.exp(ref_act("log_softmax", z) if y is None else y)
        dz = g - sm * np.sum(g, axis=-1, keepdims=True)
        b = np.abs(g) + sm * np.sum(np.abs(g), axis=-1, keepdims=True)
        return (dz, b) if bound else dz
    pos = (z > 0) if y is None else (y > 0)
    if name == "linear":
        slope = np.ones_like(z)
    elif name == "relu":
        slope = pos.astype(F64)
    elif name == "leaky_relu":
        slope = np.where(pos, 1.0, a)
    elif name == "elu":
        slope = np.where(pos, 1.0, a * np.exp(zn) if y is None else y + a)
    elif name == "selu":
        slope = np.where(pos, SELU_SCALE, SELU_SCALE * SELU_ALPHA * np.exp(zn) if y is None
                         else y + SELU_SCALE * SELU_ALPHA)
    elif name == "gelu":
        slope = (0.5 * (1.0 + special.erf(z / math.sqrt(2.0)))
                 + z * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi))
    elif name == "silu":
        s = special.expit(z)
        slope = s * (1.0 + z * (1.0 - s))
    elif name == "sigmoid":
        s = special.expit(z) if y is None else y
        slope = s * (1.0 - s)
    elif name == "tanh":
        slope = 1.0 - (np.tanh(z) if y is None else y) ** 2
    elif name == "softplus":
        slope = special.expit(z)
    elif name == "softsign":
        slope = 1.0 / (1.0 + np.abs(z)) ** 2
    elif name == "relu6":
        inside = (z > 0) & (z < 6) if y is None else (y > 0) & (y < 6)
        slope = inside.astype(F64)
    elif name == "hard_sigmoid":
        inside = (z > -3) & (z < 3) if y is None else (y > 0) & (y < 1)
        slope = np.where(inside, 1.0 / 6.0, 0.0)
    elif name == "hard_silu":
        slope = np.where(z >= 3, 1.0, np.where(z > -3, (2.0 * z + 3.0) / 6.0, 0.0))
    elif name == "mish":
        with np.errstate(all="ignore"):
            sp = np.logaddexp(z, 0.0)
            slope = np.tanh(sp) + z * special.expit(z) / np.cosh(sp) ** 2
    elif name == "exponential":
        slope = np.exp(z) if y is None else y
    else:
        raise KeyError(name)
    dz = g * slope
    return (dz, np.abs(g) * (np.abs(slope) + 1.0)) if bound else dz


def ref_dense_forward(x, kernel, bias, act, alpha=None):
    """(z, y) of y = act(x @ kernel + bias), float64."""
    z = np.asarray(x, F64) @ np.asarray(kernel, F64)
    if bias is not None:
        z = z + np.asarray(bias, F64)
    return z, ref_act(act, z, alpha)


def ref_dense_backward(dout, x, kernel, z, act, alpha=None, y=None):
    """(dx, dkernel, dbias, bounds) in float64; bounds holds an error bound
    for each of the three (the magnitudes summed into each entry)."""
    dz, dzb = ref_act_vjp(act, z, dout, alpha, y, bound=True)
    k, x = np.asarray(kernel, F64), np.asarray(x, F64)
    bounds = (dzb @ np.abs(k).T, np.abs(x).T @ dzb, dzb.sum(axis=0))
    return dz @ k.T, x.T @ dz, dz.sum(axis=0), bounds


def one_hot(labels, classes):
    labels = np.asarray(labels).reshape(-1)
    t = np.zeros((labels.shape[0], classes))
    t[np.arange(labels.shape[0]), labels] = 1.0
    return t


def ref_loss(kind, y_true, y_pred, from_logits=False, delta=1.0):
    """(mean loss, per-row losses, d mean / d y_pred, bound of the rows,
    bound of the gradient) in float64, as documented in fastgrad.losses
    (clipped probabilities pass no gradient). The bounds are the magnitudes
    of the terms summed into each result, for the tolerance."""
    p = np.asarray(y_pred, F64)
    B, O = p.shape
    if kind == "sparse_categorical_crossentropy":
        t, kind = one_hot(y_true, O), "categorical_crossentropy"
    else:
        t = np.asarray(y_true, F64)
    e = p - t
    at, ap = np.abs(t), np.abs(p)
    with np.errstate(all="ignore"):
        if kind == "mse":
            rows, d = np.mean(e * e, axis=1), 2.0 * e / (B * O)
            rb, db = np.mean((ap + at) ** 2, axis=1), 2.0 * (ap + at) / (B * O)
        elif kind == "mae":
            rows, d = np.mean(np.abs(e), axis=1), np.sign(e) / (B * O)
            rb, db = np.mean(ap + at, axis=1), np.ones_like(p) / (B * O)
        elif kind == "huber":
            small = np.abs(e) <= delta
            rows = np.mean(np.where(small, 0.5 * e * e, delta * np.abs(e) - 0.5 * delta ** 2),
                           axis=1)
            d = np.where(small, e, delta * np.sign(e)) / (B * O)
            rb = np.mean((ap + at) ** 2 + delta * (ap + at) + delta ** 2, axis=1)
            db = (ap + at + delta) / (B * O)
        elif kind == "binary_crossentropy" and from_logits:
            terms = np.maximum(p, 0) - p * t + np.log1p(np.exp(-np.abs(p)))
            rows = np.mean(terms, axis=1)
            d = (special.expit(p) - t) / (B * O)
            rb = np.mean(ap + ap * at + 1.0, axis=1)
            db = (1.0 + at) / (B * O)
        elif kind == "binary_crossentropy":
            pc = np.clip(p, EPS, 1 - EPS)
            rows = np.mean(-(t * np.log(pc) + (1 - t) * np.log(1 - pc)), axis=1)
            inside = (p >= EPS) & (p <= 1 - EPS)
            d = np.where(inside, (-t / pc + (1 - t) / (1 - pc)), 0.0) / (B * O)
            rb = np.mean(at * np.abs(np.log(pc)) + np.abs(1 - t) * np.abs(np.log(1 - pc)), axis=1)
            db = np.where(inside, at / pc + np.abs(1 - t) / (1 - pc), 0.0) / (B * O)
        elif kind == "categorical_crossentropy" and from_logits:
            lse = special.logsumexp(p, axis=1, keepdims=True) if O else np.zeros((B, 1))
            tsum = t.sum(axis=1, keepdims=True)
            rows = np.sum(t * (lse - p), axis=1)
            sm = np.exp(p - lse)
            d = (sm * tsum - t) / B
            rb = np.sum(at * (np.abs(lse) + ap + 1.0), axis=1)   # log(sum) err ~ absolute
            db = (sm * np.abs(t).sum(axis=1, keepdims=True) + at) / B
        elif kind == "categorical_crossentropy":
            s = p.sum(axis=1, keepdims=True)
            q = p / s
            inside = (q >= EPS) & (q <= 1 - EPS)
            logq = np.log(np.clip(q, EPS, 1 - EPS))
            rows = -np.sum(np.where(t != 0, t * logq, 0.0), axis=1)
            tu = np.sum(np.where(inside, t, 0.0), axis=1, keepdims=True)
            d = (tu - np.where(inside & (t != 0), t / q, 0.0)) / s / B
            rb = np.sum(np.where(t != 0, at * np.abs(logq), 0.0), axis=1)
            db = (np.sum(np.where(inside, at, 0.0), axis=1, keepdims=True)
                  + np.where(inside & (t != 0), np.abs(t / q), 0.0)) / np.abs(s) / B
        else:
            raise KeyError(kind)
    return (float(rows.mean()) if B else 0.0), rows, d, rb, db


def ref_bn_forward(x, gamma=None, beta=None, moving_mean=None, moving_variance=None,
                   training=True, momentum=0.99, epsilon=1e-3):
    """(out, mean, rstd, new moving_mean, new moving_variance), float64."""
    x = np.asarray(x, F64)
    F = x.shape[1]
    mm = np.zeros(F) if moving_mean is None else np.asarray(moving_mean, F64)
    mv = np.ones(F) if moving_variance is None else np.asarray(moving_variance, F64)
    if training:
        mu, var = x.mean(axis=0), x.var(axis=0)
        mm, mv = momentum * mm + (1 - momentum) * mu, momentum * mv + (1 - momentum) * var
    else:
        mu, var = mm, mv
    rstd = 1.0 / np.sqrt(var + epsilon)
    g = np.ones(F) if gamma is None else np.asarray(gamma, F64)
    b = np.zeros(F) if beta is None else np.asarray(beta, F64)
    return g * (x - mu) * rstd + b, mu, rstd, mm, mv


def ref_bn_backward(dout, x, mean, rstd, gamma=None):
    """(dx, dgamma, dbeta, bound of dx), float64, by the documented closed form."""
    dout, x = np.asarray(dout, F64), np.asarray(x, F64)
    B, F = x.shape
    g = np.ones(F) if gamma is None else np.asarray(gamma, F64)
    xhat = (x - mean) * rstd
    dbeta, dgamma = dout.sum(axis=0), (dout * xhat).sum(axis=0)
    if B == 0:
        return np.zeros_like(x), dgamma, dbeta, np.zeros_like(x)
    dx = g * rstd / B * (B * dout - dbeta - xhat * dgamma)
    bound = np.abs(g * rstd) * (np.abs(dout) + np.abs(dout).mean(axis=0)
                                + np.abs(xhat) * np.abs(dout * xhat).mean(axis=0))
    return dx, dgamma, dbeta, bound


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def check(got, want, dt, bound=None, what=""):
    """|got - want| <= TOL[dt] * (|want| + bound) + tiny elementwise (bound
    default: max(1, max |want|); tiny the smallest normal number of dt, for
    results that underflow); equal infinities and NaN in both places pass."""
    got = np.asarray(got)
    want = np.asarray(want, F64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    if bound is None:
        finite = want[np.isfinite(want)]
        bound = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    g = got.astype(F64)
    with np.errstate(all="ignore"):
        err = np.abs(g - want)
        floor = np.finfo(dt).tiny     # results in the subnormal range round absolutely
        ok = ((err <= TOL[dt] * (np.abs(want) + bound) + floor) | (g == want)
              | (np.isnan(g) & np.isnan(want)))
    if not ok.all():
        idx = tuple(np.argwhere(~ok)[0])
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.size} entries differ; "
                             f"first at {idx}: got {g[idx]!r}, expected {want[idx]!r}")


def same_bits(a, b):
    """Bit-identical arrays (NaN payloads included), or equal scalars."""
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same_bits(p, q) for p, q in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return (a.shape == b.shape and a.dtype == b.dtype
                and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    return a == b


def unaligned(a):
    """A C-contiguous copy of a whose data starts one byte off alignment."""
    a = np.ascontiguousarray(a)
    buf = bytearray(a.nbytes + 1)
    u = np.frombuffer(buf, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    u[...] = a
    return u


LAYOUTS = ["c", "fortran", "transposed", "strided", "negative", "broadcast", "readonly",
           "unaligned"]


def layout(a, kind):
    """An array with the values of a (for "broadcast": row 0 repeated, or
    element 0 for a vector) laid out in memory as named."""
    a = np.array(a)
    if kind == "c":
        return a
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "transposed":                 # built transposed, then viewed back
        return np.ascontiguousarray(a.T).T
    if kind == "strided":
        big = np.zeros((2 * a.shape[0],) + a.shape[1:], a.dtype) if a.ndim else a
        if a.ndim:
            big[::2] = a
            return big[::2]
        return a
    if kind == "negative":
        return np.ascontiguousarray(a[::-1])[::-1] if a.ndim else a
    if kind == "broadcast":
        if a.ndim == 0 or a.shape[0] == 0:
            return a
        return np.broadcast_to(a[:1], a.shape)
    if kind == "readonly":
        a.flags.writeable = False
        return a
    if kind == "unaligned":
        return unaligned(a)
    raise KeyError(kind)


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

# Each case: a builder (rng, dt) -> (call, inputs) where call(**inputs)
# returns everything the kernel produces (outputs and updated buffers), and
# inputs maps the names of its read-only array arguments to arrays.

def _case_matmul(trans_a, trans_b):
    def build(rng, dt):
        a = rnd(rng, (7, 5) if trans_a else (5, 7), dt)
        b = rnd(rng, (6, 7) if trans_b else (7, 6), dt)
        return (lambda a, b: ops.matmul(a, b, trans_a=trans_a, trans_b=trans_b)), {"a": a, "b": b}
    return build


def _case_dense_forward(act):
    def build(rng, dt):
        x, k, b = rnd(rng, (9, 6), dt), rnd(rng, (6, 5), dt), rnd(rng, 5, dt)

        def call(x, kernel, bias):
            pre = np.empty((9, 5), dt)
            out = ops.dense_forward(x, kernel, bias, act, pre=pre)
            return out, pre
        return call, {"x": x, "kernel": k, "bias": b}
    return build


def _case_dense_backward(act):
    def build(rng, dt):
        x, k, b = rnd(rng, (9, 6), dt), rnd(rng, (6, 5), dt), rnd(rng, 5, dt)
        pre = np.empty((9, 5), dt)
        out = ops.dense_forward(x, k, b, act, pre=pre)
        dout = rnd(rng, (9, 5), dt)

        def call(dout, x, kernel, out, pre):
            return ops.dense_backward(dout, x, kernel, out, act, pre=pre)
        return call, {"dout": dout, "x": x, "kernel": k, "out": out, "pre": pre}
    return build


def _case_activation_forward(rng, dt):
    x = rnd(rng, (8, 7), dt, 3.0)

    def call(x):
        return [ops.activation_forward(x, a) for a in ACTS]
    return call, {"x": x}


def _case_activation_backward(rng, dt):
    x = rnd(rng, (8, 7), dt, 3.0)
    outs = {a: ops.activation_forward(x, a) for a in ACTS}
    dout = rnd(rng, (8, 7), dt)

    def call(dout, x, **outs_):
        return [ops.activation_backward(dout, outs_["out_" + a], a, x=x) for a in ACTS]
    return call, {"dout": dout, "x": x, **{"out_" + a: o for a, o in outs.items()}}


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
        return call, {"y_true": yt, "y_pred": yp}
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
        return call, {"x": x, "gamma": gamma, "beta": beta}
    return build


def _case_bn_backward(rng, dt):
    x = rnd(rng, (9, 6), dt, 2.0) + 3
    gamma = rnd(rng, 6, dt)
    _, mean, rstd = ops.batchnorm_forward(x, gamma)
    dout = rnd(rng, (9, 6), dt)

    def call(dout, x, mean, rstd, gamma):
        return ops.batchnorm_backward(dout, x, mean, rstd, gamma)
    return call, {"dout": dout, "x": x, "mean": mean, "rstd": rstd, "gamma": gamma}


def _case_dropout(rng, dt):
    x = rnd(rng, (9, 7), dt)
    return (lambda x: ops.dropout(x, 0.3, 1234, 77)), {"x": x}


def _case_sum_squares(rng, dt):
    x = rnd(rng, (9, 7), dt)
    return ops.sum_squares, {"x": x}


def _case_sgd(rng, dt):
    p0, g = rnd(rng, 40, dt), rnd(rng, 40, dt)
    vel0 = rnd(rng, 40, dt)

    def call(grads):
        p, vel = p0.copy(), vel0.copy()
        rec = ops.sgd_step(p, grads, learning_rate=0.1, momentum=0.9, nesterov=True,
                           velocity=vel, offsets=[0, 15, 40], clipnorm=1.0)
        return p, vel, rec
    return call, {"grads": g}


def _case_adam(rng, dt):
    p0, g = rnd(rng, 40, dt), rnd(rng, 40, dt)
    m0, v0 = rnd(rng, 40, dt), np.abs(rnd(rng, 40, dt))

    def call(grads):
        p, m, v, vmax = p0.copy(), m0.copy(), v0.copy(), v0.copy()
        rec = ops.adam_step(p, grads, m, v, step=3, amsgrad=True, vmax=vmax,
                            global_clipnorm=2.0, weight_decay=0.01)
        return p, m, v, vmax, rec
    return call, {"grads": g}


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


@pytest.mark.parametrize("kind", LAYOUTS[1:])
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernels_give_bit_identical_results_for_every_input_layout(case, kind):
    """Each read-only array argument in turn, in each layout, against the same
    values C-contiguous: non-contiguous inputs are copied, so the same
    arithmetic runs and the results are bit-identical. The inputs are not
    modified."""
    failures = []
    for dt in DTYPES:
        rng = np.random.default_rng(zlib.crc32(case.encode()))
        call, inputs = KERNEL_CASES[case](rng, dt)
        for name in inputs:
            if kind in ("fortran", "transposed") and inputs[name].ndim < 2:
                continue
            odd = layout(inputs[name], kind)
            before = odd.copy()
            args = dict(inputs)
            args[name] = np.ascontiguousarray(odd)
            want = call(**args)
            args[name] = odd
            got = call(**args)
            if not same_bits(got, want):
                failures.append(f"{np.dtype(dt).name} {name}")
            if not same_bits(odd, before):
                failures.append(f"{np.dtype(dt).name} {name} was modified")
    assert not failures, f"{case} with {kind} inputs differs: {failures}"


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


@pytest.mark.parametrize("dt", DTYPES, ids=DT_IDS)
def test_out_buffer_aliasing_an_input_gives_the_right_result_or_is_refused(dt):
    """A caller may pass an input as out=. NumPy's matmul handles overlap;
    fastgrad must either compute the right product or refuse the buffer,
    never return a silently wrong result."""
    rng = np.random.default_rng(4)
    problems = []
    for what, fn in [
        ("matmul out=a", lambda a, b: ops.matmul(a, b, out=a)),
        ("matmul out=b", lambda a, b: ops.matmul(a, b, out=b)),
        ("dense_forward out=x", lambda a, b: ops.dense_forward(a, b, None, "linear", out=a)),
        ("dense_forward out=kernel", lambda a, b: ops.dense_forward(a, b, None, "linear",
                                                                    out=b)),
    ]:
        a, b = rnd(rng, (6, 6), dt), rnd(rng, (6, 6), dt)
        want = a.astype(F64) @ b.astype(F64)
        try:
            got = fn(a, b)
        except ValueError:
            continue
        try:
            check(got, want, dt, np.abs(a.astype(F64)) @ np.abs(b.astype(F64)), what)
        except AssertionError as e:
            problems.append(str(e))
    assert not problems, "\n".join(problems)


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

def _classifier(dtype="float32", seed=7):
    m = fg.Sequential([Dense(16, activation="relu", input_dim=10), BatchNormalization(),
                       Dropout(0.2), Dense(4, activation="softmax")], dtype=dtype, seed=seed)
    m.compile(fg.optimizers.Adam(0.01), "sparse_categorical_crossentropy", ["accuracy"])
    return m


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
    return out


@pytest.mark.parametrize("model", ["classifier_f32", "regressor_f64", "regressor_f32"])
def test_model_methods_are_bit_identical_for_every_input_layout(model):
    rng = np.random.default_rng(9)
    n = 48
    if model == "classifier_f32":
        make = _classifier
        x = rnd(rng, (n, 10), F32)
        y = rng.integers(0, 4, n)
    else:
        dt = "float64" if model.endswith("f64") else "float32"
        make = lambda: _regressor(dt)    # noqa: E731
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
    for training in ((True, False) if B >= 2 else (False,)):
        m, v = mm.copy(), mv.copy()
        out, mean, rstd = ops.batchnorm_forward(x, gamma, beta, m, v, training=training,
                                                momentum=0.9, epsilon=1e-3)
        rout, rmean, rrstd, rmm, rmv = ref_bn_forward(x, gamma, beta, mm, mv, training, 0.9,
                                                      1e-3)
        assert mean.dtype == F64 and rstd.dtype == F64
        xs = np.abs(x.astype(F64)).max() if x.size else 1.0
        check(mean, rmean, F32 if dt == F32 else F64, xs, f"mean {tag} {training}")
        check(rstd, rrstd, dt, None, f"rstd {tag} {training}")
        gb = 1.0 if gamma is None else np.abs(gamma.astype(F64))
        xhat_bound = (np.abs(x.astype(F64)) + np.abs(rmean)) * rrstd
        check(out, rout, dt, gb * xhat_bound + 1.0, f"out {tag} {training}")
        check(m, rmm, dt, None, f"moving_mean {tag} {training}")
        check(v, rmv, dt, None, f"moving_variance {tag} {training}")
    if B >= 2:
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
                check(y, ref_act(act, x), dt, None, f"{act} {shape}")
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
                check(out[kept], x[kept].astype(F64) / (1 - rate), dt, None, "dropout scale")
                if rate == 0:
                    assert kept.all()
                # the backward (the same call) masks the same entries
                assert np.array_equal(ops.dropout(np.ones_like(x), rate, n, 3) != 0, kept)
            want = float(np.sum(x.astype(F64) ** 2))
            check(ops.sum_squares(x), want, dt, None, "sum_squares")


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
        check(y, ref_act(act, x), dt, None, act)


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
            check(y, ref_act(act, x), dt, None, act)
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
        check(y["selu"][0, 2], -SELU_SCALE * SELU_ALPHA, dt, None, "selu(-inf)")
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
        check(s[2], [1 / (1 + math.e), 0.0, math.e / (1 + math.e)], dt, None, "softmax -inf")
        assert same_bits(s[3], np.array([0, 1, 0], dt))
        check(s[4], ref_act("softmax", rows[4:]).ravel(), dt, None, "softmax clean row")

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
        dx, dg, db = ops.batchnorm_backward(np.ones_like(x), x, mean, rstd)
        assert np.isfinite(dx).all()
        s = ops.sum_squares(x)
        assert np.isfinite(s)
        check(s, np.sum(x.astype(F64) ** 2), dt, None, "sum_squares 1e20")
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


def test_model_methods_with_zeros_subnormals_and_1e20_raise_no_warnings():
    rng = np.random.default_rng(32)
    for dtype in ("float32", "float64"):
        m = _classifier(dtype)
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
    if training and B < 2:
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
    check(rstd, rrstd, dt, None, "rstd")
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


def np_predict(model, x):
    """Inference of a Dense/BatchNormalization/Dropout/Activation stack in
    float64 from get_weights()."""
    w = list(model.get_weights())
    h = np.asarray(x, F64)
    for layer in model.layers:
        if layer.kind == "Dense":
            k = w.pop(0)
            b = w.pop(0) if layer.use_bias else 0.0
            h = ref_act(layer.activation, h @ k.astype(F64) + b)
        elif layer.kind == "BatchNormalization":
            gamma = w.pop(0) if layer.scale else 1.0
            beta = w.pop(0) if layer.center else 0.0
            mm, mv = w.pop(0), w.pop(0)
            h = gamma * (h - mm) / np.sqrt(mv.astype(F64) + layer.epsilon) + beta
        elif layer.kind == "Activation":
            h = ref_act(layer.activation, h)
    return h


def test_sixteen_threads_predicting_on_one_model_match_a_sequential_run():
    rng = np.random.default_rng(41)
    m = _classifier()
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
    m = _classifier()
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
    check(final, np_predict(m, x), F32, None, "predict vs NumPy from get_weights")
    # and a fresh model given these weights predicts the same bits: nothing
    # outside get_weights() (work buffers, layer state) was left inconsistent
    clone = _classifier(seed=99)
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
        m = _classifier(seed=seed)
        m.fit(x, y, epochs=3, batch_size=16, verbose=0)
        return m.get_weights(), m.predict(x)

    want = [run(s) for s in range(6)]
    got = [None] * 6

    def work(s):
        return lambda: got.__setitem__(s, run(s))

    errors = _run_threads([work(s) for s in range(6)])
    assert errors == [None] * 6
    assert all(same_bits(g, w) for g, w in zip(got, want))


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
    m = _classifier()
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
# 6. model files
# ---------------------------------------------------------------------------

PREFIX = struct.Struct("<8sIQ")


def split_file(data):
    magic, version, hlen = PREFIX.unpack_from(data)
    return magic, version, json.loads(data[PREFIX.size:PREFIX.size + hlen]), \
        data[PREFIX.size + hlen:]


def join_file(header, body, header_len=None, text=None):
    blob = (text if text is not None else json.dumps(header)).encode()
    return PREFIX.pack(b"FGMODEL\0", 1, len(blob) if header_len is None else header_len) \
        + blob + body


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    rng = np.random.default_rng(51)
    x = rnd(rng, (48, 10), F32)
    m = _classifier()
    m.fit(x, rng.integers(0, 4, 48), epochs=1, batch_size=8, verbose=0)
    path = tmp_path_factory.mktemp("saved") / "model.fgm"
    m.save(str(path))
    return path.read_bytes(), m.get_weights()


def load_bytes(tmp_path, data):
    p = tmp_path / "hostile.fgm"
    p.write_bytes(data)
    return fg.load_model(str(p))


def edit(data, fn):
    _, _, header, body = split_file(data)
    fn(header)
    return join_file(header, body)


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
        load_bytes(tmp_path, edit(data, fn))


@pytest.mark.parametrize("dtype", ["float16", "<f4", "f4", "int32", "uint8", "complex64",
                                   "", "FLOAT32", None, 4, True, ["float32"],
                                   {"name": "float32"}],
                         ids=repr)
def test_unknown_array_dtypes_are_refused(tmp_path, saved, dtype):
    data, _ = saved
    with pytest.raises(fastgrad.saving.ModelFileError, match="unknown dtype"):
        load_bytes(tmp_path, edit(data, _set("dtype", dtype)))


@pytest.mark.parametrize("name", ["Conv2D", "LSTM", "", "dense", "Layer", "Sequential",
                                  "__class__", "WeightSpec", "Dense ", None, 3,
                                  ["Dense"], {"a": 1}], ids=repr)
def test_unknown_layer_types_are_refused(tmp_path, saved, name):
    data, _ = saved

    def fn(h):
        h["model"]["config"]["layers"][1]["class_name"] = name

    with pytest.raises(fastgrad.saving.ModelFileError,
                       match=r"unknown layer type|invalid model description"):
        load_bytes(tmp_path, edit(data, fn))


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
        model = load_bytes(tmp_path, edit(data, fn))
    except ValueError:
        return
    rng = np.random.default_rng(52)
    x, y = rnd(rng, (32, 10), F32), rng.integers(0, 4, 32)
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
    x, y = rnd(rng, (48, 10), F32), rng.integers(0, 4, 48)
    m = _classifier()
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
    m, path, old_bytes, old_weights = two_states
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


# ---------------------------------------------------------------------------
# 7. fuzz harnesses, briefly
# ---------------------------------------------------------------------------

def _fuzz_module():
    path = Path(__file__).with_name("fuzz.py")
    spec = importlib.util.spec_from_file_location("fastgrad_tests_fuzz", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("target", ["load_model", "ops"])
def test_fuzz_harness_briefly(target, tmp_path):
    fuzz = _fuzz_module()
    stats = fuzz.run_random(target, seconds=3.0, seed=12345, workdir=str(tmp_path))
    assert stats.iterations > 50, stats.iterations
    if stats.failures:
        pytest.fail(f"{len(stats.failures)} failures in {stats.iterations} iterations; the "
                    "distinct ones:\n\n"
                    + "\n\n".join(f.describe() for f in stats.unique.values()), pytrace=False)
