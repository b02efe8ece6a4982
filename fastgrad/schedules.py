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
"""
import math


class LearningRateSchedule:
    def __call__(self, step):
        raise NotImplementedError

    def get_config(self):
        return dict(vars(self))


def _finite(v):
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _name(name):
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name: expected a string or None, got {name!r}")
    return name


def _number(name, v, positive=True):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v) \
            or (v <= 0 if positive else v < 0):
        raise ValueError(f"{name}: expected a {'positive' if positive else 'non-negative'} "
                         f"number, got {v!r}")
    return v


class ExponentialDecay(LearningRateSchedule):
    """Exponential decay: ``initial_learning_rate * decay_rate ** (step /
    decay_steps)``, the exponent floored when ``staircase``."""

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False,
                 name="ExponentialDecay"):
        self.initial_learning_rate = float(_number("initial_learning_rate", initial_learning_rate, False))
        self.decay_steps = _number("decay_steps", decay_steps)
        self.decay_rate = float(_number("decay_rate", decay_rate))
        self.staircase = bool(staircase)
        self.name = _name(name)

    def __call__(self, step):
        p = step / self.decay_steps
        if self.staircase:
            p = math.floor(p)
        return self.initial_learning_rate * self.decay_rate ** p


class PiecewiseConstantDecay(LearningRateSchedule):
    """``values[0]`` up to and including ``boundaries[0]``, then ``values[i]``
    for ``boundaries[i-1] < step <= boundaries[i]``, ``values[-1]`` after."""

    def __init__(self, boundaries, values, name="PiecewiseConstant"):
        boundaries, values = list(boundaries), [float(v) for v in values]
        if len(values) != len(boundaries) + 1:
            raise ValueError(f"values: expected {len(boundaries) + 1} values (one more than "
                             f"boundaries), got {len(values)}")
        if any(b >= a for b, a in zip(boundaries, boundaries[1:])):
            raise ValueError("boundaries: expected increasing numbers")
        self.boundaries, self.values = boundaries, values
        self.name = _name(name)

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

    def __init__(self, initial_learning_rate, decay_steps, alpha=0.0, name="CosineDecay",
                 warmup_target=None, warmup_steps=0):
        self.initial_learning_rate = float(_number("initial_learning_rate", initial_learning_rate, False))
        self.decay_steps = _number("decay_steps", decay_steps)
        self.alpha = float(_number("alpha", alpha, False))
        self.name = _name(name)
        self.warmup_target = None if warmup_target is None else float(
            _number("warmup_target", warmup_target, False))
        self.warmup_steps = _number("warmup_steps", warmup_steps, False)

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


_NAMES = {c.__name__: c for c in (ExponentialDecay, PiecewiseConstantDecay, CosineDecay)}


def serialize(schedule):
    return {"class_name": type(schedule).__name__, "config": schedule.get_config()}


def deserialize(config):
    """The schedule a ``serialize`` dict describes; configs written before
    schedules had a ``name`` get the default name."""
    if not isinstance(config, dict) or config.get("class_name") not in _NAMES:
        raise ValueError(f"learning_rate: unknown schedule {config!r}")
    return _NAMES[config["class_name"]](**config.get("config", {}))
