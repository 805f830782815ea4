"""Model parallelism: one network across the P ranks of a model-partition communicator.

Every layer's output is split across partitions: spatial layers (locally connected,
pooling, LCN) by output rows (stripes), fully connected layers by output units, and the
softmax by output units or, where that moves fewer bytes, by its inputs (each partition's
partial logits from the block of the input it holds, summed on every partition).
A layer's partition needs a region of the layer's input (the rows its receptive fields
cover; all of it for a fully connected layer); the parts of that region other partitions
own arrive point to point (Isend/Irecv) on buffers planned once, and in the backward pass
the gradients for them go back to their owners on the same plan, paired.  Only activations
and gradients on edges that cross a partition boundary travel; ``bytes_sent`` counts them.

Parameters: partition p owns the parameters of the units it computes.  The *partitioned
layout* orders the flat vector partition-major (partition 0's blocks of every layer, then
partition 1's ...), so each partition owns one contiguous slice; :meth:`to_partitioned` and
:meth:`to_canonical` convert from and to the canonical layout that checkpoints and the
Python API use, so runs with different P are interchangeable.
"""

from __future__ import annotations

import bisect
import time
import weakref

import numpy as np

from .. import aligned, tags
from ..mpiwait import wait
from ..optim import sum_sq
from . import ops_reference
from .network import Network, _accumulate_beta, _grad_buffer, kernel_ops
from .reference import out_size, softmax_xent

__all__ = ["PartitionedNetwork", "split", "Layout", "softmax_by_inputs"]

_KERNELS = kernel_ops()


def split(n: int, parts: int, p: int) -> tuple[int, int]:
    return n * p // parts, n * (p + 1) // parts


def _copy(dst, src, add=False):
    """dst[...] = src (or +=) for the blocks the exchanges move: (n, rows, w, c) arrays, each
    sample contiguous, samples strided (a block of a region); the kernel's one pass where
    built (see dbmpi.kernels.copy_samples)."""
    (_KERNELS or ops_reference).copy_samples(dst, src, add)


def _overlap(a, b):
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


class _Exchange:
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
        while unsent and not MPI.Request.Testall(unsent) and time.perf_counter() < end:
            time.sleep(1e-4)
        for r in list(unsent) + list(reqs):
            if r:          # a request in both lists is freed once (then it is null)
                r.Free()
    reqs.clear()
    unsent.clear()


def _startall(reqs):
    if reqs:
        from mpi4py import MPI
        MPI.Prequest.Startall(reqs)


def softmax_by_inputs(layer, P: int, first: bool) -> bool:
    """Whether the softmax layer ``layer`` is split by its inputs on P partitions.

    Split by output units (``split = "units"``), every partition with classes reads the
    whole input: the other partitions' blocks of it arrive each step and their gradients
    go back, about 2 x inputs x (P - 1) / P values a sample, for a layer that may have only
    10 units.  Split by inputs (``"inputs"``), each partition multiplies the block of the
    input it already holds by its columns of the weights, and the partial logits, classes
    x (P - 1) values a sample, are summed on every partition: no activation or gradient
    of the layer's input travels.  ``"auto"`` (the default) takes whichever moves fewer
    values, ``classes x (P - 1) < 2 x inputs``; a first layer, whose input every
    partition already has whole, stays split by units."""
    mode = layer.spec.get("split", "auto")
    if layer.spec["type"] != "softmax" or P == 1 or mode == "units":
        return False
    if mode == "inputs":
        return True
    return not first and layer.units * (P - 1) < 2 * layer.inputs


class _Part:
    """One layer's share on this partition: output block, needed input rows, parameters.

    ``prev``: the previous layer's _Part on this partition (None for the first layer); a
    softmax split by inputs (``by_inputs``) takes the block of its input that the previous
    layer's partition q produced, ``cols[q]``, a range of the flattened input."""

    def __init__(self, layer, P, p, prev=None):
        self.layer = layer
        h, w, c = layer.in_shape
        ho, wo, co = layer.out_shape
        kind = layer.spec["type"]
        self.spatial = kind in ("locally_connected", "max_pool", "l2_pool", "lcn")
        self.first = prev is None
        self.by_inputs = softmax_by_inputs(layer, P, self.first)
        if self.by_inputs:
            # every partition: partial sums of every class, from its own block of the input
            self.out_rows, self.out_chans = [(0, 1)] * P, [(0, co)] * P
            self.need = [(0, 0)] * P         # no exchange: nothing beyond its own block
            if prev is None:
                self.cols = [split(layer.inputs, P, q) for q in range(P)]
            elif prev.spatial:
                self.cols = [(a * w * c, z * w * c) for a, z in prev.out_rows]
            else:
                self.cols = list(prev.out_chans)
        elif self.spatial:
            self.out_rows = [split(ho, P, q) for q in range(P)]
            self.out_chans = [(0, co)] * P
            self.need = []
            for (a, z) in self.out_rows:
                if a == z:
                    self.need.append((0, 0))
                elif kind == "lcn":
                    r = 2 * (layer.size // 2)
                    self.need.append((max(a - r, 0), min(z + r, h)))
                else:
                    k = layer.k if kind == "locally_connected" else layer.size
                    pad = layer.pad if kind == "locally_connected" else 0
                    s = layer.stride
                    self.need.append((max(a * s - pad, 0), min((z - 1) * s - pad + k, h)))
        else:
            self.out_rows = [(0, 1)] * P
            self.out_chans = [split(co, P, q) for q in range(P)]
            # all of the input for a partition with units, none for one without (P > units)
            self.need = [(0, h) if a < z else (0, 0) for a, z in self.out_chans]
        self.rows, self.chans = self.out_rows[p], self.out_chans[p]
        # parameter blocks (canonical offsets within the layer) this partition owns
        self.blocks = []
        if self.by_inputs:        # my columns of every class's weights; the bias on 0
            u, d = layer.param_shapes[0]
            c0, c1 = self.cols[p]
            self.blocks = [(j * d + c0, j * d + c1) for j in range(u)]
            self.pshapes = ((u, c1 - c0),)
            if p == 0:
                self.blocks.append((u * d, u * d + u))
                self.pshapes += ((u,),)
        elif kind == "locally_connected":
            ho_, wo_, kkc, f = layer.param_shapes[0]
            a, z = self.rows
            row_w, row_b = wo_ * kkc * f, wo_ * f
            nw = ho_ * row_w
            self.blocks = [(a * row_w, z * row_w), (nw + a * row_b, nw + z * row_b)]
            self.pshapes = ((z - a, wo_, kkc, f), (z - a, wo_, f))
        elif not self.spatial:
            u, d = layer.param_shapes[0]
            a, z = self.chans
            self.blocks = [(a * d, z * d), (u * d + a, u * d + z)]
            self.pshapes = ((z - a, d), (z - a,))
        else:
            self.pshapes = ()
        self.num_params = sum(z - a for a, z in self.blocks)
        self._sizes = [(int(np.prod(s)), s) for s in self.pshapes]   # views run every step

    def views(self, flat):
        out, o = [], 0
        for n, s in self._sizes:
            out.append(flat[o:o + n].reshape(s))
            o += n
        return out


def _pool_whole_stripe(owned_rows, parts):
    """A pooling stripe reads all of its partition's input rows from its first needed one.

    Where the rows a partition owns run past the last one its pooling windows cover (13 rows
    of which 6 windows of 2 use 12, the 13th going to the next partition's first window),
    reading the whole stripe gives the same output rows, and the backward pass then writes
    the gradient of every owned row in place (the uncovered ones zero) instead of into a
    region to be copied.  Same traffic: only rows of my own stripe are added.  ``parts``:
    this layer's _Part on every partition, each holding the need of every partition."""
    layer = parts[0].layer
    if layer.spec["type"] not in ("max_pool", "l2_pool"):
        return
    for q, (r0, r1) in enumerate(owned_rows):
        (lo, hi), (a, z) = parts[0].need[q], parts[0].out_rows[q]
        if a < z and hi < r1 and lo < r1 and r0 < hi and \
                out_size(r1 - lo, layer.size, layer.stride) == z - a:
            for part in parts:
                part.need[q] = (lo, r1)


class Layout:
    """The partitioned layout of a network's flat vector for P partitions (needs no MPI).

    Partition q owns the contiguous slice ``ranges[q]`` of the partitioned layout, which
    is its parameter blocks of every layer in order (each a canonical range).  Only the
    blocks are kept (a few per layer and partition): any range of either layout is copied
    block by block, so no rank needs an index array or a copy of the whole vector."""

    def __init__(self, full: Network, P: int):
        self.P = P
        self.parts = []
        for q in range(P):
            prev, row = None, []
            for layer in full.layers:
                prev = _Part(layer, P, q, prev)
                row.append(prev)
            self.parts.append(row)
        for i in range(1, len(full.layers)):
            _pool_whole_stripe(self.parts[0][i - 1].out_rows, [pq[i] for pq in self.parts])
        self.ranges, pos = [], 0
        self._pieces = []       # (partitioned start, canonical start, length), in order
        for q in range(P):
            start = pos
            for i, part in enumerate(self.parts[q]):
                for a, z in part.blocks:
                    if a >= z:
                        continue
                    c = full.offsets[i] + a
                    if self._pieces and sum(self._pieces[-1][::2]) == pos and \
                            sum(self._pieces[-1][1:]) == c:      # one run: one piece
                        q, c0, n = self._pieces.pop()
                        self._pieces.append((q, c0, n + z - a))
                    else:
                        self._pieces.append((pos, c, z - a))
                    pos += z - a
            self.ranges.append((start, pos))
        self._starts = [p for p, _, _ in self._pieces]
        self.num_params = pos
        assert pos == full.num_params

    @classmethod
    def whole(cls, n: int) -> "Layout":
        """The layout of a vector of ``n`` values kept in one piece (one partition), for
        a vector that belongs to no network's layers (a parameter-server test's, say)."""
        lay = cls.__new__(cls)
        lay.P, lay.parts, lay.num_params = 1, None, n
        lay.ranges, lay._pieces, lay._starts = [(0, n)], [(0, 0, n)] if n else [], [0]
        return lay

    def pieces(self, lo, hi):
        """The partitioned range [lo, hi) as (offset from lo, canonical start, length)."""
        out = []
        k = max(bisect.bisect_right(self._starts, lo) - 1, 0)
        while k < len(self._pieces) and self._pieces[k][0] < hi:
            p, c, n = self._pieces[k]
            a, z = max(p, lo), min(p + n, hi)
            if a < z:
                out.append((a - lo, c + a - p, z - a))
            k += 1
        return out

    def take(self, theta, lo, hi, out=None):
        """Partitioned positions [lo, hi) of the canonical vector ``theta`` (an array, or
        an h5py dataset, read block by block)."""
        out = np.empty(hi - lo, dtype=theta.dtype) if out is None else out
        for o, c, n in self.pieces(lo, hi):
            out[o:o + n] = theta[c:c + n]
        return out

    def init_range(self, net, seed, lo, hi, out=None):
        """``to_partitioned(net.init_params(seed))[lo:hi]``, drawing only those values."""
        out = aligned.empty(hi - lo) if out is None else out
        for o, c, n in self.pieces(lo, hi):
            net.init_range(seed, c, c + n, out[o:o + n])
        return out

    def to_partitioned(self, theta):
        theta = np.asarray(theta)
        return self.take(theta, 0, self.num_params)

    def scatter(self, part, lo, out):
        """Write ``part``, partitioned positions [lo, lo + len(part)), into its canonical
        places in ``out``."""
        for o, c, n in self.pieces(lo, lo + len(part)):
            out[c:c + n] = part[o:o + n]

    def to_canonical(self, theta_part):
        return self.from_slices([np.asarray(theta_part)])

    def from_slices(self, slices):
        """The canonical vector from consecutive slices of the partitioned layout (every
        partition's, or every shard's, in order), each written straight into place."""
        out = np.empty(self.num_params, dtype=slices[0].dtype)
        lo = 0
        for part in slices:
            self.scatter(part, lo, out)
            lo += len(part)
        assert lo == self.num_params, (lo, self.num_params)
        return out


class _OnePartition:
    """The communicator of a network in one partition, which nothing crosses (no MPI)."""

    @staticmethod
    def Get_size():
        return 1

    @staticmethod
    def Get_rank():
        return 0


class PartitionedNetwork:
    """The share of a :class:`Network` that partition ``comm.Get_rank()`` of ``comm`` computes:
    the one model interface every algorithm trains, for any number of partitions.

    ``loss_and_grad``, ``logits`` and ``evaluate`` are collective over ``comm``: every
    partition calls them with the same batch.  Parameters are this partition's slice of the
    partitioned layout (``local_range``).  ``comm=None`` (or a communicator of one rank) is
    the one-partition case: the slice is the whole canonical vector, nothing is exchanged
    and, without a communicator, no MPI is used.
    """

    def __init__(self, spec, comm=None, backend="auto"):
        self.full = Network(spec, backend)
        self.comm = _OnePartition() if comm is None else comm
        comm = self.comm
        self.P, self.p = comm.Get_size(), comm.Get_rank()
        self.classes, self.l2 = self.full.classes, self.full.l2
        self.input_shape, self.num_params = self.full.input_shape, self.full.num_params
        self.layout = Layout(self.full, self.P)
        self.parts, self.ranges = self.layout.parts, self.layout.ranges
        self.mine = self.parts[self.p]
        self.local_range = self.ranges[self.p]
        self.local_size = self.local_range[1] - self.local_range[0]
        # exchanges, planned once: layer i's input is owned as layer i-1's output
        self.exchanges = [None]
        for i in range(1, len(self.full.layers)):
            if self.P == 1 or self.mine[i].by_inputs:   # reads only its own: no exchange
                self.exchanges.append(None)
                continue
            prev = [(pq[i - 1].out_rows[q], pq[i - 1].out_chans[q])
                    for q, pq in enumerate(self.parts)]
            need = self.mine[i].need                  # need[q] for every partition q
            shape = self.full.layers[i].in_shape
            self.exchanges.append(_Exchange(comm, tags.exchange(i), shape, prev, need,
                                            columns=not self.mine[i].spatial))
        self.logit_bytes = 0
        self._comm_s = 0.0      # the logits' exchange and the l2 term's allreduce
        last = self.mine[-1]
        # a softmax split by inputs has its bias on partition 0; the others add zeros
        # and write the bias gradient into a scratch
        self._bias_standin = (None if not last.by_inputs or self.p == 0 else
                              (np.zeros(self.classes, np.float32), np.zeros(self.classes, np.float32)))

    # -- layouts -------------------------------------------------------------------------
    def to_partitioned(self, theta):
        return self.layout.to_partitioned(theta)

    def to_canonical(self, theta_part):
        return self.layout.to_canonical(theta_part)

    def local(self, theta_canonical):
        """My slice of a canonical vector (an array or an h5py dataset), on a cache line
        as Network's vectors are (dbmpi.aligned)."""
        a, z = self.local_range
        if not hasattr(theta_canonical, "dtype"):
            theta_canonical = np.asarray(theta_canonical)
        return self.layout.take(theta_canonical, a, z, aligned.empty(z - a, theta_canonical.dtype))

    def gather_canonical(self, local):
        """Collective over the partitions: every partition's slice ``local`` (this layout's)
        as the canonical vector on partition 0, None elsewhere.  The slices come as raw
        buffers, one at a time, each written straight into place."""
        if self.p != 0:
            self.comm.Send(np.ascontiguousarray(local), dest=0, tag=tags.GATHER)
            return None
        out = np.empty(self.num_params, dtype=local.dtype)
        self.layout.scatter(local, self.ranges[0][0], out)
        for q in range(1, self.P):
            lo, hi = self.ranges[q]
            part = np.empty(hi - lo, dtype=local.dtype)
            self.comm.Recv(part, source=q, tag=tags.GATHER)
            self.layout.scatter(part, lo, out)
        return out

    def init_local(self, seed: int):
        """My slice of ``full.init_params(seed)``, drawn alone."""
        return self.layout.init_range(self.full, seed, *self.local_range)

    @property
    def bytes_sent(self) -> int:
        return sum(e.bytes_sent for e in self.exchanges[1:] if e) + self.logit_bytes

    @property
    def exchange_seconds(self) -> float:
        """Time spent exchanging with the other partitions: copies, transfers and waiting for
        peers (load imbalance and jitter included); the rest of a step is computation."""
        return sum(e.seconds for e in self.exchanges[1:] if e) + self._comm_s

    # -- compute ---------------------------------------------------------------------------
    def _params(self, theta_local, grads=False):
        """Views of my slice (parameters, or their gradients where ``grads``) by layer."""
        out, o = [], 0
        for part in self.mine:
            out.append(part.views(theta_local[o:o + part.num_params]))
            o += part.num_params
        if self._bias_standin is not None:
            b = self._bias_standin[1 if grads else 0]
            out[-1].append(b.astype(theta_local.dtype, copy=False))
        return out

    def _forward(self, theta_local, x):
        ops = self.full._ops(theta_local.dtype)
        xh = np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1), dtype=theta_local.dtype)
        n = xh.shape[0]
        params = self._params(theta_local)
        a = xh                                 # layer 0: every partition has the whole input
        caches = []
        last = len(self.mine) - 1
        for i, part in enumerate(self.mine):
            lo, hi = part.need[self.p]
            ex = self.exchanges[i]
            if i == 0:
                region = a if part.by_inputs else a[:, lo:hi]
            else:
                region = a if ex is None else ex.forward(n, a, a.dtype)
            nxt = None if i == last else self.exchanges[i + 1]
            out = None if nxt is None else nxt.own_view(n, a.dtype)
            y, cache = self._local_forward(part, region, params[i], ops, n, out)
            caches.append(cache)
            a = y
        return a, caches, params, ops

    def _local_forward(self, part, region, params, ops, n, out=None):
        """This partition's share of a layer's output (written into ``out``, the next
        exchange's region, where given and the layer is spatial) and what backward needs."""
        layer, kind = part.layer, part.layer.spec["type"]
        a, z = part.rows if part.spatial else part.chans
        if z <= a:                                 # this partition owns none of this layer
            shape = (n, 0, layer.out_shape[1], layer.out_shape[2]) if part.spatial else (n, 1, 1, 0)
            return np.zeros(shape, dtype=region.dtype), None
        if kind == "locally_connected":
            h, w, c = layer.in_shape
            if (a, z) == (0, layer.out_shape[0]) and region.shape[1] == h:
                # every output row (one partition): the kernel pads, as Network's does
                y = ops.lc_forward(region, params[0], params[1], layer.k, layer.stride,
                                   layer.pad, layer.act, out=out)
                return y, (region, y, None, h)
            lo_in = a * layer.stride - layer.pad
            hi_in = (z - 1) * layer.stride - layer.pad + layer.k
            top = max(lo_in, 0) - lo_in           # rows above the image are zero padding
            if layer.pad == 0 and region.shape[1] == hi_in - lo_in:
                slab = region      # no padding to add: the region itself (samples may be
                #                    strided: a first layer's rows of the input batch)
            else:
                slab = np.zeros((n, hi_in - lo_in, w + 2 * layer.pad, c), dtype=region.dtype)
                slab[:, top:top + region.shape[1], layer.pad:layer.pad + w] = region
            y = ops.lc_forward(slab, params[0], params[1], layer.k, layer.stride, 0, layer.act,
                               out=out)
            return y, (slab, y, top, region.shape[1])
        if kind in ("max_pool", "l2_pool"):
            y, aux = ops.pool_forward(region, layer.size, layer.stride, layer.mode, out=out)
            return y, (region, aux)
        if kind == "lcn":
            y, aux = ops.lcn_forward(region, layer.size, layer.eps)
            off = a - self._need_lo(part)
            return np.ascontiguousarray(y[:, off:off + (z - a)]), (aux, off, z - a, region.shape)
        if part.by_inputs:                # partial logits from my block of the input
            x2 = np.ascontiguousarray(region).reshape(n, -1)
            if part.first:                # every partition has the whole input: my columns
                c0, c1 = part.cols[self.p]
                x2 = np.ascontiguousarray(x2[:, c0:c1])
            y = ops.fc_forward(x2, params[0], params[1], layer.act)
            return y.reshape(n, 1, 1, z - a), (x2, y, region.shape)
        if isinstance(region, list):      # column blocks, as they came (_Exchange.columns)
            y = ops.fc_forward_blocks(region, params[0], params[1], layer.act)
            return y.reshape(n, 1, 1, z - a), (region, y, None)
        x2 = region.reshape(n, -1)
        y = ops.fc_forward(x2, params[0], params[1], layer.act)   # a softmax layer's is linear
        return y.reshape(n, 1, 1, z - a), (x2, y, region.shape)

    def _need_lo(self, part):
        return part.need[self.p][0]

    def _local_backward(self, part, dy, cache, params, grads, ops, need_dx, n, dtype, beta,
                        ex=None):
        """This partition's share of a layer's backward pass: its parameter gradients into
        ``grads``; returns the gradient of the region of the input it read, or None where
        it wrote the gradient of its input's column blocks into ``ex.dx_targets()``."""
        layer, kind = part.layer, part.layer.spec["type"]
        lo, hi = part.need[self.p]
        h, w, c = layer.in_shape
        columns = ex is not None and ex.columns is not None
        if cache is None:
            if columns:
                for t in (ex.dx_targets() if need_dx else ()):
                    t[...] = 0
                return None
            return np.zeros((n, hi - lo, w, c), dtype=dtype) if need_dx else None
        if kind == "locally_connected":
            slab, y, top, rows = cache
            pad = layer.pad if top is None else 0      # see _local_forward
            dslab = ops.lc_backward(slab, params[0], y, dy, layer.k,
                                    layer.stride, pad, layer.back_act, grads[0], grads[1],
                                    need_dx, beta)
            if not need_dx or top is None:
                return dslab
            return np.ascontiguousarray(dslab[:, top:top + rows, layer.pad:layer.pad + w])
        if kind in ("max_pool", "l2_pool"):
            region, aux = cache
            return ops.pool_backward(region, dy, aux, layer.size,
                                     layer.stride, layer.mode) if need_dx else None
        if kind == "lcn":
            aux, off, rows, shape = cache
            if (off, rows) == (0, shape[1]):           # all of its rows (one partition)
                dfull = dy
            else:
                dfull = np.zeros(shape, dtype=dtype)
                dfull[:, off:off + rows] = dy
            return ops.lcn_backward(dfull, aux, layer.size) if need_dx else None
        x2, y, shape = cache
        if shape is None:                 # column blocks (see _local_forward)
            ops.fc_backward_blocks(x2, params[0], y, np.ascontiguousarray(dy.reshape(y.shape)),
                                   layer.back_act, grads[0], grads[1],
                                   ex.dx_targets() if need_dx else [None] * len(x2), beta)
            return None
        dx = ops.fc_backward(x2, params[0], y, np.ascontiguousarray(dy.reshape(y.shape)),
                             layer.back_act, grads[0], grads[1], need_dx, beta)
        return None if dx is None else dx.reshape(shape)

    def _all_logits(self, z_local):
        """Every partition's slice of the logits, assembled on every partition (or, for a
        softmax split by inputs, every partition's partial logits summed)."""
        if self.P == 1:                  # all of them are mine
            return z_local.reshape(z_local.shape[0], self.classes)
        if self.mine[-1].by_inputs:
            return self._sum_logits(z_local)
        t = time.perf_counter()
        n = z_local.shape[0]
        chans = [pq[-1].chans for pq in self.parts]
        full = np.empty((n, self.classes), dtype=z_local.dtype)
        a, b = chans[self.p]
        full[:, a:b] = z_local.reshape(n, b - a)
        reqs, bufs = [], []
        for q, (c0, c1) in enumerate(chans):
            if q == self.p or c1 <= c0:
                continue
            buf = np.empty((n, c1 - c0), dtype=z_local.dtype)
            reqs.append(self.comm.Irecv(buf, source=q, tag=tags.LOGITS))
            bufs.append((buf, c0, c1))
        send = np.ascontiguousarray(full[:, a:b])
        if b > a:
            for q in range(self.P):
                if q != self.p:
                    reqs.append(self.comm.Isend(send, dest=q, tag=tags.LOGITS))
                    self.logit_bytes += send.nbytes
        wait(reqs)
        for buf, c0, c1 in bufs:
            full[:, c0:c1] = buf
        self._comm_s += time.perf_counter() - t
        return full

    def _sum_logits(self, z_local):
        """The sum of every partition's partial logits, on every partition, added in
        partition order: the same bits everywhere, so every partition takes the same
        loss and top gradient."""
        t = time.perf_counter()
        n = z_local.shape[0]
        mine = np.ascontiguousarray(z_local.reshape(n, self.classes))
        parts = [mine if q == self.p else np.empty_like(mine) for q in range(self.P)]
        reqs = [self.comm.Irecv(parts[q], source=q, tag=tags.LOGITS) for q in range(self.P) if q != self.p]
        for q in range(self.P):
            if q != self.p:
                reqs.append(self.comm.Isend(mine, dest=q, tag=tags.LOGITS))
                self.logit_bytes += mine.nbytes
        wait(reqs)
        full = parts[0].copy()
        for part in parts[1:]:
            full += part
        self._comm_s += time.perf_counter() - t
        return full

    def logits(self, theta_local, x):
        z, _, _, _ = self._forward(np.asarray(theta_local), x)
        return self._all_logits(z)

    def loss_and_grad(self, theta_local, x, y, out=None, scale=1.0, accumulate=False):
        """Mean cross-entropy + l2/2 ||theta||^2 (the whole network's, on every partition) and
        the gradient of this partition's slice (into ``out`` if given; ``scale`` and
        ``accumulate`` as for Network, so ``out=theta_local`` fuses an SGD step)."""
        theta_local = np.asarray(theta_local)
        y = np.asarray(y, dtype=np.intp)
        z, caches, params, ops = self._forward(theta_local, x)
        full = self._all_logits(z)
        loss, dz_full = ops.softmax_xent(full, y)
        if scale != 1.0:                      # as Network.loss_and_grad
            dz_full *= dz_full.dtype.type(scale)
        n = full.shape[0]
        a, b = self.mine[-1].chans
        grad = _grad_buffer(out, theta_local, accumulate)  # each layer writes all its share
        if self.l2:
            loss += 0.5 * self.l2 * self._sum_sq(theta_local)
        beta, inplace = _accumulate_beta(grad, theta_local, accumulate, scale, self.l2)
        gviews = self._params(grad, grads=True)
        d = np.ascontiguousarray(dz_full[:, a:b]).reshape(n, 1, 1, b - a)
        for i in range(len(self.mine) - 1, -1, -1):
            part = self.mine[i]
            dregion = self._local_backward(part, d, caches[i], params[i], gviews[i], ops,
                                           i > 0, n, theta_local.dtype, beta,
                                           self.exchanges[i] if i > 0 else None)
            if i > 0:
                ex = self.exchanges[i]
                d = dregion if ex is None else ex.backward(dregion, theta_local.dtype)
        if self.l2 and not inplace:
            grad += (scale * self.l2) * theta_local
        return loss, grad

    def evaluate(self, theta_local, x, y, batch: int = 1024) -> dict:
        total, correct, n = 0.0, 0, len(y)
        for i in range(0, n, batch):
            z = self.logits(theta_local, x[i:i + batch])
            yb = np.asarray(y[i:i + batch], dtype=np.intp)
            total += softmax_xent(z.astype(np.float64), yb)[0] * len(yb)
            correct += int((z.argmax(axis=1) == yb).sum())
        loss = total / max(n, 1)
        return {"loss": loss, "accuracy": correct / max(n, 1),
                "objective": loss + 0.5 * self.l2 * self._sum_sq(theta_local)}

    def _sum_sq(self, theta_local) -> float:
        """||theta||^2 of the whole network (collective)."""
        if self.P == 1:
            return float(sum_sq(theta_local))
        from mpi4py import MPI
        sq = np.array([sum_sq(theta_local)])
        tot = np.zeros(1)
        t = time.perf_counter()
        wait([self.comm.Iallreduce(sq, tot, op=MPI.SUM)])
        self._comm_s += time.perf_counter() - t
        return float(tot[0])
