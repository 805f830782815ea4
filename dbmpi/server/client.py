"""A client of the parameter server (a replica's partition, or the coordinator): fetches
its slice of the parameters and pushes its accumulated gradient.

Two ways to reach a shard, chosen per client-shard pair at start-up
(:func:`~dbmpi.server.rma.probe_progress`):

- *passive*: the transport carries RMA without the shard's help (shared memory, RDMA).
  Fetches read under the shard's seqlock; plain-SGD pushes (``direct_lr``) are applied by
  the client itself with ``Accumulate`` inside the seqlock's write section, so the shard
  computes nothing; Adagrad pushes go through the inbox.
- *attended*: the shard's MPI library does the RMA work in software (TCP).  The client
  rings the shard's bell and waits for its answer, driving its own side meanwhile.  A
  push part up to ``PULL_MAX_BYTES``: the client leaves it in its outbox window and rings;
  the shard ``Get``s it into the client's inbox slot and answers, and nobody calls
  ``Win_flush``, which MPI implementations busy-poll.  A larger part the client ``Put``s
  into its slot between two rings, while the shard keeps calling MPI.  Plain SGD sends the
  update itself, ``-lr x gradient``, which the shard adds: never a software
  ``Accumulate``, which runs at a tenth of a ``Put``'s speed there.  A fetch: the shard
  ``Put``s its slice into this client's landing window (``theta``) and answers.

Either way a fetch of shard s sees one version of it (never half an update), and each push
a shard takes is applied exactly once, as one update.  A push holding NaN/Inf is dropped
whole by the client, at every shard (checked while its large parts are on the wire, which
the shards then discard).  Staleness of a push = the shard's version when it is applied
minus the version the client fetched.
"""

from __future__ import annotations

import numpy as np

from ..optim import all_finite
from .rma import FLAG, HEADER, Atomics, SeqLock, inbox_slots, overlaps, settle
from ..tags import BELL_FETCH, BELL_FETCHED, BELL_PUSH, BELL_PUT, BELL_PUT_DONE, BELL_TAKEN
from .shard import BELL_WORDS, GRADIENT, PULL_MAX_BYTES, UPDATE

__all__ = ["PSClient"]


def _mpi():
    from mpi4py import MPI
    return MPI


class PSClient:
    """Client ``client`` (its index among the inbox slots: replica x partitions + partition)
    of the shards, reading and writing ``[lo, hi)`` of the flat vector.

    Parameters
    ----------
    params_wins, inbox_wins : every shard's windows
    ranges : every shard's range; ``shard_ranks`` their ranks in the RMA communicator
    rank : this client's rank there (its seqlock token is rank + 1)
    slot_ranges : per shard, the ranges given to its inbox (None: I push through no inbox)
    direct_lr : set for plain SGD: pushes carry ``-lr x gradient``
    attended : indices of the shards I must ring (see the module doc); ``bell`` their bell
    landing : my landing window, ``4 x (hi - lo)`` bytes: :attr:`theta` lives there
    outbox : my outbox window, as large, where attended shards take my push parts of up to
        ``pull_max_bytes`` from (:attr:`outbox`: a push of that very array is not copied)
    """

    def __init__(self, params_wins, inbox_wins, ranges, shard_ranks, rank: int, client: int,
                 lo: int = 0, hi: int | None = None, slot_ranges=None,
                 direct_lr: float | None = None, attended=frozenset(), bell=None,
                 landing=None, outbox=None, pull_max_bytes: int = PULL_MAX_BYTES,
                 max_staleness_bins: int = 64):
        self.pw, self.iw = params_wins, inbox_wins
        self.direct_lr = direct_lr
        self.ranges, self.shard_ranks = ranges, shard_ranks
        self.client = client
        self.lo, self.hi = lo, ranges[-1][1] if hi is None else hi
        self.attended, self.bell = frozenset(attended), bell
        # (shard, offset in shard, offset in my slice, length) for each overlapping shard
        self.parts = overlaps(ranges, self.lo, self.hi)
        # my inbox slot's byte offset in each shard I push to through its inbox
        self.slot = {}
        for s, *_ in self.parts:
            if slot_ranges is not None and slot_ranges[s] is not None:
                off, n = inbox_slots(ranges[s], slot_ranges[s])[0][client]
                if n:
                    self.slot[s] = off
        self.fetched_version = {s: 0 for s, *_ in self.parts}
        self.pushes_sent = 0
        self.push_attempts = 0
        self.rejected = 0             # parts of pushes holding NaN/Inf, dropped here
        self.staleness = np.zeros(max_staleness_bins, dtype=np.int64)   # of direct pushes
        self._meta = {s: np.zeros(3, dtype=np.int64) for s, *_ in self.parts}
        self._scaled = None
        # what I ring with: a push's words stay in use until its part is applied (a large
        # part's two rings), so fetches have their own
        self._asks = {s: np.zeros(BELL_WORDS, dtype=np.int64) for s in self.attended}
        self._fetch_asks = {s: np.zeros(BELL_WORDS, dtype=np.int64) for s in self.attended}
        self._done_words = {s: np.zeros(BELL_WORDS, dtype=np.int64) for s in self.attended}
        self._taken = {s: np.zeros(1, dtype=np.int64) for s in self.attended}
        self._applying = {s: [] for s in self.attended}   # a large part's answer and rings
        self._answers = {s: np.zeros(1, dtype=np.int64) for s in self.attended}
        self.landing = landing
        # my copy of the parameters: fetches land here (in MPI memory when I have a window)
        self.theta = (landing.view(0, self.hi - self.lo, np.float32) if landing is not None
                      else np.empty(self.hi - self.lo, dtype=np.float32))
        self._outbox, self.pull_max_bytes = outbox, pull_max_bytes
        self.outbox = (outbox.view(0, self.hi - self.lo, np.float32)
                       if outbox is not None and outbox.nbytes else None)
        if self.outbox is not None:
            outbox.lock_all()          # for Win.Sync: my stores, then the shards' Gets
        for w in list(params_wins) + list(inbox_wins):
            w.lock_all()
        # the seqlocks of the shards I read and write myself (passive); slot flags
        self._seq = {s: SeqLock(self.pw[s], shard_ranks[s], rank + 1) for s, *_ in self.parts
                     if s not in self.attended}
        self._flags = {s: Atomics(self.iw[s], shard_ranks[s]) for s in self.slot}

    def fetch(self, out: np.ndarray | None = None) -> np.ndarray:
        """Read my slice of the parameters into :attr:`theta` (and copy it to ``out`` if
        given); each shard's part is one version of it.  Returns what was filled."""
        MPI = _mpi()
        theta = self.theta
        asked = [p for p in self.parts if p[0] in self.attended]
        reqs = []
        for s, off, mine, n in asked:         # every attended shard starts at once
            self._fetch_asks[s][:3] = (off, mine, n)
            rank = self.shard_ranks[s]
            reqs.append(self.bell.Irecv(self._answers[s], source=rank, tag=BELL_FETCHED))
            reqs.append(self.bell.Isend(self._fetch_asks[s], dest=rank, tag=BELL_FETCH))
        for s, off, mine, n in self.parts:
            if s not in self.attended:
                rank, win = self.shard_ranks[s], self.pw[s].win
                self.fetched_version[s] = self._seq[s].read(
                    lambda: win.Get(theta[mine:mine + n], rank,
                                    target=(HEADER + 4 * off, n, MPI.FLOAT)))
        settle(reqs)                          # drives my side of the shards' Puts
        for s, *_ in asked:
            self.fetched_version[s] = int(self._answers[s][0])
        if out is not None and out is not theta:
            out[...] = theta
            return out
        return theta

    def push(self, acc: np.ndarray, update: bool = False) -> bool:
        """Offer my accumulated gradient slice to every shard.

        Returns True when every shard took its part (the caller may then treat ``acc`` as
        empty without zeroing it); otherwise zeroes the parts that were taken, so the rest
        goes with the next push, and returns False.  Direct pushes are always taken.

        A push holding NaN/Inf is dropped whole, at every shard (no shard applies its finite
        parts): it counts in :attr:`rejected` (a part each) and True is returned.  The check
        runs while the large attended parts are on the wire, and they are handed over only
        once it passed.  ``update`` (plain SGD): acc is already ``-lr x gradient`` (saves a
        pass)."""
        send = acc
        if self.direct_lr is not None and not update:
            if self._scaled is None:
                self._scaled = np.empty(self.hi - self.lo, dtype=np.float32)
            send, update = self._scaled, True
            np.multiply(acc, np.float32(-self.direct_lr), out=send)
        kind = UPDATE if update else GRADIENT
        if self.direct_lr is None and len(self.slot) < len(self.parts):
            raise RuntimeError(f"client {self.client} has no inbox slot at some of its shards "
                               "and pushes no direct updates")
        attended = [p for p in self.parts if p[0] in self.attended]
        put = [p for p in attended if 4 * p[3] > self.pull_max_bytes]
        moving = self._start_puts(put, send)
        ok = self._finite_while(send, moving)
        self.push_attempts += len(self.parts)
        if not ok:                                # every part offered, and dropped here
            self.pushes_sent += len(self.parts)
            self.rejected += len(self.parts)
            self._end_puts(put, moving, 0)        # the shards drop what I Put
            return True
        pulled = self._ring_pulled([p for p in attended if p not in put], send, kind)
        self._end_puts(put, moving, kind)
        settle(pulled)
        taken = [(mine, n) for _, _, mine, n in attended]
        inbox = [p for p in self.parts if p[0] in self.slot and p[0] not in self.attended]
        for s, off, mine, n in self._push_inbox(inbox, send, kind):
            taken.append((mine, n))
        for s, off, mine, n in self.parts:
            if s not in self.slot:
                self._push_direct(s, off, send[mine:mine + n])
                taken.append((mine, n))
        self.pushes_sent += len(taken)
        if len(taken) == len(self.parts):
            return True
        for mine, n in taken:
            acc[mine:mine + n] = 0
        return False

    # elements checked between two polls of the Puts under way (1 MiB: about 20 us)
    CHECK_CHUNK = 1 << 18

    def _finite_while(self, a: np.ndarray, reqs) -> bool:
        """Whether ``a`` holds no NaN/Inf, checked a chunk at a time while driving my side of
        the transfers ``reqs`` (over TCP the sender's MPI moves the bytes only when called)."""
        if not reqs:
            return all_finite(a)
        for i in range(0, len(a), self.CHECK_CHUNK):
            if not all_finite(a[i:i + self.CHECK_CHUNK]):
                return False
            _mpi().Request.Testall(reqs)
        return True

    def _start_puts(self, parts, send: np.ndarray):
        """The large attended parts: once each shard has applied my last part there (my
        slot is free), ring it and ``Put`` the part into my slot.  Returns the Puts'
        requests (:meth:`_end_puts` completes them)."""
        if not parts:
            return []
        MPI = _mpi()
        if any(self._applying[s] for s, *_ in parts):
            settle([r for s, *_ in parts for r in self._applying[s]])
        for s, off, mine, n in parts:
            self._asks[s][:] = (off, mine, n, self.client, 0, self.fetched_version[s])
            rank = self.shard_ranks[s]
            self._applying[s] = [self.bell.Irecv(self._taken[s], source=rank, tag=BELL_TAKEN),
                                 self.bell.Isend(self._asks[s], dest=rank, tag=BELL_PUT)]
        return [self.iw[s].win.Rput(send[mine:mine + n], self.shard_ranks[s],
                                    target=(self.slot[s] + HEADER, n, MPI.FLOAT))
                for s, off, mine, n in parts]

    def _end_puts(self, parts, reqs, kind: int) -> None:
        """Complete the Puts, then tell each shard to apply its part as ``kind`` (0: drop
        it).  Its answer (applied) is waited for at my next push there, or by
        :meth:`wait_applied`."""
        if not parts:
            return
        settle(reqs)
        for s, off, mine, n in parts:
            rank = self.shard_ranks[s]
            self.iw[s].win.Flush(rank)
            self._done_words[s][:] = self._asks[s]
            self._done_words[s][4] = kind
            self._applying[s].append(self.bell.Isend(self._done_words[s], dest=rank,
                                                     tag=BELL_PUT_DONE))

    def _ring_pulled(self, parts, send: np.ndarray, kind: int):
        """The small attended parts: leave each in my outbox and ring its shard, which Gets
        it (nobody flushes) and answers "taken".  Returns the requests to wait for
        (yielding, which drives my side of the Gets)."""
        if not parts:
            return []
        if self.outbox is None:
            raise RuntimeError(f"client {self.client} pushes to attended shards but has no "
                               "outbox window")
        if not np.shares_memory(send, self.outbox):
            for _, _, mine, n in parts:
                self.outbox[mine:mine + n] = send[mine:mine + n]
        self._outbox.win.Sync()
        reqs = []
        for s, off, mine, n in parts:
            self._asks[s][:] = (off, mine, n, self.client, kind, self.fetched_version[s])
            rank = self.shard_ranks[s]
            reqs += [self.bell.Irecv(self._taken[s], source=rank, tag=BELL_TAKEN),
                     self.bell.Isend(self._asks[s], dest=rank, tag=BELL_PUSH)]
        return reqs

    def wait_applied(self) -> None:
        """Until every shard has applied every part I pushed (the large attended parts are
        applied after :meth:`push` returns)."""
        pending = [r for reqs in self._applying.values() for r in reqs]
        if pending:
            settle(pending)
        self._applying = {s: [] for s in self._applying}

    def _push_inbox(self, parts, send: np.ndarray, kind: int):
        """Hand each part over through my slot at its (passive) shard, where the shard has
        emptied it; every step goes to all the shards at once (three rounds, not three a
        shard).  Returns the parts taken."""
        if not parts:
            return []
        MPI = _mpi()
        shards = [p[0] for p in parts]
        MPI.Request.Waitall([self._flags[s].start(self.slot[s] + FLAG, 0, MPI.NO_OP)
                             for s in shards])
        free = [p for p in parts if not self._flags[p[0]].result()]   # else not taken yet
        reqs = []
        for s, off, mine, n in free:
            rank, win, slot = self.shard_ranks[s], self.iw[s].win, self.slot[s]
            self._meta[s][:] = (self.fetched_version[s], off, n)
            reqs += [win.Rput(send[mine:mine + n], rank, target=(slot + HEADER, n, MPI.FLOAT)),
                     win.Rput(self._meta[s], rank, target=(slot + 8, 3, MPI.INT64_T))]
        MPI.Request.Waitall(reqs)
        for s, *_ in free:                 # the data lands before the flag that hands it over
            self.iw[s].win.Flush(self.shard_ranks[s])
        MPI.Request.Waitall([self._flags[s].start(self.slot[s] + FLAG, kind, MPI.REPLACE)
                             for s, *_ in free])
        return free

    def _push_direct(self, s: int, off: int, delta: np.ndarray) -> None:
        """Add ``delta`` (-lr x gradient, checked finite) to shard s's parameters myself,
        inside its seqlock's write section."""
        MPI = _mpi()
        rank, win = self.shard_ranks[s], self.pw[s].win
        with self._seq[s].writing() as before:
            win.Accumulate(delta, rank, target=(HEADER + 4 * off, len(delta), MPI.FLOAT),
                           op=MPI.SUM)
            win.Flush(rank)
        stale = before - self.fetched_version[s]
        self.staleness[min(max(stale, 0), len(self.staleness) - 1)] += 1
