"""Models for other engines: ONNX files and PyTorch modules.

``model.export(path, format="onnx")`` (Keras 3's name) writes an ONNX graph
for inference, built with the ``onnx`` package (``pip install
'fastgrad[onnx]'``): input "input" of shape (batch, features) with a
dynamic batch dimension, output "output", in the model's dtype (float32 or
float64), opset ``OPSET`` and IR version 8. Each layer becomes:

    Dense               Gemm (x @ kernel + bias), or MatMul without a bias,
                        then its activation
    BatchNormalization  BatchNormalization in inference form: the moving
                        statistics and the layer's own epsilon
    Dropout             nothing (the identity in inference)
    Activation          its activation

Activations: relu Relu, sigmoid Sigmoid, tanh Tanh, softmax Softmax over the
last axis, linear nothing, silu x * Sigmoid(x); leaky_relu max(x, 0.2 x), elu
and selu from Exp and Where with fastgrad's constants in the model's dtype
(ONNX's LeakyRelu, Elu and Selu take float32 attributes, and ONNX Runtime
has no double Elu). gelu is the exact form x Phi(x): in float32
x (1 + Erf(x / sqrt 2)) / 2 (where 1 + erf loses its digits, x below about
-5, the result is off by up to 1e-7 in absolute terms); in float64, where
ONNX Runtime has no Erf, a series and a continued fraction within 1e-12
relative of fastgrad everywhere (see ``_Graph.gelu``).

``to_torch(model)`` builds the equivalent ``torch.nn.Sequential`` (Linear,
BatchNorm1d, Dropout and the activation modules) holding copies of the
weights, in the model's dtype and in eval mode. BatchNorm1d's momentum is
``1 - momentum`` (PyTorch's convention); in training, PyTorch updates its
running variance with the unbiased batch variance where fastgrad and Keras
use the biased one.
"""
import math

import numpy as np

OPSET = 17
_GELU_CUT = 2.0
_ERF_SERIES = [(-1) ** n / (math.factorial(n) * (2 * n + 1)) for n in range(40)]
_ERFC_TERMS = 60
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _need(module, extra):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"{module} is needed here: pip install 'fastgrad[{extra}]'") \
            from None


def _built(model):
    if not model.built:
        raise ValueError("model: it has no weights yet; build it (fit, predict, or give "
                         "the first layer input_dim) before exporting")
    model._require_built()   # a known input width: the weights are made on first use


def export(model, filepath, format="onnx"):
    """Write model to filepath in format ("onnx"), atomically."""
    from fastgrad import saving

    if format != "onnx":
        raise ValueError(f"format: expected 'onnx', got {format!r}")
    saving.write_atomic(filepath, [to_onnx(model).SerializeToString()])


class _Graph:
    """Nodes and initializers of an ONNX graph under construction."""

    def __init__(self, helper, numpy_helper, dtype):
        self.helper, self.numpy_helper, self.dtype = helper, numpy_helper, dtype
        self.nodes, self.inits, self._n = [], [], 0

    def name(self, base):
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, base, array):
        name = self.name(base)
        self.inits.append(self.numpy_helper.from_array(np.asarray(array, self.dtype), name))
        return name

    def node(self, op, inputs, base, **attrs):
        out = self.name(base)
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def activation(self, x, act, base):
        # leaky_relu, elu and selu from plain operators: ONNX gives their
        # constants as float attributes, and ONNX Runtime has no double Elu
        simple = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}
        if act == "linear":
            return x
        if act in simple:
            return self.node(simple[act], [x], f"{base}_{act}")
        if act == "softmax":
            return self.node("Softmax", [x], f"{base}_softmax", axis=-1)
        if act == "leaky_relu":   # max(z, 0.2 z)
            return self.node("Max", [x, self.mul(x, 0.2, base)], f"{base}_leaky_relu")
        if act in ("elu", "selu"):   # z > 0 ? z : alpha (exp(z) - 1), selu scaled
            alpha, scale = (1.0, None) if act == "elu" else (_SELU_ALPHA, _SELU_SCALE)
            em1 = self.node("Sub", [self.node("Exp", [x], f"{base}_exp"),
                                    self.const(f"{base}_one", 1.0)], f"{base}_expm1")
            pos = self.node("Greater", [x, self.const(f"{base}_zero", 0.0)], f"{base}_pos")
            if scale is None:
                return self.node("Where", [pos, x, self.mul(em1, alpha, base)], f"{base}_elu")
            return self.node("Where", [pos, self.mul(x, scale, base),
                                       self.mul(em1, scale * alpha, base)], f"{base}_selu")
        if act == "silu":
            return self.node("Mul", [x, self.node("Sigmoid", [x], f"{base}_sigmoid")],
                             f"{base}_silu")
        if act == "gelu":
            return self.gelu(x, base)
        raise ValueError(f"activation: {act!r} has no ONNX form")

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

    def mul(self, x, c, base):
        return self.node("Mul", [x, self.const(f"{base}_c", c)], f"{base}_mul")


def to_onnx(model):
    """The model as an onnx.ModelProto (see the module docstring)."""
    onnx = _need("onnx", "onnx")
    from onnx import helper, numpy_helper

    _built(model)
    dtype = model.dtype
    elem = onnx.TensorProto.FLOAT if dtype == np.float32 else onnx.TensorProto.DOUBLE
    g = _Graph(helper, numpy_helper, dtype)
    x = "input"
    for layer in model.layers:
        w = layer.weights
        base = layer.name
        if layer.kind == "Dense":
            kernel = g.const(f"{base}_kernel", w["kernel"])
            if "bias" in w:
                x = g.node("Gemm", [x, kernel, g.const(f"{base}_bias", w["bias"])],
                           f"{base}_gemm")
            else:
                x = g.node("MatMul", [x, kernel], f"{base}_matmul")
            x = g.activation(x, layer.activation, base)
        elif layer.kind == "BatchNormalization":
            n = layer.input_dim
            gamma = g.const(f"{base}_gamma", w["gamma"] if "gamma" in w else np.ones(n))
            beta = g.const(f"{base}_beta", w["beta"] if "beta" in w else np.zeros(n))
            mean = g.const(f"{base}_mean", w["moving_mean"])
            var = g.const(f"{base}_var", w["moving_variance"])
            if dtype == np.float32:
                x = g.node("BatchNormalization", [x, gamma, beta, mean, var], f"{base}_bn",
                           epsilon=layer.epsilon)
            else:   # the op's epsilon is a float attribute: in double, plain operators
                std = g.node("Sqrt", [g.node("Add", [var, g.const(f"{base}_eps",
                                                                  layer.epsilon)],
                                             f"{base}_vareps")], f"{base}_std")
                xhat = g.node("Div", [g.node("Sub", [x, mean], f"{base}_centred"), std],
                              f"{base}_xhat")
                x = g.node("Add", [g.node("Mul", [xhat, gamma], f"{base}_scaled"), beta],
                           f"{base}_bn")
        elif layer.kind == "Activation":
            x = g.activation(x, layer.activation, base)
        elif layer.kind != "Dropout":   # Dropout: the identity in inference
            raise ValueError(f"model: layer {layer.name} ({layer.kind}) has no ONNX form")
    g.nodes.append(helper.make_node("Identity", [x], ["output"], name="output"))
    graph = helper.make_graph(
        g.nodes, model.name,
        [helper.make_tensor_value_info("input", elem, ["batch", model.input_dim])],
        [helper.make_tensor_value_info("output", elem, ["batch", model.output_dim])],
        initializer=g.inits)
    proto = helper.make_model(graph, producer_name="fastgrad",
                              opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = 8   # what opset 17 came with; older runtimes read it
    onnx.checker.check_model(proto)
    return proto


def to_torch(model):
    """A ``torch.nn.Sequential`` computing what ``model.predict`` computes,
    with copies of its weights, in its dtype, in eval mode."""
    torch = _need("torch", "torch")
    nn = torch.nn
    _built(model)
    dtype = torch.float32 if model.dtype == np.float32 else torch.float64
    # a layer's own slope or alpha where it has one (LeakyReLU, ELU layers)
    acts = {"relu": lambda a: nn.ReLU(),
            "leaky_relu": lambda a: nn.LeakyReLU(0.2 if a is None else a),
            "elu": lambda a: nn.ELU(1.0 if a is None else a), "selu": lambda a: nn.SELU(),
            "gelu": lambda a: nn.GELU(), "silu": lambda a: nn.SiLU(),
            "sigmoid": lambda a: nn.Sigmoid(), "tanh": lambda a: nn.Tanh(),
            "softmax": lambda a: nn.Softmax(dim=-1), "softplus": lambda a: nn.Softplus(),
            "softsign": lambda a: nn.Softsign(), "relu6": lambda a: nn.ReLU6(),
            "hard_sigmoid": lambda a: nn.Hardsigmoid(), "hard_silu": lambda a: nn.Hardswish(),
            "mish": lambda a: nn.Mish(), "log_softmax": lambda a: nn.LogSoftmax(dim=-1)}

    def tensor(a):
        return torch.from_numpy(np.array(a, dtype=model.dtype))

    modules = []
    for layer in model.layers:
        w = layer.weights
        if layer.kind == "Dense":
            lin = nn.Linear(layer.input_dim, layer.units, bias="bias" in w, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(tensor(w["kernel"].T))
                if "bias" in w:
                    lin.bias.copy_(tensor(w["bias"]))
            modules.append(lin)
        elif layer.kind == "BatchNormalization":
            bn = nn.BatchNorm1d(layer.input_dim, eps=layer.epsilon,
                                momentum=1.0 - layer.momentum, dtype=dtype)
            with torch.no_grad():
                bn.weight.copy_(tensor(w["gamma"] if "gamma" in w else np.ones(layer.input_dim)))
                bn.bias.copy_(tensor(w["beta"] if "beta" in w else np.zeros(layer.input_dim)))
                bn.running_mean.copy_(tensor(w["moving_mean"]))
                bn.running_var.copy_(tensor(w["moving_variance"]))
            # a fastgrad layer without scale (or center) keeps it fixed
            bn.weight.requires_grad_(layer.scale)
            bn.bias.requires_grad_(layer.center)
            modules.append(bn)
        elif layer.kind == "LayerNormalization":
            ln = nn.LayerNorm(layer.input_dim, eps=layer.epsilon, dtype=dtype)
            with torch.no_grad():
                ln.weight.copy_(tensor(w["gamma"] if "gamma" in w else np.ones(layer.input_dim)))
                ln.bias.copy_(tensor(w["beta"] if "beta" in w else np.zeros(layer.input_dim)))
            modules.append(ln)
        elif layer.kind == "Dropout":
            modules.append(nn.Dropout(layer.rate))
        elif layer.kind in ("GaussianNoise", "GaussianDropout", "AlphaDropout", "Identity",
                            "Flatten"):
            modules.append(nn.Identity())   # what predict computes: inference mode
        elif layer.kind not in ("Activation", "LeakyReLU", "ELU", "Softmax"):
            raise ValueError(f"model: layer {layer.name} ({layer.kind}) has no PyTorch form "
                             "in fastgrad.export yet")
        act = getattr(layer, "activation", "linear")
        if act != "linear":
            if act not in acts:
                raise ValueError(f"activation: {act!r} has no PyTorch form in "
                                 "fastgrad.export yet")
            modules.append(acts[act](getattr(layer, "negative_slope",
                                             getattr(layer, "alpha", None))))
    return nn.Sequential(*modules).eval()
