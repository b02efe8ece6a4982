"""Hyperparameter search on a Dask cluster: joblib's "dask" backend runs
GridSearchCV's and RandomizedSearchCV's fits on the cluster's workers. A
local cluster of two single-threaded worker processes must give exactly the
results of the sequential run."""
import os
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="needs the sklearn extra: pip install '.[sklearn]'")
distributed = pytest.importorskip("dask.distributed",
                                  reason="needs the dask extra: pip install '.[dask]'")
joblib = pytest.importorskip("joblib", reason="needs the sklearn extra (joblib): "
                             "pip install '.[sklearn]'")

from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, RandomizedSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import fastgrad as fg
from fastgrad.sklearn import MLPClassifier

pytestmark = pytest.mark.slow


def _put_on_path(folder):
    """Run on each worker: import fastgrad from where this process does."""
    if folder not in sys.path:
        sys.path.insert(0, folder)


def _searches():
    pipe = make_pipeline(StandardScaler(), MLPClassifier(max_iter=15, random_state=0))
    grid = GridSearchCV(pipe, {"mlpclassifier__hidden_layer_sizes": [(16,), (32,)],
                               "mlpclassifier__alpha": [1e-4, 1e-1]}, cv=3)
    rand = RandomizedSearchCV(pipe, {"mlpclassifier__learning_rate_init": [1e-3, 3e-3, 1e-2],
                                     "mlpclassifier__batch_size": [16, 64]},
                              n_iter=3, cv=2, random_state=0)
    return grid, rand


def test_search_on_a_local_cluster_equals_the_sequential_run():
    X, y = load_digits(return_X_y=True)
    X, y = X[:500], y[:500]
    here = os.path.dirname(os.path.dirname(os.path.abspath(fg.__file__)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # the workers use one BLAS thread each; so does the reference run
        with fg.threads(1):
            sequential = [s.fit(X, y) for s in _searches()]
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, \
                distributed.Client(cluster) as client:
            client.run(_put_on_path, here)
            with joblib.parallel_backend("dask"):
                on_cluster = [s.fit(X, y) for s in _searches()]
    for a, b in zip(on_cluster, sequential):
        for key in ("mean_test_score", "split0_test_score", "split1_test_score", "params"):
            assert list(a.cv_results_[key]) == list(b.cv_results_[key]), key
        assert a.best_params_ == b.best_params_
        np.testing.assert_array_equal(a.best_estimator_.predict_proba(X),
                                      b.best_estimator_.predict_proba(X))
