"""Makers of the HDF5 datasets: the real 8x8 digits, synthetic digits at any size, IDX files."""

from __future__ import annotations

import gzip
import struct
import sys
import time
from pathlib import Path

import numpy as np

from .hdf5 import DataError, write_dataset

__all__ = ["make_digits", "make_synthetic", "make_idx", "read_idx", "digits_arrays"]


def digits_arrays(seed: int = 0, test_fraction: float = 0.25):
    """The 1797 8x8 digits scikit-learn ships, scaled to [0, 1], split with a fixed seed.

    Returns ``((x_train, y_train), (x_test, y_test))`` with x of shape (n, 1, 8, 8).
    """
    from sklearn.datasets import load_digits  # reads a file inside the package: no network
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return (x[tr], y[tr]), (x[te], y[te])


def make_digits(out, seed: int = 0) -> dict:
    train, test = digits_arrays(seed)
    write_dataset(out, train, test, 10, "scikit-learn 8x8 digits (UCI optdigits test set)")
    return {"train": len(train[1]), "test": len(test[1]), "shape": [1, 8, 8]}


def _render(images, size, rng):
    """Draw 8x8 images at size x size with random rotation, scale, shift and noise."""
    from scipy.ndimage import map_coordinates
    b = len(images)
    ang = rng.uniform(-0.3, 0.3, b)                 # radians, about +-17 degrees
    scale = rng.uniform(0.75, 1.15, b) * size / 10.0  # output pixels per source pixel
    shift = rng.uniform(-0.12, 0.12, (b, 2)) * size
    c = (size - 1) / 2.0
    v, u = np.meshgrid(np.arange(size) - c, np.arange(size) - c)  # u rows, v cols
    cos, sin = np.cos(ang)[:, None, None], np.sin(ang)[:, None, None]
    uu = u[None] - shift[:, 0, None, None]
    vv = v[None] - shift[:, 1, None, None]
    s = scale[:, None, None]
    src_r = (cos * uu + sin * vv) / s + 3.5
    src_c = (-sin * uu + cos * vv) / s + 3.5
    idx = np.broadcast_to(np.arange(b)[:, None, None], src_r.shape)
    out = map_coordinates(images.astype(np.float32), [idx, src_r, src_c], order=1, cval=0.0)
    out += rng.normal(0, 0.08, out.shape).astype(np.float32)
    return out[:, None, :, :].astype(np.float32)


def _synthetic_split(src_x, src_y, count, size, rng, progress, label):
    x = np.empty((count, 1, size, size), dtype=np.float32)
    y = np.empty(count, dtype=np.int32)
    t0, chunk = time.time(), 1024
    for i in range(0, count, chunk):
        n = min(chunk, count - i)
        pick = rng.integers(0, len(src_y), n)
        x[i:i + n] = _render(src_x[pick, 0], size, rng)
        y[i:i + n] = src_y[pick]
        if progress and (time.time() - t0 > 2 or i + n == count):
            print(f"  {label}: {i + n}/{count} samples", file=sys.stderr, flush=True)
            t0 = time.time()
    return x, y


def make_synthetic(out, size: int = 32, count: int = 10000, test_count: int | None = None,
                   seed: int = 0, progress: bool = True) -> dict:
    """Digits drawn at ``size`` x ``size`` with random affine distortions and noise.

    Training images come only from the digits' training split and test images only from its
    test split, so test accuracy measures generalisation to unseen writers' digits.
    """
    if size < 8:
        raise DataError(f"--size {size}: use at least 8")
    test_count = max(100, count // 5) if test_count is None else test_count
    (xtr, ytr), (xte, yte) = digits_arrays(seed)
    rng = np.random.default_rng(seed + 1)
    train = _synthetic_split(xtr, ytr, count, size, rng, progress, "train")
    test = _synthetic_split(xte, yte, test_count, size, rng, progress, "test")
    write_dataset(out, train, test, 10, f"synthetic digits {size}x{size} (seed {seed})")
    return {"train": count, "test": test_count, "shape": [1, size, size]}


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (MNIST format), plain or gzipped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: IDX file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    need = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != need:
        raise DataError(f"{path}: IDX data has {len(body)} bytes, the header says {need} "
                        "(truncated or mismatched file)")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _idx_pair(images, labels):
    x, y = read_idx(images), read_idx(labels)
    if x.ndim not in (3, 4):
        raise DataError(f"{images}: expected images of shape (n, rows, cols), got {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{labels}: {y.shape} labels do not match {len(x)} images in {images}")
    x = x.astype(np.float32)
    if x.ndim == 3:
        x = x[:, None]
    if np.issubdtype(read_idx(images).dtype, np.uint8):
        x /= 255.0
    return x, y.astype(np.int32)


def make_idx(out, train_images, train_labels, test_images, test_labels) -> dict:
    train = _idx_pair(train_images, train_labels)
    test = _idx_pair(test_images, test_labels)
    if train[0].shape[1:] != test[0].shape[1:]:
        raise DataError(f"{test_images}: images of shape {test[0].shape[1:]} do not match "
                        f"{train_images} ({train[0].shape[1:]})")
    classes = int(max(train[1].max(), test[1].max())) + 1
    write_dataset(out, train, test, classes, f"IDX files {Path(train_images).name}")
    return {"train": len(train[1]), "test": len(test[1]), "shape": list(train[0].shape[1:])}
