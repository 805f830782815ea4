"""dbmpi: DistBelief-style distributed training of deep networks on MPI."""

__version__ = "0.1.0"
__all__ = ["__version__"]
