"""Arrays whose data start on a cache-line (64-byte) boundary.

numpy places a large array 16 bytes past a page boundary (glibc's chunk header), so every
128-byte weight row of a locally connected layer with 32 filters spans three cache lines
instead of two, and a third of its 32-byte vector loads and stores straddle two lines.
Parameters, gradients and the kernels' outputs are therefore allocated here: the forward
pass of the (16, 64 -> 32, 5, 2) layer ran 61.5 GF/s with weights 16 bytes off a line and
64.5 GF/s with them on one (the same process, calls alternating).  A slice of an aligned
vector is aligned where the elements before it fill whole lines (a multiple of 16 floats:
every layer whose filter count is a multiple of 16).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ALIGN", "SMALL", "empty", "zeros", "empty_like", "copy", "is_aligned"]

ALIGN = 64
SMALL = 65536


try:
    from ._kernels import data_address as _address
except ImportError:                 # the numpy reference path, kernels not built
    def _address(a):
        return a.ctypes.data


def _new(shape, dtype, alloc) -> np.ndarray:
    """``alloc`` (np.empty or np.zeros) of shape and dtype, placed on a line from SMALL bytes
    up (below that, numpy's own placement: a few split loads cost less than the placing,
    2 us a call, on a network of small layers)."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < SMALL:
        return alloc(shape, dtype)
    buf = alloc(nbytes + ALIGN, dtype=np.uint8)
    return np.ndarray(shape, dtype, buf, -_address(buf) % ALIGN)


def empty(shape, dtype=np.float32) -> np.ndarray:
    """Like ``np.empty``, C order, the data starting on an ALIGN-byte boundary (see _new)."""
    return _new(shape, dtype, np.empty)


def zeros(shape, dtype=np.float32) -> np.ndarray:
    """Like ``np.zeros``, placed as :func:`empty`."""
    return _new(shape, dtype, np.zeros)


def empty_like(a) -> np.ndarray:
    return empty(np.shape(a), np.asarray(a).dtype)


def copy(a) -> np.ndarray:
    """A placed copy of ``a``."""
    out = empty_like(a)
    out[...] = a
    return out


def is_aligned(a) -> bool:
    """Whether ``a``'s data start on an ALIGN-byte boundary (an empty array has none)."""
    a = np.asarray(a)
    return a.size == 0 or a.ctypes.data % ALIGN == 0
