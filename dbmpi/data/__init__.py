"""Datasets: the HDF5 format, its checks and readers, and the makers of the datasets."""

from .hdf5 import DataError, Split, check_file, open_split, write_dataset
from .make import make_digits, make_idx, make_synthetic, read_idx

__all__ = ["DataError", "Split", "check_file", "open_split", "write_dataset", "make_digits",
           "make_idx", "make_synthetic", "read_idx"]
