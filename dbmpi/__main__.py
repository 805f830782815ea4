import os
import sys

# One BLAS thread per process unless the user asked otherwise: dbmpi runs one rank per core,
# and threaded BLAS in every rank oversubscribes the cores (a 5-unit softmax block took 20x
# longer with two ranks on two cores).  This must happen before numpy loads its BLAS.
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

from .cli import main  # noqa: E402  (also the `dbmpi` console script's entry point)

if __name__ == "__main__":
    sys.exit(main())
