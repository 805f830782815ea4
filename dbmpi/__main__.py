import os
import sys

# One BLAS thread per process unless the user asked otherwise: dbmpi runs one rank per core,
# and threaded BLAS in every rank oversubscribes the cores (a 5-unit softmax block took 20x
# longer with two ranks on two cores).  This must happen before numpy loads its BLAS.
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

if sys.argv[1:2] == ["train"]:
    # A scheduler's preemption signal may come while the ranks start (a requeued job is
    # warned at once when little time is left): from here on it checkpoints, not kills.
    from .signals import install_preemption
    install_preemption()

from .cli import main  # noqa: E402  (also the `dbmpi` console script's entry point)

if __name__ == "__main__":
    sys.exit(main())
