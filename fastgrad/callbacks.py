"""Callbacks: hooks called by ``Model.fit`` (Keras names)."""
import math
import sys
import time
import warnings
import weakref

import numpy as np

from fastgrad._utils import Hyper, check_int, check_real
from fastgrad.schedules import LearningRateSchedule


class Callback:
    """Base class for the hooks ``Model.fit`` calls (Keras 3 names).

    Before training, fit calls ``set_params`` with ``{"verbose", "epochs",
    "steps"}`` (steps: batches per epoch), kept as ``self.params``, and
    ``set_model``, kept as ``self.model``. Hooks receive ``logs`` dicts of
    the current loss and metrics: per epoch, their means over the epoch's
    rows (and the "val_" forms); per batch, the batch's own values and its
    rows as "size".

    Per batch, fit calls ``on_train_batch_begin`` / ``on_train_batch_end``;
    by default these call ``on_batch_begin`` / ``on_batch_end``, so a
    subclass may override either name. A callback that overrides neither
    costs nothing per batch."""

    def __init__(self):
        self.model = None
        self.params = None

    def set_params(self, params):
        self.params = params

    def set_model(self, model):
        self.model = model

    def on_train_begin(self, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass

    def on_epoch_begin(self, epoch, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_batch_begin(self, batch, logs=None):
        pass

    def on_batch_end(self, batch, logs=None):
        pass

    def on_train_batch_begin(self, batch, logs=None):
        self.on_batch_begin(batch, logs=logs)

    def on_train_batch_end(self, batch, logs=None):
        self.on_batch_end(batch, logs=logs)


def _batch_hooks(callbacks, when):
    """The bound on_train_batch_<when> of the callbacks that override it or
    on_batch_<when>: the others would only run the base class's no-ops."""
    names = (f"on_train_batch_{when}", f"on_batch_{when}")
    return [getattr(cb, names[0]) for cb in callbacks
            if any(getattr(type(cb), n) is not getattr(Callback, n)
                   or n in getattr(cb, "__dict__", ()) for n in names)]


class CallbackList:
    """Calls each hook on every callback, in order (Keras 3's name), after
    handing each the params and the model. Batch hooks go only to the
    callbacks that override them."""

    def __init__(self, callbacks, model=None, params=None):
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if params is not None:
                cb.set_params(params)
            if model is not None:
                cb.set_model(model)
        self._batch_begin = _batch_hooks(self.callbacks, "begin")
        self._batch_end = _batch_hooks(self.callbacks, "end")

    def on_train_begin(self):
        for cb in self.callbacks:
            cb.on_train_begin()

    def on_train_end(self):
        for cb in self.callbacks:
            cb.on_train_end()

    def on_epoch_begin(self, epoch):
        for cb in self.callbacks:
            cb.on_epoch_begin(epoch)

    def on_epoch_end(self, epoch, logs):
        for cb in self.callbacks:
            cb.on_epoch_end(epoch, logs)

    def on_train_batch_begin(self, batch):
        for hook in self._batch_begin:
            hook(batch)

    def on_train_batch_end(self, batch, logs):
        for hook in self._batch_end:
            hook(batch, logs)


class _Bar:
    """The live bar of ``ProgbarLogger``: tqdm when it is installed,
    otherwise one carriage-returned line on a terminal (nothing elsewhere)."""

    def __init__(self, desc, steps):
        self.t0, self.desc, self.steps = time.perf_counter(), desc, steps
        self._last = self._shown = 0
        try:
            from tqdm import tqdm
        except ImportError:
            self.tqdm = None
        else:
            self.tqdm = tqdm(total=steps, desc=desc, unit="step", leave=False,
                             file=sys.stdout, mininterval=0.2)
        self.live = self.tqdm is not None or sys.stdout.isatty()

    def update(self, step, rows, values):
        post = {k: f"{v:.4f}" for k, v in values.items()}
        if self.tqdm is not None:
            self.tqdm.update(step - self._last)
            self.tqdm.set_postfix(post, refresh=False)
        elif self.live:
            now = time.perf_counter()
            if step < self.steps and now - self._shown < 0.2:
                self._last = step
                return
            self._shown = now
            rate = rows / max(now - self.t0, 1e-9)
            fill = 20 * step // max(self.steps, 1)
            stats = " - ".join(f"{k}: {v}" for k, v in post.items())
            print(f"\r{self.desc} [{'=' * fill}{'.' * (20 - fill)}] {step}/{self.steps} - "
                  f"{rate:,.0f} samples/s - {stats}", end="", file=sys.stdout, flush=True)
        self._last = step

    def close(self):
        if self.tqdm is not None:
            self.tqdm.close()
        elif self.live:
            print("\r\033[K", end="", file=sys.stdout)   # clear the bar's line


class ProgbarLogger(Callback):
    """Prints fit's progress (Keras 3's name); fit adds one when verbose and
    its callbacks hold none. With ``params["verbose"]`` 1, a live bar per
    epoch (tqdm when installed, else a carriage-returned line on a
    terminal): steps done, rows per second, and the loss and metrics
    averaged over the epoch's rows so far. With 1 or 2, one line as each
    epoch ends, its time and rows per second (validation included) and
    every log:

        Epoch 3/5 - 0.41s - 12,195 samples/s - loss: 0.1234 - accuracy: 0.9500

    Rows come from the "size" of each batch's logs."""

    def on_epoch_begin(self, epoch, logs=None):
        self._t0, self._rows, self._sums = time.perf_counter(), 0, {}
        self._bar = None
        if self.params["verbose"] == 1:
            self._bar = _Bar(f"Epoch {epoch + 1}/{self.params['epochs']}", self.params["steps"])

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        size = logs.get("size", 1)
        self._rows += size
        if self._bar is None:
            return
        for k, v in logs.items():
            if k != "size":
                self._sums[k] = self._sums.get(k, 0.0) + v * size
        self._bar.update(batch + 1, self._rows, {k: s / self._rows for k, s in self._sums.items()})

    def on_epoch_end(self, epoch, logs=None):
        if self._bar is not None:
            self._bar.close()
        if not self.params["verbose"]:
            return
        dt = time.perf_counter() - self._t0
        line = " - ".join(f"{k}: {v:.4f}" for k, v in (logs or {}).items())
        print(f"Epoch {epoch + 1}/{self.params['epochs']} - {dt:.2f}s - "
              f"{self._rows / max(dt, 1e-9):,.0f} samples/s - {line}", file=sys.stdout, flush=True)


class History(Callback):
    """Records each epoch's logs: ``history.history["loss"]`` is a list."""

    def __init__(self):
        super().__init__()
        self.history, self.epoch = {}, []

    def on_train_begin(self, logs=None):
        self.epoch = []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(v)


def _magnitude(name, value):
    return abs(check_real(name, value))


def _mode_op(mode, monitor):
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode: expected 'auto', 'min' or 'max', got {mode!r}")
    if mode == "auto":
        mode = "max" if ("acc" in monitor or monitor.endswith("auc")) else "min"
    return mode


class EarlyStopping(Callback):
    """Stop training when ``monitor`` has not improved by more than
    ``min_delta`` for ``patience`` epochs (Keras 3 rules: with a
    ``baseline``, patience restarts only on epochs that beat it). With
    ``restore_best_weights`` the weights of the best epoch are put back when
    it stops. Defaults: monitor="val_loss", min_delta=0, patience=0,
    mode="auto" (max for accuracy-like names, else min). An epoch whose logs
    lack ``monitor`` (val_loss without validation data) gives a warning
    naming the logged metrics and does not count."""

    min_delta, baseline = Hyper(_magnitude), Hyper(check_real, none=True)
    patience, start_from_epoch = Hyper(check_int, low=0), Hyper(check_int, low=0)

    def __init__(self, monitor="val_loss", min_delta=0.0, patience=0, verbose=0,
                 mode="auto", baseline=None, restore_best_weights=False, start_from_epoch=0):
        super().__init__()
        self.monitor, self.patience, self.verbose = monitor, patience, verbose
        self.mode = _mode_op(mode, monitor)
        self.min_delta = min_delta
        self.baseline, self.restore_best_weights = baseline, restore_best_weights
        self.start_from_epoch = start_from_epoch

    def _better(self, current, best):
        if best is None:
            return True
        if self.mode == "min":
            return current < best - self.min_delta
        return current > best + self.min_delta

    def on_train_begin(self, logs=None):
        self.wait, self.stopped_epoch = 0, 0
        self.best, self.best_weights, self.best_epoch = None, None, 0

    def on_epoch_end(self, epoch, logs=None):
        current = (logs or {}).get(self.monitor)
        if current is None:
            # as Keras 3: warn and keep training (e.g. val_loss without
            # validation data)
            warnings.warn(f"EarlyStopping: the monitored metric {self.monitor!r} is not "
                          f"available; the logged metrics are {', '.join(logs or {})}",
                          stacklevel=2)
            return
        if epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = self.model.get_weights()
        self.wait += 1
        if self._better(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            # as Keras 3: patience restarts only once the baseline is beaten
            if self.baseline is None or self._better(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            if self.restore_best_weights and self.best_weights is not None:
                self.model.set_weights(self.best_weights)
            if self.verbose:
                print(f"Epoch {epoch + 1}: early stopping (best {self.monitor} "
                      f"{self.best:.4f} at epoch {self.best_epoch + 1})")


class TerminateOnNaN(Callback):
    """Stop training as soon as a batch's loss is NaN or infinite."""

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            print(f"Batch {batch}: invalid loss {loss}, terminating training")
            self.model.stop_training = True


class LearningRateScheduler(Callback):
    """Set the optimizer's learning rate at the start of each epoch to
    ``schedule(epoch, lr)`` (or ``schedule(epoch)``). As in Keras, an
    optimizer whose learning_rate is a schedule object is refused with a
    TypeError when training begins, before any step."""

    def __init__(self, schedule, verbose=0):
        super().__init__()
        if not callable(schedule):
            raise TypeError(f"schedule: expected a function, got {schedule!r}")
        self.schedule, self.verbose = schedule, verbose

    def on_train_begin(self, logs=None):
        lr = self.model.optimizer._learning_rate   # the schedule, if any
        if isinstance(lr, LearningRateSchedule):
            raise TypeError(f"learning_rate: the optimizer was created with a schedule "
                            f"({type(lr).__name__}), which LearningRateScheduler would "
                            "replace; give the optimizer a float learning_rate, or drop "
                            "the LearningRateScheduler")

    def on_epoch_begin(self, epoch, logs=None):
        opt = self.model.optimizer
        current = opt.current_learning_rate()
        try:
            lr = self.schedule(epoch, current)
        except TypeError:
            lr = self.schedule(epoch)
        lr = check_real("schedule", lr, low=0.0)   # its return value
        opt.learning_rate = lr
        if self.verbose:
            print(f"Epoch {epoch + 1}: learning rate {lr:.6g}")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = self.model.optimizer.current_learning_rate()


class ModelCheckpoint(Callback):
    """Save the model (``model.save``) after each epoch to ``filepath``,
    which may hold ``{epoch}`` and logged names (``{val_loss:.3f}``). With
    ``save_best_only`` only when ``monitor`` improved; an epoch whose logs
    lack ``monitor`` gives a warning and saves nothing, as in Keras 3."""

    def __init__(self, filepath, monitor="val_loss", verbose=0, save_best_only=False,
                 mode="auto"):
        super().__init__()
        self.filepath, self.monitor, self.verbose = str(filepath), monitor, verbose
        self.save_best_only = save_best_only
        self.mode = _mode_op(mode, monitor)
        self.best = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        path = self.filepath.format(epoch=epoch + 1, **logs)
        if self.save_best_only:
            current = logs.get(self.monitor)
            if current is None:   # as Keras 3: warn, and save nothing this epoch
                warnings.warn(f"ModelCheckpoint: can save the best model only with "
                              f"{self.monitor!r} available, skipping; the logged metrics are "
                              f"{', '.join(logs)}", stacklevel=2)
                return
            improved = self.best is None or (current < self.best if self.mode == "min"
                                             else current > self.best)
            if not improved:
                return
            self.best = current
        self.model.save(path)
        if self.verbose:
            print(f"Epoch {epoch + 1}: saved model to {path}")


class GradientMonitor(Callback):
    """Records gradient health during ``fit`` from each optimizer step's own
    record (no extra pass over the gradients), every ``every`` steps:

    grad_norms     (steps, tensors) L2 norm of each raw gradient (before
                   clipping), columns in ``names`` order (get_weights order of
                   the trainable tensors)
    global_norms   (steps,) their joint norm
    clip_scales    (steps, tensors) factor clipping applied (1 = none)
    clipped        (steps,) whether clipping fired
    update_ratios  (steps, tensors) ||w_new - w_old|| / ||w_new||, w_new the
                   optimizer's result before any weight constraint
    nonfinite      (steps,) whether the step's gradients were not finite
                   (the step was then skipped)
    steps          (steps,) the optimizer step numbers recorded

    Gradient norms and clip scales are free; the update ratios add two sums
    of squares over the parameters to the steps recorded (a few percent of a
    step at small batches), and nothing to the steps in between.
    """

    every = Hyper(check_int, low=1)

    def __init__(self, every=1):
        super().__init__()
        self.every = every
        self.names = []
        self._n = 0          # rows recorded
        self._buf = None     # per record kind, an array with room for more rows
        self._seen = 0

    def on_train_begin(self, logs=None):
        names = list(self.model.weight_names)
        if self._n and len(names) != len(self.names):
            raise ValueError(f"model: the monitor holds records of {len(self.names)} tensors, "
                             f"this model has {len(names)}; use a new GradientMonitor")
        self.names = names
        self._want_updates(True)

    def on_train_end(self, logs=None):
        self._want_updates(None)

    # per optimizer, what each of its monitors wants for the coming step:
    # the optimizer tracks update ratios while any of them wants them
    _wishes = weakref.WeakKeyDictionary()

    def _want_updates(self, enabled):
        """Record this monitor's wish (None withdraws it) and set the
        optimizer's ``track_updates`` to the union of the wishes."""
        opt = self.model.optimizer
        wishes = GradientMonitor._wishes.setdefault(opt, {})
        if enabled is None:
            wishes.pop(id(self), None)
        else:
            wishes[id(self)] = bool(enabled)
        opt.track_updates(any(wishes.values()))

    # record kind -> (one value per tensor?, dtype)
    _KINDS = {"grad_norms": (True, float), "clip_scales": (True, float),
              "update_ratios": (True, float), "global_norms": (False, float),
              "clipped": (False, bool), "nonfinite": (False, bool), "steps": (False, np.int64)}

    def _alloc(self, rows):
        width = len(self.names)
        return {k: np.empty((rows, width) if wide else (rows,), dtype)
                for k, (wide, dtype) in self._KINDS.items()}

    def _room(self):
        # rows are written into arrays that double when full: a step
        # allocates nothing
        cap = 0 if self._buf is None else len(self._buf["steps"])
        if self._n < cap:
            return
        buf = self._alloc(max(64, 2 * cap))
        if self._buf is not None:
            for k, old in self._buf.items():
                buf[k][:self._n] = old[:self._n]
        self._buf = buf

    def on_batch_begin(self, batch, logs=None):
        # the update ratios cost two sums over the parameters in the step:
        # only for the steps that will be recorded
        if self.every > 1:
            self._want_updates(self._seen % self.every == 0)

    def on_batch_end(self, batch, logs=None):
        self._seen += 1
        if (self._seen - 1) % self.every:
            return
        rec = self.model.optimizer.last_step
        self._room()
        b, n = self._buf, self._n
        b["grad_norms"][n] = rec.grad_norms
        b["global_norms"][n] = rec.global_norm
        b["clip_scales"][n] = rec.clip_scale
        b["clipped"][n] = rec.clipped
        b["nonfinite"][n] = rec.nonfinite
        b["steps"][n] = rec.step
        ratio = rec.update_ratio
        b["update_ratios"][n] = ratio if ratio is not None and not rec.nonfinite else np.nan
        self._n = n + 1

    def _array(self, key):
        buf = self._alloc(0) if self._buf is None else self._buf
        return buf[key][:self._n].copy()

    grad_norms = property(lambda self: self._array("grad_norms"))
    clip_scales = property(lambda self: self._array("clip_scales"))
    update_ratios = property(lambda self: self._array("update_ratios"))
    global_norms = property(lambda self: self._array("global_norms"))
    clipped = property(lambda self: self._array("clipped"))
    nonfinite = property(lambda self: self._array("nonfinite"))
    steps = property(lambda self: self._array("steps"))

    def plot(self, path, kernels_only=True):
        """Draw each layer's gradient norm over the steps on a log scale and
        save the figure to ``path``. Needs matplotlib (pip install
        "fastgrad[plot]")."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("GradientMonitor.plot needs matplotlib: "
                              'pip install "fastgrad[plot]" (or pip install matplotlib)') from None
        g = self.grad_norms
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for j, name in enumerate(self.names):
            if kernels_only and not name.endswith(("kernel", "gamma")):
                continue
            ax.plot(self.steps, g[:, j], label=name, lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("gradient L2 norm")
        ax.set_title("Gradient norm per layer")
        if len(self.names) <= 24:
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
