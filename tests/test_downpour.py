"""Multi-rank tests of Downpour, the parameter server and sync; each under a timeout."""

import json
import os

import numpy as np
import pytest

from conftest import ROOT, job_config, run_mpi


def _cfg(tmp_path, digits_path, name="digits_downpour.toml"):
    return job_config(tmp_path, digits_path, name)


@pytest.mark.parametrize("shards,replicas,nan_every,mode,how", [
    (2, 3, 0, "direct", ()), (3, 2, 0, "inbox", ()), (3, 4, 25, "direct", ()),
    (2, 3, 25, "inbox", ()),
    # every pair attended, whatever the transport: parts the shards Get, parts replicas Put
    (2, 3, 25, "direct", ("attended",)), (2, 3, 25, "inbox", ("attended", 0))],
    ids=["direct", "inbox", "direct-nan", "inbox-nan", "attended-pulled", "attended-put"])
def test_no_update_lost_or_applied_twice_and_no_torn_fetch(shards, replicas, nan_every, mode,
                                                           how):
    """Stress: many replicas push known integers (n_push = 1, random delays) into several
    shards, applied by the replicas (direct) or the shards (inbox); with nan_every, NaN
    pushes too, which must be rejected whole."""
    r = run_mpi(1 + shards + replicas, ROOT / "tests" / "mpi_ps_stress.py", shards, replicas,
                300, 10007, nan_every, mode, *how, module=False, timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["min"] == out["max"] == out["expected"], out   # exact integer sum
    assert out["torn"] == 0
    assert out["pushes_rejected"] == out["nan_pushes"]
    assert out["pushes_sent"] == out["pushes_applied"] + out["pushes_rejected"]
    assert out["pushes_applied"] >= shards * replicas * 50


def test_downpour_digits_two_replicas_two_shards(tmp_path, digits_path):
    """Acceptance: >= 97% test accuracy and pushes_sent == pushes_applied."""
    out = tmp_path / "run"
    r = run_mpi(5, "train", _cfg(tmp_path, digits_path), "--out", out, "--quiet", timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["final_test_accuracy"] >= 0.97, s
    assert s["pushes_sent"] == s["pushes_applied"] > 0 and s["pushes_rejected"] == 0
    assert sum(s["staleness_histogram"]) == s["pushes_applied"]
    assert len(s["replicas"]) == 2 and all(x["samples_per_s"] > 0 for x in s["replicas"])
    # the MPI library, one node, and the path to each shard: probed, so MPICH's network
    # module (DBMPI_TRANSPORT=tcp) is attended and shared memory is passive
    from conftest import LAUNCHER
    assert s["mpi"].startswith("MPICH" if LAUNCHER == "mpich" else "Open MPI"), s["mpi"]
    assert s["nodes"] == 1 and list(s["hosts"].values()) == ["0-4"]
    assert "settings" in s["transport"]
    tcp = LAUNCHER == "mpich" and os.environ.get("MPIR_CVAR_NOLOCAL") == "1"
    assert s["ps_pairs"] == {"passive": 0 if tcp else 6, "attended": 6 if tcp else 0}
    lines = [json.loads(m) for m in (out / "metrics.jsonl").read_text().splitlines()]
    assert {m["replica"] for m in lines if m["kind"] == "train"} == {0, 1}
    assert any(m["kind"] == "eval" for m in lines)
    assert (out / "checkpoint.h5").exists()


def test_downpour_options_warmstart_fetch_push_sgd(tmp_path, digits_path):
    out = tmp_path / "run"
    r = run_mpi(4, "train", _cfg(tmp_path, digits_path), "--out", out, "--quiet",
                "--set", "cluster.ps_shards=1", "--set", "optimizer.adagrad=false",
                "--set", "optimizer.n_fetch=3", "--set", "optimizer.n_push=2",
                "--set", "optimizer.warmstart_steps=50", "--set", "run.max_steps=800",
                "--set", "optimizer.learning_rate=0.1",
                timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["pushes"] == "direct"      # plain SGD: replicas apply their pushes
    assert s["pushes_sent"] == s["pushes_applied"] > 0
    assert sum(s["staleness_histogram"]) == s["pushes_applied"]
    assert s["replicas"][0]["fetches"] <= 800 // 3 + 2
    assert s["final_test_accuracy"] > 0.85


def test_warmstart_longer_than_the_run_does_not_hold_the_others(tmp_path, digits_path):
    """max_steps below warmstart_steps: replica 0 trains all its steps alone, then the
    others start (they used to wait for a warm-up that never came, until max_time_s)."""
    out = tmp_path / "run"
    r = run_mpi(5, "train", _cfg(tmp_path, digits_path), "--out", out, "--quiet",
                "--set", "optimizer.warmstart_steps=100", "--set", "run.max_steps=30",
                "--set", "run.max_time_s=100", timeout=90)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["stop_reason"] == "max_steps" and s["wall_time_s"] < 60, s
    assert [x["steps"] for x in s["replicas"]] == [30, 30]
    peaks = s["peak_rss_mb"]            # every rank's peak memory, by role
    assert peaks["coordinator"] > 0 and len(peaks["shards"]) == 2
    assert [len(p) for p in peaks["replicas"]] == [1, 1]


def test_resume_from_inside_warmstart_does_not_hold_the_others(tmp_path, digits_path):
    """A run stopped while replica 0 warmed up alone (a preemption soon after the start)
    resumes with the others training too: they used to wait for a warm-up signal that the
    resumed replica 0 never sent, until the time limit."""
    out = tmp_path / "run"
    r = run_mpi(5, "train", _cfg(tmp_path, digits_path), "--out", out, "--quiet",
                "--set", "optimizer.warmstart_steps=100000000",
                "--set", "run.max_steps=200000000", "--set", "run.max_time_s=2", timeout=90)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    first = [x["steps"] for x in s["replicas"]]
    assert first[0] > 0 and first[1] == 0, first           # stopped inside the warmstart
    r = run_mpi(5, "train", "--resume", out, "--quiet", "--set", "optimizer.warmstart_steps=10",
                "--set", f"run.max_steps={first[0] + 300}", "--set", "run.max_time_s=120",
                timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["stop_reason"] == "max_steps", s["stop_reason"]
    assert [x["steps"] for x in s["replicas"]] == [first[0] + 300] * 2


def test_wrong_rank_count_says_which(tmp_path, digits_path):
    r = run_mpi(3, "train", _cfg(tmp_path, digits_path), "--quiet", timeout=60)
    assert r.returncode != 0
    assert "needs 5 ranks (1 coordinator + 2 parameter-server shards + 2 replicas" in r.stderr
    assert r.stderr.count("dbmpi: error") == 1


def test_sync_two_replicas(tmp_path, digits_path):
    cfg = _cfg(tmp_path, digits_path)
    out = tmp_path / "run"
    r = run_mpi(2, "train", cfg, "--out", out, "--quiet", "--set", "optimizer.algorithm=sync",
                "--set", "optimizer.adagrad=false", "--set", "optimizer.learning_rate=0.1",
                "--set", "run.max_steps=600", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["algorithm"] == "sync" and s["steps"] == 600 and s["final_test_accuracy"] > 0.93


SYNC = ("--set", "optimizer.algorithm=sync", "--set", "optimizer.adagrad=false",
        "--set", "optimizer.learning_rate=0.1")


def test_sync_resume_reads_the_batches_an_uninterrupted_run_reads(tmp_path, digits_path):
    """40 steps, then a resume to 80, against 80 at once: the same parameters (every
    replica goes on from its place in its data order, kept in the checkpoint)."""
    from dbmpi.rundir import load_checkpoint
    cfg = _cfg(tmp_path, digits_path)
    half, whole = tmp_path / "half", tmp_path / "whole"
    for out, steps in ((half, 40), (whole, 80)):
        r = run_mpi(2, "train", cfg, "--out", out, "--quiet", *SYNC,
                    "--set", f"run.max_steps={steps}", timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
    c = load_checkpoint(half / "checkpoint.h5")["counters"]
    assert c["step"] == 40 and c["replica1_offset"] > 0, c
    r = run_mpi(2, "train", "--resume", half, "--quiet", "--set", "run.max_steps=80",
                timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (load_checkpoint(d / "checkpoint.h5") for d in (half, whole))
    assert a["counters"]["step"] == b["counters"]["step"] == 80
    np.testing.assert_array_equal(a["params"], b["params"])


def test_sync_stops_as_diverged_with_the_last_finite_parameters(tmp_path, digits_path):
    out = tmp_path / "run"
    r = run_mpi(2, "train", _cfg(tmp_path, digits_path), "--out", out, "--quiet", *SYNC,
                "--set", "optimizer.learning_rate=1e30", "--set", "run.max_steps=2000",
                timeout=120)
    assert r.returncode == 3, (r.returncode, r.stderr[-3000:])
    assert r.stderr.count("training diverged") == 1, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["stop_reason"] == "diverged" and s["steps"] < 2000
    from dbmpi.rundir import load_checkpoint
    assert np.isfinite(load_checkpoint(out / "checkpoint.h5")["params"]).all()


def test_inbox_slots_hold_each_clients_overlap_only():
    """A shard's inbox has room for the part of its range each client pushes, not a whole
    range per client: with P partitions it holds about R copies of the range, not R x P."""
    from dbmpi.server import HEADER, inbox_slots
    clients = [(0, 60), (60, 100)] * 2            # 2 replicas x 2 partitions
    slots, total = inbox_slots((50, 100), clients)
    assert [n for _, n in slots] == [10, 40, 10, 40]
    assert [off for off, _ in slots] == [0, HEADER + 40, 2 * HEADER + 200, 3 * HEADER + 240]
    assert total == 4 * HEADER + 4 * 2 * 50
    slots, total = inbox_slots((0, 50), clients)  # partition 1 never pushes here
    assert [n for _, n in slots] == [50, 0, 50, 0] and total == 2 * (HEADER + 200)
    assert inbox_slots((0, 50), []) == ([], 0)    # direct pushes: no inbox at all


def _two_hosts_unavailable():
    from conftest import LAUNCHER
    if LAUNCHER != "mpich":
        return "the two-host launch goes through Hydra (MPICH's mpiexec)"
    import netns_hosts
    return netns_hosts.unavailable()


@pytest.mark.skipif(bool(_two_hosts_unavailable()), reason=str(_two_hosts_unavailable()))
def test_downpour_across_two_hosts(tmp_path, digits_path):
    """The coordinator and shards on one host, the replicas on another (network namespaces,
    TCP between them): MPI sees two nodes, replicas reach the shards by attended RMA, every
    push is applied once and the job trains as on one node."""
    import os
    import signal
    import subprocess
    import sys

    import netns_hosts

    from conftest import MPIEXEC
    out = tmp_path / "run"
    with netns_hosts.hosts(2) as h:
        cmd = [MPIEXEC, *h.hydra_args([3, 2]), "-genv", "UCX_TLS", "tcp,self", "-n", "5",
               sys.executable, "-m", "mpi4py", "-m", "dbmpi", "train",
               _cfg(tmp_path, digits_path), "--out", out, "--quiet",
               "--set", "run.max_steps=1500"]
        p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            _, err = p.communicate()
            raise AssertionError(f"the two-host job hung:\n{err[-3000:]}")
    assert p.returncode == 0, err[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["nodes"] == 2 and s["hosts"] == dict(zip(h.namespaces, ["0-2", "3-4"])), s["hosts"]
    # replicas -> shards: TCP across the hosts; coordinator -> shards: MPICH's shared memory
    # on host 1, unless DBMPI_TRANSPORT=tcp sends that over TCP too
    local = 0 if os.environ.get("MPIR_CVAR_NOLOCAL") == "1" else 2
    assert s["ps_pairs"] == {"passive": local, "attended": 6 - local}, s["ps_pairs"]
    assert s["pushes_sent"] == s["pushes_applied"] > 0 and s["pushes_rejected"] == 0
    assert s["final_test_accuracy"] >= 0.95, s["final_test_accuracy"]


def test_raw_rma_baseline_reports_put_and_get():
    """bench_downpour's physical limit: raw Put and Get of the same bytes, as JSON."""
    r = run_mpi(3, ROOT / "jobs" / "bench" / "raw_rma.py", 1000, 3, module=False, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["floats"] == 1000 and out["repeats"] == 3
    assert out["put_ms"] > 0 and out["get_ms"] > 0


def test_raw_push_compares_a_flushed_put_with_the_shards_get():
    """The attended push's physical comparison: Put + Win_flush by the replicas against the
    shards' Get of the same bytes, rounds alternating, as JSON."""
    r = run_mpi(5, ROOT / "jobs" / "bench" / "raw_push.py", 1000, 4, module=False, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["floats"] == 1000 and out["replicas"] == 2
    assert out["flush_ms"] > 0 and out["pull_ms"] > 0
    assert out["flush_over_pull"] == out["flush_ms"] / out["pull_ms"]


def test_raw_steps_of_two_replicas_report_each_step_and_the_rate():
    """bench_downpour's ceiling of the 2/1 replicas ratio: raw steps by 2 replicas at once."""
    r = run_mpi(4, ROOT / "jobs" / "bench" / "raw_rma.py", 1000, 3, "--layers", "16,8,4", "--batch", 4,
                module=False, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2 and len(out["step_ms"]) == 2 and out["repeats"] == 3
    assert all(t > 0 for t in out["step_ms"]) and out["steps_per_s"] > 0
