"""The study scripts run end to end (a smaller variant of each) and write CSV, PNG, summary."""

import csv
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("name,csvname,cols", [
    ("study_partitions", "partitions.csv", {"network", "partitions", "speedup", "step_ms",
                                            "exchange_ms_per_step"}),
    ("study_accuracy_time", "accuracy_time.csv", {"method", "time_s", "test_accuracy"}),
    ("study_time_to_accuracy", "time_to_accuracy.csv", {"method", "cores", "time_to_target_s"}),
])
def test_study_smoke(tmp_path, name, csvname, cols):
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{name}.py"), "--out",
                        str(tmp_path), "--smoke"], cwd=ROOT, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / csvname)))
    assert rows and cols <= set(rows[0])
    png = (tmp_path / csvname.replace(".csv", ".png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    summary = (tmp_path / "summary.txt").read_text()
    assert "cores" in summary and len(summary.splitlines()) >= len({r.get("method", r.get("network")) for r in rows})


def test_core_speeds_measures_each_core_and_restores_affinity():
    import os
    sys.path.insert(0, str(ROOT / "jobs"))
    import studylib
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    mask = os.sched_getaffinity(0)
    speeds = studylib.core_speeds(seconds=0.02)
    assert set(speeds) == mask and all(g > 0.1 for g in speeds.values())
    assert os.sched_getaffinity(0) == mask
    assert "slowest/fastest" in studylib.core_speeds_line(speeds)


def test_pace_together_compares_each_core_with_and_without_the_others():
    import os
    sys.path.insert(0, str(ROOT / "jobs"))
    import studylib
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    mask = os.sched_getaffinity(0)
    ratios = studylib.pace_together(mask, seconds=0.05, mib=4)
    assert set(ratios) == mask
    # ratios of the same work's pace: positive, and no core runs far faster beside the others
    assert all(0.05 < g < 2 and 0.05 < m < 2 for g, m in ratios.values()), ratios
    assert os.sched_getaffinity(0) == mask      # the workers were pinned, not this process
    line = studylib.pace_together_line(ratios)
    assert all(f"cpu{c} compute" in line for c in mask)
