"""Build of the compiled core: one extension, fastgrad._core, from the Cython
wrappers in fastgrad/ and the C kernels in csrc/. BLAS comes from SciPy's
cython_blas, so nothing links against a BLAS at build time.

FASTGRAD_DEBUG=1 turns Cython's bounds and None checks back on and builds
without optimization. FASTGRAD_SANITIZE=1 builds with AddressSanitizer and
UndefinedBehaviorSanitizer (GCC or Clang; run Python with libasan preloaded,
see tests/sanitize/sanitize.sh). CFLAGS from the environment come after these flags,
so ``CFLAGS="-march=x86-64-v3 -DFG_NO_CLONES"`` builds for one instruction set."""
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


def _compile_flags(compiler_type):
    """(compile, link) flags for the compiler setuptools picked."""
    debug, sanitize = _flag("FASTGRAD_DEBUG"), _flag("FASTGRAD_SANITIZE")
    if compiler_type == "msvc":
        # /fp:precise never contracts a * b + c into a fused multiply-add,
        # so every build rounds alike; the sanitizers are GCC/Clang only
        if sanitize:
            raise SystemExit("FASTGRAD_SANITIZE=1 needs GCC or Clang")
        return (["/Od", "/Zi"] if debug else ["/O2", "/fp:precise"]), []
    # -fno-math-errno lets sqrt and friends vectorize; nothing reads errno.
    # -ffp-contract=off: no fused multiply-add, so the AVX-512, AVX2 and
    # baseline builds of each kernel round alike.
    cflags = ["-O0", "-g"] if debug else ["-O3", "-fno-math-errno", "-ffp-contract=off"]
    # POSIX threads for the kernels that split their rows (csrc/fastgrad.c)
    cflags.append("-pthread")
    ldflags = ["-pthread"]
    if sanitize:
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
               "-fno-omit-frame-pointer", "-g"]
        cflags += san
        ldflags += san
    return cflags, ldflags


class BuildExt(build_ext):
    """Chooses the flags once the compiler is known."""

    def build_extensions(self):
        cflags, ldflags = _compile_flags(self.compiler.compiler_type)
        for ext in self.extensions:
            ext.extra_compile_args = cflags + ext.extra_compile_args
            ext.extra_link_args = ldflags + ext.extra_link_args
        super().build_extensions()


def extensions():
    from Cython.Build import cythonize

    debug = _flag("FASTGRAD_DEBUG")
    directives = {
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": debug,
        "initializedcheck": debug,
        "cdivision": True,
        "embedsignature": True,
    }
    core = Extension(
        "fastgrad._core",
        sources=["fastgrad/_core.pyx", "csrc/fastgrad.c"],
        include_dirs=["csrc"],
        depends=["csrc/fastgrad.h", "csrc/fastgrad_impl.h", "csrc/fastgrad_exp.h",
                 "fastgrad/_kernels.pxd"],
    )
    return cythonize([core], compiler_directives=directives)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
