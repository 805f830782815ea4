"""The benchmark scripts run end to end and print their ratios (small settings; minutes,
so marked ``benchmark``: ``bash jobs/test.sh -m benchmark``).  Their figures are not judged
here: the machine's speed decides them (see the README's Benchmarks)."""

import math
import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.benchmark


def _ratios(text: str, label: str) -> list[float]:
    """Every ``<label> ... <number>x`` figure printed."""
    return [float(v) for v in re.findall(rf"{re.escape(label)}[^\n]*?([0-9.]+)x", text)]


def _run(script, *args, timeout=600):
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "bench" / script), *map(str, args)],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _positive(values, n):
    assert len(values) >= n and all(v > 0 and math.isfinite(v) for v in values), values


def test_bench_downpour_prints_its_ratios_for_each_update_rule():
    out = _run("bench_downpour.py", "--steps", 12, "--raw-steps", 5)
    for label in ("fetch / raw Get in a step:", "push / raw Put in a step:",
                  "ratio with/without:", "ratio 2/1 replicas:",
                  "ratio 2/1 of the raw steps (the ceiling):"):
        _positive(_ratios(out, label), 2)      # sgd and adagrad
    assert "pushes sent/applied (2 replicas): " in out


def test_bench_sandblaster_prints_the_straggler_ratios():
    out = _run("bench_sandblaster.py", "--iterations", 6)
    _positive([float(v) for v in re.findall(r"([0-9.]+)x", out)], 2)


def test_bench_partitions_prints_the_speedup_of_two_partitions():
    out = _run("bench_partitions.py", "--partitions", "1,2", "--steps", 10, "--repeats", 1,
               "--nets", "speech")
    _positive([float(v) for v in re.findall(r"([0-9.]+)x", out)], 1)


def test_bench_kernels_quick_prints_its_fractions_of_the_ceiling():
    out = _run("bench_kernels.py", "--quick", "--only", "fc")
    _positive([float(v) for v in re.findall(r"([0-9.]+)x", out)], 1)


def test_bench_idle_prints_the_waiting_ranks_cpu():
    out = _run("bench_idle.py", "--seconds", 1.0)
    assert re.search(r"[0-9.]+%", out), out
