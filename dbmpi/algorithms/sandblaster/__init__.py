"""Sandblaster L-BFGS: the coordinator runs L-BFGS whose vectors live on the shards.

- Shards hold, each for its own range, every L-BFGS vector in float64: ``x`` (parameters),
  ``g`` (gradient), ``d`` (direction), ``xe``/``gt`` (the line search's trial point and its
  gradient) and the history pairs ``s0..``, ``y0..``.  The coordinator sends commands (form
  the direction from coefficients, set the trial point, collect the batch gradient, accept
  a step) and receives only scalars; it runs the two-loop recursion on the Gram matrix of
  the pairs and the gradient (:class:`~.lbfgs.Gram`), which each accepted step updates.
- The batch gradient at a trial point is computed by the replicas on work portions of
  ``portion_size`` samples handed out by the coordinator (:class:`PortionScheduler`):
  sequential portions to the same replica, faster replicas get more, idle replicas get
  backup copies of outstanding portions near the end, and the first result of a portion
  wins.  The shards Put each trial point into the replicas' landing windows (RMA) before
  the coordinator starts the batch; replicas push the gradient sums of their accepted
  portions (into their inbox slot, by RMA: see :mod:`dbmpi.server`) before a last-round
  portion, when they run out of work, and every ``push_every`` portions (1: each portion
  alone, so
  the shards' float64 sums, and a resumed run's trajectory, do not depend on timing) or,
  with 0, before any portion they expect to take longer than the push (running means of
  both): a fast transport then pushes every portion and a slow one (TCP) a few times a
  batch, and the batch never waits on held sums much longer than a push takes.
"""

from __future__ import annotations

from ...model.layout import Layout
from ...server import PSSetup
from ..common import coordinate
from .coordinator import Coordinator
from .lbfgs import Gram, wolfe_line_search
from .portions import PortionScheduler
from .replica import Replica
from .shard import SandblasterShard, make_shard, serve_shard

__all__ = ["run_sandblaster", "PortionScheduler", "SandblasterShard", "Gram",
           "wolfe_line_search", "Coordinator", "Replica", "make_shard", "serve_shard"]


def run_sandblaster(topo, cfg, net, out, resume=None, quiet=False):
    """Every rank calls this; each plays its role.  Returns the summary on the coordinator."""
    ps = PSSetup(topo, Layout(net, topo.partitions), progress=cfg.cluster.ps_progress)
    shard = make_shard(topo, cfg, net, ps) if topo.role == "shard" else None
    ps.start(topo)                 # every shard's memory is initialised before anyone uses it
    summary = None
    if shard is not None:
        serve_shard(topo, shard)
    elif topo.role == "replica":
        Replica(topo, cfg, ps.client).run()
    else:
        summary = coordinate(out, cfg, resume, lambda run: Coordinator(
            topo, cfg, net, ps, run, quiet, resume).train())
    ps.free()
    return summary
