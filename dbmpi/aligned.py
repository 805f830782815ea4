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

import numpy as np

__all__ = ["ALIGN", "empty", "zeros", "empty_like", "is_aligned"]

ALIGN = 64


def empty(shape, dtype=np.float32) -> np.ndarray:
    """Like ``np.empty``, C order, the data starting on an ALIGN-byte boundary."""
    dtype = np.dtype(dtype)
    shape = (shape,) if np.ndim(shape) == 0 else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(nbytes + ALIGN, dtype=np.uint8)
    off = -buf.ctypes.data % ALIGN
    return buf[off:off + nbytes].view(dtype).reshape(shape)


def zeros(shape, dtype=np.float32) -> np.ndarray:
    a = empty(shape, dtype)
    a.fill(0)
    return a


def empty_like(a) -> np.ndarray:
    return empty(np.shape(a), np.asarray(a).dtype)


def is_aligned(a) -> bool:
    """Whether ``a``'s data start on an ALIGN-byte boundary (an empty array has none)."""
    a = np.asarray(a)
    return a.size == 0 or a.ctypes.data % ALIGN == 0
