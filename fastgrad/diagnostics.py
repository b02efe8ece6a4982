"""Gradient health: ``fg.diagnose(model, x, y)`` and its report.

One forward and backward pass in training mode on (x, y) (the first
``batch_size`` rows, all by default) gives, per layer with weights, the L2
norm of the loss gradient of its main weight (a Dense kernel, a
BatchNormalization gamma), that weight's norm, and the activation
statistics of the pass. The weights, the BatchNormalization moving
statistics, the dropout counters and the optimizer are left as they were;
the pass's gradients stay in ``model.grads``, and a model not built yet is
built first (drawing its initial weights).

Thresholds (module constants), for g_l the main-weight gradient norm of
layer l and w_l that weight's norm (a weight of norm 0 gives an infinite
g_l / w_l), and g_L the kernel gradient norm of the last Dense layer:

- exploding, for any layer with weights (Dense or BatchNormalization):
  g_l not finite, or g_l > EXPLODING_NORM, or g_l / w_l > EXPLODING_RATIO.
  The absolute and relative tests matter because in a ReLU network with an
  oversized initialization activations and backpropagated errors grow
  together, so first and last layers can be equally huge and their ratio
  alone shows nothing.
- vanishing, for a Dense layer that is not exploding: g_l / g_L <
  VANISHING_DROP (the gradient shrinks by that much on its way back from
  the last Dense layer; tested when g_L > 0), or g_l / w_l <
  VANISHING_RATIO.
- healthy otherwise.

Each layer row carries its own status by these tests. The report's status
is "exploding" if any row is exploding, else "vanishing" if any row is
vanishing, else "healthy".
"""
import math

from fastgrad import _core
from fastgrad.models import snake_case

EXPLODING_NORM = 1e3
EXPLODING_RATIO = 10.0
VANISHING_DROP = 1e-3
VANISHING_RATIO = 1e-7
DEAD_RELU = 0.5          # share of dead units above which a layer is flagged
SATURATED = 0.5          # share of saturated outputs above which a layer is flagged


class LayerHealth:
    """One row of a GradientReport."""

    __slots__ = ("name", "kind", "activation", "initializer", "grad_norm", "weight_norm",
                 "ratio", "status", "dead_fraction", "saturated_fraction")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))

    def to_dict(self):
        return {k: getattr(self, k) for k in self.__slots__}


class GradientReport:
    """status ("healthy", "vanishing", "exploding"), layers (LayerHealth
    rows, input side first), suggestions (list of str), loss."""

    def __init__(self, status, layers, suggestions, loss, findings):
        self.status, self.layers, self.suggestions = status, layers, suggestions
        self.loss, self.findings = loss, findings

    def to_dict(self):
        return {"status": self.status, "loss": self.loss, "findings": list(self.findings),
                "layers": [r.to_dict() for r in self.layers],
                "suggestions": list(self.suggestions)}

    def __str__(self):
        head = (f"{'layer':<24} {'kind':<18} {'activation':<10} {'grad norm':>10} "
                f"{'weight norm':>11} {'ratio':>9} {'dead':>5} {'satur.':>6}  status")
        lines = [f"Gradient health: {self.status.upper()} (loss {self.loss:.4g})", head,
                 "-" * len(head)]
        for r in self.layers:
            lines.append(f"{r.name:<24} {r.kind:<18} {r.activation or '':<10} "
                         f"{r.grad_norm:>10.3g} {r.weight_norm:>11.3g} {r.ratio:>9.2g} "
                         f"{r.dead_fraction:>5.0%} {r.saturated_fraction:>6.0%}  {r.status}")
        lines += [f"finding: {f}" for f in self.findings]
        lines += [f"suggestion: {s}" for s in self.suggestions]
        return "\n".join(lines)

    __repr__ = __str__


def _norm(a):
    return math.sqrt(_core.sum_squares(a.reshape(-1)))


def _ranges(names):
    """'dense_1..dense_18' style summary of a list of layer names."""
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]} .. {names[-1]} ({len(names)} layers)"


def diagnose(model, x, y, batch_size=None):
    """Diagnose gradient health from one training-mode pass; see the module
    docstring for the thresholds. Returns a GradientReport."""
    if model.optimizer is None:
        raise RuntimeError("diagnose: the model is not compiled; call "
                           "model.compile(optimizer, loss) first")
    with model.training_pass(x, y, batch_size, activation_stats=True) as loss:
        return _report(model, loss, batch_size or len(x))


def _layer_rows(model):
    """One LayerHealth per layer with weights, input side first; an
    Activation layer's statistics join the row of the layer before it."""
    rows = []
    for layer in model.layers:
        stats = getattr(layer, "activation_stats", None) or {}
        # activation statistics of an Activation layer describe the Dense before it
        if layer.kind == "Activation" and rows:
            rows[-1].dead_fraction = max(rows[-1].dead_fraction, stats.get("dead_fraction", 0))
            rows[-1].saturated_fraction = max(rows[-1].saturated_fraction,
                                              stats.get("saturated_fraction", 0))
            if rows[-1].activation in (None, "linear"):
                rows[-1].activation = layer.activation
            continue
        key = "kernel" if "kernel" in layer.grads else "gamma" if "gamma" in layer.grads else None
        if key is None:
            continue
        init = getattr(layer, "kernel_initializer", None)
        rows.append(LayerHealth(
            name=layer.name, kind=layer.kind,
            activation=getattr(layer, "activation", None),
            initializer=_init_name(init) if init is not None else None,
            grad_norm=_norm(layer.grads[key]), weight_norm=_norm(layer.weights[key]),
            dead_fraction=stats.get("dead_fraction", 0.0),
            saturated_fraction=stats.get("saturated_fraction", 0.0)))
    return rows


def _classify(rows, last):
    """Each row's ratio and status by the module's thresholds; last is the
    last Dense layer's kernel gradient norm (None without Dense layers)."""
    for r in rows:
        r.ratio = r.grad_norm / r.weight_norm if r.weight_norm > 0 else math.inf
        if not math.isfinite(r.grad_norm) or r.grad_norm > EXPLODING_NORM \
                or r.ratio > EXPLODING_RATIO:
            r.status = "exploding"
        elif r.kind == "Dense" and ((last and r.grad_norm / last < VANISHING_DROP)
                                    or r.ratio < VANISHING_RATIO):
            r.status = "vanishing"
        else:
            r.status = "healthy"


def _report(model, loss, batch=None):
    rows = _layer_rows(model)
    dense = [r for r in rows if r.kind == "Dense"]
    last = dense[-1].grad_norm if dense else None
    _classify(rows, last)
    findings = []
    if not math.isfinite(loss) or any(not math.isfinite(r.grad_norm) for r in rows):
        findings.append("non-finite loss or gradients")
    big = [r for r in rows if r.status == "exploding"]
    if big:
        worst = max(big, key=lambda r: r.grad_norm if math.isfinite(r.grad_norm) else math.inf)
        findings.append(f"gradient norms up to {worst.grad_norm:.3g} ({worst.name}); "
                        f"threshold {EXPLODING_NORM:g} or {EXPLODING_RATIO:g}x the weights")
        status = "exploding"
    else:
        status = "healthy"
        if dense and last:
            drop = dense[0].grad_norm / last
            if drop < VANISHING_DROP:
                findings.append(f"the gradient norm falls {1 / max(drop, 1e-300):.3g}x from "
                                f"{dense[-1].name} to {dense[0].name}")
                status = "vanishing"
        if any(r.status == "vanishing" for r in rows):
            status = "vanishing"
    dead = [r for r in rows if r.dead_fraction > DEAD_RELU]
    if dead:
        findings.append(f"over {DEAD_RELU:.0%} dead ReLU units in "
                        f"{_ranges([r.name for r in dead])}")
    sat = [r for r in rows if r.saturated_fraction > SATURATED]
    if sat:
        findings.append(f"over {SATURATED:.0%} saturated outputs in "
                        f"{_ranges([r.name for r in sat])}")
    return GradientReport(status, rows, _suggest(model, status, rows, dead, sat, batch), loss,
                          findings)


def _init_name(init):
    n = type(init).__name__
    extra = ""
    if n == "RandomNormal":
        extra = f"(stddev={init.stddev:g})"
    elif n == "RandomUniform":
        extra = f"(minval={init.minval:g}, maxval={init.maxval:g})"
    return snake_case(n) + extra


# Batches of at most this many rows give BatchNormalization statistics too
# noisy to train with (and none at all at 1 row): LayerNormalization, which
# normalizes each row by itself, is suggested instead.
SMALL_BATCH = 8


def _normalize_advice(has_bn, batch, why):
    """The normalization to add (or to swap in) for batches of ``batch`` rows."""
    if batch is not None and batch <= SMALL_BATCH:
        swap = "Replace BatchNormalization with" if has_bn else "Add"
        return (f"{swap} fg.layers.LayerNormalization after the hidden Dense layers {why}: "
                f"at {batch} row{'s' if batch != 1 else ''} per batch BatchNormalization's "
                "batch statistics are too noisy (and undefined at 1 row), while "
                "LayerNormalization normalizes each row by itself, the same in training "
                "and inference.")
    if has_bn:
        return None
    return f"Add BatchNormalization after the hidden Dense layers {why}."


def _suggest(model, status, rows, dead, sat, batch=None):
    out = []
    dense = [r for r in rows if r.kind == "Dense"]
    hidden = dense[:-1]
    squashing = [r for r in hidden if r.activation in ("sigmoid", "tanh")]
    has_bn = any(layer.kind == "BatchNormalization" for layer in model.layers)
    opt = model.optimizer
    clipping = opt is not None and any(getattr(opt, k, None) is not None
                                       for k in ("clipnorm", "clipvalue", "global_clipnorm"))
    if status == "vanishing":
        if squashing:
            acts = sorted({r.activation for r in squashing})
            out.append(f"Replace {'/'.join(acts)} with relu or leaky_relu in "
                       f"{_ranges([r.name for r in squashing])}, with "
                       "kernel_initializer='he_normal'.")
        advice = _normalize_advice(has_bn, batch, "(Dense(use_bias=False) -> "
                                   "normalization -> Activation)")
        if advice:
            out.append(advice)
        if type(opt).__name__ == "SGD":
            out.append("Use an adaptive optimizer (Adam or RMSprop): per-parameter step "
                       "sizes compensate for small gradients in the first layers.")
    if status == "exploding":
        if not clipping:
            out.append("Clip gradients: give the optimizer global_clipnorm=1.0 "
                       "(or clipnorm=1.0 per tensor).")
        odd = [r for r in dense if r.initializer and r.initializer.startswith(
            ("random_normal", "random_uniform", "ones", "constant"))]
        if odd:
            inits = sorted({r.initializer for r in odd})
            out.append(f"Initialize {_ranges([r.name for r in odd])} with he_normal (relu) or "
                       f"glorot_uniform (tanh, sigmoid) instead of {', '.join(inits)}.")
        out.append("Lower the learning rate (for example by 10x) or use a decaying "
                   "schedule from fastgrad.schedules.")
        advice = _normalize_advice(has_bn, batch, "to keep activations at unit scale")
        if advice:
            out.append(advice)
    if dead:
        out.append(f"Many ReLU units are dead in {_ranges([r.name for r in dead])}: use "
                   "leaky_relu, he_normal initialization, or a lower learning rate.")
    if has_bn and batch is not None and batch <= SMALL_BATCH and \
            not any("LayerNormalization" in o for o in out):
        # whatever the status: BatchNormalization itself is the weak point here
        out.append(_normalize_advice(True, batch, "so that training does not depend on "
                                     "the batch"))
    if sat and status != "vanishing":
        out.append(f"Saturated sigmoid/tanh outputs in {_ranges([r.name for r in sat])}: "
                   "normalize the inputs, add BatchNormalization, or use relu.")
    return out
