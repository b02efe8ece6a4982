"""Build of the compiled core: one extension, fastgrad._core, from the Cython
wrappers in fastgrad/ and the C kernels in csrc/. BLAS comes from SciPy's
cython_blas, so nothing links against a BLAS at build time.

FASTGRAD_DEBUG=1 turns Cython's bounds and None checks back on and builds
without optimization. FASTGRAD_SANITIZE=1 builds with AddressSanitizer and
UndefinedBehaviorSanitizer (run Python with libasan preloaded; see
tests/sanitize.sh)."""
import os

from setuptools import Extension, setup


def extensions():
    from Cython.Build import cythonize

    debug = os.environ.get("FASTGRAD_DEBUG", "") not in ("", "0")
    sanitize = os.environ.get("FASTGRAD_SANITIZE", "") not in ("", "0")
    directives = {
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": debug,
        "initializedcheck": debug,
        "cdivision": True,
        "embedsignature": True,
    }
    # -fno-math-errno lets sqrt and friends vectorize; nothing reads errno.
    # -ffp-contract=off: no fused multiply-add, so the AVX-512, AVX2 and
    # baseline builds of each kernel round alike.
    cflags = ["-O0", "-g"] if debug else ["-O3", "-fno-math-errno", "-ffp-contract=off"]
    ldflags = []
    if sanitize:
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
               "-fno-omit-frame-pointer", "-g"]
        cflags += san
        ldflags += san
    core = Extension(
        "fastgrad._core",
        sources=["fastgrad/_core.pyx", "csrc/fastgrad.c"],
        include_dirs=["csrc"],
        depends=["csrc/fastgrad.h", "csrc/fastgrad_impl.h", "fastgrad/_kernels.pxd"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    return cythonize([core], compiler_directives=directives)


setup(ext_modules=extensions())
