"""The study scripts run end to end (a smaller variant of each) and write CSV, PNG, summary."""

import csv
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_mpi

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


@pytest.mark.parametrize("name,csvname,cols,extra", [
    # the partitions study with its ranks pinned (dbmpi.pinned; the other studies run unpinned)
    ("study_partitions", "partitions.csv", {"network", "partitions", "speedup", "step_ms",
                                            "exchange_ms_per_step"},
     ["--cores", ",".join(map(str, CPUS[::-1]))] if CPUS else []),
    ("study_accuracy_time", "accuracy_time.csv", {"method", "time_s", "test_accuracy"}, []),
    ("study_time_to_accuracy", "time_to_accuracy.csv", {"method", "cores", "time_to_target_s"},
     []),
])
def test_study_smoke(tmp_path, name, csvname, cols, extra):
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "studies" / f"{name}.py"), "--out",
                        str(tmp_path), "--smoke", *extra], cwd=ROOT, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / csvname)))
    assert rows and cols <= set(rows[0])
    png = (tmp_path / csvname.replace(".csv", ".png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    summary = (tmp_path / "summary.txt").read_text()
    assert ("pinned to cpu" in summary) == bool(extra)
    # a line for every method (or network) the CSV holds, beginning with its name
    lines = summary.splitlines()
    for name in {r.get("method", r.get("network")) for r in rows}:
        assert any(line.startswith(name) for line in lines), (name, summary)


def test_core_speeds_measures_each_core_and_restores_affinity():
    import os
    from dbmpi import study
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    mask = os.sched_getaffinity(0)
    speeds = study.core_speeds(seconds=0.02)
    assert set(speeds) == mask and all(g > 0.1 for g in speeds.values())
    assert os.sched_getaffinity(0) == mask
    assert "slowest/fastest" in study.core_speeds_line(speeds)


def test_pace_together_compares_each_core_with_and_without_the_others():
    import os
    from dbmpi import study
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    mask = os.sched_getaffinity(0)
    ratios = study.pace_together(mask, seconds=0.05, mib=4)
    assert set(ratios) == mask
    # ratios of the same work's pace: positive and finite (how far apart they are is the
    # machine's business: on a virtual machine an idle vCPU can make a core 2.5x faster
    # beside busy others)
    assert all(0 < g < math.inf and 0 < m < math.inf for g, m in ratios.values()), ratios
    assert os.sched_getaffinity(0) == mask      # the workers were pinned, not this process
    line = study.pace_together_line(ratios)
    assert all(f"cpu{c} compute" in line for c in mask)


@pytest.mark.skipif(len(CPUS) < 2, reason="needs CPU affinity and two CPUs")
def test_pinned_puts_rank_r_on_the_rth_core_listed():
    code = ("import os, sys; from mpi4py import MPI; "      # rank 0 prints what each has
            "g = MPI.COMM_WORLD.gather((sorted(os.sched_getaffinity(0)), sys.argv[1:])); "
            "MPI.COMM_WORLD.rank or print(g)")
    a, b = CPUS[-1], CPUS[0]
    r = run_mpi(2, "-m", "dbmpi.pinned", f"{a},{b}", "-c", code, "x", module=False,
                timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str([([a], ["x"]), ([b], ["x"])]), r.stdout
    # a single process is rank 0; a module runs as `python -m` would run it
    r = subprocess.run([sys.executable, "-m", "dbmpi.pinned", str(b), "-m", "dbmpi",
                        "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "train" in r.stdout, r.stderr[-2000:]


@pytest.mark.skipif(len(CPUS) < 2, reason="needs CPU affinity and two CPUs")
def test_pinned_training_forks_its_guard_before_mpi_starts(tmp_path, digits_path):
    """A partitioned run through pinned.py: each rank's guard forks before MPI_Init (the
    guard refuses to fork after it), so the run ends well on any MPI."""
    from conftest import job_config
    cfg = job_config(tmp_path, digits_path, "digits_sgd.toml")
    r = run_mpi(2, "-m", "dbmpi.pinned", f"{CPUS[0]},{CPUS[-1]}", "-m", "dbmpi",
                "train", cfg, "--out", tmp_path / "run", "--quiet", "--set",
                "cluster.partitions=2", "--set", "run.max_steps=30", module=False, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").exists()


def test_guard_refuses_to_fork_after_mpi_init():
    code = ("from mpi4py import MPI; from dbmpi.signals import Guard\n"
            "try:\n    Guard(0, 'x')\nexcept RuntimeError as e:\n    print('refused:', e)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "refused: MPI was initialised before" in r.stdout, r.stderr


@pytest.mark.parametrize("cores,message", [
    ("a,b", "comma-separated list of CPU numbers"),
    ("4096", "[4096] are not available to this process"),
])
def test_pinned_rejects_bad_cores_with_the_fix(cores, message):
    r = subprocess.run([sys.executable, "-m", "dbmpi.pinned", cores, "-c", "pass"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and message in r.stderr, r.stderr
