"""scikit-learn's MLPClassifier and MLPRegressor, trained by fastgrad.

Changing ``from sklearn.neural_network import MLPClassifier`` to
``from fastgrad.sklearn import MLPClassifier`` is the whole port: the same
parameters, defaults, fitted attributes and methods, validated by
scikit-learn's own helpers, with the network held by a fastgrad
``Sequential`` (``model_``) so training runs in compiled code.

The numbers follow scikit-learn's definitions (n rows in a batch, or the sum
S of their sample weights w_i; W the kernels, not the intercepts):

    loss = sum_i w_i l_i / S + alpha / 2 * sum ||W||^2 / S
    l_i  = -sum_k y_ik log p_ik                      softmax (multiclass)
         = -sum_k y log p + (1 - y) log(1 - p)       logistic (binary, multilabel)
         = 1/2 mean_k (p_ik - y_ik)^2                identity (regression)

    gradient: each row's output error (p_i - y_i) w_i / S, back-propagated,
              plus alpha W / S for the kernels. (For several regression
              outputs scikit-learn's error term is the gradient of
              sum_k (p - y)^2 / 2, K times that of the loss above; fastgrad
              uses the same gradient, so both take the same steps.)

Initialization draws each layer's kernel, then its intercepts, from
U(-b, b), b = sqrt(f / (fan_in + fan_out)), f = 2 for 'logistic' hidden
units and 6 otherwise, from ``random_state``, in scikit-learn's order; the
shuffling and the early-stopping split draw from it too, so on float64 data
both libraries start from the same weights and see the same batches.
'sgd' and 'adam' are fastgrad's ``SGD`` (Nesterov or heavy-ball momentum)
and ``Adam``, whose updates are scikit-learn's; learning-rate schedules
('invscaling': lr = learning_rate_init / (t_ + 1)^power_t after each epoch,
'adaptive': lr / 5 when n_iter_no_change epochs fail to improve by tol) and
stopping rules (tol, n_iter_no_change, early_stopping on a validation_fraction
split, stratified for single-output classification) are scikit-learn's.
'lbfgs' runs SciPy's L-BFGS-B over ``model_.params`` (one flat array) with
fastgrad's compiled loss and gradient over the whole data set.

Beyond scikit-learn's parameters:

    batch_normalization  BatchNormalization after each hidden layer (False)
    dropout              dropout rate after each hidden layer (0.0)
    clipnorm             clip each gradient tensor to this L2 norm (None)
    kernel_initializer   a fastgrad initializer name (e.g. "he_normal") in
                         place of scikit-learn's; biases then start at zero
    dtype                "float32" or "float64" for the weights; None (the
                         default) follows X, as scikit-learn does

Sparse X is accepted and densified. ``loss="poisson"`` (MLPRegressor) is not
available: fastgrad has no Poisson loss yet. A gradient that is not finite
stops training: scikit-learn would carry NaN weights from there on, and ends
with the same ValueError (or, with early stopping, with the best weights).
"""
import inspect
import numbers
import warnings
from itertools import pairwise
from typing import ClassVar

import numpy as np
import scipy.optimize
import scipy.sparse
from scipy.linalg.blas import get_blas_funcs
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_random_state, column_or_1d
from sklearn.utils import shuffle as _shuffle
from sklearn.utils._param_validation import Interval, Options, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import type_of_target, unique_labels
from sklearn.utils.validation import (
    _check_sample_weight,
    check_is_fitted,
    validate_data,
)

import fastgrad as fg

__all__ = ["MLPClassifier", "MLPRegressor"]

_HIDDEN = {"identity": "linear", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}
# output activation -> (fastgrad activation, loss)
_OUTPUT = {"softmax": ("softmax", "sparse_categorical_crossentropy"),
           "logistic": ("sigmoid", "binary_crossentropy"),
           "identity": ("linear", "mse")}
_STOCHASTIC = ("sgd", "adam")
_DIVERGED = ("Solver produced non-finite parameter weights. The input data may contain large "
             "values and need to be preprocessed.")

# Parameters after the leading ones, shared by both estimators: scikit-learn's,
# then fastgrad's own. One table, from which both signatures are made.
_SHARED = {
    "solver": "adam", "alpha": 0.0001, "batch_size": "auto", "learning_rate": "constant",
    "learning_rate_init": 0.001, "power_t": 0.5, "max_iter": 200, "shuffle": True,
    "random_state": None, "tol": 1e-4, "verbose": False, "warm_start": False,
    "momentum": 0.9, "nesterovs_momentum": True, "early_stopping": False,
    "validation_fraction": 0.1, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-8,
    "n_iter_no_change": 10, "max_fun": 15000,
    "batch_normalization": False, "dropout": 0.0, "clipnorm": None,
    "kernel_initializer": None, "dtype": None,
}


def _init_with(leading):
    """An __init__ storing each argument as an attribute, with the signature
    (self, *leading, *, **_SHARED) that scikit-learn's get_params reads."""
    P = inspect.Parameter
    sig = inspect.Signature(
        [P("self", P.POSITIONAL_OR_KEYWORD)]
        + [P(k, P.POSITIONAL_OR_KEYWORD, default=v) for k, v in leading.items()]
        + [P(k, P.KEYWORD_ONLY, default=v) for k, v in _SHARED.items()])

    def __init__(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        for name, value in list(bound.arguments.items())[1:]:
            setattr(self, name, value)

    __init__.__signature__ = sig
    return __init__


class _BaseMLP(BaseEstimator):
    """What MLPClassifier and MLPRegressor share: the network, the solvers
    and the stopping rules."""

    _parameter_constraints: ClassVar[dict] = {
        "hidden_layer_sizes": ["array-like", Interval(numbers.Integral, 1, None, closed="left")],
        "activation": [StrOptions(set(_HIDDEN))],
        "solver": [StrOptions({"lbfgs", "sgd", "adam"})],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "batch_size": [StrOptions({"auto"}), Interval(numbers.Integral, 1, None, closed="left")],
        "learning_rate": [StrOptions({"constant", "invscaling", "adaptive"})],
        "learning_rate_init": [Interval(numbers.Real, 0, None, closed="neither")],
        "power_t": [Interval(numbers.Real, 0, None, closed="left")],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "shuffle": ["boolean"],
        "random_state": ["random_state"],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
        # fastgrad's SGD needs momentum < 1 (scikit-learn also allows 1)
        "momentum": [Interval(numbers.Real, 0, 1, closed="left")],
        "nesterovs_momentum": ["boolean"],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="left")],
        "beta_1": [Interval(numbers.Real, 0, 1, closed="left")],
        "beta_2": [Interval(numbers.Real, 0, 1, closed="left")],
        "epsilon": [Interval(numbers.Real, 0, None, closed="neither")],
        "n_iter_no_change": [Interval(numbers.Integral, 1, None, closed="left"),
                             Options(numbers.Real, {np.inf})],
        "max_fun": [Interval(numbers.Integral, 1, None, closed="left")],
        "batch_normalization": ["boolean"],
        "dropout": [Interval(numbers.Real, 0, 1, closed="left")],
        "clipnorm": [None, Interval(numbers.Real, 0, None, closed="neither")],
        "kernel_initializer": [None, str],
        "dtype": [None, StrOptions({"float32", "float64"})],
    }

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    # -- the network ------------------------------------------------------
    def _shapes(self, units):
        """Shapes of the trainable tensors in model_.params order, and the
        index of each Dense kernel among them (its bias follows it)."""
        shapes, kernels = [], []
        for i, (a, b) in enumerate(pairwise(units)):
            kernels.append(len(shapes))
            shapes += [(a, b), (b,)]
            if self.batch_normalization and i < len(units) - 2:
                shapes += [(b,), (b,)]    # gamma, beta
        return shapes, kernels

    def _build(self, units, dtype, seed):
        """A fresh Sequential for layer sizes ``units``, compiled, with
        coefs_ and intercepts_ as views into its parameters."""
        init = self.kernel_initializer or "glorot_uniform"
        layers = []
        for u in units[1:-1]:
            layers.append(fg.layers.Dense(u, activation=_HIDDEN[self.activation],
                                          kernel_initializer=init))
            if self.batch_normalization:
                layers.append(fg.layers.BatchNormalization())
            if self.dropout:
                layers.append(fg.layers.Dropout(self.dropout))
        act, loss = _OUTPUT[self.out_activation_]
        layers.append(fg.layers.Dense(units[-1], activation=act, kernel_initializer=init))
        model = fg.Sequential(layers, dtype=np.dtype(dtype).name, seed=seed)
        model.build(units[0])
        model.compile(self._new_optimizer(), loss)
        self.model_, self._optimizer = model, model.optimizer
        self._point_views(units)

    def _point_views(self, units):
        shapes, kernels = self._shapes(units)
        params, grads = self.model_.params, self.model_.grads
        offsets = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
        if offsets[-1] != params.size:
            raise RuntimeError("the network's parameters are not laid out as expected")
        views = [params[a:b].reshape(s) for a, b, s in zip(offsets, offsets[1:], shapes)]
        self.coefs_ = [views[k] for k in kernels]
        self.intercepts_ = [views[k + 1] for k in kernels]
        self._units = list(units)
        # scikit-learn's packing (every kernel, then every intercept) as
        # positions in model_.params
        self._sk_order = np.concatenate([np.arange(offsets[k + j], offsets[k + j + 1])
                                         for j in (0, 1) for k in kernels])
        # (kernel, its gradient, its slice of params) for the L2 term
        self._kernels = [(params[offsets[k]:offsets[k + 1]], grads[offsets[k]:offsets[k + 1]],
                          slice(offsets[k], offsets[k + 1])) for k in kernels]
        self._axpy = get_blas_funcs("axpy", dtype=params.dtype)
        self._views = (self.coefs_, self.intercepts_, list(self.coefs_),
                       list(self.intercepts_))

    def _sync_model(self):
        """coefs_ and intercepts_ assigned by hand become the network's
        weights (the network is rebuilt if their shapes differ)."""
        v = getattr(self, "_views", None)
        if (v is not None and self.coefs_ is v[0] and self.intercepts_ is v[1]
                and len(v[0]) == len(v[2]) and len(v[1]) == len(v[3])
                and all(a is b for a, b in zip(v[0] + v[1], v[2] + v[3]))):
            return
        coefs = [np.asarray(c) for c in self.coefs_]
        intercepts = [np.asarray(b) for b in self.intercepts_]
        units = [coefs[0].shape[0]] + [c.shape[1] for c in coefs]
        if getattr(self, "_units", None) == units:
            self._point_views(units)
        else:
            self._build(units, np.result_type(coefs[0], np.float32), None)
            self.n_layers_ = len(units)
        for view, value in zip(self.coefs_ + self.intercepts_, coefs + intercepts):
            view[...] = value.reshape(view.shape)

    def _new_optimizer(self):
        clip = {"clipnorm": self.clipnorm}
        if self.solver == "adam":
            return fg.optimizers.Adam(self.learning_rate_init, beta_1=self.beta_1,
                                      beta_2=self.beta_2, epsilon=self.epsilon, **clip)
        momentum = self.momentum if self.solver == "sgd" else 0.0
        return fg.optimizers.SGD(self.learning_rate_init, momentum=momentum,
                                 nesterov=bool(self.nesterovs_momentum and momentum), **clip)

    def _scales(self):
        """(c_grad, c_loss): scikit-learn's row loss and output error are
        fastgrad's kernel's times these."""
        k = self.n_outputs_
        if self.out_activation_ == "identity":
            return k / 2.0, 0.5
        if self.out_activation_ == "logistic":
            return float(k), float(k)
        return 1.0, 1.0

    def _targets(self, y, dtype):
        """y (n, outputs) as the network's training targets."""
        if self.out_activation_ == "softmax":
            return np.ascontiguousarray(np.argmax(y, axis=1), dtype=np.int64)
        return np.ascontiguousarray(y, dtype=dtype)

    def _initialize(self, y, units, dtype):
        self.n_iter_ = 0
        self.t_ = 0
        self.n_outputs_ = y.shape[1]
        self.n_layers_ = len(units)
        self.out_activation_ = self._out_activation()
        own = self.kernel_initializer is not None or self.dropout
        seed = int(self._random_state.randint(np.iinfo(np.int32).max)) if own else None
        self._build(units, dtype, seed)
        if self.kernel_initializer is None:
            factor = 2.0 if self.activation == "logistic" else 6.0
            for coef, intercept in zip(self.coefs_, self.intercepts_):
                bound = np.sqrt(factor / (coef.shape[0] + coef.shape[1]))
                coef[...] = self._random_state.uniform(-bound, bound, coef.shape)
                intercept[...] = self._random_state.uniform(-bound, bound, intercept.shape)
        self._best_weights = self.model_.get_weights()
        if self.solver in _STOCHASTIC:
            self.loss_curve_ = []
            self._no_improvement_count = 0
            if self.early_stopping:
                self.validation_scores_ = []
                self.best_validation_score_ = -np.inf
                self.best_loss_ = None
            else:
                self.best_loss_ = np.inf
                self.validation_scores_ = None
                self.best_validation_score_ = None

    # -- fitting ----------------------------------------------------------
    def _fit(self, X, y, sample_weight=None, incremental=False):
        self._validate_params()
        hidden = self.hidden_layer_sizes
        hidden = list(hidden) if hasattr(hidden, "__iter__") else [hidden]
        if np.any(np.array(hidden) <= 0):
            raise ValueError(f"hidden_layer_sizes must be > 0, got {hidden}.")
        if self.kernel_initializer is not None:
            try:
                fg.initializers.get(self.kernel_initializer)
            except ValueError as e:
                raise ValueError(f"kernel_initializer: {e}") from None
        if getattr(self, "loss", None) == "poisson":
            raise ValueError("loss: 'poisson' is not available in fastgrad yet; use "
                             "'squared_error'")
        first_pass = not hasattr(self, "coefs_") or (not self.warm_start and not incremental)
        X, y = self._validate_input(X, y, incremental, reset=first_pass)
        if first_pass:
            dtype = np.dtype(self.dtype or X.dtype)
        else:
            self._sync_model()
            dtype = self.model_.dtype
        X = X.toarray() if scipy.sparse.issparse(X) else X
        X = np.ascontiguousarray(X, dtype=dtype)
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64)
        if y.ndim == 1:
            y = y.reshape((-1, 1))
        self.n_outputs_ = y.shape[1]
        units = [X.shape[1]] + hidden + [self.n_outputs_]
        self._random_state = check_random_state(self.random_state)
        if first_pass:
            self._initialize(y, units, dtype)
        if self.solver in _STOCHASTIC:
            self._fit_stochastic(X, y, sample_weight, incremental)
        else:
            self._fit_lbfgs(X, y, sample_weight)
        if getattr(self, "_diverged", False) or not np.isfinite(self.model_.params).all():
            raise ValueError(_DIVERGED)
        return self

    def _row_weights(self, out, sw, b, c_grad):
        """The per-row factors handed to fastgrad for a batch of b rows: its
        gradient is then scikit-learn's. Returns (factors or None, S)."""
        if sw is None:
            if c_grad == 1.0:
                return None, float(b)
            out = out[:b]
            out.fill(c_grad)
            return out, float(b)
        s = float(np.sum(sw))
        out = out[:b]
        np.multiply(sw, c_grad * b / s if s else 0.0, out=out)
        return out, s

    def _add_penalty(self, s):
        """Add alpha W / s to each kernel's gradient; return sum ||W||^2."""
        total = 0.0
        a = self.alpha / s if s else 0.0
        for w, g, _ in self._kernels:
            total += float(np.dot(w, w))
            if a:
                self._axpy(w, g, a=a)
        return total

    def _fit_stochastic(self, X, y, sample_weight, incremental):
        # One function, longer than the rest, on purpose: it follows
        # scikit-learn's own _fit_stochastic step by step (validation split,
        # epoch loop, learning-rate adaptation, stopping rules, best-weight
        # bookkeeping), so that the two can be compared line by line.
        model = self.model_
        if not incremental or not hasattr(self, "_optimizer"):
            model.compile(self._new_optimizer(), model.loss)
            self._optimizer = model.optimizer
        opt = self._optimizer
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        early_stopping = self.early_stopping
        X_val = y_val = sw_val = None
        if early_stopping:
            stratify = y if isinstance(self, ClassifierMixin) and self.n_outputs_ == 1 else None
            parts = train_test_split(X, y, *([] if sample_weight is None else [sample_weight]),
                                     random_state=self._random_state,
                                     test_size=self.validation_fraction, stratify=stratify)
            X, X_val, y, y_val = parts[:4]
            if sample_weight is not None:
                sample_weight, sw_val = parts[4:]
            if X_val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase "
                                 "'validation_fraction' or the size of your dataset.")
            if isinstance(self, ClassifierMixin):
                y_val = self._label_binarizer.inverse_transform(y_val)
            X = np.ascontiguousarray(X)
        n = X.shape[0]
        if self.batch_size == "auto":
            bs = min(200, n)
        else:
            if self.batch_size > n:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. "
                              "It is going to be clipped", stacklevel=3)
            bs = int(np.clip(self.batch_size, 1, n))
        target = self._targets(y, model.dtype)
        c_grad, c_loss = self._scales()
        xbuf = np.empty((bs, X.shape[1]), model.dtype)
        tbuf = np.empty((bs,) + target.shape[1:], target.dtype)
        wbuf = np.empty(bs, model.dtype)
        swbuf = np.empty(bs) if sample_weight is not None else None
        idx = np.arange(n)
        self._diverged = False
        self.n_iter_ = 0
        for _ in range(self.max_iter):
            if self.shuffle:
                idx = _shuffle(idx, random_state=self._random_state)
            total = 0.0
            for start in range(0, n, bs):
                stop = min(start + bs, n)
                b = stop - start
                if self.shuffle:
                    sel = idx[start:stop]   # a permutation: mode="clip" makes no temporary
                    xb = np.take(X, sel, axis=0, out=xbuf[:b], mode="clip")
                    tb = np.take(target, sel, axis=0, out=tbuf[:b], mode="clip")
                    swb = (None if swbuf is None
                           else np.take(sample_weight, sel, out=swbuf[:b], mode="clip"))
                else:
                    xb, tb = X[start:stop], target[start:stop]
                    swb = None if sample_weight is None else sample_weight[start:stop]
                w, s = self._row_weights(wbuf, swb, b, c_grad)
                data = model.forward_backward(xb, tb, w)
                penalty = self._add_penalty(s)
                rec = opt.apply()
                if rec.nonfinite:   # scikit-learn's weights would be NaN from here on
                    self._diverged = True
                    break
                total += (data * c_loss / c_grad + 0.5 * self.alpha * penalty / s) * b
            self.n_iter_ += 1
            self.t_ += n
            if self._diverged:
                self.loss_ = np.nan
                self.loss_curve_.append(self.loss_)
                if early_stopping:
                    self.validation_scores_.append(np.nan)
                    self._diverged = False    # the best weights come back below
                break
            self.loss_ = total / n
            self.loss_curve_.append(self.loss_)
            if self.verbose:
                print(f"Iteration {self.n_iter_}, loss = {self.loss_:.8f}")
            self._update_no_improvement_count(early_stopping, X_val, y_val, sw_val)
            if self.solver == "sgd" and self.learning_rate == "invscaling":
                opt.learning_rate = float(self.learning_rate_init) / (self.t_ + 1) ** self.power_t
            if self._no_improvement_count > self.n_iter_no_change:
                what = "Validation score" if early_stopping else "Training loss"
                msg = (f"{what} did not improve more than tol={self.tol:f} for "
                       f"{self.n_iter_no_change} consecutive epochs.")
                if self.solver == "sgd" and self.learning_rate == "adaptive" \
                        and opt.learning_rate > 1e-6:
                    opt.learning_rate = opt.learning_rate / 5.0
                    if self.verbose:
                        print(msg + f" Setting learning rate to {opt.learning_rate:f}")
                    self._no_improvement_count = 0
                else:
                    if self.verbose:
                        print(msg + " Stopping.")
                    break
            if incremental:
                break
            if self.n_iter_ == self.max_iter:
                warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) "
                              "reached and the optimization hasn't converged yet.",
                              ConvergenceWarning, stacklevel=2)
        if early_stopping:
            model.set_weights(self._best_weights)

    def _update_no_improvement_count(self, early_stopping, X_val, y_val, sw_val):
        if early_stopping:
            score = self._score(X_val, y_val, sw_val)
            self.validation_scores_.append(score)
            if self.verbose:
                print(f"Validation score: {score:f}")
            if score < self.best_validation_score_ + self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                self._best_weights = self.model_.get_weights()
        else:
            last = self.loss_curve_[-1]
            if last > self.best_loss_ - self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            self.best_loss_ = min(self.best_loss_, last)

    def _objective(self, theta, X, target, w, s, c_grad, grad):
        """scikit-learn's loss (with gradient terms scaled by c_grad) at the
        flat parameters theta, and its gradient into ``grad`` (float64)."""
        model = self.model_
        model.params[...] = theta
        data = model.forward_backward(X, target, w)
        penalty = self._add_penalty(s)
        grad[...] = model.grads
        return data + 0.5 * self.alpha * penalty / s, data, penalty

    def _fit_lbfgs(self, X, y, sample_weight):
        n = X.shape[0]
        target = self._targets(y, self.model_.dtype)
        c_grad, c_loss = self._scales()
        w, s = self._row_weights(np.empty(n, self.model_.dtype), sample_weight, n, c_grad)
        grad = np.empty(self.model_.params.size)
        last = {}

        def fun(theta):
            value, last["data"], last["penalty"] = self._objective(theta, X, target, w, s,
                                                                   c_grad, grad)
            return value, grad

        def report(intermediate_result):
            # SciPy before 1.11 passes the parameters alone, without the loss
            loss = getattr(intermediate_result, "fun", np.nan)
            self._lbfgs_steps.append(loss)
            print(f"Iteration {len(self._lbfgs_steps)}, loss = {loss:.8f}")

        self._lbfgs_steps = []
        res = scipy.optimize.minimize(
            fun, self.model_.params.astype(np.float64), method="L-BFGS-B", jac=True,
            callback=report if self.verbose else None,
            options={"maxfun": self.max_fun, "maxiter": self.max_iter, "gtol": self.tol})
        del self._lbfgs_steps
        if res.status != 0:
            warnings.warn(f"lbfgs failed to converge after {res.nit} iteration(s) "
                          f"(status={res.status}): {res.message}. Increase the number of "
                          "iterations (max_iter) or scale the data.", ConvergenceWarning,
                          stacklevel=3)
        self.n_iter_ = min(int(res.nit), self.max_iter)
        self.model_.params[...] = res.x
        penalty = sum(float(np.dot(res.x[sl], res.x[sl])) for _, _, sl in self._kernels)
        self.loss_ = float((res.fun - 0.5 * self.alpha * penalty / s) * c_loss / c_grad
                           + 0.5 * self.alpha * penalty / s)

    def _loss_grad_lbfgs(self, packed, X, y, sample_weight, *buffers):
        """scikit-learn's private loss-and-gradient over its own packing of
        the parameters (all coefs_, then all intercepts_), kept so code
        written against it runs; ``buffers`` are not needed."""
        theta = self.model_.params.astype(np.float64)
        theta[self._sk_order] = packed
        y = np.asarray(y)
        y = y.reshape(-1, 1) if y.ndim == 1 else y
        X = np.ascontiguousarray(X, dtype=self.model_.dtype)
        c_grad, _ = self._scales()
        w, s = self._row_weights(np.empty(X.shape[0], self.model_.dtype), sample_weight,
                                 X.shape[0], c_grad)
        grad = np.empty(theta.size)
        value = self._objective(theta, X, self._targets(y, self.model_.dtype), w, s, c_grad,
                                grad)[0]
        return value, grad[self._sk_order]

    # -- prediction -------------------------------------------------------
    def _forward(self, X, check_input=True):
        """The output layer's activations for X (validated unless told not)."""
        if check_input:
            X = validate_data(self, X, accept_sparse=["csr", "csc"], reset=False)
        self._sync_model()
        if scipy.sparse.issparse(X):
            X = X.toarray()
        return self.model_.predict(X, batch_size=max(1, min(X.shape[0], 4096)))

    def _score(self, X, y, sample_weight=None):
        y_pred = self._predict(X, check_input=False)
        if y_pred.dtype.kind == "f" and not np.isfinite(y_pred).all():
            return np.nan
        return float(self._score_function(y, y_pred, sample_weight=sample_weight))

    # -- pickling ---------------------------------------------------------
    def __getstate__(self):
        """The fitted network travels as arrays (its weights, and the
        optimizer's moments and step count), never as a pickled Sequential."""
        model = getattr(self, "model_", None)
        if model is not None:
            self._sync_model()
            model = self.model_
        state = dict(super().__getstate__())
        for key in ("model_", "_optimizer", "_views", "_kernels", "_axpy", "_sk_order",
                    "_units", "coefs_", "intercepts_"):
            state.pop(key, None)
        if model is not None:
            opt = self._optimizer
            state["_fg_network"] = {
                "units": self._units,
                "dtype": model.dtype.name, "seed": model.seed,
                "weights": model.get_weights(),
                "optimizer": {k: v.copy() for k, v in opt.variables().items()},
                "iterations": opt.iterations, "learning_rate": opt.learning_rate,
            }
        return state

    def __setstate__(self, state):
        net = state.pop("_fg_network", None)
        super().__setstate__(state)
        if net is not None:
            self._build(net["units"], net["dtype"], net["seed"])
            self.model_.set_weights(net["weights"])
            opt = self._optimizer
            for k, v in opt.variables().items():
                if k in net["optimizer"]:
                    v[...] = net["optimizer"][k]
            opt.iterations = net["iterations"]
            opt.learning_rate = net["learning_rate"]


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier: scikit-learn's ``MLPClassifier``
    (same parameters, defaults, attributes and methods) trained by fastgrad.

    Softmax outputs and the log-loss for several classes; one logistic output
    for two; one logistic output per label for multilabel indicator targets.
    See the module docstring for the loss, the initialization, the extra
    parameters (``batch_normalization``, ``dropout``, ``clipnorm``,
    ``kernel_initializer``, ``dtype``) and what differs. ``model_`` is the
    fitted fastgrad Sequential (``fg.diagnose(clf.model_, X, labels)``).
    """

    __init__ = _init_with({"hidden_layer_sizes": (100,), "activation": "relu"})
    _score_function = staticmethod(accuracy_score)

    def _out_activation(self):
        return "softmax" if self._label_binarizer.y_type_ == "multiclass" else "logistic"

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                             dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start:
                if set(classes) != set(self.classes_):
                    raise ValueError(
                        "warm_start can only be used where `y` has the same classes as in "
                        f"the previous call to fit. Previously got {self.classes_}, `y` has "
                        f"{classes}")
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` "
                                 f"has {self.classes_}. 'y' has {classes}.")
        return X, self._label_binarizer.transform(y).astype(bool)

    def fit(self, X, y, sample_weight=None):
        """Fit the network to X (n_samples, n_features) and labels y (or a
        multilabel indicator matrix). Returns self."""
        return self._fit(X, y, sample_weight=sample_weight, incremental=False)

    @available_if(lambda est: est._check_solver())
    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """One epoch over (X, y); ``classes`` (all labels) on the first call."""
        if getattr(self, "classes_", None) is None and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit.")
        if classes is not None:
            given = unique_labels(classes)
            if getattr(self, "classes_", None) is not None:
                if not np.array_equal(self.classes_, given):
                    raise ValueError(f"`classes={classes!r}` is not the same as on last call "
                                     f"to partial_fit, was: {self.classes_!r}")
            else:
                self._label_binarizer = LabelBinarizer()
                self._label_binarizer.fit(y if type_of_target(y).startswith("multilabel")
                                          else classes)
                self.classes_ = self._label_binarizer.classes_
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)

    def _check_solver(self):
        if self.solver not in _STOCHASTIC:
            raise AttributeError(f"partial_fit is only available for stochastic optimizers. "
                                 f"{self.solver} is not stochastic.")
        return True

    def predict(self, X):
        """Predicted labels (rows of a 0/1 matrix for multilabel targets)."""
        check_is_fitted(self)
        return self._predict(X)

    def _predict(self, X, check_input=True):
        y_pred = self._forward(X, check_input)
        if self.n_outputs_ == 1:
            y_pred = y_pred.ravel()
        return self._label_binarizer.inverse_transform(y_pred)

    def predict_proba(self, X):
        """Class probabilities, (n_samples, n_classes)."""
        check_is_fitted(self)
        y_pred = self._forward(X)
        if self.n_outputs_ == 1:
            y_pred = y_pred.ravel()
            return np.vstack([1 - y_pred, y_pred]).T
        return y_pred

    def predict_log_proba(self, X):
        """log of predict_proba."""
        proba = self.predict_proba(X)
        return np.log(proba, out=proba)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor: scikit-learn's ``MLPRegressor``
    (same parameters, defaults, attributes and methods) trained by fastgrad.

    Identity outputs and half the squared error; several targets as scikit-learn
    treats them. ``loss="poisson"`` raises ValueError (not in fastgrad yet).
    See the module docstring for the rest; ``model_`` is the fitted fastgrad
    Sequential.
    """

    __init__ = _init_with({"loss": "squared_error", "hidden_layer_sizes": (100,),
                           "activation": "relu"})
    _score_function = staticmethod(r2_score)
    _parameter_constraints: ClassVar[dict] = {**_BaseMLP._parameter_constraints,
                              "loss": [StrOptions({"squared_error", "poisson"})]}

    def _out_activation(self):
        return "identity"

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                             y_numeric=True, dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        return X, y

    def fit(self, X, y, sample_weight=None):
        """Fit the network to X (n_samples, n_features) and y (n_samples,) or
        (n_samples, n_targets). Returns self."""
        return self._fit(X, y, sample_weight=sample_weight, incremental=False)

    @available_if(lambda est: est._check_solver())
    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over (X, y)."""
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)

    _check_solver = MLPClassifier._check_solver

    def predict(self, X):
        """Predicted targets, (n_samples,) or (n_samples, n_targets)."""
        check_is_fitted(self)
        return self._predict(X)

    def _predict(self, X, check_input=True):
        y_pred = self._forward(X, check_input)
        return y_pred.ravel() if y_pred.shape[1] == 1 else y_pred
