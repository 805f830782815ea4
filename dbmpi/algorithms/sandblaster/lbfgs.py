"""The coordinator's side of L-BFGS: the Gram matrix of the basis, the two-loop recursion
on it, and the strong Wolfe line search."""

from __future__ import annotations

import numpy as np

__all__ = ["Gram", "wolfe_line_search"]


class Gram:
    """The dot products of the L-BFGS basis (s_0..s_{m-1}, y_0..y_{m-1}, g), summed over the
    shards: with it the coordinator runs the two-loop recursion on coefficients and the
    shards form the direction in one command ("vector-free" L-BFGS, Chen et al., NeurIPS
    2014), instead of a round trip to every shard for each of its 4m dots and axpys."""

    def __init__(self, m: int, matrix=None):
        self.m = m
        self.G = np.zeros((2 * m + 1, 2 * m + 1)) if matrix is None else np.array(matrix)

    def s(self, slot):
        return slot

    def y(self, slot):
        return self.m + slot

    @property
    def g(self):
        return 2 * self.m

    def update(self, names, parts) -> None:
        """Set the rows (and columns) of ``names`` from every shard's part of them."""
        rows = np.sum(np.array(parts, dtype=np.float64), axis=0)
        for name, row in zip(names, rows):
            i = self.g if name == "g" else (self.m if name[0] == "y" else 0) + int(name[1:])
            self.G[i, :] = row
            self.G[:, i] = row

    def direction(self, hist, gamma):
        """The coefficients of d = -H g on the basis (two-loop recursion, Nocedal & Wright
        Algorithm 7.4), and g.d."""
        G, delta, alphas = self.G, np.zeros(len(self.G)), []
        delta[self.g] = 1.0                          # q = g
        for slot, rho in reversed(hist):
            a = rho * float(delta @ G[:, self.s(slot)])
            delta[self.y(slot)] -= a
            alphas.append(a)
        delta *= gamma
        for (slot, rho), a in zip(hist, reversed(alphas)):
            b = rho * float(delta @ G[:, self.y(slot)])
            delta[self.s(slot)] += a - b
        c = -delta
        return c, float(c @ G[:, self.g])


def wolfe_line_search(phi, f0, g0, t, c1=1e-4, c2=0.9, max_evals=20):
    """Strong Wolfe line search (Nocedal & Wright, Algorithms 3.5 and 3.6).

    ``phi(t)`` returns ``(f(x + t d), f'(x + t d) . d)``.  Returns ``(t, f, gd, ok)`` where
    the last evaluated point is the returned one; ok is False when no step satisfying the
    conditions was found (then the best point seen is returned, re-evaluated).
    """
    evals = 0
    best = (np.inf, 0.0, 0.0)

    def ev(tt):
        nonlocal evals, best
        evals += 1
        f, gd = phi(tt)
        if f < best[0]:
            best = (f, tt, gd)
        return f, gd

    def zoom(lo, flo, glo, hi, fhi):
        while evals < max_evals:
            # safeguarded quadratic interpolation between lo and hi, else bisection
            d = hi - lo
            denom = 2 * (fhi - flo - glo * d)
            tt = lo - glo * d * d / denom if denom > 0 else lo + d / 2
            a, b = min(lo, hi), max(lo, hi)
            if not (a + 0.1 * (b - a) <= tt <= b - 0.1 * (b - a)):
                tt = (lo + hi) / 2
            f, gd = ev(tt)
            if f > f0 + c1 * tt * g0 or f >= flo:
                hi, fhi = tt, f
            else:
                if abs(gd) <= -c2 * g0:
                    return tt, f, gd, True
                if gd * (hi - lo) >= 0:
                    hi, fhi = lo, flo
                lo, flo, glo = tt, f, gd
        return None

    prev_t, prev_f, prev_g = 0.0, f0, g0
    while evals < max_evals:
        f, gd = ev(t)
        if not np.isfinite(f) or f > f0 + c1 * t * g0 or (evals > 1 and f >= prev_f):
            out = zoom(prev_t, prev_f, prev_g, t, f if np.isfinite(f) else np.inf)
            break
        if abs(gd) <= -c2 * g0:
            return t, f, gd, True
        if gd >= 0:
            out = zoom(t, f, gd, prev_t, prev_f)
            break
        prev_t, prev_f, prev_g = t, f, gd
        t *= 2
    else:
        out = None
    if out is not None:
        return out
    fb, tb, gb = best
    if fb < f0:
        f, gd = phi(tb)       # make the trial point the best one again
        return tb, f, gd, False
    return 0.0, f0, g0, False
