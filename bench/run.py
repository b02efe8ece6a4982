"""fastgrad benchmarks: the compiled kernels against plain NumPy (and PyTorch).

Cases, all float32. dense/ACT/BxIxO: one Dense layer forward + backward (dx, dW,
db), ops.dense_forward + ops.dense_backward into preallocated outputs vs NumPy as
written by hand (x @ W + b, activation, derivative, x.T @ dz, dz.sum(0), dz @ W.T).
train/B: one step of a 784-256-256-10 ReLU MLP with softmax cross-entropy on
integer labels and SGD(0.01), model.train_on_batch vs the same step in NumPy.
adam/N: one Adam step with global_clipnorm=1.0 over N parameters, Adam.apply() on
flat buffers vs NumPy (np.linalg.norm, scale, Adam with temporaries).

Columns: median seconds per call; np/fg = NumPy / fastgrad (> 1: fastgrad faster);
GEMMs = the gemm calls fastgrad makes (fastgrad._core.matmul, same BLAS) timed
alone; fg/GEMM = fastgrad / GEMMs (1.0: nothing but BLAS). adam's GB/s counts 32
bytes per parameter for every implementation (grads read twice; params, m, v read
and written); copy = np.copyto of N float32 at 8 bytes each (write-allocate reads
uncounted, so fg/copy can exceed 1). Each implementation is warmed up, then timed
in samples of repeated calls lasting about a target time, in alternating blocks;
"~" marks an interquartile range above 10% of the median. Thread settings are
left as found and printed. If torch imports, adam gets torch columns
(clip_grad_norm_ + Adam(fused=True), or foreach where fused is missing).

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


def measure(impls, reps, target, rounds):
    """name -> (median seconds per call, interquartile range / median) over
    ``reps`` samples of each callable in ``impls``."""
    once = {}
    for name, fn in impls.items():
        fn()
        once[name] = max(sample(fn, 1), 1e-7)
    samples = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            sample(fn, math.ceil(SETTLE / once[name]))
            loops = max(1, round(target / once[name]))
            samples[name] += [sample(fn, loops) for _ in range(math.ceil(reps / rounds))]
    quartiles = {name: np.percentile(s, [25, 50, 75]) for name, s in samples.items()}
    return {name: (float(q[1]), float((q[2] - q[0]) / q[1])) for name, q in quartiles.items()}


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
    model = fg.Sequential([fg.layers.Dense(SIZES[1], "relu", input_dim=SIZES[0]),
                           fg.layers.Dense(SIZES[2], "relu"),
                           fg.layers.Dense(SIZES[3], "softmax")], seed=0)
    model.compile(optimizer=fg.optimizers.SGD(learning_rate=LR),
                  loss="sparse_categorical_crossentropy")
    weights = model.get_weights()  # W1, b1, W2, b2, W3, b3
    np_step = numpy_train_step(x, labels, [w.copy() for w in weights])
    impls = {"fastgrad": lambda: model.train_on_batch(x, labels), "numpy": np_step,
             "gemm": gemm_calls(train_gemms(x, weights))}
    loss = np_step()
    return impls, abs(impls["fastgrad"]() - loss) / loss


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


# -- the case table and the report ------------------------------------------------
# (name, floor: "gemm" or "copy", make, args). make returns the callables by
# implementation and the relative difference of fastgrad's result from NumPy's.
CASES = ([(f"dense/{act}/{b}x{i}x{o}", "gemm", dense_case, (b, i, o, act))
          for act in ("relu", "sigmoid")
          for b, i, o in ((32, 784, 256), (256, 784, 256), (1024, 1024, 1024))]
         + [(f"train/{b}", "gemm", train_case, (b,)) for b in (32, 256, 1024)]
         + [(f"adam/{label}", "copy", adam_case, (n,))
            for label, n in (("100K", 10 ** 5), ("1M", 10 ** 6), ("10M", 10 ** 7))])


def run_case(name, floor, make, args, reps, target, rounds):
    impls, diff = make(*args)
    timed = measure(impls, reps, target, rounds)
    t = {k: v[0] for k, v in timed.items()}
    row = {"case": name, "floor": floor, "seconds": t, "max_rel_diff": diff,
           "iqr_over_median": {k: v[1] for k, v in timed.items()},
           "numpy_over_fastgrad": t["numpy"] / t["fastgrad"]}
    if floor == "gemm":
        row["fastgrad_over_gemm"] = t["fastgrad"] / t["gemm"]
    else:
        row["gbps"] = {k: (COPY_BYTES if k == "copy" else ADAM_BYTES) * args[0] / s / 1e9
                       for k, s in t.items()}
        row["fastgrad_over_copy_bandwidth"] = row["gbps"]["fastgrad"] / row["gbps"]["copy"]
    if "torch" in t:
        row["torch_over_fastgrad"] = t["torch"] / t["fastgrad"]
    return row


def fmt_time(row, impl):
    s = row["seconds"][impl]
    unit, v = ("s", s) if s >= 1 else ("ms", s * 1e3) if s >= 1e-3 else ("us", s * 1e6)
    mark = "~" if row["iqr_over_median"][impl] > NOISY else " "
    return (f"{v:.3g}" if v < 100 else f"{v:.0f}") + f" {unit}{mark}"


def cells(row):
    """(header, text) of each column of the row's table."""
    out = [("case", row["case"].ljust(26)), ("fastgrad", fmt_time(row, "fastgrad")),
           ("numpy", fmt_time(row, "numpy")), ("np/fg", f"{row['numpy_over_fastgrad']:.2f}x")]
    if row["floor"] == "gemm":
        out += [("GEMMs", fmt_time(row, "gemm")), ("fg/GEMM", f"{row['fastgrad_over_gemm']:.2f}")]
    else:
        out += [("copy", fmt_time(row, "copy"))]
        out += [(f"{k} GB/s", f"{row['gbps'][k]:.1f}") for k in ("copy", "fastgrad", "numpy")]
        out += [("fg/copy", f"{row['fastgrad_over_copy_bandwidth']:.2f}")]
    if "torch" in row["seconds"]:
        out += [("torch", fmt_time(row, "torch")),
                ("torch/fg", f"{row['torch_over_fastgrad']:.2f}x"),
                ("torch GB/s", f"{row['gbps']['torch']:.1f}")]
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
            head = not rows or rows[-1]["floor"] != floor
            rows.append(run_case(name, floor, make, args, reps, target, rounds))
            print_row(rows[-1], head)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"environment": env, "quick": opts.quick, "samples": reps,
                       "target_seconds": target, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
