"""Contracts of fastgrad.ops beyond the values of the kernels.

1. The optimizer step functions (sgd_step, rmsprop_step, adam_step,
   adagrad_step) update the caller's arrays in place, match a float64 NumPy
   implementation of the documented formula over several steps, and
   allocate nothing the size of the parameters.
2. Outputs that partially overlap an input are refused, by name, with the
   message; an output that is exactly its input stays allowed.
3. The compiled layer: one table of codes, a message per failure, and a
   StepConfig that checks its settings and follows an optimizer's.
"""
import ast
import re
import tracemalloc
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import _core, ops

F32, F64 = np.float32, np.float64
DTYPES = [F32, F64]
DTYPE_IDS = ["f32", "f64"]
# float64 reference from the same rounded inputs, several steps: a few ulp
# of the computation's dtype per step, relative to the size of the values
RTOL = {F32: 2e-6, F64: 1e-13}


def _close(got, want, dt, what):
    want = np.asarray(want, F64)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got.astype(F64) - want).max()) / scale
    assert err <= 4 * RTOL[dt], f"{what}: max error {err:.3g} relative to {scale:.3g}"


# ---------------------------------------------------------------------------
# 1. optimizer steps
# ---------------------------------------------------------------------------

OFFSETS = [0, 7, 20, 33]   # three tensors, for clipnorm


def _clip(g, offsets, clipnorm=None, global_clipnorm=None, clipvalue=None):
    g = g.copy()
    if clipnorm is not None:
        for a, b in pairwise(offsets):
            n = np.sqrt(np.sum(g[a:b] ** 2))
            if n > clipnorm:
                g[a:b] *= clipnorm / n
    elif global_clipnorm is not None:
        n = np.sqrt(np.sum(g ** 2))
        if n > global_clipnorm:
            g *= global_clipnorm / n
    elif clipvalue is not None:
        g = np.clip(g, -clipvalue, clipvalue)
    return g


def ref_sgd(w, g, s, lr, momentum, nesterov, wd):
    w = w * (1 - lr * wd)
    if momentum == 0:
        return w - lr * g, s
    s = momentum * s - lr * g
    return (w + momentum * s - lr * g if nesterov else w + s), s


def ref_rmsprop(w, g, s, lr, rho, momentum, eps, centered, wd):
    v, m, mb = s
    w = w * (1 - lr * wd)
    v = rho * v + (1 - rho) * g * g
    if centered:
        m = rho * m + (1 - rho) * g
        d = v - m * m + eps
    else:
        d = v + eps
    u = lr * g / np.sqrt(d)
    if momentum:
        mb = momentum * mb + u
        u = mb
    return w - u, (v, m, mb)


def ref_adam(w, g, s, lr, b1, b2, eps, amsgrad, wd, t):
    m, v, vmax = s
    w = w * (1 - lr * wd)
    m = m + (1 - b1) * (g - m)
    v = v + (1 - b2) * (g * g - v)
    if amsgrad:
        vmax = np.maximum(vmax, v)
    d = vmax if amsgrad else v
    return w - lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(d) + eps), (m, v, vmax)


def ref_adagrad(w, g, a, lr, eps, wd):
    w = w * (1 - lr * wd)
    a = a + g * g
    return w - lr * g / np.sqrt(a + eps), a


CASES = {
    "sgd": {"momentum": 0.0, "nesterov": False},
    "sgd-momentum": {"momentum": 0.9, "nesterov": False},
    "sgd-nesterov": {"momentum": 0.9, "nesterov": True},
    "rmsprop": {"momentum": 0.0, "centered": False},
    "rmsprop-centered-momentum": {"momentum": 0.5, "centered": True},
    "adam": {"amsgrad": False},
    "adam-amsgrad": {"amsgrad": True},
    "adagrad": {},
}
CLIPS = {"none": {}, "clipnorm": {"clipnorm": 0.8}, "global": {"global_clipnorm": 1.5},
         "clipvalue": {"clipvalue": 0.3}, "decay": {"weight_decay": 0.05}}


def _run(case, params, grads_list, state, clip, dt):
    """Steps the caller's arrays with ops, returns the reports."""
    kind = case.split("-")[0]
    kw = dict(CASES[case])
    reports = []
    for t, g in enumerate(grads_list, start=1):
        common = {"offsets": OFFSETS, **clip}
        if kind == "sgd":
            reports.append(ops.sgd_step(params, g, 0.1, velocity=state[0] if kw["momentum"]
                                        else None, step=t, **kw, **common))
        elif kind == "rmsprop":
            v, m, mb = state
            reports.append(ops.rmsprop_step(params, g, v, 0.01, rho=0.8, epsilon=1e-6,
                                            m=m if kw["centered"] else None,
                                            momentum_buffer=mb if kw["momentum"] else None,
                                            step=t, **kw, **common))
        elif kind == "adam":
            m, v, vmax = state
            reports.append(ops.adam_step(params, g, m, v, t, 0.01, beta_1=0.8, beta_2=0.9,
                                         epsilon=1e-6, vmax=vmax if kw["amsgrad"] else None,
                                         **kw, **common))
        else:
            reports.append(ops.adagrad_step(params, g, state[0], 0.05, epsilon=1e-6, step=t,
                                            **common))
    return reports


def _reference(case, w, grads_list, state, clip):
    kind = case.split("-")[0]
    kw = dict(CASES[case])
    wd = clip.get("weight_decay", 0.0)
    clipping = {k: v for k, v in clip.items() if k != "weight_decay"}
    norms = []
    for t, g in enumerate(grads_list, start=1):
        g = g.astype(F64)
        norms.append([np.sqrt(np.sum(g[a:b] ** 2)) for a, b in pairwise(OFFSETS)])
        g = _clip(g, OFFSETS, **clipping)
        if kind == "sgd":
            w, s = ref_sgd(w, g, state[0], 0.1, kw["momentum"], kw["nesterov"], wd)
            state = (s,)
        elif kind == "rmsprop":
            w, state = ref_rmsprop(w, g, state, 0.01, 0.8, kw["momentum"], 1e-6,
                                   kw["centered"], wd)
        elif kind == "adam":
            w, state = ref_adam(w, g, state, 0.01, 0.8, 0.9, 1e-6, kw["amsgrad"], wd, t)
        else:
            w, a = ref_adagrad(w, g, state[0], 0.05, 1e-6, wd)
            state = (a,)
    return w, state, norms


def _state(case, n, dt, rng):
    kind = case.split("-")[0]
    if kind == "sgd":
        return (rng.standard_normal(n).astype(dt) * 0.1,)
    if kind == "adagrad":
        return (np.full(n, 0.1, dt),)
    # rmsprop (v, m, momentum buffer) and adam (m, v, vmax): v must stay
    # >= m^2 for the centered RMSprop, so start from m = 0
    a = np.abs(rng.standard_normal(n)).astype(dt) * 0.1
    return (a, np.zeros(n, dt), a.copy()) if kind == "rmsprop" else \
        (np.zeros(n, dt), a, a.copy())


@pytest.mark.parametrize("dt", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("case", list(CASES))
def test_step_functions_update_the_callers_arrays_as_the_formula_says(case, clip, dt):
    rng = np.random.default_rng(hash((case, clip)) % 2**32)
    n = OFFSETS[-1]
    params = rng.standard_normal(n).astype(dt)
    grads_list = [rng.standard_normal(n).astype(dt) for _ in range(3)]
    state = _state(case, n, dt, rng)
    w0, s0 = params.astype(F64), tuple(s.astype(F64) for s in state)
    ids = [id(params)] + [id(s) for s in state]
    grads_before = [g.copy() for g in grads_list]
    reports = _run(case, params, grads_list, state, CLIPS[clip], dt)
    want_w, want_s, want_norms = _reference(case, w0, grads_list, s0, CLIPS[clip])
    assert [id(params)] + [id(s) for s in state] == ids
    _close(params, want_w, dt, "params")
    kind = case.split("-")[0]
    used = {"sgd": [CASES[case].get("momentum", 0) != 0],
            "rmsprop": [True, CASES[case].get("centered"), CASES[case].get("momentum") != 0],
            "adam": [True, True, CASES[case].get("amsgrad")], "adagrad": [True]}[kind]
    for i, (got, want) in enumerate(zip(state, want_s)):
        if used[i]:   # the caller's buffer holds the new moment
            _close(got, want, dt, f"state {i}")
    for rep, norms in zip(reports, want_norms):
        _close(rep["grad_norms"], norms, dt, "grad_norms")
        assert not rep["nonfinite"] and rep["overflow"] is None
    for g, before in zip(grads_list, grads_before):
        assert np.array_equal(g, before), "grads changed"


@pytest.mark.parametrize("kind", ["sgd", "rmsprop", "adam", "adagrad"])
def test_step_functions_allocate_nothing_the_size_of_the_parameters(kind):
    n = 1_000_000
    rng = np.random.default_rng(1)
    params = rng.standard_normal(n).astype(F32)
    grads = rng.standard_normal(n).astype(F32)
    bufs = [np.zeros(n, F32) for _ in range(3)]
    calls = {
        "sgd": lambda: ops.sgd_step(params, grads, 0.01, momentum=0.9, velocity=bufs[0],
                                    clipnorm=1.0),
        "rmsprop": lambda: ops.rmsprop_step(params, grads, bufs[0], centered=True, m=bufs[1],
                                            momentum=0.5, momentum_buffer=bufs[2]),
        "adam": lambda: ops.adam_step(params, grads, bufs[0], bufs[1], 2, amsgrad=True,
                                      vmax=bufs[2], global_clipnorm=1.0),
        "adagrad": lambda: ops.adagrad_step(params, grads, bufs[0], clipvalue=0.5),
    }
    calls[kind]()   # warm up: first-call imports and caches
    tracemalloc.start()
    try:
        calls[kind]()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < params.nbytes / 100, f"peak {peak} bytes for {params.nbytes} of parameters"


def test_a_step_with_a_non_finite_gradient_changes_nothing():
    params, m, v = np.ones(6), np.full(6, 0.5), np.full(6, 0.25)
    g = np.ones(6)
    g[4] = np.nan
    rep = ops.adam_step(params, g, m, v, 1, offsets=[0, 3, 6])
    assert rep["nonfinite"] and rep["overflow"] is None
    assert np.array_equal(params, np.ones(6)) and np.array_equal(m, np.full(6, 0.5))
    assert np.array_equal(v, np.full(6, 0.25))


def test_step_functions_refuse_moments_sharing_memory():
    p, g = np.ones(8), np.ones(8)
    buf = np.zeros(16)
    with pytest.raises(ValueError, match="^v: overlaps an input"):
        ops.adam_step(p, g, buf[:8], buf[4:12], 1)
    with pytest.raises(ValueError, match="^velocity: overlaps an input"):
        ops.sgd_step(p, g, momentum=0.9, velocity=p)
    np.testing.assert_array_equal(p, 1.0)


# ---------------------------------------------------------------------------
# 2. overlapping outputs
# ---------------------------------------------------------------------------

B, F = 5, 6


def _shifted(rng, dt, by):
    """x (B, F) and a (B, F) view of the same memory shifted by `by` elements."""
    base = rng.standard_normal(B * F + F).astype(dt)
    return base[:B * F].reshape(B, F), base[by:by + B * F].reshape(B, F)


def _bn_backward_args(x, dt):
    _, mean, rstd = ops.batchnorm_forward(x.copy(), training=True)
    return mean, rstd


# name -> (call given (x, the shifted view), argument refused, input it overlaps)
PARTIAL = {
    "activation_forward/out": (lambda x, o: ops.activation_forward(x, "tanh", out=o), "out", "x"),
    "activation_forward/pre": (lambda x, o: ops.activation_forward(x, "gelu", pre=o), "pre", "x"),
    "activation_backward/dx-dout": (
        lambda x, o: ops.activation_backward(x, np.tanh(x), "tanh", dx=o), "dx", "dout"),
    "activation_backward/dx-out": (
        lambda x, o: ops.activation_backward(np.ones_like(x), x, "sigmoid", dx=o), "dx", "out"),
    "activation_backward/dx-x": (
        lambda x, o: ops.activation_backward(np.ones_like(x), np.ones_like(x), "silu", x=x, dx=o),
        "dx", "x"),
    "dropout/out": (lambda x, o: ops.dropout(x, 0.5, 3, out=o), "out", "x"),
    "batchnorm_forward/out": (lambda x, o: ops.batchnorm_forward(x, out=o), "out", "x"),
    "batchnorm_backward/dx": (
        lambda x, o: ops.batchnorm_backward(x, np.ones_like(x), *_bn_backward_args(x, x.dtype),
                                            dx=o), "dx", "dout"),
}


@pytest.mark.parametrize("dt", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("by", [1, F], ids=["one-element", "one-row"])
@pytest.mark.parametrize("case", list(PARTIAL))
def test_an_output_partially_overlapping_an_input_is_refused_by_name(case, by, dt):
    call, name, other = PARTIAL[case]
    x, shifted = _shifted(np.random.default_rng(2), dt, by)
    before = x.copy()
    msg = f"^{name}: overlaps {other} without being {other} itself"
    with pytest.raises(ValueError, match=msg):
        call(x, shifted)
    assert np.array_equal(x, before), "written before the refusal"


@pytest.mark.parametrize("dt", DTYPES, ids=DTYPE_IDS)
def test_an_output_that_is_its_input_stays_allowed_and_exact(dt):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((B, F)).astype(dt)
    for act in ("tanh", "gelu", "softmax"):
        a = x.copy()
        assert np.array_equal(ops.activation_forward(a, act, out=a), ops.activation_forward(x, act))
    a = x.copy()
    assert np.array_equal(ops.dropout(a, 0.4, 9, out=a), ops.dropout(x, 0.4, 9))
    a = x.copy()
    assert np.array_equal(ops.batchnorm_forward(a, out=a)[0], ops.batchnorm_forward(x)[0])
    mean, rstd = _bn_backward_args(x, dt)
    g = rng.standard_normal((B, F)).astype(dt)
    d = g.copy()
    assert np.array_equal(ops.batchnorm_backward(d, x, mean, rstd, dx=d)[0],
                          ops.batchnorm_backward(g, x, mean, rstd)[0])


def test_batchnorm_forward_refuses_an_output_over_its_parameters():
    x = np.ones((4, 3))
    gamma = np.ones(12)
    with pytest.raises(ValueError, match="^out: overlaps an input"):
        ops.batchnorm_forward(x, gamma=gamma[:3], out=gamma.reshape(4, 3))
    mm = np.zeros(6)
    with pytest.raises(ValueError, match="^moving_mean: overlaps an input"):
        ops.batchnorm_forward(x, moving_mean=mm[:3], moving_variance=mm[1:4])


MATMUL_DENSE = {
    "matmul out=a": (lambda a, b: ops.matmul(a, b, out=a), "out"),
    "matmul out=b": (lambda a, b: ops.matmul(a, b, out=b), "out"),
    "dense_forward out=x": (lambda a, b: ops.dense_forward(a, b, out=a), "out"),
    "dense_forward out=kernel": (lambda a, b: ops.dense_forward(a, b, out=b), "out"),
    "dense_forward pre=out": (lambda a, b: ops.dense_forward(a, b, out=np.empty_like(a),
                                                             pre=a), "pre"),
    "dense_backward dkernel=dout": (lambda a, b: ops.dense_backward(a, a, b, a, dkernel=a),
                                    "dkernel"),
    "dense_backward dx=x": (lambda a, b: ops.dense_backward(np.ones_like(a), a, b, a, dx=a), "dx"),
    "dense_backward dbias=kernel row": (
        lambda a, b: ops.dense_backward(np.ones_like(a), a, b, np.ones_like(a), dbias=b[0]),
        "dbias"),
    "dense_backward dx=dkernel": (
        lambda a, b: ops.dense_backward(np.ones_like(a), a.copy(), b, np.ones_like(a),
                                        dkernel=a, dx=a), "dkernel"),
}


@pytest.mark.parametrize("case", list(MATMUL_DENSE))
def test_matmul_and_dense_refuse_overlapping_outputs_by_name(case):
    call, name = MATMUL_DENSE[case]
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((6, 6)), rng.standard_normal((6, 6))
    a0, b0 = a.copy(), b.copy()
    with pytest.raises(ValueError, match=f"^{name}: overlaps an input; pass a separate array"):
        call(a, b)
    assert np.array_equal(a, a0) and np.array_equal(b, b0)


# ---------------------------------------------------------------------------
# 3. the compiled layer
# ---------------------------------------------------------------------------

def test_one_table_of_codes():
    assert {k: v[0] for k, v in ops.ACTIVATIONS.items()} == _core.ACTIVATION_CODES
    assert ops.LOSSES == _core.LOSS_CODES
    assert ops.NEEDS_PRE == {"gelu", "silu", "swish", "softplus", "softsign", "hard_silu",
                             "hard_swish", "mish"}
    for table in (_core.ACTIVATION_CODES, _core.LOSS_CODES, _core.OPTIMIZER_CODES,
                  _core.CONSTRAINT_CODES):
        assert sorted(table.values()) == list(range(len(table)))
    assert set(_core.OPTIMIZER_CODES) == {"sgd", "rmsprop", "adam", "adagrad", "nadam", "adamax",
                                          "adadelta", "lion"}
    assert set(_core.CONSTRAINT_CODES) == {None, "MaxNorm", "NonNeg", "ClipValue"}
    assert {type(c).__name__ for c in (fg.constraints.MaxNorm(), fg.constraints.NonNeg(),
                                       fg.constraints.ClipValue(1.0))} \
        == set(_core.CONSTRAINT_CODES) - {None}


def test_each_failure_has_its_own_message():
    x = np.ones((2, 3), F32)
    out = np.empty_like(x)
    n_act, n_loss = len(_core.ACTIVATION_CODES), len(_core.LOSS_CODES)
    with pytest.raises(ValueError, match=f"unknown activation code {n_act}"):
        _core.bias_act_forward(x, None, out, None, n_act, 0.0)
    with pytest.raises(ValueError, match=f"unknown loss code {n_loss}"):
        _core.loss_forward_backward(x, x, None, None, None, None, n_loss, False, 1.0)
    sparse = _core.LOSS_CODES["sparse_categorical_crossentropy"]
    with pytest.raises(ValueError, match=r"^y: a label is outside \[0, number of classes\)"):
        _core.loss_forward_backward(x, None, np.array([0, 3], np.int64), None, None, None,
                                    sparse, False, 1.0)
    with pytest.raises(ValueError, match="^pre: this activation's derivative needs"):
        _core.act_backward(x, x, None, out, None, _core.ACTIVATION_CODES["gelu"], 0.0)
    n_opt = len(_core.OPTIMIZER_CODES)
    with pytest.raises(ValueError, match=f"^kind: unknown optimizer code {n_opt}"):
        _core.StepConfig(n_opt)


@pytest.mark.parametrize("kw, match", [
    ({"momentum": 1.0}, "^momentum: expected a value in"),
    ({"rho": -0.1}, "^rho: expected a value in"),
    ({"beta_2": float("nan")}, "^beta_2: expected a value in"),
    ({"epsilon": 0.0}, "^epsilon: expected a positive number"),
    ({"weight_decay": float("inf")}, "^weight_decay: expected a finite number"),
    ({"clipnorm": 1.0, "clipvalue": 1.0}, "only one of them"),
])
def test_step_config_checks_its_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        _core.StepConfig(_core.OPTIMIZER_CODES["adam"], **{"epsilon": 1e-7, **kw})


def test_step_config_refuses_a_learning_rate_that_is_not_finite():
    params, grads, m, v = np.ones(4), np.ones(4), np.zeros(4), np.zeros(4)
    table = _core.TensorTable(np.array([0, 4], np.int64), np.zeros(1), np.zeros(1), np.ones(1),
                              np.zeros(1, np.intc), np.zeros(1), np.zeros(1, np.int64))
    cfg = _core.StepConfig(_core.OPTIMIZER_CODES["adam"], beta_1=0.9, beta_2=0.999,
                           epsilon=1e-7)
    for lr in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="^learning_rate: expected a finite number"):
            _core.optimizer_step(params, m, v, None, grads, table, cfg, lr, 1)
    assert np.array_equal(params, np.ones(4))


@pytest.mark.parametrize("name, value", [("momentum", 0.5), ("nesterov", True),
                                         ("clipnorm", 0.01), ("weight_decay", 0.1)])
def test_a_setting_changed_after_build_reaches_the_compiled_step(name, value):
    def run(make, change=None):
        model = fg.Sequential([fg.layers.Dense(3, input_dim=4)], seed=0)
        model.compile(make(), "mse")
        model.build()
        if change:
            setattr(model.optimizer, *change)
        for _ in range(2):   # the second step reads the momentum
            model.train_on_batch(np.ones((8, 4), F32), np.zeros((8, 3), F32))
        return model.get_weights()

    base = {"learning_rate": 0.1, "momentum": 0.9}
    changed = run(lambda: fg.optimizers.SGD(**base), (name, value))
    fresh = run(lambda: fg.optimizers.SGD(**{**base, name: value}))
    stale = run(lambda: fg.optimizers.SGD(**base))
    assert all(np.array_equal(a, b) for a, b in zip(changed, fresh))
    assert not all(np.array_equal(a, b) for a, b in zip(changed, stale))


def _pyx_signatures():
    """{name: [argument names]} of the def functions and methods of _core.pyx."""
    src = (Path(_core.__file__).parent / "_core.pyx").read_text()
    sigs = {}
    pattern = re.compile(r"^(    )?def (\w+)\((.*?)\):", re.DOTALL | re.MULTILINE)
    for cls, name, args in pattern.findall(src):
        args = re.sub(r"\[[^\]]*\]", "", args).replace("not None", "")
        names = [a.split("=")[0].split()[-1] for a in args.split(",") if a.strip()]
        sigs[("method " if cls else "") + name] = [n for n in names if n not in ("self", "*")]
    return sigs


def _stub_signatures():
    tree = ast.parse((Path(_core.__file__).parent / "_core.pyi").read_text())
    sigs, names = {}, set()

    def args_of(f):
        a = f.args
        return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg != "self"]

    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            sigs[node.name] = args_of(node)
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            for f in node.body:
                if isinstance(f, ast.FunctionDef):
                    sigs["method " + f.name] = args_of(f)
        elif isinstance(node, ast.AnnAssign) and not node.target.id.startswith("_"):
            names.add(node.target.id)
    return names, sigs


def test_the_type_stub_covers_the_compiled_module():
    names, sigs = _stub_signatures()
    assert names == {n for n in dir(_core) if not n.startswith("_")}
    pyx = _pyx_signatures()
    pyx.pop("method __repr__")
    assert sigs == pyx
