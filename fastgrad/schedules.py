"""Learning-rate schedules: ``schedule(step) -> float`` with step the number
of optimizer steps already taken (0 for the first). The optimizer evaluates
the schedule once per step; its kernel gets a number.

    ExponentialDecay    lr0 * decay_rate ** (step / decay_steps)
                        (staircase: the exponent is floored)
    PiecewiseConstantDecay(boundaries, values)
                        values[i] for boundaries[i-1] < step <= boundaries[i]
    CosineDecay         warmup (optional): linear from initial_learning_rate
                        to warmup_target over warmup_steps; then
                        target * ((1 - alpha) * (1 + cos(pi * s / decay_steps)) / 2 + alpha),
                        s = min(step - warmup_steps, decay_steps)
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


def _number(name, v, positive=True):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v) \
            or (v <= 0 if positive else v < 0):
        raise ValueError(f"{name}: expected a {'positive' if positive else 'non-negative'} "
                         f"number, got {v!r}")
    return v


class ExponentialDecay(LearningRateSchedule):
    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False):
        self.initial_learning_rate = float(_number("initial_learning_rate", initial_learning_rate, False))
        self.decay_steps = _number("decay_steps", decay_steps)
        self.decay_rate = float(_number("decay_rate", decay_rate))
        self.staircase = bool(staircase)

    def __call__(self, step):
        p = step / self.decay_steps
        if self.staircase:
            p = math.floor(p)
        return self.initial_learning_rate * self.decay_rate ** p


class PiecewiseConstantDecay(LearningRateSchedule):
    def __init__(self, boundaries, values):
        boundaries, values = list(boundaries), [float(v) for v in values]
        if len(values) != len(boundaries) + 1:
            raise ValueError(f"values: expected {len(boundaries) + 1} values (one more than "
                             f"boundaries), got {len(values)}")
        if any(b >= a for b, a in zip(boundaries, boundaries[1:])):
            raise ValueError("boundaries: expected increasing numbers")
        self.boundaries, self.values = boundaries, values

    def __call__(self, step):
        for b, v in zip(self.boundaries, self.values):
            if step <= b:
                return v
        return self.values[-1]


class CosineDecay(LearningRateSchedule):
    def __init__(self, initial_learning_rate, decay_steps, alpha=0.0, warmup_target=None,
                 warmup_steps=0):
        self.initial_learning_rate = float(_number("initial_learning_rate", initial_learning_rate, False))
        self.decay_steps = _number("decay_steps", decay_steps)
        self.alpha = float(_number("alpha", alpha, False))
        self.warmup_target = None if warmup_target is None else float(
            _number("warmup_target", warmup_target, False))
        self.warmup_steps = _number("warmup_steps", warmup_steps, False)

    def __call__(self, step):
        if self.warmup_target is None:
            target = self.initial_learning_rate
        else:
            target = self.warmup_target
            if step < self.warmup_steps:
                frac = step / self.warmup_steps
                return self.initial_learning_rate + frac * (target - self.initial_learning_rate)
        s = min(max(step - self.warmup_steps, 0), self.decay_steps)
        cos = 0.5 * (1.0 + math.cos(math.pi * s / self.decay_steps))
        return target * ((1.0 - self.alpha) * cos + self.alpha)


_NAMES = {c.__name__: c for c in (ExponentialDecay, PiecewiseConstantDecay, CosineDecay)}


def serialize(schedule):
    return {"class_name": type(schedule).__name__, "config": schedule.get_config()}


def deserialize(config):
    if not isinstance(config, dict) or config.get("class_name") not in _NAMES:
        raise ValueError(f"learning_rate: unknown schedule {config!r}")
    return _NAMES[config["class_name"]](**config.get("config", {}))
