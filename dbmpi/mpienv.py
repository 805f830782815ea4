"""The environment dbmpi's launchers give the ranks: one place for what each MPI needs.

- One BLAS thread per rank (the ranks already fill the cores).
- Open MPI refuses to start as root, or more ranks than cores, unless told; its UCX
  one-sided component does not initialise without UCX hardware and says so on every rank,
  so the other one-sided components are used (MPICH ignores all of these).
- ``DBMPI_TRANSPORT=tcp`` sends every message over TCP, as between two Ethernet nodes,
  even inside one node: MPICH's network module (``MPIR_CVAR_NOLOCAL=1``) over UCX's TCP
  transport, or Open MPI's ob1 over its TCP BTL.  The test suite and the benchmarks run
  on it unchanged.

``python -m dbmpi.mpienv`` prints the settings as ``export`` lines for a shell launcher;
``python -m dbmpi.mpienv --srun-mpi`` prints the ``srun --mpi`` plugin this Python's MPI
speaks: ``pmix`` for Open MPI (whose ranks speak only PMIx), ``pmi2`` for the MPICH family.
"""

from __future__ import annotations

import os
import shlex

__all__ = ["launcher_env", "srun_mpi", "TRANSPORTS"]

TRANSPORTS = ("", "tcp")

_ALWAYS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
           "OMPI_MCA_osc": "^ucx"}
_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
_TCP = {"MPIR_CVAR_NOLOCAL": "1", "UCX_TLS": "tcp,self",                  # MPICH
        "OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "tcp,self"}                # Open MPI


def settings(env=None) -> dict:
    """The variables :func:`launcher_env` adds to ``env`` (default: this process's)."""
    env = os.environ if env is None else env
    transport = env.get("DBMPI_TRANSPORT", "")
    if transport not in TRANSPORTS:
        raise ValueError(f"DBMPI_TRANSPORT={transport!r} is not known; use tcp (every "
                         "message over TCP) or leave it unset")
    add = dict(_ALWAYS)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        add.update(_ROOT)
    if transport == "tcp":
        add.update(_TCP)
    return {k: v for k, v in add.items() if k not in env}   # what the user set wins


def launcher_env(env=None) -> dict:
    """``env`` (default: this process's) with dbmpi's launcher settings added."""
    env = dict(os.environ if env is None else env)
    env.update(settings(env))
    return env


def srun_mpi() -> str:
    """The ``srun --mpi`` plugin for the MPI library under mpi4py (MPI is not initialised:
    its library version may be asked before ``MPI_Init``)."""
    import mpi4py
    mpi4py.rc.initialize = False
    from mpi4py import MPI
    return "pmix" if "Open MPI" in MPI.Get_library_version() else "pmi2"


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["--srun-mpi"]:
        print(srun_mpi())
    else:
        for k, v in settings().items():
            print(f"export {k}={shlex.quote(v)}")
