"""How a Sequential model is driven over data: ``fit``, ``evaluate``,
``predict``, ``train_on_batch``, ``compute_gradients`` and
``training_pass``, as the mixin ``Trainer`` that ``Sequential`` inherits
(fastgrad.models holds the model itself: layers, buffers, one step).

Every public method checks all of its arguments before the model is built
or anything changes, and holds the model's lock while it runs.
"""
import contextlib
import functools
import math
import signal
import threading
import warnings

import numpy as np

from fastgrad import _data, callbacks as callbacks_mod
from fastgrad._utils import check_int, check_real


def locked(method):
    """Serialize calls on one model: layers share work buffers, so two
    threads must not run passes on the same model at once. Other models,
    and the compiled kernels, run in parallel (they release the GIL)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


@contextlib.contextmanager
def preserved_state(model):
    """Puts back, on leaving, what a training-mode pass that is not an
    optimizer step moves: BatchNormalization's moving statistics (the
    model's non-trainable state) and the dropout counters."""
    state = model.state.copy()
    counters = [(layer, layer.counter) for layer in model.layers if hasattr(layer, "counter")]
    try:
        yield
    finally:
        model.state[...] = state
        for layer, counter in counters:
            layer.counter = counter


class _StepGuard:
    """Ctrl-C during ``fit`` lands between optimizer steps, never inside one.

    A step moves the moving statistics and dropout counters in its forward
    pass, then the weights, moments and step count in the optimizer; broken
    off in between, they would disagree. While fit runs in the main thread,
    a SIGINT that arrives inside a step is held and delivered (to the
    handler that was in place) as soon as the step is complete."""

    def __init__(self):
        self.in_step = False
        self.pending = None
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _on_signal(self, signum, frame):
        if self.in_step:
            self.pending = (signum, frame)
        else:
            self._deliver(signum, frame)

    def _deliver(self, signum, frame):
        if callable(self.previous):
            self.previous(signum, frame)
        elif self.previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    def step_done(self):
        self.in_step = False
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._deliver(*pending)


class _GradStats:
    """An epoch's optimizer steps: mean global gradient norm of the applied
    steps and the share of steps where clipping fired (fastgrad's own
    statistics, kept in ``History.gradients``, not in the logs)."""

    def __init__(self):
        self.steps = self.finite_steps = self.clipped_steps = 0
        self.norm_sum = 0.0

    def add(self, step):
        self.steps += 1
        if not step.nonfinite:   # skipped steps have no meaningful norm
            self.norm_sum += step.global_norm
            self.finite_steps += 1
        self.clipped_steps += step.clipped

    def values(self):
        return {"grad_norm": self.norm_sum / self.finite_steps if self.finite_steps else math.nan,
                "clip_rate": self.clipped_steps / max(self.steps, 1)}


def _check_verbose(verbose):
    """verbose as 0, 1 or 2 ("auto" is 1)."""
    if verbose == "auto":
        verbose = 1
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise ValueError(f"verbose: expected 0, 1, 2 or 'auto', got {verbose!r}")
    return verbose


def _check_callbacks(callbacks):
    """The callbacks as a list."""
    if callbacks is None:
        return []
    if isinstance(callbacks, callbacks_mod.Callback) or not all(
            isinstance(cb, callbacks_mod.Callback) for cb in callbacks):
        raise TypeError("callbacks: expected a list of fastgrad.callbacks.Callback "
                        f"objects, got {callbacks!r}")
    return list(callbacks)


def _check_validation_freq(validation_freq):
    """An int >= 1 (validate every that many epochs) or a list of the
    1-based epochs after which to validate, as in Keras 3."""
    if isinstance(validation_freq, list):
        for e in validation_freq:
            check_int("validation_freq", e, low=1)
        return validation_freq
    return check_int("validation_freq", validation_freq, low=1)


def _should_validate(epoch, validation_freq):
    epoch += 1   # Keras counts epochs from 1 here
    if isinstance(validation_freq, list):
        return epoch in validation_freq
    return epoch % validation_freq == 0


def _check_fit_args(epochs, batch_size, initial_epoch, verbose, validation_split, callbacks):
    """fit's plain arguments checked; returns (verbose as 0, 1 or 2, the
    callbacks as a list)."""
    check_int("epochs", epochs, low=0)
    check_int("batch_size", batch_size, low=1)
    check_int("initial_epoch", initial_epoch, low=0)
    verbose = _check_verbose(verbose)
    check_real("validation_split", validation_split, low=0, high=1, high_open=True)
    return verbose, _check_callbacks(callbacks)


class _Passes:
    """fit's batches, epoch by epoch. Without steps_per_epoch an epoch is
    one pass over the data, shuffled (from rng, when given) as it begins.
    With it, an epoch takes the next steps_per_epoch batches of the current
    pass; one that reaches the pass's end stops there (with Keras's
    warning), and the next epoch begins a new, newly shuffled pass."""

    def __init__(self, batches, rng, steps_per_epoch):
        self.batches, self.rng, self.steps = batches, rng, steps_per_epoch
        self._pass = None

    def _new_pass(self):
        order = self.rng.permutation(self.batches.rows) if self.rng is not None else None
        return self.batches(order)

    def epoch(self):
        if self.steps is None:
            for _, batch in self._new_pass():
                yield batch
            return
        if self._pass is None:
            self._pass = self._new_pass()
        for _ in range(self.steps):
            if self._pass is None:
                warnings.warn("fit: the data ran out before steps_per_epoch batches; the "
                              "epoch ends here and the next one begins a new pass (give "
                              "steps_per_epoch <= ceil(rows / batch_size))", stacklevel=4)
                return
            stop, batch = next(self._pass)
            if stop == self.batches.rows:   # the pass is done: a new one next epoch
                self._pass = None
            yield batch


class Trainer:
    """The training and inference loops of ``Sequential``. They use the
    model's one-batch primitives: ``_prepare(rows)`` (work buffers),
    ``_forward``, ``_forward_backward``, ``_train_step`` and
    ``_batch_loss``."""

    @locked
    def train_on_batch(self, x, y, sample_weight=None, class_weight=None, return_dict=False):
        """One forward, backward and optimizer step on one batch. Returns the
        loss (a float) or [loss, *metrics] when metrics were compiled (with
        return_dict, a dict by name), the metrics reset first so that they
        describe this batch (as Keras 3 does). sample_weight (one number per
        row) or class_weight ({class: weight}) weight the rows' losses:
        sum_i w_i l_i / rows."""
        self._require_compiled("train_on_batch")
        data = _data.check_xy(self, x, y)
        w = _data.check_weights(self, sample_weight, class_weight, data)
        _data.check_rows(data[0])
        self._require_built(data[0].shape[1])
        self._prepare(data[0].shape[0])
        self.reset_metrics()
        self._track_loss(self._train_step(*data, w), data[0].shape[0])
        return self._results(return_dict=return_dict)

    @locked
    def test_on_batch(self, x, y, sample_weight=None, return_dict=False):
        """Loss (with regularization penalties) and metrics of one batch in
        inference mode; returns as train_on_batch does. Nothing changes but
        the metrics, which describe this batch."""
        self._require_compiled("test_on_batch")
        data = _data.check_xy(self, x, y)
        data = (*data, _data.check_weights(self, sample_weight, None, data))
        _data.check_rows(data[0])
        self._require_built(data[0].shape[1])
        logs = self._evaluate(data, data[0].shape[0], callbacks_mod.CallbackList(model=self))
        return self._results(logs, return_dict)

    @locked
    def predict_on_batch(self, x):
        """Outputs for x in inference mode as one batch: no batching loop,
        and no allocation beyond the returned array once the work buffers
        have grown to x's rows (they are kept for the largest batch seen).
        An array of the model's dtype, shape (rows, outputs)."""
        return self._call(x, False)

    def __call__(self, x, training=False):
        """``model(x)``: the outputs for x as one batch, as predict_on_batch
        (the fast path: no batching loop, no allocation beyond the output).
        Returns a NumPy array (Keras returns a backend tensor). With
        training=True the pass runs in training mode, as in Keras: dropout
        draws masks and BatchNormalization uses the batch's statistics and
        moves its moving statistics."""
        with self._lock:
            return self._call(x, bool(training))

    def _call(self, x, training):
        x = _data.check_x(self, x)
        self._require_built(x.shape[1])
        self._prepare(max(x.shape[0], 1))
        return self._forward(x, training, False).copy()

    def reset_metrics(self):
        """Reset the loss's running mean and every compiled metric (Keras's
        name); fit does it as each epoch begins, evaluate as it begins."""
        self._loss_sum = self._loss_rows = 0.0
        for m in self.metrics:
            m.reset_state()

    def _track_loss(self, loss, rows):
        """The loss's running mean, weighted by the batches' rows (Keras's
        loss tracker)."""
        self._loss_sum += loss * rows
        self._loss_rows += rows

    def _logs(self, penalty=0.0):
        """{"loss": running mean (+ penalty), metric name: result}."""
        logs = {"loss": self._loss_sum / self._loss_rows + penalty if self._loss_rows else 0.0}
        for name, m in zip(self._metric_names, self.metrics):
            logs[name] = m.result()
        return logs

    def _results(self, logs=None, return_dict=False):
        """Keras's return convention: the loss (a float) without metrics,
        else [loss, *metrics]; with return_dict, {"loss": ..., name: ...}."""
        logs = self._logs() if logs is None else logs
        if return_dict:
            return dict(logs)
        return logs["loss"] if not self.metrics else list(logs.values())

    @locked
    def compute_gradients(self, x, y):
        """Loss of one batch in training mode and the gradients of that loss
        (without regularization penalties), as copies in the order of
        ``weight_names``. Changes no weight, no moving statistic, no dropout
        counter and no optimizer state."""
        self._require_compiled("compute_gradients")
        with self.training_pass(x, y) as loss:
            return loss, [self.grads[off:off + int(np.prod(shape))].reshape(shape).copy()
                          for _, off, shape, _, _ in self._tensors]

    @contextlib.contextmanager
    def training_pass(self, x, y, batch_size=None, activation_stats=False):
        """``with model.training_pass(x, y) as loss:`` runs one forward and
        backward pass in training mode on the first ``batch_size`` rows of (x, y)
        (all by default) and holds the model for the block. Inside it,
        ``model.grads`` (each layer's ``grads``) hold the gradients of the
        loss without regularization penalties, and with ``activation_stats``
        each Dense and Activation layer's ``activation_stats`` describe the
        pass. Weights and optimizer are untouched; the moving statistics and
        dropout counters the pass moved are put back. A model not built yet
        is built first. fastgrad.diagnose is written on it."""
        with self._lock:
            self._require_compiled("training_pass")
            if batch_size is not None:
                batch_size = check_int("batch_size", batch_size, low=1)
            data = _data.take_rows(_data.check_xy(self, x, y), slice(batch_size))
            _data.check_rows(data[0])
            self._require_built(data[0].shape[1])
            self._prepare(data[0].shape[0])
            stat_layers = [layer for layer in self.layers if hasattr(layer, "collect_stats")]
            with preserved_state(self):
                try:
                    for layer in stat_layers:
                        layer.collect_stats = activation_stats
                    # each layer's own call: the one that gathers statistics
                    loss, _ = self._forward_backward(*data, compiled=False)
                finally:
                    for layer in stat_layers:
                        layer.collect_stats = False
            yield float(loss)

    @locked
    def forward_backward(self, x, y, sample_weight=None):
        """One training-mode pass over a batch, without an optimizer step:
        returns the batch's loss ``sum_i w_i l_i / rows`` (w_i = 1 without
        ``sample_weight``; no regularization penalty) and leaves its gradient
        in ``model.grads``. BatchNormalization's moving statistics and the
        dropout counters advance as in a training step. For solvers of one's
        own over the flat buffers (``model.params``, ``model.grads``), such as
        fastgrad.sklearn's L-BFGS."""
        self._require_compiled("forward_backward")
        x, target, labels = _data.check_xy(self, x, y)
        _data.check_rows(x)
        if sample_weight is not None:
            w = np.asarray(sample_weight)
            if w.shape != (x.shape[0],) or w.dtype.kind not in "biuf":
                raise ValueError(f"sample_weight: expected {x.shape[0]} numbers (one per row), "
                                 f"got shape {w.shape} of dtype {w.dtype}")
            sample_weight = _data.converted(w.reshape(1, -1), self.dtype, "sample_weight")[0]
        self._require_built(x.shape[1])
        self._prepare(x.shape[0])
        loss, _ = self._forward_backward(x, target, labels, sample_weight)
        return float(loss)

    # -- fit --------------------------------------------------------------
    @locked
    def fit(self, x, y, epochs=1, batch_size=None, validation_data=None, validation_split=0.0,
            shuffle=True, callbacks=None, verbose=1, initial_epoch=0, class_weight=None,
            sample_weight=None, steps_per_epoch=None, validation_freq=1,
            validation_batch_size=None):
        """Train for ``epochs`` passes over (x, y) in batches of ``batch_size``
        (default 32; the last one may be smaller), shuffled each epoch from
        the model's seed. ``validation_split`` holds out that fraction of the
        rows, taken from the end before shuffling, as Keras does;
        ``validation_data`` is (x_val, y_val) or (x_val, y_val,
        sample_weight_val). sample_weight (one number per row) or
        class_weight ({class index: weight}) weight each row's loss: a
        batch's loss is sum_i w_i l_i / rows (Keras's sum_over_batch_size);
        metrics stay unweighted, as Keras's ``metrics``.
        ``steps_per_epoch``, as Keras 3 with arrays: an epoch is that many
        batches, and the next epoch continues the same pass over the data
        (one shuffle per pass); an epoch that reaches the end of the data
        stops there with a warning. Validation runs after epochs e (from 1)
        with e % validation_freq == 0 (or e in validation_freq, a list), in
        batches of ``validation_batch_size`` (default: batch_size).

        Returns a History whose ``history`` maps "loss", the metrics (by
        their names), and their "val_" forms to per-epoch lists, exactly as
        Keras 3's; ``history.gradients`` maps "grad_norm" (mean global
        gradient norm of the epoch's applied steps) and "clip_rate" (share
        of its steps where clipping fired) to lists aligned with
        ``history.epoch``. verbose: 0 silent, 1 a progress bar, 2 one line
        per epoch (a fastgrad.callbacks.ProgbarLogger, added unless callbacks
        holds one). callbacks: fastgrad.callbacks.Callback objects, called
        as Keras 3 calls them: batch logs hold the loss's running mean and
        the metrics over the epoch so far; validation calls the on_test_*
        hooks; on_train_end receives the last epoch's logs. Every argument
        is checked before the model is built or anything changes."""
        self._require_compiled("fit")
        batch_size = 32 if batch_size is None else batch_size
        verbose, callbacks = _check_fit_args(epochs, batch_size, initial_epoch, verbose,
                                             validation_split, callbacks)
        steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch, low=1, none=True)
        validation_freq = _check_validation_freq(validation_freq)
        val_batch = check_int("validation_batch_size", validation_batch_size, low=1, none=True)
        train, val = self._fit_data(x, y, validation_data, validation_split, sample_weight,
                                    class_weight)
        _data.check_rows(train[0])
        self._require_built(train[0].shape[1])
        batches = _data.Batches(train, batch_size, gather=shuffle)
        self._prepare(batches.size)
        passes = _Passes(batches, self._rng if shuffle else None, steps_per_epoch)
        cbs = callbacks_mod.CallbackList(callbacks, add_history=True, add_progbar=verbose != 0,
                                         model=self, verbose=verbose, epochs=epochs,
                                         steps=steps_per_epoch or batches.steps)
        return self._fit_loop(passes, cbs, initial_epoch, epochs, val,
                              val_batch or batches.size, validation_freq)

    def _fit_loop(self, passes, cbs, initial_epoch, epochs, val, val_batch, validation_freq):
        """fit's epochs, once every argument is checked; returns the History."""
        self.stop_training = False
        self._initial_epoch = None   # BackupAndRestore sets it when it resumes
        cbs.on_train_begin()
        if self._initial_epoch is not None:
            initial_epoch = self._initial_epoch
        logs = {}
        with _StepGuard() as guard:
            for epoch in range(initial_epoch, epochs):
                self.reset_metrics()
                cbs.on_epoch_begin(epoch)
                self._epoch_gradients = self._fit_epoch(passes, cbs, guard)
                logs = self._logs()
                if val is not None and _should_validate(epoch, validation_freq):
                    val_logs = self._evaluate(val, val_batch, cbs)
                    logs.update(("val_" + k, v) for k, v in val_logs.items())
                cbs.on_epoch_end(epoch, logs)
                if self.stop_training:
                    break
        # use_ema: the weights become their moving average, as Keras' fit ends
        self.optimizer.finalize_variable_values()
        cbs.on_train_end(logs)
        self.history = cbs.history
        return self.history

    def _fit_data(self, x, y, validation_data, validation_split, sample_weight, class_weight):
        """(training, validation) quadruples (x, target, labels, row weights
        or None); validation is None without validation data, and
        validation_data wins over validation_split. class_weight weights
        the training rows only, as in Keras."""
        train = _data.check_xy(self, x, y)
        train = (*train, _data.check_weights(self, sample_weight, class_weight, train))
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
                raise ValueError("validation_data: expected a tuple (x_val, y_val) or "
                                 "(x_val, y_val, sample_weight_val)")
            val = _data.check_xy(self, *validation_data[:2], dim=train[0].shape[1],
                                 names=("validation_data[0]", "validation_data[1]"))
            sw = validation_data[2] if len(validation_data) == 3 else None
            return train, (*val, _data.check_weights(self, sw, None, val,
                                                     "validation_data[2]"))
        if validation_split:
            return _data.split_validation(train, validation_split)
        return train, None

    def _fit_epoch(self, passes, cbs, guard):
        """One epoch of optimizer steps (fastgrad._trainer._Passes); returns
        the epoch's gradient statistics (the loss and metrics accumulate in
        their trackers)."""
        grads = _GradStats()
        batch_logs = cbs.has_batch_hooks("train", "end")
        for step, (x, target, labels, w) in enumerate(passes.epoch()):
            cbs.on_train_batch_begin(step)
            guard.in_step = True
            try:
                loss = self._train_step(x, target, labels, w)
            finally:
                guard.step_done()
            self._track_loss(loss, x.shape[0])
            grads.add(self.optimizer.last_step)
            if batch_logs:
                cbs.on_train_batch_end(step, self._logs())
            if self.stop_training:
                break
        return grads.values()

    # -- inference --------------------------------------------------------
    def _evaluate(self, data, batch_size, cbs):
        """The logs ({"loss" with regularization penalties, metrics}) over
        the quadruple's rows in inference mode, the metrics reset first;
        calls the on_test_* hooks."""
        batches = _data.Batches(data, batch_size)
        self._prepare(batches.size)
        self.reset_metrics()
        penalty = self._penalty()
        batch_logs = cbs.has_batch_hooks("test", "end")
        cbs.on_test_begin()
        for step, (_, (x, target, labels, w)) in enumerate(batches()):
            cbs.on_test_batch_begin(step)
            h = self._forward(x, False, self._fused)
            loss, pred = self._batch_loss(h, target, labels, None, w)
            self._track_loss(loss, x.shape[0])
            self._update_metrics(pred, target, labels)
            if batch_logs:
                cbs.on_test_batch_end(step, self._logs(penalty))
        logs = self._logs(penalty)
        cbs.on_test_end(logs)
        return logs

    @locked
    def evaluate(self, x, y, batch_size=None, verbose=1, sample_weight=None, callbacks=None,
                 return_dict=False):
        """Loss (with regularization penalties; rows weighted by
        ``sample_weight`` as in fit) and metrics in inference mode over all
        rows, in batches of batch_size (default 32). Returns a float or
        [loss, *metrics]; with return_dict, a dict by name. callbacks get the
        on_test_* hooks; verbose prints the results."""
        self._require_compiled("evaluate")
        batch_size = check_int("batch_size", 32 if batch_size is None else batch_size, low=1)
        verbose = _check_verbose(verbose)
        callbacks = _check_callbacks(callbacks)
        data = _data.check_xy(self, x, y)
        data = (*data, _data.check_weights(self, sample_weight, None, data))
        self._require_built(data[0].shape[1])
        cbs = callbacks_mod.CallbackList(callbacks, add_progbar=verbose != 0, model=self,
                                         verbose=verbose, epochs=1,
                                         steps=-(-data[0].shape[0] // batch_size))
        return self._results(self._evaluate(data, batch_size, cbs), return_dict)

    @locked
    def predict(self, x, batch_size=None, verbose=0, callbacks=None):
        """Outputs for x in inference mode, in batches of ``batch_size``
        (default 32); an array of the model's dtype, shape (rows, outputs).
        callbacks get on_predict_begin, on_predict_batch_begin/end (logs
        {"outputs": the batch's outputs}) and on_predict_end. verbose is
        accepted for Keras compatibility and prints nothing."""
        batch_size = check_int("batch_size", 32 if batch_size is None else batch_size, low=1)
        callbacks = _check_callbacks(callbacks)
        x = _data.check_x(self, x)
        self._require_built(x.shape[1])
        out = np.empty((x.shape[0], self.output_dim), self.dtype)
        batches = _data.Batches((x,), batch_size)
        self._prepare(batches.size)
        cbs = callbacks_mod.CallbackList(callbacks, model=self, verbose=verbose, epochs=1,
                                         steps=batches.steps)
        cbs.on_predict_begin()
        start = 0
        for step, (stop, (xb,)) in enumerate(batches()):
            cbs.on_predict_batch_begin(step)
            out[start:stop] = self._forward(xb, False, False)
            cbs.on_predict_batch_end(step, {"outputs": out[start:stop]})
            start = stop
        cbs.on_predict_end()
        return out
