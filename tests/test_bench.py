"""bench/run.py's machinery: cases from another module join the suite, each
implementation runs in its own process, and results that disagree with the
reference are reported. (Timings are not checked: only that they exist.)"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

RUN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "run.py")

PLUGIN = textwrap.dedent('''
    import os
    import numpy as np

    def make(impl, n, wrong):
        x = np.arange(n, dtype=np.float64)
        with open(os.environ["PLUGIN_PIDS"], "a") as f:  # the process each side ran in
            f.write(f"{impl} {os.getpid()}\\n")
        if impl != "fastgrad":
            return {"run": lambda: x.sum(), "result": {"total": np.array(x.sum())}}
        total = np.array(x.sum() + (1.0 if wrong else 0.0))
        return {"run": lambda: float(x.sum()), "result": {"total": total}}

    CASES = [{"name": f"plugin/sum/{label}", "make": make, "args": (1000, wrong),
              "impls": ("fastgrad", "numpy", "other"), "tolerance": 1e-9, "samples": 2}
             for label, wrong in (("right", False), ("wrong", True))]
''')


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "bench_plugin_cases.py").write_text(PLUGIN)
    out = folder / "results.json"
    pids = folder / "pids"
    env = dict(os.environ, PLUGIN_PIDS=str(pids), PYTHONPATH=os.pathsep.join(
        [str(folder)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    with subprocess.Popen([sys.executable, RUN, "--extra", "bench_plugin_cases",
                           "--only", "plugin/sum/right,plugin/sum/wrong",
                           "--reps", "2", "--quick", "--json", str(out)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as proc:
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return (stdout, {r["case"]: r for r in json.loads(out.read_text())["results"]},
            [line.split() for line in pids.read_text().splitlines()], proc.pid)


def test_extra_module_cases_run_and_are_timed(plugin_run):
    rows = plugin_run[1]
    assert sorted(rows) == ["plugin/sum/right", "plugin/sum/wrong"]
    for row in rows.values():
        assert row["failed"] == {}
        assert sorted(row["seconds"]) == ["fastgrad", "numpy", "other"]
        # two repetitions, each a worker's two samples (the case's own count)
        assert [len(s) for s in row["samples"]["numpy"]] == [2, 2]
        assert all(t > 0 for t in row["seconds"].values())
        for side in ("numpy", "other"):
            assert row["over_fastgrad"][side] == pytest.approx(
                row["seconds"][side] / row["seconds"]["fastgrad"])


def test_sides_of_other_modules_get_columns(plugin_run):
    header = next(line for line in plugin_run[0].splitlines() if line.startswith("case"))
    assert header.split()[1:] == ["fastgrad", "numpy", "np/fg", "other", "other/fg"]


def test_results_are_checked_against_the_reference(plugin_run):
    stdout, rows = plugin_run[:2]
    assert rows["plugin/sum/right"]["max_rel_diff"] == {"fastgrad": 0.0, "other": 0.0}
    # 1 off in a total of 499500
    assert rows["plugin/sum/wrong"]["max_rel_diff"]["fastgrad"] == pytest.approx(1 / 499500)
    flagged = [line for line in stdout.splitlines() if "fastgrad's result differs" in line]
    assert len(flagged) == 1 and flagged[0].startswith("plugin/sum/wrong")


def test_each_repetition_of_each_side_has_its_own_process(plugin_run):
    made, parent = plugin_run[2:]
    # 2 cases x 3 sides x 2 repetitions, each made once, in a fresh process
    assert sorted(impl for impl, _ in made) == ["fastgrad"] * 4 + ["numpy"] * 4 + ["other"] * 4
    pids = {int(pid) for _, pid in made}
    assert len(pids) == 12 and parent not in pids
