"""Interrupts, forks, long runs and memory: what happens to a model when the
process around it misbehaves."""
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastgrad as fg


def _model(seed=0, bn=True, dropout=True):
    layers = [fg.layers.Dense(32, activation="relu", input_dim=8)]
    if bn:
        layers.append(fg.layers.BatchNormalization())
    if dropout:
        layers.append(fg.layers.Dropout(0.2, seed=3))
    layers.append(fg.layers.Dense(3, activation="softmax"))
    model = fg.Sequential(layers, seed=seed)
    model.compile(fg.optimizers.Adam(1e-2, global_clipnorm=1.0),
                  "sparse_categorical_crossentropy")
    return model


def _data(n=256):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    y = rng.integers(0, 3, n)
    return x, y


def _everything(model):
    """Weights (moving statistics included), optimizer moments and counters."""
    out = [w.copy() for w in model.get_weights()]
    out += [v.copy() for _, v in sorted(model.optimizer.variables().items())]
    out += [np.array([model.optimizer.iterations])]
    out += [np.array([layer.counter]) for layer in model.layers if hasattr(layer, "counter")]
    return out


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))


def _replay(steps, x, y, batch_size):
    """A fresh model trained for exactly ``steps`` batches without interruption."""
    model = _model()
    n = x.shape[0]
    per_epoch = -(-n // batch_size)
    epochs = -(-steps // per_epoch) if steps else 0
    if steps:
        model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=False, verbose=0,
                  callbacks=[_StopAt(steps)])
    return model


class _StopAt(fg.callbacks.Callback):
    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def on_batch_end(self, batch, logs=None):
        if self.model.optimizer.iterations >= self.steps:
            self.model.stop_training = True


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer (POSIX)")
@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signals reach the main thread only")
def test_keyboard_interrupt_during_fit_leaves_a_completed_step():
    """Ctrl-C at random moments: each time the model is exactly the model
    after some whole number of steps (weights, moments, moving statistics and
    dropout counters agree), and fit runs again afterwards."""
    x, y = _data()
    rng = np.random.default_rng(7)
    interrupted = 0
    # a timer signal whose handler sends SIGINT, as Ctrl-C would: no thread
    # of the test's own is running when it lands
    previous = signal.signal(signal.SIGALRM, lambda *_: signal.raise_signal(signal.SIGINT))
    # Python's own Ctrl-C handler, also where the test process started with
    # SIGINT ignored (a command run in the background by a shell)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for trial in range(40):
            model = _model()
            try:
                signal.setitimer(signal.ITIMER_REAL, float(rng.uniform(1e-4, 0.02)))
                model.fit(x, y, epochs=50, batch_size=16, shuffle=False, verbose=0)
                signal.setitimer(signal.ITIMER_REAL, 0)
                continue
            except KeyboardInterrupt:
                interrupted += 1
            steps = model.optimizer.iterations
            reference = _replay(steps, x, y, 16)
            assert _same(_everything(model), _everything(reference)), (
                f"trial {trial}: interrupted after {steps} steps, the state is not that "
                f"of {steps} whole steps")
            model.fit(x, y, epochs=1, batch_size=16, verbose=0)    # still usable
            assert model.optimizer.iterations == steps + 16
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        signal.signal(signal.SIGINT, previous_int)
    assert interrupted >= 20


_FORK_SCRIPT = """
import multiprocessing, sys
import numpy as np
import fastgrad as fg

def data(n):
    rng = np.random.default_rng(1)
    return rng.standard_normal((n, 8)).astype(np.float32), rng.integers(0, 3, n)

def small(queue):
    x, y = data(128)
    model = fg.Sequential([fg.layers.Dense(32, activation="relu", input_dim=8),
                           fg.layers.BatchNormalization(), fg.layers.Dropout(0.2, seed=3),
                           fg.layers.Dense(3, activation="softmax")], seed=5)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    queue.put([float(w.sum()) for w in model.get_weights()])

if __name__ == "__main__":
    x, y = data(4096)
    big = fg.Sequential([fg.layers.Dense(512, activation="relu", input_dim=8),
                         fg.layers.Dense(512, activation="relu"),
                         fg.layers.Dense(3, activation="softmax")], seed=0)
    big.compile("adam", "sparse_categorical_crossentropy")
    big.fit(x, y, epochs=1, batch_size=1024, verbose=0)   # BLAS threads are running
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=small, args=(queue,))
    child.start()
    child.join(120)
    if child.is_alive():
        child.kill()
        sys.exit("the forked child hung while training")
    assert child.exitcode == 0, child.exitcode
    forked = queue.get(timeout=10)
    small(queue)                      # the same training in this process
    assert forked == queue.get(timeout=10), "the child trained to other weights"
    print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the fork start method is POSIX only")
def test_a_process_forked_after_training_trains_without_hanging(tmp_path):
    # a fresh interpreter: the fork must find only fastgrad's and its BLAS's
    # threads, not those of whatever else the test session imported
    script = tmp_path / "fork_after_training.py"
    script.write_text(_FORK_SCRIPT)
    # the fastgrad this session imports, installed or built in place
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fg.__file__)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# AddressSanitizer (tests/sanitize/sanitize.sh) keeps freed memory in a
# quarantine and replaces the allocator: resident size and failed
# allocations then describe the sanitizer, not fastgrad
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
@pytest.mark.skipif(UNDER_ASAN, reason="AddressSanitizer's quarantine holds freed memory")
def test_resident_memory_stays_flat_over_100000_steps_of_fit():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((10_000, 8)).astype(np.float32)
    y = rng.integers(0, 3, 10_000)
    model = _model()
    model.compile(fg.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, epochs=2, batch_size=10, verbose=0)      # warm: buffers, caches
    before = _rss_bytes()
    model.fit(x, y, epochs=100, batch_size=10, verbose=0)    # 100,000 steps
    grown = _rss_bytes() - before
    assert model.optimizer.iterations == 102_000
    # the history's per-epoch lists grow by a few kB; 4 MB is far below
    # what even one leaked batch-sized array per step would add (~32 MB)
    assert grown < 4 << 20, f"resident size grew by {grown / 2**20:.1f} MiB"


@pytest.mark.skipif(UNDER_ASAN, reason="AddressSanitizer replaces the allocator and "
                                        "reports the refused allocation")
def test_a_batch_too_large_for_memory_raises_and_changes_nothing():
    x, y = _data(64)
    model = _model()
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    before = _everything(model)
    # 2**40 rows of 8 features: a stride-0 view that no copy or work buffer fits
    huge_x = np.broadcast_to(x[:1], (1 << 40, 8))
    huge_y = np.broadcast_to(y[:1], (1 << 40,))
    for call in (lambda: model.fit(huge_x, huge_y, epochs=1, batch_size=1 << 40, verbose=0),
                 lambda: model.predict(huge_x, batch_size=1 << 40),
                 lambda: model.train_on_batch(huge_x, huge_y)):
        with pytest.raises((MemoryError, ValueError)):
            call()
        assert _same(_everything(model), before)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)     # still usable
    assert model.optimizer.iterations == 4
