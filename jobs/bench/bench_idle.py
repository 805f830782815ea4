#!/usr/bin/env python
"""Usage: python jobs/bench/bench_idle.py [--seconds 5]

CPU used by ranks that wait, measured from /proc while a Downpour job runs on the digits:
the parameter-server shards (no replica pushes: n_push is huge), the coordinator (no
evaluation due) and replica 1 (waiting for a warmstart that never ends).  Replica 0 trains
throughout, so the waiting ranks share the cores with real work.  Prints each rank's CPU as
a fraction of one core over the window.  Launcher: MPIEXEC (default beside this Python).
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from dbmpi.mpienv import launcher_env

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
MPIEXEC = os.environ.get("MPIEXEC", str(Path(PY).parent / "mpiexec"))


def cpu_ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])           # utime + stime


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    if not (ROOT / "data" / "digits.h5").exists():
        subprocess.run([PY, "-m", "dbmpi", "data", "digits", "--out", "data/digits.h5"],
                       check=True, cwd=ROOT)
    env = launcher_env()
    sets = ["optimizer.n_push=1000000000", "optimizer.n_fetch=1000000000",
            "optimizer.warmstart_steps=1000000000", "run.max_steps=1000000000",
            "run.eval_every_s=100000", "run.checkpoint_every_s=100000",
            f"run.max_time_s={args.seconds + 8}"]
    cmd = [MPIEXEC, "-n", "5", PY, "-m", "mpi4py", "-m", "dbmpi", "train",
           "jobs/configs/digits_downpour.toml", "--quiet", "--out", "/tmp/dbmpi-bench-idle"]
    for s in sets:
        cmd += ["--set", s]
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    time.sleep(4)                             # past start-up
    pids = {}
    for d in os.listdir("/proc"):
        try:
            comm = open(f"/proc/{d}/comm").read().strip()
        except OSError:
            continue
        if comm.startswith("dbmpi-r"):
            pids[int(comm[7:])] = int(d)
    roles = {0: "coordinator", 1: "shard 0", 2: "shard 1", 3: "replica 0 (training)",
             4: "replica 1 (waiting)"}
    hz = os.sysconf("SC_CLK_TCK")
    t0, c0 = time.time(), {r: cpu_ticks(pid) for r, pid in pids.items()}
    time.sleep(args.seconds)
    t1, c1 = time.time(), {r: cpu_ticks(pid) for r, pid in pids.items()}
    job.wait()
    print(f"CPU over {t1 - t0:.1f} s, as a fraction of one core:")
    for r in sorted(pids):
        print(f"  rank {r} {roles[r]:<22} {(c1[r] - c0[r]) / hz / (t1 - t0):6.1%}")


if __name__ == "__main__":
    main()
