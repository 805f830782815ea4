"""Waiting without spinning a core: every poll and backoff loop in dbmpi goes through here.

MPICH's and Open MPI's blocking calls busy-poll a core.  On an oversubscribed node
(parameter servers and a coordinator beside the partitions, or a laptop), a rank spinning
in ``Waitall`` or ``Recv`` takes the core from the very peer it waits for.  So dbmpi waits
with :class:`Backoff`: ``sched_yield`` first (as fast as spinning on a dedicated core, but a
waiting peer gets the core on a shared one), then naps, longer each time nothing happens,
so a rank that waits long costs little.

- :func:`wait`: until MPI requests complete;
- :func:`until`: until a condition holds (a slot frees, a version is even);
- :func:`recv`: a pickled message from ``source`` with ``tag``.
"""

from __future__ import annotations

import os
import time

__all__ = ["Backoff", "wait", "until", "recv"]


class Backoff:
    """Pauses between polls: ``sched_yield`` for the first ``yields`` pauses or ``yield_s``
    seconds (whichever lasts longer), then naps from ``lo`` doubling to ``hi`` seconds.
    :meth:`busy` starts over (something happened)."""

    def __init__(self, lo: float = 2e-4, hi: float = 2e-3, yields: int = 0,
                 yield_s: float = 0.0):
        self.lo, self.hi, self.yields, self.yield_s = lo, hi, yields, yield_s
        self.busy()

    def busy(self) -> None:
        self.t, self.tries = self.lo, 0
        self._yield_until = time.perf_counter() + self.yield_s if self.yield_s else 0.0

    def idle(self) -> None:
        """One pause."""
        self.tries += 1
        if self.tries <= self.yields or (self._yield_until and
                                         time.perf_counter() < self._yield_until):
            os.sched_yield()
            return
        time.sleep(self.t)
        self.t = min(self.t * 2, self.hi)


def until(ready, backoff: Backoff | None = None) -> None:
    """Call ``ready()`` until it returns true, pausing between calls."""
    backoff = backoff or Backoff()
    while not ready():
        backoff.idle()


def wait(reqs, yield_s: float = 5e-3) -> None:
    """Until every request in ``reqs`` is complete; yields the CPU for ``yield_s``, then
    naps.  A rank that must drive MPI progress for a transfer to it (a fetch over TCP)
    yields for as long as the transfer may take."""
    if not reqs:
        return
    from mpi4py import MPI
    until(lambda: MPI.Request.Testall(reqs), Backoff(5e-5, 1e-3, yield_s=yield_s))


def recv(comm, source: int, tag: int, backoff: Backoff | None = None, status=None):
    """A blocking receive of a pickled message that pauses between probes instead of
    spinning.  ``source``/``tag`` may be ``MPI.ANY_SOURCE``/``MPI.ANY_TAG``; ``status``,
    where given, says which message came."""
    from mpi4py import MPI
    st = status if status is not None else MPI.Status()
    until(lambda: comm.Iprobe(source=source, tag=tag, status=st), backoff)
    return comm.recv(source=st.Get_source(), tag=st.Get_tag())
