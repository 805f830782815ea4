#!/usr/bin/env python
"""Usage: mpiexec -n 2+R python jobs/bench/raw_rma.py FLOATS [REPEATS] [--layers A,B,... --batch N]

The physical limit of the parameter server on the transport in use, in a job shaped like a
Downpour run of R replicas and one shard: rank 0 naps outside MPI as a coordinator does;
rank 1 holds FLOATS float32 in ``Win.Allocate`` memory and keeps calling MPI, as a shard
does while it attends a transfer; ranks 2.. are replicas.

Without ``--layers`` (R = 1): the replica's raw ``Put`` and ``Get`` of the FLOATS (each
with ``Flush``), REPEATS times; prints one JSON line with the median milliseconds of each.

With ``--layers`` (the fully connected widths, input first) and ``--batch``: each replica
runs REPEATS raw steps, all replicas at once: a step's matrix products (forward, and the
two of backward, per layer: what a training step of that model computes), then a ``Get``
and a ``Put`` of the FLOATS.  Prints one JSON line with each replica's median step
(``step_ms``) and the steps per second of all replicas together (``steps_per_s``): the
ceiling of Downpour's samples/s ratio between R and 1 replicas on this machine; and the
first replica's mean ``Get`` and ``Put`` milliseconds, the first step left out
(``get_ms``, ``put_ms``: each transfer as a training step issues it).
"""

import argparse
import json
import os
import time

import numpy as np
from mpi4py import MPI


def products(widths, batch, rng):
    """The matrices of one step's products: per layer, x (batch, a), W (a, b), dy (batch, b)."""
    return [(rng.standard_normal((batch, a), dtype=np.float32),
             rng.standard_normal((a, b), dtype=np.float32),
             rng.standard_normal((batch, b), dtype=np.float32))
            for a, b in zip(widths, widths[1:])]


def compute(mats):
    for x, w, dy in mats:
        x @ w                       # forward
        x.T @ dy                    # the weights' gradient
        dy @ w.T                    # the input's gradient


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("floats", type=int)
    p.add_argument("repeats", type=int, nargs="?", default=15)
    p.add_argument("--layers", default=None)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    n = args.floats
    comm = MPI.COMM_WORLD
    if comm.Get_size() < 3 or (args.layers is None and comm.Get_size() != 3):
        raise SystemExit("raw_rma.py needs 3 ranks (2 + R with --layers)")
    rank = comm.Get_rank()
    win = MPI.Win.Allocate(4 * n if rank == 1 else 0, 1, comm=comm)
    replicas = comm.Split(0 if rank >= 2 else MPI.UNDEFINED, rank)
    comm.Barrier()
    if rank == 0:                               # the coordinator: naps until the end
        req = comm.Ibarrier()
        while not req.Test():
            time.sleep(0.02)
    elif rank == 1:                             # the shard drives progress, yielding
        req = comm.Ibarrier()
        while not req.Test():
            os.sched_yield()
    else:
        buf = np.ones(n, np.float32)
        win.Lock_all()
        if args.layers is None:
            out = {}
            for name in ("put", "get"):
                ts = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    (win.Put if name == "put" else win.Get)(buf, 1, target=(0, n, MPI.FLOAT))
                    win.Flush(1)
                    ts.append(time.perf_counter() - t)
                out[f"{name}_ms"] = 1e3 * float(np.median(ts))
            out = {"floats": n, "repeats": args.repeats, **out}
        else:
            mats = products([int(w) for w in args.layers.split(",")], args.batch,
                            np.random.default_rng(rank))
            replicas.Barrier()                  # the replicas start their steps together
            ts, gets, puts = [], [], []
            t_start = time.perf_counter()
            for _ in range(args.repeats):
                t = time.perf_counter()
                compute(mats)
                t_get = time.perf_counter()
                win.Get(buf, 1, target=(0, n, MPI.FLOAT))
                win.Flush(1)
                t_put = time.perf_counter()
                win.Put(buf, 1, target=(0, n, MPI.FLOAT))
                win.Flush(1)
                ts.append(time.perf_counter() - t)
                gets.append(t_put - t_get)
                puts.append(ts[-1] - (t_put - t))
            rate = replicas.allreduce(args.repeats / (time.perf_counter() - t_start))
            steps = replicas.gather(1e3 * float(np.median(ts)))
            # each transfer as a step issues it: once, after the step's compute (the first
            # step's, which sets up the connection, left out)
            out = {"floats": n, "repeats": args.repeats, "replicas": comm.Get_size() - 2,
                   "step_ms": steps, "steps_per_s": rate,
                   "get_ms": 1e3 * float(np.mean(gets[1:])),
                   "put_ms": 1e3 * float(np.mean(puts[1:]))}
        win.Unlock_all()
        if rank == 2:
            print(json.dumps(out), flush=True)
        comm.Ibarrier().Wait()
        replicas.Free()
    win.Free()


if __name__ == "__main__":
    main()
