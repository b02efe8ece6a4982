#!/usr/bin/env bash
# Build fastgrad with AddressSanitizer and UndefinedBehaviorSanitizer in a
# fresh virtual environment and run the test suite under them. Any sanitizer
# report fails the run. With FUZZ_SECONDS=N set, tests/fuzz/fuzz.py then runs each
# fuzz harness for N seconds under the same build.
# Usage: [FUZZ_SECONDS=N] tests/sanitize/sanitize.sh [pytest arguments]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
python -m pip install --quiet --upgrade pip
# build from a copy, so the sanitized objects never mix with a normal build
mkdir "$work/src"
tar -C "$root" --exclude=./build --exclude=./dist --exclude='*.so' --exclude=./.git -cf - . \
    | tar -C "$work/src" -xf -
# the keras extra (h5py) lets the fuzzers cover the Keras archive loader
FASTGRAD_SANITIZE=1 pip install --quiet "$work/src[test,keras]"
# atheris makes the fuzzers coverage-guided; where it does not install they
# draw their inputs at random
engine=atheris
pip install --quiet atheris || { engine=random; echo "warning: atheris did not install; random fuzzing"; }

libasan=$(gcc -print-file-name=libasan.so)
libubsan=$(gcc -print-file-name=libubsan.so)
log="$work/sanitizer"
# Python itself is not instrumented and keeps memory to the end: leaks are
# not checked; every memory error or undefined behaviour aborts.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:log_path=$log"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$log"
cd "$work"
status=0
# test_vectorization compiles and runs the C kernels itself (for each
# instruction set and under qemu), so it runs no instrumented code here
LD_PRELOAD="$libasan:$libubsan" python -m pytest -q -p no:cacheprovider "$root/tests" \
    --ignore="$root/tests/test_vectorization.py" "$@" || status=$?
if [ "$status" -eq 0 ] && [ -n "${FUZZ_SECONDS:-}" ]; then
    # the fuzzers, for a bounded time each, under the same sanitizers
    LD_PRELOAD="$libasan:$libubsan" python "$root/tests/fuzz/fuzz.py" --target all --engine "$engine" \
        --seconds "$FUZZ_SECONDS" || status=$?
fi
if compgen -G "$log*" > /dev/null; then
    echo "sanitizer reports:"
    cat "$log"*
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "failed: a test failed or a sanitizer stopped the run (exit $status);" \
         "rerun with '-x -s' to see a sanitizer's report on the terminal"
    exit "$status"
fi
echo "sanitizer run: clean"
