"""``train`` under MPI: check the rank count, split the world, run this rank's role.

Launch as ``mpiexec -n N python -m mpi4py -m dbmpi train CONFIG``.  An exception on any
rank prints one line naming the rank and its role and aborts the whole job (MPI_Abort),
so no rank is left hanging; a rank that dies outright is named by its guard
(:mod:`dbmpi.signals`).  Exit codes: :mod:`dbmpi.exitcodes`.
"""

from __future__ import annotations

import json
import signal
import sys

from .algorithms import ALGORITHMS
from .config import ranks_needed
from . import exitcodes
from .rundir import add_to_summary, peak_rss_mb

__all__ = ["train_mpi"]


def _explain(cfg) -> str:
    c = cfg.cluster
    workers = f"{c.replicas} replicas x {c.partitions} partitions"
    if ALGORITHMS[cfg.optimizer.algorithm].parameter_server:
        return f"1 coordinator + {c.ps_shards} parameter-server shards + {workers}"
    return workers


class InjectedFailure(RuntimeError):
    """Raised on purpose by ``[faults] fail_rank`` / ``fail_after_s`` (failure experiments)."""


def _arm_fault(cfg, rank):
    f = cfg.faults
    if f.fail_rank != rank:
        return

    def boom(signum, frame):
        raise InjectedFailure(f"failure injected by [faults] fail_rank = {rank} after "
                              f"{f.fail_after_s} s")
    signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, max(f.fail_after_s, 1e-3))


def peaks_by_role(peaks, cfg) -> dict:
    """Each rank's peak memory (MB, world rank order) as ``{"coordinator": MB, "shards":
    [MB per shard], "replicas": [[MB per partition] per replica]}``."""
    from .topology import role_of
    out = {}
    for rank, mb in enumerate(peaks):
        role, index, part = role_of(rank, cfg)
        if role == "coordinator":
            out["coordinator"] = mb
        elif role == "shard":
            out.setdefault("shards", []).append(mb)
        else:
            reps = out.setdefault("replicas", [])
            if part == 0:
                reps.append([])
            reps[index].append(mb)
    return out


# environment variables that choose a transport, reported in summary.json where set
_TRANSPORT_VARS = ("DBMPI_TRANSPORT", "MPIR_CVAR_NOLOCAL", "MPIR_CVAR_CH4_NETMOD", "UCX_TLS",
                   "UCX_NET_DEVICES", "FI_PROVIDER", "OMPI_MCA_pml", "OMPI_MCA_btl",
                   "OMPI_MCA_osc", "OMPI_MCA_mtl")


def mpi_facts(world) -> dict:
    """Collective: which MPI library the job runs on (its version line), what it says of its
    transport, how many nodes the job spans (distinct processor names: MPI's shared-
    memory groups would count every rank alone under MPICH's MPIR_CVAR_NOLOCAL) and which
    ranks ran on each ("0-2,5")."""
    import os
    from mpi4py import MPI
    lines = MPI.Get_library_version().replace("\x00", "").strip().splitlines()
    device = [line.split(":", 1)[1].strip() for line in lines if line.startswith("MPICH Device:")]
    hosts = {}
    for rank, name in enumerate(world.allgather(MPI.Get_processor_name())):
        hosts.setdefault(name, []).append(rank)
    transport = {"settings": {k: os.environ[k] for k in _TRANSPORT_VARS if k in os.environ}}
    if device:
        transport["device"] = device[0]
    return {"mpi": lines[0].strip(), "transport": transport, "nodes": len(hosts),
            "hosts": {name: _spans(ranks) for name, ranks in hosts.items()}}


def _spans(ranks: list[int]) -> str:
    """Ranks in increasing order as spans: [0, 1, 2, 5] -> "0-2,5"."""
    out, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}-{a}" if a > start else f"{a}")
            start = b
    return ",".join(out)


def train_mpi(cfg, net, resume, out, quiet=False, guard=None, agree_out=False) -> int:
    import faulthandler
    from mpi4py import MPI
    faulthandler.register(signal.SIGUSR2, all_threads=False)  # `kill -USR2 PID`: where is it
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    need = ranks_needed(cfg)
    if size != need:
        if rank == 0:
            print(f"dbmpi: error: this config needs {need} ranks ({_explain(cfg)}) but the job "
                  f"has {size}: launch it with `mpiexec -n {need} ...`", file=sys.stderr,
                  flush=True)
        return _leave(world, exitcodes.USAGE, guard)
    if agree_out:
        out = world.bcast(out, root=0)
    bad = None
    if rank == 0:
        from .data import DataError, check_file
        try:
            check_file(cfg.data.path, net.classes, net.input_shape, scan=True)
        except DataError as e:
            bad = str(e)
    bad = world.bcast(bad, root=0)
    if bad is not None:
        if rank == 0:
            print(f"dbmpi: error: {bad}", file=sys.stderr, flush=True)
        return _leave(world, exitcodes.USAGE, guard)
    algo = cfg.optimizer.algorithm
    from .topology import Topology
    facts = mpi_facts(world)
    topo = Topology.split(world, cfg)
    try:
        _arm_fault(cfg, rank)
        summary = ALGORITHMS[algo].run(topo, cfg, net, out, resume, quiet)
        signal.setitimer(signal.ITIMER_REAL, 0)
        reason = world.bcast(summary.get("stop_reason") if summary else None, root=0)
        peaks = world.gather(peak_rss_mb(), root=0)
        if summary is not None:     # rank 0 wrote it
            summary["peak_rss_mb"] = peaks_by_role(peaks, cfg)
            summary.update(facts)
            add_to_summary(out, {"peak_rss_mb": summary["peak_rss_mb"], **facts})
    except BaseException as e:  # noqa: BLE001 - any failure must end the whole job
        line = f"dbmpi: error on rank {rank} ({topo.describe()}): {type(e).__name__}: {e}"
        if guard:   # an MPI error most likely follows a peer's death: let that report go first
            guard.report(line, consequence=2 if isinstance(e, MPI.Exception) else 0)
            guard.error()
        else:
            print(line, file=sys.stderr, flush=True)
        world.Abort(exitcodes.FAILED)
        return exitcodes.FAILED
    if summary is not None:
        print(json.dumps({"run_dir": str(out), **{k: v for k, v in summary.items()
                                                   if k not in ("replicas", "shards",
                                                                "peak_rss_mb")}}), flush=True)
    code = exitcodes.OK
    if reason == "diverged":
        if rank == 0:
            print("dbmpi: error: training diverged (non-finite gradients or loss); the "
                  "parameters in the checkpoint are the last finite ones; try a smaller "
                  f"optimizer.learning_rate than {cfg.optimizer.learning_rate}",
                  file=sys.stderr, flush=True)
        code = exitcodes.DIVERGED
    elif reason == "preempted":
        code = exitcodes.PREEMPTED
    return _leave(world, code, guard)


def _leave(world, code: int, guard=None) -> int:
    """Every rank reached the same verdict: end MPI together, so that `python -m mpi4py`
    does not turn a non-zero exit into MPI_Abort (which Open MPI reports as a crash).  The
    guard learns the verdict first: a launcher that ends the other ranks when the first one
    exits non-zero (srun --kill-on-bad-exit) does not change the job's exit code."""
    from mpi4py import MPI
    if guard:
        guard.clean_exit(code)
    world.Barrier()            # rank 0's message is out before any rank ends
    MPI.Finalize()
    return code
