"""Waiting on MPI requests without spinning a core.

MPICH's blocking waits busy-poll (MPI-NOTES.md).  On an oversubscribed node (parameter
servers and a coordinator beside the partitions, or a laptop), a partition spinning in
``Waitall`` takes the core from the very peer it waits for.  :func:`wait` polls with
``Testall`` and yields the CPU between polls, first with ``sched_yield`` (cheap, keeps
latency low on dedicated cores), then with short sleeps.
"""

from __future__ import annotations

import os
import time

__all__ = ["wait"]


def wait(reqs) -> None:
    from mpi4py import MPI
    if not reqs:
        return
    spins, pause = 0, 2e-5
    while not MPI.Request.Testall(reqs):
        if spins < 50:
            os.sched_yield()
            spins += 1
        else:
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
