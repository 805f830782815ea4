"""Waiting on MPI requests without spinning a core.

MPICH's blocking waits busy-poll (MPI-NOTES.md).  On an oversubscribed node (parameter
servers and a coordinator beside the partitions, or a laptop), a partition spinning in
``Waitall`` takes the core from the very peer it waits for.  :func:`wait` polls with
``Testall`` and yields the CPU between polls: ``sched_yield`` for the first milliseconds
(as fast as spinning on a dedicated core, but a waiting peer gets the core on a shared one),
then short sleeps, so a rank that waits long costs little.
"""

from __future__ import annotations

import os
import time

__all__ = ["wait"]


def wait(reqs) -> None:
    from mpi4py import MPI
    if not reqs:
        return
    t_yield = time.perf_counter() + 5e-3     # yield for 5 ms, then sleep in short naps
    pause = 5e-5
    while not MPI.Request.Testall(reqs):
        if time.perf_counter() < t_yield:
            os.sched_yield()
        else:
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
