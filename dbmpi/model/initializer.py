"""Initial parameters that any rank computes for any slice of the flat vector alone.

Every initial value depends only on the seed and its position, so a partition or a
parameter-server shard draws just its own slice (no rank holds the whole vector to cut
its share out of it), and every partitioning gets the same values as ``P = 1``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["normals"]

_PAIRS = 1 << 19          # pairs of values drawn at a time: bounds the temporaries (16 MB)


def normals(key, start: int, count: int, out, scale: float = 1.0) -> None:
    """``out[:count]`` = ``scale`` x the standard normal values ``start .. start + count``
    of the stream named by ``key`` (a tuple of non-negative ints).

    Box-Muller on PCG64's uniforms: values 2j and 2j + 1 come from uniforms 2j and 2j + 1,
    and the generator jumps straight to them (``advance``), so a range costs the same
    wherever it lies."""
    if count <= 0:
        return
    j0, j1 = start // 2, (start + count + 1) // 2
    bits = np.random.PCG64(np.random.SeedSequence([int(k) for k in key]))
    bits.advance(2 * j0)
    gen = np.random.Generator(bits)
    done = 0
    for c0 in range(j0, j1, _PAIRS):
        c1 = min(c0 + _PAIRS, j1)
        u = gen.random(2 * (c1 - c0))
        r = np.sqrt(-2.0 * np.log1p(-u[0::2])) * scale     # 1 - u lies in (0, 1]
        t = (2.0 * np.pi) * u[1::2]
        z = np.empty_like(u)
        z[0::2] = r * np.cos(t)
        z[1::2] = r * np.sin(t)
        a = max(start, 2 * c0) - 2 * c0            # the part of this chunk in the range
        b = min(start + count, 2 * c1) - 2 * c0
        out[done:done + b - a] = z[a:b]
        done += b - a
