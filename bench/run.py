"""fastgrad benchmarks: the compiled kernels against plain NumPy (and PyTorch).

Cases, all float32. dense/ACT/BxIxO: one Dense layer forward + backward (dx, dW,
db), ops.dense_forward + ops.dense_backward into preallocated outputs vs NumPy as
written by hand (x @ W + b, activation, derivative, x.T @ dz, dz.sum(0), dz @ W.T).
train/B: one step of a 784-256-256-10 ReLU MLP with softmax cross-entropy on
integer labels and SGD(0.01), model.train_on_batch vs the same step in NumPy.
adam/N: one Adam step with global_clipnorm=1.0 over N parameters, Adam.apply() on
flat buffers vs NumPy (np.linalg.norm, scale, Adam with temporaries).
bn/BxF: BatchNormalization forward in training (batch statistics, moving ones
updated) + backward (dx, dgamma, dbeta), _core.batchnorm_forward +
_core.batchnorm_backward into preallocated outputs vs NumPy as written by hand
(x.mean(0), x.var(0), xhat, moving updates, the closed-form backward).
dropout/BxF: inverted dropout at rate 0.5 forward + backward, _core.dropout twice
(the backward regenerates the mask) vs NumPy (rng.random(x.shape) >= rate, x *
mask / (1 - rate), dy * mask / (1 - rate)); the generators differ, so fastgrad's
output is checked against NumPy's formula applied with fastgrad's own mask, and
its kept fraction against 1 - rate (within 6 standard deviations).
monitor/B: what callbacks.GradientMonitor costs a step: model.train_on_batch of
the train/B MLP with Adam, without vs with the monitor's per-step work
(optimizer.track_updates(True), which its on_train_begin sets, and its
on_batch_end after every step, called directly as fit would), on one model, so
that both sides share its memory layout. Checked: the monitor's first record
(gradient norms, update ratios) against NumPy's from compute_gradients and
get_weights, and that a twin model without the monitor ends its first step
with the same loss.

Columns: median seconds per call; np/fg = NumPy / fastgrad (> 1: fastgrad faster);
GEMMs = the gemm calls fastgrad makes (fastgrad._core.matmul, same BLAS) timed
alone; fg/GEMM = fastgrad / GEMMs (1.0: nothing but BLAS). train also times
GEMMs+w, the same GEMMs followed by one in-place pass over the three kernels
(w *= 1 in NumPy): the least memory traffic any optimizer step adds, and with
two BLAS threads at small batches a large part of the cost of a step, because
the BLAS thread on the other core must then fetch its half of every kernel back
(fg/G+w = fastgrad / GEMMs+w). adam's GB/s counts 32
bytes per parameter for every implementation (grads read twice; params, m, v read
and written); copy = np.copyto of N float32 at 8 bytes each (write-allocate reads
uncounted, so fg/copy can exceed 1). Each implementation is warmed up, then timed
in samples of repeated calls lasting about a target time, in alternating blocks;
"~" marks an interquartile range above 10% of the median. Thread settings are
left as found and printed. monitor's two sides alternate sample by sample,
three times as many samples as the other cases take; its overhead is the
median over those pairs of with / without - 1, and added
= overhead * without. If torch imports, adam gets
torch columns (clip_grad_norm_ + Adam(fused=True), or foreach where fused is
missing), bn gets nn.BatchNorm1d in training mode forward + backward and dropout
F.dropout forward + backward (both through torch.autograd.grad); torch/fg = torch
/ fastgrad.

Usage: python bench/run.py [--quick] [--only SUBSTRING] [--json PATH]
"""
import argparse
import importlib
import json
import math
import os
import platform
import sys
import time

import numpy as np
import scipy


def import_fastgrad(attempts=5, wait=3.0):
    """The installed package, else the checkout's; retried, as the extension
    may be being rebuilt."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for attempt in range(attempts):
        try:
            return importlib.import_module("fastgrad")
        except ImportError:
            for name in [m for m in sys.modules if m.split(".")[0] == "fastgrad"]:
                del sys.modules[name]
            if attempt == attempts - 1:
                raise
            if root in sys.path:
                time.sleep(wait)
            else:
                sys.path.insert(0, root)


fg = import_fastgrad()
from fastgrad import _core  # noqa: E402

try:
    import torch
except ImportError:
    torch = None

F32 = np.float32
# Seconds each implementation runs untimed before a block of samples: NumPy's and
# SciPy's OpenBLAS (and torch's OpenMP) have separate thread pools whose idle
# threads spin for a while and would slow whatever runs next.
SETTLE = 0.15
NOISY = 0.10  # interquartile range / median above which a time gets "~"


# -- timing and helpers ---------------------------------------------------------
def sample(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def settle(fn):
    """Call ``fn`` for SETTLE seconds of wall time; return its mean seconds per
    call over the second half, by when another pool's threads have gone idle.
    (Counting calls from a time taken before settling would not do: that
    first time is itself inflated by the spinning threads, up to 40-fold.)"""
    t0 = t = time.perf_counter()
    half, n = None, 0
    while t - t0 < SETTLE or n == 0:
        fn()
        t = time.perf_counter()
        if half is not None:
            n += 1
        elif t - t0 >= SETTLE / 2:
            half = t
    return max((t - half) / n, 1e-7)


def measure(impls, reps, target, rounds):
    """name -> (median seconds per call, interquartile range / median) over
    ``reps`` samples of each callable in ``impls``, and name -> the samples
    in the order taken."""
    samples = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            loops = max(1, round(target / settle(fn)))
            samples[name] += [sample(fn, loops) for _ in range(math.ceil(reps / rounds))]
    quartiles = {name: np.percentile(s, [25, 50, 75]) for name, s in samples.items()}
    return ({name: (float(q[1]), float((q[2] - q[0]) / q[1])) for name, q in quartiles.items()},
            samples)


def gemm_calls(specs):
    """A callable making ``_core.matmul(a, b, out, trans_a, trans_b)`` for each
    (a, b, trans_a, trans_b), into outputs allocated here."""
    calls = [(a, b, np.empty((a.shape[ta], b.shape[not tb]), F32), ta, tb)
             for a, b, ta, tb in specs]

    def run():
        for call in calls:
            _core.matmul(*call)
    return run


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(F32)


def rel_diff(got, want):
    """Largest difference over matching arrays, relative to the largest
    magnitude of the expected one."""
    return max(float(np.max(np.abs(g - e)) / (np.max(np.abs(e)) or 1.0))
               for g, e in zip(got, want))


# -- dense layer forward + backward -----------------------------------------------
def dense_case(batch, n_in, n_out, act):
    rng = np.random.default_rng(0)
    x, dy = randn(rng, batch, n_in), randn(rng, batch, n_out)
    w, b = randn(rng, n_in, n_out, scale=n_in ** -0.5), randn(rng, n_out, scale=0.1)
    out, dw, db, dx = (np.empty_like(a) for a in (dy, w, b, x))

    def fastgrad():
        fg.ops.dense_forward(x, w, b, act, out=out)
        return fg.ops.dense_backward(dy, x, w, out, act, dkernel=dw, dbias=db, dx=dx)

    def numpy():
        z = x @ w + b
        if act == "relu":
            dz = dy * (z > 0)
        else:
            y = 1 / (1 + np.exp(-z))
            dz = dy * y * (1 - y)
        return dz @ w.T, x.T @ dz, dz.sum(0)

    impls = {"fastgrad": fastgrad, "numpy": numpy,
             "gemm": gemm_calls([(x, w, 0, 0), (x, dy, 1, 0), (dy, w, 0, 1)])}
    return impls, rel_diff(fastgrad(), numpy())


# -- one training step of an MLP --------------------------------------------------
SIZES, LR = (784, 256, 256, 10), 0.01


def train_case(batch):
    rng = np.random.default_rng(0)
    x, labels = rng.random((batch, SIZES[0]), dtype=F32), rng.integers(0, SIZES[-1], batch)
    model = mlp(fg.optimizers.SGD(learning_rate=LR))
    weights = model.get_weights()  # W1, b1, W2, b2, W3, b3
    np_step = numpy_train_step(x, labels, [w.copy() for w in weights])
    gemms = train_gemms(x, weights)
    impls = {"fastgrad": lambda: model.train_on_batch(x, labels), "numpy": np_step,
             "gemm": gemm_calls(gemms), "gemm_write": gemms_then_write(gemms, weights[::2])}
    loss = np_step()
    return impls, abs(impls["fastgrad"]() - loss) / loss


def mlp(optimizer):
    model = fg.Sequential([fg.layers.Dense(SIZES[1], "relu", input_dim=SIZES[0]),
                           fg.layers.Dense(SIZES[2], "relu"),
                           fg.layers.Dense(SIZES[3], "softmax")], seed=0)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    return model


def numpy_train_step(x, labels, params):
    """The step in NumPy: forward, stable softmax cross-entropy, backward, SGD in
    place. Returns the loss before the update."""
    rows = np.arange(x.shape[0])

    def step():
        w1, b1, w2, b2, w3, b3 = params
        z1 = x @ w1 + b1
        h1 = np.maximum(z1, 0)
        z2 = h1 @ w2 + b2
        h2 = np.maximum(z2, 0)
        logits = h2 @ w3 + b3
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        p = e / e.sum(axis=1, keepdims=True)
        loss = -np.log(p[rows, labels]).mean()
        p[rows, labels] -= 1
        d3 = p / x.shape[0]
        dz2 = (d3 @ w3.T) * (z2 > 0)
        dz1 = (dz2 @ w2.T) * (z1 > 0)
        grads = (x.T @ dz1, dz1.sum(0), h1.T @ dz2, dz2.sum(0), h2.T @ d3, d3.sum(0))
        for param, grad in zip(params, grads):
            param -= LR * grad
        return float(loss)
    return step


def gemms_then_write(specs, kernels):
    """The GEMMs of ``specs``, then each of ``kernels`` rewritten in place
    once, as the cheapest optimizer step would."""
    run = gemm_calls(specs)

    def step():
        run()
        for w in kernels:
            np.multiply(w, 1.0, out=w)
    return step


def train_gemms(x, weights):
    """The step's eight GEMMs on operands of their shapes: three forward, three
    weight gradients, two input gradients (none for the data)."""
    rng = np.random.default_rng(1)
    w1, w2, w3 = weights[::2]
    h1, h2 = (randn(rng, x.shape[0], n) for n in SIZES[1:3])
    d1, d2, d3 = (randn(rng, x.shape[0], n) for n in SIZES[1:])
    return [(x, w1, 0, 0), (h1, w2, 0, 0), (h2, w3, 0, 0),
            (x, d1, 1, 0), (h1, d2, 1, 0), (h2, d3, 1, 0), (d3, w3, 0, 1), (d2, w2, 0, 1)]


# -- Adam with global-norm clipping -----------------------------------------------
CLIP, BETA_1, BETA_2, EPS, ADAM_LR = 1.0, 0.9, 0.999, 1e-7, 1e-3
ADAM_BYTES, COPY_BYTES = 32, 8  # per parameter (see the module docstring)


def adam_case(n):
    rng = np.random.default_rng(0)
    params, grads = randn(rng, n), randn(rng, n)
    fg_params, np_params, copy_dst = params.copy(), params.copy(), np.empty_like(params)
    opt = fg.optimizers.Adam(learning_rate=ADAM_LR, beta_1=BETA_1, beta_2=BETA_2,
                             epsilon=EPS, global_clipnorm=CLIP)
    opt.build(fg_params, grads, [("w", 0, (n,), None, None)])
    impls = {"fastgrad": opt.apply, "numpy": numpy_adam(np_params, grads),
             "copy": lambda: np.copyto(copy_dst, grads)}
    if torch is not None:
        impls["torch"] = torch_adam(params.copy(), grads)
    impls["fastgrad"](), impls["numpy"]()
    return impls, rel_diff([fg_params], [np_params])


def numpy_adam(params, grads):
    m, v, t = np.zeros_like(params), np.zeros_like(params), [0]

    def step():
        t[0] += 1
        norm = np.linalg.norm(grads)
        g = grads * F32(CLIP / norm) if norm > CLIP else grads
        m[:] = BETA_1 * m + (1 - BETA_1) * g
        v[:] = BETA_2 * v + (1 - BETA_2) * g * g
        lr = ADAM_LR * math.sqrt(1 - BETA_2 ** t[0]) / (1 - BETA_1 ** t[0])
        params[:] -= F32(lr) * m / (np.sqrt(v) + F32(EPS))
    return step


def torch_adam(params, grads):
    p = torch.nn.Parameter(torch.from_numpy(params))
    p.grad = torch.from_numpy(grads.copy())
    hyper = {"lr": ADAM_LR, "betas": (BETA_1, BETA_2), "eps": EPS}
    try:
        opt = torch.optim.Adam([p], fused=True, **hyper)
        opt.step()  # older releases have no fused Adam on CPU
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam([p], foreach=True, **hyper)
    return lambda: (torch.nn.utils.clip_grad_norm_([p], CLIP), opt.step())


# -- BatchNormalization forward (training) + backward ----------------------------
BN_MOMENTUM, BN_EPS = 0.99, 1e-3  # the layer's (and Keras's) defaults


def bn_case(batch, features):
    rng = np.random.default_rng(0)
    x, dy = randn(rng, batch, features, scale=2.0) + F32(1), randn(rng, batch, features)
    gamma, beta = 1 + randn(rng, features, scale=0.1), randn(rng, features, scale=0.1)
    moving = [np.zeros(features, F32), np.ones(features, F32)]  # mean, variance
    np_moving = [m.copy() for m in moving]
    out, dx, dgamma, dbeta = (np.empty_like(a) for a in (x, x, gamma, beta))
    mean, rstd = np.empty(features), np.empty(features)

    def fastgrad():
        _core.batchnorm_forward(x, gamma, beta, *moving, out, mean, rstd,
                                BN_EPS, BN_MOMENTUM, True)
        _core.batchnorm_backward(dy, x, mean, rstd, gamma, dx, dgamma, dbeta)
        return out, dx, dgamma, dbeta, *moving

    def numpy():
        mu, var = x.mean(0), x.var(0)
        xhat = (x - mu) / np.sqrt(var + BN_EPS)
        y = gamma * xhat + beta
        for m, stat in zip(np_moving, (mu, var)):
            m[:] = BN_MOMENTUM * m + (1 - BN_MOMENTUM) * stat
        dbeta = dy.sum(0)
        dgamma = (dy * xhat).sum(0)
        dx = gamma / np.sqrt(var + BN_EPS) / batch * (batch * dy - dbeta - xhat * dgamma)
        return y, dx, dgamma, dbeta, *np_moving

    impls = {"fastgrad": fastgrad, "numpy": numpy}
    if torch is not None:
        impls["torch"] = torch_bn(x, dy, gamma, beta)
    return impls, rel_diff(fastgrad(), numpy())


def torch_bn(x, dy, gamma, beta):
    bn = torch.nn.BatchNorm1d(x.shape[1], eps=BN_EPS, momentum=1 - BN_MOMENTUM)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(gamma))
        bn.bias.copy_(torch.from_numpy(beta))
    xt, dyt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(dy)
    wrt = (xt, bn.weight, bn.bias)
    return lambda: torch.autograd.grad(bn(xt), wrt, dyt)


# -- dropout forward + backward ---------------------------------------------------
DROP_RATE, DROP_SEED = 0.5, 12345


def dropout_case(batch, features):
    rng = np.random.default_rng(0)
    x, dy = randn(rng, batch, features), randn(rng, batch, features)
    out, dx = np.empty_like(x), np.empty_like(x)
    at = [0]  # the layer's counter: a fresh mask each call, the same one forward and back

    def fastgrad():
        _core.dropout(x, out, DROP_RATE, DROP_SEED, at[0])
        _core.dropout(dy, dx, DROP_RATE, DROP_SEED, at[0])
        at[0] += x.size
        return out, dx

    def numpy(mask):
        return x * mask / (1 - DROP_RATE), dy * mask / (1 - DROP_RATE)

    impls = {"fastgrad": fastgrad, "numpy": lambda: numpy(rng.random(x.shape) >= DROP_RATE)}
    if torch is not None:
        xt, dyt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(dy)
        impls["torch"] = lambda: torch.autograd.grad(
            torch.nn.functional.dropout(xt, DROP_RATE, True), xt, dyt)
    got = [a.copy() for a in fastgrad()]
    kept = got[0] != 0  # x holds no zeros
    sigma = math.sqrt(DROP_RATE * (1 - DROP_RATE) / x.size)
    off = max(0.0, abs(float(kept.mean()) - (1 - DROP_RATE)) - 6 * sigma) / (1 - DROP_RATE)
    return impls, max(rel_diff(got, numpy(kept)), off)


# -- LayerNormalization forward + backward ----------------------------------------
def ln_case(batch, features, eps=1e-3):
    """LayerNormalization (Keras defaults) forward and backward, with the
    gamma and beta gradients; NumPy and PyTorch's layer_norm do the same."""
    rng = np.random.default_rng(0)
    x, dy = randn(rng, batch, features, scale=2.0) + F32(1), randn(rng, batch, features)
    gamma, beta = 1 + randn(rng, features, scale=0.1), randn(rng, features, scale=0.1)
    out, dx, dgamma, dbeta = (np.empty_like(a) for a in (x, x, gamma, beta))
    mean, rstd, work = np.empty(batch), np.empty(batch), np.empty(2 * features)

    def fastgrad():
        _core.layernorm_forward(x, gamma, beta, out, mean, rstd, eps)
        _core.layernorm_backward(dy, x, mean, rstd, gamma, dx, dgamma, dbeta, work)
        return out, dx, dgamma, dbeta

    def numpy():
        mu = x.mean(1, keepdims=True)
        r = 1 / np.sqrt(x.var(1, keepdims=True) + eps)
        xhat = (x - mu) * r
        g = dy * gamma
        dx = r * (g - g.mean(1, keepdims=True) - xhat * (g * xhat).mean(1, keepdims=True))
        return gamma * xhat + beta, dx, (dy * xhat).sum(0), dy.sum(0)

    impls = {"fastgrad": fastgrad, "numpy": numpy}
    if torch is not None:
        xt, dyt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(dy)
        gt, bt = (torch.from_numpy(a.copy()).requires_grad_() for a in (gamma, beta))
        impls["torch"] = lambda: torch.autograd.grad(
            torch.nn.functional.layer_norm(xt, (features,), gt, bt, eps), (xt, gt, bt), dyt)
    return impls, rel_diff(fastgrad(), numpy())


# -- GradientMonitor overhead on a training step ----------------------------------
def monitor_case(batch):
    rng = np.random.default_rng(0)
    x, labels = rng.random((batch, SIZES[0]), dtype=F32), rng.integers(0, SIZES[-1], batch)
    model, twin = mlp(fg.optimizers.Adam()), mlp(fg.optimizers.Adam())
    monitor = fg.callbacks.GradientMonitor()
    monitor.set_model(model)

    def without():
        model.optimizer.track_updates(False)
        return model.train_on_batch(x, labels)

    def with_monitor():
        model.optimizer.track_updates(True)  # as the monitor's on_train_begin
        loss = model.train_on_batch(x, labels)
        monitor.on_batch_end(0)
        return loss

    monitor.on_train_begin()
    _, grads = model.compute_gradients(x, labels)
    before = model.get_weights()
    loss = with_monitor()
    after = model.get_weights()
    want = (np.array([np.linalg.norm(g.astype(float)) for g in grads]),
            np.array([np.linalg.norm((a - b).astype(float)) / np.linalg.norm(a.astype(float))
                      for a, b in zip(after, before)]))
    diff = max(rel_diff((monitor.grad_norms[-1], monitor.update_ratios[-1]), want),
               abs(twin.train_on_batch(x, labels) - loss) / loss)
    return {"without": without, "with": with_monitor}, diff


# -- the case table and the report ------------------------------------------------
# (name, floor, make, args); floor: "gemm", "copy", None (no floor column) or
# "step" (monitor: the step without the monitor). make returns the callables by
# implementation and the relative difference of fastgrad's result from NumPy's.
CASES = ([(f"dense/{act}/{b}x{i}x{o}", "gemm", dense_case, (b, i, o, act))
          for act in ("relu", "sigmoid")
          for b, i, o in ((32, 784, 256), (256, 784, 256), (1024, 1024, 1024))]
         + [(f"train/{b}", "gemm", train_case, (b,)) for b in (32, 256, 1024)]
         + [(f"adam/{label}", "copy", adam_case, (n,))
            for label, n in (("100K", 10 ** 5), ("1M", 10 ** 6), ("10M", 10 ** 7))]
         + [(f"bn/{b}x{f}", None, bn_case, (b, f))
            for b, f in ((64, 256), (256, 1024), (4096, 1024))]
         + [(f"dropout/{b}x{f}", None, dropout_case, (b, f))
            for b, f in ((256, 1024), (4096, 1024))]
         + [(f"monitor/{b}", "step", monitor_case, (b,)) for b in (32, 256)]
         + [(f"layernorm/{b}x{f}", None, ln_case, (b, f)) for b, f in ((256, 1024), (4096, 1024))])


def run_case(name, floor, make, args, reps, target, rounds):
    impls, diff = make(*args)
    timed, samples = measure(impls, reps, target, rounds)
    t = {k: v[0] for k, v in timed.items()}
    row = {"case": name, "floor": floor, "seconds": t, "max_rel_diff": diff,
           "iqr_over_median": {k: v[1] for k, v in timed.items()}}
    if "numpy" in t:
        row["numpy_over_fastgrad"] = t["numpy"] / t["fastgrad"]
    if floor == "gemm":
        row["fastgrad_over_gemm"] = t["fastgrad"] / t["gemm"]
        if "gemm_write" in t:
            row["fastgrad_over_gemm_write"] = t["fastgrad"] / t["gemm_write"]
    elif floor == "step":
        # samples taken side by side: the median of their ratios cancels drift
        pairs = np.array(samples["with"]) / np.array(samples["without"])
        row["monitor_overhead"] = float(np.median(pairs)) - 1
        row["monitor_added_seconds"] = row["monitor_overhead"] * t["without"]
    elif floor == "copy":
        row["gbps"] = {k: (COPY_BYTES if k == "copy" else ADAM_BYTES) * args[0] / s / 1e9
                       for k, s in t.items()}
        row["fastgrad_over_copy_bandwidth"] = row["gbps"]["fastgrad"] / row["gbps"]["copy"]
    if "torch" in t:
        row["torch_over_fastgrad"] = t["torch"] / t["fastgrad"]
    return row


def fmt_seconds(s, sign=""):
    a = abs(s)
    unit, v = ("s", s) if a >= 1 else ("ms", s * 1e3) if a >= 1e-3 else ("us", s * 1e6)
    return (f"{v:{sign}.3g}" if abs(v) < 100 else f"{v:{sign}.0f}") + f" {unit}"


def fmt_time(row, impl):
    mark = "~" if row["iqr_over_median"][impl] > NOISY else " "
    return fmt_seconds(row["seconds"][impl]) + mark


def cells(row):
    """(header, text) of each column of the row's table."""
    out = [("case", row["case"].ljust(26))]
    if row["floor"] == "step":
        return out + [("without", fmt_time(row, "without")), ("with", fmt_time(row, "with")),
                      ("overhead", f"{row['monitor_overhead']:+.1%}"),
                      ("added", fmt_seconds(row["monitor_added_seconds"], "+"))]
    out += [("fastgrad", fmt_time(row, "fastgrad")), ("numpy", fmt_time(row, "numpy")),
            ("np/fg", f"{row['numpy_over_fastgrad']:.2f}x")]
    if row["floor"] == "gemm":
        out += [("GEMMs", fmt_time(row, "gemm")), ("fg/GEMM", f"{row['fastgrad_over_gemm']:.2f}")]
        if "gemm_write" in row["seconds"]:
            out += [("GEMMs+w", fmt_time(row, "gemm_write")),
                    ("fg/G+w", f"{row['fastgrad_over_gemm_write']:.2f}")]
    elif row["floor"] == "copy":
        out += [("copy", fmt_time(row, "copy"))]
        out += [(f"{k} GB/s", f"{row['gbps'][k]:.1f}") for k in ("copy", "fastgrad", "numpy")]
        out += [("fg/copy", f"{row['fastgrad_over_copy_bandwidth']:.2f}")]
    if "torch" in row["seconds"]:
        out += [("torch", fmt_time(row, "torch")),
                ("torch/fg", f"{row['torch_over_fastgrad']:.2f}x")]
        if "gbps" in row:
            out += [("torch GB/s", f"{row['gbps']['torch']:.1f}")]
    return out


def print_row(row, head):
    pairs = cells(row)
    width = [max(len(h), len(t), 9) for h, t in pairs]

    def join(texts):
        return "  ".join(t.rjust(w) if i else t.ljust(w)
                         for i, (t, w) in enumerate(zip(texts, width)))
    if head:
        print("\n" + join([h for h, _ in pairs]))
    line = join([t for _, t in pairs])
    if row["max_rel_diff"] > 1e-3:
        line += f"  ! fastgrad's result differs from NumPy's by {row['max_rel_diff']:.1e}"
    print(line, flush=True)


def blas(module):
    try:
        info = module.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{info['name']} {info['version']}"
    except Exception:  # show_config's layout varies across releases
        return "unknown"


def environment():
    env = {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
           "fastgrad": f"{fg.__version__} at {os.path.dirname(fg.__file__)}",
           "numpy BLAS": blas(np), "scipy BLAS (fastgrad's)": blas(scipy),
           "cpu_count": os.cpu_count(), "load average (1 min)": round(os.getloadavg()[0], 2)}
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        env[var] = os.environ.get(var, "(unset)")
    if torch is not None:
        env["torch"], env["torch threads"] = torch.__version__, torch.get_num_threads()
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter samples (< 1 min)")
    ap.add_argument("--only", default="", help="run only the cases whose name contains this")
    ap.add_argument("--json", metavar="PATH", help="also write the results to PATH")
    opts = ap.parse_args(argv)
    reps, target, rounds = (4, 0.01, 2) if opts.quick else (16, 0.05, 4)
    env = environment()
    print("\n".join(f"{k:>24}: {v}" for k, v in env.items()))
    if env["load average (1 min)"] > 0.5:
        print("warning: other processes are using the CPUs; timings will be noisy")
    print(f"{reps} samples of ~{target * 1e3:.0f} ms per implementation; median per call; "
          f"~ = interquartile range above {NOISY:.0%} of the median")
    rows = []
    for name, floor, make, args in CASES:
        if opts.only in name:
            # monitor: a difference of a few percent, so the two sides
            # alternate sample by sample to share the machine's drift, over
            # three times the samples
            n = 3 * reps if floor == "step" else reps
            rows.append(run_case(name, floor, make, args, n, target,
                                 n if floor == "step" else rounds))
            # a header whenever the columns change (train adds GEMMs+w)
            head = len(rows) == 1 or [h for h, _ in cells(rows[-2])] != \
                [h for h, _ in cells(rows[-1])]
            print_row(rows[-1], head)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"environment": env, "quick": opts.quick, "samples": reps,
                       "target_seconds": target, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
