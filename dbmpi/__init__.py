"""dbmpi: DistBelief-style distributed training of deep networks on MPI."""

__version__ = "0.1.0"
__all__ = ["__version__"]


def _thread_level() -> None:
    """Ask MPI for ``MPI_THREAD_FUNNELED`` (only the main thread calls MPI, as in every
    dbmpi rank) when it is initialised, not mpi4py's default ``MPI_THREAD_MULTIPLE``:
    under that, MPICH takes a lock around each call and gives the core away
    (``sched_yield``) in every progress loop, so a replica's ``Win_flush`` lost its core
    to the next rank on an oversubscribed node (the main job: fetches 3x, pushes 2x
    slower).  ``MPI4PY_RC_THREAD_LEVEL`` in the environment still wins."""
    try:
        import mpi4py
    except ImportError:         # the parts that need no MPI
        return
    mpi4py.rc.thread_level = "funneled"


_thread_level()
