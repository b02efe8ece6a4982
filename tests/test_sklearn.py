"""fastgrad.sklearn against scikit-learn itself, and thread control.

On float64 data the estimators draw the same initial weights and batches as
scikit-learn's from the same random_state, and their updates are
scikit-learn's, so the fitted weights must agree with scikit-learn's to
rounding; the hook they train through (Sequential.forward_backward with row
weights) is checked against a float64 NumPy reference.
"""
import pickle
import warnings

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn", reason="needs the sklearn extra: "
                              "pip install '.[sklearn]'")
pytest.importorskip("threadpoolctl", reason="needs the sklearn extra (threadpoolctl): "
                    "pip install '.[sklearn]'")

import sklearn.neural_network as sk_nn
from sklearn.datasets import (
    load_digits,
    make_multilabel_classification,
    make_regression,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks
from threadpoolctl import threadpool_info

import fastgrad as fg
from fastgrad import _core
from fastgrad.sklearn import MLPClassifier, MLPRegressor

X_DIGITS, Y_DIGITS = load_digits(return_X_y=True)
X_DIGITS = X_DIGITS[:400] / 16.0
Y_DIGITS = Y_DIGITS[:400]

# scikit-learn's own checks. Every check passes; a check that fastgrad could
# not pass would be listed here, with its reason, as {check name: reason}.
EXPECTED_FAILED_CHECKS = {"MLPClassifier": {}, "MLPRegressor": {}}


@parametrize_with_checks(
    [MLPClassifier(), MLPRegressor()],
    expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS[type(est).__name__])
def test_scikit_learn_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


def _pair(cls_fg, cls_sk, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return cls_fg(**params), cls_sk(**params)


def _assert_same_fit(a, b, rtol=1e-7, atol=1e-9):
    for x, y in zip(a.coefs_ + a.intercepts_, b.coefs_ + b.intercepts_):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)
    assert a.n_iter_ == b.n_iter_
    np.testing.assert_allclose(a.loss_, b.loss_, rtol=1e-7)
    if hasattr(b, "loss_curve_"):
        np.testing.assert_allclose(a.loss_curve_, b.loss_curve_, rtol=1e-7)


@pytest.mark.parametrize("params", [
    {"solver": "adam", "hidden_layer_sizes": (20, 10), "max_iter": 15, "batch_size": 32},
    {"solver": "sgd", "activation": "tanh", "learning_rate": "invscaling", "max_iter": 10,
     "learning_rate_init": 0.1, "batch_size": 50},
    {"solver": "sgd", "activation": "logistic", "momentum": 0.5, "nesterovs_momentum": False,
     "max_iter": 10, "learning_rate_init": 0.2, "alpha": 0.01},
    {"solver": "adam", "activation": "identity", "early_stopping": True, "max_iter": 30,
     "tol": 1e-3, "n_iter_no_change": 3},
    {"solver": "lbfgs", "hidden_layer_sizes": (15,), "max_iter": 40, "alpha": 1e-3},
], ids=["adam", "sgd-invscaling", "sgd-logistic", "adam-early-stopping", "lbfgs"])
def test_classifier_matches_scikit_learn(params):
    a, b = _pair(MLPClassifier, sk_nn.MLPClassifier, random_state=3, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a.fit(X_DIGITS, Y_DIGITS)
        b.fit(X_DIGITS, Y_DIGITS)
    rtol = 1e-5 if params["solver"] == "lbfgs" else 1e-7   # 40 quasi-Newton steps
    _assert_same_fit(a, b, rtol=rtol, atol=1e-7 if rtol > 1e-7 else 1e-9)
    np.testing.assert_allclose(a.predict_proba(X_DIGITS), b.predict_proba(X_DIGITS),
                               rtol=1e-5, atol=1e-9)
    if params.get("early_stopping"):
        assert a.validation_scores_ == b.validation_scores_
        assert a.best_validation_score_ == b.best_validation_score_


def test_binary_multilabel_and_regression_match_scikit_learn():
    X, Y = make_multilabel_classification(n_samples=120, n_classes=4, random_state=0)
    y2 = Y[:, 0]
    Xr, yr = make_regression(n_samples=150, n_features=6, n_targets=3, noise=5.0,
                             random_state=1)
    yr = yr / yr.std()
    for cls_fg, cls_sk, X_, y_ in ((MLPClassifier, sk_nn.MLPClassifier, X, y2),
                                   (MLPClassifier, sk_nn.MLPClassifier, X, Y),
                                   (MLPRegressor, sk_nn.MLPRegressor, Xr, yr)):
        for solver in ("adam", "lbfgs"):
            a, b = _pair(cls_fg, cls_sk, solver=solver, hidden_layer_sizes=(12,), max_iter=25,
                         random_state=0, batch_size=40)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                a.fit(X_, y_)
                b.fit(X_, y_)
            assert a.out_activation_ == b.out_activation_
            # scikit-learn's lbfgs differentiates half the squared error of all
            # outputs but reports its mean, which its line search sees; fastgrad
            # gives L-BFGS-B the objective whose gradient it returns
            if not (solver == "lbfgs" and cls_fg is MLPRegressor):
                _assert_same_fit(a, b, rtol=1e-6, atol=1e-8)
            else:
                assert a.score(X_, y_) > 0.9 and b.score(X_, y_) > 0.9
            np.testing.assert_array_equal(a.predict(X_).shape, b.predict(X_).shape)


def test_sample_weight_matches_scikit_learn_and_integer_weights_repeat_rows():
    rng = np.random.default_rng(0)
    w = rng.integers(0, 4, size=Y_DIGITS.size).astype(float)
    for solver in ("adam", "sgd", "lbfgs"):
        a, b = _pair(MLPClassifier, sk_nn.MLPClassifier, solver=solver, random_state=1,
                     hidden_layer_sizes=(16,), max_iter=8, batch_size=64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            a.fit(X_DIGITS, Y_DIGITS, sample_weight=w)
            b.fit(X_DIGITS, Y_DIGITS, sample_weight=w)
        _assert_same_fit(a, b, rtol=1e-6, atol=1e-8)
    # full batch: weights 0..3 train exactly like rows repeated that often
    rep = np.repeat(np.arange(w.size), w.astype(int))
    kw = {"solver": "adam", "random_state": 1, "hidden_layer_sizes": (16,), "max_iter": 5,
          "batch_size": rep.size}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # also the batch size clipped to the weighted data
        a = MLPClassifier(**kw).fit(X_DIGITS, Y_DIGITS, sample_weight=w)
        c = MLPClassifier(**kw).fit(X_DIGITS[rep], Y_DIGITS[rep])
    for x, y in zip(a.coefs_, c.coefs_):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)


def test_forward_backward_with_row_weights_matches_numpy():
    """A softmax layer: loss sum_i w_i CE_i / n, dW = x^T (w (p - y)) / n,
    against float64 NumPy; then a two-layer network against repeated rows."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 5))
    labels = rng.integers(0, 3, 9)
    w = rng.uniform(0, 2, 9)
    model = fg.Sequential([fg.layers.Dense(3, activation="softmax", input_dim=5)],
                          dtype="float64", seed=0)
    model.compile("sgd", "sparse_categorical_crossentropy")
    kernel, bias = model.get_weights()
    z = x @ kernel + bias
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(3)[labels]
    ref_loss = np.sum(w * -np.log(p[np.arange(9), labels])) / 9
    delta = w[:, None] * (p - onehot) / 9
    loss = model.forward_backward(x, labels, sample_weight=w)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(model.grads, np.concatenate([(x.T @ delta).ravel(),
                                                            delta.sum(0)]), rtol=1e-10)
    net = fg.Sequential([fg.layers.Dense(4, activation="tanh", input_dim=5),
                         fg.layers.Dense(2, activation="linear")], dtype="float64", seed=0)
    net.compile("sgd", "mse")
    y = rng.standard_normal((9, 2))
    counts = rng.integers(1, 4, 9)
    rep = np.repeat(np.arange(9), counts)
    loss_w = net.forward_backward(x, y, sample_weight=counts)
    g_w = net.grads.copy()
    loss_r = net.forward_backward(x[rep], y[rep])
    n = counts.sum()
    np.testing.assert_allclose(loss_w * 9 / n, loss_r, rtol=1e-12)
    np.testing.assert_allclose(g_w * 9 / n, net.grads, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="sample_weight"):
        net.forward_backward(x, y, sample_weight=np.ones(8))
    with pytest.raises(ValueError, match="sample_weight"):
        net.forward_backward(x, y, sample_weight=np.full(9, np.nan))


def test_lbfgs_gradient_is_the_objectives_by_finite_differences():
    X = X_DIGITS[:30, :12]
    y = Y_DIGITS[:30] % 3
    clf = MLPClassifier(solver="lbfgs", hidden_layer_sizes=(5,), alpha=0.3, max_iter=1,
                        random_state=0, activation="tanh")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    Y = clf._label_binarizer.transform(y)
    theta = np.concatenate([a.ravel() for a in clf.coefs_ + clf.intercepts_])
    grad = clf._loss_grad_lbfgs(theta, X, Y, None)[1]
    eps = 1e-6
    for k in np.random.default_rng(0).choice(theta.size, 25, replace=False):
        e = np.zeros_like(theta)
        e[k] = eps
        num = (clf._loss_grad_lbfgs(theta + e, X, Y, None)[0]
               - clf._loss_grad_lbfgs(theta - e, X, Y, None)[0]) / (2 * eps)
        assert abs(num - grad[k]) < 1e-7


def test_grid_search_over_a_pipeline_in_two_processes_and_the_best_estimator_pickles():
    pipe = make_pipeline(StandardScaler(), MLPClassifier(max_iter=30, random_state=0))
    grid = {"mlpclassifier__hidden_layer_sizes": [(16,), (32,)],
            "mlpclassifier__alpha": [1e-4, 1e-2]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        search = GridSearchCV(pipe, grid, cv=3, n_jobs=2).fit(X_DIGITS, Y_DIGITS)
        serial = GridSearchCV(pipe, grid, cv=3, n_jobs=1).fit(X_DIGITS, Y_DIGITS)
    np.testing.assert_allclose(search.cv_results_["mean_test_score"],
                               serial.cv_results_["mean_test_score"], rtol=1e-12)
    best = search.best_estimator_
    blob = pickle.dumps(best)
    assert b"Sequential" not in blob     # the network travels as arrays
    loaded = pickle.loads(blob)
    np.testing.assert_array_equal(loaded.predict_proba(X_DIGITS), best.predict_proba(X_DIGITS))
    np.testing.assert_array_equal(loaded.predict(X_DIGITS), best.predict(X_DIGITS))


def test_pickled_estimator_resumes_partial_fit_exactly():
    for cls, y in ((MLPClassifier, Y_DIGITS), (MLPRegressor, Y_DIGITS / 9.0)):
        est = cls(hidden_layer_sizes=(10,), random_state=0, max_iter=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(X_DIGITS, y)
        copy = pickle.loads(pickle.dumps(est))
        for e in (est, copy):
            e.partial_fit(X_DIGITS, y)
        for a, b in zip(est.coefs_ + est.intercepts_, copy.coefs_ + copy.intercepts_):
            np.testing.assert_array_equal(a, b)
        assert copy._optimizer.iterations == est._optimizer.iterations


def test_extra_parameters_reach_the_network():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(24, 12), max_iter=40, random_state=0, batch_size=32,
                            batch_normalization=True, dropout=0.1,
                            kernel_initializer="he_normal", dtype="float32")
        clf.fit(X_DIGITS, Y_DIGITS)
        clipped = MLPClassifier(hidden_layer_sizes=(8,), max_iter=1, clipnorm=1e-3)
        clipped.fit(X_DIGITS, Y_DIGITS)
    kinds = [layer.kind for layer in clf.model_.layers]
    assert kinds == ["Dense", "BatchNormalization", "Dropout"] * 2 + ["Dense"]
    assert clf.model_.dtype == np.float32 and all(c.dtype == np.float32 for c in clf.coefs_)
    assert clf.score(X_DIGITS, Y_DIGITS) > 0.9
    # a norm of 1e-3 clips every step, and each tensor's update is clipped to it
    step = clipped.model_.optimizer.last_step
    assert step.clipped and np.all(step.grad_norms * step.clip_scale <= 1e-3 * (1 + 1e-6))
    report = fg.diagnose(clf.model_, X_DIGITS.astype(np.float32),
                         np.searchsorted(clf.classes_, Y_DIGITS))
    assert report.status in ("healthy", "vanishing", "exploding")
    # pickled with batch normalization and dropout, predictions unchanged
    loaded = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(loaded.predict_proba(X_DIGITS), clf.predict_proba(X_DIGITS))


def test_bad_parameters_and_diverging_training_raise_value_error():
    with pytest.raises(ValueError, match="dropout"):
        MLPClassifier(dropout=1.5).fit(X_DIGITS, Y_DIGITS)
    with pytest.raises(ValueError, match="kernel_initializer"):
        MLPClassifier(kernel_initializer="nope").fit(X_DIGITS, Y_DIGITS)
    with pytest.raises(ValueError, match="poisson"):
        MLPRegressor(loss="poisson").fit(X_DIGITS, Y_DIGITS)
    big = np.full((10, 2), 1e300) * np.arange(1, 11)[:, None]
    with pytest.raises(ValueError, match="non-finite"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MLPRegressor().fit(big, np.arange(10.0))


def test_thread_control():
    def scipy_blas_threads():
        return [lib["num_threads"] for lib in threadpool_info()
                if lib["user_api"] == "blas"]

    before, kernels = fg.get_num_threads(), _core.get_kernel_threads()
    with fg.threads(1):
        assert fg.get_num_threads() == 1
        assert set(scipy_blas_threads()) == {1}
        assert _core.get_kernel_threads() == 1     # LayerNormalization's pool too
    assert fg.get_num_threads() == before and _core.get_kernel_threads() == kernels
    with pytest.raises(RuntimeError), fg.threads(1):
        raise RuntimeError
    assert fg.get_num_threads() == before
    try:
        fg.set_num_threads(1)
        assert fg.get_num_threads() == 1 and _core.get_kernel_threads() == 1
    finally:
        fg.set_num_threads(before)
        _core.set_kernel_threads(0)
    assert fg.get_num_threads() == before
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="n: expected a positive integer"):
            fg.set_num_threads(bad)
