"""Shared helpers: argument checks and name registries.

Checks raise ValueError naming the argument and what was expected, both
for a value out of range and for one of the wrong kind (fastgrad's rule for
numeric arguments), and return the value in canonical form (an int, a
float):

    check_int(name, value, low=None, high=None, none=False)
    check_real(name, value, low=None, high=None, low_open=False,
               high_open=False, finite=True, none=False)
    check_choice(name, value, choices)

``Hyper(check, **bounds)`` makes a class attribute checked on every
assignment, in the constructor and later alike.

``Registry`` maps the names of one kind of object (optimizers, losses, ...)
to its classes, with Keras 3's ``get`` / ``serialize`` / ``deserialize``.
"""
import math
import numbers

_MISSING = object()


def _range(low, high, low_open, high_open):
    lo, hi = (b if b is None or isinstance(b, int) else f"{b:g}" for b in (low, high))
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {lo}"
    if high is not None:
        return f" {'<' if high_open else '<='} {hi}"
    return ""


def check_int(name, value, low=None, high=None, none=False):
    """``value`` as an int: an integer (not a bool) with low <= value <= high
    (a bound of None is no bound); None passes when ``none``."""
    if value is None and none:
        return None
    what = f"{'None or ' if none else ''}an integer{_range(low, high, False, False)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return int(value)


def check_real(name, value, low=None, high=None, low_open=False, high_open=False,
               finite=True, none=False):
    """``value`` as a float: a real number (not a bool), finite unless
    ``finite=False``, within [low, high] (``low_open`` / ``high_open``
    exclude the bound; a bound of None is no bound); None passes when
    ``none``. NaN is always refused."""
    if value is None and none:
        return None
    what = (f"{'None or ' if none else ''}a {'finite ' if finite else ''}number"
            f"{_range(low, high, low_open, high_open)}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    try:
        v = float(value)
    except OverflowError:   # an int beyond the float range
        v = math.inf if value > 0 else -math.inf
    if math.isnan(v) or (finite and math.isinf(v)) \
            or (low is not None and (v <= low if low_open else v < low)) \
            or (high is not None and (v >= high if high_open else v > high)):
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return v


def check_choice(name, value, choices):
    """``value`` if it is one of the strings ``choices``."""
    if isinstance(value, str) and value in choices:
        return value
    raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, "
                     f"got {value!r}")


def named(fn, name, doc):
    """fn, given the public name and docstring of the function it stands for
    (the functions a module builds from one template)."""
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return fn


class Hyper:
    """A class attribute checked on every assignment:
    ``stddev = Hyper(check_real, low=0)`` runs ``check_real("stddev",
    value, low=0)`` and stores the result.

    The value lives in the instance's ``__dict__`` under the same name and
    the descriptor has no ``__get__``, so reading it is a plain attribute
    read (the optimizer reads its hyperparameters every step) and
    ``vars(obj)`` lists it."""

    def __init__(self, check, /, **bounds):
        self.check, self.bounds = check, bounds

    def __set_name__(self, owner, name):
        if getattr(self, "name", name) != name:
            raise TypeError(f"one Hyper per attribute: {self.name} and {name} share one")
        self.name = name

    def __set__(self, obj, value):
        obj.__dict__[self.name] = self.check(self.name, value, **self.bounds)


class Registry:
    """The classes of one kind of object, by name.

    arg      what errors name ("optimizer", "loss", ...)
    base     the base class; its instances pass through ``get``
    names    lower-case name (and aliases) -> class, what ``get(name)`` makes
    classes  the classes ``deserialize`` may build by class name (default:
             those of ``names``)
    none     what ``get(None)`` returns; without it None is a TypeError

    ``deserialize`` calls the class's ``from_config(config)`` when it has
    one, else ``cls(**config)``.
    """

    def __init__(self, arg, base, names, classes=None, none=_MISSING):
        self.arg, self.base, self.names, self.none = arg, base, dict(names), none
        self.classes = {c.__name__: c for c in (classes or self.names.values())}

    def lookup(self, name):
        """The class for a name: a lower-case name or alias (any case), or a
        class name."""
        cls = self.names.get(name.lower()) or self.classes.get(name)
        if cls is None:
            raise ValueError(f"{self.arg}: unknown name {name!r}; expected one of "
                             f"{', '.join(self.names or self.classes)}")
        return cls

    def get(self, identifier):
        """An instance from a name, a ``serialize`` dict, a class or an
        instance (returned as it is)."""
        if identifier is None and self.none is not _MISSING:
            return self.none
        if isinstance(identifier, self.base):
            return identifier
        if isinstance(identifier, str):
            return self.lookup(identifier)()
        if isinstance(identifier, dict):
            return self.deserialize(identifier)
        if isinstance(identifier, type) and issubclass(identifier, self.base):
            return identifier()
        raise TypeError(f"{self.arg}: expected a name, a configuration dict or a "
                        f"{self.base.__module__}.{self.base.__name__}, got {identifier!r}")

    def serialize(self, obj):
        """``{"class_name": ..., "config": obj.get_config()}``; None for None."""
        if obj is None:
            return None
        if not isinstance(obj, self.base):
            raise TypeError(f"{self.arg}: expected a {self.base.__module__}."
                            f"{self.base.__name__} to serialize, got {obj!r}")
        return {"class_name": type(obj).__name__, "config": obj.get_config()}

    def deserialize(self, config):
        """The object a ``serialize`` dict describes; its class_name may
        also be a lower-case name, and a name alone is taken too."""
        if isinstance(config, str):
            return self.lookup(config)()
        if not isinstance(config, dict):
            raise TypeError(f"{self.arg}: expected a dict with 'class_name' and 'config', "
                            f"got {config!r}")
        name, cfg = config.get("class_name"), config.get("config", {})
        # a lower-case name too, as Keras 3 reads its optimizers' names
        cls = self.classes.get(name) or self.names.get(name.lower()) \
            if isinstance(name, str) else None
        if cls is None:
            raise ValueError(f"{self.arg}: unknown class_name {name!r}; expected one of "
                             f"{', '.join(self.classes)}")
        if not isinstance(cfg, dict):
            raise TypeError(f"{self.arg}: expected 'config' to be a dict, got {cfg!r}")
        from_config = getattr(cls, "from_config", None)
        return from_config(cfg) if from_config is not None else cls(**cfg)
