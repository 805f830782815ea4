"""RMA primitives of the parameter server: windows, atomics, the seqlock, and the probe that
tells which client-shard pairs need the shard to drive progress.

Every rank holds a shared ``Lock_all`` on every window for the whole run; all access is
``Put``/``Get``/``Accumulate`` plus ``Flush``, and the handshakes between ranks are MPI
atomics (``Fetch_and_op``, ``Compare_and_swap``).  No ``Lock``/``Unlock`` epoch is opened per
operation: under MPICH such an epoch waits for the target's next MPI call, every time.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

from ..mpiwait import Backoff, wait

__all__ = ["Window", "SeqLock", "Atomics", "HEADER", "inbox_slots", "overlaps", "probe_progress",
           "settle"]

HEADER = 32          # bytes: four int64
VERSION, MUTEX = 0, 8   # byte offsets in the params window's header
FLAG = 0                # byte offset of an inbox slot's flag in its header


def _mpi():
    from mpi4py import MPI
    return MPI


class Window:
    """One RMA window; memory allocated by MPI on the owning rank only (``Win.Allocate``:
    5-20x faster transfers than ``Win.Create`` over numpy memory, measured).  The creator
    calls :meth:`lock_all` once; :meth:`free` is collective and idempotent."""

    def __init__(self, comm, nbytes: int):
        MPI = _mpi()
        # Concurrent atomics on one location use one op or NO_OP (the seqlock's version:
        # SUM / NO_OP; a slot's flag: REPLACE / NO_OP), and every dependent operation is
        # flushed first: telling MPI so lets it use the CPU's atomics rather than a lock
        # (MPICH in shared memory: the atomics' slow tail went from 20 to 2 us, measured)
        info = MPI.Info.Create()
        info.Set("accumulate_ops", "same_op_no_op")
        info.Set("accumulate_ordering", "none")
        # whole pages: MPICH lays a node's windows end to end, so each stays page-aligned
        self.win = MPI.Win.Allocate(-(-nbytes // 4096) * 4096, 1, info=info, comm=comm)
        info.Free()
        self.nbytes = nbytes
        self.mem = (np.frombuffer(self.win.tomemory(), dtype=np.uint8) if nbytes
                    else np.zeros(0, np.uint8))
        self._freed = False
        self._all = False

    def lock_all(self) -> None:
        """Start this rank's shared access epoch to every rank, kept until free()."""
        if self._freed:
            raise RuntimeError("RMA window used after free()")
        if not self._all:
            self.win.Lock_all()
            self._all = True

    def view(self, offset: int, count: int, dtype) -> np.ndarray:
        """A numpy view of this rank's own window memory."""
        return self.mem[offset:offset + count * np.dtype(dtype).itemsize].view(dtype)

    def free(self) -> None:
        """Collective; safe to call twice."""
        if not self._freed:
            self._freed = True
            self.mem = None
            if self._all:
                self.win.Unlock_all()
            self.win.Free()


def settle(reqs) -> None:
    """Wait for RMA requests while yielding the core: the target of an attended transfer
    (and its other clients) may need it to make progress, and MPI's own blocking waits
    would spin it away."""
    wait(reqs, yield_s=10.0)


class Atomics:
    """Single-int64 atomics on one window towards one target rank (needs ``Lock_all``):
    blocking (``fetch_op`` and its shorthands), or started and waited for by the caller
    (:meth:`start`, :meth:`result`)."""

    def __init__(self, window: Window, rank: int):
        self.w, self.rank = window, rank
        self._arg = np.zeros(1, dtype=np.int64)
        self._cmp = np.zeros(1, dtype=np.int64)
        self._res = np.zeros(1, dtype=np.int64)

    def fetch_op(self, disp: int, value: int, op) -> int:
        """The int64 at byte ``disp`` before ``op(value)`` was applied to it."""
        self._arg[0] = value
        self.w.win.Fetch_and_op(self._arg, self._res, self.rank, disp, op)
        self.w.win.Flush(self.rank)
        return int(self._res[0])

    def start(self, disp: int, value: int, op):
        """Issue ``op(value)`` at byte ``disp``; returns the request, after which
        :meth:`result` is the value before (Get_accumulate and Fetch_and_op are atomic
        with each other)."""
        self._arg[0] = value
        return self.w.win.Rget_accumulate(self._arg, self._res, self.rank,
                                          target=(disp, 1, _mpi().INT64_T), op=op)

    def result(self) -> int:
        return int(self._res[0])

    def read(self, disp: int) -> int:
        return self.fetch_op(disp, 0, _mpi().NO_OP)

    def add(self, disp: int, value: int) -> int:
        return self.fetch_op(disp, value, _mpi().SUM)

    def swap(self, disp: int, value: int) -> int:
        return self.fetch_op(disp, value, _mpi().REPLACE)

    def cas(self, disp: int, expect: int, value: int) -> int:
        """Compare-and-swap; returns the old value (== expect: swapped)."""
        self._arg[0], self._cmp[0] = value, expect
        self.w.win.Compare_and_swap(self._arg, self._cmp, self._res, self.rank, disp)
        self.w.win.Flush(self.rank)
        return int(self._res[0])


def _retry():
    """Between tries at a seqlock held by another rank: give the core away
    (``sched_yield``) for the first tries, then nap, longer each time.  A write section
    lasts microseconds, unless its writer lost its core; then yielding lets it run at once
    where it shares mine, where the shortest nap (about 60 us, timer slack included) would
    cost more than the wait itself.  On an oversubscribed node, readers that napped at
    once spent most of a fetch asleep (MPICH: 1,300-1,600 naps in 8,000 reads)."""
    return Backoff(lo=2e-5, hi=1e-3, yields=64).idle


class SeqLock:
    """The params window's seqlock, seen from one rank (``token``: nonzero, unique) towards
    the shard at ``rank``.

    A writer takes the mutex (compare-and-swap), makes the version odd, writes, makes it even
    and releases; a reader ``Get``s between two reads of an even, unchanged version, else
    retries.  So a fetch never sees a half-applied update and no rank waits for another to
    call MPI on a transport whose RMA needs none (shared memory, RDMA hardware)."""

    def __init__(self, window: Window, rank: int, token: int, solo: bool = False):
        self.a = Atomics(window, rank)
        self.w, self.rank, self.token = window, rank, token
        self.solo = solo      # the shard itself, when no client writes: no mutex needed

    def version(self) -> int:
        """The raw version: 2 x updates, odd while one is being written."""
        return self.a.read(VERSION)

    @contextmanager
    def mutex(self):
        if self.solo:
            yield
            return
        retry = _retry()
        while self.a.cas(MUTEX, 0, self.token):
            retry()                      # another writer: yields, then naps, not a spin
        try:
            yield
        finally:
            self.a.cas(MUTEX, self.token, 0)

    @contextmanager
    def writing(self):
        """Exclusive update; yields the number of updates applied before this one."""
        with self.mutex():
            old = self.a.add(VERSION, 1)
            try:
                yield old // 2
            finally:
                self.w.win.Sync()           # local stores before the version says done
                self.a.add(VERSION, 1)

    def read(self, get) -> int:
        """Call ``get()`` (which issues the Gets) until it ran on one version; returns the
        number of updates that version holds."""
        retry = _retry()
        while True:
            v = self.version()
            if not v % 2:
                get()
                self.w.win.Flush(self.rank)
                if self.version() == v:
                    return v // 2
            retry()


def overlaps(ranges, lo: int, hi: int):
    """Where ``[lo, hi)`` meets each of ``ranges``: ``(index, offset in that range, offset in
    [lo, hi), length)`` for every range it meets."""
    out = []
    for i, (a, b) in enumerate(ranges):
        x, y = max(a, lo), min(b, hi)
        if x < y:
            out.append((i, x - a, x - lo, y - x))
    return out


def inbox_slots(shard_range, client_ranges):
    """Where each client's inbox slot lies in the inbox of the shard owning ``shard_range``:
    ``([(byte offset, length) per client], total bytes)``.  A slot holds the header
    ``(flag, fetched version, offset, length)`` and room for the client's overlap with the
    shard (``length`` floats); a client whose range misses the shard (or is ``(0, 0)``: it
    has no slot there) has none (length 0, no bytes)."""
    a, b = shard_range
    slots, pos = [], 0
    for lo, hi in client_ranges:
        n = max(min(b, hi) - max(a, lo), 0)
        slots.append((pos, n))
        pos += HEADER + 4 * n if n else 0
    return slots, pos


PROBE_SLEEP_S = 0.3     # the shards stay out of MPI this long while the clients probe,
PROBE_DELAY_S = 0.05    # which begins this long after the barrier (a shard may still be
PROBE_PASSIVE_S = 0.1   # finishing it); an atomic done sooner did not need the shard


def probe_progress(comm, shard_ranks, mode: str = "auto") -> list[set[int]]:
    """Collective over ``comm``: for each rank, the indices of the shards it must *attend*
    (ring before an RMA access, so the shard drives MPI progress while it lasts).

    ``mode``: ``"passive"`` (none), ``"attended"`` (every shard of every other rank) or
    ``"auto"``: measured.  Every non-shard rank issues one atomic fetch to each shard while
    the shards sleep outside MPI for PROBE_SLEEP_S.  Where it completes at once, the
    transport carries RMA without the target (shared memory, RDMA NICs); where it waits for
    the shard to wake, the target's MPI library does the work in software (TCP, and
    MPICH's network module even within a node), and the pair is attended.
    """
    size, me = comm.Get_size(), comm.Get_rank()
    is_shard = me in shard_ranks
    if mode != "auto":
        every = set(range(len(shard_ranks))) if mode == "attended" else set()
        return [set() if r in shard_ranks else set(every) for r in range(size)]
    MPI = _mpi()
    w = Window(comm, 8 if is_shard else 0)
    if is_shard:
        w.view(0, 1, np.int64)[0] = 0
    comm.Barrier()
    w.lock_all()
    links = [Atomics(w, r) for r in shard_ranks] if not is_shard else []
    for a in links:            # connections made while every shard is inside MPI (Barrier)
        a.read(0)
    comm.Barrier()
    mine = set()
    if is_shard:
        time.sleep(PROBE_SLEEP_S)    # no MPI call: RMA that needs me waits until I return
    else:                            # one atomic to every shard at once, each timed alone
        time.sleep(PROBE_DELAY_S)
        one, got = np.zeros(len(links), np.int64), np.zeros(len(links), np.int64)
        t0 = time.perf_counter()
        reqs = {s: w.win.Rget_accumulate(one[s:s + 1], got[s:s + 1], r, target=(0, 1,
                                         MPI.INT64_T), op=MPI.NO_OP)
                for s, r in enumerate(shard_ranks)}
        while reqs:
            for s in [s for s, q in reqs.items() if q.Test()]:
                del reqs[s]
                if time.perf_counter() - t0 > PROBE_PASSIVE_S:
                    mine.add(s)
            time.sleep(1e-4)
    comm.Barrier()
    w.free()
    return comm.allgather(mine)
