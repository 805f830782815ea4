"""Sandblaster's work portions: who computes which part of the batch gradient."""

from __future__ import annotations

import time

__all__ = ["PortionScheduler"]


class PortionScheduler:
    """Hands out the portions of one batch to replicas; the first result of a portion wins.

    ``balance``: a replica that finishes its own contiguous chunk takes portions from the end
    of the largest remaining chunk (else it stops at its chunk).  ``backups``: once nothing is
    unassigned, an idle replica gets a copy of an outstanding portion it does not hold.
    """

    def __init__(self, portions, replicas: int, balance: bool = True, backups: bool = True):
        portions = list(portions)
        self.n = len(portions)
        self.chunks = [portions[self.n * r // replicas:self.n * (r + 1) // replicas]
                       for r in range(replicas)]
        self.balance, self.backups = balance, backups
        self.holders: dict[int, set] = {}     # outstanding portion -> replicas computing it
        self.assigned_at: dict[int, float] = {}
        self.done: set = set()
        self.copies = 0

    @property
    def complete(self) -> bool:
        return len(self.done) == self.n

    def _unassigned(self) -> int:
        return sum(len(c) for c in self.chunks)

    def next_for(self, r: int):
        """``(portion, is_backup, last_round)`` for replica r, or None when it has no work."""
        if self.chunks[r]:
            p = self.chunks[r].pop(0)
        elif self.balance and self._unassigned():
            victim = max(range(len(self.chunks)), key=lambda i: len(self.chunks[i]))
            p = self.chunks[victim].pop()
        else:
            cands = [p for p, h in self.holders.items() if r not in h and p not in self.done]
            if not (self.backups and cands) or (not self.balance and self._unassigned()):
                return None
            p = min(cands, key=lambda p: (len(self.holders[p]), self.assigned_at[p]))
            self.holders[p].add(r)
            self.copies += 1
            return p, True, True
        self.holders[p] = {r}
        self.assigned_at[p] = time.perf_counter()
        last = not (self.chunks[r] if not self.balance else self._unassigned())
        return p, False, last

    def result(self, r: int, p: int) -> bool:
        """Record replica r's result for portion p; True if it is the first (it counts)."""
        h = self.holders.get(p)
        if h is not None:
            h.discard(r)
        if p in self.done:
            return False
        self.done.add(p)
        self.holders.pop(p, None)
        return True
