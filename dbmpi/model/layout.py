"""Which partition computes and owns what: each layer's share on each partition
(:class:`Part`, from the layer's own geometry) and the partitioned layout of the flat
parameter vector (:class:`Layout`).  Needs no MPI."""

from __future__ import annotations

import bisect

import numpy as np

from .. import aligned
from .layers import Pool, Softmax
from .reference import out_size

__all__ = ["split", "softmax_by_inputs", "Part", "Layout"]


def split(n: int, parts: int, p: int) -> tuple[int, int]:
    return n * p // parts, n * (p + 1) // parts


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
    if not isinstance(layer, Softmax) or P == 1 or mode == "units":
        return False
    if mode == "inputs":
        return True
    return not first and layer.units * (P - 1) < 2 * layer.inputs


class Part:
    """One layer's share on one partition: its output block, the input rows it needs, its
    parameters (the layer's own geometry: Layer.spatial, input_rows, owned_params).

    ``prev``: the previous layer's Part on this partition (None for the first layer); a
    softmax split by inputs (``by_inputs``) takes the block of its input that the previous
    layer's partition q produced, ``cols[q]``, a range of the flattened input."""

    def __init__(self, layer, P, p, prev=None):
        self.layer = layer
        h = layer.in_shape[0]
        ho, co = layer.out_shape[0], layer.out_shape[2]
        self.spatial = layer.spatial
        self.first = prev is None
        self.by_inputs = softmax_by_inputs(layer, P, self.first)
        if self.by_inputs:
            # every partition: partial sums of every class, from its own block of the input
            self.out_rows, self.out_chans = [(0, 1)] * P, [(0, co)] * P
            self.need = [(0, 0)] * P         # no exchange: nothing beyond its own block
            w, c = layer.in_shape[1:]
            if prev is None:
                self.cols = [split(layer.inputs, P, q) for q in range(P)]
            elif prev.spatial:
                self.cols = [(a * w * c, z * w * c) for a, z in prev.out_rows]
            else:
                self.cols = list(prev.out_chans)
        elif self.spatial:                   # by output rows
            self.out_rows = [split(ho, P, q) for q in range(P)]
            self.out_chans = [(0, co)] * P
            self.need = [layer.input_rows(a, z) if a < z else (0, 0) for a, z in self.out_rows]
        else:                                # by output units
            self.out_rows = [(0, 1)] * P
            self.out_chans = [split(co, P, q) for q in range(P)]
            # all of the input for a partition with units, none for one without (P > units)
            self.need = [(0, h) if a < z else (0, 0) for a, z in self.out_chans]
        self.p = p
        self.rows, self.chans = self.out_rows[p], self.out_chans[p]
        # parameter blocks (canonical offsets within the layer) this partition owns
        if self.by_inputs:        # my columns of every class's weights; the bias on 0
            self.blocks, self.pshapes = layer.input_params(*self.cols[p], bias=p == 0)
        else:
            self.blocks, self.pshapes = layer.owned_params(
                *(self.rows if self.spatial else self.chans))
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
    this layer's Part on every partition, each holding the need of every partition."""
    layer = parts[0].layer
    if not isinstance(layer, Pool):
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

    def __init__(self, full, P: int):
        self.P = P
        self.parts = []
        for q in range(P):
            prev, row = None, []
            for layer in full.layers:
                prev = Part(layer, P, q, prev)
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
