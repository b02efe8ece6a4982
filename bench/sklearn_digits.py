"""fastgrad.sklearn.MLPClassifier against scikit-learn's MLPClassifier on
scikit-learn's bundled digits.

Case: the 1797 8x8 digits scaled to [0, 1] in float32, split 75/25
(stratified, random_state=0); a 64-256-128-10 ReLU network, Adam
(learning_rate_init=0.001), batch 32, exactly 30 epochs (tol=0 and
n_iter_no_change=30, so neither stops early), the same random_state on both
sides. Each side is fitted ``--repeats`` times, alternating; printed: the
median fit time in seconds, the test accuracy (the same each repeat, since
the seed is fixed) and sk/fg = scikit-learn's time / fastgrad's (> 1:
fastgrad faster). The BLAS thread count is printed and can be set with
``--threads``. Needs scikit-learn (and threadpoolctl, which it brings).

Usage: python bench/sklearn_digits.py [--repeats N] [--threads N] [--json PATH]
"""
import argparse
import json
import os
import statistics
import sys
import time
import warnings


PARAMS = {"hidden_layer_sizes": (256, 128), "solver": "adam", "batch_size": 32,
          "max_iter": 30, "tol": 0.0, "n_iter_no_change": 30, "random_state": 0}


def _digits():
    """(X_train, X_test, y_train, y_test) of the case's split."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    return train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)


def _estimator(impl):
    if impl == "fastgrad":
        try:
            import fastgrad  # noqa: F401
        except ImportError:   # not installed: the checkout this file belongs to
            sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from fastgrad.sklearn import MLPClassifier
    else:
        from sklearn.neural_network import MLPClassifier
    return MLPClassifier(**PARAMS)


def _fit_quietly(clf, X, y):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clf.fit(X, y)


def make(impl):
    """bench/run.py's case: one side's fit, timed in its own process."""
    import numpy as np

    X_tr, X_te, y_tr, y_te = _digits()

    def fit():
        return _fit_quietly(_estimator(impl), X_tr, y_tr)
    return {"run": fit, "result": {"accuracy": np.array(fit().score(X_te, y_te))}}


CASES = [{"name": "digits/fit", "make": make, "impls": ("fastgrad", "sklearn"),
          "reference": "sklearn", "tolerance": 0.005, "samples": 2,
          "needs": {"fastgrad": ("sklearn",), "sklearn": ("sklearn",)}}]


def digits_case(repeats=3):
    """Both sides in this process, alternating: {"fastgrad"/"sklearn":
    {"seconds", "accuracy"}, "speedup", "accuracy_gap_points"}."""
    X_tr, X_te, y_tr, y_te = _digits()
    times = {"fastgrad": [], "sklearn": []}
    accuracy = {}
    for _ in range(repeats):
        for name in times:
            clf = _estimator(name)
            t0 = time.perf_counter()
            _fit_quietly(clf, X_tr, y_tr)
            times[name].append(time.perf_counter() - t0)
            accuracy[name] = float(clf.score(X_te, y_te))
    out = {k: {"seconds": statistics.median(v), "accuracy": accuracy[k]}
           for k, v in times.items()}
    out["speedup"] = out["sklearn"]["seconds"] / out["fastgrad"]["seconds"]
    out["accuracy_gap_points"] = 100 * (out["fastgrad"]["accuracy"] - out["sklearn"]["accuracy"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="BLAS threads (default: as found)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    try:   # an installed fastgrad, else this checkout's (built in place)
        import fastgrad as fg
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import fastgrad as fg

    if args.threads is not None:
        fg.set_num_threads(args.threads)
    res = digits_case(args.repeats)
    print(f"digits 64-256-128-10, Adam, batch 32, 30 epochs; BLAS threads: "
          f"{fg.get_num_threads()}; median of {args.repeats}")
    print(f"{'':10}{'seconds':>10}{'accuracy':>10}")
    for name in ("fastgrad", "sklearn"):
        print(f"{name:10}{res[name]['seconds']:10.3f}{res[name]['accuracy']:10.4f}")
    print(f"sk/fg = {res['speedup']:.2f}; accuracy fastgrad - sklearn = "
          f"{res['accuracy_gap_points']:+.2f} points")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
