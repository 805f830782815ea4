#!/usr/bin/env python
"""Usage: [MPIEXEC -n N] python [-m mpi4py] -m dbmpi.pinned CORES (-m MODULE | -c CODE) [ARGS...]

Runs ``python -m MODULE ARGS`` (or ``python -c CODE ARGS``) with rank r of the job (as the
launcher's environment says, without starting MPI) pinned to the r-th core of CORES, a comma-separated list of CPU numbers (cycled when the
ranks outnumber it); a single process is rank 0.  The benchmarks use it for ``--cores``:
on a VM, two virtual CPUs can be the two hardware threads of one physical core, and the
launcher's own binding (``-bind-to core``, ``--cpu-bind=cores``) cannot know which; the
benchmarks' "all these cores at once" line measures it, and this puts each partition on the
cores chosen from it, whatever launcher started the job.
"""

import os
import runpy
import sys


def parse_cores(text: str) -> list[int]:
    try:
        cores = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        cores = []
    if not cores or min(cores) < 0:
        raise SystemExit(f"cores must be a comma-separated list of CPU numbers such as 0,2; "
                         f"got {text!r}")
    if not hasattr(os, "sched_setaffinity"):
        raise SystemExit("pinning ranks to cores needs os.sched_setaffinity (Linux); leave "
                         "out the cores and let the launcher place the ranks")
    allowed = os.sched_getaffinity(0)
    outside = sorted(set(cores) - allowed)
    if outside:
        raise SystemExit(f"cores {outside} are not available to this process (it may run "
                         f"on {sorted(allowed)}); choose the cores among those")
    return cores


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] not in ("-m", "-c"):
        raise SystemExit(__doc__.splitlines()[0])
    cores = parse_cores(argv[0])
    # the rank as the launcher advertises it: importing mpi4py here would initialise MPI
    # before dbmpi's rank guard forks, and a fork after MPI_Init is undefined (Open MPI
    # ranks died of it)
    from dbmpi.cli import mpi_rank_from_env
    rank = mpi_rank_from_env()
    os.sched_setaffinity(0, {cores[rank % len(cores)]})
    sys.path[0] = os.getcwd()                    # as `python -m` and `python -c` have it
    if argv[1] == "-m":
        sys.argv = [argv[2], *argv[3:]]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *argv[3:]]
        exec(compile(argv[2], "<string>", "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    main(sys.argv[1:])
