"""The hot element loops of csrc/ vectorize on every target.

csrc/fastgrad_impl.h marks each such loop with a trailing ``/* vec */``
comment (``/* vec f32 */``: the float instantiation only). For each target
this test compiles csrc/fastgrad.c with the extension's flags, asks GCC for
its optimization record (-fsave-optimization-record, the same facts as
-fopt-info-vec but with the function each loop ended up in), and fails when a
marked loop is not vectorized in the _f32 or _f64 kernel it belongs to.
Targets: baseline x86-64 (SSE2), x86-64-v3 (AVX2), x86-64-v4 (AVX-512), the
x86-64 build with its AVX-512/AVX2/baseline clones, and aarch64 (NEON) with
the cross compiler aarch64-linux-gnu-gcc (Debian: gcc-aarch64-linux-gnu).
"""
import gzip
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
# setup.py's optimization flags for the kernels
CFLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off"]
MARK = re.compile(r"/\* vec( f32)? \*/\s*$")

# name: (compiler, flags, clone suffixes the record's function names carry)
TARGETS = {
    "x86-64": ("gcc", ["-march=x86-64", "-DFG_NO_CLONES"], [""]),
    "x86-64-v3": ("gcc", ["-march=x86-64-v3", "-DFG_NO_CLONES"], [""]),
    "x86-64-v4": ("gcc", ["-march=x86-64-v4", "-DFG_NO_CLONES"], [""]),
    "x86-64-clones": ("gcc", [], [".avx512f", ".avx2", ".default"]),
    "aarch64": ("aarch64-linux-gnu-gcc", [], [""]),
}


def marked_loops():
    """{line: suffixes} for each marked loop of fastgrad_impl.h."""
    loops = {}
    text = (CSRC / "fastgrad_impl.h").read_text().splitlines()
    for number, line in enumerate(text, 1):
        m = MARK.search(line)
        if m:
            loops[number] = ("_f32",) if m.group(1) else ("_f32", "_f64")
    return loops


def compiler_for(target):
    cc, flags, clones = TARGETS[target]
    if shutil.which(cc) is None:
        pytest.skip(f"needs the compiler {cc}"
                    + (" (Debian: gcc-aarch64-linux-gnu)" if "aarch64" in cc else ""))
    machine = subprocess.run([cc, "-dumpmachine"], capture_output=True, text=True,
                             check=False).stdout
    want = "aarch64" if target == "aarch64" else "x86_64"
    if not machine.startswith(want):
        pytest.skip(f"{cc} targets {machine.strip()}, not {want}: needs a {want} GCC")
    return cc, flags, clones


def optimization_record(cc, flags, tmp_path):
    """The compiler's records for csrc/fastgrad.c, built for one target."""
    cmd = [cc, *CFLAGS, *flags, f"-I{CSRC}", "-c", str(CSRC / "fastgrad.c"),
           "-o", "fastgrad.o", "-fopt-info-vec-optimized", "-fsave-optimization-record"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stderr}"
    files = list(tmp_path.glob("*.opt-record.json.gz"))
    assert len(files) == 1, f"no optimization record from {cc}: {sorted(tmp_path.iterdir())}"
    with gzip.open(files[0], "rt") as f:
        return json.load(f)[2]


def vectorized(records):
    """{(line, function)} of loops of fastgrad_impl.h the compiler vectorized."""
    done = set()
    for r in records:
        loc = r.get("location", {})
        text = "".join(m if isinstance(m, str) else "" for m in r.get("message", []))
        if (r.get("kind") == "success" and loc.get("file", "").endswith("fastgrad_impl.h")
                and text.startswith("loop vectorized")):
            done.add((loc["line"], r.get("function", "")))
    return done


def test_markers_are_found():
    """The markers sit on the loops this file is about (a marker lost in an
    edit would otherwise pass unnoticed)."""
    source = (CSRC / "fastgrad_impl.h").read_text().splitlines()
    marked = ["\n".join(source[line - 1:line + 2]) for line in marked_loops()]
    for loop in ["EXP_NONPOS(y[k])", "r[j] - m", "r[j] *= inv", "g[j] - dot",
                 "+ bias[j]", "S(sigmoid)(x[k])", "x[k] * S(sigmoid)", "TANH(x[k])",
                 "em = EXPM1_NONPOS", "(T)(FG_SELU_SCALE * FG_SELU_ALPHA) * em",
                 "GELU(x[k])", "GELU_GRAD(z[k])", "S(sigmoid)(z[k])", "a * g[k]",
                 "g[k] * (y[k] + a)", "(T)1 - y[k] * y[k]", "acc[j] += d[i * O + j]",
                 "fg_splitmix64", "EXP_NONPOS(z[j] - m)", "fg_select_f64(z > 0, z, 0.0)",
                 "S(mish_parts)(zk", "fg_log_f64(qc)", "fg_log_f64(om[j])", "fg_expm1_nonpos_f64(-a)"]:
        assert any(loop in text for text in marked), f"no marked loop holds {loop}"


@pytest.mark.parametrize("target", list(TARGETS))
def test_marked_loops_vectorize(target, tmp_path):
    cc, flags, clones = compiler_for(target)
    # with the clones, float and double are compiled apart (-DFG_ONLY_...):
    # GCC cannot write a record of both, larger than its 2 GB limit
    parts = [["-DFG_ONLY_F32"], ["-DFG_ONLY_F64"]] if len(clones) > 1 else [[]]
    done = set()
    for k, extra in enumerate(parts):
        (tmp_path / str(k)).mkdir()
        done |= vectorized(optimization_record(cc, [*flags, *extra], tmp_path / str(k)))
    assert done, f"{cc} reported no vectorized loop at all"
    source = (CSRC / "fastgrad_impl.h").read_text().splitlines()
    missing = []
    for line, types in sorted(marked_loops().items()):
        for t in types:
            for clone in clones:
                if not any(ln == line and fn.endswith(t + clone) for ln, fn in done):
                    missing.append(f"fastgrad_impl.h:{line} ({t}{clone}): "
                                   f"{source[line - 1].strip()}")
    assert not missing, f"not vectorized by {cc} {' '.join(flags)}:\n" + "\n".join(missing)


# --- bit-for-bit agreement of the builds -------------------------------------

HARNESS = ROOT / "tests" / "kernels_harness.c"
# x86-64 levels and the CPU flags (as /proc/cpuinfo names them) each needs
LEVELS = {
    "x86-64": (["-march=x86-64", "-DFG_NO_CLONES"], set()),
    "x86-64-v3": (["-march=x86-64-v3", "-DFG_NO_CLONES"],
                  {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe"}),
    "x86-64-v4": (["-march=x86-64-v4", "-DFG_NO_CLONES"],
                  {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    "x86-64-clones": ([], set()),
}


def cpu_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def sections(data):
    """[(name, bytes)] of the harness's output."""
    out, i = [], 0
    while i < len(data):
        j = data.index(b"\n", i)
        n = int.from_bytes(data[j + 1:j + 9], "little")
        out.append((data[i:j].decode(), data[j + 9:j + 9 + n]))
        i = j + 9 + n
    assert i == len(data), "truncated harness output"
    return out


def build_and_run(cc, flags, tmp_path, name, runner=()):
    exe = tmp_path / name
    cmd = [cc, *CFLAGS, *flags, f"-I{CSRC}", str(HARNESS), str(CSRC / "fastgrad.c"),
           "-lm", "-pthread", "-o", str(exe)]
    built = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert built.returncode == 0, f"{' '.join(cmd)} failed:\n{built.stderr}"
    run = subprocess.run([*runner, str(exe)], capture_output=True, timeout=600, check=False)
    assert run.returncode == 0, f"{name} exited with {run.returncode}: {run.stderr[-2000:]!r}"
    return sections(run.stdout)


def differences(got, want, skip_prefix=None):
    assert [n for n, _ in got] == [n for n, _ in want], "the builds wrote different sections"
    return [f"section {k}: {name}" for k, ((name, a), (_, b)) in enumerate(zip(got, want))
            if a != b and not (skip_prefix and name.startswith(skip_prefix))]


@pytest.fixture(scope="module")
def x86_outputs(tmp_path_factory):
    cc = compiler_for("x86-64")[0]
    tmp = tmp_path_factory.mktemp("harness")
    have = cpu_flags()
    return {level: build_and_run(cc, flags, tmp, level)
            for level, (flags, needs) in LEVELS.items() if needs <= have}


def test_x86_levels_agree_bit_for_bit(x86_outputs):
    base = x86_outputs["x86-64"]
    assert len(base) > 300
    for level, out in x86_outputs.items():
        assert not differences(out, base), f"{level} differs from baseline x86-64"
    if len(x86_outputs) < len(LEVELS):
        pytest.skip("this CPU runs only " + ", ".join(x86_outputs))


def test_aarch64_agrees_with_x86_64_bit_for_bit(x86_outputs, tmp_path):
    cc = compiler_for("aarch64")[0]
    qemu = shutil.which("qemu-aarch64")
    if qemu is None:
        pytest.skip("needs qemu-aarch64 (Debian: qemu-user)")
    sysroot = Path("/usr/aarch64-linux-gnu")
    if not (sysroot / "lib").is_dir():
        pytest.skip("needs the aarch64 C library in /usr/aarch64-linux-gnu "
                    "(Debian: libc6-dev-arm64-cross)")
    got = build_and_run(cc, [], tmp_path, "harness-aarch64", [qemu, "-L", str(sysroot)])
    # GELU in double calls the C library's erfc: glibc's last bits differ
    # between x86-64 and aarch64, so those sections ("libm ...") are left out
    diff = differences(got, x86_outputs["x86-64"], skip_prefix="libm ")
    assert not diff, "aarch64 differs from x86-64:\n" + "\n".join(diff)
