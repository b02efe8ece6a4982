"""Learning-rate schedules: ``schedule(step) -> float`` with step the number
of optimizer steps already taken (0 for the first). The optimizer evaluates
the schedule once per step; its kernel gets a number. Names, argument
positions and defaults are Keras 3's; ``name`` only labels the schedule.

    ExponentialDecay(initial_learning_rate, decay_steps, decay_rate,
                     staircase=False, name="ExponentialDecay")
        lr0 * decay_rate ** (step / decay_steps)   (staircase: exponent floored)
    PiecewiseConstantDecay(boundaries, values, name="PiecewiseConstant")
        values[0] for step <= boundaries[0], values[i] for
        boundaries[i-1] < step <= boundaries[i], values[-1] after the last
    CosineDecay(initial_learning_rate, decay_steps, alpha=0.0,
                name="CosineDecay", warmup_target=None, warmup_steps=0)
        decay(s, lr) = lr * ((1 - alpha) * (1 + cos(pi * s / decay_steps)) / 2 + alpha)
        warmup_target None: decay(min(step, decay_steps), initial_learning_rate)
                            (no warmup: warmup_steps is ignored, as in Keras)
        otherwise: step < warmup_steps: linear from initial_learning_rate to
                   warmup_target, initial + (target - initial) * step / warmup_steps;
                   then decay(min(step - warmup_steps, decay_steps), warmup_target)
    InverseTimeDecay(initial_learning_rate, decay_steps, decay_rate,
                     staircase=False, name="InverseTimeDecay")
        lr0 / (1 + decay_rate * step / decay_steps)   (staircase: the ratio floored)
    PolynomialDecay(initial_learning_rate, decay_steps, end_learning_rate=0.0001,
                    power=1.0, cycle=False, name="PolynomialDecay")
        (lr0 - end) * (1 - s / D) ** power + end, with s = min(step, decay_steps)
        and D = decay_steps; cycle: s = step and D = decay_steps *
        ceil(step / decay_steps) (1 at step 0), so the decay restarts from a
        lower peak each period
    CosineDecayRestarts(initial_learning_rate, first_decay_steps, t_mul=2.0,
                        m_mul=1.0, alpha=0.0, name="SGDRDecay")
        SGDR (Loshchilov & Hutter 2017): period i lasts first_decay_steps *
        t_mul**i steps; within it, with f the fraction of the period done,
        lr0 * ((1 - alpha) * m_mul**i * (1 + cos(pi f)) / 2 + alpha)
"""
import math
import numbers

from fastgrad._utils import Hyper, Registry, check_real


class LearningRateSchedule:
    def __call__(self, step):
        raise NotImplementedError

    def get_config(self):
        return dict(vars(self))


def _check_name(name, value):
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name}: expected a string or None, got {value!r}")
    return value


def _step_count(name, value, **bounds):
    """check_real, an integer kept an int (as Keras' configs hold step counts)."""
    checked = check_real(name, value, **bounds)
    return int(value) if isinstance(value, numbers.Integral) else checked


def _check_list(name, values, check=check_real, **bounds):
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"{name}: expected a list of numbers, got {values!r}") from None
    return [check(f"{name}[{i}]", v, **bounds) for i, v in enumerate(values)]


def _rate():    # a learning rate: finite, >= 0
    return Hyper(check_real, low=0.0)


def _steps():
    return Hyper(_step_count, low=0.0, low_open=True)


class _TimeDecay(LearningRateSchedule):
    """The arguments of the decays in ``step / decay_steps`` (floored when
    ``staircase``)."""

    initial_learning_rate, decay_steps = _rate(), _steps()
    name = Hyper(_check_name)

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase, name):
        self.initial_learning_rate, self.decay_steps = initial_learning_rate, decay_steps
        self.decay_rate, self.staircase, self.name = decay_rate, bool(staircase), name

    def _progress(self, step):
        p = step / self.decay_steps
        return math.floor(p) if self.staircase else p


class ExponentialDecay(_TimeDecay):
    """Exponential decay: ``initial_learning_rate * decay_rate ** (step /
    decay_steps)``, the exponent floored when ``staircase``."""

    decay_rate = Hyper(check_real, low=0.0, low_open=True)

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False,
                 name="ExponentialDecay"):
        super().__init__(initial_learning_rate, decay_steps, decay_rate, staircase, name)

    def __call__(self, step):
        return self.initial_learning_rate * self.decay_rate ** self._progress(step)


class PiecewiseConstantDecay(LearningRateSchedule):
    """``values[0]`` up to and including ``boundaries[0]``, then ``values[i]``
    for ``boundaries[i-1] < step <= boundaries[i]``, ``values[-1]`` after.
    Values are learning rates: finite and >= 0."""

    boundaries = Hyper(_check_list, check=_step_count)
    values = Hyper(_check_list, low=0.0)
    name = Hyper(_check_name)

    def __init__(self, boundaries, values, name="PiecewiseConstant"):
        self.boundaries, self.values = boundaries, values
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError(f"values: expected {len(self.boundaries) + 1} values (one more "
                             f"than boundaries), got {len(self.values)}")
        if any(b >= a for b, a in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError("boundaries: expected increasing numbers")
        self.name = name

    def __call__(self, step):
        for b, v in zip(self.boundaries, self.values):
            if step <= b:
                return v
        return self.values[-1]


class CosineDecay(LearningRateSchedule):
    """Cosine decay (Loshchilov & Hutter 2017) with an optional linear
    warmup, Keras 3's form (see the module docstring). Without
    ``warmup_target`` there is no warmup and ``warmup_steps`` is ignored;
    with it, the rate rises from ``initial_learning_rate`` to
    ``warmup_target`` over ``warmup_steps`` steps, then decays from
    ``warmup_target`` to ``warmup_target * alpha`` over ``decay_steps``."""

    initial_learning_rate, decay_steps, alpha = _rate(), _steps(), _rate()
    warmup_target = Hyper(check_real, low=0.0, none=True)
    warmup_steps = Hyper(_step_count, low=0.0)
    name = Hyper(_check_name)

    def __init__(self, initial_learning_rate, decay_steps, alpha=0.0, name="CosineDecay",
                 warmup_target=None, warmup_steps=0):
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.alpha = alpha
        self.name = name
        self.warmup_target = warmup_target
        self.warmup_steps = warmup_steps

    def _decay(self, s, start):
        cos = 0.5 * (1.0 + math.cos(math.pi * min(s, self.decay_steps) / self.decay_steps))
        return start * ((1.0 - self.alpha) * cos + self.alpha)

    def __call__(self, step):
        if self.warmup_target is None:
            return self._decay(step, self.initial_learning_rate)
        if step < self.warmup_steps:
            frac = step / self.warmup_steps
            return self.initial_learning_rate + frac * (self.warmup_target
                                                        - self.initial_learning_rate)
        return self._decay(step - self.warmup_steps, self.warmup_target)


class InverseTimeDecay(_TimeDecay):
    """Inverse time decay: ``initial_learning_rate / (1 + decay_rate * step /
    decay_steps)``, the ratio floored when ``staircase``."""

    decay_rate = Hyper(check_real, low=0.0)

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False,
                 name="InverseTimeDecay"):
        super().__init__(initial_learning_rate, decay_steps, decay_rate, staircase, name)

    def __call__(self, step):
        return self.initial_learning_rate / (1.0 + self.decay_rate * self._progress(step))


class PolynomialDecay(LearningRateSchedule):
    """Polynomial decay from ``initial_learning_rate`` to
    ``end_learning_rate`` over ``decay_steps`` (see the module docstring);
    with ``cycle`` the decay restarts, its span stretched to the next
    multiple of ``decay_steps``."""

    initial_learning_rate, decay_steps, end_learning_rate = _rate(), _steps(), _rate()
    power = Hyper(check_real, low=0.0)
    name = Hyper(_check_name)

    def __init__(self, initial_learning_rate, decay_steps, end_learning_rate=0.0001, power=1.0,
                 cycle=False, name="PolynomialDecay"):
        self.initial_learning_rate, self.decay_steps = initial_learning_rate, decay_steps
        self.end_learning_rate, self.power = end_learning_rate, power
        self.cycle = bool(cycle)
        self.name = name

    def __call__(self, step):
        span = self.decay_steps
        if self.cycle:
            span = span * (math.ceil(step / self.decay_steps) if step else 1)
        else:
            step = min(step, span)
        start, end = self.initial_learning_rate, self.end_learning_rate
        return (start - end) * (1.0 - step / span) ** self.power + end


class CosineDecayRestarts(LearningRateSchedule):
    """Cosine decay with warm restarts (SGDR, Loshchilov & Hutter 2017): the
    i-th period (from 0) lasts ``first_decay_steps * t_mul**i`` steps and
    starts from ``m_mul**i`` times the first peak (module docstring)."""

    initial_learning_rate, first_decay_steps, alpha = _rate(), _steps(), _rate()
    name = Hyper(_check_name)

    def __init__(self, initial_learning_rate, first_decay_steps, t_mul=2.0, m_mul=1.0,
                 alpha=0.0, name="SGDRDecay"):
        self.initial_learning_rate = initial_learning_rate
        self.first_decay_steps = first_decay_steps
        self._t_mul = check_real("t_mul", t_mul, low=0.0, low_open=True)
        self._m_mul = check_real("m_mul", m_mul, low=0.0)
        self.alpha = alpha
        self.name = name

    def _period(self, done):
        """(i, fraction of period i done) for ``done`` first periods' worth
        of steps: the closed form, then mended by the bounds it must meet
        (a logarithm can land on the wrong side of a restart)."""
        t = self._t_mul
        if t == 1.0:
            i = math.floor(done)
            return i, done - i

        def start(j):   # periods before period j, in first periods
            return (1.0 - t ** j) / (1.0 - t)

        i = max(0, math.floor(math.log(1.0 - done * (1.0 - t)) / math.log(t)))
        while i > 0 and start(i) > done:
            i -= 1
        while start(i + 1) <= done:
            i += 1
        return i, (done - start(i)) / t ** i

    def __call__(self, step):
        i, frac = self._period(step / self.first_decay_steps)
        cos = 0.5 * self._m_mul ** i * (1.0 + math.cos(math.pi * frac))
        return self.initial_learning_rate * ((1.0 - self.alpha) * cos + self.alpha)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate,
                "first_decay_steps": self.first_decay_steps, "t_mul": self._t_mul,
                "m_mul": self._m_mul, "alpha": self.alpha, "name": self.name}


REGISTRY = Registry("schedule", LearningRateSchedule, {}, classes=(
    ExponentialDecay, PiecewiseConstantDecay, CosineDecay, InverseTimeDecay, PolynomialDecay,
    CosineDecayRestarts))


def get(identifier):
    """A schedule from a ``serialize`` dict or a schedule (returned as it is)."""
    return REGISTRY.get(identifier)


def serialize(schedule):
    """``{"class_name": "CosineDecay", "config": schedule.get_config()}``."""
    return REGISTRY.serialize(schedule)


def deserialize(config):
    """The schedule a ``serialize`` dict describes; configs written before
    schedules had a ``name`` get the default name."""
    return REGISTRY.deserialize(config)
