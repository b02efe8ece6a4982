"""The Sequential model: a stack of layers over flat parameter buffers.

All trainable parameters live in one contiguous array (``model.params``),
their gradients in another (``model.grads``) and non-trainable state (such
as BatchNormalization's moving statistics) in a third; layers and the
optimizer hold views. A training step is one compiled call per layer and
direction, one for the loss and two for the optimizer, writing into buffers
allocated for the largest batch seen: after the first step it allocates no
arrays beyond the compiled metrics' NumPy temporaries, sized by the batch's
predictions (fastgrad.metrics).

When the last layer's activation is softmax (with categorical or sparse
categorical cross-entropy) or sigmoid (with binary cross-entropy), training
and evaluation compute the loss from its logits, fused and stable; predict
returns the activation's output.
"""
import functools
import math
import sys
import threading
import time

import numpy as np

from fastgrad import _core, callbacks as callbacks_mod, losses, metrics as metrics_mod, ops
from fastgrad import optimizers
from fastgrad.layers import Layer

_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
_FUSED = {"categorical_crossentropy": "softmax", "sparse_categorical_crossentropy": "softmax",
          "binary_crossentropy": "sigmoid"}


class _ProgressBar:
    """The live bar of ``fit(verbose=1)``: tqdm when it is installed,
    otherwise one carriage-returned line."""

    def __init__(self, epoch, epochs, total):
        self.t0, self.total = time.perf_counter(), total
        self.desc = f"Epoch {epoch + 1}/{epochs}"
        self._last = 0
        try:
            from tqdm import tqdm
        except ImportError:
            self.tqdm = None
        else:
            self.tqdm = tqdm(total=total, desc=self.desc, unit="sample", leave=False,
                             file=sys.stdout, mininterval=0.2)

        self.live = self.tqdm is not None or sys.stdout.isatty()

    def update(self, done, loss, names, values):
        post = {"loss": f"{loss:.4f}", **{k: f"{v:.4f}" for k, v in zip(names, values)}}
        if self.tqdm is not None:
            self.tqdm.update(done - self._last)
            self.tqdm.set_postfix(post, refresh=False)
        elif self.live:
            now = time.perf_counter()
            if done < self.total and now - getattr(self, "_shown", 0) < 0.2:
                self._last = done
                return
            self._shown = now
            rate = done / max(now - self.t0, 1e-9)
            fill = 20 * done // max(self.total, 1)
            stats = " - ".join(f"{k}: {v}" for k, v in post.items())
            print(f"\r{self.desc} [{'=' * fill}{'.' * (20 - fill)}] {done}/{self.total} - "
                  f"{rate:,.0f} samples/s - {stats}", end="", file=sys.stdout, flush=True)
        self._last = done

    def close(self):
        if self.tqdm is not None:
            self.tqdm.close()
        elif self.live:
            print("\r\033[K", end="", file=sys.stdout)   # clear the bar's line


def _locked(method):
    """Serialize calls on one model: layers share work buffers, so two
    threads must not run passes on the same model at once. Other models,
    and the compiled kernels, run in parallel (they release the GIL)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


def _snake(name):
    out = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    return out.replace("batch_normalization", "batch_normalization")


class Sequential:
    """A linear stack of layers.

    ``Sequential(layers=None, dtype="float32", seed=None)``: dtype is
    "float32" or "float64"; seed makes initialization, shuffling and dropout
    reproducible (same seed, data and settings: bit-identical weights)."""

    def __init__(self, layers=None, dtype="float32", seed=None, name="sequential"):
        if dtype not in _DTYPES:
            key = np.dtype(dtype).name if isinstance(dtype, type) or isinstance(dtype, np.dtype) else dtype
            if key not in _DTYPES:
                raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
            dtype = key
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                                 or seed < 0):
            raise ValueError(f"seed: expected None or a non-negative integer, got {seed!r}")
        self.dtype = _DTYPES[dtype]
        self.seed = seed
        self.name = name
        self.layers = []
        self.built = False
        self.optimizer = self.loss = None
        self.metrics = []
        self.stop_training = False
        self.history = None
        self._rng = np.random.default_rng(seed)
        self._cap = 0
        self._lock = threading.RLock()
        for layer in layers or []:
            self.add(layer)

    # -- structure --------------------------------------------------------
    @_locked
    def add(self, layer):
        """Append a layer (before the model is built)."""
        if not isinstance(layer, Layer):
            raise TypeError(f"layer: expected a fastgrad.layers layer, got {type(layer).__name__}")
        if self.built:
            raise ValueError("layer: the model is already built (its weights exist); add "
                             "every layer before the first compile, fit or predict")
        if any(layer is l for l in self.layers):
            raise ValueError(f"layer: {layer.name or layer.kind} is already in the model")
        if self.layers and (layer.input_dim is not None and layer.name is None
                            and False):
            pass
        if layer.name is None:
            base = _snake(layer.kind)
            taken = {l.name for l in self.layers}
            k, name = 0, base
            while name in taken:
                k += 1
                name = f"{base}_{k}"
            layer.name = name
        elif any(l.name == layer.name for l in self.layers):
            raise ValueError(f"layer: the name {layer.name!r} is already used in this model")
        self.layers.append(layer)

    def _plan(self, input_dim):
        """Layer shapes and weight specs for input_dim features, allocating
        nothing. Returns (output_dim, [(layer, WeightSpec)])."""
        if not self.layers:
            raise ValueError("model: it has no layers; add some first")
        dim = int(input_dim)
        if dim < 1:
            raise ValueError(f"input_dim: expected a positive integer, got {input_dim!r}")
        for layer in self.layers:
            dim = layer.build(dim)
        return dim, [(layer, s) for layer in self.layers for s in layer.weight_specs]

    def _output_dim_for(self, input_dim):
        dim = input_dim
        for layer in self.layers:
            dim = getattr(layer, "units", dim)
        return dim

    @_locked
    def build(self, input_dim=None, _check=None):
        """Create the weights for inputs of ``input_dim`` features."""
        if self.built:
            return
        if input_dim is None and self.layers:
            input_dim = self.layers[0].input_dim
        if input_dim is None:
            raise ValueError("input_dim: unknown; give the first layer input_dim= or "
                             "input_shape=, or call fit/predict")
        dim, specs = self._plan(input_dim)
        if _check is not None:
            _check(specs)     # the loader compares shapes before anything is allocated
        self.input_dim, self.output_dim = int(input_dim), dim
        # BatchNormalization needs two rows to estimate a variance in training
        self._min_batch = 2 if any(l.kind == "BatchNormalization" for l in self.layers) else 1
        n_train = sum(s.size for _, s in specs if s.trainable)
        n_state = sum(s.size for _, s in specs if not s.trainable)
        self.params = np.zeros(n_train, self.dtype)
        self.grads = np.zeros(n_train, self.dtype)
        self.state = np.zeros(n_state, self.dtype)
        # the state before a training step, put back if its update is skipped
        self._state_before = np.empty_like(self.state)
        self._tensors, self._specs = [], specs
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
        self._require_built("count_params")
        return self.params.size + self.state.size

    # -- compile ----------------------------------------------------------
    @_locked
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
        mets = [metrics_mod.get(m, loss_obj.name) for m in metrics]
        names = [m if isinstance(m, str) else m.name for m in metrics]
        names = ["accuracy" if n in ("acc", "accuracy") else n for n in names]
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
        self.optimizer, self.loss, self.metrics = opt, loss_obj, mets
        self._metric_names, self._metric_specs = names, metrics
        self._fused, self._from_logits = fused, loss_obj.from_logits or fused
        self._loss_code = loss_code

    # -- input checks -----------------------------------------------------
    def _require_built(self, what, input_dim=None):
        if not self.built:
            self.build(input_dim)

    def _require_compiled(self, what):
        if self.optimizer is None:
            raise RuntimeError(f"{what}: the model is not compiled; call "
                               "model.compile(optimizer, loss) first")

    def _check_x(self, x, name="x", dim=None):
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise TypeError(f"{name}: expected an array of numbers, got dtype {x.dtype}")
        if x.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D array (batch, features), got shape {x.shape}")
        if dim is None:
            dim = self.input_dim if self.built else self.layers[0].input_dim if self.layers \
                else None
        if dim is not None and x.shape[1] != dim:
            raise ValueError(f"{name}: expected {dim} features per row, got {x.shape[1]} "
                             f"(shape {x.shape})")
        return self._converted(x, name)

    def _converted(self, a, name):
        """a as a C-contiguous array of the model's dtype, refused (by row)
        when it holds NaN, inf, or values beyond the dtype's range."""
        src = a
        if a.dtype != self.dtype or not (a.flags.c_contiguous and a.flags.aligned):
            with np.errstate(over="ignore", invalid="ignore"):
                a = np.require(a, self.dtype, ["C", "A"])
        bad = _core.first_nonfinite_row(a)
        if bad >= 0:
            if src.dtype.kind == "f" and np.isfinite(src[bad]).all():
                raise ValueError(f"{name}: row {bad} holds values beyond the {self.dtype} "
                                 "range")
            raise ValueError(f"{name}: row {bad} holds NaN or inf; values must be finite")
        return a

    def _check_y(self, y, batch, name="y", out_dim=None):
        """Targets as the model's dtype (batch, outputs), or int64 labels."""
        out_dim = self.output_dim if out_dim is None else out_dim
        if self.loss.name == "sparse_categorical_crossentropy":
            try:
                return None, ops._labels(y, batch, out_dim)
            except (ValueError, TypeError) as e:
                raise type(e)(str(e).replace("y_true:", f"{name}:", 1)) from None
        y = np.asarray(y)
        if y.dtype.kind not in "biuf":
            raise TypeError(f"{name}: expected an array of numbers, got dtype {y.dtype}")
        if y.ndim == 1 and out_dim == 1:
            y = y.reshape(-1, 1)
        if y.ndim != 2 or y.shape != (batch, out_dim):
            what = ("one-hot targets " if self.loss.name == "categorical_crossentropy" else "")
            raise ValueError(f"{name}: expected {what}of shape ({batch}, {out_dim}) "
                             f"to match the rows and the model's {out_dim} outputs, got "
                             f"shape {y.shape}")
        return self._converted(y, name), None

    def _check_xy(self, x, y, what, names=("x", "y"), build=True, dim=None):
        """x and y checked and converted; with build, the model is then
        built for x's features if it was not yet (only after every check)."""
        x = self._check_x(x, names[0], dim)
        n = len(y) if hasattr(y, "__len__") else None
        if n is not None and n != x.shape[0]:
            raise ValueError(f"{names[1]}: expected {x.shape[0]} rows to match "
                             f"{names[0]}, got {n}")
        # checked against the output size before the model is built, so that
        # a refused first call leaves the model as it was
        target, labels = self._check_y(y, x.shape[0], names[1],
                                       None if self.built else self._output_dim_for(x.shape[1]))
        if build and not self.built:
            self.build(x.shape[1])
        return x, target, labels

    def _check_training_rows(self, n):
        """Refuse a training batch BatchNormalization cannot use, before
        anything is built or run."""
        if n == 0:
            raise ValueError("x: expected at least one row")
        if n < 2 and any(l.kind == "BatchNormalization" for l in self.layers):
            raise ValueError(f"x: BatchNormalization needs at least 2 rows per batch in "
                             f"training to estimate a variance, got {n}")

    # -- buffers ----------------------------------------------------------
    def _prepare(self, batch):
        """Work buffers for batches of up to ``batch`` rows."""
        if batch <= self._cap:
            return
        self._cap = batch
        for i, layer in enumerate(self.layers):
            layer.allocate(batch, self.dtype, need_dx=i > 0)
        self._dlogits = np.empty((batch, self.output_dim), self.dtype)
        self._prob = np.empty((batch, self.output_dim), self.dtype)

    # -- the step ---------------------------------------------------------
    def _forward(self, x, training, logits):
        h = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer.forward(h, training, logits and i == last)
        return h

    def _forward_backward(self, x, target, labels):
        """Loss of the batch; its gradients land in self.grads."""
        b = x.shape[0]
        if b < self._min_batch:
            # refused before any layer runs, so nothing (dropout counters,
            # moving statistics) has moved
            raise ValueError(f"x: BatchNormalization needs at least 2 rows per batch in "
                             f"training to estimate a variance, got {b}")
        h = self._forward(x, True, self._fused)
        d = self._dlogits[:b]
        prob = self._prob[:b] if self._fused else None
        loss = _core.loss_forward_backward(h, target, labels, None, d, prob, self._loss_code,
                                           self._from_logits, self.loss.delta)
        for i in range(len(self.layers) - 1, -1, -1):
            d = self.layers[i].backward(d, i > 0)
        return loss, h, prob

    def _train_step(self, x, target, labels):
        opt, stateful = self.optimizer, self.state.size > 0
        if stateful:
            np.copyto(self._state_before, self.state)
        loss, h, prob = self._forward_backward(x, target, labels)
        steps = opt.iterations
        try:
            rec = opt.apply()
        finally:
            # a step refused for non-finite gradients (skipped or raised)
            # leaves the moving statistics as they were too
            if stateful and opt.iterations == steps:
                np.copyto(self.state, self._state_before)
        loss += rec.penalty
        if not self.metrics:
            return loss, None
        pred = prob if self._fused else h
        y_true = labels if labels is not None else target
        return loss, [m(y_true, pred, self._from_logits and not self._fused)
                      for m in self.metrics]

    @_locked
    def train_on_batch(self, x, y):
        """One forward, backward and optimizer step on one batch. Returns the
        loss (a float) or [loss, *metrics] when metrics were compiled."""
        self._require_compiled("train_on_batch")
        x, target, labels = self._check_xy(x, y, "train_on_batch", build=False)
        self._check_training_rows(x.shape[0])
        self._require_built("train_on_batch", x.shape[1])
        self._prepare(x.shape[0])
        loss, mets = self._train_step(x, target, labels)
        return float(loss) if mets is None else [float(loss), *mets]

    @_locked
    def compute_gradients(self, x, y):
        """Loss of one batch in training mode and the gradients of that loss
        (without regularization penalties), as copies in the order of
        ``weight_names``. Changes no weight, no moving statistic, no dropout
        counter and no optimizer state."""
        self._require_compiled("compute_gradients")
        x, target, labels = self._check_xy(x, y, "compute_gradients", build=False)
        self._check_training_rows(x.shape[0])
        self._require_built("compute_gradients", x.shape[1])
        self._prepare(x.shape[0])
        state = self.state.copy()
        counters = [(l, l.counter) for l in self.layers if hasattr(l, "counter")]
        try:
            loss, _, _ = self._forward_backward(x, target, labels)
        finally:   # training mode moved the moving statistics and dropout counters
            self.state[...] = state
            for l, c in counters:
                l.counter = c
        grads = []
        for name, off, shape, _, _ in self._tensors:
            grads.append(self.grads[off:off + int(np.prod(shape))].reshape(shape).copy())
        return float(loss), grads

    # -- fit --------------------------------------------------------------
    @_locked
    def fit(self, x, y, epochs=1, batch_size=32, validation_data=None, validation_split=0.0,
            shuffle=True, callbacks=None, verbose=1, initial_epoch=0):
        """Train for ``epochs`` passes over (x, y) in batches of ``batch_size``
        (the last one may be smaller), shuffled each epoch from the model's
        seed. ``validation_split`` holds out that fraction of the rows, taken
        from the end before shuffling, as Keras does. Returns a History whose
        ``history`` maps "loss", the metrics, their "val_" forms, and
        "grad_norm" (mean global gradient norm of the epoch's applied steps) and
        "clip_rate" (fraction of its steps where clipping fired) to per-epoch
        lists. verbose: 0 silent, 1 a progress bar, 2 one line per epoch.
        callbacks: a list of fastgrad.callbacks.Callback; each gets
        set_params({"verbose", "epochs", "steps"}) and set_model(model), then
        the Keras 3 hooks (on_train_batch_begin/end per batch). Every argument
        is checked before the model is built or anything changes."""
        self._require_compiled("fit")
        for name, v, lo in (("epochs", epochs, 0), ("batch_size", batch_size, 1),
                            ("initial_epoch", initial_epoch, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
        if verbose == "auto":
            verbose = 1
        if verbose not in (0, 1, 2):
            raise ValueError(f"verbose: expected 0, 1, 2 or 'auto', got {verbose!r}")
        if not (isinstance(validation_split, (int, float)) and 0 <= validation_split < 1):
            raise ValueError(f"validation_split: expected a fraction in [0, 1), got "
                             f"{validation_split!r}")
        if callbacks is None:
            callbacks = []
        elif isinstance(callbacks, callbacks_mod.Callback) or not all(
                isinstance(cb, callbacks_mod.Callback) for cb in callbacks):
            raise TypeError("callbacks: expected a list of fastgrad.callbacks.Callback "
                            f"objects, got {callbacks!r}")
        # every check comes before the model is built or anything moves
        x, target, labels = self._check_xy(x, y, "fit", build=False)
        if validation_split and validation_data is None:
            cut = int(x.shape[0] * (1 - validation_split))
            if cut < 1 or cut == x.shape[0]:
                raise ValueError(f"validation_split: {validation_split} of {x.shape[0]} rows "
                                 "leaves no rows for training or none for validation")
            vx = x[cut:]
            vt = target[cut:] if target is not None else None
            vl = labels[cut:] if labels is not None else None
            x = x[:cut]
            target = target[:cut] if target is not None else None
            labels = labels[:cut] if labels is not None else None
            validation_data = True
        elif validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data: expected a tuple (x_val, y_val)")
            vx, vt, vl = self._check_xy(*validation_data, "fit",
                                        names=("validation_data[0]", "validation_data[1]"),
                                        build=False, dim=x.shape[1])
        if x.shape[0] == 0:
            raise ValueError("x: expected at least one row")
        n = x.shape[0]
        bs = min(int(batch_size), max(n, 1))
        if any(l.kind == "BatchNormalization" for l in self.layers) and (bs == 1 or n % bs == 1):
            raise ValueError(f"batch_size: with {n} rows, batches of {bs} leave a batch of "
                             "1 row, and BatchNormalization needs at least 2 in training; "
                             "choose another batch_size")
        self._require_built("fit", x.shape[1])
        self._prepare(bs)
        ybuf = np.empty((bs,) + (target.shape[1:] if target is not None else ()),
                        target.dtype if target is not None else np.int64)
        xbuf = np.empty((bs, x.shape[1]), self.dtype)
        history = callbacks_mod.History()
        cbs = list(callbacks) + [history]   # last, so it sees every callback's logs
        params = {"verbose": verbose, "epochs": epochs, "steps": -(-n // bs)}
        for cb in cbs:
            cb.set_params(params)
            cb.set_model(self)
        batch_begin = callbacks_mod._batch_hooks(cbs, "begin")
        batch_end = callbacks_mod._batch_hooks(cbs, "end")
        self.stop_training = False
        for cb in cbs:
            cb.on_train_begin()
        for epoch in range(initial_epoch, epochs):
            for cb in cbs:
                cb.on_epoch_begin(epoch)
            t0 = time.perf_counter()
            order = self._rng.permutation(n) if shuffle else None
            sums = np.zeros(1 + len(self.metrics))
            gsum, clipped_steps, steps, finite_steps = 0.0, 0, 0, 0
            bar = _ProgressBar(epoch, epochs, n) if verbose == 1 else None
            for step, start in enumerate(range(0, n, bs)):
                stop = min(start + bs, n)
                b = stop - start
                if order is None:
                    xb = x[start:stop]
                    yb = (target if target is not None else labels)[start:stop]
                else:
                    idx = order[start:stop]
                    xb = np.take(x, idx, axis=0, out=xbuf[:b])
                    yb = np.take(target if target is not None else labels, idx, axis=0,
                                 out=ybuf[:b])
                for hook in batch_begin:
                    hook(step)
                loss, mets = self._train_step(xb, yb if labels is None else None,
                                              yb if labels is not None else None)
                sums[0] += loss * b
                if mets:
                    sums[1:] += np.asarray(mets) * b
                rec = self.optimizer.last_step
                steps += 1
                if not rec.nonfinite:   # skipped steps have no meaningful norm
                    gsum += rec.global_norm
                    finite_steps += 1
                clipped_steps += rec.clipped
                logs = {"loss": float(loss)}
                for hook in batch_end:
                    hook(step, logs)
                if bar is not None:
                    bar.update(stop, sums[0] / stop, self._metric_names,
                               sums[1:] / stop)
                if self.stop_training:
                    break
            seen = max(min(stop, n), 1) if n else 1
            logs = {"loss": float(sums[0] / seen)}
            for name, s in zip(self._metric_names, sums[1:]):
                logs[name] = float(s / seen)
            logs["grad_norm"] = gsum / finite_steps if finite_steps else math.nan
            logs["clip_rate"] = clipped_steps / max(steps, 1)
            if validation_data is not None:
                vals = self._evaluate(vx, vt, vl, bs)
                logs["val_loss"] = vals[0]
                for name, v in zip(self._metric_names, vals[1:]):
                    logs["val_" + name] = v
            if bar is not None:
                bar.close()
            if verbose:
                dt = time.perf_counter() - t0
                line = " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())
                print(f"Epoch {epoch + 1}/{epochs} - {dt:.2f}s - {n / max(dt, 1e-9):,.0f} "
                      f"samples/s - {line}", file=sys.stdout, flush=True)
            for cb in cbs:
                cb.on_epoch_end(epoch, logs)
            if self.stop_training:
                break
        for cb in cbs:
            cb.on_train_end()
        self.history = history
        return history

    # -- inference --------------------------------------------------------
    def _evaluate(self, x, target, labels, batch_size):
        n = x.shape[0]
        bs = min(batch_size, max(n, 1))
        self._prepare(bs)
        sums = np.zeros(1 + len(self.metrics))
        for start in range(0, n, bs):
            stop = min(start + bs, n)
            b = stop - start
            xb = x[start:stop]
            tb = target[start:stop] if target is not None else None
            lb = labels[start:stop] if labels is not None else None
            h = self._forward(xb, False, self._fused)
            prob = self._prob[:b] if self._fused else None
            loss = _core.loss_forward_backward(h, tb, lb, None, None, prob, self._loss_code,
                                               self._from_logits, self.loss.delta)
            sums[0] += loss * b
            pred = prob if self._fused else h
            y_true = lb if lb is not None else tb
            for k, m in enumerate(self.metrics):
                sums[1 + k] += b * m(y_true, pred, self._from_logits and not self._fused)
        out = sums / max(n, 1)
        out[0] += self._penalty()
        return [float(v) for v in out]

    def _penalty(self):
        total = 0.0
        for layer, s in self._specs:
            if s.trainable and s.regularizer is not None:
                total += s.regularizer(layer.weights[s.name])
        return total

    @_locked
    def evaluate(self, x, y, batch_size=32, verbose=1):
        """Loss (with regularization penalties) and metrics in inference mode,
        averaged over all rows. Returns a float or [loss, *metrics]."""
        self._require_compiled("evaluate")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        x, target, labels = self._check_xy(x, y, "evaluate")
        vals = self._evaluate(x, target, labels, int(batch_size))
        if verbose:
            print(" - ".join(f"{k}: {v:.4f}" for k, v in
                             zip(["loss"] + self._metric_names, vals)))
        return vals[0] if not self.metrics else vals

    @_locked
    def predict(self, x, batch_size=None, verbose=0):
        """Outputs for x in inference mode, in batches of ``batch_size``
        (default 32); an array of the model's dtype, shape (rows, outputs)."""
        if batch_size is None:
            batch_size = 32
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        x = self._check_x(x)
        if not self.built:
            self.build(x.shape[1])
        n = x.shape[0]
        out = np.empty((n, self.output_dim), self.dtype)
        bs = min(int(batch_size), max(n, 1))
        self._prepare(bs)
        for start in range(0, n, bs):
            stop = min(start + bs, n)
            out[start:stop] = self._forward(x[start:stop], False, False)
        return out

    @_locked
    def save(self, path):
        """Write the model to one file, atomically. A name ending in
        ``.keras`` gets a Keras 3 archive (fastgrad.keras_format: needs h5py);
        ``.h5``/``.hdf5`` are refused (weights only: use save_weights); any
        other name (``.fgm`` by convention) gets fastgrad's own format:
        architecture, weights, optimizer configuration and state, and
        random-generator state, for an exact resume (fastgrad.saving)."""
        from fastgrad import keras_format

        if keras_format.save_kind(path) == "keras":
            keras_format.save_model(self, path)
        else:
            _save(self, path)

    @_locked
    def save_weights(self, filepath, overwrite=True):
        """Write the weights (and optimizer state) to a Keras
        ``.weights.h5`` file (needs h5py)."""
        from fastgrad import keras_format

        keras_format.save_weights(self, filepath)

    @_locked
    def load_weights(self, filepath):
        """Read weights written by ``save_weights`` here or in Keras."""
        from fastgrad import keras_format

        keras_format.load_weights(self, filepath)

    @_locked
    def export(self, filepath, format="onnx", verbose=None):
        """Export for inference; format "onnx" (fastgrad.export)."""
        from fastgrad import export

        export.export(self, filepath, format=format)

    def __reduce__(self):
        # pickle, copy and joblib go through the validated file format
        from fastgrad import pickling

        with self._lock:
            return pickling.reduce(self)

    # -- weights ----------------------------------------------------------
    @_locked
    def get_weights(self):
        """Copies of every weight, layer by layer (Dense: kernel, bias)."""
        self._require_built("get_weights")
        return [layer.weights[s.name].copy() for layer, s in self._specs]

    @_locked
    def set_weights(self, weights):
        """Set every weight from a list like get_weights() returns; the whole
        list is checked before anything changes."""
        self._require_built("set_weights")
        weights = list(weights)
        if len(weights) != len(self._specs):
            raise ValueError(f"weights: expected {len(self._specs)} arrays, got {len(weights)}")
        arrays = []
        for (layer, s), w in zip(self._specs, weights):
            w = np.asarray(w)
            if w.dtype.kind not in "biuf":
                raise TypeError(f"weights: {layer.name}/{s.name} must be numbers, got dtype {w.dtype}")
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


def _save(model, path):
    from fastgrad import saving

    if not model.built:
        raise ValueError("model: it has no weights yet; build it (fit, predict, or give "
                         "the first layer input_dim) before saving")
    saving.write_file(path, *_describe(model))


def _describe(model):
    """(header, arrays) of fastgrad's format for model; an unbuilt model
    (for pickling) has input_dim None and no arrays."""
    from fastgrad import __version__

    header = {
        "format": "fastgrad.model", "fastgrad_version": __version__,
        "model": {"class_name": "Sequential", "config": {
            "name": model.name, "dtype": model.dtype.name, "seed": model.seed,
            "input_dim": model.input_dim if model.built else None,
            "layers": [{"class_name": l.kind, "config": l.get_config()} for l in model.layers]}},
        "rng": model._rng.bit_generator.state,
        "layers_random": {l.name: {"seed": l._seed, "counter": l.counter}
                          for l in model.layers if hasattr(l, "counter")},
        "compile": None,
    }
    arrays = [(f"weights/{l.name}/{s.name}", l.weights[s.name])
              for l, s in getattr(model, "_specs", ())]
    opt = model.optimizer
    if opt is not None:
        header["compile"] = {
            "optimizer": {"class_name": type(opt).__name__, "config": opt.get_config()},
            "loss": {"class_name": type(model.loss).__name__, "config": model.loss.get_config()},
            # names as given (accuracy resolves from the loss); objects
            # with their configuration
            "metrics": [name if isinstance(spec, str) else metrics_mod.serialize(m)
                        for spec, name, m in zip(model._metric_specs, model._metric_names,
                                                 model.metrics)],
            "iterations": opt.iterations, "skipped_steps": opt.skipped_steps,
        }
        if model.built:
            arrays += [(f"optimizer/{k}", v) for k, v in sorted(opt.variables().items())]
    return header, arrays


def load_model(path):
    """Read a model written by ``model.save(path)``: architecture, weights,
    optimizer and its state, and the random generators' state, so that
    ``fit`` continues exactly where the saved model stopped. A Keras 3
    ``.keras`` archive (recognized by its content) is read by
    fastgrad.keras_format. Raises ``fastgrad.saving.ModelFileError`` (a
    ValueError) for any file that is not a valid model file."""
    from fastgrad import keras_format, saving

    kind = keras_format.sniff(path)
    if kind == "keras":
        return keras_format.load_model(path)
    if kind == "hdf5":
        raise saving.ModelFileError(f"{path}: an HDF5 file holds weights only; build the "
                                    "model and call model.load_weights(path)")
    return _load(saving.read_file(path), path)


def _load(header_arrays, path, unbuilt=False):
    """The model of a fastgrad file's (header, arrays), already read;
    unbuilt: a model without weights (input_dim None) is allowed (pickles)."""
    from fastgrad import layers as layers_mod, saving, schedules

    header, arrays = header_arrays
    try:
        return _from_header(header, arrays, layers_mod, schedules, unbuilt)
    except saving.ModelFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
        raise saving.ModelFileError(f"{path}: invalid model description ({type(e).__name__}: "
                                    f"{e})") from None


def _from_header(header, arrays, layers_mod, schedules, unbuilt=False):
    from fastgrad.saving import ModelFileError

    if header.get("format") != "fastgrad.model":
        raise ModelFileError("not a fastgrad model description")
    spec = header["model"]
    if spec["class_name"] != "Sequential":
        raise ModelFileError(f"unknown model type {spec['class_name']!r}")
    cfg = spec["config"]
    if not isinstance(cfg["name"], str):
        raise ModelFileError("the model name is not a string")
    layers = []
    for entry in cfg["layers"]:
        cls = layers_mod.LAYERS.get(entry["class_name"])
        if cls is None:
            raise ModelFileError(f"unknown layer type {entry['class_name']!r}")
        layers.append(cls(**entry["config"]))
    model = Sequential(layers, dtype=cfg["dtype"], seed=cfg["seed"], name=cfg["name"])

    def check(specs):
        for layer, s in specs:
            key = f"weights/{layer.name}/{s.name}"
            if key not in arrays:
                raise ModelFileError(f"the weight {key} is missing")
            a = arrays[key]
            if a.shape != s.shape or a.dtype != model.dtype:
                raise ModelFileError(f"the weight {key} has shape {a.shape} and dtype "
                                     f"{a.dtype}; the architecture needs {s.shape} "
                                     f"{model.dtype}")

    if cfg["input_dim"] is not None or not unbuilt:   # else an unbuilt model, pickled
        model.build(cfg["input_dim"], _check=check)
    for layer, s in getattr(model, "_specs", ()):
        layer.weights[s.name][...] = arrays.pop(f"weights/{layer.name}/{s.name}")
    comp = header.get("compile")
    if comp is not None:
        oc = dict(comp["optimizer"]["config"])
        if isinstance(oc.get("learning_rate"), dict):
            oc["learning_rate"] = schedules.deserialize(oc["learning_rate"])
        ocls = {c.__name__: c for c in optimizers._CLASSES.values()}.get(
            comp["optimizer"]["class_name"])
        lcls = {c.__name__: c for c in losses._CLASSES.values()}.get(comp["loss"]["class_name"])
        if ocls is None or lcls is None:
            raise ModelFileError("unknown optimizer or loss type")
        # files from before metric objects were saved hold names only
        mets = [m if isinstance(m, str) else metrics_mod.deserialize(m)
                for m in comp["metrics"]]
        model.compile(ocls(**oc), lcls(**comp["loss"]["config"]), mets)
        opt = model.optimizer
        for k, buf in opt.variables().items() if model.built else ():
            a = arrays.pop(f"optimizer/{k}", None)
            if a is None or a.shape != buf.shape or a.dtype != buf.dtype:
                raise ModelFileError(f"the optimizer state optimizer/{k} is missing or has "
                                     "the wrong shape or dtype")
            buf[...] = a
        it, sk = comp["iterations"], comp["skipped_steps"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62
                   for v in (it, sk)):
            raise ModelFileError("invalid optimizer step counts")
        opt.iterations, opt.skipped_steps = it, sk
    if arrays:
        raise ModelFileError(f"unexpected arrays in the file: {', '.join(sorted(arrays))}")
    state = header["rng"]
    if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
        raise ModelFileError("invalid random-generator state")
    model._rng.bit_generator.state = state
    for layer in model.layers:
        if hasattr(layer, "counter"):
            r = header["layers_random"][layer.name]
            # an unbuilt model's layer has not drawn its seed yet
            keys = ("seed", "counter") if model.built or r["seed"] is not None else ("counter",)
            if not all(isinstance(r[k], int) and 0 <= r[k] < 2**64 for k in keys):
                raise ModelFileError(f"invalid random state for layer {layer.name}")
            layer._seed, layer.counter = r["seed"], r["counter"]
    return model
