"""Shared test references: one float64 NumPy implementation of each kernel's
documented formula, the finite-difference helper, the memory-layout helpers
and the tolerance checks.

Every test compares fastgrad with these, never with fastgrad itself:
  kernels ........ ref_act, ref_act_vjp, ref_dense_forward, ref_dense_backward,
                   ref_loss, ref_bn_forward, ref_bn_backward, splitmix_keep
                   (dropout's mask), ref_optimizer_run (every optimizer)
  gradients ...... numerical_grad, model_fd_gradients (central differences)
  layouts ........ layout(a, kind) for every kind in LAYOUTS, unaligned
  comparisons .... check (error-bound tolerance), check_ulp (units in the
                   last place), same_bits
"""
import math
import struct

import numpy as np
from scipy import special

F32, F64 = np.float32, np.float64
DTYPES = [F32, F64]
DTYPE_IDS = ["f32", "f64"]

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
DEFAULT_ALPHA = {"leaky_relu": 0.2, "elu": 1.0}
EPS = 1e-7   # the probability losses' clip (Keras' epsilon)


# ---------------------------------------------------------------------------
# activations, dense
# ---------------------------------------------------------------------------

def _alpha(name, alpha):
    return DEFAULT_ALPHA.get(name, 0.0) if alpha is None else float(alpha)


_LD_SQRT_2PI = np.sqrt(2 * np.longdouble("3.14159265358979323846264338327950288"))


def ncdf_pdf(z):
    """Phi(z) and phi(z) of float64 z, each within about an ulp. SciPy's ndtr
    is off by some 30 ulps from z = -1 down and by up to 1e12 near z = -37,
    so for z <= -1, Phi(z) = phi(z) / (w + 1/(w + 2/(w + ...))) with w = -z,
    Laplace's continued fraction for the Mills ratio (400 terms: exact to
    double from w = 1), in long double, where z^2 is exact enough. (Where
    long double is double, the tail keeps about z^2 / 2 ulps.)"""
    z = np.asarray(z, F64)
    w = -z.astype(np.longdouble)
    pdf_ld = np.exp(-w * w / 2) / _LD_SQRT_2PI
    tail = w >= 1
    wt = np.where(tail, w, 1)
    r = np.zeros_like(wt)
    for k in range(400, 0, -1):
        r = k / (wt + r)
    cdf = np.where(tail, (pdf_ld / (wt + r)).astype(F64), special.ndtr(z))
    return cdf, pdf_ld.astype(F64)


def softmax(z):
    """Row-wise softmax over the last axis, float64."""
    z = np.asarray(z, F64)
    if z.shape[-1] == 0:
        return z.copy()
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ref_act(name, z, alpha=None):
    """y = act(z) in float64 (softmax over the last axis; None is linear)."""
    z = np.asarray(z, F64)
    a = _alpha(name, alpha)
    with np.errstate(all="ignore"):
        zn = np.minimum(z, 0.0)   # the unused branch of elu & co stays finite
        if name in (None, "linear"):
            return z.copy()
        if name == "relu":
            return np.where(z > 0, z, 0.0) + np.where(np.isnan(z), z, 0.0)
        if name == "leaky_relu":
            return np.where(z > 0, z, a * z)
        if name == "elu":
            return np.where(z > 0, z, a * np.expm1(zn))
        if name == "selu":
            return SELU_SCALE * np.where(z > 0, z, SELU_ALPHA * np.expm1(zn))
        if name == "gelu":   # z Phi(z)
            return z * ncdf_pdf(z)[0]
        if name == "silu":
            return z * special.expit(z)
        if name == "sigmoid":
            return special.expit(z)
        if name == "tanh":
            return np.tanh(z)
        if name == "softmax":
            return softmax(z)
        if name == "softplus":
            return np.logaddexp(z, 0.0)
        if name == "softsign":
            return z / (1.0 + np.abs(z))
        if name == "relu6":
            return np.where(z > 6, 6.0, np.where(z > 0, z, 0.0)) + np.where(np.isnan(z), z, 0.0)
        if name in ("hard_sigmoid", "hard_silu", "hard_swish"):
            t = z + 3.0
            hs = (np.where(t > 6, 6.0, np.where(t > 0, t, 0.0))
                  + np.where(np.isnan(t), t, 0.0)) / 6
            return hs if name == "hard_sigmoid" else z * hs
        if name == "mish":
            return z * np.tanh(np.logaddexp(z, 0.0))
        if name == "exponential":
            return np.exp(z)
        if name == "log_softmax":
            if z.shape[-1] == 0:
                return z.copy()
            # (z - m) - log1p(sum of the others' e^(z - m)), m the row's maximum
            # (whose own term is 1): z - logsumexp(z) would cancel where
            # the result is small
            m = np.max(z, axis=-1, keepdims=True)
            e = np.exp(z - m)
            first = np.argmax(z, axis=-1)[..., None]
            np.put_along_axis(e, first, 0.0, axis=-1)
            return (z - m) - np.log1p(np.sum(e, axis=-1, keepdims=True))
        if name == "swish":
            return z * special.expit(z)
    raise KeyError(f"no reference for activation {name!r}")


def ref_act_vjp(name, z, g, alpha=None, y=None, bound=False):
    """dz = g * act'(z) in float64. The slope comes from the forward output y
    where the documented backward uses it (relu & co: whether y > 0; elu,
    selu: y + alpha; sigmoid: y (1 - y); tanh: 1 - y^2; softmax:
    y (g - sum(g y)) per row) and y is given, else from z. With bound=True
    also returns an error bound: |g| times the magnitudes of the terms the
    slope sums (|g slope| where the slope is one product: relative)."""
    z = np.asarray(z, F64)
    g = np.asarray(g, F64)
    a = _alpha(name, alpha)
    zn = np.minimum(z, 0.0)
    if y is not None:
        y = np.asarray(y, F64)
    if name == "softmax":
        y = softmax(z) if y is None else y
        dz = y * (g - np.sum(g * y, axis=-1, keepdims=True))
        b = y * (np.abs(g) + np.sum(np.abs(g) * y, axis=-1, keepdims=True))
        return (dz, b) if bound else dz
    if name == "log_softmax":
        sm = np.exp(ref_act("log_softmax", z) if y is None else y)
        dz = g - sm * np.sum(g, axis=-1, keepdims=True)
        b = np.abs(g) + sm * np.sum(np.abs(g), axis=-1, keepdims=True)
        return (dz, b) if bound else dz
    pos = (z > 0) if y is None else (y > 0)
    terms = None   # magnitudes of the terms the documented slope sums, if several
    if name in (None, "linear"):
        slope = np.ones_like(z)
    elif name == "relu":
        slope = pos.astype(F64)
    elif name == "leaky_relu":
        slope = np.where(pos, 1.0, a)
    elif name == "elu":
        slope = np.where(pos, 1.0, a * np.exp(zn) if y is None else y + a)
        terms = np.where(pos, 1.0, np.abs(slope - a) + a)
    elif name == "selu":
        slope = np.where(pos, SELU_SCALE, SELU_SCALE * SELU_ALPHA * np.exp(zn) if y is None
                         else y + SELU_SCALE * SELU_ALPHA)
        terms = np.where(pos, SELU_SCALE, np.abs(slope - SELU_SCALE * SELU_ALPHA)
                         + SELU_SCALE * SELU_ALPHA)
    elif name == "gelu":
        cdf, pdf = ncdf_pdf(z)
        zpdf = z * pdf
        slope, terms = cdf + zpdf, cdf + np.abs(zpdf)
    elif name == "silu":
        s = special.expit(z)
        # s (1 + z (1 - s)): 1 - s loses s's relative accuracy as s nears 1
        slope, terms = s * (1.0 + z * (1.0 - s)), s * (1.0 + np.abs(z))
    elif name == "sigmoid":
        s = special.expit(z) if y is None else y
        slope = s * (1.0 - s)
    elif name == "tanh":
        t = np.tanh(z) if y is None else y
        slope, terms = 1.0 - t ** 2, 1.0 + t ** 2
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
    elif name in ("hard_silu", "hard_swish"):
        slope = np.where(z >= 3, 1.0, np.where(z > -3, (2.0 * z + 3.0) / 6.0, 0.0))
        terms = np.where((z > -3) & (z < 3), (2.0 * np.abs(z) + 3.0) / 6.0, np.abs(slope))
    elif name == "mish":
        with np.errstate(all="ignore"):
            sp = np.logaddexp(z, 0.0)
            first, second = np.tanh(sp), z * special.expit(z) / np.cosh(sp) ** 2
        slope, terms = first + second, np.abs(first) + np.abs(second)
    elif name == "exponential":
        slope = np.exp(z) if y is None else y
    elif name == "swish":
        s = special.expit(z)
        slope, terms = s * (1.0 + z * (1.0 - s)), s * (1.0 + np.abs(z))
    else:
        raise KeyError(f"no reference for activation {name!r}")
    dz = g * slope
    if not bound:
        return dz
    return dz, np.abs(g) * (np.abs(slope) if terms is None else terms)


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


# ---------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------

def one_hot(labels, classes, dtype=F64):
    labels = np.asarray(labels).reshape(-1)
    t = np.zeros((labels.shape[0], classes), dtype)
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
        t = np.asarray(y_true, F64).reshape(p.shape)
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
            # chain rule through the clip (no gradient where clipped) and q = p / s
            tu = np.sum(np.where(inside, t, 0.0), axis=1, keepdims=True)
            d = (tu - np.where(inside & (t != 0), t / q, 0.0)) / s / B
            rb = np.sum(np.where(t != 0, at * np.abs(logq), 0.0), axis=1)
            db = (np.sum(np.where(inside, at, 0.0), axis=1, keepdims=True)
                  + np.where(inside & (t != 0), np.abs(t / q), 0.0)) / np.abs(s) / B
        elif kind in NEW_LOSSES:
            rows, d = ref_new_loss(kind, t, p, from_logits)
            # terms of the size of the inputs, for the tolerance
            rb = np.abs(rows) + np.mean(at + ap, axis=1) if O else np.abs(rows)
            db = np.abs(d) + (at + ap + 1.0) / max(B * O, 1)
        else:
            raise KeyError(f"no reference for loss {kind!r}")
    return (float(rows.mean()) if B else 0.0), rows, d, rb, db


NEW_LOSSES = ("log_cosh", "kl_divergence", "poisson", "hinge", "squared_hinge",
              "categorical_hinge", "mape", "msle", "cosine_similarity",
              "binary_focal_crossentropy", "categorical_focal_crossentropy")


def ref_new_loss(loss, t, p, from_logits=False, alpha=0.25, gamma=2.0, balancing=False):
    """(rows, gradient of the batch mean) of the losses added with the
    focal ones, float64, each by its documented formula (Keras 3's)."""
    B, O = p.shape
    e = p - t
    if loss == "log_cosh":
        return np.mean(np.logaddexp(e, -e) - np.log(2.0), axis=1), np.tanh(e) / (B * O)
    if loss == "kl_divergence":
        tc, pc = np.clip(t, EPS, 1.0), np.clip(p, EPS, 1.0)
        inside = (p > EPS) & (p < 1.0)
        return np.sum(tc * np.log(tc / pc), axis=1), np.where(inside, -tc / pc, 0.0) / B
    if loss == "poisson":
        return np.mean(p - t * np.log(p + EPS), axis=1), (1.0 - t / (p + EPS)) / (B * O)
    if loss in ("hinge", "squared_hinge"):
        tt = 2.0 * t - 1.0 if np.all((t == 0) | (t == 1)) else t
        m = np.maximum(1.0 - tt * p, 0.0)
        if loss == "hinge":
            return np.mean(m, axis=1), np.where(m > 0, -tt, 0.0) / (B * O)
        return np.mean(m * m, axis=1), -2.0 * tt * m / (B * O)
    if loss == "categorical_hinge":
        pos = np.sum(t * p, axis=1)
        v = (1.0 - t) * p
        k = np.argmax(v, axis=1)
        m = v[np.arange(B), k] - pos + 1.0
        d = -t.copy()
        d[np.arange(B), k] += 1.0 - t[np.arange(B), k]
        return np.maximum(m, 0.0), np.where((m > 0)[:, None], d, 0.0) / B
    if loss == "mape":
        den = np.maximum(np.abs(t), EPS)
        return 100.0 * np.mean(np.abs(e) / den, axis=1), 100.0 * np.sign(e) / den / (B * O)
    if loss == "msle":
        pc = np.maximum(p, EPS)
        a = np.log1p(pc) - np.log1p(np.maximum(t, EPS))
        return np.mean(a * a, axis=1), np.where(p > EPS, 2.0 * a / (1.0 + pc), 0.0) / (B * O)
    if loss == "cosine_similarity":
        with np.errstate(divide="ignore"):   # 1 / 0 = inf, then capped
            it = np.minimum(1.0 / np.sqrt(np.sum(t * t, axis=1, keepdims=True)), 1.0 / EPS)
            ip = np.minimum(1.0 / np.sqrt(np.sum(p * p, axis=1, keepdims=True)), 1.0 / EPS)
        dot = np.sum(t * p, axis=1, keepdims=True)
        return -(dot * it * ip)[:, 0], -it * ip * (t - dot * ip * ip * p) / B
    if loss == "binary_focal_crossentropy":
        w = alpha * t + (1 - alpha) * (1 - t) if balancing else np.ones_like(t)
        if from_logits:
            s = special.expit(p)
            bce = t * np.logaddexp(0.0, -p) + (1 - t) * np.logaddexp(0.0, p)
            om = t * (1 - s) + (1 - t) * s
            dbce, dom = s - t, (1 - 2 * t) * s * (1 - s)
        else:
            pc = np.clip(p, EPS, 1 - EPS)
            bce = -(t * np.log(pc) + (1 - t) * np.log(1 - pc))
            om = 1 - (t * p + (1 - t) * (1 - p))
            dbce = np.where((p >= EPS) & (p <= 1 - EPS), -t / pc + (1 - t) / (1 - pc), 0.0)
            dom = 1 - 2 * t
        rows = np.mean(w * om ** gamma * bce, axis=1)
        dff = gamma * om ** (gamma - 1) * dom if gamma else 0.0
        return rows, w * (om ** gamma * dbce + dff * bce) / (B * O)
    if loss == "categorical_focal_crossentropy":
        if from_logits:
            lq = p - special.logsumexp(p, axis=1, keepdims=True)
            q = np.exp(lq)
            inside = np.ones_like(q, bool)
        else:
            s = p.sum(axis=1, keepdims=True)
            q = p / s
            inside = (q >= EPS) & (q <= 1 - EPS)
            lq = np.log(np.clip(q, EPS, 1 - EPS))
        qc = np.exp(lq)
        ratio = 1.0 if from_logits else q / qc   # q over its clipped value
        rows = -np.sum(alpha * (1 - qc) ** gamma * t * lq, axis=1)
        # c q with c = dl/dq, multiplied out so that q = 0 gives no 0 / 0
        cq = np.where(inside, alpha * t * ((gamma * (1 - qc) ** (gamma - 1) * lq * q
                                            if gamma else 0) - (1 - qc) ** gamma * ratio), 0.0)
        total = np.sum(cq, axis=1, keepdims=True)
        if from_logits:
            return rows, (cq - q * total) / B
        return rows, (cq / q - total) / s / B
    raise KeyError(f"no reference for loss {loss!r}")


def ref_loss_value(kind, y_true, y_pred, from_logits=False, delta=1.0):
    """The batch-mean loss alone (see ref_loss)."""
    return ref_loss(kind, y_true, y_pred, from_logits, delta)[0]


# ---------------------------------------------------------------------------
# BatchNormalization, dropout
# ---------------------------------------------------------------------------

def batch_stats(x):
    """Batch mean and biased variance per feature, float64."""
    x = np.asarray(x, F64)
    mu = x.mean(axis=0)
    return mu, ((x - mu) ** 2).mean(axis=0)


def ref_bn_forward(x, gamma=None, beta=None, moving_mean=None, moving_variance=None,
                   training=True, momentum=0.99, epsilon=1e-3):
    """(out, mean, rstd, new moving_mean, new moving_variance), float64; the
    batch variance is the biased one."""
    x = np.asarray(x, F64)
    F = x.shape[1]
    mm = np.zeros(F) if moving_mean is None else np.asarray(moving_mean, F64)
    mv = np.ones(F) if moving_variance is None else np.asarray(moving_variance, F64)
    if training:
        mu, var = batch_stats(x)
        mm, mv = momentum * mm + (1 - momentum) * mu, momentum * mv + (1 - momentum) * var
    else:
        mu, var = mm, mv
    rstd = 1.0 / np.sqrt(var + epsilon)
    g = np.ones(F) if gamma is None else np.asarray(gamma, F64)
    b = np.zeros(F) if beta is None else np.asarray(beta, F64)
    return g * (x - mu) * rstd + b, mu, rstd, mm, mv


def ref_bn_backward(dout, x, mean, rstd, gamma=None):
    """(dx, dgamma, dbeta, bound of dx), float64, by the documented closed
    form for the batch's own mean and rstd:
    dx = gamma rstd / B (B dout - sum(dout) - xhat sum(dout xhat)), with
    xhat = (x - mean) rstd. (Finite differences in test_layers.py check the
    formula itself.)"""
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


def splitmix_keep(seed, offset, n, rate):
    """The keep mask of the documented generator (csrc/fastgrad.h): element k
    draws splitmix64 at position offset + k; kept when its top 32 bits are
    below (1 - rate) * 2**32."""
    pos = np.uint64(offset) + np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (pos + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(32)) < np.uint64(int((1.0 - rate) * 4294967296.0))


def ref_dropout(x, rate, seed, offset=0):
    """Inverted dropout with the documented mask, float64."""
    x = np.asarray(x, F64)
    keep = splitmix_keep(seed, offset, x.size, rate).reshape(x.shape)
    return np.where(keep, x / (1.0 - rate), 0.0)


# ---------------------------------------------------------------------------
# optimizers
# ---------------------------------------------------------------------------

def tensor_table(layout, regs=None, cons=None):
    """(tensors, size): [(name, offset, shape, regularizer, constraint)] of
    flat buffers laid out in order, as Optimizer.build takes them."""
    regs = regs or {}
    cons = cons or {}
    tensors, off = [], 0
    for name, shape in layout:
        tensors.append((name, off, shape, regs.get(name), cons.get(name)))
        off += int(np.prod(shape))
    return tensors, off


def tensor_slices(tensors):
    """[(slice, shape, regularizer, constraint, name)] of a tensor table."""
    return [(slice(off, off + int(np.prod(shape))), shape, reg, con, name)
            for name, off, shape, reg, con in tensors]


def _apply_constraint(con, x):
    name = type(con).__name__
    if name == "MaxNorm":
        nrm = np.sqrt(np.sum(x * x, axis=0, keepdims=True))
        return x * np.clip(nrm, 0, con.max_value) / (1e-7 + nrm)
    if name == "NonNeg":
        return np.where(x < 0, 0.0, x)
    if name == "ClipValue":
        return np.clip(x, -con.clip_value, con.clip_value)
    raise KeyError(f"no reference for constraint {name}")


def _update(kind, cfg, w, g, st, rate, t):
    """One documented update of w (float64) from gradient g at step t >= 1."""
    if kind == "sgd":
        mu = cfg.get("momentum", 0.0)
        if mu == 0:
            return w - rate * g
        st["v"] = mu * st["v"] - rate * g
        return w + (mu * st["v"] - rate * g if cfg.get("nesterov") else st["v"])
    if kind == "rmsprop":
        rho, eps, mu = cfg.get("rho", 0.9), cfg.get("eps", 1e-7), cfg.get("momentum", 0.0)
        st["v"] = rho * st["v"] + (1 - rho) * g * g
        if cfg.get("centered"):
            st["m"] = rho * st["m"] + (1 - rho) * g
            denom = st["v"] - st["m"] ** 2 + eps
        else:
            denom = st["v"] + eps
        u = rate * g / np.sqrt(denom)
        if mu:
            st["s"] = mu * st["s"] + u
            u = st["s"]
        return w - u
    if kind == "adam":
        b1, b2, eps = cfg.get("b1", 0.9), cfg.get("b2", 0.999), cfg.get("eps", 1e-7)
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        v = st["v"]
        if cfg.get("amsgrad"):
            st["vmax"] = np.maximum(st["vmax"], st["v"])
            v = st["vmax"]
        alpha = rate * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        return w - alpha * st["m"] / (np.sqrt(v) + eps)
    if kind == "adagrad":
        st["v"] = st["v"] + g * g
        return w - rate * g / np.sqrt(st["v"] + cfg.get("eps", 1e-7))
    raise KeyError(f"no reference for optimizer {kind!r}")


def ref_optimizer_run(cfg, w0, grads, tensors, lr=None, skip=(), state=None, t0=0):
    """Run the documented step on float64 copies. cfg: dict with kind and
    hyper-parameters. lr: float or callable(iterations). state: initial
    moments {"m", "v", "s", "vmax"} (default zeros; Adagrad's v its initial
    accumulator), t0 the steps already taken. Returns (w, state, records);
    a step index in ``skip`` is treated as skipped (non-finite)."""
    kind = cfg["kind"]
    lr = cfg.get("lr", 0.01) if lr is None else lr
    w = np.array(w0, F64)
    n = w.size
    st = {"m": np.zeros(n), "v": np.zeros(n), "s": np.zeros(n), "vmax": np.zeros(n)}
    if kind == "adagrad":
        st["v"][:] = cfg.get("init", 0.1)
    st.update({k: np.array(v, F64) for k, v in (state or {}).items()})
    t = t0
    records = []
    for step, g_raw in enumerate(grads):
        if step in skip:
            records.append(None)
            continue
        rate = lr(t) if callable(lr) else lr
        t += 1
        g = np.array(g_raw, F64)
        penalty = 0.0
        norms = []
        for sl, _shape, reg, _con, _name in tensor_slices(tensors):
            if reg is not None:
                g[sl] += reg.l1 * np.sign(w[sl]) + 2 * reg.l2 * w[sl]
                penalty += reg.l1 * np.abs(w[sl]).sum() + reg.l2 * (w[sl] ** 2).sum()
            norms.append(np.sqrt(np.sum(g[sl] ** 2)))
        norms = np.array(norms)
        total = np.sqrt(np.sum(norms ** 2))
        scale = np.ones(len(tensors))
        if cfg.get("clipnorm") is not None:
            scale = np.minimum(1.0, cfg["clipnorm"] / np.maximum(norms, 1e-300))
        elif cfg.get("global_clipnorm") is not None:
            scale[:] = min(1.0, cfg["global_clipnorm"] / total)
        for (sl, *_), s in zip(tensor_slices(tensors), scale):
            g[sl] *= s
        if cfg.get("clipvalue") is not None:
            g = np.clip(g, -cfg["clipvalue"], cfg["clipvalue"])
        records.append({"norms": norms, "total": total, "scale": scale,
                        "penalty": penalty, "lr": rate})
        if cfg.get("wd"):
            w = w - rate * cfg["wd"] * w
        w = _update(kind, cfg, w, g, st, rate, t)
        for sl, shape, _reg, con, _name in tensor_slices(tensors):
            if con is not None:
                w[sl] = _apply_constraint(con, w[sl].reshape(shape)).reshape(-1)
    return w, st, records


# ---------------------------------------------------------------------------
# finite differences
# ---------------------------------------------------------------------------

def numerical_grad(f, arr, h=1e-6, indices=None):
    """Central differences of the scalar f() with respect to the entries of
    arr (changed in place and restored), at every index or those given."""
    grad = np.zeros(arr.shape)
    for idx in (np.ndindex(arr.shape) if indices is None else indices):
        old = arr[idx]
        arr[idx] = old + h
        fp = f()
        arr[idx] = old - h
        fm = f()
        arr[idx] = old
        grad[idx] = (fp - fm) / (2.0 * h)
    return grad


def model_fd_gradients(model, x, y, h=1e-6, before_each=None, which=None):
    """Central differences of model.compute_gradients' loss in every weight
    of get_weights() (float64 models), or in those at the indices `which`;
    before_each() runs before every loss evaluation."""
    ws = model.get_weights()

    def loss():
        model.set_weights(ws)
        if before_each is not None:
            before_each()
        return model.compute_gradients(x, y)[0]

    which = range(len(ws)) if which is None else which
    grads = [numerical_grad(loss, ws[i], h) for i in which]
    model.set_weights(ws)
    return grads


# ---------------------------------------------------------------------------
# memory layouts
# ---------------------------------------------------------------------------

def unaligned(a):
    """A C-contiguous copy of a whose data starts one byte off alignment."""
    a = np.ascontiguousarray(a)
    buf = bytearray(a.nbytes + 1)
    u = np.frombuffer(buf, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    u[...] = a
    return u


LAYOUTS = ["c", "fortran", "transposed", "strided", "negative", "broadcast", "readonly",
           "unaligned"]
# the layouts that keep every value of any array (broadcast repeats row 0)
LAYOUTS_2D = ["fortran", "transposed", "strided", "negative"]
LAYOUTS_1D = ["strided", "negative"]


def layout(a, kind):
    """An array with the values of a (for "broadcast": row 0 repeated, or
    element 0 for a vector) laid out in memory as named: "strided" steps by
    2 on every axis, "negative" runs backwards on the first."""
    a = np.array(a)
    if kind == "c":
        return a
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "transposed":                 # built transposed, then viewed back
        return np.ascontiguousarray(a.T).T
    if kind == "strided":
        if a.ndim == 0:
            return a
        big = np.zeros(tuple(2 * n for n in a.shape), a.dtype)
        view = big[(slice(None, None, 2),) * a.ndim]
        view[...] = a
        return view
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


# ---------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------

# Relative error allowed against a value or an error bound (see check()).
TOL = {F32: 5e-5, F64: 1e-12}


def check(got, want, dt, bound=0.0, what="", tol=None):
    """|got - want| <= tol * (|want| + bound) + tiny elementwise, tol default
    TOL[dt]: relative to each value unless bound is given (the magnitudes
    of the terms summed into each result, which rounding errors scale
    with), never absolute; tiny is the smallest normal number of dt, for
    results that underflow. Equal infinities and NaN in both places pass."""
    got = np.asarray(got)
    want = np.asarray(want, F64)
    tol = TOL[dt] if tol is None else tol
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    g = got.astype(F64)
    with np.errstate(all="ignore"):
        err = np.abs(g - want)
        floor = np.finfo(dt).tiny     # results in the subnormal range round absolutely
        ok = ((err <= tol * (np.abs(want) + bound) + floor) | (g == want)
              | (np.isnan(g) & np.isnan(want)))
    if not ok.all():
        idx = tuple(np.argwhere(~ok)[0])
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.size} entries differ; "
                             f"first at {idx}: got {g[idx]!r}, expected {want[idx]!r}")


def ulp_error(got, want, dt):
    """|got - want| in units in the last place of dt at want (the spacing of
    dt at |want|, never below that of the smallest normal number)."""
    want = np.asarray(want, F64)
    spacing = np.spacing(np.maximum(np.abs(want), np.finfo(dt).tiny).astype(dt)).astype(F64)
    with np.errstate(all="ignore"):
        err = np.abs(np.asarray(got, F64) - want) / spacing
    same = (np.asarray(got, F64) == want) | (np.isnan(got) & np.isnan(want))
    return np.where(same, 0.0, err)


def check_ulp(got, want, dt, ulps, what=""):
    """Every entry of got within `ulps` units in the last place of dt of the
    float64 value want: a relative bound that holds down to the smallest
    normal number."""
    err = ulp_error(got, want, dt)
    if not (err <= ulps).all():
        idx = tuple(np.argwhere(~(err <= ulps))[0])
        raise AssertionError(f"{what}: {int((~(err <= ulps)).sum())} of {err.size} entries "
                             f"over {ulps} ulp (max {np.nanmax(err):.3g}); first at {idx}: "
                             f"got {np.asarray(got)[idx]!r}, expected {np.asarray(want)[idx]!r}")


def same_bits(a, b):
    """Bit-identical arrays (NaN payloads included), or equal scalars; lists,
    tuples and dicts of them compared item by item."""
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
