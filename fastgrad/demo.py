"""``fastgrad demo``: the same 20-layer dense network, trained
six ways on data it generates, each diagnosed before training.

1. sigmoid, Glorot initialization          the gradient vanishes
2. ReLU, He initialization                 cured by the activation and init
3. sigmoid with BatchNormalization         cured by normalization
4. ReLU, oversized N(0, 0.25^2) init       the gradient explodes
5. the same with global_clipnorm=1.0       tamed by clipping
6. sigmoid, then LayerNormalization        cured by normalizing each row,
                                           which needs no batch statistics
"""
import time

import numpy as np

DEPTH, WIDTH, FEATURES, CLASSES = 20, 64, 32, 4


def _data(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4000, FEATURES)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((FEATURES, CLASSES)), axis=1)
    return x[:3000], y[:3000], x[3000:], y[3000:]


def _model(kind, seed):
    import fastgrad as fg

    L, layers = fg.layers, []
    for i in range(DEPTH - 1):
        first = {"input_dim": FEATURES} if i == 0 else {}
        if kind == "sigmoid":
            layers.append(L.Dense(WIDTH, activation="sigmoid", **first))
        elif kind == "relu_he":
            layers.append(L.Dense(WIDTH, activation="relu", kernel_initializer="he_normal",
                                  **first))
        elif kind == "sigmoid_bn":
            layers += [L.Dense(WIDTH, use_bias=False, **first), L.BatchNormalization(),
                       L.Activation("sigmoid")]
        elif kind == "sigmoid_ln":
            # each row of sigmoid outputs centred and scaled: the next layer
            # sees no common offset of 0.5 (which LayerNormalization before
            # the sigmoid would keep, a row's mean being per sample)
            layers += [L.Dense(WIDTH, activation="sigmoid", **first), L.LayerNormalization()]
        else:
            layers.append(L.Dense(WIDTH, activation="relu", **first,
                                  kernel_initializer=fg.initializers.RandomNormal(stddev=0.25)))
    layers.append(L.Dense(CLASSES, activation="softmax"))
    return fg.Sequential(layers, seed=seed)


CASES = [
    ("sigmoid + glorot_uniform", "sigmoid", dict(learning_rate=0.01)),
    ("relu + he_normal", "relu_he", dict(learning_rate=0.01)),
    ("sigmoid + BatchNormalization", "sigmoid_bn", dict(learning_rate=0.01)),
    ("relu + random_normal(0.25), no clipping", "relu_big", dict(learning_rate=0.03)),
    ("relu + random_normal(0.25), global_clipnorm=1.0", "relu_big",
     dict(learning_rate=0.03, global_clipnorm=1.0)),
]
CASES.append(("sigmoid, then LayerNormalization", "sigmoid_ln", dict(learning_rate=0.01)))


def cases():
    """The cases the demo trains: (title, kind, optimizer settings)."""
    return CASES


def run(seed=0, epochs=10, plot=None, out=print):
    import fastgrad as fg

    x, y, xt, yt = _data(seed)
    results = []
    t_all = time.perf_counter()
    for title, kind, opt in cases():
        model = _model(kind, seed)
        model.compile(fg.optimizers.SGD(momentum=0.9, **opt),
                      "sparse_categorical_crossentropy", metrics=["accuracy"])
        report = fg.diagnose(model, x[:256], y[:256])
        out(f"\n=== {title}  (SGD lr={opt['learning_rate']}, momentum 0.9) ===")
        out(str(report))
        t0 = time.perf_counter()
        hist = model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
        loss, acc = model.evaluate(xt, yt, verbose=0)
        h, clip = hist.history, hist.gradients["clip_rate"]
        out(f"after {epochs} epochs ({time.perf_counter() - t0:.1f}s): train loss "
            f"{h['loss'][-1]:.4g}, held-out accuracy {acc:.3f} (chance {1 / CLASSES:.2f}), "
            f"steps clipped {clip[-1]:.0%}")
        results.append((title, report, acc, h["loss"][-1], float(np.mean(clip))))
    out("\n=== summary ===  (diagnosis and gradient norms at the start; the rest after "
        "training)")
    out(f"{'case':<50} {'diagnosis':<10} {'first/last grad norm':>21} {'clipped':>8} "
        f"{'loss':>7} {'accuracy':>9}")
    for title, report, acc, loss, clip in results:
        d = [r for r in report.layers if r.kind == "Dense"]
        out(f"{title:<50} {report.status:<10} {d[0].grad_norm:>9.2g} / {d[-1].grad_norm:<9.2g} "
            f"{clip:>8.0%} {loss:>7.4g} {acc:>9.3f}")
    out(f"total {time.perf_counter() - t_all:.1f}s")
    if plot:
        _plot(results, plot)
        out(f"figure saved to {plot}")
    return results


def _plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('--plot needs matplotlib: pip install "fastgrad[plot]"') from None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for title, report, acc, *_ in results:
        g = [r.grad_norm for r in report.layers if r.kind == "Dense"]
        ax.plot(range(1, len(g) + 1), g, marker="o", ms=3,
                label=f"{title} ({report.status}, acc {acc:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("Dense layer (input side first)")
    ax.set_ylabel("kernel gradient L2 norm at initialization")
    ax.set_title("Vanishing and exploding gradients, and their cures")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
