"""Pieces every algorithm uses: batch order, test-set evaluation, progress (the run loop
and its stop rules: dbmpi.algorithms.loop)."""

from __future__ import annotations

import sys
import time

import numpy as np

from ..data import open_split

__all__ = ["Batches", "Evaluator", "Progress", "replica_part", "restore_local",
           "coordinate"]


def replica_part(n: int, replica: int, replicas: int) -> np.ndarray:
    """The contiguous block of training indices replica ``replica`` reads."""
    lo, hi = n * replica // replicas, n * (replica + 1) // replicas
    return np.arange(lo, hi)


class Batches:
    """Mini-batches of one replica's part of the training split, in a fixed random order.

    The order depends only on ``(seed, replica, epoch)``, never on the partitioning, so runs
    with different ``partitions`` see the same batches.  ``position`` is ``(epoch, offset)``
    and restores the order on resume.
    """

    def __init__(self, path, batch_size: int, seed: int, replica: int = 0, replicas: int = 1,
                 cache_mb: float = 1024.0, position=(0, 0), share=None):
        import h5py
        with h5py.File(path, "r") as f:
            n = len(f["train"]["y"])
        self.split = open_split(path, "train", replica_part(n, replica, replicas), cache_mb,
                                share)      # share: see Split
        if len(self.split) < batch_size:
            raise ValueError(f"optimizer.batch_size = {batch_size} is larger than replica "
                             f"{replica}'s part of the training set ({len(self.split)} samples)")
        self.batch_size, self.seed, self.replica = batch_size, seed, replica
        self.epoch, self.offset = position
        self._perm = self._order(self.epoch)

    def _order(self, epoch):
        rng = np.random.default_rng([self.seed, self.replica, epoch])
        return rng.permutation(len(self.split))

    @property
    def position(self):
        return (self.epoch, self.offset)

    def next_indices(self) -> np.ndarray:
        if self.offset + self.batch_size > len(self._perm):
            self.epoch, self.offset = self.epoch + 1, 0
            self._perm = self._order(self.epoch)
        idx = self._perm[self.offset:self.offset + self.batch_size]
        self.offset += self.batch_size
        return idx

    def next(self):
        """The next batch ``(x, y)``."""
        return self.split.take(self.next_indices())


class Evaluator:
    """Loss and accuracy of parameters on the test split (held in memory)."""

    def __init__(self, net, path, split: str = "test"):
        s = open_split(path, split)
        self.x, self.y = s.all()
        s.close()
        self.net = net

    def __call__(self, theta) -> dict:
        return self.net.evaluate(theta, self.x, self.y)


class Progress:
    """A progress line on stderr at most every ``every_s`` seconds."""

    def __init__(self, every_s: float = 2.0, enabled: bool = True):
        self.every_s, self.enabled = every_s, enabled
        self._last = 0.0

    def __call__(self, text: str, force: bool = False) -> None:
        now = time.time()
        if self.enabled and (force or now - self._last >= self.every_s):
            print(text, file=sys.stderr, flush=True)
            self._last = now


def restore_local(model, theta, opt, resume) -> dict:
    """Put my slice of a checkpoint's parameters and optimizer state (``resume``, or None)
    into ``theta`` and ``opt.state``; returns its counters ({} without one)."""
    if resume is None:
        return {}
    theta[:] = model.local(resume["params"])
    for k, v in resume["state"].items():
        if k in opt.state:
            opt.state[k][:] = model.local(v)
    return resume["counters"]


def coordinate(out, cfg, resume, train) -> dict:
    """The coordinator's side of a run: ``train(run)`` with the run directory ``out`` open
    (appended to on resume); writes and returns the summary it gives."""
    from ..rundir import RunDir
    run = RunDir(out, cfg, append=resume is not None)
    try:
        summary = train(run)
        run.write_summary(summary)
        return summary
    finally:
        run.close()
