"""A parameter-server shard: owns its range of the flat vector and applies pushes.

The shard's *params* window holds a header (int64 version, int64 writer mutex) and its
float32 parameters; its *inbox* window holds one slot per client that pushes to it through
the inbox (:func:`~dbmpi.server.rma.inbox_slots`).  A client hands a push over by writing
its slot's data and then setting the slot's flag with an atomic; the shard applies every
flagged slot as one update, exactly once (or rejects it whole if it holds NaN/Inf), then
clears the flag with an atomic, which gives the slot back.  A replica whose slot is still
full keeps accumulating and offers the sum at its next push, so it never waits.

Attended clients (see :mod:`dbmpi.server.client`) reach a shard whose MPI library carries
out RMA in software (TCP) by ringing its bell (a small message) and waiting for its answer,
driving their own side meanwhile:

- a push part of at most :data:`PULL_MAX_BYTES`: the client rings with the part (offset,
  length, kind, the version it fetched); the shard ``Get``s it from the client's *outbox*
  window into the client's slot, answers "taken" and applies it.  The request's
  completion is the data's arrival, so nobody calls a blocking ``Win_flush``, which MPI
  implementations busy-poll: on a shared core, three clients flushing 13 KB towards two
  shards at once took 11 ms, where the pull took 0.3 ms.
- a larger part: the client rings, ``Put``s the part into its slot, flushes and rings
  again with the kind (0: drop it; the client checks the push for NaN/Inf while the
  bytes move); between the two rings the shard keeps calling MPI instead of napping, so
  the transfer moves at the transport's speed; then it applies the part and answers.  The
  client does not wait for that answer (it goes on computing) until its next push to the
  shard, or until it must know the part applied (:meth:`PSClient.wait_applied`).  Over
  TCP a bulk ``Put`` runs at twice a ``Get``'s speed, and the flush's spin is short beside
  the transfer.
- a fetch: the shard ``Put``s the slice asked for into the client's landing window, holding
  its seqlock's mutex (so no direct writer changes it meanwhile), and answers with the
  version it sent.
"""

from __future__ import annotations

import os
import time

import numpy as np

from ..optim import all_finite
from ..tags import BELL_FETCH, BELL_FETCHED, BELL_PUSH, BELL_PUT, BELL_PUT_DONE, BELL_TAKEN
from .rma import FLAG, HEADER, MUTEX, VERSION, Atomics, SeqLock, Window, inbox_slots, settle

__all__ = ["ShardServer", "GRADIENT", "UPDATE", "PULL_MAX_BYTES"]

GRADIENT, UPDATE = 1, 2     # slot flag: apply with the optimizer / add as it is (-lr x g)
# tags on the bell communicator.  A client's bell carries (offset in my range, offset in
# its window, length) and, for a push, (its client index, the slot flag kind, the version
# it fetched); my answers: taken (a push), the version sent (a fetch)
BELL_WORDS = 6
# an attended push part up to this size is pulled by the shard (latency-bound: a client's
# spinning flush would cost more than the bytes), a larger one Put by the client
PULL_MAX_BYTES = 1 << 20


class ShardServer:
    """Shard at ``rank`` of the RMA communicator, owning ``[lo, hi)``.

    Parameters
    ----------
    params_win, inbox_win : this shard's windows (memory allocated here)
    slot_ranges : per client, the range it pushes through this shard's inbox, ``(0, 0)``
        for none (as given to :func:`~dbmpi.server.rma.inbox_slots`)
    optimizer : applies GRADIENT pushes (``delta(grad, out, offset)``); may be None where
        a subclass overrides :meth:`_apply`
    init : float32, length hi - lo
    bell : communicator on which attended clients ring (None: nobody rings)
    landing : the clients' landing window (attended fetches are Put there)
    outbox : the clients' outbox window (attended pushes are taken from there)
    direct : clients may also update the params window themselves (version counts them;
        the writers then take the seqlock's mutex)
    """

    def __init__(self, params_win: Window, inbox_win: Window, rank: int, lo: int, hi: int,
                 slot_ranges, optimizer, init: np.ndarray, bell=None, landing=None,
                 outbox=None, direct: bool = False, max_staleness_bins: int = 64):
        self.pw, self.iw, self.rank = params_win, inbox_win, rank
        self.lo, self.hi, self.n = lo, hi, hi - lo
        self.direct, self.bell = direct, bell
        # the inbox slots of the clients that push to me: (client, byte offset, length)
        self.slots = [(c, off, n) for c, (off, n) in
                      enumerate(inbox_slots((lo, hi), slot_ranges)[0]) if n]
        self.opt = optimizer
        self._raw_version = self.pw.view(VERSION, 1, np.int64)
        self.params = self.pw.view(HEADER, self.n, np.float32)
        self.params[:] = init
        self._raw_version[0] = 0
        self.pw.view(MUTEX, 1, np.int64)[0] = 0
        for _, off, _ in self.slots:
            self.iw.view(off, 4, np.int64)[:] = 0
        self.applied = 0
        self.rejected = 0
        self.staleness = np.zeros(max_staleness_bins, dtype=np.int64)
        self._delta = np.empty(self.n, dtype=np.float32)
        self._version0 = 0        # direct pushes applied = version - this
        self.attended_s = 0.0     # time spent serving attended pushes and fetches
        self.pw.lock_all()        # for my own atomics (seqlock, slot flags)
        self.iw.lock_all()
        # the only writer of my parameters unless clients push directly: no writer mutex
        self.seq = SeqLock(self.pw, rank, rank + 1, solo=not direct)
        self._flags = Atomics(self.iw, rank)
        self.landing, self.outbox = landing, outbox
        for w in (landing, outbox):
            if w is not None:
                w.lock_all()
        self._slot_of = {c: off for c, off, _ in self.slots}
        self._bell_buf = np.zeros(BELL_WORDS, dtype=np.int64)
        self._fetches = []            # (client rank, offset here, offset there, length)
        self._pulls = []              # the same, then (client, kind, version fetched)
        self._putting = {}            # client rank -> its words, between BELL_PUT and done
        self._puts = []               # (client rank, words): Put and flushed, to apply
        self._answers = []            # sends of BELL_TAKEN / BELL_FETCHED still in flight
        self._taken = np.zeros(1, dtype=np.int64)
        self.fetches_served = 0

    @property
    def version(self) -> int:
        """Updates applied so far."""
        return int(self._raw_version[0]) // 2

    def poll(self) -> int:
        """Apply every flagged inbox slot once; return how many were applied or rejected.

        A flagged slot belongs to the shard until it clears the flag (the client writes a
        slot only when its flag is clear), so the gradient is read in place: no copy, and
        the other clients' pushes are not held up while it is applied."""
        if not self.slots:
            return 0
        done = 0
        # my own flags by plain loads (Win.Sync: see what clients' atomics wrote): an MPI
        # atomic here, polled this often, would queue behind the clients' atomics (MPICH
        # serialises a window's atomics through one mutex in shared memory)
        self.iw.win.Sync()
        for _, slot, _ in self.slots:
            kind = int(self.iw.view(slot + FLAG, 1, np.int64)[0])
            if not kind:
                continue
            done += 1
            self.iw.win.Sync()           # the data, Put and flushed before the flag was set
            _, fetched, off, n = (int(v) for v in self.iw.view(slot, 4, np.int64))
            self._apply(self.iw.view(slot + HEADER, n, np.float32), fetched, off,
                        kind == UPDATE)
            self._flags.swap(slot + FLAG, 0)
        return done

    def _apply(self, grad: np.ndarray, fetched: int, off: int = 0,
               update: bool = False) -> None:
        """Apply one push (to elements off:off+len(grad)) as one update, or reject it whole
        if it holds NaN/Inf.  ``update``: grad is the step itself (params += grad)."""
        if not all_finite(grad):
            self.rejected += 1  # parameters unchanged
            return
        n = len(grad)
        if update:
            delta, sign = grad, 1
        else:
            delta, sign = self._delta[:n], -1
            self.opt.delta(grad, delta, off)    # outside the lock that fetches wait on
        with self.seq.writing() as before:
            if sign > 0:
                self.params[off:off + n] += delta
            else:
                self.params[off:off + n] -= delta
        self.applied += 1
        self.staleness[min(max(before - fetched, 0), len(self.staleness) - 1)] += 1

    def ring(self) -> None:
        """Take the bells rung since the last call: pushes and fetches, queued for
        :meth:`serve`."""
        if self.bell is None:
            return
        from mpi4py import MPI
        st = MPI.Status()
        while self.bell.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=st):
            src, tag = st.Get_source(), st.Get_tag()
            self.bell.Recv(self._bell_buf, source=src, tag=tag)
            words = [int(v) for v in self._bell_buf]
            if tag == BELL_PUSH:
                self._pulls.append((src, *words))
            elif tag == BELL_PUT:
                self._putting[src] = words
            elif tag == BELL_PUT_DONE:     # its words as rung at BELL_PUT, but the kind
                self._putting.pop(src)
                self._puts.append((src, *words))
            elif tag == BELL_FETCH:
                self._fetches.append((src, *words[:3]))
            else:
                raise RuntimeError(f"shard {self.rank}: unknown bell tag {tag} from {src}")

    def _take_pulls(self) -> int:
        """Get every rung push from its client's outbox into its slot, answer each client
        (it may go on), then apply them.  Returns how many were applied or rejected."""
        if not self._pulls:
            return 0
        from mpi4py import MPI
        t = time.perf_counter()
        self._complete_answers()
        pulls, self._pulls = self._pulls, []
        win = self.outbox.win
        grads = [self.iw.view(self._slot_of[c] + HEADER, n, np.float32)
                 for _, _, _, n, c, _, _ in pulls]
        settle([win.Rget(g, src, target=(4 * there, n, MPI.FLOAT))
                for g, (src, _, there, n, *_) in zip(grads, pulls)])
        self._answers += [self.bell.Isend(self._taken, dest=src, tag=BELL_TAKEN)
                          for src, *_ in pulls]
        for g, (_, off, _, _, _, kind, fetched) in zip(grads, pulls):
            self._apply(g, fetched, off, kind == UPDATE)
        self.attended_s += time.perf_counter() - t
        return len(pulls)

    def _take_puts(self) -> int:
        """Apply every part a client has Put into its slot and flushed, then answer it (it
        may write the slot again).  Returns how many were applied or rejected."""
        if not self._puts:
            return 0
        t = time.perf_counter()
        self._complete_answers()
        self.iw.win.Sync()                   # see what the clients' Puts wrote
        for src, off, _, n, c, kind, fetched in self._puts:
            if kind:                         # 0: the client found NaN/Inf and dropped it
                self._apply(self.iw.view(self._slot_of[c] + HEADER, n, np.float32), fetched,
                            off, kind == UPDATE)
            self._answers.append(self.bell.Isend(self._taken, dest=src, tag=BELL_TAKEN))
        done, self._puts = len(self._puts), []
        self.attended_s += time.perf_counter() - t
        return done

    def _complete_answers(self) -> None:
        from mpi4py import MPI
        if self._answers:
            MPI.Request.Waitall(self._answers)   # small sends, long done
            self._answers = []

    def _serve_fetches(self) -> None:
        """Put each requested slice into its client's landing window, one version each."""
        from mpi4py import MPI
        if not self._fetches:
            return
        self._complete_answers()
        t = time.perf_counter()
        win = self.landing.win
        with self.seq.mutex():               # no direct writer changes the slice meanwhile
            version = np.array([self.version], dtype=np.int64)
            settle([win.Rput(self.params[off:off + n], client, target=(4 * there, n, MPI.FLOAT))
                    for client, off, there, n in self._fetches])
            for client in {f[0] for f in self._fetches}:
                win.Flush(client)
        for client in {f[0] for f in self._fetches}:
            self._answers.append(self.bell.Isend(version, dest=client, tag=BELL_FETCHED))
        self.fetches_served += len(self._fetches)
        self._fetches = []
        self.attended_s += time.perf_counter() - t

    def serve(self) -> int:
        """One round of a shard's duties towards its clients: bells, the inbox, then the
        fetches asked for (after the pushes that came before them).  Returns the pushes
        applied (or rejected)."""
        self.ring()
        done = self.poll() + self._take_pulls() + self._take_puts()
        self._serve_fetches()
        return done

    # a shard that clients ring naps at most this long: a client's bell waits for the nap
    # to end, and on a node that spends 2 ms of every 30 ms step on it, a few thousand
    # cheap wake-ups a second cost less
    ATTENDED_NAP_S = 2e-4

    def backoff(self, lo: float = 2e-4, hi: float = 2e-3):
        """The backoff for this shard's serve loop (shorter naps when clients ring it)."""
        from ..mpiwait import Backoff
        if self.bell is not None:
            lo, hi = min(lo, self.ATTENDED_NAP_S), min(hi, self.ATTENDED_NAP_S)
        return Backoff(lo, hi)

    def pause(self, busy: bool, backoff) -> None:
        """Between rounds: keep calling MPI while a client is Putting into my inbox
        (yielding the core to whoever else is runnable), else nap longer the longer
        nothing comes."""
        if self._putting:
            from mpi4py import MPI
            for _ in range(200):       # until the next bell, the inbox looked at between
                if self.bell.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG):
                    break
                os.sched_yield()
            backoff.busy()
        elif busy:
            backoff.busy()
        else:
            backoff.idle()

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
            self.seq.a.swap(VERSION, 2 * version)
            self._version0 = version
