"""``fastgrad demo`` (or ``python -m fastgrad demo``): vanishing and exploding
gradients and their cures, diagnosed; ``fastgrad example``: a small
classifier."""
import argparse
import sys
import time

import numpy as np


def example(seed=0):
    import fastgrad as fg

    rng = np.random.default_rng(seed)
    # Three classes separated by random hyperplanes in 20 dimensions.
    x = rng.standard_normal((6000, 20)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((20, 3)), axis=1)
    model = fg.Sequential([
        fg.layers.Dense(64, activation="relu", kernel_initializer="he_normal", input_dim=20),
        fg.layers.Dense(64, activation="relu", kernel_initializer="he_normal"),
        fg.layers.Dense(3, activation="softmax"),
    ], seed=seed)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.summary()
    t0 = time.perf_counter()
    model.fit(x[:5000], y[:5000], epochs=5, batch_size=64, verbose=2)
    loss, acc = model.evaluate(x[5000:], y[5000:], verbose=0)
    print(f"held-out loss {loss:.4f}, accuracy {acc:.3f} "
          f"({time.perf_counter() - t0:.2f}s)")
    return acc


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastgrad")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a 20-layer network trained six ways, diagnosed")
    demo.add_argument("--plot", metavar="PATH", help="save a figure comparing the cases")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=10)
    ex = sub.add_parser("example", help="train a small classifier on generated data")
    ex.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from fastgrad import demo as demo_mod
        demo_mod.run(args.seed, args.epochs, args.plot)
    elif args.command == "example":
        example(args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
