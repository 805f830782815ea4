#!/usr/bin/env python
"""Usage: python jobs/bench_partitions.py [--partitions 1,2,4] [--steps N] [--quick]

Model-parallel step throughput against P, all in one run: algorithm sgd (one replica) with
P partitions for (a) a locally connected image network on 64x64 inputs and (b) a
fully connected, speech-like network (4 sigmoid layers of 2560 units and a softmax) on
32x32 frames.  Prints samples/s, the speed-up over P = 1 measured in the same run, and the
bytes each partition sends per step.  Ranks beyond the cores are oversubscribed.
Launcher: MPIEXEC (default: the mpiexec beside this Python).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MPIEXEC = os.environ.get("MPIEXEC", str(Path(PY).parent / "mpiexec"))
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")

from study_partitions import NETS as _STUDY   # the same two networks as the study

NETS = {"lc64": ("synth64.h5", 64, _STUDY["locally connected, 64x64 images"][1]),
        "speech": ("synth32.h5", 32, _STUDY["fully connected, speech-like"][1])}


def run(tmp, data, model, P, steps, batch):
    cfg = Path(tmp) / f"c{P}.toml"
    cfg.write_text(f'[data]\npath = "{data}"\n' + model +
                   f"[cluster]\npartitions = {P}\n[optimizer]\nalgorithm = \"sgd\"\n"
                   f"batch_size = {batch}\nlearning_rate = 0.01\n[run]\nmax_steps = {steps}\n"
                   "eval_every_s = 10000\ncheckpoint_every_s = 10000\nlog_every = 1000\n")
    out = Path(tmp) / f"r{P}"
    cmd = [PY, "-m", "dbmpi", "train", str(cfg), "--out", str(out), "--quiet"]
    if P > 1:
        cmd = [MPIEXEC, "-n", str(P), PY, "-m", "mpi4py"] + cmd[1:]
    subprocess.run(cmd, check=True, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--partitions", default="1,2,4")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--nets", default="lc64,speech")
    args = p.parse_args()
    parts = [int(x) for x in args.partitions.split(",")]
    print(f"sgd, batch {args.batch}, {args.steps} steps, {os.cpu_count()} cores here")
    for name in args.nets.split(","):
        fname, size, model = NETS[name]
        data = ROOT / "data" / fname
        if not data.exists():
            subprocess.run([PY, "-m", "dbmpi", "data", "synthetic", "--size", str(size),
                            "--count", "3000", "--out", str(data)], check=True, cwd=ROOT,
                           env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with tempfile.TemporaryDirectory() as tmp:
            res = {P: run(tmp, data, model, P, args.steps, args.batch) for P in parts}
        base = res[parts[0]]["samples_per_s"]
        print(f"\n{name} ({res[parts[0]]['num_params'] / 1e6:.2f}M parameters)")
        print(f"{'P':>3}{'samples/s':>12}{'speed-up':>10}   bytes sent per step by each partition")
        for P in parts:
            s = res[P]
            print(f"{P:>3}{s['samples_per_s']:>12.1f}{s['samples_per_s'] / base:>9.2f}x   "
                  f"{[round(b) for b in s.get('partition_bytes_per_step', [0])]}")


if __name__ == "__main__":
    main()
