"""Optimizers (Keras 3 names, arguments and defaults).

A model keeps all trainable parameters in one flat buffer and their
gradients in another; an optimizer keeps its moments in more flat buffers
aligned with them. ``apply()`` is one step in two compiled passes:

1. over the gradients: add the regularizers' gradients, and each tensor's
   squared L2 norm, accumulated in float64 in a fixed order;
2. over everything, once: clip (scale from the norms, then ``clipvalue``),
   decoupled weight decay, the optimizer's moments and update, and the
   weight constraints.

Clipping (at most one of them, as in Keras):
    clipvalue         g = clip(g, -clipvalue, clipvalue)
    clipnorm          each tensor: g *= min(1, clipnorm / ||g||)
    global_clipnorm   all tensors: g *= min(1, global_clipnorm / sqrt(sum ||g_t||^2))
``weight_decay``: w -= learning_rate * weight_decay * w before the update.

A step whose gradients are not all finite never reaches the weights: with
``nonfinite="skip"`` (default) the weights, the moments and, in a model's
training step, BatchNormalization's moving statistics stay as they were
before the step, and ``skipped_steps`` counts it; with
``nonfinite="raise"`` a ``FloatingPointError`` names the first such tensor.
Finite gradients can still overflow the weights' range (say SGD with a
learning rate of 1e30); the update pass notices at no cost, and the step,
already applied, is reported: ``StepRecord.overflow`` names the tensor,
and a RuntimeWarning (``nonfinite="skip"``) or FloatingPointError
(``"raise"``) says so.

Moving average and accumulation (Keras 3's base-optimizer arguments, each
one flat buffer allocated at build and updated by the same compiled pass):
    use_ema, ema_momentum (0.99), ema_overwrite_frequency (None)
        after each step avg = ema_momentum * avg + (1 - ema_momentum) * w
        (ema_momentum taken as 0 while ``iterations`` below is 0, so the
        average starts at the weights); every ema_overwrite_frequency steps
        (when (iterations + 1) % frequency == 0) the weights become avg; at
        the end of ``fit`` too (``finalize_variable_values``). Weight
        constraints apply after it, as in Keras.
    gradient_accumulation_steps k (None, or an int >= 2)
        steps whose ``(self.iterations + 1) % k != 0`` only add their
        gradients into a buffer; the k-th averages, (g + sum) / k, then
        clips, decays and updates as usual. Schedules see every call
        (``self.iterations`` counts them all, Keras's internal count); bias
        corrections and the EMA see ``self.iterations // k``, as Keras's
        ``iterations`` property gives. A record's norms are those of the
        micro-step's gradient, and on an update step those of the average.
        A step with non-finite gradients is skipped without touching the
        sum.

Hyperparameters are checked whenever they are set (ValueError naming the
argument). A learning-rate schedule is evaluated at every step; a value
that is not a finite number >= 0 refuses the step with a ValueError naming
the schedule and the step, before anything changes.

On x86-64, pass 2 runs with subnormal numbers flushed to zero (read as
zero and written as zero), as TensorFlow runs Keras on the CPU: a moment
decaying through the subnormal range, as Adam's ``v`` does for thousands of
steps once a gradient has gone to zero, would otherwise make the pass tens
of times slower, depending on the CPU. The caller's floating-point mode is
restored after.

Update formulas are in each class's docstring and in csrc/fastgrad_impl.h.

There is no Adafactor (Shazeer & Stern 2018). Its step needs two reductions
over a whole tensor before any element of it can change: the RMS of the
weights, which sets the step size, and the RMS of the update, which clips
it; with the row and column means of g^2 that factor the second moment of
each 2-D tensor, that is three passes over every tensor where the other
optimizers take one fused pass. Keras's form also keeps a full-size second
moment, so the memory saving that motivates the method would not
materialize.
"""
import math
import warnings

import numpy as np

from fastgrad import _core, schedules  # noqa: F401  (also fg.optimizers.schedules, as in Keras)
from fastgrad._utils import Hyper, Registry, check_choice, check_int, check_real

# settings the compiled step is configured with when the optimizer is built
_STEP_SETTINGS = frozenset({"momentum", "rho", "beta_1", "beta_2", "epsilon", "weight_decay",
                            "clipvalue", "clipnorm", "global_clipnorm", "nesterov",
                            "centered", "amsgrad"})


class StepRecord:
    """What one optimizer step saw.

    grad_norms   (tensors,) L2 norm of each raw gradient (with regularizer
                 gradients, before clipping); a view overwritten next step
    global_norm  sqrt of the sum of their squares
    clip_scale   (tensors,) factor applied to each gradient (1 = not clipped)
    clipped      whether any clipping changed a gradient
    nonfinite    whether a gradient held inf or NaN (the step was then skipped)
    bad_tensor   name of the first tensor with a non-finite gradient, or None
    penalty      the regularizers' loss at the weights before the step
    update_ratio (tensors,) ||w_new - w_old|| / ||w_new|| of each tensor when
                 the optimizer tracks updates (``track_updates()``), else None;
                 w_new is the optimizer's result before any weight constraint
    overflow     name of the first tensor whose weights are not all finite
                 after this (applied) step, or None
    """

    __slots__ = ("step", "learning_rate", "grad_norms", "global_norm", "clip_scale",
                 "clipped", "nonfinite", "bad_tensor", "penalty", "update_ratio",
                 "overflow")

    def __init__(self, step, learning_rate, grad_norms, global_norm, clip_scale,
                 clipped, nonfinite, bad_tensor=None, penalty=0.0):
        self.step, self.learning_rate = step, learning_rate
        self.grad_norms, self.global_norm = grad_norms, global_norm
        self.clip_scale, self.clipped = clip_scale, clipped
        self.nonfinite, self.bad_tensor = nonfinite, bad_tensor
        self.penalty = penalty
        self.update_ratio = None
        self.overflow = None


# Keras 3 optimizer settings without a fastgrad counterpart, and the values
# at which they change nothing (what from_config accepts)
_KERAS_DEFAULTS = {"loss_scale_factor": None}


# hyperparameters, checked whenever they are set
def _clip():
    return Hyper(check_real, low=0.0, low_open=True, none=True)


def _decay():   # in [0, 1)
    return Hyper(check_real, low=0.0, high=1.0, high_open=True)


def _epsilon():
    return Hyper(check_real, low=0.0, low_open=True)


class Optimizer:
    """Base class: clipping, weight decay, schedules and the fused step."""

    _kind = None
    _slots = ()  # which of the moment buffers m, v, vmax this optimizer uses
    weight_decay = Hyper(check_real, low=0.0, none=True)
    clipnorm, clipvalue, global_clipnorm = _clip(), _clip(), _clip()
    nonfinite = Hyper(check_choice, choices=("skip", "raise"))
    ema_momentum = Hyper(check_real, low=0.0, high=1.0)
    ema_overwrite_frequency = Hyper(check_int, low=1, none=True)
    gradient_accumulation_steps = Hyper(check_int, low=2, none=True)

    def __init__(self, learning_rate=0.001, weight_decay=None, clipnorm=None,
                 clipvalue=None, global_clipnorm=None, nonfinite="skip", name=None,
                 use_ema=False, ema_momentum=0.99, ema_overwrite_frequency=None,
                 gradient_accumulation_steps=None):
        self.use_ema = bool(use_ema)
        self.ema_momentum = ema_momentum
        self.ema_overwrite_frequency = ema_overwrite_frequency
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self._u_product = (0, None, 1.0)   # Nadam: (step, beta_1, product)
        self._learning_rate = None
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.clipnorm, self.clipvalue = clipnorm, clipvalue
        self.global_clipnorm = global_clipnorm
        if sum(c is not None for c in (clipnorm, clipvalue, global_clipnorm)) > 1:
            raise ValueError("clipnorm, clipvalue, global_clipnorm: only one of them "
                             "can be set")
        self.nonfinite = nonfinite
        self.name = name or type(self).__name__.lower()
        self.iterations = 0      # steps applied
        self.skipped_steps = 0   # steps refused for non-finite gradients
        self.last_step = None
        self._params = None
        self._track = False
        self._update_wishes = {}   # GradientMonitor -> wants update ratios

    @property
    def learning_rate(self):
        """The rate of the next step, a float: as in Keras 3, under a
        schedule this is the schedule's value at ``iterations`` (the
        schedule itself is ``_learning_rate``). Set it to a float >= 0 or
        a schedule; as in Keras, a schedule may replace a float or another
        schedule, but a float cannot replace a schedule (TypeError)."""
        return self.current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, value):
        if isinstance(value, schedules.LearningRateSchedule):
            self._learning_rate = value
            return
        if isinstance(self._learning_rate, schedules.LearningRateSchedule):
            raise TypeError(f"learning_rate: this optimizer was created with a schedule "
                            f"({type(self._learning_rate).__name__}), so its rate cannot be "
                            f"set to {value!r}; create it with a float learning_rate to set "
                            "the rate (as LearningRateScheduler does)")
        self._learning_rate = check_real("learning_rate", value, low=0.0)

    # -- state ------------------------------------------------------------
    def build(self, params, grads, tensors, frozen=None):
        """Bind to flat buffers. tensors: (name, offset, shape, regularizer,
        constraint) per trainable tensor, in buffer order. frozen: None, or
        a (tensors,) uint8 array the owner keeps, 1 for a tensor the steps
        leave alone (its weights, moments and penalty; a layer with
        ``trainable = False``); read at every step."""
        T = len(tensors)
        if frozen is not None and (not isinstance(frozen, np.ndarray)
                                   or frozen.dtype != np.uint8 or frozen.shape != (T,)):
            raise ValueError(f"frozen: expected a ({T},) uint8 array, got {frozen!r}")
        offset = np.zeros(T + 1, np.int64)
        l1, l2, cvalue = np.zeros(T), np.zeros(T), np.zeros(T)
        constraint = np.full(T, _core.CONSTRAINT_CODES[None], np.intc)
        cols = np.zeros(T, np.int64)
        for t, (_, off, shape, reg, con) in enumerate(tensors):
            offset[t], offset[t + 1] = off, off + int(np.prod(shape))
            if reg is not None:
                l1[t], l2[t] = reg.l1, reg.l2
            if con is not None:
                # layers refuse any other constraint when they are created
                kind = type(con).__name__
                constraint[t] = _core.CONSTRAINT_CODES[kind]
                if kind == "MaxNorm":
                    cvalue[t] = con.max_value
                    # axis 0 of a (rows, cols) kernel: one norm per column;
                    # a vector: one norm over it all
                    cols[t] = shape[-1] if len(shape) == 2 else 0
                elif kind == "ClipValue":
                    cvalue[t] = con.clip_value
        self._scale = np.ones(T)
        self._table = _core.TensorTable(offset, l1, l2, self._scale, constraint, cvalue, cols,
                                        frozen)
        self._config = self._step_config()
        self._names = [t[0] for t in tensors]
        self._upd, self._wsq, self._ratio = np.zeros(T), np.zeros(T), np.zeros(T)
        self._sumsq, self._norms = np.zeros(T), np.zeros(T)
        self._params, self._grads = params, grads
        self.track_updates(self._track)   # also when asked before the first build
        old = getattr(self, "_moments", None)
        self._moments = {s: np.zeros_like(params)
                         for s in self._slots_used() + self._extra_slots()}
        self._init_moments()
        if old is not None and all(k in old and old[k].shape == params.shape
                                   for k in self._moments):
            for k in self._moments:
                self._moments[k][...] = old[k]

    def _slots_used(self):
        return self._slots

    def _extra_slots(self):
        """The buffers of the moving average and of accumulation, when on."""
        return (("ema",) if self.use_ema else ()) + \
            (("acc",) if self.gradient_accumulation_steps else ())

    def finalize_variable_values(self):
        """With ``use_ema``, set the weights to their moving average (as
        Keras does when ``fit`` ends); otherwise nothing."""
        if self.use_ema and self._params is not None and "ema" in self._moments \
                and self.iterations > 0:
            self._params[...] = self._moments["ema"]

    def _nadam_product(self, step):
        """prod_{i<=step} beta_1 (1 - 0.96^i / 2), kept from step to step
        (in Keras's order of operations) and recomputed after a load."""
        done, b1, prod = self._u_product
        if b1 != self.beta_1 or done > step:
            done, prod = 0, 1.0
        for i in range(done + 1, step + 1):
            prod = prod * self.beta_1 * (1.0 - 0.5 * 0.96 ** i)
        self._u_product = (step, self.beta_1, prod)
        return prod

    def __setattr__(self, name, value):
        if name not in _STEP_SETTINGS or self.__dict__.get("_config") is None:
            super().__setattr__(name, value)
            return
        # a setting changed after build reaches the compiled step, or is
        # put back when the step refuses it (a second clipping, say)
        old = getattr(self, name)
        super().__setattr__(name, value)
        try:
            self._config = self._step_config()
        except (TypeError, ValueError):
            super().__setattr__(name, old)
            raise

    def _step_config(self):
        return _core.StepConfig(
            _core.OPTIMIZER_CODES[self._kind], weight_decay=self.weight_decay or 0.0,
            clipvalue=self.clipvalue or 0.0, clipnorm=self.clipnorm or 0.0,
            global_clipnorm=self.global_clipnorm or 0.0, **self._hyper())

    def _want_updates(self, owner, enabled):
        """Tracking on while any owner (a GradientMonitor) wants it; None
        withdraws the owner's wish."""
        wants = self._update_wishes
        if enabled is None:
            wants.pop(id(owner), None)
        else:
            wants[id(owner)] = bool(enabled)
        on = any(wants.values())
        if on != self._track:
            self.track_updates(on)

    def track_updates(self, enabled=True):
        """Also measure each tensor's update-to-weight ratio
        ||w_new - w_old|| / ||w_new|| in the update pass, w_new before any
        weight constraint (a little extra work per step; off by default). The
        GradientMonitor turns it on."""
        self._track = bool(enabled)
        if self._params is not None:
            if self._track:
                self._table.track_updates(self._upd, self._wsq, self._ratio)
            else:
                self._table.track_updates(None, None, None)

    def _init_moments(self):
        pass

    def variables(self):
        """The moment buffers by name (flat, aligned with the parameters)."""
        return dict(self._moments)

    def current_learning_rate(self):
        """The rate of the next step: the float, or the schedule's value at
        ``iterations``. A schedule's value that is not a finite number >= 0
        raises ValueError naming the schedule and the step, so ``apply``
        refuses the step before anything changes."""
        lr = self._learning_rate
        if not callable(lr):
            return lr
        try:
            value = lr(self.iterations)
        except OverflowError:   # Python's float power overflows by raising
            value = math.inf
        try:
            rate = float(value)
        except (TypeError, ValueError):
            rate = math.nan
        if not (rate >= 0 and math.isfinite(rate)):   # NaN fails both
            name = getattr(lr, "name", None)
            raise ValueError(f"learning_rate: the schedule {type(lr).__name__}"
                             f"{f' {name!r}' if name else ''} gave {value!r} at step "
                             f"{self.iterations} (the number of steps taken); expected a "
                             "finite number >= 0, so the step is refused and nothing changed")
        return rate

    # -- the step ---------------------------------------------------------
    def apply(self):
        """One step over the bound buffers. Returns (and keeps as
        ``last_step``) a StepRecord."""
        if self._params is None:
            raise RuntimeError("optimizer: not built; compile and build the model first")
        lr = self.current_learning_rate()
        m = self._moments
        for s in self._extra_slots():   # turned on after build
            if s not in m:
                m[s] = np.zeros_like(self._params)
        k, it = self.gradient_accumulation_steps, self.iterations
        update = not k or (it + 1) % k == 0
        bad, penalty, total, clipped = _core.grad_norms(
            self._sumsq, self._norms, self._grads, self._params, self._table, self._config,
            m["acc"] if k and update else None, k or 1)
        scale = self._scale
        if bad >= 0:
            self.skipped_steps += 1
            self.last_step = StepRecord(self.iterations, lr, self._norms, total, scale,
                                        False, True, self._names[bad], penalty)
            if self.nonfinite == "raise":
                raise FloatingPointError(f"gradient of {self._names[bad]} is not finite; "
                                         "the step was not applied")
            return self.last_step
        # counted before the compiled step: an interrupt arriving during it is
        # raised as it returns, and must find the count matching the weights
        self.iterations += 1
        n = it // k if k else it   # Keras's iterations: updates before this one
        kw = {}
        if k:
            kw.update(acc=m["acc"], accumulate=not update)
            clipped = clipped and update
        if self.use_ema:
            f = self.ema_overwrite_frequency
            kw.update(ema=m["ema"], ema_momentum=self.ema_momentum if n else 0.0,
                      ema_overwrite=bool(f) and (n + 1) % f == 0)
        if self._kind == "nadam" and update:
            kw["u_product"] = self._nadam_product(n + 1)
        try:
            over = _core.optimizer_step(self._params, m.get("m"), m.get("v"), m.get("vmax"),
                                        self._grads, self._table, self._config, lr,
                                        n + 1, **kw)
        except ValueError:   # refused before anything changed
            self.iterations -= 1
            raise
        rec = self.last_step = StepRecord(self.iterations, lr, self._norms, total, scale,
                                          clipped, False, None, penalty)
        if self._track:   # the step wrote the ratios
            rec.update_ratio = self._ratio
        if over >= 0:
            rec.overflow = self._names[over]
            msg = (f"the update of {rec.overflow} overflowed: its weights are not all finite "
                   f"after step {self.iterations}, whose gradients were finite (lower the "
                   "learning rate, or clip the gradients; or the weights were not finite "
                   "before)")
            if self.nonfinite == "raise":
                raise FloatingPointError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return rec

    # the subclass's own settings, in Keras's config order: its get_config
    # keys beyond the common ones, and (see _hyper) StepConfig's keywords
    _SETTINGS = ()

    def _hyper(self):
        """The update formula's settings, as keywords of _core.StepConfig."""
        return {k: getattr(self, k) for k in self._SETTINGS}

    def get_config(self):
        lr = self._learning_rate
        return {
            "name": self.name,
            "learning_rate": schedules.serialize(lr) if callable(lr) else lr,
            "weight_decay": self.weight_decay, "clipnorm": self.clipnorm,
            "clipvalue": self.clipvalue, "global_clipnorm": self.global_clipnorm,
            "nonfinite": self.nonfinite, "use_ema": self.use_ema,
            "ema_momentum": self.ema_momentum,
            "ema_overwrite_frequency": self.ema_overwrite_frequency,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            **{k: getattr(self, k) for k in self._SETTINGS},
        }

    @classmethod
    def from_config(cls, config):
        """The optimizer a ``get_config`` dict describes; a serialized
        schedule as learning rate is rebuilt."""
        config = dict(config)
        # Keras 3's settings that fastgrad lacks are taken at their defaults
        for key, default in _KERAS_DEFAULTS.items():
            if key in config:
                value = config.pop(key)
                if value != default:
                    raise ValueError(f"{key}: fastgrad's optimizers have no {key} (Keras's "
                                     f"default {default!r} only), got {value!r}")
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = schedules.deserialize(config["learning_rate"])
        return cls(**config)


class SGD(Optimizer):
    """Stochastic gradient descent, with momentum and Nesterov momentum
    (Sutskever et al. 2013), in Keras 3's form::

        momentum == 0:  w -= lr * g
        otherwise:      v = momentum * v - lr * g
                        w += v                      (nesterov: w += momentum * v - lr * g)
    """

    _kind = "sgd"
    _SETTINGS = ("momentum", "nesterov")
    momentum = _decay()

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.momentum = momentum
        self.nesterov = bool(nesterov)

    def _slots_used(self):
        return ("v",) if self.momentum else ()


class RMSprop(Optimizer):
    """RMSprop (Hinton, Coursera lecture 6e, 2012), Keras 3's form::

        v = rho * v + (1 - rho) * g^2
        centered: m = rho * m + (1 - rho) * g;  d = v - m^2 + epsilon
        else:     d = v + epsilon
        u = lr * g / sqrt(d)
        momentum: s = momentum * s + u;  w -= s      else: w -= u
    """

    _kind = "rmsprop"
    _SETTINGS = ("rho", "momentum", "epsilon", "centered")
    rho, momentum, epsilon = _decay(), _decay(), _epsilon()

    def __init__(self, learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7,
                 centered=False, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.rho, self.momentum, self.epsilon = rho, momentum, epsilon
        self.centered = bool(centered)

    def _slots_used(self):
        return ("v",) + (("m",) if self.centered else ()) + (("vmax",) if self.momentum else ())


class _Betas(Optimizer):
    """The arguments Adam, Nadam and Adamax share."""

    _slots = ("m", "v")
    _SETTINGS = ("beta_1", "beta_2", "epsilon")
    beta_1, beta_2, epsilon = _decay(), _decay(), _epsilon()

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon


class Adam(_Betas):
    """Adam (Kingma & Ba 2015), and AMSGrad (Reddi et al. 2018)::

        m = m + (1 - beta_1) * (g - m)
        v = v + (1 - beta_2) * (g^2 - v)
        amsgrad: vmax = max(vmax, v), used in place of v
        w -= lr * sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + epsilon)
    with t the 1-based step count.
    """

    _kind = "adam"
    _SETTINGS = _Betas._SETTINGS + ("amsgrad",)

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 amsgrad=False, **kwargs):
        super().__init__(learning_rate, beta_1, beta_2, epsilon, **kwargs)
        self.amsgrad = bool(amsgrad)

    def _slots_used(self):
        return ("m", "v") + (("vmax",) if self.amsgrad else ())


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019)::

        w -= lr * weight_decay * w,   then the Adam update.
    """

    def __init__(self, learning_rate=0.001, weight_decay=0.004, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-7, amsgrad=False, **kwargs):
        if weight_decay is None:
            raise ValueError("weight_decay: AdamW needs a number, got None")
        super().__init__(learning_rate, beta_1, beta_2, epsilon, amsgrad,
                         weight_decay=weight_decay, **kwargs)


class Adagrad(Optimizer):
    """Adagrad (Duchi et al. 2011), Keras 3's form::

        a = a + g^2          (a starts at initial_accumulator_value)
        w -= lr * g / sqrt(a + epsilon)
    """

    _kind = "adagrad"
    _SETTINGS = ("initial_accumulator_value", "epsilon")
    _slots = ("v",)
    initial_accumulator_value, epsilon = Hyper(check_real, low=0.0), _epsilon()

    def __init__(self, learning_rate=0.001, initial_accumulator_value=0.1, epsilon=1e-7,
                 **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.initial_accumulator_value = initial_accumulator_value
        self.epsilon = epsilon

    def _init_moments(self):
        self._moments["v"].fill(self.initial_accumulator_value)

    def _hyper(self):   # the accumulator's start is not part of the step
        return {"epsilon": self.epsilon}


class Nadam(_Betas):
    """Adam with Nesterov momentum (Dozat 2016), Keras 3's form, with
    u_i = beta_1 (1 - 0.96^i / 2) and U_t = u_1 ... u_t::

        m = m + (1 - beta_1) * (g - m)
        v = v + (1 - beta_2) * (g^2 - v)
        m_hat = u_{t+1} m / (1 - U_t u_{t+1}) + (1 - u_t) g / (1 - U_t)
        w -= lr * m_hat / (sqrt(v / (1 - beta_2^t)) + epsilon)
    """

    _kind = "nadam"


class Adamax(_Betas):
    """Adamax, Adam under the infinity norm (Kingma & Ba 2015, section 7)::

        m = m + (1 - beta_1) * (g - m)
        u = max(beta_2 * u, |g|)
        w -= lr * m / ((1 - beta_1^t) * (u + epsilon))
    """

    _kind = "adamax"


class Adadelta(Optimizer):
    """Adadelta (Zeiler 2012), Keras 3's form (the learning rate scales the
    step; Keras's default 0.001 is far below the paper's 1.0)::

        a = rho * a + (1 - rho) * g^2
        d = -sqrt(s + epsilon) * g / sqrt(a + epsilon)
        s = rho * s + (1 - rho) * d^2
        w += lr * d
    """

    _kind = "adadelta"
    _SETTINGS = ("rho", "epsilon")
    _slots = ("m", "v")
    rho, epsilon = _decay(), _epsilon()

    def __init__(self, learning_rate=0.001, rho=0.95, epsilon=1e-7, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.rho, self.epsilon = rho, epsilon


class Lion(Optimizer):
    """Lion, evolved sign momentum (Chen et al. 2023)::

        w -= lr * sign(beta_1 * m + (1 - beta_1) * g)      (sign(0) = 0)
        m = beta_2 * m + (1 - beta_2) * g
    beta_1 in (0, 1], beta_2 in [0, 1). Its steps have the size of the
    learning rate in every coordinate: use a rate 3 to 10 times smaller
    than Adam's.
    """

    _kind = "lion"
    _SETTINGS = ("beta_1", "beta_2")
    _slots = ("m",)
    beta_1 = Hyper(check_real, low=0.0, low_open=True, high=1.0)
    beta_2 = _decay()

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.99, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.beta_1, self.beta_2 = beta_1, beta_2


REGISTRY = Registry("optimizer", Optimizer, {   # lower-case names, as in Keras
    "sgd": SGD, "rmsprop": RMSprop, "adam": Adam, "adamw": AdamW, "adagrad": Adagrad,
    "nadam": Nadam, "adamax": Adamax, "adadelta": Adadelta, "lion": Lion})


def get(identifier):
    """An optimizer from a name ("sgd", "rmsprop", "adam", "adamw",
    "adagrad", "nadam", "adamax", "adadelta", "lion", any case, or a class
    name), a ``serialize`` dict, or an
    Optimizer instance (returned as it is)."""
    return REGISTRY.get(identifier)


def serialize(optimizer):
    """``{"class_name": "Adam", "config": optimizer.get_config()}``; a
    schedule given as learning rate is serialized inside the config."""
    return REGISTRY.serialize(optimizer)


def deserialize(config):
    """The optimizer a ``serialize`` dict describes (with a fresh state)."""
    return REGISTRY.deserialize(config)
