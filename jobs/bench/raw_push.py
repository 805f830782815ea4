#!/usr/bin/env python
"""Usage: mpiexec -n 3+R python jobs/bench/raw_push.py FLOATS [REPEATS]

How a push's bytes best reach the shards on the transport in use, in a job shaped like the
end of a Sandblaster batch: rank 0 paces the rounds as a coordinator does; ranks 1 and 2
are shards, calling MPI and yielding the core between calls, as an attended shard does;
ranks 3.. are R replicas, which all push FLOATS float32 to both shards at once, each round.
Two ways, rounds alternating, in one run:

- ``flush``: each replica ``Put``s into the shards' windows and calls ``Win_flush`` (MPI
  implementations busy-poll a core inside it);
- ``pull``: each replica rings the shards (a small message) and waits, yielding, for their
  answers; each shard ``Get``s the bytes from the replica's window (the request's
  completion is the data's arrival) and answers.

Prints one JSON line: the median milliseconds of a replica's push each way, and their
ratio.  With more ranks than cores, ``flush`` starves the shards of the core it spins on.
"""

import argparse
import json
import os
import time

import numpy as np
from mpi4py import MPI

SHARDS = (1, 2)
GO, DONE, STOP, RING, ANSWER = 1, 2, 3, 4, 5


def wait(reqs):
    """Until every request completes, yielding the core between polls."""
    while not MPI.Request.Testall(reqs):
        os.sched_yield()


def shard(comm, bell, win, out_win, n, replicas):
    """Serve pull requests until rank 0 says stop; keep calling MPI meanwhile."""
    bufs = {r: np.empty(n, np.float32) for r in replicas}
    st, ans = MPI.Status(), np.zeros(1, np.int64)
    while not comm.Iprobe(source=0, tag=STOP):
        asked = []
        while bell.Iprobe(source=MPI.ANY_SOURCE, tag=RING, status=st):
            bell.Recv(ans, source=st.Get_source(), tag=RING)
            asked.append(st.Get_source())
        if asked:
            wait([out_win.Rget(bufs[r], r, target=(0, n, MPI.FLOAT)) for r in asked])
            wait([bell.Isend(ans, dest=r, tag=ANSWER) for r in asked])
        else:
            os.sched_yield()
    comm.recv(source=0, tag=STOP)


def replica(comm, bell, win, out_win, n, me):
    """Push when told, the way rank 0 names; report each push's seconds."""
    data = np.ones(n, np.float32)
    out = np.frombuffer(out_win.tomemory(), np.float32, n)
    out[:] = data
    slot = (me - 3) * n * 4
    times = {"flush": [], "pull": []}
    while True:
        while not comm.Iprobe(source=0):
            time.sleep(1e-4)
        st = MPI.Status()
        how = comm.recv(source=0, status=st)
        if st.Get_tag() == STOP:
            return times
        t = time.perf_counter()
        if how == "flush":
            wait([win.Rput(data, s, target=(slot, n, MPI.FLOAT)) for s in SHARDS])
            for s in SHARDS:
                win.Flush(s)
        else:
            out_win.Sync()
            ans = [np.zeros(1, np.int64) for _ in SHARDS]
            wait([bell.Irecv(a, source=s, tag=ANSWER) for a, s in zip(ans, SHARDS)]
                 + [bell.Isend(np.zeros(1, np.int64), dest=s, tag=RING) for s in SHARDS])
        times[how].append(time.perf_counter() - t)
        comm.send(None, dest=0, tag=DONE)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("floats", type=int)
    p.add_argument("repeats", type=int, nargs="?", default=100)
    a = p.parse_args()
    comm, n = MPI.COMM_WORLD, a.floats
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 4:
        raise SystemExit("raw_push.py: run it with 4 ranks or more (3 + replicas)")
    replicas = list(range(3, size))
    bell = comm.Dup()
    win = MPI.Win.Allocate(4 * n * len(replicas) if rank in SHARDS else 0, 1, comm=comm)
    out_win = MPI.Win.Allocate(4 * n if rank in replicas else 0, 1, comm=comm)
    win.Lock_all()
    out_win.Lock_all()
    comm.Barrier()
    if rank in SHARDS:
        shard(comm, bell, win, out_win, n, replicas)
    elif rank in replicas:
        comm.send(replica(comm, bell, win, out_win, n, rank), dest=0, tag=DONE)
    else:
        for i in range(2 * a.repeats):
            time.sleep(2e-3)           # the replicas compute
            how = ("flush", "pull")[i % 2]
            for r in replicas:
                comm.send(how, dest=r, tag=GO)
            for r in replicas:
                while not comm.Iprobe(source=r, tag=DONE):
                    time.sleep(5e-5)
                comm.recv(source=r, tag=DONE)
        for r in SHARDS + tuple(replicas):
            comm.send(None, dest=r, tag=STOP)
        times = [comm.recv(source=r, tag=DONE) for r in replicas]
        med = {k: float(np.median([x for t in times for x in t[k]])) * 1e3
               for k in ("flush", "pull")}
        print(json.dumps({"floats": n, "replicas": len(replicas), "flush_ms": med["flush"],
                          "pull_ms": med["pull"],
                          "flush_over_pull": med["flush"] / med["pull"]}), flush=True)
    win.Unlock_all()
    out_win.Unlock_all()
    comm.Barrier()
    win.Free()
    out_win.Free()
    bell.Free()


if __name__ == "__main__":
    main()
