"""Models for other engines: ONNX files and PyTorch modules.

``model.export(path, format="onnx")`` (Keras 3's name) writes an ONNX graph
for inference, built with the ``onnx`` package (``pip install
'fastgrad[onnx]'``): input "input" of shape (batch, features) with a
dynamic batch dimension (batch, d1, d2, ... behind a first Flatten layer
given an ``input_shape``), output "output", in the model's dtype (float32
or float64), opset ``OPSET`` and IR version 8. Every layer and activation
has a form, from operators ONNX Runtime runs in both dtypes:

    Dense               Gemm (x @ kernel + bias), or MatMul without a bias,
                        then its activation
    BatchNormalization  inference form, moving statistics and the layer's
                        epsilon: the BatchNormalization op in float32, in
                        float64 (x - mean) / sqrt(var + eps) * gamma + beta
    LayerNormalization  per row, in double: mu = ReduceMean(x), c = x - mu,
                        c / sqrt(ReduceMean(c^2) + eps), then * gamma + beta
                        in the model's dtype
    PReLU               Where(x > 0, x, alpha * x), alpha one per feature
    ReLU                Where(x > threshold, Min(x, max_value),
                        negative_slope * (x - threshold)); Relu without options
    Normalization       (x - mean) / max(sqrt(variance), 1e-7); invert:
                        x * max(sqrt(variance), 1e-7) + mean
    Rescaling           x * scale + offset
    Flatten             Flatten (axis 1)
    Activation, LeakyReLU, ELU, Softmax   the activation, with the layer's
                        slope or alpha
    Dropout, GaussianNoise, GaussianDropout, AlphaDropout, Identity
                        nothing (the identity in inference)

Activations (z the input): relu Relu, tanh Tanh, softmax Softmax and
log_softmax LogSoftmax over the last axis, exponential Exp, linear
nothing; sigmoid from e = Exp(-|z|) as 1 / (1 + e) for z >= 0 and
e / (1 + e) below (ONNX Runtime's Sigmoid loses the left tail's digits),
silu z sigmoid(z); leaky_relu and elu from Where and Exp with their
constants in the model's dtype (ONNX's LeakyRelu and Elu take float32
attributes, and ONNX Runtime has no double Elu), selu likewise; softplus
max(z, 0) + log1p(exp(-|z|)), log1p(w) written log(u) w / (u - 1) with
u = 1 + w (w where u rounds to 1), which keeps its digits for small w;
softsign z / (1 + |z|); relu6 Clip(z, 0, 6); hard_sigmoid Clip(z + 3, 0,
6) / 6; hard_silu z hard_sigmoid(z); mish z Tanh(softplus(z)). gelu is
the exact form z Phi(z): in float32 z (1 + Erf(z / sqrt 2)) / 2 (where
1 + erf loses its digits, z below about -5, the result is off by up to
1e-7 in absolute terms); in float64, where ONNX Runtime has no Erf, a
series and a continued fraction within 1e-12 relative of fastgrad
everywhere (see ``_Graph.gelu``).

``to_torch(model)`` builds the equivalent ``torch.nn.Sequential`` holding
copies of the weights, in the model's dtype and in eval mode: Linear,
BatchNorm1d, LayerNorm, PReLU (one slope per feature), Dropout, Flatten,
Identity (the noise layers), ReLU (``ReLUOptions`` with options), an
``Affine`` module holding Normalization's and Rescaling's constants, and
the activation modules (exponential ``Exp``; gelu a ``GELU`` computing
z erfc(-z / sqrt 2) / 2, exact in the left tail; Softplus with threshold
40, past which log1p(exp(z)) - z is below the dtypes' rounding). BatchNorm1d's
momentum is ``1 - momentum`` (PyTorch's convention); in training, PyTorch
updates its running variance with the unbiased batch variance where
fastgrad and Keras use the biased one.
"""
import functools
import math

import numpy as np

from fastgrad import ops

OPSET = 17
_GELU_CUT = 2.0
_ERF_SERIES = [(-1) ** n / (math.factorial(n) * (2 * n + 1)) for n in range(40)]
_ERFC_TERMS = 60
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
_NORMALIZATION_FLOOR = 1e-7   # Normalization's smallest divisor, as in Keras
_SOFTPLUS_THRESHOLD = 40.0    # log1p(exp(-40)) / 40 < 1e-18: softplus(z) is z there
# layers that compute nothing in inference
_INFERENCE_IDENTITY = ("Dropout", "GaussianNoise", "GaussianDropout", "AlphaDropout",
                       "Identity")
# layers that are an activation, with a slope or alpha of their own for some
_ACTIVATION_LAYERS = ("Activation", "LeakyReLU", "ELU", "Softmax")


def _need(module, extra):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"{module} is needed here: pip install 'fastgrad[{extra}]'") \
            from None


def _built(model):
    from fastgrad import keras_format

    keras_format.require_built(model, "exporting")


def _alpha(layer, act):
    """The activation's constant: a LeakyReLU's negative_slope or an ELU's
    alpha, else the activation's default (0.2 for leaky_relu, 1 for elu)."""
    value = getattr(layer, "negative_slope", getattr(layer, "alpha", None))
    return ops.ACTIVATIONS[act][1] if value is None else value


def _affine_of(layer, dtype):
    """(shift, scale, divide) of a Normalization or Rescaling layer, as
    fastgrad's affine kernel takes them: y = (x - shift) / scale when
    divide, else x * scale + shift; computed in the model's dtype."""
    if layer.kind == "Rescaling":
        return (np.asarray(layer.offset, dtype), np.asarray(layer.scale, dtype), False)
    w = layer.weights
    den = np.maximum(np.sqrt(np.asarray(w["variance"], dtype)), dtype.type(_NORMALIZATION_FLOOR))
    return np.array(w["mean"], dtype), den, not layer.invert


def export(model, filepath, format="onnx"):
    """Write model to filepath in format ("onnx"), atomically."""
    from fastgrad import saving

    if format != "onnx":
        raise ValueError(f"format: expected 'onnx', got {format!r}")
    saving.write_atomic(filepath, [to_onnx(model).SerializeToString()])


class _Graph:
    """Nodes and initializers of an ONNX graph under construction."""

    def __init__(self, onnx, dtype):
        self.helper, self.numpy_helper = onnx.helper, onnx.numpy_helper
        self.dtype = dtype
        self.double = onnx.TensorProto.DOUBLE
        self.elem = onnx.TensorProto.FLOAT if dtype == np.float32 else self.double
        self.nodes, self.inits, self._n = [], [], 0

    def name(self, base):
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, base, array, dtype=None):
        name = self.name(base)
        self.inits.append(self.numpy_helper.from_array(
            np.asarray(array, dtype or self.dtype), name))
        return name

    def node(self, op, inputs, base, **attrs):
        out = self.name(base)
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def mul(self, x, c, base):
        return self.node("Mul", [x, self.const(f"{base}_c", c)], f"{base}_mul")

    def add(self, x, c, base):
        return self.node("Add", [x, self.const(f"{base}_c", c)], f"{base}_add")

    def where_positive(self, x, negative, base):
        """x > 0 ? x : negative."""
        pos = self.node("Greater", [x, self.const(f"{base}_zero", 0.0)], f"{base}_pos")
        return self.select(pos, x, negative, base)

    def select(self, cond, yes, no, base):
        return self.node("Where", [cond, yes, no], f"{base}_where")

    def activation(self, x, act, base, alpha=None):
        """act(x); alpha is leaky_relu's slope or elu's alpha (their defaults
        when None)."""
        if act not in _ONNX_ACTIVATIONS:
            raise ValueError(f"activation: {act!r} has no ONNX form")
        alpha = ops.ACTIVATIONS[act][1] if alpha is None else alpha
        return _ONNX_ACTIVATIONS[act](self, x, f"{base}_{act}", alpha)

    def expm1_scaled(self, x, scale_pos, scale_neg, base):
        """z > 0 ? scale_pos z : scale_neg (exp(z) - 1): elu and selu."""
        em1 = self.node("Sub", [self.node("Exp", [x], f"{base}_exp"),
                                self.const(f"{base}_one", 1.0)], f"{base}_expm1")
        pos = x if scale_pos == 1 else self.mul(x, scale_pos, base)
        return self.select(self.node("Greater", [x, self.const(f"{base}_zero", 0.0)],
                                     f"{base}_pos"), pos, self.mul(em1, scale_neg, base), base)

    def sigmoid(self, x, base):
        """e = exp(-|z|): 1 / (1 + e) for z >= 0, e / (1 + e) below, which
        keeps the left tail's digits (ONNX Runtime's Sigmoid loses them)."""
        e = self.node("Exp", [self.node("Neg", [self.node("Abs", [x], f"{base}_abs")],
                                        f"{base}_nabs")], f"{base}_e")
        one = self.const(f"{base}_one", 1.0)
        r = self.node("Div", [one, self.node("Add", [one, e], f"{base}_1pe")], f"{base}_r")
        return self.select(self.node("GreaterOrEqual", [x, self.const(f"{base}_zero", 0.0)],
                                     f"{base}_pos"),
                           r, self.node("Mul", [e, r], f"{base}_er"), base)

    def softplus(self, x, base):
        """max(z, 0) + log1p(w), w = exp(-|z|) in (0, 1]; log1p(w) =
        log(u) w / (u - 1), u = 1 + w, exact to rounding (w where u is 1)."""
        w = self.node("Exp", [self.node("Neg", [self.node("Abs", [x], f"{base}_abs")],
                                        f"{base}_nabs")], f"{base}_w")
        one = self.const(f"{base}_one", 1.0)
        u = self.node("Add", [w, one], f"{base}_u")
        ratio = self.node("Div", [w, self.node("Sub", [u, one], f"{base}_um1")], f"{base}_r")
        log1p = self.select(self.node("Equal", [u, one], f"{base}_u1"), w,
                            self.node("Mul", [self.node("Log", [u], f"{base}_log"), ratio],
                                      f"{base}_lr"), base)
        return self.node("Add", [self.node("Relu", [x], f"{base}_relu"), log1p], f"{base}_sp")

    def clip(self, x, low, high, base):
        return self.node("Clip", [x, self.const(f"{base}_lo", low),
                                  self.const(f"{base}_hi", high)], f"{base}_clip")

    def hard_sigmoid(self, x, base):
        """relu6(z + 3) / 6."""
        return self.node("Div", [self.clip(self.add(x, 3.0, base), 0.0, 6.0, base),
                                 self.const(f"{base}_six", 6.0)], f"{base}_hsig")

    def times(self, x, fx, base):
        """z f(z): silu, hard_silu, mish."""
        return self.node("Mul", [x, fx], f"{base}_times")

    def scale_shift(self, x, gamma, beta, base):
        """x * gamma + beta, each step left out when its constant is None."""
        if gamma is not None:
            x = self.node("Mul", [x, self.const(f"{base}_gamma", gamma)], f"{base}_scaled")
        if beta is not None:
            x = self.node("Add", [x, self.const(f"{base}_beta", beta)], f"{base}_shifted")
        return x

    def standardize(self, x, mean, var, eps, base):
        """(x - mean) / sqrt(var + eps), mean and var given as tensor names."""
        std = self.node("Sqrt", [self.node("Add", [var, eps], f"{base}_vareps")],
                        f"{base}_std")
        return self.node("Div", [self.node("Sub", [x, mean], f"{base}_centred"), std],
                         f"{base}_xhat")

    def gelu(self, x, base):
        """z Phi(z) = z (1 + erf(z / sqrt 2)) / 2. float32: ONNX's Erf.
        float64 (ONNX Runtime has no double Erf): erf's Taylor series
        2/sqrt(pi) sum (-1)^n t^(2n+1) / (n! (2n+1)), 40 terms, for |t| <= 2
        (t = z / sqrt 2), and for |t| > 2 erfc(|t|) from Laplace's continued
        fraction exp(-t^2) / sqrt(pi) / (t + (1/2) / (t + (2/2) / (t + ...))),
        60 terms; Phi is within 1e-12 relative of the exact value for every z
        (the tail from erfc, so without 1 + erf's cancellation)."""
        t = self.mul(x, np.sqrt(0.5), base)
        if self.dtype == np.float32:
            erf = self.node("Erf", [t], f"{base}_erf")
            phi2 = self.node("Add", [erf, self.const(f"{base}_one", 1.0)], f"{base}_2phi")
            return self.node("Mul", [self.mul(x, 0.5, base), phi2], f"{base}_gelu")
        cut = self.const(f"{base}_cut", _GELU_CUT)
        # series on t clipped to [-3, 3]: erf = 2/sqrt(pi) t sum c_n t^2n
        tc = self.node("Min", [self.node("Max", [t, self.const(f"{base}_lo", -_GELU_CUT)],
                                         f"{base}_tmax"), cut], f"{base}_tclip")
        u = self.node("Mul", [tc, tc], f"{base}_t2")
        s = self.const(f"{base}_c", _ERF_SERIES[-1])
        for c in _ERF_SERIES[-2::-1]:
            s = self.node("Add", [self.node("Mul", [s, u], f"{base}_h"),
                                  self.const(f"{base}_c", c)], f"{base}_h")
        erf = self.mul(self.node("Mul", [tc, s], f"{base}_ts"), 2 / np.sqrt(np.pi), base)
        near = self.mul(self.node("Add", [erf, self.const(f"{base}_one", 1.0)],
                                  f"{base}_2phi"), 0.5, base)
        # tail on |t| raised to at least 3: half_erfc = erfc(|t|) / 2
        a = self.node("Max", [self.node("Abs", [t], f"{base}_abs"), cut], f"{base}_tail")
        f = a
        for k in range(_ERFC_TERMS, 0, -1):
            f = self.node("Add", [a, self.node("Div", [self.const(f"{base}_k", k / 2), f],
                                               f"{base}_cf")], f"{base}_cf")
        e = self.node("Exp", [self.node("Neg", [self.node("Mul", [a, a], f"{base}_a2")],
                                        f"{base}_na2")], f"{base}_exp")
        half_erfc = self.node("Div", [self.mul(e, 0.5 / np.sqrt(np.pi), base), f],
                              f"{base}_herfc")
        upper = self.node("Sub", [self.const(f"{base}_one", 1.0), half_erfc], f"{base}_up")
        negative = self.node("Less", [t, self.const(f"{base}_zero", 0.0)], f"{base}_neg")
        far = self.node("Where", [negative, half_erfc, upper], f"{base}_far")
        inside = self.node("LessOrEqual", [self.node("Abs", [t], f"{base}_abs"), cut],
                           f"{base}_in")
        phi = self.node("Where", [inside, near, far], f"{base}_phi")
        return self.node("Mul", [x, phi], f"{base}_gelu")


# activation name -> (graph, x, base, alpha) -> output
_ONNX_ACTIVATIONS = {
    "linear": lambda g, x, b, a: x,
    "relu": lambda g, x, b, a: g.node("Relu", [x], b),
    "sigmoid": lambda g, x, b, a: g.sigmoid(x, b),
    "tanh": lambda g, x, b, a: g.node("Tanh", [x], b),
    "exponential": lambda g, x, b, a: g.node("Exp", [x], b),
    "softmax": lambda g, x, b, a: g.node("Softmax", [x], b, axis=-1),
    "log_softmax": lambda g, x, b, a: g.node("LogSoftmax", [x], b, axis=-1),
    "leaky_relu": lambda g, x, b, a: g.where_positive(x, g.mul(x, a, b), b),
    "elu": lambda g, x, b, a: g.expm1_scaled(x, 1.0, a, b),
    "selu": lambda g, x, b, a: g.expm1_scaled(x, _SELU_SCALE, _SELU_SCALE * _SELU_ALPHA, b),
    "gelu": lambda g, x, b, a: g.gelu(x, b),
    "silu": lambda g, x, b, a: g.times(x, g.sigmoid(x, b), b),
    "softplus": lambda g, x, b, a: g.softplus(x, b),
    "softsign": lambda g, x, b, a: g.node("Div", [x, g.add(g.node("Abs", [x], b), 1.0, b)],
                                          b),
    "relu6": lambda g, x, b, a: g.clip(x, 0.0, 6.0, b),
    "hard_sigmoid": lambda g, x, b, a: g.hard_sigmoid(x, b),
    "hard_silu": lambda g, x, b, a: g.times(x, g.hard_sigmoid(x, b), b),
    "mish": lambda g, x, b, a: g.times(x, g.node("Tanh", [g.softplus(x, b)], b), b),
}


def _onnx_dense(g, layer, x, base):
    w = layer.weights
    kernel = g.const(f"{base}_kernel", w["kernel"])
    if "bias" in w:
        x = g.node("Gemm", [x, kernel, g.const(f"{base}_bias", w["bias"])], f"{base}_gemm")
    else:
        x = g.node("MatMul", [x, kernel], f"{base}_matmul")
    return g.activation(x, layer.activation, base)


def _onnx_batchnorm(g, layer, x, base):
    w, n = layer.weights, layer.input_dim
    mean = g.const(f"{base}_mean", w["moving_mean"])
    var = g.const(f"{base}_var", w["moving_variance"])
    if g.dtype == np.float32:   # the op takes its epsilon as a float attribute
        gamma = g.const(f"{base}_gamma", w["gamma"] if "gamma" in w else np.ones(n))
        beta = g.const(f"{base}_beta", w["beta"] if "beta" in w else np.zeros(n))
        return g.node("BatchNormalization", [x, gamma, beta, mean, var], f"{base}_bn",
                      epsilon=layer.epsilon)
    xhat = g.standardize(x, mean, var, g.const(f"{base}_eps", layer.epsilon), base)
    return g.scale_shift(xhat, w.get("gamma"), w.get("beta"), base)


def _onnx_layernorm(g, layer, x, base):
    # statistics in double, as fastgrad takes them (float32 rows with a large
    # mean and a small spread keep their digits); the op's epsilon is float32
    xd = x if g.elem == g.double else g.node("Cast", [x], f"{base}_f64", to=g.double)
    mu = g.node("ReduceMean", [xd], f"{base}_mu", axes=[-1], keepdims=1)
    c = g.node("Sub", [xd, mu], f"{base}_c")
    var = g.node("ReduceMean", [g.node("Mul", [c, c], f"{base}_c2")], f"{base}_var",
                 axes=[-1], keepdims=1)
    eps = g.const(f"{base}_eps", layer.epsilon, np.float64)
    xhat = g.standardize(xd, mu, var, eps, base)
    if g.elem != g.double:
        xhat = g.node("Cast", [xhat], f"{base}_back", to=g.elem)
    return g.scale_shift(xhat, layer.weights.get("gamma"), layer.weights.get("beta"), base)


def _onnx_relu(g, layer, x, base):
    slope, threshold, cap = layer.negative_slope, layer.threshold, layer.max_value
    if slope == 0 and threshold == 0 and cap is None:
        return g.node("Relu", [x], f"{base}_relu")
    # x > threshold ? min(x, max_value) : negative_slope * (x - threshold)
    low = g.mul(g.add(x, -threshold, base), slope, base)
    high = x if cap is None else g.node("Min", [x, g.const(f"{base}_cap", cap)], f"{base}_min")
    return g.select(g.node("Greater", [x, g.const(f"{base}_th", threshold)], f"{base}_above"),
                    high, low, base)


def _onnx_affine(g, layer, x, base):
    shift, scale, divide = _affine_of(layer, g.dtype)
    if divide:
        return g.node("Div", [g.node("Sub", [x, g.const(f"{base}_shift", shift)],
                                     f"{base}_centred"),
                              g.const(f"{base}_scale", scale)], f"{base}_div")
    return g.scale_shift(x, scale, shift, base)


# layer kind -> (graph, layer, x, base) -> output
_ONNX_LAYERS = {
    "Dense": _onnx_dense,
    "BatchNormalization": _onnx_batchnorm,
    "LayerNormalization": _onnx_layernorm,
    "ReLU": _onnx_relu,
    "PReLU": lambda g, layer, x, b: g.where_positive(
        x, g.mul(x, layer.weights["alpha"], b), b),
    "Normalization": _onnx_affine,
    "Rescaling": _onnx_affine,
    "Flatten": lambda g, layer, x, b: g.node("Flatten", [x], b, axis=1),
    **{kind: lambda g, layer, x, b: x for kind in _INFERENCE_IDENTITY},
    **{kind: lambda g, layer, x, b: g.activation(x, layer.activation, b,
                                                 _alpha(layer, layer.activation))
       for kind in _ACTIVATION_LAYERS},
}


def _input_shape(model):
    """The graph input's shape: (batch, features), or (batch, *sample shape)
    behind a first Flatten layer that was given one."""
    first = model.layers[0]
    sample = getattr(first, "sample_shape", None) if first.kind == "Flatten" else None
    return ["batch", *(sample or (model.input_dim,))]


def to_onnx(model):
    """The model as an onnx.ModelProto (see the module docstring)."""
    onnx = _need("onnx", "onnx")
    helper = onnx.helper

    _built(model)
    g = _Graph(onnx, model.dtype)
    x = "input"
    for layer in model.layers:
        if layer.kind not in _ONNX_LAYERS:
            raise ValueError(f"model: layer {layer.name} ({layer.kind}) has no ONNX form")
        x = _ONNX_LAYERS[layer.kind](g, layer, x, layer.name)
    g.nodes.append(helper.make_node("Identity", [x], ["output"], name="output"))
    graph = helper.make_graph(
        g.nodes, model.name,
        [helper.make_tensor_value_info("input", g.elem, _input_shape(model))],
        [helper.make_tensor_value_info("output", g.elem, ["batch", model.output_dim])],
        initializer=g.inits)
    proto = helper.make_model(graph, producer_name="fastgrad",
                              opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = 8   # what opset 17 came with; older runtimes read it
    onnx.checker.check_model(proto)
    return proto


@functools.lru_cache(maxsize=1)
def _torch_modules():
    """fastgrad's own small torch modules, made once torch is imported."""
    nn = _need("torch", "torch").nn

    class Affine(nn.Module):
        """(x - shift) / scale when divide, else x * scale + shift; shift
        and scale are buffers (Normalization, Rescaling)."""

        def __init__(self, shift, scale, divide):
            super().__init__()
            self.register_buffer("shift", shift)
            self.register_buffer("scale", scale)
            self.divide = divide

        def forward(self, x):
            return (x - self.shift) / self.scale if self.divide else x * self.scale + self.shift

    class ReLUOptions(nn.Module):
        """Keras' ReLU: x > threshold ? min(x, max_value) :
        negative_slope * (x - threshold)."""

        def __init__(self, max_value, negative_slope, threshold):
            super().__init__()
            self.max_value, self.negative_slope = max_value, negative_slope
            self.threshold = threshold

        def forward(self, x):
            high = x if self.max_value is None else x.clamp(max=self.max_value)
            return high.where(x > self.threshold, self.negative_slope * (x - self.threshold))

    class GELU(nn.GELU):
        """The exact GELU as x erfc(-x / sqrt 2) / 2, which keeps the left
        tail's digits (nn.GELU's 1 + erf loses them)."""

        def forward(self, x):
            return 0.5 * x * (x * -math.sqrt(0.5)).erfc()

    class Exp(nn.Module):
        """exp(x), the exponential activation."""

        def forward(self, x):
            return x.exp()

    return {"Affine": Affine, "ReLUOptions": ReLUOptions, "GELU": GELU, "Exp": Exp}


# activation name -> (torch.nn, fastgrad's modules, alpha) -> module
_TORCH_ACTIVATIONS = {
    "relu": lambda nn, own, a: nn.ReLU(), "leaky_relu": lambda nn, own, a: nn.LeakyReLU(a),
    "elu": lambda nn, own, a: nn.ELU(a), "selu": lambda nn, own, a: nn.SELU(),
    "gelu": lambda nn, own, a: own["GELU"](), "silu": lambda nn, own, a: nn.SiLU(),
    "sigmoid": lambda nn, own, a: nn.Sigmoid(), "tanh": lambda nn, own, a: nn.Tanh(),
    "softmax": lambda nn, own, a: nn.Softmax(dim=-1),
    "log_softmax": lambda nn, own, a: nn.LogSoftmax(dim=-1),
    "softplus": lambda nn, own, a: nn.Softplus(threshold=_SOFTPLUS_THRESHOLD),
    "softsign": lambda nn, own, a: nn.Softsign(), "relu6": lambda nn, own, a: nn.ReLU6(),
    "hard_sigmoid": lambda nn, own, a: nn.Hardsigmoid(),
    "hard_silu": lambda nn, own, a: nn.Hardswish(), "mish": lambda nn, own, a: nn.Mish(),
    "exponential": lambda nn, own, a: own["Exp"](),
}


def _torch_dense(nn, own, layer, tensor):
    w = layer.weights
    lin = nn.Linear(layer.input_dim, layer.units, bias="bias" in w, dtype=tensor.dtype)
    lin.weight.data.copy_(tensor(w["kernel"].T))
    if "bias" in w:
        lin.bias.data.copy_(tensor(w["bias"]))
    return [lin]


def _torch_affine_weights(module, layer, tensor):
    """gamma and beta into module's weight and bias (ones and zeros when
    the layer has none, held fixed as the layer holds them)."""
    w, n = layer.weights, layer.input_dim
    module.weight.data.copy_(tensor(w["gamma"] if "gamma" in w else np.ones(n)))
    module.bias.data.copy_(tensor(w["beta"] if "beta" in w else np.zeros(n)))
    module.weight.requires_grad_(layer.scale)
    module.bias.requires_grad_(layer.center)
    return [module]


def _torch_batchnorm(nn, own, layer, tensor):
    bn = nn.BatchNorm1d(layer.input_dim, eps=layer.epsilon, momentum=1.0 - layer.momentum,
                        dtype=tensor.dtype)
    bn.running_mean.copy_(tensor(layer.weights["moving_mean"]))
    bn.running_var.copy_(tensor(layer.weights["moving_variance"]))
    return _torch_affine_weights(bn, layer, tensor)


def _torch_prelu(nn, own, layer, tensor):
    prelu = nn.PReLU(layer.input_dim, dtype=tensor.dtype)
    prelu.weight.data.copy_(tensor(layer.weights["alpha"]))
    return [prelu]


def _torch_relu(nn, own, layer, tensor):
    if layer.negative_slope == 0 and layer.threshold == 0 and layer.max_value is None:
        return [nn.ReLU()]
    return [own["ReLUOptions"](layer.max_value, layer.negative_slope, layer.threshold)]


def _torch_affine(nn, own, layer, tensor):
    shift, scale, divide = _affine_of(layer, tensor.numpy_dtype)
    return [own["Affine"](tensor(shift), tensor(scale), divide)]


# layer kind -> (torch.nn, fastgrad's modules, layer, tensor) -> modules before
# the layer's activation, if it has one
_TORCH_LAYERS = {
    "Dense": _torch_dense,
    "BatchNormalization": _torch_batchnorm,
    "LayerNormalization": lambda nn, own, layer, tensor: _torch_affine_weights(
        nn.LayerNorm(layer.input_dim, eps=layer.epsilon, dtype=tensor.dtype), layer, tensor),
    "PReLU": _torch_prelu,
    "ReLU": _torch_relu,
    "Normalization": _torch_affine,
    "Rescaling": _torch_affine,
    "Flatten": lambda nn, own, layer, tensor: [nn.Flatten()],
    "Dropout": lambda nn, own, layer, tensor: [nn.Dropout(layer.rate)],
    # what predict computes: inference mode
    **{kind: lambda nn, own, layer, tensor: [nn.Identity()]
       for kind in _INFERENCE_IDENTITY if kind != "Dropout"},
    **{kind: lambda nn, own, layer, tensor: [] for kind in _ACTIVATION_LAYERS},
}


class _Tensors:
    """Copies of arrays as torch tensors in the model's dtype."""

    def __init__(self, torch, dtype):
        self.torch, self.numpy_dtype = torch, dtype
        self.dtype = torch.float32 if dtype == np.float32 else torch.float64

    def __call__(self, a):
        return self.torch.from_numpy(np.array(a, dtype=self.numpy_dtype))


def to_torch(model):
    """A ``torch.nn.Sequential`` computing what ``model.predict`` computes,
    with copies of its weights, in its dtype, in eval mode."""
    torch = _need("torch", "torch")
    nn, own = torch.nn, _torch_modules()
    _built(model)

    tensor = _Tensors(torch, model.dtype)

    modules = []
    for layer in model.layers:
        if layer.kind not in _TORCH_LAYERS:
            raise ValueError(f"model: layer {layer.name} ({layer.kind}) has no PyTorch form")
        with torch.no_grad():
            modules += _TORCH_LAYERS[layer.kind](nn, own, layer, tensor)
        act = getattr(layer, "activation", "linear")
        if act != "linear":
            if act not in _TORCH_ACTIVATIONS:
                raise ValueError(f"activation: {act!r} has no PyTorch form")
            modules.append(_TORCH_ACTIVATIONS[act](nn, own, _alpha(layer, act)))
    return nn.Sequential(*modules).eval()
