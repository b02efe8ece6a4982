"""Nadam, Adamax, Adadelta and Lion, the moving average of the weights
(use_ema) and gradient accumulation, each inside the fused compiled step.

1. the update rules against NumPy float64 references of Keras 3's formulas,
   in float64 and float32, with clipping, weight decay, EMA and accumulation
2. edge values and refused arguments
3. agreement with real Keras (JAX backend, float64) from the same initial
   weights over several training steps
"""
import math

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import optimizers


F32, F64 = np.float32, np.float64
KINDS = ["nadam", "adamax", "adadelta", "lion"]
SHAPES = [(5, 3), (3,), (4, 2)]


# -- float64 references (Keras 3's update_step and base optimizer) -----------
def _nadam(w, g, s, t, hp, lr):
    b1, b2, eps = hp["beta_1"], hp["beta_2"], hp["epsilon"]
    s.setdefault("U", 1.0)
    u_t = b1 * (1 - 0.5 * 0.96 ** t)
    u_t1 = b1 * (1 - 0.5 * 0.96 ** (t + 1))
    s["U"] = s["U"] * b1 * (1 - 0.5 * 0.96 ** t)   # once per step, shared by the tensors
    U = s["U"]
    s["m"] += (1 - b1) * (g - s["m"])
    s["v"] += (1 - b2) * (g * g - s["v"])
    m_hat = u_t1 * s["m"] / (1 - U * u_t1) + (1 - u_t) * g / (1 - U)
    v_hat = s["v"] / (1 - b2 ** t)
    return w - m_hat * lr / (np.sqrt(v_hat) + eps)


def _adamax(w, g, s, t, hp, lr):
    b1, b2, eps = hp["beta_1"], hp["beta_2"], hp["epsilon"]
    s["m"] += (1 - b1) * (g - s["m"])
    s["v"] = np.maximum(b2 * s["v"], np.abs(g))
    return w - lr * s["m"] / ((1 - b1 ** t) * (s["v"] + eps))


def _adadelta(w, g, s, t, hp, lr):
    rho, eps = hp["rho"], hp["epsilon"]
    s["v"] = rho * s["v"] + (1 - rho) * g * g
    d = -np.sqrt(s["m"] + eps) * g / np.sqrt(s["v"] + eps)
    s["m"] = rho * s["m"] + (1 - rho) * d * d
    return w + lr * d


def _lion(w, g, s, t, hp, lr):
    b1, b2 = hp["beta_1"], hp["beta_2"]
    w = w - lr * np.sign(b1 * s["m"] + (1 - b1) * g)
    s["m"] = b2 * s["m"] + (1 - b2) * g
    return w


REF = {"nadam": _nadam, "adamax": _adamax, "adadelta": _adadelta, "lion": _lion}
DEFAULTS = {"nadam": dict(beta_1=0.9, beta_2=0.999, epsilon=1e-7),
            "adamax": dict(beta_1=0.9, beta_2=0.999, epsilon=1e-7),
            "adadelta": dict(rho=0.95, epsilon=1e-7),
            "lion": dict(beta_1=0.9, beta_2=0.99)}


def ref_run(kind, ws, grads, lr, hp=None, weight_decay=None, global_clipnorm=None,
            clipvalue=None, ema=None, ema_every=None, accumulate=None):
    """Keras 3's apply(): accumulation, clipping, decay, update, EMA, in
    float64; returns (weights, averages)."""
    hp = {**DEFAULTS[kind], **(hp or {})}
    ws = [w.astype(F64) for w in ws]
    states = [{"m": np.zeros_like(w), "v": np.zeros_like(w)} for w in ws]
    shared = {}
    acc = [np.zeros_like(w) for w in ws]
    avg = [np.zeros_like(w) for w in ws]
    for it, gs in enumerate(grads):
        gs = [g.astype(F64) for g in gs]
        k = accumulate
        n = it // k if k else it
        if k and (it + 1) % k:
            acc = [a + g for a, g in zip(acc, gs)]
        else:
            if k:
                gs = [(g + a) / k for g, a in zip(gs, acc)]
                acc = [np.zeros_like(a) for a in acc]
            if global_clipnorm:
                norm = math.sqrt(sum(float(np.sum(g * g)) for g in gs))
                gs = [g * global_clipnorm / max(norm, global_clipnorm) for g in gs]
            if clipvalue:
                gs = [np.clip(g, -clipvalue, clipvalue) for g in gs]
            if weight_decay:
                ws = [w - w * weight_decay * lr for w in ws]
            new = []
            for i, (w, g, s) in enumerate(zip(ws, gs, states)):
                if kind == "nadam":   # the product advances once per step
                    s["U"] = shared.get("U", 1.0)
                new.append(REF[kind](w, g, s, n + 1, hp, lr))
                if kind == "nadam" and i == len(ws) - 1:
                    shared["U"] = s["U"]
            ws = new
        if ema is not None:
            mom = ema if n else 0.0
            avg = [mom * a + (1 - mom) * w for a, w in zip(avg, ws)]
            if ema_every and (n + 1) % ema_every == 0:
                ws = [a.copy() for a in avg]
    return ws, avg


def flat(opt, ws, dtype):
    """Bind opt to flat buffers holding the tensors ws; returns (params, grads)."""
    sizes = [w.size for w in ws]
    params = np.concatenate([w.ravel() for w in ws]).astype(dtype)
    grads = np.zeros_like(params)
    offs = np.concatenate([[0], np.cumsum(sizes)])
    opt.build(params, grads, [(f"t{i}", int(offs[i]), w.shape, None, None)
                              for i, w in enumerate(ws)])
    return params, grads, offs


def split(buf, ws, offs):
    return [buf[offs[i]:offs[i + 1]].reshape(w.shape) for i, w in enumerate(ws)]


def run_flat(opt, ws, grads_seq, dtype):
    params, grads, offs = flat(opt, ws, dtype)
    for gs in grads_seq:
        grads[...] = np.concatenate([g.ravel() for g in gs])
        opt.apply()
    return split(params, ws, offs), opt


def problem(seed, steps=7):
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal(s) for s in SHAPES]
    grads = [[rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1) for s in SHAPES]
             for _ in range(steps)]
    return ws, grads


def assert_weights(got, want, dtype):
    scale = max(float(np.abs(w).max()) for w in want)
    tol = 2e-5 if dtype == F32 else 1e-13
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, F64), w, rtol=0, atol=tol * scale)


def make(kind, **kw):
    return optimizers.get({"class_name": kind, "config": kw})


# -- 1. update rules ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", KINDS)
def test_update_rule_matches_numpy_float64(kind, dtype):
    ws, grads = problem(1)
    lr = 0.01
    got, opt = run_flat(make(kind, learning_rate=lr), ws, grads, dtype)
    want, _ = ref_run(kind, ws, grads, lr)
    assert_weights(got, want, dtype)
    assert opt.iterations == len(grads)
    assert set(opt.variables()) == ({"m"} if kind == "lion" else {"m", "v"})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("options", [
    dict(weight_decay=0.05, global_clipnorm=0.5),
    dict(clipvalue=0.3, hp="custom"),
    dict(hp="edge"),
    dict(ema=0.9, ema_every=None),
    dict(ema=0.8, ema_every=3),
    dict(accumulate=3),
    dict(accumulate=2, ema=0.9, ema_every=2, weight_decay=0.01),
], ids=["decay+global_clipnorm", "clipvalue+settings", "edge-settings", "ema", "ema+overwrite",
        "accumulate", "accumulate+ema+decay"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_with_clipping_decay_ema_and_accumulation(kind, options, dtype):
    options = dict(options)
    if options.get("hp") == "edge" and dtype == F32 and kind == "nadam":
        pytest.skip("beta_2 = 0 in Keras's form v + (1 - beta_2)(g^2 - v) cancels in float32 "
                    "(v = g^2 comes out 0 when g^2 is below half an ulp of v), as in Keras")
    custom = {"custom": {"nadam": dict(beta_1=0.8, beta_2=0.99, epsilon=1e-5),
                         "adamax": dict(beta_1=0.7, beta_2=0.9, epsilon=1e-4),
                         "adadelta": dict(rho=0.8, epsilon=1e-5),
                         "lion": dict(beta_1=1.0, beta_2=0.5)},
              # the ends of the ranges: no momentum, or no memory
              "edge": {"nadam": dict(beta_1=0.0, beta_2=0.0),
                       "adamax": dict(beta_1=0.0, beta_2=0.0),
                       "adadelta": dict(rho=0.0), "lion": dict(beta_1=1e-300, beta_2=0.0)},
              None: {k: {} for k in KINDS}}[options.pop("hp", None)][kind]
    ws, grads = problem(2, steps=9)
    lr = 0.02
    kw = dict(learning_rate=lr, **custom)
    for ours, theirs in (("weight_decay", "weight_decay"), ("global_clipnorm", "global_clipnorm"),
                         ("clipvalue", "clipvalue"), ("ema_momentum", "ema"),
                         ("ema_overwrite_frequency", "ema_every"),
                         ("gradient_accumulation_steps", "accumulate")):
        if options.get(theirs) is not None:
            kw[ours] = options[theirs]
    if "ema" in options:
        kw["use_ema"] = True
    got, opt = run_flat(make(kind, **kw), ws, grads, dtype)
    want, avg = ref_run(kind, ws, grads, lr, custom, **options)
    assert_weights(got, want, dtype)
    if "ema" in options:
        offs = np.concatenate([[0], np.cumsum([w.size for w in ws])])
        assert_weights(split(opt.variables()["ema"], ws, offs), avg, dtype)
        # the end of fit: the weights become the average
        opt.finalize_variable_values()
        assert_weights(split(opt._params, ws, offs), avg, dtype)


def test_accumulation_skips_a_nonfinite_micro_step_and_keeps_the_sum():
    ws, grads = problem(3, steps=6)
    bad = [g.copy() for g in grads[1]]
    bad[2][0, 0] = np.nan
    seq = grads[:1] + [bad] + grads[1:]   # the NaN step comes between two good ones
    opt = make("adamax", learning_rate=0.01, gradient_accumulation_steps=2)
    got, opt = run_flat(opt, ws, seq, F64)
    want, _ = ref_run("adamax", ws, grads, 0.01, accumulate=2)
    assert_weights(got, want, F64)
    assert opt.skipped_steps == 1 and opt.iterations == len(grads)
    # an update step with a NaN is refused too, and the sum survives it
    opt = make("lion", learning_rate=0.01, gradient_accumulation_steps=2)
    seq = grads[:2] + [grads[2], bad, grads[3]] + grads[4:]
    got, opt = run_flat(opt, ws, seq, F64)
    want, _ = ref_run("lion", ws, grads, 0.01, accumulate=2)
    assert_weights(got, want, F64)
    assert opt.skipped_steps == 1


def test_accumulation_micro_steps_leave_weights_and_moments_alone():
    ws, grads = problem(4, steps=3)
    opt = make("nadam", gradient_accumulation_steps=3)
    params, g, offs = flat(opt, ws, F64)
    before = params.copy()
    for gs in grads[:2]:
        g[...] = np.concatenate([a.ravel() for a in gs])
        rec = opt.apply()
        assert not rec.clipped
    assert params.tobytes() == before.tobytes()
    assert not opt.variables()["m"].any() and not opt.variables()["v"].any()
    want = sum(np.concatenate([a.ravel() for a in gs]) for gs in grads[:2])
    np.testing.assert_allclose(opt.variables()["acc"], want, rtol=1e-15)
    g[...] = np.concatenate([a.ravel() for a in grads[2]])
    opt.apply()
    assert not opt.variables()["acc"].any()   # cleared by the update
    assert params.tobytes() != before.tobytes()


# -- 2. edge values and refused arguments -------------------------------------
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_lion_sign_of_zero_is_zero_and_steps_are_the_learning_rate(dtype):
    w = [np.array([[1.0, -2.0], [0.5, 3.0]])]
    g = [np.array([[0.0, 1e-30], [-1e20, 2.0]])]
    got, opt = run_flat(make("lion", learning_rate=0.25), w, [g], dtype)
    np.testing.assert_array_equal(got[0], np.array([[1.0, -2.25], [0.75, 2.75]], dtype))
    m = opt.variables()["m"]
    want_m = (1 - 0.99) * g[0].ravel()
    np.testing.assert_allclose(m, want_m.astype(dtype), rtol=1e-6 if dtype == F32 else 1e-15)


@pytest.mark.parametrize("kind", ["nadam", "adamax", "adadelta"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_zero_gradients_and_huge_gradients_stay_finite(kind, dtype):
    # the largest gradients whose squares the type holds (1e20 squared
    # overflows float32: that update is reported, as any overflow)
    big = 1e18 if dtype == F32 else 1e20
    ws = [np.array([0.5, -0.0, 1e-3])]
    grads = [[np.zeros(3)], [np.array([big, -big, 1e-30])], [np.zeros(3)]]
    got, _ = run_flat(make(kind, learning_rate=0.1), ws, grads, dtype)
    want, _ = ref_run(kind, ws, grads, 0.1)
    assert np.isfinite(got[0]).all()
    assert_weights(got, want, dtype)


def test_subnormal_moments_do_not_change_results_beyond_flushing():
    ws = [np.ones(4)]
    grads = [[np.full(4, 1e-160)]] * 3
    got, _ = run_flat(make("adamax", learning_rate=0.1), ws, grads, F64)
    want, _ = ref_run("adamax", ws, grads, 0.1)
    assert_weights(got, want, F64)


@pytest.mark.parametrize("kind,kw,arg", [
    ("nadam", dict(beta_1=1.0), "beta_1"), ("adamax", dict(beta_2=-0.1), "beta_2"),
    ("adadelta", dict(rho=1.0), "rho"), ("adadelta", dict(epsilon=0.0), "epsilon"),
    ("lion", dict(beta_1=0.0), "beta_1"), ("lion", dict(beta_1=1.5), "beta_1"),
    ("lion", dict(beta_2=1.0), "beta_2"), ("nadam", dict(ema_momentum=1.5), "ema_momentum"),
    ("adamax", dict(gradient_accumulation_steps=1), "gradient_accumulation_steps"),
    ("lion", dict(ema_overwrite_frequency=0), "ema_overwrite_frequency"),
    ("nadam", dict(learning_rate=-1.0), "learning_rate"),
])
def test_bad_hyperparameters_raise_naming_the_argument(kind, kw, arg):
    with pytest.raises(ValueError, match=arg):
        make(kind, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_configs_round_trip_with_keras_defaults(kind):
    cls = type(optimizers.get(kind))
    opt = cls()
    cfg = opt.get_config()
    assert {k: cfg[k] for k in DEFAULTS[kind]} == DEFAULTS[kind]
    assert cfg["learning_rate"] == 0.001 and cfg["use_ema"] is False
    assert cfg["ema_momentum"] == 0.99 and cfg["gradient_accumulation_steps"] is None
    again = optimizers.deserialize(optimizers.serialize(cls(use_ema=True,
                                                            gradient_accumulation_steps=4)))
    assert again.get_config() == {**cfg, "use_ema": True, "gradient_accumulation_steps": 4}


def _small_model(opt, dtype="float64", seed=0):
    model = fg.Sequential([fg.layers.Dense(6, activation="sigmoid", input_dim=4),
                           fg.layers.Dense(3)], dtype=dtype, seed=seed)
    model.compile(opt, "mse")
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_resume_with_ema_and_accumulation_is_bit_identical(kind, tmp_path):
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((40, 4)), rng.standard_normal((40, 3))
    kw = dict(use_ema=True, ema_overwrite_frequency=4, gradient_accumulation_steps=3)
    a = _small_model(make(kind, **kw))
    a.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)   # 5 steps: mid-cycle
    a.save(tmp_path / "m.fg")
    b = fg.load_model(tmp_path / "m.fg")
    for m in (a, b):
        for i in range(4):
            m.train_on_batch(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8])
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        assert wa.tobytes() == wb.tobytes()
    for k, v in a.optimizer.variables().items():
        assert v.tobytes() == b.optimizer.variables()[k].tobytes(), k


# -- 3. real Keras --------------------------------------------------------------
def keras_pair(keras, loss, fg_opt, k_opt, x, y, steps, batch):
    model = _small_model(fg_opt)
    model.build(4)
    km = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="sigmoid"),
                           keras.layers.Dense(3)])
    km.set_weights(model.get_weights())
    km.compile(k_opt, loss)
    for i in range(steps):
        rows = slice(i * batch % len(x), i * batch % len(x) + batch)
        model.train_on_batch(x[rows], y[rows])
        km.train_on_batch(x[rows], y[rows])
    return model, km


KERAS_CASES = [
    ("nadam", dict(learning_rate=0.01)),
    ("adamax", dict(learning_rate=0.02, beta_1=0.8)),
    ("adadelta", dict(learning_rate=1.0, rho=0.9)),
    ("lion", dict(learning_rate=0.003)),
    ("nadam", dict(learning_rate=0.01, weight_decay=0.1, clipnorm=0.5)),
    ("adamax", dict(learning_rate=0.01, use_ema=True, ema_momentum=0.7,
                    ema_overwrite_frequency=3)),
    ("lion", dict(learning_rate=0.003, gradient_accumulation_steps=3, global_clipnorm=0.1)),
    ("adadelta", dict(learning_rate=0.5, use_ema=True, ema_momentum=0.9,
                      gradient_accumulation_steps=2, ema_overwrite_frequency=2)),
]


@pytest.mark.parametrize("kind,kw", KERAS_CASES,
                         ids=[f"{k}-{'-'.join(sorted(kw))}" for k, kw in KERAS_CASES])
def test_training_agrees_with_keras_in_float64(keras64, keras_mse, kind, kw):
    keras = keras64
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((48, 4)), rng.standard_normal((48, 3))
    kcls = getattr(keras.optimizers, type(optimizers.get(kind)).__name__)
    model, km = keras_pair(keras, keras_mse, make(kind, **kw), kcls(**kw), x, y, steps=8, batch=16)
    for a, b in zip(model.get_weights(), km.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    if kw.get("use_ema"):
        ema = model.optimizer.variables()["ema"]
        kavg = np.concatenate([np.asarray(v).ravel()
                               for v in km.optimizer._model_variables_moving_average])
        np.testing.assert_allclose(ema, kavg, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_update_ratio_tracking_changes_nothing_and_measures_the_update(kind, dtype):
    # 300 elements per tensor: blocks of 128 and a tail, with the moving average
    shapes = [(30, 10), (300,)]
    rng = fresh_rng = np.random.default_rng(8)
    ws = [rng.standard_normal(s) for s in shapes]
    grads = [[fresh_rng.standard_normal(s) for s in shapes] for _ in range(4)]
    kw = dict(learning_rate=0.01, use_ema=True, ema_momentum=0.5)
    plain, _ = run_flat(make(kind, **kw), ws, grads, dtype)
    opt = make(kind, **kw)
    opt.track_updates(True)
    params, g, offs = flat(opt, ws, dtype)
    for gs in grads:
        before = params.astype(F64)
        g[...] = np.concatenate([a.ravel() for a in gs])
        rec = opt.apply()
    for a, b in zip(split(params, ws, offs), plain):
        assert a.tobytes() == b.tobytes()
    after = params.astype(F64)
    want = [np.linalg.norm(after[offs[i]:offs[i + 1]] - before[offs[i]:offs[i + 1]])
            / np.linalg.norm(after[offs[i]:offs[i + 1]]) for i in range(len(ws))]
    np.testing.assert_allclose(rec.update_ratio, want, rtol=1e-6 if dtype == F32 else 1e-12)
