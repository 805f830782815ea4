"""HDF5 datasets: validation and batch reading.

Format (README, "Datasets"): groups ``train`` and ``test``, each with ``x`` (float32,
``(n, channels, height, width)``) and ``y`` (integer labels in ``[0, classes)``), and the
file attributes ``classes`` and ``source``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["DataError", "Split", "open_split", "check_file", "write_dataset"]

_CHUNK = 4096  # samples per read when scanning a whole split


class DataError(ValueError):
    """A dataset file that cannot be used; the message names the file and the field."""


def _h5():
    import h5py
    return h5py


def write_dataset(path, train, test, classes: int, source: str) -> None:
    """Write ``train=(x, y)`` and ``test=(x, y)`` (arrays) to an HDF5 file in the format
    above.  The file is written beside ``path`` under a temporary name of this process,
    fsynced and renamed over it: a reader sees the old file or the new one, whole, and a
    write that fails leaves the old one and no temporary."""
    from ..rundir import replacing
    h5py = _h5()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["classes"] = int(classes)
        f.attrs["source"] = source
        for name, (x, y) in (("train", train), ("test", test)):
            g = f.create_group(name)
            x = np.ascontiguousarray(x, dtype=np.float32)
            chunk = (min(len(x), 256),) + x.shape[1:] if len(x) else None
            g.create_dataset("x", data=x, chunks=chunk)
            g.create_dataset("y", data=np.asarray(y, dtype=np.int32))


def check_file(path, classes: int | None = None, input_shape=None, scan: bool = True) -> dict:
    """Check a dataset file; return ``{"classes", "source", "train": n, "test": n, "shape"}``.

    Raises :class:`DataError` naming the file and the field.  With ``scan``, every value is
    read (in chunks) to reject NaN/Inf and labels out of range.
    """
    h5py = _h5()
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: dataset file not found; make one with "
                        "`python -m dbmpi data digits --out data/digits.h5`")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e}); the file may be truncated: "
                        "make it again") from None
    with f:
        info = {"source": str(f.attrs.get("source", "unknown"))}
        if "classes" not in f.attrs:
            raise DataError(f"{path}: file attribute 'classes' is missing")
        info["classes"] = int(f.attrs["classes"])
        if classes is not None and info["classes"] != classes:
            raise DataError(f"{path}: attribute 'classes' = {info['classes']} but the model's "
                            f"softmax has {classes} classes")
        shape = None
        for split in ("train", "test"):
            if split not in f or not isinstance(f[split], h5py.Group):
                raise DataError(f"{path}: group '{split}' is missing")
            for field in ("x", "y"):
                if field not in f[split]:
                    raise DataError(f"{path}: dataset '{split}/{field}' is missing")
            x, y = f[split]["x"], f[split]["y"]
            if x.ndim != 4 or x.dtype != np.float32:
                raise DataError(f"{path}: '{split}/x' has shape {x.shape} and dtype {x.dtype}; "
                                "expected float32 (n, channels, height, width)")
            if y.ndim != 1 or y.dtype.kind not in "iu":
                raise DataError(f"{path}: '{split}/y' has shape {y.shape} and dtype {y.dtype}; "
                                "expected integer labels of shape (n,)")
            if len(y) != len(x):
                raise DataError(f"{path}: '{split}/x' has {len(x)} samples but '{split}/y' "
                                f"has {len(y)}")
            if len(x) == 0:
                raise DataError(f"{path}: '{split}/x' is empty")
            if shape is None:
                shape = tuple(x.shape[1:])
            elif tuple(x.shape[1:]) != shape:
                raise DataError(f"{path}: 'test/x' samples have shape {x.shape[1:]} but "
                                f"'train/x' samples have {shape}")
            if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
                raise DataError(f"{path}: '{split}/x' samples have shape {tuple(x.shape[1:])} "
                                f"but model.input_shape is {list(input_shape)}")
            info[split] = len(x)
            if scan:
                try:
                    _scan(path, split, x, y, info["classes"])
                except OSError as e:
                    raise DataError(f"{path}: cannot read '{split}' ({e}); the file may be "
                                    "truncated: make it again") from None
        info["shape"] = list(shape)
    return info


def _scan(path, split, x, y, classes):
    labels = y[...]
    if labels.min() < 0 or labels.max() >= classes:
        bad = int(np.flatnonzero((labels < 0) | (labels >= classes))[0])
        raise DataError(f"{path}: '{split}/y'[{bad}] = {int(labels[bad])} is out of range "
                        f"[0, {classes})")
    for i in range(0, len(x), _CHUNK):
        block = x[i:i + _CHUNK]
        if not np.isfinite(block).all():
            bad = i + int(np.flatnonzero(~np.isfinite(block).reshape(len(block), -1).all(1))[0])
            raise DataError(f"{path}: '{split}/x'[{bad}] holds NaN or Inf")


class Split:
    """One split of a dataset file, read by sample index.

    The samples a reader asks for (``indices``, default all) are cached in memory when they fit
    in ``cache_mb``; otherwise each batch is read from the file.  ``share``: a communicator
    of ranks that read the same samples (a replica's partitions), collective then: those on
    one node hold one cache between them, in MPI shared memory, read from the file once.
    """

    _CHUNK = 4096            # samples read at a time into a shared cache

    def __init__(self, path, split: str, indices=None, cache_mb: float = 1024.0, share=None):
        h5py = _h5()
        self.path, self.split = Path(path), split
        self._file = h5py.File(self.path, "r")
        self._x, self._y = self._file[split]["x"], self._file[split]["y"]
        n = len(self._y)
        self.indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        self.sample_shape = tuple(self._x.shape[1:])
        nbytes = len(self.indices) * int(np.prod(self.sample_shape)) * 4
        self._cache = self._win = None
        if nbytes <= cache_mb * 2**20:
            if share is not None and share.Get_size() > 1:
                self._cache = self._shared_cache(share, nbytes)
            if self._cache is None:
                self._cache = self._read(self.indices)

    def _shared_cache(self, share, nbytes):
        """(x, y) in memory shared by the ranks of ``share`` on this node, read by the first
        of them; None (for all of them) where a rank is alone on its node or /dev/shm has
        too little room (writing past a full tmpfs would crash the reader)."""
        import os

        from mpi4py import MPI
        node = share.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            n = len(self.indices)
            total = 8 * n + nbytes                   # y (int64) first: both stay aligned
            try:
                st = os.statvfs("/dev/shm")
                room = st.f_bavail * st.f_frsize > 2 * total
            except OSError:                          # no /dev/shm: MPI finds its own way
                room = True
            if node.Get_size() == 1 or not node.allreduce(room, op=MPI.LAND):
                return None
            lead = node.Get_rank() == 0
            win = MPI.Win.Allocate_shared(total if lead else 0, 1, comm=node)
            mem = np.frombuffer(win.Shared_query(0)[0], dtype=np.uint8)
            y = mem[:8 * n].view(np.int64)
            x = mem[8 * n:].view(np.float32).reshape((n,) + self.sample_shape)
            if lead:
                for i in range(0, n, self._CHUNK):
                    x[i:i + self._CHUNK], y[i:i + self._CHUNK] = self._read(
                        self.indices[i:i + self._CHUNK])
            node.Barrier()
            x.flags.writeable = y.flags.writeable = False
            self._win = win             # kept for the life of the run (freed at exit)
            return x, y
        finally:
            node.Free()

    @property
    def shared(self) -> bool:
        """Whether the cache is in memory shared with other ranks on this node."""
        return self._win is not None

    def __len__(self):
        return len(self.indices)

    def _read(self, idx):
        """Read samples at file indices ``idx`` (any order) as (x, y)."""
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) and np.all(np.diff(idx) == 1):
            s = slice(int(idx[0]), int(idx[-1]) + 1)
            return self._x[s], self._y[s].astype(np.int64)
        order = np.argsort(idx, kind="stable")
        uniq, inv = np.unique(idx[order], return_inverse=True)
        x, y = self._x[uniq], self._y[uniq]
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        sel = inv[back]
        return x[sel], y[sel].astype(np.int64)

    def take(self, positions):
        """Samples at ``positions`` (0-based, into this reader's ``indices``)."""
        positions = np.asarray(positions, dtype=np.int64)
        if self._cache is not None:
            return self._cache[0][positions], self._cache[1][positions]
        return self._read(self.indices[positions])

    def all(self):
        """Every sample: the cache itself where there is one (read-only where shared)."""
        return self._cache if self._cache is not None else self.take(np.arange(len(self)))

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def open_split(path, split: str, indices=None, cache_mb: float = 1024.0, share=None) -> Split:
    return Split(path, split, indices, cache_mb, share)
