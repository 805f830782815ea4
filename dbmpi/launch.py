"""``train`` under MPI: check the rank count, split the world, run this rank's role.

Launch as ``mpiexec -n N python -m mpi4py -m dbmpi train CONFIG``.  An exception on any
rank prints one line naming the rank and its role and aborts the whole job (MPI_Abort),
so no rank is left hanging.
"""

from __future__ import annotations

import json
import sys

from .config import ranks_needed

__all__ = ["train_mpi"]


def _explain(cfg) -> str:
    c, algo = cfg["cluster"], cfg["optimizer"]["algorithm"]
    workers = f"{c['replicas']} replicas x {c['partitions']} partitions"
    if algo in ("downpour", "sandblaster"):
        return f"1 coordinator + {c['ps_shards']} parameter-server shards + {workers}"
    return workers


def train_mpi(cfg, net, resume, out, quiet=False) -> int:
    import faulthandler
    import signal
    from mpi4py import MPI
    faulthandler.register(signal.SIGUSR2, all_threads=False)  # `kill -USR2 PID`: where is it
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    need = ranks_needed(cfg)
    if size != need:
        if rank == 0:
            print(f"dbmpi: error: this config needs {need} ranks ({_explain(cfg)}) but the job "
                  f"has {size}: launch it with `mpiexec -n {need} ...`", file=sys.stderr)
        return 2
    algo = cfg["optimizer"]["algorithm"]
    from .topology import Topology
    topo = Topology.split(world, cfg)
    try:
        if algo == "downpour":
            from .algorithms.downpour import run_downpour
            summary = run_downpour(topo, cfg, net, out, resume, quiet)
        elif algo == "sandblaster":
            from .algorithms.sandblaster import run_sandblaster
            summary = run_sandblaster(topo, cfg, net, out, resume, quiet)
        elif algo == "sync":
            from .algorithms.sync import run_sync
            summary = run_sync(topo, cfg, net, out, resume, quiet)
        else:
            raise NotImplementedError(f"optimizer.algorithm = {algo!r} under MPI is not built "
                                      "yet; use downpour, sync, or sgd with one rank")
    except BaseException as e:  # noqa: BLE001 - any failure must end the whole job
        print(f"dbmpi: error on rank {rank} ({topo.describe()}): {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        world.Abort(1)
        return 1
    if summary is not None:
        print(json.dumps({"run_dir": str(out), **{k: v for k, v in summary.items()
                                                   if k not in ("replicas", "shards")}}))
    return 0
