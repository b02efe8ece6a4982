"""Activation speed of fastgrad built for each x86-64 instruction-set level.

    python bench/isa.py                  # baseline, x86-64-v3 and the default build
    python bench/isa.py --levels x86-64-v3 --reps 5

Builds the extension into temporary folders, once per level: ``x86-64``
(SSE2 only) and ``x86-64-v3`` (AVX2) with ``CFLAGS="-march=LEVEL
-DFG_NO_CLONES"``, and ``default`` (no CFLAGS: the AVX-512/AVX2/baseline
clones, the loader picking one for this CPU). Each build is then timed in a
process of its own: every activation's forward and backward over a 256x4096
float32 batch (fastgrad.ops.activation_forward + activation_backward into
preallocated outputs), and softmax alone at 10 and 1000 classes, against
NumPy/SciPy doing the same work in the same process. Samples of the two
alternate, and the ratio printed is of their medians, so that a machine
busy with other work slows both alike. Needs NumPy, SciPy, Cython and a C
compiler.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEVELS = {"x86-64": "-march=x86-64 -DFG_NO_CLONES",
          "x86-64-v3": "-march=x86-64-v3 -DFG_NO_CLONES",
          "default": None}
ACTIVATIONS = ["relu", "leaky_relu", "elu", "selu", "gelu", "silu", "sigmoid", "tanh",
               "softmax"]
SHAPE = (256, 4096)
SOFTMAX_SHAPES = [(4096, 10), (1024, 1000)]
ALPHA = {"leaky_relu": 0.2, "elu": 1.0}


# -- the work, in NumPy/SciPy ----------------------------------------------------
def numpy_pass(name, z, dy, y, dz, np, special):
    """y = act(z) and dz = dy * act'(z), into y and dz where NumPy allows."""
    if name == "relu":
        np.maximum(z, 0, out=y)
        np.multiply(dy, z > 0, out=dz)
    elif name == "leaky_relu":
        pos = z > 0
        np.copyto(y, np.where(pos, z, ALPHA[name] * z))
        np.copyto(dz, np.where(pos, dy, ALPHA[name] * dy))
    elif name in ("elu", "selu"):
        alpha, scale = ((ALPHA["elu"], 1.0) if name == "elu" else
                        (1.6732632423543772, 1.0507009873554805))
        pos = z > 0
        np.copyto(y, scale * np.where(pos, z, alpha * np.expm1(np.minimum(z, 0))))
        np.copyto(dz, dy * np.where(pos, scale, y + scale * alpha))
    elif name == "gelu":
        cdf = special.ndtr(z)
        np.multiply(z, cdf, out=y)
        np.copyto(dz, dy * (cdf + z * np.exp(-0.5 * z * z) * 0.3989422804014327))
    elif name == "silu":
        s = special.expit(z)
        np.multiply(z, s, out=y)
        np.copyto(dz, dy * (s * (1 + z * (1 - s))))
    elif name == "sigmoid":
        special.expit(z, out=y)
        np.copyto(dz, dy * y * (1 - y))
    elif name == "tanh":
        np.tanh(z, out=y)
        np.copyto(dz, dy * (1 - y * y))
    elif name == "softmax":
        numpy_softmax(z, y, np)
        if dz is not None:
            np.copyto(dz, y * (dy - (dy * y).sum(1, keepdims=True)))
    else:
        raise ValueError(name)


def numpy_softmax(z, y, np):
    np.subtract(z, z.max(1, keepdims=True), out=y)
    np.exp(y, out=y)
    y /= y.sum(1, keepdims=True)


# -- timing, in a process per build ------------------------------------------------
def median_pair(a, b, reps):
    """Medians of ``reps`` alternating samples of a() and b(), each sample
    long enough (about 20 ms) to dwarf the clock."""
    def loops(fn):
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 0.02:
            fn()
            n += 1
        return max(n, 1)

    na, nb = loops(a), loops(b)
    sa, sb = [], []
    for _ in range(reps):
        for fn, n, out in ((a, na, sa), (b, nb, sb)):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            out.append((time.perf_counter() - t0) / n)
    sa.sort()
    sb.sort()
    return sa[len(sa) // 2], sb[len(sb) // 2]


def worker(reps):
    import numpy as np
    from scipy import special

    import fastgrad as fg

    rng = np.random.default_rng(0)
    rows = []

    def case(label, name, shape, backward):
        z = rng.standard_normal(shape, dtype=np.float32) * 3
        dy = rng.standard_normal(shape, dtype=np.float32)
        y, dz, y2, dz2 = (np.empty_like(z) for _ in range(4))
        alpha = ALPHA.get(name)

        def fastgrad():
            fg.ops.activation_forward(z, name, out=y, alpha=alpha)
            if backward:
                fg.ops.activation_backward(dy, y, name, x=z, alpha=alpha, dx=dz)

        def numpy():
            numpy_pass(name, z, dy, y2, dz2 if backward else None, np, special)

        fastgrad()
        numpy()
        tf, tn = median_pair(fastgrad, numpy, reps)
        rows.append({"case": label, "fastgrad": tf, "numpy": tn,
                     "ns_per_element": tf / z.size * 1e9})

    for name in ACTIVATIONS:
        case(f"{name} fwd+bwd {SHAPE[0]}x{SHAPE[1]}", name, SHAPE, True)
    for shape in SOFTMAX_SHAPES:
        case(f"softmax fwd {shape[0]}x{shape[1]}", "softmax", shape, False)
        case(f"softmax fwd+bwd {shape[0]}x{shape[1]}", "softmax", shape, True)
    print(json.dumps(rows))


# -- builds ------------------------------------------------------------------------
def build(level, cflags, where):
    """fastgrad built with ``cflags`` into ``where``: the package's Python
    files copied, the extension compiled there."""
    pkg = where / "fastgrad"
    shutil.copytree(ROOT / "fastgrad", pkg,
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "_core.c", "__pycache__"))
    env = dict(os.environ)
    env.pop("CFLAGS", None)
    if cflags:
        env["CFLAGS"] = cflags
    log = where / "build.log"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(where),
                               "--build-temp", str(where / "tmp"), "--force"],
                              cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        sys.exit(f"building {level} failed; see {log}")


def run_level(level, where, reps):
    env = dict(os.environ, PYTHONPATH=str(where))
    done = subprocess.run([sys.executable, __file__, "--worker", "--reps", str(reps)],
                          env=env, capture_output=True, text=True, cwd=where, check=False)
    if done.returncode:
        sys.exit(f"timing {level} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default=",".join(LEVELS),
                    help="comma-separated, from: " + ", ".join(LEVELS))
    ap.add_argument("--reps", type=int, default=7, help="samples per case (median taken)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.reps)
    levels = [lv for lv in args.levels.split(",") if lv]
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown:
        ap.error(f"--levels: unknown {unknown}; expected some of {list(LEVELS)}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="fastgrad-isa-") as tmp:
        for level in levels:
            where = Path(tmp) / level
            where.mkdir()
            print(f"building {level} ...", file=sys.stderr, flush=True)
            build(level, LEVELS[level], where)
            print(f"timing {level} ...", file=sys.stderr, flush=True)
            results[level] = run_level(level, where, args.reps)
    print("median seconds per call; fg/np < 1 means fastgrad is faster; "
          "fg/default compares builds (separate processes)")
    print(f"{'case':<30} {'level':<10} {'fastgrad':>10} {'numpy':>10} {'fg/np':>6} "
          f"{'ns/elem':>8} {'fg/default':>10}")
    for k, row in enumerate(results[levels[0]]):
        for level in levels:
            r = results[level][k]
            ref = results.get("default")
            vs = f"{r['fastgrad'] / ref[k]['fastgrad']:.2f}" if ref else ""
            print(f"{row['case']:<30} {level:<10} {r['fastgrad'] * 1e3:>8.3f}ms "
                  f"{r['numpy'] * 1e3:>8.3f}ms {r['fastgrad'] / r['numpy']:>6.2f} "
                  f"{r['ns_per_element']:>8.2f} {vs:>10}")


if __name__ == "__main__":
    main()
