#!/usr/bin/env python
"""Usage: python jobs/bench/bench_sandblaster.py [--iterations N] [--config FILE] [--transports PAIRS]

Sandblaster straggler benchmark, all runs in one invocation: the mean batch-gradient time
of L-BFGS with 3 replicas (a) with no straggler, (b) with replica 0 slowed 5x, balancing and
backup copies on, (c) the same straggler with balancing and backups off.  With
``--transports PAIRS``: the config's mean batch time with every message over TCP
(DBMPI_TRANSPORT=tcp) against shared memory, in PAIRS pairs of runs one after the other.
Ranks share the cores (6 ranks here).  Launcher: MPIEXEC (default: the mpiexec beside this
Python).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dbmpi.mpienv import launcher_env

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
MPIEXEC = os.environ.get("MPIEXEC", str(Path(PY).parent / "mpiexec"))
ENV = launcher_env()   # one BLAS thread a rank, Open MPI settings, DBMPI_TRANSPORT


def run(cfg, out, sets, env=ENV):
    cmd = [MPIEXEC, "-n", "6", PY, "-m", "mpi4py", "-m", "dbmpi", "train", str(cfg), "--out",
           str(out), "--quiet", "--set", "run.eval_every_s=1000"]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return json.loads((Path(out) / "summary.json").read_text())


def compare_transports(cfg, sets, pairs):
    """The config's mean batch time over TCP against shared memory, runs alternating."""
    shm = launcher_env({k: v for k, v in os.environ.items() if k != "DBMPI_TRANSPORT"})
    tcp = launcher_env(dict(os.environ, DBMPI_TRANSPORT="tcp"))
    print(f"{'pair':<6}{'shared memory ms':>18}{'TCP ms':>10}{'TCP / shared':>14}")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(pairs):
            a = run(cfg, Path(tmp) / f"shm{i}", sets, shm)["batch_time_mean_s"]
            b = run(cfg, Path(tmp) / f"tcp{i}", sets, tcp)["batch_time_mean_s"]
            ratios.append(b / a)
            print(f"{i + 1:<6}{a * 1e3:>18.1f}{b * 1e3:>10.1f}{b / a:>13.2f}x")
    print(f"median TCP / shared memory: {sorted(ratios)[len(ratios) // 2]:.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "digits_sandblaster.toml"))
    p.add_argument("--portion-size", type=int, default=32)
    p.add_argument("--transports", type=int, default=0, metavar="PAIRS",
                   help="instead: the config's batch time over TCP against shared memory, "
                        "PAIRS pairs of runs (its own portion size)")
    args = p.parse_args()
    if not (ROOT / "data" / "digits.h5").exists():
        subprocess.run([PY, "-m", "dbmpi", "data", "digits", "--out", "data/digits.h5"],
                       check=True, cwd=ROOT, env=ENV)
    if args.transports:
        compare_transports(args.config, [f"run.max_steps={args.iterations}"], args.transports)
        return
    base = [f"run.max_steps={args.iterations}", f"optimizer.portion_size={args.portion_size}"]
    slow = ["faults.slow_replica=0", "faults.slow_factor=5"]
    off = ["optimizer.balance=false", "optimizer.backups=false"]
    with tempfile.TemporaryDirectory() as tmp:
        a = run(args.config, Path(tmp) / "a", base)
        b = run(args.config, Path(tmp) / "b", base + slow)
        c = run(args.config, Path(tmp) / "c", base + slow + off)
    print(f"{a['portions_per_batch']} portions of {args.portion_size} samples per batch, "
          f"3 replicas, {args.iterations} L-BFGS iterations")
    print(f"{'run':<46}{'batch ms':>10}{'ratio':>8}{'backups':>9}")
    for name, s in [("no straggler", a), ("replica 0 slowed 5x, balancing + backups", b),
                    ("replica 0 slowed 5x, no balancing, no backups", c)]:
        print(f"{name:<46}{s['batch_time_mean_s'] * 1e3:>10.1f}"
              f"{s['batch_time_mean_s'] / a['batch_time_mean_s']:>7.2f}x{s['backup_copies']:>9}")


if __name__ == "__main__":
    main()
