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
import threading

import numpy as np

from fastgrad import _core, losses, metrics as metrics_mod, ops, optimizers
from fastgrad._trainer import Trainer, locked
from fastgrad._utils import check_int
from fastgrad.layers import Layer
from fastgrad.saving import load_model, save_model

__all__ = ["Sequential", "load_model"]

_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
_FUSED = {"categorical_crossentropy": "softmax", "sparse_categorical_crossentropy": "softmax",
          "binary_crossentropy": "sigmoid"}


def snake_case(name):
    """"BatchNormalization" -> "batch_normalization"."""
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


class Sequential(Trainer):
    """A linear stack of layers.

    ``Sequential(layers=None, dtype="float32", seed=None)``: dtype is
    "float32" or "float64"; seed makes initialization, shuffling and dropout
    reproducible (same seed, data and settings: bit-identical weights).

    This class holds the model: its layers, the flat buffers and one
    training step. The loops over data (fit, evaluate, predict, ...) come
    from fastgrad._trainer.Trainer."""

    def __init__(self, layers=None, dtype="float32", seed=None, name="sequential"):
        if dtype not in _DTYPES:
            key = np.dtype(dtype).name if isinstance(dtype, (type, np.dtype)) else dtype
            if key not in _DTYPES:
                raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
            dtype = key
        self.seed = check_int("seed", seed, low=0, none=True)
        self.dtype = _DTYPES[dtype]
        self.name = name
        self.layers = []
        self.built = False
        self.optimizer = self.loss = None
        self.metrics = []
        self._loss_sum = self._loss_rows = 0.0
        self.stop_training = False
        self.history = None
        self._rng = np.random.default_rng(seed)
        self._cap = 0
        self._lock = threading.RLock()
        for layer in layers or []:
            self.add(layer)

    # -- structure --------------------------------------------------------
    @locked
    def add(self, layer):
        """Append a layer (before the model is built)."""
        if not isinstance(layer, Layer):
            raise TypeError(f"layer: expected a fastgrad.layers layer, got {type(layer).__name__}")
        if self.built:
            raise ValueError("layer: the model is already built (its weights exist); add "
                             "every layer before the first compile, fit or predict")
        if any(layer is other for other in self.layers):
            raise ValueError(f"layer: {layer.name or layer.kind} is already in the model")
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
        self.layers.append(layer)

    def _plan(self, input_dim):
        """Layer shapes and weight specs for input_dim features, allocating
        nothing. Returns (output_dim, [(layer, WeightSpec)])."""
        if not self.layers:
            raise ValueError("model: it has no layers; add some first")
        dim = check_int("input_dim", input_dim, low=1)
        for layer in self.layers:
            dim = layer.build(dim)
        return dim, [(layer, s) for layer in self.layers for s in layer.weight_specs]

    def weight_shapes(self, input_dim=None):
        """``[(name, shape, trainable)]`` of every weight, in get_weights()
        order, for inputs of ``input_dim`` features (default: the model's),
        computed without building the model or allocating anything."""
        if input_dim is None:
            input_dim = self.input_dim if self.built else self.layers[0].input_dim \
                if self.layers else None
        _, specs = self._plan(input_dim)
        return [(f"{layer.name}/{s.name}", s.shape, s.trainable) for layer, s in specs]

    @locked
    def build(self, input_dim=None):
        """Create the weights for inputs of ``input_dim`` features."""
        if self.built:
            return
        if input_dim is None and self.layers:
            input_dim = self.layers[0].input_dim
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
        self.built = True
        if self.optimizer is not None:
            self.optimizer.build(self.params, self.grads, self._tensors)

    @property
    def weight_names(self):
        """Names of the trainable tensors, in get_weights() order."""
        return [t[0] for t in getattr(self, "_tensors", [])]

    def count_params(self):
        self._require_built()
        return self.params.size + self.state.size

    # -- compile ----------------------------------------------------------
    @locked
    def compile(self, optimizer="adam", loss="categorical_crossentropy", metrics=None):
        """Choose the optimizer, loss and metrics (names or objects)."""
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
        last = self.layers[-1] if self.layers else None
        act = getattr(last, "activation", None)
        fused = (not loss_obj.from_logits and loss_obj.name in _FUSED
                 and act == _FUSED[loss_obj.name])
        loss_code = ops.LOSSES[loss_obj.name]
        # every argument is resolved and checked (layers checked their
        # constraints when created): only now does anything change
        if not self.built and self.layers and self.layers[0].input_dim is not None:
            self.build()
        if self.built:
            opt.build(self.params, self.grads, self._tensors)
            # "accuracy" is known from the outputs now (else on the first batch)
            sparse = loss_obj.name == "sparse_categorical_crossentropy"
            mets = [m.resolved(self.output_dim, sparse) if isinstance(m, metrics_mod._Accuracy)
                    else m for m in mets]
        self.optimizer, self.loss, self.metrics = opt, loss_obj, mets
        self.reset_metrics()
        self._metric_names, self._metric_specs = names, metrics
        self._fused, self._from_logits = fused, loss_obj.from_logits or fused
        self._loss_code = loss_code

    def get_compile_config(self):
        """compile's arguments, serialized (Keras 3's name), or None before
        compile: {"optimizer", "loss", "metrics"}, metrics given by name as
        names (accuracy resolves from the loss), objects as their
        ``serialize`` dicts."""
        if self.optimizer is None:
            return None
        return {"optimizer": optimizers.serialize(self.optimizer),
                "loss": losses.serialize(self.loss),
                "metrics": [name if isinstance(spec, str) else metrics_mod.serialize(m)
                            for spec, name, m in zip(self._metric_specs, self._metric_names,
                                                     self.metrics)]}

    def compile_from_config(self, config):
        """compile from a ``get_compile_config()`` dict (Keras 3's name)."""
        self.compile(optimizers.deserialize(config["optimizer"]),
                     losses.deserialize(config["loss"]),
                     [m if isinstance(m, str) else metrics_mod.deserialize(m)
                      for m in config["metrics"]])

    def _require_built(self, input_dim=None):
        if not self.built:
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
        self._cap = batch
        for i, layer in enumerate(self.layers):
            layer.allocate(batch, self.dtype, need_dx=i > 0)
        self._dlogits = np.empty((batch, self.output_dim), self.dtype)
        self._prob = np.empty((batch, self.output_dim), self.dtype)

    def _forward(self, x, training, logits):
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
        loss = _core.loss_forward_backward(h, target, labels, None, d, prob, self._loss_code,
                                           self._from_logits, self.loss.delta, weights)
        return loss, (prob if self._fused else h)

    def _update_metrics(self, pred, target, labels):
        """Add a batch's predictions to every compiled metric (unweighted, as
        Keras's ``metrics``)."""
        for m in self.metrics:
            m._update(pred, target, labels, None)

    def _forward_backward(self, x, target, labels, weights=None):
        """(loss, predictions) of a batch in training mode; the gradients
        land in self.grads (weights as in _batch_loss). Callers have checked
        the batch's rows (fastgrad._data.check_training_rows), so no layer
        refuses it after others have run."""
        h = self._forward(x, True, self._fused)
        d = self._dlogits[:x.shape[0]]
        loss, pred = self._batch_loss(h, target, labels, d, weights)
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
        """The regularization penalties at the current weights."""
        return sum(s.regularizer(layer.weights[s.name]) for layer, s in self._specs
                   if s.trainable and s.regularizer is not None)

    # -- weights and files ------------------------------------------------
    @locked
    def save(self, path):
        """Write the model to one file, atomically. A name ending in
        ``.keras`` gets a Keras 3 archive (fastgrad.keras_format: needs h5py);
        ``.h5``/``.hdf5`` are refused (weights only: use save_weights); any
        other name (``.fgm`` by convention) gets fastgrad's own format:
        architecture, weights, optimizer configuration and state, and
        random-generator state, for an exact resume (fastgrad.saving)."""
        save_model(self, path)

    @locked
    def save_weights(self, filepath, overwrite=True):
        """Write the weights (and optimizer state) to a Keras
        ``.weights.h5`` file (needs h5py). ``overwrite`` is accepted for
        Keras compatibility; the file is always replaced, atomically."""
        from fastgrad import keras_format

        keras_format.save_weights(self, filepath)

    @locked
    def load_weights(self, filepath):
        """Read weights written by ``save_weights`` here or in Keras."""
        from fastgrad import keras_format

        keras_format.load_weights(self, filepath)

    @locked
    def export(self, filepath, format="onnx", verbose=None):
        """Export for inference; format "onnx" (fastgrad.export)."""
        from fastgrad import export

        export.export(self, filepath, format=format)

    def __reduce__(self):
        # pickle, copy and joblib go through the validated file format
        from fastgrad import pickling

        with self._lock:
            return pickling.reduce(self)

    @locked
    def get_weights(self):
        """Copies of every weight, layer by layer (Dense: kernel, bias)."""
        self._require_built()
        return [layer.weights[s.name].copy() for layer, s in self._specs]

    @locked
    def set_weights(self, weights):
        """Set every weight from a list like get_weights() returns; the whole
        list is checked before anything changes."""
        self._require_built()
        weights = list(weights)
        if len(weights) != len(self._specs):
            raise ValueError(f"weights: expected {len(self._specs)} arrays, got {len(weights)}")
        arrays = []
        for (layer, s), w in zip(self._specs, weights):
            w = np.asarray(w)
            if w.dtype.kind not in "biuf":
                raise TypeError(f"weights: {layer.name}/{s.name} must be numbers, got dtype "
                                f"{w.dtype}")
            if w.shape != s.shape:
                raise ValueError(f"weights: {layer.name}/{s.name} expected shape {s.shape}, "
                                 f"got {w.shape}")
            arrays.append(w)
        for (layer, s), w in zip(self._specs, arrays):
            layer.weights[s.name][...] = w

    def summary(self, print_fn=None):
        """Print each layer's name and type, output shape and parameter count."""
        print_fn = print_fn or print
        if not self.built and self.layers and self.layers[0].input_dim is not None:
            self.build()
        rows = []
        for layer in self.layers:
            shape = f"(None, {layer.output_dim})" if layer.output_dim else "?"
            rows.append((f"{layer.name} ({layer.kind})", shape,
                         f"{layer.count_params():,}" if self.built else "?"))
        w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
             for i, h in enumerate(("Layer (type)", "Output Shape", "Param #"))]
        w = [max(w[0], 28), max(w[1], 20), max(w[2], 10)]
        line = "─" * (sum(w) + 6)
        print_fn(f'Model: "{self.name}"')
        print_fn(line)
        print_fn(f"{'Layer (type)':<{w[0]}}   {'Output Shape':<{w[1]}}   {'Param #':>{w[2]}}")
        print_fn(line)
        for r in rows:
            print_fn(f"{r[0]:<{w[0]}}   {r[1]:<{w[1]}}   {r[2]:>{w[2]}}")
        print_fn(line)
        if self.built:
            t, s = self.params.size, self.state.size
            print_fn(f" Total params: {t + s:,}")
            print_fn(f" Trainable params: {t:,}")
            print_fn(f" Non-trainable params: {s:,}")
        else:
            print_fn(" Total params: unknown until the model is built")
