"""The run directory: config.toml, metrics.jsonl, summary.json and checkpoint.h5."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .config import Config, dumps

__all__ = ["RunDir", "save_checkpoint", "load_checkpoint", "CheckpointError", "peak_rss_mb",
           "add_to_summary"]


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB."""
    import resource
    import sys
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def add_to_summary(run_dir, fields: dict) -> None:
    """Add ``fields`` to the summary.json already written in ``run_dir``."""
    path = Path(run_dir) / "summary.json"
    summary = json.loads(path.read_text())
    summary.update(fields)
    _atomic_write(path, lambda f: f.write(json.dumps(summary, indent=2).encode() + b"\n"))


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run; the message says why."""


class RunDir:
    """Writes one run's files.  Only the rank that owns the run directory creates one."""

    def __init__(self, path, cfg: dict, t0: float | None = None, append: bool = False):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time() if t0 is None else t0
        (self.path / "config.toml").write_text(dumps(cfg))
        self._metrics = open(self.path / "metrics.jsonl", "a" if append else "w")

    def elapsed(self) -> float:
        return time.time() - self.t0

    def log(self, kind: str, **fields) -> None:
        rec = {"time": round(self.elapsed(), 4), "kind": kind}
        rec.update(fields)
        self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()

    def write_summary(self, summary: dict) -> None:
        _atomic_write(self.path / "summary.json",
                      lambda f: f.write(json.dumps(summary, indent=2).encode() + b"\n"))

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.h5"

    def close(self) -> None:
        self._metrics.close()


def _fsync(path: Path) -> None:
    """fsync a file or a directory by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of saves whose writer was killed (their pid is gone)."""
    for old in path.parent.glob(f".{path.name}.tmp*"):
        try:
            pid = int(old.name.rsplit(".tmp", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            old.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            pass


@contextmanager
def replacing(path):
    """Yield a temporary path beside ``path`` (hidden, named for this process); when the
    block ends, fsync the file written there and rename it over ``path``, then fsync the
    directory.  A kill at any moment leaves either the previous file or the new one, whole;
    an exception leaves the previous one and no temporary."""
    path = Path(path)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync(path.parent)


def _atomic_write(path: Path, write) -> None:
    """``write(f)`` into a file that replaces ``path`` atomically (:func:`replacing`)."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        write(f)


def save_checkpoint(path, params: np.ndarray, state: dict, counters: dict, cfg: Config) -> None:
    """Save parameters, optimizer state arrays and counters atomically to ``path``.

    A ``state`` value may be a function returning the array: it is called when that array
    is written, and the array dropped after, so a state of many vectors (Sandblaster's
    L-BFGS history) is never in memory all at once."""
    import h5py
    path = Path(path)

    def write(f):
        with h5py.File(f, "w") as h:
            h.create_dataset("params", data=np.asarray(params, dtype=np.float32))
            g = h.create_group("state")
            for k, v in state.items():
                g.create_dataset(k, data=np.asarray(v() if callable(v) else v))
            c = h.create_group("counters")
            for k, v in counters.items():
                c.attrs[k] = v
            h.attrs["config"] = dumps(cfg)
            h.attrs["num_params"] = len(params)
            h.attrs["saved_at"] = time.time()
    _atomic_write(path, write)


def load_checkpoint(path, num_params: int | None = None, lazy: bool = False) -> dict:
    """Read a checkpoint: ``{"params", "state": {...}, "counters": {...}, "config": str}``.

    ``lazy``: ``params`` and the ``state`` vectors stay in the file (h5py datasets, the file
    kept open for this process), read where sliced: a resumed rank then reads only the
    slices it owns (a shard its range, a partition its slice), not every vector of the
    whole model (Sandblaster's L-BFGS history alone is 2 x lbfgs_history float64 vectors).
    A checkpoint written meanwhile replaces the file by a rename, so what was opened stays
    the one read."""
    import h5py
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        h = h5py.File(path, "r")
        try:
            vec = (lambda d: d) if lazy else (lambda d: d[...])
            out = {"params": vec(h["params"]),
                   "state": {k: vec(v) for k, v in h["state"].items()},
                   "counters": {k: (v.item() if hasattr(v, "item") else v)
                                for k, v in h["counters"].attrs.items()},
                   "config": str(h.attrs["config"])}
        finally:
            if not lazy:
                h.close()
    except (OSError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable dbmpi checkpoint ({e})") from None
    if num_params is not None and len(out["params"]) != num_params:
        raise CheckpointError(f"{path}: holds {len(out['params'])} parameters but this "
                              f"network has {num_params}: the checkpoint is from a different "
                              "model")
    return out
