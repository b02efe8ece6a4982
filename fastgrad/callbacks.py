"""Callbacks: hooks called by ``fit``, ``evaluate`` and ``predict`` (Keras names)."""
import csv
import json
import math
import os
import shutil
import sys
import time
import warnings
import weakref

import numpy as np

from fastgrad._utils import Hyper, check_int, check_real
from fastgrad.schedules import LearningRateSchedule


class Callback:
    """Base class for the hooks ``fit``, ``evaluate`` and ``predict`` call
    (Keras 3 names and order).

    Before running, they call ``set_params`` with ``{"verbose", "epochs",
    "steps"}`` (steps: batches per epoch), kept as ``self.params``, and
    ``set_model``, kept as ``self.model``. Hooks receive ``logs`` dicts as
    Keras 3 gives them: per batch, the loss's running mean and the metrics
    over the epoch (or evaluation) so far; per epoch, their values over the
    epoch and the "val_" forms; ``on_train_end`` the last epoch's logs,
    ``on_test_end`` the evaluation's; ``on_predict_batch_end``
    ``{"outputs": the batch's outputs}``.

    fit calls on_train_begin, then per epoch on_epoch_begin, per batch
    on_train_batch_begin / on_train_batch_end (by default these call
    on_batch_begin / on_batch_end, so a subclass may override either name),
    with validation data on_test_begin, on_test_batch_begin/end and
    on_test_end, then on_epoch_end; and on_train_end. evaluate calls the
    on_test_* hooks, predict the on_predict_* ones. A callback that
    overrides no batch hook costs nothing per batch."""

    def __init__(self):
        self.model = None
        self.params = None

    def set_params(self, params):
        self.params = params

    def set_model(self, model):
        self.model = model

    def on_batch_begin(self, batch, logs=None):
        pass

    def on_batch_end(self, batch, logs=None):
        pass

    def on_train_batch_begin(self, batch, logs=None):
        self.on_batch_begin(batch, logs=logs)

    def on_train_batch_end(self, batch, logs=None):
        self.on_batch_end(batch, logs=logs)


def _no_op(self, *args, logs=None):
    pass


for _name in ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
              "on_test_begin", "on_test_end", "on_predict_begin", "on_predict_end",
              "on_test_batch_begin", "on_test_batch_end", "on_predict_batch_begin",
              "on_predict_batch_end"):
    setattr(Callback, _name, _no_op)


def _overrides(cb, mode, when):
    """Whether cb has its own on_<mode>_batch_<when> (or, for training, its
    own on_batch_<when>)."""
    names = [f"on_{mode}_batch_{when}"] + ([f"on_batch_{when}"] if mode == "train" else [])
    return any(getattr(type(cb), n) is not getattr(Callback, n)
               or n in getattr(cb, "__dict__", ()) for n in names)


class CallbackList:
    """Calls each hook on every callback, in order (Keras 3's class and
    arguments): ``CallbackList(callbacks=None, add_history=False,
    add_progbar=False, model=None, **params)``. add_history / add_progbar
    append a History / ProgbarLogger unless the list holds one (``history``
    is the History used); each callback gets ``set_params(params)`` when
    params are given and ``set_model(model)``. Batch hooks go only to the
    callbacks that override them."""

    def __init__(self, callbacks=None, add_history=False, add_progbar=False, model=None,
                 **params):
        self.callbacks = list(callbacks or [])
        self.history = next((cb for cb in self.callbacks if isinstance(cb, History)), None)
        if self.history is None and add_history:
            self.history = History()
            self.callbacks.append(self.history)
        if add_progbar and not any(isinstance(cb, ProgbarLogger) for cb in self.callbacks):
            self.callbacks.append(ProgbarLogger())
        self.model, self.params = model, params
        for cb in self.callbacks:
            if params:
                cb.set_params(params)
            if model is not None:
                cb.set_model(model)
        self._batch = {(mode, when): [getattr(cb, f"on_{mode}_batch_{when}")
                                      for cb in self.callbacks if _overrides(cb, mode, when)]
                       for mode in ("train", "test", "predict") for when in ("begin", "end")}

    def append(self, callback):
        self.callbacks.append(callback)
        for (mode, when), hooks in self._batch.items():
            if _overrides(callback, mode, when):
                hooks.append(getattr(callback, f"on_{mode}_batch_{when}"))

    def set_params(self, params):
        self.params = params
        for cb in self.callbacks:
            cb.set_params(params)

    def set_model(self, model):
        self.model = model
        for cb in self.callbacks:
            cb.set_model(model)

    def has_batch_hooks(self, mode, when):
        """Whether some callback takes on_<mode>_batch_<when>: without one,
        the caller need not make the batch's logs."""
        return bool(self._batch[mode, when])

    def _call(self, hook, *args):
        # as Keras: the callbacks share one copy of the logs, so that what one
        # adds (learning_rate) reaches those after it, not the caller's dict
        *args, logs = args
        logs = None if logs is None else dict(logs)
        for cb in self.callbacks:
            getattr(cb, hook)(*args, logs)

    def on_train_begin(self, logs=None):
        self._call("on_train_begin", logs)

    def on_train_end(self, logs=None):
        self._call("on_train_end", logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._call("on_epoch_begin", epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._call("on_epoch_end", epoch, logs)

    def on_test_begin(self, logs=None):
        self._call("on_test_begin", logs)

    def on_test_end(self, logs=None):
        self._call("on_test_end", logs)

    def on_predict_begin(self, logs=None):
        self._call("on_predict_begin", logs)

    def on_predict_end(self, logs=None):
        self._call("on_predict_end", logs)

    def _batch_hook(mode, when):
        def hook(self, batch, logs=None):
            for h in self._batch[mode, when]:
                h(batch, logs)
        hook.__name__ = f"on_{mode}_batch_{when}"
        return hook

    (on_train_batch_begin, on_train_batch_end, on_test_batch_begin, on_test_batch_end,
     on_predict_batch_begin, on_predict_batch_end) = map(
        _batch_hook, ("train", "train", "test", "test", "predict", "predict"), ("begin", "end") * 3)
    del _batch_hook


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

    def update(self, step, values):
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
            per_step = (now - self.t0) / max(step, 1)
            fill = 20 * step // max(self.steps, 1)
            stats = " - ".join(f"{k}: {v}" for k, v in post.items())
            print(f"\r{self.desc} [{'=' * fill}{'.' * (20 - fill)}] {step}/{self.steps} - "
                  f"{_per_step(per_step)} - {stats}", end="", file=sys.stdout, flush=True)
        self._last = step

    def close(self):
        if self.tqdm is not None:
            self.tqdm.close()
        elif self.live:
            print("\r\033[K", end="", file=sys.stdout)   # clear the bar's line


def _per_step(seconds):
    return f"{seconds * 1e3:.0f}ms/step" if seconds >= 1e-3 else f"{seconds * 1e6:.0f}us/step"


def _line(logs):
    return " - ".join(f"{k}: {v:.4f}" for k, v in logs.items() if isinstance(v, (int, float)))


class ProgbarLogger(Callback):
    """Prints progress (Keras 3's name, no arguments); fit and evaluate add
    one when verbose and their callbacks hold none. With ``params["verbose"]``
    1, a live bar per epoch (tqdm when installed, else a carriage-returned
    line on a terminal): steps done, time per step, and the batch logs
    (running means). With 1 or 2, one line as each epoch ends, its time, time
    per step and every log, then fastgrad's gradient statistics:

        Epoch 3/5 - 0.41s - 2ms/step - loss: 0.1234 - accuracy: 0.9500 - grad_norm: 0.8121 -
        clip_rate: 0.0000   (on one line)

    evaluate prints its results on one line; predict prints nothing."""

    def __init__(self):
        super().__init__()
        self._in_fit = False
        self._bar = None

    def _verbose(self):
        return (self.params or {}).get("verbose", 1)

    def on_train_begin(self, logs=None):
        self._in_fit = True

    def on_train_end(self, logs=None):
        self._in_fit = False

    def on_epoch_begin(self, epoch, logs=None):
        self._t0, self._steps = time.perf_counter(), 0
        self._bar = None
        if self._verbose() == 1:
            self._bar = _Bar(f"Epoch {epoch + 1}/{self.params['epochs']}", self.params["steps"])

    def on_train_batch_end(self, batch, logs=None):
        self._steps = batch + 1
        if self._bar is not None:
            self._bar.update(batch + 1, logs or {})

    def on_epoch_end(self, epoch, logs=None):
        if self._bar is not None:
            self._bar.close()
        if not self._verbose():
            return
        dt = time.perf_counter() - self._t0
        line = _line(logs or {})
        grads = getattr(self.model, "_epoch_gradients", None)
        if grads:
            line += " - " + _line(grads)
        print(f"Epoch {epoch + 1}/{self.params['epochs']} - {dt:.2f}s - "
              f"{_per_step(dt / max(self._steps, 1))} - {line}", file=sys.stdout, flush=True)

    def on_test_end(self, logs=None):
        if not self._in_fit and self._verbose():
            print(_line(logs or {}), file=sys.stdout, flush=True)


class History(Callback):
    """Records each epoch's logs: ``history.history["loss"]`` is a list, with
    exactly the keys of Keras 3's logs. ``history.gradients`` holds fastgrad's
    gradient statistics per epoch, "grad_norm" (mean global norm of the
    raw gradients over the epoch's applied steps) and "clip_rate" (share of
    its steps where clipping fired), aligned with ``history.epoch``."""

    def __init__(self):
        super().__init__()
        self.history, self.epoch, self.gradients = {}, [], {}

    def on_train_begin(self, logs=None):
        self.epoch = []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(v)
        for k, v in (getattr(self.model, "_epoch_gradients", None) or {}).items():
            self.gradients.setdefault(k, []).append(v)


def _magnitude(name, value):
    return abs(check_real(name, value))


def _mode_op(mode, monitor):
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode: expected 'auto', 'min' or 'max', got {mode!r}")
    if mode == "auto":   # the direction of fastgrad's metrics of that name
        up = ("acc", "auc", "precision", "recall", "true_positives", "true_negatives")
        mode = "max" if any(u in monitor for u in up) else "min"
    return mode


class EarlyStopping(Callback):
    """Stop training when ``monitor`` has not improved by more than
    ``min_delta`` for ``patience`` epochs (Keras 3 rules: with a
    ``baseline``, patience restarts only on epochs that beat it). With
    ``restore_best_weights`` the weights of the best epoch are put back when
    training ends, whether it stopped early or not (as Keras 3). Defaults:
    monitor="val_loss", min_delta=0, patience=0, mode="auto" (max for
    accuracy-like names, else min). An epoch whose logs
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
            self.best_weights, self.best_epoch = self.model.get_weights(), epoch
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

    def on_train_end(self, logs=None):
        if self.stopped_epoch > 0 and self.verbose:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping (best {self.monitor} "
                  f"{self.best:.4f} at epoch {self.best_epoch + 1})")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose:
                print("Restoring model weights from the end of the best epoch: "
                      f"{self.best_epoch + 1}.")
            self.model.set_weights(self.best_weights)


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
    ``save_best_only`` only when ``monitor`` improved (on
    ``initial_value_threshold`` too, when given); logs that lack
    ``monitor`` give a warning and the model is saved anyway, as Keras 3
    does.
    ``save_weights_only``: ``model.save_weights`` instead (``filepath``
    must end in ``.weights.h5``). ``save_freq``: ``"epoch"``, or an integer
    n: save after every n training batches (counted across epochs, as
    Keras counts them; the name may also hold ``{batch}``, the batch's
    number within its epoch from 1), judged on the batch logs."""

    def __init__(self, filepath, monitor="val_loss", verbose=0, save_best_only=False,
                 save_weights_only=False, mode="auto", save_freq="epoch",
                 initial_value_threshold=None):
        super().__init__()
        self.filepath, self.monitor, self.verbose = str(filepath), monitor, verbose
        self.save_best_only = save_best_only
        self.save_weights_only = bool(save_weights_only)
        if self.save_weights_only and not self.filepath.endswith(".weights.h5"):
            raise ValueError(f"filepath: with save_weights_only=True expected a name ending "
                             f"in .weights.h5, got {self.filepath!r}")
        if save_freq != "epoch":
            save_freq = check_int("save_freq", save_freq, low=1)   # or 'epoch'
        self.save_freq = save_freq
        self.mode = _mode_op(mode, monitor)
        self.best = check_real("initial_value_threshold", initial_value_threshold, none=True)
        self._epoch, self._batches = 0, 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.save_freq == "epoch":
            return
        self._batches += 1
        if self._batches >= self.save_freq:
            self._batches = 0
            self._save(self._epoch, batch, logs or {})

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            self._save(epoch, None, logs or {})

    def _save(self, epoch, batch, logs):
        numbers = {"epoch": epoch + 1} if batch is None or "batch" in logs else {
            "epoch": epoch + 1, "batch": batch + 1}
        path = self.filepath.format(**numbers, **logs)
        if self.save_best_only:
            current = logs.get(self.monitor)
            if current is None:   # as Keras 3: warn, then save as without save_best_only
                warnings.warn(f"ModelCheckpoint: can save the best model only with "
                              f"{self.monitor!r} available, saving it anyway; the logged "
                              f"metrics are {', '.join(logs)}", stacklevel=3)
            elif self.best is None or (current < self.best if self.mode == "min"
                                       else current > self.best):
                self.best = current
            else:
                return
        if self.save_weights_only:
            self.model.save_weights(path)
        else:
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
    of squares over the parameters to the steps recorded (about a fifth of
    a 784-256-256-10 MLP's Adam step at batch 32, a few percent at 256), and
    nothing to the steps in between: ``every=k`` pays for one step in k.
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


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` when ``monitor`` has not
    improved by more than ``min_delta`` for ``patience`` epochs, then wait
    ``cooldown`` epochs before counting again; never below ``min_lr``
    (Keras 3 rules). Each epoch's logs get "learning_rate". Defaults:
    monitor="val_loss", factor=0.1, patience=10, mode="auto",
    min_delta=1e-4, cooldown=0, min_lr=0. An optimizer whose learning rate
    is a schedule is refused when training begins."""

    factor = Hyper(check_real, low=0.0, high=1.0, high_open=True)
    min_delta, min_lr = Hyper(_magnitude), Hyper(check_real, low=0.0)
    patience, cooldown = Hyper(check_int, low=0), Hyper(check_int, low=0)

    def __init__(self, monitor="val_loss", factor=0.1, patience=10, verbose=0, mode="auto",
                 min_delta=1e-4, cooldown=0, min_lr=0.0):
        super().__init__()
        if isinstance(factor, (int, float)) and factor >= 1.0:
            raise ValueError(f"factor: ReduceLROnPlateau needs a factor < 1, got {factor}")
        self.monitor, self.factor, self.patience, self.verbose = monitor, factor, patience, verbose
        self.mode = _mode_op(mode, monitor)
        self.min_delta, self.cooldown, self.min_lr = min_delta, cooldown, min_lr
        self._reset()

    def _reset(self):
        self.best, self.cooldown_counter, self.wait = None, 0, 0

    def _better(self, current):
        if self.best is None:
            return True
        if self.mode == "min":
            return current < self.best - self.min_delta
        return current > self.best + self.min_delta

    def on_train_begin(self, logs=None):
        lr = self.model.optimizer._learning_rate
        if isinstance(lr, LearningRateSchedule):
            raise TypeError(f"learning_rate: the optimizer was created with a schedule "
                            f"({type(lr).__name__}), which ReduceLROnPlateau cannot change; "
                            "give the optimizer a float learning_rate")
        self._reset()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        opt = self.model.optimizer
        logs["learning_rate"] = float(opt.current_learning_rate())
        current = logs.get(self.monitor)
        if current is None:
            warnings.warn(f"ReduceLROnPlateau: the monitored metric {self.monitor!r} is not "
                          f"available; the logged metrics are {', '.join(logs)}", stacklevel=2)
            return
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self._better(current):
            self.best, self.wait = current, 0
        elif self.cooldown_counter == 0:
            self.wait += 1
            if self.wait >= self.patience:
                old = float(opt.current_learning_rate())
                if old > np.float32(self.min_lr):
                    new = max(old * self.factor, self.min_lr)
                    opt.learning_rate = new
                    if self.verbose:
                        print(f"Epoch {epoch + 1}: ReduceLROnPlateau reducing learning rate "
                              f"to {new}.")
                    self.cooldown_counter, self.wait = self.cooldown, 0


class CSVLogger(Callback):
    """Write each epoch's logs as a row of a CSV file: an "epoch" column,
    then the logs' keys sorted (with their "val_" forms when the first
    epoch has none), "NA" where a key is missing, as Keras 3. ``append``
    adds to an existing file (the header only when it is empty);
    ``separator`` defaults to ",". The file is flushed after each row and
    closed when training ends."""

    def __init__(self, filename, separator=",", append=False):
        super().__init__()
        self.filename, self.sep, self.append = os.fspath(filename), separator, bool(append)
        self.keys = self.writer = self.csv_file = None

    def on_train_begin(self, logs=None):
        header = True
        if self.append and os.path.exists(self.filename):
            with open(self.filename) as f:
                header = not f.readline()
        if self.csv_file is not None and not self.csv_file.closed:
            self.csv_file.close()
        self.csv_file = open(self.filename, "a" if self.append else "w", newline="")
        self._header, self.keys, self.writer = header, None, None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.keys is None:
            self.keys = sorted(logs)
            if self.keys and not any(k.startswith("val_") for k in self.keys):
                self.keys += ["val_" + k for k in self.keys]
        if self.writer is None:
            self.writer = csv.writer(self.csv_file, delimiter=self.sep)
            if self._header:
                self.writer.writerow(["epoch"] + self.keys)
        self.writer.writerow([epoch] + [logs.get(k, "NA") for k in self.keys])
        self.csv_file.flush()

    def on_train_end(self, logs=None):
        if self.csv_file is not None and not self.csv_file.closed:
            self.csv_file.close()
        self.writer = None


class LambdaCallback(Callback):
    """A callback from functions: ``on_epoch_begin(epoch, logs)``,
    ``on_epoch_end(epoch, logs)``, ``on_train_begin(logs)``,
    ``on_train_end(logs)``, ``on_train_batch_begin(batch, logs)``,
    ``on_train_batch_end(batch, logs)`` (Keras 3's arguments); other
    keyword arguments become attributes."""

    def __init__(self, on_epoch_begin=None, on_epoch_end=None, on_train_begin=None,
                 on_train_end=None, on_train_batch_begin=None, on_train_batch_end=None,
                 **kwargs):
        super().__init__()
        self.__dict__.update(kwargs)
        hooks = {"on_epoch_begin": on_epoch_begin, "on_epoch_end": on_epoch_end,
                 "on_train_begin": on_train_begin, "on_train_end": on_train_end,
                 "on_train_batch_begin": on_train_batch_begin,
                 "on_train_batch_end": on_train_batch_end}
        for name, fn in hooks.items():
            if fn is not None:
                if not callable(fn):
                    raise TypeError(f"{name}: expected a function, got {fn!r}")
                setattr(self, name, fn)


class BackupAndRestore(Callback):
    """Resume a ``fit`` that was interrupted (Keras 3's callback, on
    fastgrad's own model file). It saves the whole model (weights,
    optimizer state, random generators) to ``backup_dir`` at each epoch's
    end (or every ``save_freq`` batches) with the number of finished epochs;
    when training begins and a backup exists, it puts that state back into
    the model and fit starts at the saved epoch. A fit that ends normally
    deletes the backup (``delete_checkpoint``); ``double_checkpoint`` keeps
    the previous backup too, used when the latest one is unreadable."""

    def __init__(self, backup_dir, save_freq="epoch", double_checkpoint=False,
                 delete_checkpoint=True):
        super().__init__()
        if not backup_dir:
            raise ValueError("backup_dir: expected a folder path, got an empty value")
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, int)
                                     or save_freq < 1):
            raise ValueError(f"save_freq: expected 'epoch' or a positive integer, got "
                             f"{save_freq!r}")
        self.backup_dir, self.save_freq = os.fspath(backup_dir), save_freq
        self.double_checkpoint, self.delete_checkpoint = double_checkpoint, delete_checkpoint
        self._model_path = os.path.join(self.backup_dir, "latest.fgmodel")
        self._meta_path = os.path.join(self.backup_dir, "training_metadata.json")
        self._current_epoch = self._since_save = self._last_batch = 0

    def on_train_begin(self, logs=None):
        from fastgrad.saving import ModelFileError

        try:
            self._restore(self._model_path, self._meta_path)
        except (OSError, ModelFileError):
            prev = self._model_path + ".bkp"
            if not os.path.exists(prev):
                raise
            self._restore(prev, self._meta_path + ".bkp")

    def _restore(self, model_path, meta_path):
        from fastgrad.saving import restore_model

        if not os.path.exists(model_path):
            return
        restore_model(self.model, model_path)
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                self.model._initial_epoch = self._current_epoch = int(json.load(f)["epoch"])

    def on_epoch_end(self, epoch, logs=None):
        self._current_epoch, self._last_batch = epoch + 1, 0
        if self.save_freq == "epoch":
            self._save()

    def on_train_batch_end(self, batch, logs=None):
        if self.save_freq == "epoch":
            return
        self._since_save += batch + 1 if batch <= self._last_batch else batch - self._last_batch
        self._last_batch = batch
        if self._since_save >= self.save_freq:
            self._since_save = 0
            self._save()

    def _save(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        if self.double_checkpoint:
            for path in (self._model_path, self._meta_path):
                if os.path.exists(path):
                    shutil.copyfile(path, path + ".bkp")
        self.model.save(self._model_path)   # atomic: a crash leaves the old file
        tmp = self._meta_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"epoch": self._current_epoch, "batch": self._last_batch}, f)
        os.replace(tmp, self._meta_path)

    def on_train_end(self, logs=None):
        if self.delete_checkpoint and os.path.exists(self.backup_dir):
            shutil.rmtree(self.backup_dir)
