"""Training algorithms, and the registry that the config, the launcher and the topology
read: each algorithm's name, its run function, and whether it needs a parameter server.

An algorithm with a parameter server gets world rank 0 as its coordinator and ranks
1..ps_shards as shards, then the replicas; one without has only replica ranks.  Every run
function is called on every rank as ``run(topo, cfg, net, out, resume, quiet)`` and returns
the summary on world rank 0, None elsewhere.  Importing this module imports no algorithm.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["Algorithm", "ALGORITHMS"]


@dataclass(frozen=True)
class Algorithm:
    name: str
    module: str                  # dbmpi.algorithms.<module>.<function> runs it
    function: str
    parameter_server: bool       # a coordinator and ps_shards shards beside the replicas
    one_replica: bool = False    # cluster.replicas must be 1
    summary: str = ""

    @property
    def run(self):
        return getattr(importlib.import_module(f"{__name__}.{self.module}"), self.function)


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("sgd", "sgd", "run_sgd", parameter_server=False, one_replica=True,
              summary="one replica, mini-batch SGD or Adagrad (model-parallel over partitions)"),
    Algorithm("downpour", "downpour", "run_downpour", parameter_server=True,
              summary="asynchronous replicas and a sharded parameter server"),
    Algorithm("sandblaster", "sandblaster", "run_sandblaster", parameter_server=True,
              summary="batch L-BFGS, its vectors on the shards, gradients from work portions"),
    Algorithm("sync", "sync", "run_sync", parameter_server=False,
              summary="synchronous replicas, gradients averaged with Allreduce"),
)}
