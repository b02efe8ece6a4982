"""The compiled kernels, callable on NumPy arrays.

Every function checks its arguments and raises ``ValueError`` or
``TypeError`` naming the argument, before any compiled code runs: wrong
shapes, unknown names and out-of-range values raise ``ValueError``, arrays
of the wrong type or dtype ``TypeError``, and some scalars of the wrong type
(a string rate, a float seed or step, a number as loss name) ``ValueError``.
Inputs of any memory layout are accepted (non-contiguous ones are copied
once); ``out``-style buffers must already be C-contiguous, writable and of
the computation's dtype, since they are written in place. The computation's
dtype, float32 or float64, is that of the first array argument, except in
``loss_forward_backward``, where it is ``y_pred``'s (``y_true`` is converted
to it). The other float arrays must match it, except ``batchnorm_backward``'s
``mean`` and ``rstd``, which are float64, as ``batchnorm_forward`` returns
them.

Kernels overwrite their outputs; nothing accumulates.
"""
import math
import warnings

import numpy as np

from fastgrad import _core, schedules

# alpha is leaky_relu's negative slope and elu's alpha
_DEFAULT_ALPHA = {"leaky_relu": 0.2, "elu": 1.0}
# name -> (code in csrc/fastgrad.h, default alpha)
ACTIVATIONS = {name: (code, _DEFAULT_ALPHA.get(name, 0.0))
               for name, code in _core.ACTIVATION_CODES.items()}
# Keras' other names of the same functions ("swish" is silu), taken by
# every function that takes an activation name
ACTIVATION_ALIASES = dict(_core.ACTIVATION_ALIASES)
NEEDS_PRE = _core.ACTIVATIONS_NEEDING_PRE  # derivative needs z, not just y

# name -> code in csrc/fastgrad.h
LOSSES = dict(_core.LOSS_CODES)
_TAKES_LOGITS = frozenset({"binary_crossentropy", "categorical_crossentropy",
                           "sparse_categorical_crossentropy", "binary_focal_crossentropy",
                           "categorical_focal_crossentropy"})

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _dtype_of(name, a):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy array, got {type(a).__name__}")
    if a.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {a.dtype}")
    return a.dtype


def _input(name, a, dtype, ndim, shape=None):
    """Check an input array and return it C-contiguous (copying if needed)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of the "
                        f"computation), got {a.dtype}")
    _shape(name, a, ndim, shape)
    # C-contiguous and aligned: C reads elements at their natural alignment
    return np.require(a, requirements=["C", "A"])


def _output(name, a, dtype, shape):
    """Check a caller-provided buffer that the kernel writes into, or make one."""
    if a is None:
        return np.empty(shape, dtype)
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {a.dtype}")
    _shape(name, a, len(shape), shape)
    if not a.flags.c_contiguous or not a.flags.aligned:
        raise ValueError(f"{name}: expected a C-contiguous, aligned array (it is written "
                         "in place)")
    if not a.flags.writeable:
        raise ValueError(f"{name}: expected a writable array")
    return a


def _shape(name, a, ndim, shape):
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got {a.ndim}-D "
                         f"with shape {a.shape}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {a.shape}")


def _real(name, v):
    """v as a finite float, or a ValueError/TypeError naming the argument."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    return f


def _no_overlap(name, out, *inputs):
    """Refuse an output buffer that overlaps an input the kernel still reads."""
    for a in inputs:
        if a is not None and np.may_share_memory(out, a):
            raise ValueError(f"{name}: overlaps an input; pass a separate array")


def _same_buffer(a, b):
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides)


def _in_place_or_apart(name, buf, **inputs):
    """Refuse an output buffer that overlaps an input without being that
    input exactly: an element-wise kernel reads each element before writing
    it, so the output may be the input itself, but a shifted view would read
    elements it has already overwritten."""
    for other, a in inputs.items():
        if a is not None and np.may_share_memory(buf, a) and not _same_buffer(buf, a):
            raise ValueError(f"{name}: overlaps {other} without being {other} itself; pass "
                             f"{other} as {name} or a separate array")


def _activation(activation, alpha):
    if not isinstance(activation, str):
        raise TypeError(f"activation: expected a name, got {type(activation).__name__}")
    if activation not in ACTIVATIONS and activation not in ACTIVATION_ALIASES:
        raise ValueError(f"activation: unknown name {activation!r}; expected one of "
                         f"{', '.join([*ACTIVATIONS, *ACTIVATION_ALIASES])}")
    code, default = ACTIVATIONS[ACTIVATION_ALIASES.get(activation, activation)]
    alpha = default if alpha is None else _real("alpha", alpha)
    if activation in ("leaky_relu", "elu") and not alpha >= 0:
        raise ValueError(f"alpha: expected a value >= 0 for {activation}, got {alpha}")
    return code, alpha


def matmul(a, b, out=None, trans_a=False, trans_b=False):
    """out = op(a) @ op(b) through BLAS gemm; op transposes when asked."""
    dt = _dtype_of("a", a)
    a = _input("a", a, dt, 2)
    b = _input("b", b, dt, 2)
    m = a.shape[1] if trans_a else a.shape[0]
    k = a.shape[0] if trans_a else a.shape[1]
    kb = b.shape[1] if trans_b else b.shape[0]
    if k != kb:
        raise ValueError(f"b: expected {k} rows in op(b) to match op(a) of shape "
                         f"({m}, {k}), got {kb}")
    n = b.shape[0] if trans_b else b.shape[1]
    out = _output("out", out, dt, (m, n))
    _no_overlap("out", out, a, b)
    _core.matmul(a, b, out, bool(trans_a), bool(trans_b))
    return out


def dense_forward(x, kernel, bias=None, activation="linear", out=None, pre=None,
                  alpha=None):
    """Dense layer forward: ``out = activation(x @ kernel + bias)``.

    x is (batch, in), kernel (in, units), bias (units,) or None. When ``pre``
    is given it receives ``z = x @ kernel + bias``; keep it for
    :func:`dense_backward` when the activation is gelu or silu.
    Returns ``out``."""
    dt = _dtype_of("x", x)
    x = _input("x", x, dt, 2)
    kernel = _input("kernel", kernel, dt, 2)
    if kernel.shape[0] != x.shape[1]:
        raise ValueError(f"kernel: expected {x.shape[1]} rows (the features of x), "
                         f"got shape {kernel.shape}")
    units = kernel.shape[1]
    if bias is not None:
        bias = _input("bias", bias, dt, 1, (units,))
    code, alpha = _activation(activation, alpha)
    out = _output("out", out, dt, (x.shape[0], units))
    _no_overlap("out", out, x, kernel, bias)
    if pre is not None:
        pre = _output("pre", pre, dt, (x.shape[0], units))
        _no_overlap("pre", pre, x, kernel, bias, out)
    _core.dense_forward(x, kernel, bias, out, pre, code, alpha)
    return out


def dense_backward(dout, x, kernel, out, activation="linear", pre=None, alpha=None,
                   use_bias=True, need_dx=True, dkernel=None, dbias=None, dx=None):
    """Dense layer backward, for ``out = activation(x @ kernel + bias)``::

        dz      = dout * activation'(z)
        dkernel = x.T @ dz
        dbias   = dz.sum(axis=0)         (None when use_bias is False)
        dx      = dz @ kernel.T          (None when need_dx is False)

    ``out`` is the forward output; ``pre`` (z) is required for gelu and silu.
    Returns ``(dx, dkernel, dbias)``."""
    dt = _dtype_of("dout", dout)
    x = _input("x", x, dt, 2)
    kernel = _input("kernel", kernel, dt, 2)
    batch, units = x.shape[0], kernel.shape[1]
    if kernel.shape[0] != x.shape[1]:
        raise ValueError(f"kernel: expected {x.shape[1]} rows (the features of x), "
                         f"got shape {kernel.shape}")
    dout = _input("dout", dout, dt, 2, (batch, units))
    out = _input("out", out, dt, 2, (batch, units))
    code, alpha = _activation(activation, alpha)
    if pre is not None:
        pre = _input("pre", pre, dt, 2, (batch, units))
    elif activation in NEEDS_PRE:
        raise ValueError(f"pre: {activation}'s derivative needs the pre-activation "
                         "z; pass the pre= buffer filled by dense_forward")
    dkernel = _output("dkernel", dkernel, dt, kernel.shape)
    dbias = _output("dbias", dbias, dt, (units,)) if use_bias else None
    dx = _output("dx", dx, dt, x.shape) if need_dx else None
    for name, buf in (("dkernel", dkernel), ("dbias", dbias), ("dx", dx)):
        if buf is not None:
            _no_overlap(name, buf, dout, x, kernel, out, pre)
    _no_overlap("dkernel", dkernel, dbias, dx)
    if dx is not None and dbias is not None:
        _no_overlap("dx", dx, dbias)
    dpre = np.empty((batch, units), dt)
    _core.dense_backward(dout, x, kernel, out, pre, dpre, dkernel, dbias, dx, code, alpha)
    return dx, dkernel, dbias


def activation_forward(x, activation, out=None, pre=None, alpha=None):
    """``out = activation(x)`` (softmax over the last axis). Returns ``out``."""
    dt = _dtype_of("x", x)
    x = _input("x", x, dt, 2)
    code, alpha = _activation(activation, alpha)
    out = _output("out", out, dt, x.shape)
    _in_place_or_apart("out", out, x=x)
    if pre is not None:
        pre = _output("pre", pre, dt, x.shape)
        _in_place_or_apart("pre", pre, x=x)
        _no_overlap("pre", pre, out)
    _core.bias_act_forward(x, None, out, pre, code, alpha)
    return out


def activation_backward(dout, out, activation, x=None, alpha=None, dx=None):
    """``dx = dout * activation'(x)``, from the forward output ``out`` (and the
    input ``x``, required for gelu and silu). Returns ``dx``."""
    dt = _dtype_of("dout", dout)
    dout = _input("dout", dout, dt, 2)
    out = _input("out", out, dt, 2, dout.shape)
    code, alpha = _activation(activation, alpha)
    if x is not None:
        x = _input("x", x, dt, 2, dout.shape)
    elif activation in NEEDS_PRE:
        raise ValueError(f"x: {activation}'s derivative needs the input x")
    dx = _output("dx", dx, dt, dout.shape)
    _in_place_or_apart("dx", dx, dout=dout, out=out, x=x)
    _core.act_backward(dout, out, x, dx, None, code, alpha)
    return dx


def _labels(y, batch, classes=None):
    """Integer class labels as a contiguous int64 vector, checked for range."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.shape[0] != batch:
        raise ValueError(f"y_true: expected {batch} integer labels of shape ({batch},) "
                         f"or ({batch}, 1), got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or np.any(y != np.floor(y)):
            raise ValueError("y_true: sparse labels must be whole numbers")
    elif y.dtype.kind not in "iub":
        raise TypeError(f"y_true: expected integer labels, got dtype {y.dtype}")
    # range first, in the labels' own type, so the cast below is exact
    if classes is not None and y.size:
        if y.dtype == np.int64 and y.flags.c_contiguous and y.flags.aligned:
            lo, hi = _core.label_range(y)   # the common case, in one pass
        else:
            lo, hi = y.min(), y.max()
        if lo < 0 or hi >= classes:
            bad = int(np.flatnonzero((y < 0) | (y >= classes))[0])
            v = y[bad].item()
            v = f"{v:g}" if isinstance(v, float) else v
            raise ValueError(f"y_true: label {v} at row {bad} is outside "
                             f"[0, {classes}) for {classes} classes")
    if y.dtype.kind == "f" and y.size and np.abs(y).max() >= 2.0**62:
        raise ValueError("y_true: labels too large")
    return np.require(y, np.int64, ['C', 'A'])


def loss_forward_backward(y_true, y_pred, loss, from_logits=False, delta=1.0,
                          grad=True, per_sample=False, alpha=0.25, gamma=2.0,
                          apply_class_balancing=False, sample_weight=None):
    """Loss averaged over the batch and its gradient with respect to y_pred.
    With ``sample_weight`` (one number per row) the loss is
    ``sum_i w_i l_i / rows`` (Keras's sum_over_batch_size) and row i's
    gradient is scaled by w_i; the per-sample losses stay unweighted.

    loss is one of :data:`LOSSES` (formulas in :mod:`fastgrad.losses`).
    With ``from_logits`` (cross-entropies only) y_pred holds logits and the
    loss and gradient come from them directly, stably. ``delta`` is Huber's;
    ``alpha``, ``gamma`` and ``apply_class_balancing`` are the focal
    losses' (Keras defaults). Returns ``(loss, dy_pred)`` (``dy_pred`` is
    None when ``grad`` is False), and the per-sample losses as a third item
    when ``per_sample`` is True."""
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss: unknown name {loss!r}; expected one of {', '.join(LOSSES)}")
    dt = _dtype_of("y_pred", y_pred)
    y_pred = _input("y_pred", y_pred, dt, 2)
    kind = LOSSES[loss]
    if from_logits and loss not in _TAKES_LOGITS:
        raise ValueError(f"from_logits: only the cross-entropies take logits, not {loss}")
    delta = _real("delta", delta)
    if not delta > 0:
        raise ValueError(f"delta: expected a positive number, got {delta}")
    alpha, gamma = _real("alpha", alpha), _real("gamma", gamma)
    if not gamma >= 0:
        raise ValueError(f"gamma: expected a number >= 0, got {gamma}")
    target = labels = None
    if loss == "sparse_categorical_crossentropy":
        labels = _labels(y_true, y_pred.shape[0], y_pred.shape[1])
    else:
        y_true = np.asarray(y_true)
        if y_true.dtype.kind not in "iubf":
            raise TypeError(f"y_true: expected numbers, got dtype {y_true.dtype}")
        target = _input("y_true", y_true.astype(dt, copy=False), dt, 2, y_pred.shape)
    if sample_weight is not None:
        w = np.asarray(sample_weight)
        if w.dtype.kind not in "iubf" or w.shape != (y_pred.shape[0],):
            raise ValueError(f"sample_weight: expected {y_pred.shape[0]} numbers (one per "
                             f"row), got shape {w.shape} of dtype {w.dtype}")
        sample_weight = np.ascontiguousarray(w, dt)
    d = np.empty_like(y_pred) if grad else None
    rows = np.empty(y_pred.shape[0], dt) if per_sample else None
    value = _core.loss_forward_backward(y_pred, target, labels, rows, d, None, kind,
                                        bool(from_logits), float(delta), alpha, gamma,
                                        bool(apply_class_balancing), sample_weight)
    return (value, d, rows) if per_sample else (value, d)


def _flat(name, a, dtype, n=None, writable=False):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of params), got {a.dtype}")
    _shape(name, a, 1, None if n is None else (n,))
    if writable:
        return _output(name, a, dtype, a.shape)
    return np.require(a, requirements=['C', 'A'])


_FLAGS = frozenset({"nesterov", "centered", "amsgrad"})


def _setting(name, v):
    """An optimizer setting as a float; the range is checked by StepConfig."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a number, got {v!r}")
    try:
        return float(v)
    except OverflowError:
        raise ValueError(f"{name}: expected a finite number, got {v!r}") from None


def _moment_buffers(config, moments, params, grads):
    """{"m", "v", "vmax": the caller's buffer} for those the settings use,
    each checked (a float buffer like params, overlapping no other)."""
    bufs = {}
    for key, needed in (("m", config.needs_m), ("v", config.needs_v),
                        ("vmax", config.needs_vmax)):
        name, buf = moments.get(key, (key, None))
        if not needed:
            continue
        if buf is None:
            raise ValueError(f"{name}: required by these settings (a float buffer like params)")
        buf = _flat(name, buf, params.dtype, params.shape[0], writable=True)
        _no_overlap(name, buf, params, grads, *bufs.values())
        bufs[key] = buf
    return bufs


def _optimizer_step(kind, params, grads, step, learning_rate, moments, offsets,
                    clipvalue, clipnorm, global_clipnorm, weight_decay, **hyper):
    """Shared body of the *_step functions: the same two compiled passes as
    an optimizer's apply(), on the caller's flat buffers, updated in place.
    Nothing the size of params is allocated (unless grads is read-only: pass
    1 takes a writable buffer, and then gets a copy)."""
    dt = _dtype_of("params", params)
    params = _flat("params", params, dt, writable=True)
    n = params.shape[0]
    grads = _flat("grads", grads, dt, n)
    if offsets is None:
        offsets = [0, n]
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or offsets.size < 2 or offsets.dtype.kind not in "iu" \
            or offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 0):
        raise ValueError(f"offsets: expected increasing integers from 0 to {n} "
                         "(tensor t is params[offsets[t]:offsets[t+1]])")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 1 <= step < 2**62:
        raise ValueError(f"step: expected the 1-based step count, got {step!r}")
    if isinstance(learning_rate, schedules.LearningRateSchedule):
        learning_rate = learning_rate(int(step) - 1)
    lr = _setting("learning_rate", learning_rate)
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"learning_rate: expected a finite number >= 0, got {learning_rate!r}")
    settings = {k: bool(v) if k in _FLAGS else _setting(k, v) for k, v in hyper.items()}
    clips = {"clipvalue": clipvalue, "clipnorm": clipnorm, "global_clipnorm": global_clipnorm,
             "weight_decay": weight_decay}
    for k, v in clips.items():
        settings[k] = 0.0 if v is None else _setting(k, v)
        if v is not None and not settings[k] > 0 and k != "weight_decay":
            raise ValueError(f"{k}: expected a positive number, got {v!r}")
    config = _core.StepConfig(_core.OPTIMIZER_CODES[kind], **settings)
    bufs = _moment_buffers(config, moments, params, grads)
    T = offsets.size - 1
    offset = offsets.astype(np.int64)
    scale, sumsq, norms = np.ones(T), np.empty(T), np.empty(T)
    table = _core.TensorTable(offset, np.zeros(T), np.zeros(T), scale,
                              np.full(T, _core.CONSTRAINT_CODES[None], np.intc), np.zeros(T),
                              np.zeros(T, np.int64))
    if not grads.flags.writeable:
        grads = grads.copy()
    bad, _, total, clipped = _core.grad_norms(sumsq, norms, grads, params, table, config)
    report = {"grad_norms": norms, "global_norm": total, "clip_scale": scale,
              "clipped": clipped, "nonfinite": bad >= 0, "overflow": None}
    if bad >= 0:
        return report
    over = _core.optimizer_step(params, bufs.get("m"), bufs.get("v"), bufs.get("vmax"), grads,
                                table, config, lr, int(step))
    if over >= 0:
        report["overflow"] = f"tensor_{over}"
        warnings.warn(f"the update of tensor_{over} overflowed: its weights are not all "
                      f"finite after step {step}, whose gradients were finite",
                      RuntimeWarning, stacklevel=3)
    return report


_STEP_DOC = """

    Updates ``params`` (and the moment buffers) in place from ``grads``, as
    one step of the optimizer of the same name (formula in its docstring),
    through the same two compiled passes. ``offsets`` splits the flat buffers
    into tensors for ``clipnorm`` (default: one tensor). ``grads`` is not
    modified. A step with a non-finite gradient changes nothing; one whose
    update overflows the weights' range warns (RuntimeWarning). Returns a
    dict: grad_norms, global_norm, clip_scale, clipped, nonfinite, and
    overflow (the first tensor, "tensor_<t>", whose weights are no longer
    all finite, or None)."""


def sgd_step(params, grads, learning_rate=0.01, momentum=0.0, nesterov=False,
             velocity=None, step=1, offsets=None, clipvalue=None, clipnorm=None,
             global_clipnorm=None, weight_decay=None):
    return _optimizer_step("sgd", params, grads, step, learning_rate, {"v": ("velocity", velocity)},
                           offsets, clipvalue, clipnorm, global_clipnorm, weight_decay,
                           momentum=momentum, nesterov=nesterov)


def rmsprop_step(params, grads, v, learning_rate=0.001, rho=0.9, momentum=0.0,
                 epsilon=1e-7, centered=False, m=None, momentum_buffer=None, step=1,
                 offsets=None, clipvalue=None, clipnorm=None, global_clipnorm=None,
                 weight_decay=None):
    moments = {"v": ("v", v), "m": ("m", m), "vmax": ("momentum_buffer", momentum_buffer)}
    return _optimizer_step("rmsprop", params, grads, step, learning_rate, moments, offsets,
                           clipvalue, clipnorm, global_clipnorm, weight_decay, rho=rho,
                           momentum=momentum, epsilon=epsilon, centered=centered)


def adam_step(params, grads, m, v, step, learning_rate=0.001, beta_1=0.9, beta_2=0.999,
              epsilon=1e-7, amsgrad=False, vmax=None, offsets=None, clipvalue=None,
              clipnorm=None, global_clipnorm=None, weight_decay=None):
    moments = {"m": ("m", m), "v": ("v", v), "vmax": ("vmax", vmax)}
    return _optimizer_step("adam", params, grads, step, learning_rate, moments, offsets,
                           clipvalue, clipnorm, global_clipnorm, weight_decay, beta_1=beta_1,
                           beta_2=beta_2, epsilon=epsilon, amsgrad=amsgrad)


def adagrad_step(params, grads, accumulator, learning_rate=0.001, epsilon=1e-7, step=1,
                 offsets=None, clipvalue=None, clipnorm=None, global_clipnorm=None,
                 weight_decay=None):
    return _optimizer_step("adagrad", params, grads, step, learning_rate,
                           {"v": ("accumulator", accumulator)}, offsets, clipvalue, clipnorm,
                           global_clipnorm, weight_decay, epsilon=epsilon)


sgd_step.__doc__ = "SGD step (velocity needed when momentum > 0)." + _STEP_DOC
rmsprop_step.__doc__ = ("RMSprop step (m needed when centered, momentum_buffer when "
                        "momentum > 0)." + _STEP_DOC)
adam_step.__doc__ = "Adam step; AdamW is adam_step with weight_decay." + _STEP_DOC
adagrad_step.__doc__ = "Adagrad step." + _STEP_DOC


def batchnorm_forward(x, gamma=None, beta=None, moving_mean=None, moving_variance=None,
                      training=True, momentum=0.99, epsilon=1e-3, out=None):
    """BatchNormalization forward (formula in fastgrad.layers.BatchNormalization).

    x is (batch, features); gamma, beta (features,) or None (scale 1, shift 0);
    moving_mean and moving_variance (features,) are required for inference
    and, when given in training, updated in place. Returns ``(out, mean,
    rstd)`` with mean and rstd = 1 / sqrt(var + epsilon) as float64 (features,),
    which batchnorm_backward takes."""
    dt = _dtype_of("x", x)
    x = _input("x", x, dt, 2)
    f = x.shape[1]
    if training and x.shape[0] < 1:
        # one row is taken: its variance is 0 and its output beta, as in Keras
        raise ValueError("x: training needs at least one row, got 0")
    epsilon, momentum = _real("epsilon", epsilon), _real("momentum", momentum)
    if not epsilon > 0:
        raise ValueError(f"epsilon: expected a positive number, got {epsilon!r}")
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum: expected a number in [0, 1], got {momentum!r}")
    gamma = None if gamma is None else _input("gamma", gamma, dt, 1, (f,))
    beta = None if beta is None else _input("beta", beta, dt, 1, (f,))
    if not training and (moving_mean is None or moving_variance is None):
        raise ValueError("moving_mean, moving_variance: required in inference")
    if training:   # updated in place
        moving_mean = np.zeros(f, dt) if moving_mean is None else \
            _output("moving_mean", moving_mean, dt, (f,))
        moving_variance = np.ones(f, dt) if moving_variance is None else \
            _output("moving_variance", moving_variance, dt, (f,))
    else:          # only read: any layout, read-only included (a private copy)
        moving_mean = np.array(_input("moving_mean", moving_mean, dt, 1, (f,)))
        moving_variance = np.array(_input("moving_variance", moving_variance, dt, 1, (f,)))
    out = _output("out", out, dt, x.shape)
    _in_place_or_apart("out", out, x=x)
    _no_overlap("out", out, gamma, beta, moving_mean, moving_variance)
    if training:
        for name, buf in (("moving_mean", moving_mean), ("moving_variance", moving_variance)):
            _no_overlap(name, buf, x, gamma, beta)
        _no_overlap("moving_mean", moving_mean, moving_variance)
    mean, rstd = np.empty(f), np.empty(f)
    _core.batchnorm_forward(x, gamma, beta, moving_mean, moving_variance, out, mean, rstd,
                            float(epsilon), float(momentum), bool(training))
    return out, mean, rstd


def _norm_backward_args(dout, x, mean, rstd, gamma, dx, per_row):
    """The checked arguments of a normalization's backward, with its new
    dgamma and dbeta: mean and rstd float64, one per row (per_row) or one
    per feature."""
    dt = _dtype_of("dout", dout)
    x = _input("x", x, dt, 2)
    b, f = x.shape
    dout = _input("dout", dout, dt, 2, x.shape)
    n = b if per_row else f
    mean = _input("mean", mean, np.dtype(np.float64), 1, (n,))
    rstd = _input("rstd", rstd, np.dtype(np.float64), 1, (n,))
    gamma = None if gamma is None else _input("gamma", gamma, dt, 1, (f,))
    dx = _output("dx", dx, dt, x.shape)
    _in_place_or_apart("dx", dx, dout=dout)
    _no_overlap("dx", dx, x, mean, rstd, gamma)
    return dout, x, mean, rstd, gamma, dx, np.empty(f, dt), np.empty(f, dt)


def batchnorm_backward(dout, x, mean, rstd, gamma=None, dx=None):
    """BatchNormalization backward for training statistics::

        xhat = (x - mean) * rstd
        dbeta = dout.sum(0);  dgamma = (dout * xhat).sum(0)
        dx = gamma * rstd / B * (B * dout - dbeta - xhat * dgamma)

    Returns ``(dx, dgamma, dbeta)``."""
    dout, x, mean, rstd, gamma, dx, dgamma, dbeta = _norm_backward_args(
        dout, x, mean, rstd, gamma, dx, per_row=False)
    _core.batchnorm_backward(dout, x, mean, rstd, gamma, dx, dgamma, dbeta)
    return dx, dgamma, dbeta


def dropout(x, rate, seed, offset=0, out=None):
    """Inverted dropout: ``out = x * keep / (1 - rate)``, keep drawn with
    probability 1 - rate from a counter-based generator at positions
    ``offset .. offset + x.size - 1`` of the stream of ``seed``. The backward
    is the same call on the gradient with the same seed and offset."""
    dt = _dtype_of("x", x)
    x = _input("x", x, dt, 2)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ValueError(f"rate: expected a number in [0, 1), got {rate!r}")
    for name, v in (("seed", seed), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < 2**64:
            raise ValueError(f"{name}: expected an integer in [0, 2**64), got {v!r}")
    out = _output("out", out, dt, x.shape)
    _in_place_or_apart("out", out, x=x)
    _core.dropout(x, out, float(rate), int(seed), int(offset))
    return out


def sum_squares(x):
    """``sum(x**2)`` of any float array, accumulated in float64."""
    _dtype_of("x", x)
    return _core.sum_squares(np.require(x, requirements=['C', 'A']).reshape(-1))


def layernorm_forward(x, gamma=None, beta=None, epsilon=1e-3, out=None):
    """LayerNormalization forward over the last axis (formula in
    fastgrad.layers.LayerNormalization), the same in training and inference.

    x is (batch, features); gamma, beta (features,) or None (scale 1, shift
    0). Returns ``(out, mean, rstd)`` with mean and rstd = 1 / sqrt(var +
    epsilon) as float64 (batch,), which layernorm_backward takes."""
    dt = _dtype_of("x", x)
    x = _input("x", x, dt, 2)
    f = x.shape[1]
    if f < 1:
        raise ValueError(f"x: expected at least one feature, got shape {x.shape}")
    epsilon = _real("epsilon", epsilon)
    if not epsilon > 0:
        raise ValueError(f"epsilon: expected a positive number, got {epsilon!r}")
    gamma = None if gamma is None else _input("gamma", gamma, dt, 1, (f,))
    beta = None if beta is None else _input("beta", beta, dt, 1, (f,))
    out = _output("out", out, dt, x.shape)
    _in_place_or_apart("out", out, x=x)
    _no_overlap("out", out, gamma, beta)
    mean, rstd = np.empty(x.shape[0]), np.empty(x.shape[0])
    _core.layernorm_forward(x, gamma, beta, out, mean, rstd, epsilon)
    return out, mean, rstd


def layernorm_backward(dout, x, mean, rstd, gamma=None, dx=None):
    """LayerNormalization backward, per row (B rows, F features)::

        xhat = (x - mean) * rstd;  g = dout * gamma
        dx = rstd * (g - g.mean(1) - xhat * (g * xhat).mean(1))
        dgamma = (dout * xhat).sum(0);  dbeta = dout.sum(0)

    Returns ``(dx, dgamma, dbeta)``."""
    dout, x, mean, rstd, gamma, dx, dgamma, dbeta = _norm_backward_args(
        dout, x, mean, rstd, gamma, dx, per_row=True)
    _core.layernorm_backward(dout, x, mean, rstd, gamma, dx, dgamma, dbeta,
                             np.empty(_core.LAYERNORM_WORK * x.shape[1]))
    return dx, dgamma, dbeta


def _relu_options(negative_slope, threshold, max_value):
    slope, threshold = _real("negative_slope", negative_slope), _real("threshold", threshold)
    cap = math.inf if max_value is None else _real("max_value", max_value)
    for name, v in (("negative_slope", slope), ("threshold", threshold), ("max_value", cap)):
        if not v >= 0:
            raise ValueError(f"{name}: expected a number >= 0, got {v!r}")
    return slope, threshold, cap


def relu_forward(x, negative_slope=0.0, max_value=None, threshold=0.0, out=None):
    """Keras 3's relu with its options (max_value None: no cap)::

        out = x if threshold < x < max_value, max_value above it,
              negative_slope * (x - threshold) for x <= threshold

    Returns ``out``."""
    dt = _dtype_of("x", x)
    x = _input("x", x, dt, 2)
    options = _relu_options(negative_slope, threshold, max_value)
    out = _output("out", out, dt, x.shape)
    _in_place_or_apart("out", out, x=x)
    _core.relu_forward(x, out, *options)
    return out


def relu_backward(dout, x, negative_slope=0.0, max_value=None, threshold=0.0, dx=None):
    """``dx = dout * relu'(x)``: 1 on (threshold, max_value), 0 above,
    negative_slope at or below threshold. Returns ``dx``."""
    dt = _dtype_of("dout", dout)
    dout = _input("dout", dout, dt, 2)
    x = _input("x", x, dt, 2, dout.shape)
    options = _relu_options(negative_slope, threshold, max_value)
    dx = _output("dx", dx, dt, dout.shape)
    _in_place_or_apart("dx", dx, dout=dout, x=x)
    _core.relu_backward(dout, x, dx, *options)
    return dx


def prelu_forward(x, alpha, out=None):
    """PReLU: ``out = x if x > 0 else alpha * x``, alpha (features,). Returns ``out``."""
    dt = _dtype_of("x", x)
    x = _input("x", x, dt, 2)
    alpha = _input("alpha", alpha, dt, 1, (x.shape[1],))
    out = _output("out", out, dt, x.shape)
    _in_place_or_apart("out", out, x=x)
    _no_overlap("out", out, alpha)
    _core.prelu_forward(x, alpha, out)
    return out


def prelu_backward(dout, x, alpha, dx=None):
    """PReLU backward: ``dx = dout * (1 if x > 0 else alpha)`` and
    ``dalpha = (dout * minimum(x, 0)).sum(0)``. Returns ``(dx, dalpha)``."""
    dt = _dtype_of("dout", dout)
    dout = _input("dout", dout, dt, 2)
    x = _input("x", x, dt, 2, dout.shape)
    alpha = _input("alpha", alpha, dt, 1, (x.shape[1],))
    dx = _output("dx", dx, dt, dout.shape)
    _in_place_or_apart("dx", dx, dout=dout)
    _no_overlap("dx", dx, x, alpha)
    dalpha = np.empty(x.shape[1], dt)
    _core.prelu_backward(dout, x, alpha, dx, dalpha)
    return dx, dalpha
