"""Run under mpiexec -n 2 (tests/test_data.py): two ranks that read the same samples share
one cache on their node; prints JSON from rank 0."""

import json
import sys

import numpy as np
from mpi4py import MPI

from dbmpi.data import open_split

path = sys.argv[1]
comm = MPI.COMM_WORLD
idx = np.arange(5, 905)
shared = open_split(path, "train", indices=idx, share=comm)
private = open_split(path, "train", indices=idx)
pos = [3, 899, 3, 0, 450]
same = all(np.array_equal(a, b) for a, b in zip(shared.take(pos), private.take(pos)))
x, y = shared.all()
writable = x.flags.writeable
comm.Barrier()
if comm.Get_rank() == 0:      # one memory: what one rank writes, the other sees
    x.flags.writeable = True   # (a test's doing: the cache is read-only to its users)
    x[7, 0, 0, 0] = 1234.5
comm.Barrier()
seen = float(x[7, 0, 0, 0])
too_big = open_split(path, "train", indices=idx, cache_mb=0.01, share=comm)  # no cache
res = comm.gather({"shared": shared.shared, "same": same, "writable": writable, "seen": seen,
                   "uncached_shared": too_big.shared, "labels": y[:5].tolist()}, root=0)
if comm.Get_rank() == 0:
    print(json.dumps(res))
