"""The halo exchange of one layer's input between the partitions of a replica: planned
once, on persistent point-to-point requests, with the gradients going back on the same
plan in the backward pass."""

from __future__ import annotations

import time
import weakref

import numpy as np

from .. import aligned
from ..mpiwait import Backoff, until, wait
from . import ops_reference
from .network import kernel_ops

__all__ = ["Exchange"]

_KERNELS = kernel_ops()


def _copy(dst, src, add=False):
    """dst[...] = src (or +=) for the blocks the exchanges move: (n, rows, w, c) arrays, each
    sample contiguous, samples strided (a block of a region); the kernel's one pass where
    built (see dbmpi.kernels.copy_samples)."""
    (_KERNELS or ops_reference).copy_samples(dst, src, add)


def _overlap(a, b):
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


class Exchange:
    """The plan of one layer's input exchange, and its buffers and persistent requests.

    ``owned[q]`` = (rows, channels) block of the input that partition q holds; ``need[q]`` =
    the row range (all channels) partition q's computation reads.  Forward: I receive
    need[me] & owned[q] from each q and send need[q] & owned[me] to each q.  Backward: the
    gradients of exactly those blocks travel the other way and are added by the owners.
    The messages are planned when the partition is built; their buffers and persistent
    requests (``Send_init``/``Recv_init``) once per batch size, on the first step of it.

    ``columns``: the consumer is a fully connected layer, which takes its input as column
    blocks (every block, all channels of a row range or a unit range, is a contiguous range
    of the flattened input): forward returns the blocks as they arrived, [(x (n, d_i), first
    column)], and the layer's backward writes their gradients into ``dx_targets()``, the
    send buffers themselves; no region is assembled, no gradient copied out of one.
    """

    def __init__(self, comm, tag, shape, owned, need, columns=False):
        self.comm, self.tag = comm, tag
        self.shape = shape                       # (h, w, c) of the layer's input
        me, P = comm.Get_rank(), comm.Get_size()
        self.me = me
        self.need = need[me]
        self.recv, self.send = [], []            # (peer, rows, chans)
        has_block = all(lo < hi for lo, hi in owned[me])     # rows and channels of my own
        for q in range(P):
            if q == me:
                continue
            rr = _overlap(need[me], owned[q][0])
            if rr is not None and owned[q][1][0] < owned[q][1][1]:
                self.recv.append((q, rr, owned[q][1]))
            rs = _overlap(need[q], owned[me][0])
            if rs is not None and has_block:
                self.send.append((q, rs, owned[me][1]))
        self.own = owned[me]
        # every peer gets all of my block (a fully connected consumer): sent from the block
        # itself, no copy
        self.send_whole = bool(self.send) and all(
            rows == owned[me][0] and chans == owned[me][1] for _, rows, chans in self.send)
        self.self_rows = _overlap(need[me], owned[me][0]) if has_block else None
        c = shape[2]
        # all I need is mine (a pooling stripe, say): forward returns a view, no region
        self.mine_only = not self.recv and self.self_rows == self.need and self.own[1] == (0, c)
        # I use all of my rows, all channels: the layer before writes them straight into
        # my rows of the region (own_view), and backward adds what comes back for them into
        # my rows of the region's gradient, which it returns as a view
        self.in_place = self.self_rows == self.own[0] and self.own[1] == (0, c)
        self.columns = None
        if columns and self.need == (0, shape[0]) and (self.send_whole or not self.send):
            blocks = [(self._first_column(*self.own), -1)] if has_block else []
            blocks += [(self._first_column(rows, chans), i)
                       for i, (_, rows, chans) in enumerate(self.recv)]
            if all(col is not None for col, _ in blocks):
                self.columns = sorted(blocks)      # (first column, -1: mine, else recv index)
        self.bytes_sent = 0
        self.seconds = 0.0     # in forward and backward: copies, transfers, waiting for peers
        self._key = None
        self._reqs = []     # every persistent request, freed with the exchange or at exit
        self._unsent = []   # sends started, not yet waited for (see forward)
        weakref.finalize(self, _free_requests, self._reqs, self._unsent)

    def _first_column(self, rows, chans):
        """Where block (rows, chans) starts in the flattened input, or None where it is not
        one range of columns."""
        h, w, c = self.shape
        if chans == (0, c):
            return rows[0] * w * c
        return chans[0] if h == w == 1 else None

    def _block(self, n, rows, chans):
        return (n, rows[1] - rows[0], self.shape[1], chans[1] - chans[0])

    def _buffers(self, n, dtype):
        """This batch size's buffers and persistent requests, made on its first step."""
        key = (n, np.dtype(dtype))
        if key == self._key:
            return
        self._wait_sends()
        _free_requests(self._reqs)
        comm, tag = self.comm, self.tag

        h, w, c = self.shape
        lo, hi = self.need
        (r0, r1), (c0, c1) = self.own
        self._region = (None if self.mine_only or self.columns is not None
                        else aligned.empty((n, hi - lo, w, c), dtype))
        self._dlocal = (None if self.in_place and self.columns is None
                        else aligned.empty((n, r1 - r0, w, c1 - c0), dtype))
        # (a whole block instead goes from the layer's own contiguous output: every message
        # stays contiguous, which MPICH moves in one copy, read by the receiver itself;
        # strided datatypes are pipelined through shared memory and stall whenever the
        # sender is not scheduled, as when ranks outnumber cores)
        self._own_view = (self._region[:, r0 - lo:r1 - lo]
                          if self._region is not None and self.in_place and not self.send_whole
                          else None)

        def blocks(plan):
            return [aligned.empty(self._block(n, rows, chans), dtype) for _, rows, chans in plan]
        self._fsend = [] if self.send_whole else blocks(self.send)
        self._frecv = blocks(self.recv)
        self._bsend, self._brecv = blocks(self.recv), blocks(self.send)
        self._freqs = ([comm.Recv_init(b, source=q, tag=tag)
                        for b, (q, _, _) in zip(self._frecv, self.recv)]
                       + [comm.Send_init(b, dest=q, tag=tag)
                          for b, (q, _, _) in zip(self._fsend, self.send)])
        self._breqs = ([comm.Recv_init(b, source=q, tag=tag + 1)
                        for b, (q, _, _) in zip(self._brecv, self.send)]
                       + [comm.Send_init(b, dest=q, tag=tag + 1)
                          for b, (q, _, _) in zip(self._bsend, self.recv)])
        self._reqs[:] = self._freqs + self._breqs
        self._key = key

    def own_view(self, n, dtype):
        """Where the layer before may write my block: my rows of the region (samples
        strided), so that forward copies none of it; None where that does not apply."""
        self._buffers(n, dtype)
        return self._own_view

    def forward(self, n, local, dtype):
        """Assemble the needed region (n, need rows, w, c) from my block ``local``: this
        exchange's own buffer (or a view of ``local``), valid until its next forward.

        Only the receives are waited for.  A send of this size completes when the peer has
        read it (MPICH's receiver copies it from the sender's memory, in its own MPI calls),
        so waiting for it here would take on the peer's lateness at every exchange; it is
        waited for at the next forward, by when it is long done (see _wait_sends)."""
        t = time.perf_counter()
        self._buffers(n, dtype)
        self._wait_sends()
        lo, hi = self.need
        r0 = self.own[0][0]
        for (q, rows, chans), b in zip(self.send, self._fsend):
            _copy(b, local[:, rows[0] - r0:rows[1] - r0])
            self.bytes_sent += b.nbytes
        _startall(self._freqs)
        if self.send_whole:       # from the layer's output itself (kept until backward)
            local = np.ascontiguousarray(local)
            self._unsent.extend(self.comm.Isend(local, dest=q, tag=self.tag)
                                for q, _, _ in self.send)
            self.bytes_sent += local.nbytes * len(self.send)
        nr = len(self.recv)       # receives first, then sends (see _buffers)
        self._unsent.extend(self._freqs[nr:])
        if self.columns is not None:      # the blocks as they are (see the class)
            local = np.ascontiguousarray(local)
            wait(self._freqs[:nr])
            region = [((local if i < 0 else self._frecv[i]).reshape(n, -1), col)
                      for col, i in self.columns]
        elif self.mine_only:
            region = local[:, lo - r0:hi - r0]
        else:
            # every element of the region is owned by exactly one partition (me or a
            # sender), so the copies below cover it all
            region = self._region
            if self.self_rows is not None and local is not self._own_view:  # not written there
                a, z = self.self_rows
                c0, c1 = self.own[1]
                _copy(region[:, a - lo:z - lo, :, c0:c1], local[:, a - r0:z - r0])
            wait(self._freqs[:nr])
            for (q, rows, chans), b in zip(self.recv, self._frecv):
                _copy(region[:, rows[0] - lo:rows[1] - lo, :, chans[0]:chans[1]], b)
        self.seconds += time.perf_counter() - t
        return region

    def backward(self, dregion, dtype):
        """Send the gradients of received blocks back; return the gradient of my block (this
        exchange's own buffer, valid until its next backward, or my rows of ``dregion``,
        which the layer's backward allocated: then what comes back is added there).  As in
        forward, the sends are waited for later."""
        if self.columns is not None:
            return self._backward_columns()
        t = time.perf_counter()
        n = dregion.shape[0]
        self._buffers(n, dtype)
        lo = self.need[0]
        (r0, r1), (c0, c1) = self.own
        for (q, rows, chans), b in zip(self.recv, self._bsend):   # their rows I used
            _copy(b, dregion[:, rows[0] - lo:rows[1] - lo, :, chans[0]:chans[1]])
            self.bytes_sent += b.nbytes
        _startall(self._breqs)
        nr = len(self.send)
        self._unsent.extend(self._breqs[nr:])
        if self.in_place:
            dlocal = dregion[:, r0 - lo:r1 - lo]
        elif self.self_rows is None:              # my rows get only what comes back
            dlocal = self._dlocal
            dlocal[...] = 0
        else:                                     # my rows I used: copied, not added
            dlocal = self._dlocal
            a, z = self.self_rows
            dlocal[:, :a - r0] = 0                # and the others zeroed (a stripe's edges)
            dlocal[:, z - r0:] = 0
            _copy(dlocal[:, a - r0:z - r0], dregion[:, a - lo:z - lo, :, c0:c1])
        wait(self._breqs[:nr])
        for (q, rows, chans), b in zip(self.send, self._brecv):   # my rows they used
            _copy(dlocal[:, rows[0] - r0:rows[1] - r0], b, add=True)
        self.seconds += time.perf_counter() - t
        return dlocal

    def dx_targets(self):
        """Where a ``columns`` consumer's backward puts the gradient of each block forward
        gave it, in the same order: mine into my block's gradient, the others into the
        buffers that send them back."""
        n = self._key[0]
        return [(self._dlocal if i < 0 else self._bsend[i]).reshape(n, -1)
                for _, i in self.columns]

    def _backward_columns(self):
        """backward for a ``columns`` consumer, which wrote dx_targets()."""
        t = time.perf_counter()
        self.bytes_sent += sum(b.nbytes for b in self._bsend)
        _startall(self._breqs)
        nr = len(self.send)
        self._unsent.extend(self._breqs[nr:])
        dlocal = self._dlocal
        wait(self._breqs[:nr])
        for b in self._brecv:                # every consumer used all of my block
            _copy(dlocal, b, add=True)
        self.seconds += time.perf_counter() - t
        return dlocal

    def _wait_sends(self):
        """Complete the sends of the last forward and backward: their peers have read them
        (each waited for its receives), so this returns at once unless a peer lags a whole
        step behind; their buffers may then be written again."""
        wait(self._unsent)
        self._unsent.clear()


def _free_requests(reqs, unsent=None, patience=2.0):
    """Free the persistent requests ``reqs`` (before MPI_Finalize, which otherwise warns
    about each), after completing the sends not yet waited for: their peers have read them
    (each waits for its receives), but the sender's MPICH sees that only in a later MPI
    call.  A peer that is gone gets ``patience`` seconds, then its sends are dropped."""
    unsent = [] if unsent is None else unsent
    if not reqs and not unsent:       # (one partition: no MPI at all)
        return
    from mpi4py import MPI
    if not MPI.Is_finalized():
        end = time.perf_counter() + patience
        until(lambda: not unsent or MPI.Request.Testall(unsent) or time.perf_counter() >= end,
              Backoff(1e-4, 1e-4))
        for r in list(unsent) + list(reqs):
            if r:          # a request in both lists is freed once (then it is null)
                r.Free()
    reqs.clear()
    unsent.clear()


def _startall(reqs):
    if reqs:
        from mpi4py import MPI
        MPI.Prequest.Startall(reqs)
