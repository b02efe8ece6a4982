"""Keras 3's conveniences on a Sequential model, as the mixin ``KerasModelAPI``
that ``Sequential`` inherits: layers by name or position and ``pop``,
``trainable`` and the weights as variables, configurations and JSON,
files (``save``, ``save_weights``, ``load_weights``, ``export``, pickling),
weight lists and ``summary``; and ``model_from_json`` and ``clone_model``.
fastgrad.models holds the model itself: layers, flat buffers, one step."""
import json

from fastgrad import layers as layers_mod, losses, metrics as metrics_mod, optimizers
from fastgrad._trainer import locked
from fastgrad._utils import check_int
from fastgrad.layers import InputLayer, _check_bool, _check_weight
from fastgrad.saving import save_model


def check_compile_extras(loss_weights, weighted_metrics, run_eagerly, steps_per_execution,
                         jit_compile, auto_scale_loss):
    """compile's Keras arguments that fastgrad takes without acting on them,
    checked; what would change results and fastgrad lacks is refused."""
    if loss_weights is not None:
        raise ValueError(f"loss_weights: a fastgrad model has one output and one loss; "
                         f"scale the loss through the learning rate instead (expected None, "
                         f"got {loss_weights!r})")
    # hook: weighted_metrics are metrics weighted by sample_weight; they are
    # taken here once the training loops pass sample weights to the metrics
    if weighted_metrics not in (None, [], ()):
        raise ValueError(f"weighted_metrics: metrics weighted by sample_weight are not "
                         f"supported yet; expected None or [], got {weighted_metrics!r}")
    _check_bool("run_eagerly", run_eagerly)
    _check_bool("auto_scale_loss", auto_scale_loss)
    if jit_compile not in ("auto", True, False):
        raise ValueError(f"jit_compile: expected 'auto', True or False, got {jit_compile!r}")
    check_int("steps_per_execution", steps_per_execution, low=1)



class KerasModelAPI:
    """The Keras 3 model API beyond building, compiling and training (see
    the module docstring); it works on ``Sequential``'s layers and buffers."""

    @locked
    def pop(self, rebuild=True):
        """Remove the last layer and return it (with copies of its weights);
        the model keeps the other layers' weights (rebuild is accepted for
        Keras compatibility: fastgrad rebuilds its buffers when it has them)."""
        if not self.layers:
            raise ValueError("pop: the model has no layers to remove")
        layer = self.layers.pop()
        layer._model = None
        if layer.weights:
            layer.bind({k: v.copy() for k, v in layer.weights.items()},
                       {k: v.copy() for k, v in layer.grads.items()})
        if self._built:
            self._rebuild()
        self._fuse()
        return layer

    @locked
    def get_layer(self, name=None, index=None):
        """The layer called ``name``, or at position ``index`` of
        ``model.layers`` (give one of them); ValueError when there is none."""
        if (name is None) == (index is None):
            raise ValueError("get_layer: give exactly one of name= and index=")
        if index is not None:
            index = check_int("index", index)
            if not -len(self.layers) <= index < len(self.layers):
                raise ValueError(f"index: the model has {len(self.layers)} layers, got {index}")
            return self.layers[index]
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ValueError(f"name: no layer called {name!r}; the layers are "
                         f"{[layer.name for layer in self.layers]}")

    def _set_trainable(self, value):
        self._trainable = _check_bool("trainable", value)
        for layer in self.layers:
            layer.trainable = value

    trainable = property(lambda self: self._trainable, _set_trainable,
                         doc="False freezes every layer (sets each layer's ``trainable``).")

    def _sync_frozen(self):
        """The optimizer's per-tensor frozen flags from the layers'
        ``trainable``, written in place (the compiled step reads them)."""
        with self._lock:
            if self._built:
                self._frozen[...] = [not layer.trainable for layer, s in self._specs
                                     if s.trainable]

    @property
    def weights(self):
        """Every weight as a fastgrad.variables.Variable, in get_weights() order."""
        return [v for layer in self.layers for v in layer.variables]

    variables = weights

    @property
    def weight_names(self):
        """Names of the trainable tensors, in get_weights() order."""
        return [t[0] for t in getattr(self, "_tensors", [])]

    def count_params(self):
        self._require_built()
        return self.params.size + self.state.size

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

    @property
    def metrics_names(self):
        """["loss", *metric names] once compiled, the names evaluate's list
        and history use (Keras 3 gives the names of its metric trackers,
        ["loss", "compile_metrics"], and only after the model has run)."""
        return ["loss", *self._metric_names] if self.optimizer is not None else []

    def get_config(self):
        """The architecture as plain data (Keras 3's form): {"name",
        "trainable", "dtype", "seed", "layers": [serialized layers]}, an
        InputLayer first when the input width is known. No weights."""
        dim = self.input_dim if self._built else self._known_input_dim()
        entries = [] if dim is None else [layers_mod.serialize(
            self._input_layer or InputLayer(shape=(dim,), name="input_layer"))]
        return {"name": self.name, "trainable": self.trainable, "dtype": self.dtype.name,
                "seed": self.seed,
                "layers": entries + [layers_mod.serialize(layer) for layer in self.layers]}

    @classmethod
    def from_config(cls, config):
        """A new, unbuilt-weights model from a get_config() dict (fresh
        layers and initial weights)."""
        config = dict(config)
        entries = config.pop("layers", [])
        config.pop("build_input_shape", None)   # Keras writes it beside an InputLayer
        if not isinstance(entries, list):
            raise TypeError(f"layers: expected a list of serialized layers, got {entries!r}")
        return cls([layers_mod.deserialize(entry) for entry in entries], **config)

    def to_json(self, **kwargs):
        """``{"class_name": "Sequential", "config": get_config()}`` as JSON
        text; keyword arguments go to json.dumps."""
        return json.dumps({"class_name": type(self).__name__, "config": self.get_config()},
                          **kwargs)

    @locked
    def save(self, filepath, overwrite=True):
        """Write the model to one file, atomically. A name ending in
        ``.keras`` gets a Keras 3 archive (fastgrad.keras_format: needs h5py);
        ``.h5``/``.hdf5`` are refused (weights only: use save_weights); any
        other name (``.fgm`` by convention) gets fastgrad's own format:
        architecture, weights, optimizer configuration and state, and
        random-generator state, for an exact resume (fastgrad.saving).
        ``overwrite`` is accepted for Keras compatibility; the file is always
        replaced, atomically."""
        save_model(self, filepath)

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
        list is checked (count, shapes, numbers) before anything changes."""
        self._require_built()
        weights = list(weights)
        if len(weights) != len(self._specs):
            raise ValueError(f"weights: expected {len(self._specs)} arrays, got {len(weights)}")
        for (layer, s), w in zip(self._specs, weights):
            _check_weight(layer._variables[s.name], w)
        for (layer, s), w in zip(self._specs, weights):
            layer.weights[s.name][...] = w

    def summary(self, print_fn=None):
        """Print each layer's name and type, output shape and parameter count."""
        print_fn = print_fn or print
        if self.built:
            self._require_built()
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
            # a frozen layer's weights count as non-trainable, as in Keras
            t = sum(s.size for layer, s in self._specs if s.trainable and layer.trainable)
            s = self.params.size + self.state.size - t
            print_fn(f" Total params: {t + s:,}")
            print_fn(f" Trainable params: {t:,}")
            print_fn(f" Non-trainable params: {s:,}")
        else:
            print_fn(" Total params: unknown until the model is built")


def model_from_json(json_string):
    """The model a ``to_json()`` text describes (new initial weights)."""
    spec = json.loads(json_string)
    if not isinstance(spec, dict) or spec.get("class_name") != "Sequential":
        raise ValueError("json_string: expected a Sequential model's to_json() text")
    from fastgrad.models import Sequential

    return Sequential.from_config(spec["config"])


def clone_model(model, input_tensors=None, clone_function=None):
    """A new model with the same architecture and fresh layers: new initial
    weights drawn as the layers' initializers say (as in Keras; copy them
    with ``clone.set_weights(model.get_weights())``). clone_function, when
    given, maps each layer to the layer the clone gets (Keras's default is
    a layer made from the original's config). The clone is not compiled."""
    from fastgrad.models import Sequential

    if not isinstance(model, Sequential):
        raise TypeError(f"model: expected a fastgrad Sequential, got {type(model).__name__}")
    if input_tensors is not None:
        raise ValueError("input_tensors: fastgrad models have no symbolic inputs; expected None")
    if clone_function is None:
        def clone_function(layer):
            return type(layer).from_config(layer.get_config())
    elif not callable(clone_function):
        raise TypeError(f"clone_function: expected a function, got {clone_function!r}")
    config = model.get_config()
    config.pop("layers")
    entries = [model._input_layer] if model._input_layer is not None else []
    return Sequential([clone_function(layer) for layer in entries + model.layers], **config)
