"""Waiting on MPI requests without spinning a core.

MPICH's and Open MPI's blocking waits busy-poll a core.  On an oversubscribed node (parameter
servers and a coordinator beside the partitions, or a laptop), a partition spinning in
``Waitall`` takes the core from the very peer it waits for.  :func:`wait` polls with
``Testall`` and yields the CPU between polls: ``sched_yield`` for the first milliseconds
(as fast as spinning on a dedicated core, but a waiting peer gets the core on a shared one),
then short sleeps, so a rank that waits long costs little.
"""

from __future__ import annotations

import os
import time

__all__ = ["wait", "Backoff"]


def wait(reqs, yield_s: float = 5e-3) -> None:
    """Until every request in ``reqs`` is complete; yields the CPU for ``yield_s``, then
    naps.  A rank that must drive MPI progress for a transfer to it (a fetch over TCP)
    yields for as long as the transfer may take."""
    from mpi4py import MPI
    if not reqs:
        return
    t_yield = time.perf_counter() + yield_s
    pause = 5e-5
    while not MPI.Request.Testall(reqs):
        if time.perf_counter() < t_yield:
            os.sched_yield()
        else:
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)


class Backoff:
    """Sleep between polls, longer while nothing happens, so an idle rank costs little CPU."""

    def __init__(self, lo: float = 2e-4, hi: float = 2e-3):
        self.lo, self.hi, self.t = lo, hi, lo

    def idle(self) -> None:
        time.sleep(self.t)
        self.t = min(self.t * 2, self.hi)

    def busy(self) -> None:
        self.t = self.lo
