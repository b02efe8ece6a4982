"""How many threads the BLAS that fastgrad calls, and fastgrad's own
kernels that split their rows, may use.

fastgrad's matrix products go through SciPy's BLAS (an OpenBLAS in SciPy's
wheels), which starts one thread per core by default; products under 2**21
multiply-adds run on one of its threads whatever the count. fastgrad's own
threads (a small pool, one per core by default) take products of a batch's
rows from 2**19 multiply-adds in shares (one BLAS thread each), the
optimizer's update from 32768 parameters, and from 131072 elements the
activation and LayerNormalization kernels and one-row products; the other
element-wise kernels run on the calling thread. Results do not depend on the count. These
functions set both; for the BLAS they use threadpoolctl
(``pip install threadpoolctl``; scikit-learn depends on it) to read and
change the thread count of every BLAS loaded in the process, SciPy's
included, without touching environment variables. Importing fastgrad
changes nothing.

    fg.set_num_threads(1)          # from now on, one thread
    fg.get_num_threads()           # -> 1
    with fg.threads(2):            # two threads inside the block only
        model.fit(x, y)
"""
import contextlib
import numbers


def _controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        raise ImportError("thread control needs threadpoolctl: pip install threadpoolctl") \
            from None
    from fastgrad import _core  # noqa: F401  (loads SciPy's BLAS, so it is found)
    return ThreadpoolController().select(user_api="blas")


def _count(n):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n: expected a positive integer number of threads, got {n!r}")
    return int(n)


def set_num_threads(n):
    """Let the BLAS and fastgrad's splitting kernels use at most ``n`` threads
    (n >= 1) from now on."""
    n = _count(n)
    _controller().limit(limits=n)
    _kernel_threads(n)


def _kernel_threads(n):
    from fastgrad import _core
    old = _core.get_kernel_threads()
    _core.set_kernel_threads(min(n, 64))   # the pool's limit
    return old


def get_num_threads():
    """The BLAS thread count (the largest among the BLAS libraries loaded,
    which set_num_threads makes all equal)."""
    info = _controller().info()
    return max((lib["num_threads"] for lib in info), default=1)


@contextlib.contextmanager
def threads(n):
    """Limit the BLAS and fastgrad's splitting kernels to ``n`` threads inside a
    ``with`` block; the previous counts come back on leaving it, also after
    an exception."""
    limiter = _controller().limit(limits=_count(n))
    old = _kernel_threads(n)
    try:
        yield
    finally:
        _kernel_threads(old)
        limiter.restore_original_limits()
