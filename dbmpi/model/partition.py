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

import time

import numpy as np

from .. import aligned, tags
from ..mpiwait import wait
from ..optim import sum_sq
from .exchange import Exchange
from .layout import Layout, Part, softmax_by_inputs, split
from .network import Network, _accumulate_beta, _grad_buffer
from .reference import softmax_xent

__all__ = ["PartitionedNetwork", "split", "Layout", "Part", "softmax_by_inputs"]


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
            self.exchanges.append(Exchange(comm, tags.exchange(i), shape, prev, need,
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
        layer = part.layer
        a, z = part.rows if part.spatial else part.chans
        if z <= a:                                 # this partition owns none of this layer
            shape = (n, 0, layer.out_shape[1], layer.out_shape[2]) if part.spatial else (n, 1, 1, 0)
            return np.zeros(shape, dtype=region.dtype), None
        return layer.forward_share(part, region, params, ops, n, out)

    def _local_backward(self, part, dy, cache, params, grads, ops, need_dx, n, dtype, beta,
                        ex=None):
        """This partition's share of a layer's backward pass: its parameter gradients into
        ``grads``; returns the gradient of the region of the input it read, or None where
        it wrote the gradient of its input's column blocks into ``ex.dx_targets()``."""
        lo, hi = part.need[self.p]
        h, w, c = part.layer.in_shape
        columns = ex is not None and ex.columns is not None
        targets = ex.dx_targets() if columns and need_dx else None
        if cache is None:                          # I own none of it: zero gradients
            for t in targets or ():
                t[...] = 0
            if columns or not need_dx:
                return None
            return np.zeros((n, hi - lo, w, c), dtype=dtype)
        return part.layer.backward_share(part, dy, cache, params, grads, ops, need_dx, beta,
                                         targets)

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
