"""fastgrad benchmarks: the compiled kernels against NumPy and, when installed,
PyTorch, a jit-compiled JAX step and ONNX Runtime.

Method. The parent process only orchestrates: every (case, implementation) is
timed in a fresh worker process (``run.py --worker CASE IMPL``, printing JSON),
so that NumPy's and SciPy's OpenBLAS, PyTorch's and XLA's thread pools never
share a process (a pool whose threads still spin after its work slows whatever
runs next, up to 40-fold). A worker builds the case's data from fixed seeds,
computes its result once (saved for the parent's correctness check), runs
untimed for SETTLE seconds (QUICK_SETTLE with --quick), then takes samples of
repeated calls lasting about a target time each. The parent repeats this
``reps`` times per implementation, in alternating order (A B C, C B A, ...),
so that drift in the machine's load falls on every side; a time is the median
over repetitions of each worker's median, and every ratio is taken between
times of the same run. Before any
number is trusted the results are compared: each implementation's against
the case's reference (relative difference of the largest element, flagged
with "!" above the case's tolerance). GradientMonitor's with/without pair
stays in one process, sample by sample: its overhead is the point.

Cases, all float32 (see README.md for the exact work on each side):
  nadam/N, lion/N   one fused Nadam or Lion step with global-norm clipping over
                    N parameters: optimizer.apply() vs NumPy with temporaries
  dense/ACT/BxIxO   Dense forward + backward: ops.dense_forward/backward, NumPy,
                    the 3 GEMMs alone, torch (addmm, activation, autograd.grad)
  train/B           784-256-256-10 MLP step, SGD: train_on_batch vs NumPy;
                    floors: its 8 GEMMs, and the GEMMs + one pass over the kernels
  step/B            the same MLP with Adam and global-norm clipping (1.0):
                    train_on_batch vs torch (clip_grad_norm_ + Adam) and a
                    jax.jit-compiled optax step; losses of the first two steps
                    agree from the same initial weights
  fit/digits/32     one epoch of fit (Adam, accuracy metric) of a 64-256-128-10
                    network on 1347 rows, batch 32, vs its steps' GEMMs alone
  predict/R         the MLP's inference on R rows: fastgrad's model(x) (or
                    predict(x) where the model is not callable), NumPy, torch in
                    inference_mode, ONNX Runtime (default threads and one)
  adam/N            Adam(global_clipnorm=1.0).apply() on N parameters vs NumPy,
                    np.copyto (bandwidth floor), torch clip_grad_norm_ + Adam
  bn/BxF            BatchNormalization training forward + backward
  dropout/BxF       inverted dropout forward + backward
  act/NAME/BxF      every activation forward + backward vs NumPy/SciPy
  act/softmax-fwd/BxC  softmax forward alone at 10 and 1000 classes
  monitor/B         GradientMonitor's cost on a step (with vs without)

--isa builds the extension from this checkout three times into temporary
folders (default flags, whose clones pick AVX-512 here; CFLAGS="-march=x86-64-v3
-DFG_NO_CLONES"; CFLAGS="-march=x86-64 -DFG_NO_CLONES") and times the act cases
with each build on the import path. NumPy picks its SIMD loops at run time, so
on an AVX-512 machine its np.exp and np.tanh run AVX-512 code whatever
fastgrad was built for. The NumPy side is therefore timed twice more, in
workers whose NumPy is held to each build's instruction set through
NPY_DISABLE_CPU_FEATURES (the AVX2 build's: no dispatch target above
X86_V3; the baseline's: none at all, NumPy's own baseline, X86_V2, being
the closest it gets to x86-64); the names disabled are those of NumPy's
__cpu_dispatch__ outside the build's set, and every worker reports the
targets it had on, which must match. The table gives both ratios:
np(all)/BUILD against the unrestricted NumPy, np(isa)/BUILD against the
NumPy held to that build's instruction set (SciPy's loops do not dispatch).

Cases from other files: a module in bench/ (or on the import path) that
defines CASES, a list of dicts {"name", "make", "args", "impls", "reference",
"kind", "tolerance", "needs"} (see Case below), joins the suite when named in
EXTRA_MODULES or with --extra MODULE.

Usage: python bench/run.py [--quick] [--only SUBSTRING[,...]] [--json PATH] [--isa]
                           [--reps N] [--extra MODULE]
"""
import argparse
import importlib
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np

# Modules whose CASES join the suite; one line per module, e.g. "sklearn_digits".
EXTRA_MODULES = ("sklearn_digits",)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = np.float32
# Seconds each worker runs its implementation untimed before sampling (warm
# caches, a started thread pool, a compiled JAX step); less with --quick.
SETTLE, QUICK_SETTLE = 0.15, 0.08
NOISY = 0.10  # interquartile range / median above which a time gets "~"
MARK = "BENCH-RESULT "  # prefix of the worker's JSON line on stdout
PEERS = (("torch", "torch"), ("jax", "jax"), ("onnxruntime", "ort"),
         ("onnxruntime-1t", "ort-1t"))
# implementation -> the modules it needs (absent: the implementation is left out)
NEEDS = {"fastgrad": (), "gemm": (), "gemm_write": (), "torch": ("torch",),
         "jax": ("jax", "optax"), "onnxruntime": ("onnx", "onnxruntime"),
         "onnxruntime-1t": ("onnx", "onnxruntime")}


# -- fastgrad, imported only by the workers that time it --------------------------
def import_fastgrad(attempts=5, wait=3.0):
    """The importable package (installed, or first on PYTHONPATH), else the
    checkout's; retried, as the extension may be being rebuilt."""
    for attempt in range(attempts):
        try:
            return importlib.import_module("fastgrad")
        except ImportError:
            for name in [m for m in sys.modules if m.split(".")[0] == "fastgrad"]:
                del sys.modules[name]
            if attempt == attempts - 1:
                raise
            if ROOT in sys.path:
                time.sleep(wait)
            else:
                sys.path.insert(0, ROOT)


def fastgrad():
    return import_fastgrad()


def core():
    fastgrad()
    return importlib.import_module("fastgrad._core")


# -- timing (inside a worker) -----------------------------------------------------
def sample(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def settle(fn, seconds):
    """Call ``fn`` for ``seconds``; return its mean seconds per call over the
    second half, once caches are warm and thread pools started."""
    t0 = t = time.perf_counter()
    half, n = None, 0
    while t - t0 < seconds or n == 0:
        fn()
        t = time.perf_counter()
        if half is not None:
            n += 1
        elif t - t0 >= seconds / 2:
            half = t
    return max((t - half) / n, 1e-7)


def measure(runs, samples, target, warm=SETTLE):
    """label -> ``samples`` times per call of each callable in ``runs``, each
    over repeated calls lasting about ``target`` seconds; with several
    callables the samples alternate one by one, so drift falls on all."""
    loops = {label: max(1, round(target / settle(fn, warm))) for label, fn in runs.items()}
    times = {label: [] for label in runs}
    for _ in range(samples):
        for label, fn in runs.items():
            times[label].append(sample(fn, loops[label]))
    return times


# -- shared helpers ----------------------------------------------------------------
def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(F32)


def rel_diff(got, want):
    """Largest difference over the arrays both dicts hold, relative to the
    largest magnitude of the expected one; None when they share none."""
    keys = [k for k in want if k in got]
    if not keys:
        return None
    return max(float(np.max(np.abs(np.asarray(got[k], np.float64) - want[k]))
                     / (np.max(np.abs(want[k])) or 1.0)) for k in keys)


def gemm_calls(specs):
    """A callable making ``_core.matmul(a, b, out, trans_a, trans_b)`` for each
    (a, b, trans_a, trans_b), into outputs allocated here."""
    matmul = core().matmul
    calls = [(a, b, np.empty((a.shape[ta], b.shape[not tb]), F32), ta, tb)
             for a, b, ta, tb in specs]

    def run():
        for call in calls:
            matmul(*call)
    return run


def timed(run, **result):
    """A worker's view of an implementation: the callable to time and the
    arrays its first calls produced (compared across implementations)."""
    return {"run": run, "result": result}


def torch_tensors(*arrays, grad=False):
    import torch
    return [torch.from_numpy(a).requires_grad_(grad) for a in arrays]


def torch_adam(params, eps=None):
    """torch's Adam with the hyperparameters of fastgrad's, fused where this
    release has a fused CPU Adam, else foreach."""
    import torch
    hyper = {"lr": ADAM_LR, "betas": (BETA_1, BETA_2), "eps": EPS if eps is None else eps}
    try:
        return torch.optim.Adam(params, fused=True, **hyper)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, foreach=True, **hyper)


# -- dense layer forward + backward -----------------------------------------------
def dense_case(impl, batch, n_in, n_out, act):
    rng = np.random.default_rng(0)
    x, dy = randn(rng, batch, n_in), randn(rng, batch, n_out)
    w, b = randn(rng, n_in, n_out, scale=n_in ** -0.5), randn(rng, n_out, scale=0.1)
    if impl == "fastgrad":
        ops = fastgrad().ops
        out, dw, db, dx = (np.empty_like(a) for a in (dy, w, b, x))

        def run():
            ops.dense_forward(x, w, b, act, out=out)
            return ops.dense_backward(dy, x, w, out, act, dkernel=dw, dbias=db, dx=dx)
    elif impl == "numpy":
        def run():
            z = x @ w + b
            if act == "relu":
                dz = dy * (z > 0)
            else:
                y = 1 / (1 + np.exp(-z))
                dz = dy * y * (1 - y)
            return dz @ w.T, x.T @ dz, dz.sum(0)
    elif impl == "torch":
        import torch
        xt, wt, bt = torch_tensors(x, w, b, grad=True)
        (dyt,) = torch_tensors(dy)
        fn = torch.relu if act == "relu" else torch.sigmoid

        def run():
            return [g.numpy() for g in torch.autograd.grad(fn(torch.addmm(bt, xt, wt)),
                                                           (xt, wt, bt), dyt)]
    else:  # gemm
        return timed(gemm_calls([(x, w, 0, 0), (x, dy, 1, 0), (dy, w, 0, 1)]))
    dx_, dw_, db_ = (np.array(a) for a in run())
    return timed(run, dx=dx_, dkernel=dw_, dbias=db_)


# -- the 784-256-256-10 MLP: weights, data, one step --------------------------------
SIZES, LR = (784, 256, 256, 10), 0.01
CLIP, BETA_1, BETA_2, EPS, ADAM_LR = 1.0, 0.9, 0.999, 1e-7, 1e-3
# fastgrad (as Keras) adds epsilon to sqrt(v) before the bias correction,
# torch and optax after it. With this epsilon on their side the first update,
# the one step/B and adam/N compare, is the same (else losses differ by ~1e-4).
PEER_EPS = EPS / math.sqrt(1 - BETA_2)


def mlp_weights():
    """W1, b1, W2, b2, W3, b3: Glorot-uniform kernels (in, out) and small
    biases, the same in every worker and implementation."""
    rng = np.random.default_rng(7)
    weights = []
    for n_in, n_out in itertools.pairwise(SIZES):
        limit = math.sqrt(6 / (n_in + n_out))
        weights += [rng.uniform(-limit, limit, (n_in, n_out)).astype(F32),
                    randn(rng, n_out, scale=0.01)]
    return weights


def mlp_data(rows):
    rng = np.random.default_rng(0)
    return rng.random((rows, SIZES[0]), dtype=F32), rng.integers(0, SIZES[-1], rows)


def mlp(optimizer):
    """fastgrad's MLP with mlp_weights(), compiled with ``optimizer``."""
    fg = fastgrad()
    model = fg.Sequential([fg.layers.Dense(SIZES[1], "relu", input_dim=SIZES[0]),
                           fg.layers.Dense(SIZES[2], "relu"),
                           fg.layers.Dense(SIZES[3], "softmax")], seed=0)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    model.set_weights(mlp_weights())
    return model


def two_losses(step):
    """The losses two calls of ``step`` return: at the initial weights, and
    after one update (what the implementations are compared on)."""
    return timed(step, losses=np.array([float(step()), float(step())]))


def train_case(impl, batch):
    x, labels = mlp_data(batch)
    weights = mlp_weights()
    if impl == "fastgrad":
        model = mlp(fastgrad().optimizers.SGD(learning_rate=LR))
        return two_losses(lambda: model.train_on_batch(x, labels))
    if impl == "numpy":
        return two_losses(numpy_train_step(x, labels, weights))
    gemms = train_gemms(x, weights)
    return timed(gemm_calls(gemms) if impl == "gemm" else gemms_then_write(gemms, weights[::2]))


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


def train_gemms(x, weights, sizes=SIZES):
    """The step's eight GEMMs on operands of their shapes: three forward, three
    weight gradients, two input gradients (none for the data)."""
    rng = np.random.default_rng(1)
    w1, w2, w3 = weights[::2]
    h1, h2 = (randn(rng, x.shape[0], n) for n in sizes[1:3])
    d1, d2, d3 = (randn(rng, x.shape[0], n) for n in sizes[1:])
    return [(x, w1, 0, 0), (h1, w2, 0, 0), (h2, w3, 0, 0),
            (x, d1, 1, 0), (h1, d2, 1, 0), (h2, d3, 1, 0), (d3, w3, 0, 1), (d2, w2, 0, 1)]


# -- fit on a digits-sized problem, against its GEMMs alone -----------------------
DIGITS_SIZES, DIGITS_ROWS = (64, 256, 128, 10), 1347   # scikit-learn's digits, 75% split


def fit_case(impl, batch):
    """One epoch of ``fit`` (Adam, shuffled batches, an accuracy metric) of a
    64-256-128-10 ReLU network on 1347 rows, against the same steps' eight
    GEMMs alone (42 batches of 32 rows and one of 3 at batch 32)."""
    rng = np.random.default_rng(0)
    x = rng.random((DIGITS_ROWS, DIGITS_SIZES[0]), dtype=F32)
    y = rng.integers(0, DIGITS_SIZES[-1], DIGITS_ROWS)
    if impl == "fastgrad":
        fg = fastgrad()
        model = fg.Sequential([fg.layers.Dense(DIGITS_SIZES[1], "relu", input_dim=x.shape[1]),
                               fg.layers.Dense(DIGITS_SIZES[2], "relu"),
                               fg.layers.Dense(DIGITS_SIZES[3], "softmax")], seed=0)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        return timed(lambda: model.fit(x, y, batch_size=batch, epochs=1, verbose=0))
    weights = [randn(rng, a, b, scale=0.05) for a, b in itertools.pairwise(DIGITS_SIZES)]
    full, rest = divmod(DIGITS_ROWS, batch)
    runs = [(gemm_calls(train_gemms(x[:rows], [w for w in weights for _ in (0, 1)],
                                    DIGITS_SIZES)), count)
            for rows, count in ((batch, full), (rest, 1)) if rows and count]

    def epoch():
        for run, count in runs:
            for _ in range(count):
                run()
    return timed(epoch)


# -- the MLP step with Adam and global-norm clipping, against the peers -----------
def step_case(impl, batch):
    x, labels = mlp_data(batch)
    if impl == "fastgrad":
        model = mlp(fastgrad().optimizers.Adam(learning_rate=ADAM_LR, beta_1=BETA_1,
                                               beta_2=BETA_2, epsilon=EPS,
                                               global_clipnorm=CLIP))
        return two_losses(lambda: model.train_on_batch(x, labels))
    if impl == "torch":
        return two_losses(torch_step(x, labels))
    return two_losses(jax_step(x, labels))


def torch_mlp():
    import torch
    layers = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(SIZES)):
        layers += [torch.nn.Linear(n_in, n_out)] + ([torch.nn.ReLU()] if i < 2 else [])
    model = torch.nn.Sequential(*layers)
    weights = mlp_weights()
    with torch.no_grad():
        for layer, w, b in zip(model[::2], weights[::2], weights[1::2]):
            layer.weight.copy_(torch.from_numpy(w.T))  # torch keeps (out, in)
            layer.bias.copy_(torch.from_numpy(b))
    return model


def torch_step(x, labels):
    import torch
    model = torch_mlp()
    params = list(model.parameters())
    opt, loss_fn = torch_adam(params, PEER_EPS), torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(labels)

    def step():
        opt.zero_grad()
        loss = loss_fn(model(xt), yt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        return loss.item()
    return step


def jax_step(x, labels):
    """One jit-compiled step (value_and_grad, clip_by_global_norm, adam);
    parameters and optimizer state are donated, so XLA updates them in place."""
    import jax
    import optax

    def loss_fn(params, x, y):
        h = x
        for i, (w, b) in enumerate(params):
            h = h @ w + b
            if i < len(params) - 1:
                h = jax.nn.relu(h)
        return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

    tx = optax.chain(optax.clip_by_global_norm(CLIP),
                     optax.adam(ADAM_LR, b1=BETA_1, b2=BETA_2, eps=PEER_EPS))

    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))
    weights = mlp_weights()
    params = [(jax.device_put(w), jax.device_put(b)) for w, b in zip(weights[::2], weights[1::2])]
    held = [params, tx.init(params)]
    xj, yj = jax.device_put(x), jax.device_put(labels.astype(np.int32))

    def run():
        held[0], held[1], loss = jitted(held[0], held[1], xj, yj)
        # one executable: its outputs become ready together
        return loss.block_until_ready()
    return run


# -- prediction ---------------------------------------------------------------------
def numpy_predict(x, weights):
    h = x
    for i in range(3):
        h = h @ weights[2 * i] + weights[2 * i + 1]
        if i < 2:
            np.maximum(h, 0, out=h)
    h -= h.max(axis=1, keepdims=True)
    np.exp(h, out=h)
    return h / h.sum(axis=1, keepdims=True)


def onnx_mlp(weights):
    """The MLP as an ONNX graph (MatMul, Add, Relu, Softmax), serialized."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    nodes, init, h = [], [], "x"
    for i in range(3):
        init += [numpy_helper.from_array(weights[2 * i], f"W{i}"),
                 numpy_helper.from_array(weights[2 * i + 1], f"b{i}")]
        nodes += [helper.make_node("MatMul", [h, f"W{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"z{i}"])]
        h = f"z{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [h], [f"h{i}"]))
            h = f"h{i}"
    nodes.append(helper.make_node("Softmax", [h], ["y"], axis=-1))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, SIZES[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, SIZES[-1]])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # read by every onnxruntime since 1.10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def predict_case(impl, rows):
    x, _ = mlp_data(rows)
    weights = mlp_weights()
    note = None
    if impl == "fastgrad":
        model = mlp("adam")
        if callable(model):
            run, note = (lambda: model(x)), "model(x)"
        else:
            run, note = (lambda: model.predict(x)), "predict(x)"
    elif impl == "numpy":
        def run():
            return numpy_predict(x, weights)
    elif impl == "torch":
        import torch
        model, xt = torch_mlp().eval(), torch.from_numpy(x)

        def run():
            with torch.inference_mode():
                return torch.softmax(model(xt), dim=1)
    else:  # onnxruntime, onnxruntime-1t
        import onnxruntime as ort
        options = ort.SessionOptions()
        if impl.endswith("-1t"):
            options.intra_op_num_threads = 1
        session = ort.InferenceSession(onnx_mlp(weights), options,
                                       providers=["CPUExecutionProvider"])

        def run():
            return session.run(None, {"x": x})[0]
    out = timed(run, y=np.array(run()))
    out["note"] = note
    return out


# -- Adam with global-norm clipping -----------------------------------------------
ADAM_BYTES, COPY_BYTES = 32, 8  # per parameter (see README.md)


def adam_case(impl, n):
    rng = np.random.default_rng(0)
    params, grads = randn(rng, n), randn(rng, n)
    if impl == "copy":
        dst = np.empty_like(params)
        return timed(lambda: np.copyto(dst, grads))
    if impl == "fastgrad":
        opt = fastgrad().optimizers.Adam(learning_rate=ADAM_LR, beta_1=BETA_1, beta_2=BETA_2,
                                         epsilon=EPS, global_clipnorm=CLIP)
        opt.build(params, grads, [("w", 0, (n,), None, None)])
        run = opt.apply
    elif impl == "numpy":
        run = numpy_adam(params, grads)
    else:  # torch
        import torch
        p = torch.nn.Parameter(torch.from_numpy(params))
        p.grad = torch.from_numpy(grads.copy())
        opt = torch_adam([p], PEER_EPS)

        def run():
            torch.nn.utils.clip_grad_norm_([p], CLIP)
            opt.step()
    run()
    return timed(run, params=params.copy())


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


# -- one fused Nadam or Lion step -------------------------------------------------
def fused_step_case(impl, kind, n):
    """nadam/N, lion/N: one step with global_clipnorm=1.0 over N float32
    parameters, optimizer.apply() on flat buffers (the norms pass, then the
    fused update) vs the same step in NumPy with temporaries."""
    rng = np.random.default_rng(0)
    params, grads = randn(rng, n), randn(rng, n)
    if impl == "fastgrad":
        cls = {"nadam": fastgrad().optimizers.Nadam, "lion": fastgrad().optimizers.Lion}[kind]
        opt = cls(learning_rate=ADAM_LR, global_clipnorm=CLIP)
        opt.build(params, grads, [("w", 0, (n,), None, None)])
        run = opt.apply
    else:
        run = numpy_fused_step(kind, params, grads)
    run()
    return timed(run, params=params.copy())


def numpy_fused_step(kind, params, grads):
    m, v, t, u = np.zeros_like(params), np.zeros_like(params), [0], [1.0]

    def step():
        t[0] += 1
        norm = np.linalg.norm(grads)
        g = grads * F32(CLIP / norm) if norm > CLIP else grads
        if kind == "lion":
            params[:] -= F32(ADAM_LR) * np.sign(F32(0.9) * m + F32(0.1) * g)
            m[:] = F32(0.99) * m + F32(0.01) * g
            return
        u_t, u_t1 = (BETA_1 * (1 - 0.5 * 0.96 ** k) for k in (t[0], t[0] + 1))
        u[0] *= u_t
        m[:] = BETA_1 * m + (1 - BETA_1) * g
        v[:] = BETA_2 * v + (1 - BETA_2) * g * g
        m_hat = F32(u_t1 / (1 - u[0] * u_t1)) * m + F32((1 - u_t) / (1 - u[0])) * g
        params[:] -= F32(ADAM_LR) * m_hat / (np.sqrt(v / F32(1 - BETA_2 ** t[0])) + F32(EPS))
    return step


# -- BatchNormalization forward (training) + backward ----------------------------
BN_MOMENTUM, BN_EPS = 0.99, 1e-3  # the layer's (and Keras's) defaults


def bn_case(impl, batch, features):
    rng = np.random.default_rng(0)
    x, dy = randn(rng, batch, features, scale=2.0) + F32(1), randn(rng, batch, features)
    gamma, beta = 1 + randn(rng, features, scale=0.1), randn(rng, features, scale=0.1)
    moving = [np.zeros(features, F32), np.ones(features, F32)]  # mean, variance
    if impl == "fastgrad":
        _core = core()
        out, dx, dgamma, dbeta = (np.empty_like(a) for a in (x, x, gamma, beta))
        mean, rstd = np.empty(features), np.empty(features)

        def run():
            _core.batchnorm_forward(x, gamma, beta, *moving, out, mean, rstd,
                                    BN_EPS, BN_MOMENTUM, True)
            _core.batchnorm_backward(dy, x, mean, rstd, gamma, dx, dgamma, dbeta)
            return out, dx, dgamma, dbeta, *moving
    elif impl == "numpy":
        def run():
            mu, var = x.mean(0), x.var(0)
            xhat = (x - mu) / np.sqrt(var + BN_EPS)
            y = gamma * xhat + beta
            for m, stat in zip(moving, (mu, var)):
                m[:] = BN_MOMENTUM * m + (1 - BN_MOMENTUM) * stat
            dbeta = dy.sum(0)
            dgamma = (dy * xhat).sum(0)
            dx = gamma / np.sqrt(var + BN_EPS) / batch * (batch * dy - dbeta - xhat * dgamma)
            return y, dx, dgamma, dbeta, *moving
    else:  # torch: its running variance is the unbiased one, so it is not compared
        import torch
        bn = torch.nn.BatchNorm1d(features, eps=BN_EPS, momentum=1 - BN_MOMENTUM)
        with torch.no_grad():
            bn.weight.copy_(torch.from_numpy(gamma))
            bn.bias.copy_(torch.from_numpy(beta))
        (xt,), (dyt,) = torch_tensors(x, grad=True), torch_tensors(dy)
        wrt = (xt, bn.weight, bn.bias)

        def run():
            y = bn(xt)
            return (y.detach(), *torch.autograd.grad(y, wrt, dyt), bn.running_mean)
    got = [np.array(a) for a in run()]
    return timed(run, **dict(zip(("y", "dx", "dgamma", "dbeta", "moving_mean",
                                  "moving_variance"), got)))


# -- dropout forward + backward ---------------------------------------------------
DROP_RATE, DROP_SEED = 0.5, 12345


def dropout_case(impl, batch, features):
    rng = np.random.default_rng(0)
    x, dy = randn(rng, batch, features), randn(rng, batch, features)
    scale = F32(1 / (1 - DROP_RATE))
    if impl == "numpy":
        def run():
            mask = rng.random(x.shape) >= DROP_RATE
            return x * mask * scale, dy * mask * scale
        return timed(run)
    if impl == "torch":
        import torch
        (xt,), (dyt,) = torch_tensors(x, grad=True), torch_tensors(dy)
        return timed(lambda: torch.autograd.grad(
            torch.nn.functional.dropout(xt, DROP_RATE, True), xt, dyt))
    _core = core()
    out, dx = np.empty_like(x), np.empty_like(x)
    at = [0]  # the layer's counter: a fresh mask each call, the same one forward and back

    def run():
        _core.dropout(x, out, DROP_RATE, DROP_SEED, at[0])
        _core.dropout(dy, dx, DROP_RATE, DROP_SEED, at[0])
        at[0] += x.size
    # the generators differ: fastgrad's outputs are checked against NumPy's
    # formula with fastgrad's own mask, and its kept fraction against 1 - rate
    run()
    kept = out != 0  # x holds no zeros
    sigma = math.sqrt(DROP_RATE * (1 - DROP_RATE) / x.size)
    off = max(0.0, abs(float(kept.mean()) - (1 - DROP_RATE)) - 6 * sigma) / (1 - DROP_RATE)
    made = timed(run)
    made["diff"] = max(rel_diff({"y": out, "dx": dx},
                                {"y": x * kept * scale, "dx": dy * kept * scale}), off)
    return made


# -- activations forward + backward -------------------------------------------------
SELU_ALPHA, SELU_SCALE = 1.6732632423543772, 1.0507009873554805
LEAKY_SLOPE = 0.2  # fastgrad's (and Keras's) default


def numpy_activation(name, z, dy):
    """NumPy/SciPy's forward y and backward dz = dy * act'(z), written as a
    user would; dz is None when dy is."""
    from scipy import special
    pos = z > 0
    if name == "linear":
        return z.copy(), None if dy is None else dy.copy()
    if name == "relu":
        y, d = np.maximum(z, 0), pos
    elif name == "leaky_relu":
        y, d = np.where(pos, z, F32(LEAKY_SLOPE) * z), np.where(pos, F32(1), F32(LEAKY_SLOPE))
    elif name in ("elu", "selu"):
        alpha, scale = (F32(SELU_ALPHA), F32(SELU_SCALE)) if name == "selu" else (F32(1), F32(1))
        y = scale * np.where(pos, z, alpha * np.expm1(z))
        d = np.where(pos, scale, y + scale * alpha)
    elif name == "gelu":
        phi = special.ndtr(z)
        y, d = z * phi, phi + z * np.exp(F32(-0.5) * z * z) * F32(1 / math.sqrt(2 * math.pi))
    elif name == "silu":
        s = special.expit(z)
        y, d = z * s, s * (1 + z * (1 - s))
    elif name == "sigmoid":
        y = special.expit(z)
        d = y * (1 - y)
    elif name == "tanh":
        y = np.tanh(z)
        d = 1 - y * y
    elif name in ("softplus", "mish"):
        sp, s = np.logaddexp(z, F32(0)), special.expit(z)
        if name == "softplus":
            y, d = sp, s
        else:
            t = np.tanh(sp)
            y, d = z * t, t + z * s * (1 - t * t)
    elif name == "softsign":
        a = 1 + np.abs(z)
        y, d = z / a, 1 / (a * a)
    elif name == "relu6":
        y, d = np.clip(z, 0, 6), (z > 0) & (z < 6)
    elif name in ("hard_sigmoid", "hard_silu"):
        h, inside = np.clip(z + 3, 0, 6) / 6, (z > -3) & (z < 3)
        if name == "hard_sigmoid":
            y, d = h, inside / F32(6)
        else:
            y, d = z * h, h + z * inside / F32(6)
    elif name == "exponential":
        y = np.exp(z)
        d = y
    elif name == "log_softmax":
        c = z - z.max(axis=1, keepdims=True)
        y = c - np.log(np.exp(c).sum(axis=1, keepdims=True))
        return y, None if dy is None else dy - np.exp(y) * dy.sum(axis=1, keepdims=True)
    else:  # softmax over the last axis
        e = np.exp(z - z.max(axis=1, keepdims=True))
        y = e / e.sum(axis=1, keepdims=True)
        return y, None if dy is None else y * (dy - (dy * y).sum(axis=1, keepdims=True))
    return y, None if dy is None else dy * d


def act_case(impl, name, rows, cols, backward=True):
    rng = np.random.default_rng(0)
    z, dy = randn(rng, rows, cols, scale=2.0), randn(rng, rows, cols)
    if not backward:
        dy = None
    if impl == "numpy":
        def run():
            return numpy_activation(name, z, dy)
    else:
        ops = fastgrad().ops
        y, dx = np.empty_like(z), np.empty_like(z)
        pre = z if name in ops.NEEDS_PRE else None

        def run():
            ops.activation_forward(z, name, out=y)
            if backward:
                ops.activation_backward(dy, y, name, x=pre, dx=dx)
            return y, dx if backward else None
    got = [None if a is None else np.array(a) for a in run()]
    return timed(run, **{k: a for k, a in zip(("y", "dx"), got) if a is not None})


# -- LayerNormalization forward + backward ----------------------------------------
def ln_case(impl, batch, features, eps=1e-3):
    """LayerNormalization (Keras defaults) forward and backward, with the
    gamma and beta gradients; NumPy and PyTorch's layer_norm do the same."""
    rng = np.random.default_rng(0)
    x, dy = randn(rng, batch, features, scale=2.0) + F32(1), randn(rng, batch, features)
    gamma, beta = 1 + randn(rng, features, scale=0.1), randn(rng, features, scale=0.1)
    if impl == "fastgrad":
        _core = core()
        out, dx, dgamma, dbeta = (np.empty_like(a) for a in (x, x, gamma, beta))
        mean, rstd = np.empty(batch), np.empty(batch)
        work = np.empty(_core.LAYERNORM_WORK * features)

        def run():
            _core.layernorm_forward(x, gamma, beta, out, mean, rstd, eps)
            _core.layernorm_backward(dy, x, mean, rstd, gamma, dx, dgamma, dbeta, work)
            return out, dx, dgamma, dbeta
    elif impl == "numpy":
        def run():
            mu = x.mean(1, keepdims=True)
            r = 1 / np.sqrt(x.var(1, keepdims=True) + eps)
            xhat = (x - mu) * r
            g = dy * gamma
            dx = r * (g - g.mean(1, keepdims=True) - xhat * (g * xhat).mean(1, keepdims=True))
            return gamma * xhat + beta, dx, (dy * xhat).sum(0), dy.sum(0)
    else:  # torch
        import torch
        (xt,), (dyt,) = torch_tensors(x, grad=True), torch_tensors(dy)
        gt, bt = torch_tensors(gamma.copy(), beta.copy(), grad=True)

        def run():
            y = torch.nn.functional.layer_norm(xt, (features,), gt, bt, eps)
            return (y.detach(), *torch.autograd.grad(y, (xt, gt, bt), dyt))
    got = [np.array(a) for a in run()]
    return timed(run, **dict(zip(("y", "dx", "dgamma", "dbeta"), got)))


# -- GradientMonitor overhead on a training step ----------------------------------
def monitor_case(impl, batch):
    """Both sides in one process on one model, sample by sample: the
    overhead is a few percent, a difference only a shared process shows."""
    fg = fastgrad()
    x, labels = mlp_data(batch)
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
    norm = np.linalg.norm
    want = {"norms": np.array([norm(g.astype(float)) for g in grads]),
            "ratios": np.array([norm((a - b).astype(float)) / norm(a.astype(float))
                                for a, b in zip(after, before)])}
    got = {"norms": monitor.grad_norms[-1], "ratios": monitor.update_ratios[-1]}
    made = timed({"without": without, "with": with_monitor})
    made["diff"] = max(rel_diff(got, want), abs(twin.train_on_batch(x, labels) - loss) / loss)
    return made


# -- the case table -----------------------------------------------------------------
class Case(NamedTuple):
    """name; make(impl, *args) -> timed(...) dict; args; impls, the sides
    (ratios divide by "fastgrad"'s time); reference: the implementation whose
    result the others are checked against; kind: the table's extra columns
    ("gemm", "copy", "monitor", "act" or None); tolerance: largest relative
    difference accepted; needs: impl -> modules it imports (else NEEDS);
    samples: samples per worker, when fewer than the run's (calls of seconds)."""
    name: str
    make: object
    args: tuple = ()
    impls: tuple = ("fastgrad", "numpy")
    reference: str = "numpy"
    kind: str = None
    tolerance: float = 1e-3
    needs: dict = None
    samples: int = None


ACTIVATIONS = ("linear", "relu", "leaky_relu", "elu", "selu", "gelu", "silu", "sigmoid",
               "tanh", "softmax", "softplus", "softsign", "relu6", "hard_sigmoid", "hard_silu",
               "mish", "exponential", "log_softmax")
CASES = ([Case(f"dense/{act}/{b}x{i}x{o}", dense_case, (b, i, o, act),
               ("fastgrad", "numpy", "gemm", "torch"), kind="gemm")
          for act in ("relu", "sigmoid")
          for b, i, o in ((32, 784, 256), (256, 784, 256), (1024, 1024, 1024))]
         + [Case(f"train/{b}", train_case, (b,), ("fastgrad", "numpy", "gemm", "gemm_write"),
                 kind="gemm") for b in (32, 256, 1024)]
         # float32 losses: summation order alone moves them by ~1e-6
         + [Case(f"step/{b}", step_case, (b,), ("fastgrad", "torch", "jax"), "fastgrad",
                 tolerance=1e-4) for b in (32, 256, 1024)]
         + [Case("fit/digits/32", fit_case, (32,), ("fastgrad", "gemm"), "fastgrad",
                 kind="gemm")]
         + [Case(f"predict/{r}", predict_case, (r,),
                 ("fastgrad", "numpy", "torch", "onnxruntime", "onnxruntime-1t"))
            for r in (1, 256)]
         + [Case(f"adam/{label}", adam_case, (n,), ("fastgrad", "numpy", "copy", "torch"),
                 kind="copy")
            for label, n in (("100K", 10 ** 5), ("1M", 10 ** 6), ("10M", 10 ** 7))]
         + [Case(f"{k}/{label}", fused_step_case, (k, n))
            for k in ("nadam", "lion") for label, n in (("1M", 10 ** 6), ("10M", 10 ** 7))]
         + [Case(f"bn/{b}x{f}", bn_case, (b, f), ("fastgrad", "numpy", "torch"))
            for b, f in ((64, 256), (256, 1024), (4096, 1024))]
         + [Case(f"dropout/{b}x{f}", dropout_case, (b, f), ("fastgrad", "numpy", "torch"))
            for b, f in ((256, 1024), (4096, 1024))]
         + [Case(f"act/{a}/256x4096", act_case, (a, 256, 4096), kind="act")
            for a in ACTIVATIONS]
         + [Case(f"act/softmax-fwd/{r}x{c}", act_case, ("softmax", r, c, False), kind="act")
            for r, c in ((65536, 10), (1024, 1000))]
         + [Case(f"layernorm/{b}x{f}", ln_case, (b, f), ("fastgrad", "numpy", "torch"))
            for b, f in ((256, 1024), (4096, 1024))]
         + [Case(f"monitor/{b}", monitor_case, (b,), ("fastgrad",), "fastgrad", kind="monitor")
            for b in (32, 256)])


def all_cases(extras):
    """The built-in cases and those of the modules named in EXTRA_MODULES and
    ``extras``; name -> Case."""
    cases = list(CASES)
    bench_dir = os.path.dirname(os.path.abspath(__file__))
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    for name in (*EXTRA_MODULES, *extras):
        module = importlib.import_module(name)
        cases += [Case(**spec) if isinstance(spec, dict) else spec for spec in module.CASES]
    return {c.name: c for c in cases}


# -- the worker ----------------------------------------------------------------------
def worker(case, impl, samples, target, warm, result_path):
    made = case.make(impl, *case.args)
    if result_path and made["result"]:
        np.savez(result_path, **made["result"])
    runs = made["run"] if isinstance(made["run"], dict) else {impl: made["run"]}
    report = {"series": measure(runs, samples, target, warm), "diff": made.get("diff"),
              "note": made.get("note")}
    report["numpy_targets"] = numpy_targets()
    fg = sys.modules.get("fastgrad")
    if fg is not None:
        report["fastgrad"] = os.path.dirname(os.path.abspath(fg.__file__))
    if "torch" in sys.modules:
        report["threads"] = sys.modules["torch"].get_num_threads()
    print(MARK + json.dumps(report), flush=True)


# -- the parent -----------------------------------------------------------------------
class WorkerError(RuntimeError):
    pass


RESULTS = itertools.count()  # names of the workers' result files


def spawn(case, impl, opts, result_path=None, env=None):
    # monitor: a difference of a few percent, over three times the samples
    samples = opts.samples * (3 if case.kind == "monitor" else 1)
    samples = min(samples, case.samples or samples)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", case.name, impl,
           "--samples", str(samples), "--target", str(opts.target),
           "--settle", str(QUICK_SETTLE if opts.quick else SETTLE)]
    for module in opts.extra:
        cmd += ["--extra", module]
    if result_path:
        cmd += ["--result", result_path]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise WorkerError(f"exit status {proc.returncode}: {tail}")


def available(case, impl):
    return all(importlib.util.find_spec(m) is not None
               for m in (case.needs or {}).get(impl, NEEDS.get(impl, ())))


def run_case(case, opts, tmp, sides=None):
    """Time every side of ``case``, ``opts.reps`` times each in fresh workers,
    in alternating order. ``sides``: label -> (impl, environment), by default
    each available implementation in this environment. Returns the row."""
    if sides is None:
        sides = {impl: (impl, None) for impl in case.impls if available(case, impl)}
    per_rep, reports, failed = {}, {}, {}
    labels = list(sides)
    for rep in range(opts.reps):
        for label in (labels if rep % 2 == 0 else labels[::-1]):
            if label in failed:
                continue
            impl, env = sides[label]
            path = os.path.join(tmp, f"{next(RESULTS)}.npz") if rep == 0 else None
            try:
                report = spawn(case, impl, opts, path, env)
            except WorkerError as e:
                failed[label] = str(e)
                continue
            if rep == 0:
                reports[label] = dict(report, result=path if os.path.exists(path) else None)
            for series, times in report["series"].items():
                key = label if series == impl else series
                per_rep.setdefault(key, []).append(times)
    row = {"case": case.name, "kind": case.kind, "failed": failed,
           "seconds": {}, "iqr_over_median": {}, "samples": per_rep}
    for key, reps in per_rep.items():
        row["seconds"][key] = float(np.median([np.median(r) for r in reps]))
        q = np.percentile(np.concatenate(reps), [25, 50, 75])
        row["iqr_over_median"][key] = float((q[2] - q[0]) / q[1])
    row["notes"] = {k: r["note"] for k, r in reports.items() if r.get("note")}
    row["fastgrad_at"] = {k: r["fastgrad"] for k, r in reports.items() if "fastgrad" in r}
    row["numpy_targets"] = {k: r["numpy_targets"] for k, r in reports.items()
                            if "numpy_targets" in r}
    row["torch_threads"] = {k: r["threads"] for k, r in reports.items() if "threads" in r}
    row["max_rel_diff"] = check(case, reports, sides)
    ratios(case, row)
    return row


def check(case, reports, sides):
    """label -> relative difference of its result from the reference's (or
    the worker's own check)."""
    ref = next((r for label, r in reports.items() if sides[label][0] == case.reference
                and r.get("result")), None)
    want = dict(np.load(ref["result"])) if ref else None
    diffs = {}
    for label, report in reports.items():
        if report.get("diff") is not None:
            diffs[label] = report["diff"]
        elif want is not None and report.get("result") and report is not ref:
            d = rel_diff(dict(np.load(report["result"])), want)
            if d is not None:
                diffs[label] = d
    return diffs


def ratios(case, row):
    t = row["seconds"]
    if case.kind == "monitor":
        if "with" in t and "without" in t:
            # samples taken side by side: the median of their ratios cancels drift
            with_, without = (np.concatenate(row["samples"][k]) for k in ("with", "without"))
            pairs = with_ / without
            row["monitor_overhead"] = float(np.median(pairs)) - 1
            row["monitor_added_seconds"] = row["monitor_overhead"] * t["without"]
        return
    base = t.get("fastgrad")
    if base is None:
        return
    row["over_fastgrad"] = {k: s / base for k, s in t.items() if k != "fastgrad"}
    if case.kind == "copy":
        n = case.args[0]
        row["gbps"] = {k: (COPY_BYTES if k == "copy" else ADAM_BYTES) * n / s / 1e9
                       for k, s in t.items()}


# -- the report -------------------------------------------------------------------------
def fmt_seconds(s, sign=""):
    a = abs(s)
    unit, v = ("s", s) if a >= 1 else ("ms", s * 1e3) if a >= 1e-3 else ("us", s * 1e6)
    return (f"{v:{sign}.3g}" if abs(v) < 100 else f"{v:{sign}.0f}") + f" {unit}"


def fmt_time(row, impl):
    mark = "~" if row["iqr_over_median"][impl] > NOISY else " "
    return fmt_seconds(row["seconds"][impl]) + mark


def cells(row):
    """(header, text) of each column of the row's table."""
    t, out = row["seconds"], [("case", row["case"].ljust(26))]
    if row["kind"] == "monitor":
        if "monitor_overhead" in row:
            out += [("without", fmt_time(row, "without")), ("with", fmt_time(row, "with")),
                    ("overhead", f"{row['monitor_overhead']:+.1%}"),
                    ("added", fmt_seconds(row["monitor_added_seconds"], "+"))]
        return out
    if "fastgrad" not in t:
        return out
    over = row["over_fastgrad"]
    out.append(("fastgrad", fmt_time(row, "fastgrad")))
    if "numpy" in t:
        out += [("numpy", fmt_time(row, "numpy")), ("np/fg", f"{over['numpy']:.2f}x")]
    if row["kind"] == "gemm" and "gemm" in t:
        out += [("GEMMs", fmt_time(row, "gemm")), ("fg/GEMM", f"{1 / over['gemm']:.2f}")]
        if "gemm_write" in t:
            out += [("GEMMs+w", fmt_time(row, "gemm_write")),
                    ("fg/G+w", f"{1 / over['gemm_write']:.2f}")]
    elif row["kind"] == "copy" and "copy" in t:
        gbps = row["gbps"]
        out += [("copy", fmt_time(row, "copy"))]
        out += [(f"{k} GB/s", f"{gbps[k]:.1f}") for k in ("copy", "fastgrad", "numpy") if k in gbps]
        out += [("fg/copy", f"{gbps['fastgrad'] / gbps['copy']:.2f}")]
    for impl, short in PEERS:
        if impl in t:
            out += [(short, fmt_time(row, impl)), (f"{short}/fg", f"{over[impl]:.2f}x")]
            if impl == "torch" and "gbps" in row:
                out += [("torch GB/s", f"{row['gbps']['torch']:.1f}")]
    named = {"fastgrad", "numpy", "gemm", "gemm_write", "copy"} | {i for i, _ in PEERS}
    for impl in (k for k in t if k not in named):  # sides of cases from other modules
        out += [(impl, fmt_time(row, impl)), (f"{impl}/fg", f"{over[impl]:.2f}x")]
    if row["notes"].get("fastgrad"):
        out.append(("fastgrad call", row["notes"]["fastgrad"]))
    return out


def join_cells(texts, width):
    return "  ".join(t.rjust(w) if i else t.ljust(w) for i, (t, w) in enumerate(zip(texts, width)))


def print_row(row, pairs, head, tolerance):
    width = [max(len(h), len(t), 9) for h, t in pairs]
    if head:
        print("\n" + join_cells([h for h, _ in pairs], width))
    line = join_cells([t for _, t in pairs], width)
    for label, d in row["max_rel_diff"].items():
        if not d <= tolerance:
            line += f"  ! {label}'s result differs by {d:.1e}"
    for label, err in row["failed"].items():
        line += f"  ({label} failed: {err})"
    print(line, flush=True)


def versions():
    out = {}
    for name in ("torch", "jax", "jaxlib", "optax", "onnx", "onnxruntime"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "(not installed)"
    return out


def blas(module):
    try:
        info = module.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{info['name']} {info['version']}"
    except (AttributeError, KeyError, TypeError, ValueError):  # layouts vary by release
        return "unknown"


def environment():
    import scipy
    fg = fastgrad()
    env = {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
           "fastgrad": f"{fg.__version__} at {os.path.dirname(fg.__file__)}",
           "numpy BLAS": blas(np), "scipy BLAS (fastgrad's)": blas(scipy), **versions(),
           "cpu_count": os.cpu_count(), "load average (1 min)": round(os.getloadavg()[0], 2)}
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        env[var] = os.environ.get(var, "(unset)")
    return env


# -- --isa: the AVX2 and baseline x86-64 builds -----------------------------------------
BUILDS = (("avx512", ""), ("avx2", "-march=x86-64-v3 -DFG_NO_CLONES"),
          ("x86-64", "-march=x86-64 -DFG_NO_CLONES"))
# NumPy's CPU features (its names) that each build's instruction set has:
# NumPy's dispatch targets outside the set are disabled in the workers that
# time NumPy for that build (None: NumPy unrestricted). x86-64 has none of
# NumPy's dispatch targets; NumPy's baseline (X86_V2 in NumPy 2) cannot be
# disabled, so that NumPy is a step above the baseline build.
ISA_FEATURES = {
    "avx512": None,
    "avx2": {"SSE", "SSE2", "SSE3", "SSSE3", "SSE41", "POPCNT", "SSE42", "X86_V2", "AVX",
             "F16C", "FMA3", "AVX2", "X86_V3"},
    "x86-64": {"SSE", "SSE2", "SSE3"},
}


def numpy_umath():
    """NumPy's compiled core, which names its CPU features (None if not found)."""
    for name in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def numpy_targets():
    """The names of NumPy's run-time dispatch targets that are on in this
    process (after NPY_DISABLE_CPU_FEATURES), or None where NumPy does not
    say."""
    umath = numpy_umath()
    dispatch = getattr(umath, "__cpu_dispatch__", None)
    features = getattr(umath, "__cpu_features__", None)
    if dispatch is None or features is None:
        return None
    return [name for name in dispatch if features.get(name)]


def numpy_limits():
    """build label -> the NumPy dispatch targets to disable for it (only the
    builds whose instruction set leaves some out); exits where NumPy cannot
    be told."""
    dispatch = getattr(numpy_umath(), "__cpu_dispatch__", None)
    if dispatch is None or numpy_targets() is None:
        raise SystemExit("--isa: this NumPy does not report its dispatch targets, so "
                         "it cannot be held to each build's instruction set")
    limits = {}
    for label, allowed in ISA_FEATURES.items():
        if allowed is not None:
            off = [name for name in dispatch if name not in allowed]
            if off:
                limits[label] = off
    return limits


def limited_numpy_env(off):
    """The environment of a worker whose NumPy leaves out the dispatch
    targets ``off``; checked first in a process of its own, where NumPy's
    warnings about the variable (names it does not know) are errors and
    the targets left on must be exactly those expected."""
    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES=" ".join(off))
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import run; "
            "print(json.dumps(run.numpy_targets()))")
    proc = subprocess.run([sys.executable, "-W", "error::ImportWarning", "-c", code,
                           os.path.dirname(os.path.abspath(__file__))],
                          check=False, capture_output=True, text=True, env=env)
    if proc.returncode:  # NumPy's message is its last lines
        tail = " ".join(proc.stderr.strip().splitlines()[-3:]) or "(no output)"
        raise SystemExit(f"NPY_DISABLE_CPU_FEATURES={env['NPY_DISABLE_CPU_FEATURES']!r} "
                         f"failed: {tail}")
    on = json.loads(proc.stdout.strip().splitlines()[-1])
    if set(on) & set(off):
        raise SystemExit(f"NPY_DISABLE_CPU_FEATURES={env['NPY_DISABLE_CPU_FEATURES']!r} "
                         f"took no effect: {' '.join(set(on) & set(off))} still on")
    return env, on


def build(label, cflags, tmp):
    """Build the extension from this checkout with ``cflags`` into
    tmp/label, next to a copy of the package's Python files; return the
    folder to put on PYTHONPATH."""
    lib, temp = os.path.join(tmp, label, "lib"), os.path.join(tmp, label, "temp")
    shutil.copytree(os.path.join(ROOT, "fastgrad"), os.path.join(lib, "fastgrad"),
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c", "__pycache__"))
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", lib,
                           "--build-temp", temp], check=False, cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, CFLAGS=cflags))
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise SystemExit(f"{tail}\nthe {label} build failed (CFLAGS={cflags!r})")
    return lib


def numpy_for(label, t):
    """The NumPy side timed for ``label``'s instruction set (the unrestricted
    one where that build's set needs no limit)."""
    own = f"numpy@{label}"
    return own if own in t else "numpy"


def isa_cells(row):
    t, out = row["seconds"], [("case", row["case"].ljust(26))]
    elements = math.prod(row["shape"])
    numpys = ["numpy"] + [f"numpy@{label}" for label, _ in BUILDS if f"numpy@{label}" in t]
    for label in (*numpys, *(label for label, _ in BUILDS)):
        if label in t:  # the limited NumPys: per element only, to keep the table narrow
            if "@" not in label:
                out.append((label, fmt_time(row, label)))
            out.append((f"{label} ns/el", f"{t[label] / elements * 1e9:.2f}"))
    for label, _ in BUILDS:
        if label in t and "numpy" in t:
            out.append((f"np(all)/{label}", f"{t['numpy'] / t[label]:.2f}x"))
        same = numpy_for(label, t)
        if label in t and same != "numpy":
            out.append((f"np(isa)/{label}", f"{t[same] / t[label]:.2f}x"))
    for label, _ in BUILDS[1:]:
        if label in t and "avx512" in t:
            out.append((f"{label}/512", f"{t[label] / t['avx512']:.2f}"))
    return out


def run_isa(cases, opts, tmp):
    if not os.path.exists(os.path.join(ROOT, "setup.py")):
        raise SystemExit("--isa builds the extension from a checkout; none found at " + ROOT)
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    if " avx512f" not in flags:
        print("warning: this CPU lacks AVX-512; the 'avx512' column is the default build")
    sides = {"numpy": ("numpy", None)}
    expected = {"numpy": numpy_targets()}
    print(f"numpy: dispatch targets on: {' '.join(expected['numpy']) or '(none)'}")
    for label, off in numpy_limits().items():
        env, on = limited_numpy_env(off)
        sides[f"numpy@{label}"] = ("numpy", env)
        expected[f"numpy@{label}"] = on
        print(f"numpy@{label}: NPY_DISABLE_CPU_FEATURES={env['NPY_DISABLE_CPU_FEATURES']!r}; "
              f"dispatch targets on: {' '.join(on) or '(none: its baseline only)'}")
    for label, cflags in BUILDS:
        print(f"building the {label} extension (CFLAGS={cflags!r}) ...", flush=True)
        path = build(label, cflags, tmp)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [path] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        sides[label] = ("fastgrad", env)
    rows = []
    for case in cases:
        if case.kind != "act":
            continue
        row = run_case(case, opts, tmp, sides)
        for label, _ in BUILDS:  # each worker must have imported its own build
            at = row["fastgrad_at"].get(label, "")
            if at and not at.startswith(os.path.join(tmp, label) + os.sep):
                raise SystemExit(f"the {label} worker imported fastgrad from {at}")
        for label, want in expected.items():  # and each NumPy its own targets
            got = row["numpy_targets"].get(label, want)
            if got != want:
                raise SystemExit(f"the {label} worker's NumPy had dispatch targets "
                                 f"{got} on, not {want}")
        row["shape"] = case.args[1:3]
        rows.append(row)
        pairs = isa_cells(row)
        print_row(row, pairs, len(rows) == 1, case.tolerance)
    return rows


# -- main -------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer, shorter repetitions (about 2 min on 2 idle cores)")
    ap.add_argument("--only", default="",
                    help="run only the cases whose name contains this (or one of these, "
                         "separated by commas)")
    ap.add_argument("--json", metavar="PATH", help="also write the results to PATH")
    ap.add_argument("--isa", action="store_true",
                    help="time the act cases with the default, AVX2 and baseline x86-64 builds")
    ap.add_argument("--reps", type=int, help="fresh workers per implementation and case")
    ap.add_argument("--extra", action="append", default=[], metavar="MODULE",
                    help="also run the CASES of this module (repeatable)")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--target", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--settle", type=float, default=SETTLE, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    cases = all_cases(opts.extra)
    if opts.worker:
        name, impl = opts.worker
        return worker(cases[name], impl, opts.samples, opts.target, opts.settle, opts.result)
    reps, opts.samples, opts.target = (1, 5, 0.01) if opts.quick else (5, 5, 0.04)
    opts.reps = opts.reps or reps
    env = environment()
    print("\n".join(f"{k:>24}: {v}" for k, v in env.items()))
    if env["load average (1 min)"] > 0.5:
        print("warning: other processes are using the CPUs; timings will be noisy")
    print(f"each implementation in {opts.reps} fresh processes, {opts.samples} samples of "
          f"~{opts.target * 1e3:.0f} ms each; median per call; "
          f"~ = interquartile range above {NOISY:.0%} of the median")
    wanted = opts.only.split(",")
    chosen = [c for c in cases.values() if any(w in c.name for w in wanted)]
    with tempfile.TemporaryDirectory(prefix="fastgrad-bench-") as tmp:
        if opts.isa:
            rows = run_isa(chosen, opts, tmp)
        else:
            rows, head = [], None
            for case in chosen:
                row = run_case(case, opts, tmp)
                rows.append(row)
                pairs = cells(row)
                print_row(row, pairs, [h for h, _ in pairs] != head, case.tolerance)
                head = [h for h, _ in pairs]
    if opts.json:
        for row in rows:
            row.pop("fastgrad_at", None)
        with open(opts.json, "w") as f:
            json.dump({"environment": env, "quick": opts.quick, "reps": opts.reps,
                       "samples": opts.samples, "target_seconds": opts.target,
                       "isa": opts.isa, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
