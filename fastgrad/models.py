"""The Sequential model: a stack of layers over flat parameter buffers.

All trainable parameters live in one contiguous array (``model.params``),
their gradients in another (``model.grads``) and non-trainable state (such
as BatchNormalization's moving statistics) in a third; layers and the
optimizer hold views. A training step is one compiled call per layer and
direction, one for the loss, two for the optimizer and one per metric,
writing into buffers allocated for the largest batch seen: after the first
step it allocates no arrays.

When the last layer's activation is softmax (with categorical or sparse
categorical cross-entropy) or sigmoid (with binary cross-entropy), training
and evaluation compute the loss from its logits, fused and stable; predict
returns the activation's output.
"""
import re
import threading

import numpy as np

from fastgrad import _core, losses, metrics as metrics_mod, ops, \
    optimizers, utils
from fastgrad._model_api import KerasModelAPI, check_compile_extras, clone_model, model_from_json
from fastgrad._trainer import Trainer, locked
from fastgrad._utils import check_int
from fastgrad.layers import Dense, InputLayer, Layer, _features
from fastgrad.saving import load_model, save_model
from fastgrad.variables import HasVariables

__all__ = ["Sequential", "load_model", "save_model", "model_from_json", "clone_model"]

_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
_FUSED = {"categorical_crossentropy": "softmax", "sparse_categorical_crossentropy": "softmax",
          "binary_crossentropy": "sigmoid", "binary_focal_crossentropy": "sigmoid",
          "categorical_focal_crossentropy": "softmax"}


def snake_case(name):
    """"BatchNormalization" -> "batch_normalization", "PReLU" -> "p_re_lu"
    (Keras' rule: a capital starts a word, a run of capitals is one)."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


class Sequential(Trainer, KerasModelAPI, HasVariables):
    """A linear stack of layers.

    ``Sequential(layers=None, dtype="float32", seed=None)``: dtype is
    "float32" or "float64"; seed makes initialization, shuffling and dropout
    reproducible (same seed, data and settings: bit-identical weights).

    This class holds the model: its layers, the flat buffers and one
    training step. The loops over data (fit, evaluate, predict, ...) come
    from fastgrad._trainer.Trainer."""

    def __init__(self, layers=None, dtype="float32", seed=None, name="sequential",
                 trainable=True):
        if dtype not in _DTYPES:
            key = np.dtype(dtype).name if isinstance(dtype, (type, np.dtype)) else dtype
            if key not in _DTYPES:
                raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
            dtype = key
        self.seed = check_int("seed", seed, low=0, none=True)
        self.dtype = _DTYPES[dtype]
        self.name = name
        self.layers = []
        self._built = False          # the weights exist (Keras's built: see the property)
        self._input_layer = None
        self._trainable = True
        self.optimizer = self.loss = None
        self.metrics = []
        self._loss_sum = self._loss_rows = 0.0
        self.stop_training = False
        self.history = None
        self._rng = utils.model_generator(self.seed)
        self._cap, self._chain = 0, None
        self._lock = threading.RLock()
        for layer in layers or []:
            self.add(layer)
        if not trainable:
            self.trainable = False

    # -- structure --------------------------------------------------------
    @property
    def built(self):
        """As in Keras 3: True once the input width is known (an Input, or
        input_dim/input_shape on the first layer) or the model has run.
        fastgrad allocates the weights on first use (compile, fit, predict,
        get_weights, ``weights``, a layer's ``kernel``, ...)."""
        return self._built or bool(self.layers) and self._known_input_dim() is not None

    def _known_input_dim(self):
        if self._input_layer is not None:
            return self._input_layer.input_dim
        return self.layers[0].input_dim if self.layers else None

    @property
    def input_shape(self):
        """(None, features), or None while unknown."""
        dim = self.input_dim if self._built else self._known_input_dim()
        return None if dim is None else (None, dim)

    @locked
    def add(self, layer):
        """Append a layer. An InputLayer (``fg.Input(shape=(features,))``)
        may come first and fixes the input width. Adding to a model whose
        weights exist rebuilds its buffers, keeping every earlier layer's
        weights (the optimizer's moments start over)."""
        if not isinstance(layer, Layer):
            raise TypeError(f"layer: expected a fastgrad.layers layer (or fg.Input), got "
                            f"{type(layer).__name__}")
        if layer._model is not None:
            raise ValueError(f"layer: {layer.name or layer.kind} already belongs to model "
                             f"{layer._model.name!r}; a layer's weights live in one model's "
                             "buffers (fg.models.clone_model copies a model)")
        if isinstance(layer, InputLayer):
            if self._input_layer is not None or self.layers:
                raise ValueError(f"layer: an InputLayer must be the first element of "
                                 f"model {self.name!r}, and only one")
            layer._model, self._input_layer = self, layer
            if layer.name is None:
                layer.name = "input_layer"
            return
        if layer.name is None:
            base = snake_case(layer.kind)
            taken = {other.name for other in self.layers}
            k, name = 0, base
            while name in taken:
                k += 1
                name = f"{base}_{k}"
            layer.name = name
        elif any(other.name == layer.name for other in self.layers):
            raise ValueError(f"layer: the name {layer.name!r} is already used in this model")
        if self._built:
            self._plan(self.input_dim, self.layers + [layer])  # refuses before any change
        self.layers.append(layer)
        layer._model = self
        if self._built:
            self._rebuild()
        self._fuse()

    def _rebuild(self):
        """New buffers for the current layers, with the weights they had."""
        kept = {id(layer): {k: v.copy() for k, v in layer.weights.items()}
                for layer in self.layers if layer.weights}
        self._built, self._cap, self._chain = False, 0, None
        if self.optimizer is not None:
            self.optimizer._moments = {}   # moments of another layout start over
        if not self.layers:
            return
        self.build(self.input_dim)
        for layer in self.layers:
            for k, v in kept.get(id(layer), {}).items():
                if k in layer.weights and layer.weights[k].shape == v.shape:
                    layer.weights[k][...] = v

    def _fuse(self):
        """Whether the loss is computed from the last layer's logits."""
        if self.loss is None:
            return
        act = getattr(self.layers[-1], "activation", None) if self.layers else None
        self._fused = (not self.loss.from_logits and self.loss.name in _FUSED
                       and act == _FUSED[self.loss.name])
        self._from_logits = self.loss.from_logits or self._fused

    # -- Keras's weight API -------------------------------------------------

    def _plan(self, input_dim, layers=None):
        """Layer shapes and weight specs for input_dim features, allocating
        nothing. Returns (output_dim, [(layer, WeightSpec)])."""
        layers = self.layers if layers is None else layers
        if not layers:
            raise ValueError("model: it has no layers; add some first")
        dim = check_int("input_dim", input_dim, low=1)
        for layer in layers:
            dim = layer.build(dim)
        return dim, [(layer, s) for layer in layers for s in layer.weight_specs]

    def weight_shapes(self, input_dim=None):
        """``[(name, shape, trainable)]`` of every weight, in get_weights()
        order, for inputs of ``input_dim`` features (default: the model's),
        computed without building the model or allocating anything."""
        if input_dim is None:
            input_dim = self.input_dim if self._built else self._known_input_dim()
        _, specs = self._plan(input_dim)
        return [(f"{layer.name}/{s.name}", s.shape, s.trainable) for layer, s in specs]

    @locked
    def build(self, input_dim=None):
        """Create the weights for inputs of ``input_dim`` features (Keras's
        ``build((None, features))`` is taken too)."""
        if self._built:
            return
        if isinstance(input_dim, (tuple, list)):
            input_dim = _features("input_shape", input_dim)
        if input_dim is None:
            input_dim = self._known_input_dim()
        if input_dim is None:
            raise ValueError("input_dim: unknown; give the first layer input_dim= or "
                             "input_shape=, or call fit/predict")
        dim, specs = self._plan(input_dim)
        self.input_dim, self.output_dim = int(input_dim), dim
        n_train = sum(s.size for _, s in specs if s.trainable)
        n_state = sum(s.size for _, s in specs if not s.trainable)
        self.params = np.zeros(n_train, self.dtype)
        self.grads = np.zeros(n_train, self.dtype)
        self.state = np.zeros(n_state, self.dtype)
        # the state before a training step, put back if its update is skipped
        self._state_before = np.empty_like(self.state)
        self._tensors, self._specs = [], specs
        self._dropouts = [layer for layer in self.layers if hasattr(layer, "counter")]
        offs = {True: 0, False: 0}
        views = {id(layer): ({}, {}) for layer in self.layers}
        for layer, s in specs:
            off = offs[s.trainable]
            buf = self.params if s.trainable else self.state
            value = buf[off:off + s.size].reshape(s.shape)
            value[...] = s.initializer(s.shape, self.dtype, self._rng)
            views[id(layer)][0][s.name] = value
            if s.trainable:
                views[id(layer)][1][s.name] = self.grads[off:off + s.size].reshape(s.shape)
                self._tensors.append((f"{layer.name}/{s.name}", off, s.shape,
                                      s.regularizer, s.constraint))
            offs[s.trainable] = off + s.size
        for layer in self.layers:
            layer.bind(*views[id(layer)])
            layer.init_random(self._rng)
        self._frozen = np.array([not layer.trainable for layer, s in specs if s.trainable],
                                np.uint8)
        self._built = True
        if self.optimizer is not None:
            self.optimizer.build(self.params, self.grads, self._tensors, self._frozen)

    # -- compile ----------------------------------------------------------
    @locked
    def compile(self, optimizer="adam", loss="categorical_crossentropy", metrics=None,
                loss_weights=None, weighted_metrics=None, run_eagerly=False,
                steps_per_execution=1, jit_compile="auto", auto_scale_loss=True):
        """Choose the optimizer, loss and metrics (names or objects).

        Keras 3's other arguments are taken where they mean something here
        or change nothing: run_eagerly and jit_compile (fastgrad runs its
        compiled kernels either way), steps_per_execution (an int >= 1;
        the batch callbacks still run every step), auto_scale_loss (for
        mixed precision, which fastgrad does not have). loss_weights must
        be None (one output, one loss); weighted_metrics None or [].
        metrics is the third positional argument (in Keras it is
        loss_weights: pass the others by keyword, as Keras code does)."""
        check_compile_extras(loss_weights, weighted_metrics, run_eagerly, steps_per_execution,
                              jit_compile, auto_scale_loss)
        opt = optimizers.get(optimizer)
        loss_obj = losses.get(loss)
        if metrics is None:
            metrics = []
        elif isinstance(metrics, (str, metrics_mod.Metric)):
            metrics = [metrics]
        elif not isinstance(metrics, (list, tuple)):
            raise TypeError(f"metrics: expected a list of metric names or "
                            f"fastgrad.metrics.Metric objects, got {metrics!r}")
        metrics = list(metrics)
        mets = [metrics_mod.get(m) for m in metrics]
        names = [m.name for m in mets]
        if len(set(names)) != len(names):
            raise ValueError(f"metrics: two metrics share a name in {names}; give each "
                             "metric object its own name=")
        loss_code = ops.LOSSES[loss_obj.name]
        # every argument is resolved and checked (layers checked their
        # constraints when created): only now does anything change
        if self.built:
            self._require_built()
            opt.build(self.params, self.grads, self._tensors, self._frozen)
            # "accuracy" is known from the outputs now (else on the first batch)
            sparse = loss_obj.name == "sparse_categorical_crossentropy"
            mets = [m.resolved(self.output_dim, sparse) if isinstance(m, metrics_mod._Accuracy)
                    else m for m in mets]
        self.optimizer, self.loss, self.metrics = opt, loss_obj, mets
        self.reset_metrics()
        self._metric_names, self._metric_specs = names, metrics
        self._fuse()
        self._loss_code = loss_code
        self.steps_per_execution = steps_per_execution

    def _require_built(self, input_dim=None):
        if not self._built:
            self.build(input_dim)

    def _require_compiled(self, what):
        if self.optimizer is None:
            raise RuntimeError(f"{what}: the model is not compiled; call "
                               "model.compile(optimizer, loss) first")

    # -- one batch ----------------------------------------------------------
    def _prepare(self, batch):
        """Work buffers for batches of up to ``batch`` rows."""
        if batch <= self._cap:
            return
        for i, layer in enumerate(self.layers):
            layer.allocate(batch, self.dtype, need_dx=i > 0)
        self._dlogits = np.empty((batch, self.output_dim), self.dtype)
        self._prob = np.empty((batch, self.output_dim), self.dtype)
        self._chain = self._dense_chain(batch)
        # last: an interrupt in between leaves the buffers to be grown again
        self._cap = batch

    def _dense_chain(self, batch):
        """The compiled pass over every layer (_core.DenseChain) when all of
        them are Dense, else None (each layer runs its own call)."""
        if not all(type(layer) is Dense for layer in self.layers):
            return None
        # a layer's buffers may be larger: kept from a batch before a rebuild
        return _core.DenseChain(
            [(d.weights["kernel"], d.weights.get("bias"), d._out, d._pre,
              d.grads["kernel"], d.grads.get("bias"), d._dx, d._code, d._alpha)
             for d in self.layers], batch)

    def _forward(self, x, training, logits, compiled=True):
        """The outputs of a batch (logits: without the last activation,
        which the loss applies); compiled=False runs each layer's own call
        (the path that can gather activation statistics)."""
        if compiled and self._chain is not None:
            return self._chain.forward(x, logits)
        h = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer.forward(h, training, logits and i == last)
        return h

    def _batch_loss(self, h, target, labels, d, weights=None):
        """(loss, predictions) of a batch's outputs h (logits when fused);
        with d, the loss's gradient with respect to h lands in it. With row
        weights w (the model's dtype, one per row), the compiled loss gives
        sum_i w_i l_i / rows and scales row i's gradient by w_i (Keras's
        sum_over_batch_size)."""
        prob = self._prob[:h.shape[0]] if self._fused else None
        lo = self.loss
        loss = _core.loss_forward_backward(h, target, labels, None, d, prob, self._loss_code,
                                           self._from_logits, lo.delta, lo.alpha, lo.gamma,
                                           lo.apply_class_balancing, weights)
        return loss, (prob if self._fused else h)

    def _update_metrics(self, pred, target, labels):
        """Add a batch's predictions to every compiled metric (unweighted, as
        Keras's ``metrics``)."""
        for m in self.metrics:
            m._update(pred, target, labels, None)

    def _forward_backward(self, x, target, labels, weights=None, compiled=True):
        """(loss, predictions) of a batch in training mode; the gradients
        land in self.grads (weights as in _batch_loss). Callers have checked
        that the batch has rows (fastgrad._data.check_rows), so no layer
        refuses it after others have run."""
        compiled = compiled and self._chain is not None
        h = self._forward(x, True, self._fused, compiled)
        d = self._dlogits[:x.shape[0]]
        loss, pred = self._batch_loss(h, target, labels, d, weights)
        if compiled:
            self._chain.backward(d)
            return loss, pred
        for i in range(len(self.layers) - 1, -1, -1):
            d = self.layers[i].backward(d, i > 0)
        return loss, pred

    def _train_step(self, x, target, labels, weights=None):
        """One optimizer step (rows weighted as in _batch_loss); returns the
        loss with penalties and adds the batch to the metrics."""
        opt, stateful = self.optimizer, self.state.size > 0
        if stateful:
            np.copyto(self._state_before, self.state)
        counters = [(layer, layer.counter) for layer in self._dropouts]
        steps, finished = opt.iterations, False
        try:
            loss, pred = self._forward_backward(x, target, labels, weights)
            rec = opt.apply()
            finished = True
        finally:
            # a step refused for non-finite gradients (skipped or raised)
            # leaves the moving statistics as they were too; one broken off
            # (an error, Ctrl-C) also the dropout counters
            if stateful and opt.iterations == steps:
                np.copyto(self.state, self._state_before)
            if not finished and opt.iterations == steps:
                for layer, counter in counters:
                    layer.counter = counter
        if self.metrics:
            self._update_metrics(pred, target, labels)
        return loss + rec.penalty

    def _penalty(self):
        """The regularization penalties at the current weights (trainable
        weights only, as in Keras 3)."""
        return sum(s.regularizer(layer.weights[s.name]) for layer, s in self._specs
                   if s.trainable and s.regularizer is not None and layer.trainable)
