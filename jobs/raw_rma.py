#!/usr/bin/env python
"""Usage: mpiexec -n 3 python jobs/raw_rma.py FLOATS [REPEATS]

The physical limit of the parameter server's transfers on the transport in use: raw MPI
``Put`` and ``Get`` of FLOATS float32 (with ``Flush``) from rank 2 to rank 1's
``Win.Allocate`` memory, in a job shaped like a one-replica Downpour run (rank 0 naps outside
MPI as a coordinator does; rank 1 keeps calling MPI, as a shard does while it attends a
transfer; rank 2 is the replica).  Prints one JSON line: median milliseconds of each.
"""

import json
import os
import sys
import time

import numpy as np
from mpi4py import MPI


def main():
    n = int(sys.argv[1])
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 3:
        raise SystemExit("raw_rma.py needs 3 ranks")
    rank = comm.Get_rank()
    win = MPI.Win.Allocate(4 * n if rank == 1 else 0, 1, comm=comm)
    comm.Barrier()
    if rank == 0:                               # the coordinator: naps until the end
        req = comm.Ibarrier()
        while not req.Test():
            time.sleep(0.02)
    elif rank == 1:                             # the target drives progress, yielding
        req = comm.Ibarrier()
        while not req.Test():
            os.sched_yield()
    else:
        buf = np.ones(n, np.float32)
        win.Lock_all()
        out = {}
        for name in ("put", "get"):
            ts = []
            for _ in range(repeats):
                t = time.perf_counter()
                (win.Put if name == "put" else win.Get)(buf, 1, target=(0, n, MPI.FLOAT))
                win.Flush(1)
                ts.append(time.perf_counter() - t)
            out[f"{name}_ms"] = 1e3 * float(np.median(ts))
        win.Unlock_all()
        print(json.dumps({"floats": n, "repeats": repeats, **out}), flush=True)
        comm.Ibarrier().Wait()
    win.Free()


if __name__ == "__main__":
    main()
