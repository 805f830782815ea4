"""The sharded parameter server over MPI one-sided RMA.

Each shard s owns the contiguous range ``[lo_s, hi_s)`` of the flat parameter vector and two
windows made with ``MPI.Win.Allocate`` (MPI-NOTES.md: 5-20x faster than ``Win.Create``):

- *params*: a header (int64 version, int64 writer mutex) and the float32 parameters.
  Every rank holds a shared ``Lock_all`` on it for the whole run, and updates are ordered by
  a seqlock made of RMA atomics: a writer takes the mutex (``Compare_and_swap``), makes the
  version odd, writes, makes it even and releases; a reader ``Get``s between two reads of an
  even, unchanged version, else retries.  So a fetch never sees a half-applied update, and
  no epoch waits for the shard to call MPI (a lock epoch does: 6 ms for 21 MB against a
  shard that polls every 2 ms, 2.2 ms under ``Lock_all``, measured here).
- *inbox*: one slot per client (replica x partition) whose slice overlaps the shard: an
  int64 header ``(full, fetched_version, offset, length)`` and room for the float32
  gradient of that overlap only (:func:`inbox_slots`), so a shard's inbox holds about
  ``replicas`` copies of its range whatever the partitioning; none with direct pushes.
  A client ``Put``s into its own slot under a shared lock only when it is empty; the
  shard drains full slots under an exclusive lock and applies each as one update,
  exactly once.  A replica whose slot is still full keeps accumulating and retries
  at its next push, so replicas never wait for the server.

*Direct* pushes (plain SGD in Downpour, ``PSClient(direct_lr=...)``): the client itself
``Accumulate``s ``-lr * gradient`` into the params window and bumps the version with
``Fetch_and_op``, in one exclusive-lock epoch, so fetches still never see half an update and
each push is applied exactly once; the shard computes nothing (MPI-NOTES.md: two replicas
pushing this way into one shard ran 1.95x one replica on 2 cores).  Adagrad needs the
shard's accumulators, so it goes through the inbox.

Staleness of a push = the shard's version when it applies the push minus the version the
replica fetched.  Gradient payloads never travel as two-sided messages.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

from .optim import all_finite

__all__ = ["Window", "ShardServer", "PSClient", "HEADER"]

HEADER = 32  # bytes: four int64 (params: version x 2, writer mutex, two spare)
_VERSION, _MUTEX = 0, 8   # byte offsets in the params header


def _mpi():
    from mpi4py import MPI
    return MPI


class Window:
    """One RMA window; memory allocated by MPI on the owning rank only."""

    def __init__(self, comm, nbytes: int):
        MPI = _mpi()
        self.win = MPI.Win.Allocate(nbytes, 1, comm=comm)
        self.nbytes = nbytes
        self.mem = (np.frombuffer(self.win.tomemory(), dtype=np.uint8) if nbytes
                    else np.zeros(0, np.uint8))
        self._freed = False
        self._all = False

    def lock_all(self) -> None:
        """Start this rank's access epoch to every rank, kept until free()."""
        if not self._all:
            self.win.Lock_all()
            self._all = True

    def view(self, offset: int, count: int, dtype) -> np.ndarray:
        """A numpy view of this rank's own window memory."""
        return self.mem[offset:offset + count * np.dtype(dtype).itemsize].view(dtype)

    @contextmanager
    def lock(self, rank: int, exclusive: bool = False):
        if self._freed:
            raise RuntimeError("RMA window used after free()")
        MPI = _mpi()
        self.win.Lock(rank, MPI.LOCK_EXCLUSIVE if exclusive else MPI.LOCK_SHARED)
        try:
            yield self.win
        finally:
            self.win.Unlock(rank)

    def free(self) -> None:
        """Collective; safe to call twice."""
        if not self._freed:
            self._freed = True
            self.mem = None
            if self._all:
                self.win.Unlock_all()
            self.win.Free()


def inbox_slots(shard_range, client_ranges):
    """Where each client's inbox slot lies in the inbox of the shard owning ``shard_range``:
    ``([(byte offset, length) per client], total bytes)``.  A slot holds the header and the
    client's overlap with the shard (``length`` floats); a client whose slice misses the
    shard has none (length 0, no bytes)."""
    a, b = shard_range
    slots, pos = [], 0
    for lo, hi in client_ranges:
        n = max(min(b, hi) - max(a, lo), 0)
        slots.append((pos, n))
        pos += HEADER + 4 * n if n else 0
    return slots, pos


def create_windows(comm, ranges, client_ranges, my_shard: int | None):
    """Collective over ``comm``: the params and inbox windows of every shard.

    ``client_ranges``: the slice of the flat vector each client (replica x partition)
    pushes, in client order; empty where no client pushes through the inbox (direct
    pushes).  Returns ``(params_windows, inbox_windows)``; each window spans all ranks of
    ``comm`` but only shard ``s``'s rank allocates memory in window ``s``.
    """
    params, inbox = [], []
    for s, (lo, hi) in enumerate(ranges):
        mine = s == my_shard
        params.append(Window(comm, HEADER + 4 * (hi - lo) if mine else 0))
        inbox.append(Window(comm, inbox_slots((lo, hi), client_ranges)[1] if mine else 0))
    return params, inbox


class _SeqLock:
    """The params window's seqlock, seen from one rank (``token``: nonzero, unique) towards
    shard rank ``rank``; needs the window's ``Lock_all``.  See the module doc."""

    def __init__(self, window: Window, rank: int, token: int):
        self.w, self.rank = window, rank
        self._tok = np.array([token], dtype=np.int64)
        self._zero = np.zeros(1, dtype=np.int64)
        self._one = np.ones(1, dtype=np.int64)
        self._res = np.zeros(1, dtype=np.int64)

    def _atomic(self, fn, *args) -> int:
        fn(*args)
        self.w.win.Flush(self.rank)
        return int(self._res[0])

    def version(self) -> int:
        """The raw version: 2 x updates, odd while one is being written."""
        return self._atomic(self.w.win.Fetch_and_op, self._one, self._res, self.rank,
                            _VERSION, _mpi().NO_OP)

    @contextmanager
    def mutex(self):
        pause = 2e-5
        while self._atomic(self.w.win.Compare_and_swap, self._tok, self._zero, self._res,
                           self.rank, _MUTEX):
            time.sleep(pause)           # another writer: short naps, not a spin
            pause = min(pause * 2, 1e-3)
        try:
            yield
        finally:
            self._atomic(self.w.win.Compare_and_swap, self._zero, self._tok, self._res,
                         self.rank, _MUTEX)

    @contextmanager
    def writing(self):
        """Exclusive update; yields the number of updates applied before this one."""
        with self.mutex():
            old = self._atomic(self.w.win.Fetch_and_op, self._one, self._res, self.rank,
                               _VERSION, _mpi().SUM)
            try:
                yield old // 2
            finally:
                self.w.win.Sync()           # local stores before the version says done
                self._atomic(self.w.win.Fetch_and_op, self._one, self._res, self.rank,
                             _VERSION, _mpi().SUM)

    def read(self, get) -> int:
        """Call ``get()`` (which issues the Gets) until it ran on one version; returns
        the number of updates that version holds."""
        pause = 2e-5
        while True:
            v = self.version()
            if not v % 2:
                get()
                self.w.win.Flush(self.rank)
                if self.version() == v:
                    return v // 2
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)


class ShardServer:
    """Shard ``index``: owns its windows' memory and applies pushes with ``optimizer``."""

    def __init__(self, params_win: Window, inbox_win: Window, lo: int, hi: int,
                 client_ranges, optimizer, init: np.ndarray, max_staleness_bins: int = 64,
                 direct: bool = False):
        self.pw, self.iw = params_win, inbox_win
        self.direct = direct      # clients apply their pushes themselves (see the module doc)
        self.lo, self.hi, self.n = lo, hi, hi - lo
        # the inbox slots of the clients that push to me: (client, byte offset, length)
        self.slots = [(r, off, n) for r, (off, n) in
                      enumerate(inbox_slots((lo, hi), client_ranges)[0]) if n]
        self.opt = optimizer
        self._raw_version = self.pw.view(_VERSION, 1, np.int64)
        self.params = self.pw.view(HEADER, self.n, np.float32)
        self.params[:] = init
        self._raw_version[0] = 0
        self.pw.view(_MUTEX, 1, np.int64)[0] = 0
        for _, off, _ in self.slots:
            self._slot_header(off)[:] = 0
        self.applied = 0
        self.rejected = 0
        self.staleness = np.zeros(max_staleness_bins, dtype=np.int64)
        self._delta = np.empty(self.n, dtype=np.float32)
        self._version0 = 0        # direct pushes applied = version - this
        self._rank = None
        self.seq = None

    @property
    def rank(self):
        return self._rank

    @rank.setter
    def rank(self, rank: int) -> None:
        """This shard's rank in the RMA communicator (set by the caller before serving)."""
        self._rank = rank
        self.pw.lock_all()
        self.seq = _SeqLock(self.pw, rank, rank + 1)

    @property
    def version(self) -> int:
        """Updates applied so far."""
        return int(self._raw_version[0]) // 2

    def _slot_header(self, off):
        return self.iw.view(off, 4, np.int64)

    def _slot_grad(self, off, n):
        return self.iw.view(off + HEADER, n, np.float32)

    def poll(self) -> int:
        """Apply every full inbox slot once; return how many were applied or rejected.

        A full slot belongs to the shard until it clears the flag (the replica writes a slot
        only when it is empty), so the gradient is read in place, outside the lock: no copy,
        and the other replicas' pushes are not held up while it is applied."""
        if self.direct:
            return 0
        done = 0
        for _, slot, _ in self.slots:
            with self.iw.lock(self.rank, exclusive=True):
                hdr = self._slot_header(slot)
                full, fetched, off, n = (int(v) for v in hdr)
            if not full:
                continue
            done += 1
            self._apply(self._slot_grad(slot, n), fetched, off)
            with self.iw.lock(self.rank, exclusive=True):
                hdr[0] = 0
        return done

    def _apply(self, grad: np.ndarray, fetched: int, off: int = 0) -> None:
        """Apply one push (to elements off:off+len(grad)) as one update, or reject it whole
        if it holds NaN/Inf."""
        if not all_finite(grad):
            self.rejected += 1  # parameters unchanged
            return
        n = len(grad)
        delta = self._delta[:n]
        self.opt.delta(grad, delta, off)    # outside the lock that fetches wait on
        with self.seq.writing() as before:
            self.params[off:off + n] -= delta
        self.applied += 1
        self.staleness[min(max(before - fetched, 0), len(self.staleness) - 1)] += 1

    def snapshot(self):
        """(params copy, optimizer state copies, version), consistent with each other."""
        with self.seq.mutex():
            if self.direct:
                self.applied = self.version - self._version0
            return (self.params.copy(), {k: v.copy() for k, v in self.opt.state.items()},
                    self.version)

    def restore(self, params, state, version):
        with self.seq.mutex():
            self.params[:] = params
            for k, v in state.items():
                if k in self.opt.state:
                    self.opt.state[k][:] = v
            self._raw_version[0] = 2 * version
            self.pw.win.Sync()
            self._version0 = version


class PSClient:
    """A replica's (or the coordinator's) side: fetch parameters, push gradients.

    ``lo, hi`` is the slice of the flat vector this client reads and writes (a partition's
    own slice under model parallelism; the whole vector otherwise); it talks only to the
    shards whose ranges overlap it.
    """

    def __init__(self, params_wins, inbox_wins, ranges, shard_ranks, client: int,
                 lo: int = 0, hi: int | None = None, direct_lr: float | None = None,
                 max_staleness_bins: int = 64, client_ranges=None):
        self.pw, self.iw = params_wins, inbox_wins
        self.direct_lr = direct_lr    # set: direct SGD pushes (see the module doc)
        self.ranges, self.shard_ranks = ranges, shard_ranks
        self.client = client      # my inbox slot: replica * partitions + partition
        self.lo, self.hi = lo, ranges[-1][1] if hi is None else hi
        # (shard, offset in shard, offset in my slice, length) for each overlapping shard
        self.parts = []
        for s, (a, b) in enumerate(ranges):
            x, y = max(a, self.lo), min(b, self.hi)
            if x < y:
                self.parts.append((s, x - a, x - self.lo, y - x))
        # my inbox slot's byte offset in each shard I push to (client_ranges as for
        # create_windows; None: I do not push through the inbox)
        self.slot = ({s: inbox_slots(ranges[s], client_ranges)[0][client][0]
                      for s, *_ in self.parts} if client_ranges else None)
        self.fetched_version = {s: 0 for s, *_ in self.parts}
        self.pending = {s: False for s, *_ in self.parts}
        self.pushes_sent = 0
        self.push_attempts = 0
        self.rejected = 0             # direct pushes holding NaN/Inf, dropped here
        self.staleness = np.zeros(max_staleness_bins, dtype=np.int64)   # of direct pushes
        self._hdr = np.zeros(4, dtype=np.int64)
        self._scaled = None
        self._seq = {}                # shard -> _SeqLock, after warm_up

    def warm_up(self) -> None:
        """One epoch to every shard on both windows (MPI-NOTES.md: the first epoch after
        window creation can block until the target next calls MPI), then the params
        windows' Lock_all and a first seqlock read."""
        for s, *_ in self.parts:      # the params header, and my inbox slot's if I have one
            targets = [(self.pw[s], 0)] + ([(self.iw[s], self.slot[s])] if self.slot else [])
            for w, at in targets:
                with w.lock(self.shard_ranks[s]) as win:
                    win.Get(self._hdr[:2], self.shard_ranks[s], target=(at, 2, _mpi().INT64_T))
        me = self.pw[0].win.Get_group().Get_rank() if self.pw else 0
        for s, *_ in self.parts:
            self.pw[s].lock_all()
            self._seq[s] = _SeqLock(self.pw[s], self.shard_ranks[s], me + 1)
            self._seq[s].version()

    def fetch(self, out: np.ndarray) -> None:
        """Read my slice of the parameters into ``out`` (length hi - lo), each shard's part
        from one version."""
        MPI = _mpi()
        for s, off, mine, n in self.parts:
            rank, win = self.shard_ranks[s], self.pw[s].win
            self.fetched_version[s] = self._seq[s].read(
                lambda: win.Get(out[mine:mine + n], rank, target=(HEADER + 4 * off, n, MPI.FLOAT)))

    def push(self, acc: np.ndarray, finite: bool = False, update: bool = False) -> bool:
        """Offer my accumulated gradient slice to every shard.

        Returns True when every shard took its part (the caller may then treat ``acc`` as
        empty without zeroing it); otherwise zeroes the parts that were taken, so the rest
        goes with the next push, and returns False.  Direct pushes are always taken;
        ``finite``: the caller has checked that acc holds no NaN/Inf (saves a pass);
        ``update`` (direct pushes): acc is already ``-lr x gradient`` (saves another)."""
        if self.direct_lr is not None:
            return self._push_direct(acc, finite, update)
        MPI = _mpi()
        if self.slot is None:
            raise RuntimeError("this client has no inbox slot (pass client_ranges)")
        taken = []
        for s, off, mine, n in self.parts:
            rank = self.shard_ranks[s]
            slot = self.slot[s]
            self.push_attempts += 1
            with self.iw[s].lock(rank) as win:
                win.Get(self._hdr[:1], rank, target=(slot, 1, MPI.INT64_T))
                win.Flush(rank)
                if self._hdr[0] != 0:
                    continue  # the shard has not taken my previous push yet
                win.Put(acc[mine:mine + n], rank, target=(slot + HEADER, n, MPI.FLOAT))
                win.Flush(rank)  # the gradient lands before the flag that hands it over
                self._hdr[:] = (1, self.fetched_version[s], off, n)
                win.Put(self._hdr, rank, target=(slot, 4, MPI.INT64_T))
            taken.append((mine, n))
            self.pushes_sent += 1
        if len(taken) == len(self.parts):
            return True
        for mine, n in taken:
            acc[mine:mine + n] = 0
        return False


    def _push_direct(self, acc: np.ndarray, finite: bool = False,
                     update: bool = False) -> bool:
        """Apply ``-lr * acc`` to every shard myself: one exclusive epoch per shard holding
        the version bump and the Accumulate.  A part with NaN/Inf is dropped whole."""
        MPI = _mpi()
        if self._scaled is None and not update:
            self._scaled = np.empty(self.hi - self.lo, dtype=np.float32)
        for s, off, mine, n in self.parts:
            part = acc[mine:mine + n]
            self.push_attempts += 1
            self.pushes_sent += 1
            if not (finite or all_finite(part)):
                self.rejected += 1      # as a shard would: the whole part, nothing applied
                continue
            if update:
                delta = part
            else:
                delta = self._scaled[mine:mine + n]
                np.multiply(part, np.float32(-self.direct_lr), out=delta)
            rank, win = self.shard_ranks[s], self.pw[s].win
            with self._seq[s].writing() as before:
                win.Accumulate(delta, rank, target=(HEADER + 4 * off, n, MPI.FLOAT),
                               op=MPI.SUM)
                win.Flush(rank)
            stale = before - self.fetched_version[s]
            self.staleness[min(max(stale, 0), len(self.staleness) - 1)] += 1
        return True


class PSSetup:
    """What every rank of a parameter-server algorithm shares: the partitioned layout, the
    shards' ranges and windows (created collectively here), and, off the shards, this rank's
    client (a replica partition's slice and inbox slot; the whole vector for the
    coordinator)."""

    def __init__(self, topo, net, direct_lr: float | None = None):
        from .model.partition import Layout
        from .topology import shard_ranges
        self.layout = Layout(net, topo.partitions)   # shards hold the vector partition-major
        self.ranges = shard_ranges(net.num_params, topo.shards)
        # client replica x P + partition pushes its partition's slice (none: direct pushes)
        self.client_ranges = ([] if direct_lr is not None
                              else self.layout.ranges * topo.replicas)
        my_shard = topo.index if topo.role == "shard" else None
        self.pw, self.iw = create_windows(topo.rma, self.ranges, self.client_ranges, my_shard)
        self.client = None
        if topo.role == "replica":
            lo, hi = self.layout.ranges[topo.partition]
            self.client = PSClient(self.pw, self.iw, self.ranges, topo.shard_ranks,
                                   topo.index * topo.partitions + topo.partition, lo, hi,
                                   direct_lr=direct_lr, client_ranges=self.client_ranges)
        elif topo.role == "coordinator":
            self.client = PSClient(self.pw, self.iw, self.ranges, topo.shard_ranks, 0)

    def start(self, topo) -> None:
        """Collective: shards have initialised their memory; clients do their warm-up epochs
        (MPI-NOTES.md: the first epoch to a target may otherwise wait on it)."""
        topo.rma.Barrier()
        if self.client is not None:
            self.client.warm_up()

    def free(self) -> None:
        """Collective; only on success (after an error the launcher aborts the job, and a
        rank waiting in a collective would hang)."""
        for w in self.pw + self.iw:
            w.free()


class Backoff:
    """Sleep between polls, longer while nothing happens, so an idle rank costs little CPU."""

    def __init__(self, lo: float = 2e-4, hi: float = 2e-3):
        self.lo, self.hi, self.t = lo, hi, lo

    def idle(self) -> None:
        time.sleep(self.t)
        self.t = min(self.t * 2, self.hi)

    def busy(self) -> None:
        self.t = self.lo
