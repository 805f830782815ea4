"""Downpour's coordinator: logs the replicas' progress, evaluates the shards' parameters,
checkpoints their snapshots, and decides when the run stops (the run loop)."""

from __future__ import annotations

import numpy as np

from ... import tags
from ...mpiwait import Backoff
from ...rundir import save_checkpoint
from ..common import Evaluator, Progress
from ..loop import DIVERGED, DONE, RunLoop
from .shard import direct_pushes, request_snapshots

__all__ = ["Coordinator"]


class Coordinator:
    """World rank 0: writes the run directory and runs the run loop; its step handles the
    replicas' messages (LOG, DONE, WARM, DIVERGED), its evaluation fetches the shards'
    parameters, its checkpoint gathers their snapshots."""

    def __init__(self, topo, cfg, net, ps, run, quiet, resume):
        self.topo, self.cfg, self.net, self.client = topo, cfg, net, ps.client
        self.layout, self.run = ps.layout, run
        self.pairs = ps.pairs
        self.evaluate = Evaluator(net, cfg.data.path)
        self.say = Progress(enabled=not quiet)
        self.theta = self.client.theta      # fetches land here (MPI memory)
        self.done: dict[int, dict] = {}
        c = resume["counters"] if resume else {}
        # each replica's (step, epoch, offset), as it last reported them
        self.positions = {i: tuple(int(c.get(f"replica{i}_{k}", 0))
                                   for k in ("step", "epoch", "offset"))
                          for i in range(topo.replicas)}
        self.diverged = False

    def snapshots(self, tag=tags.SNAP_REQ):
        return request_snapshots(self.topo, tag)

    def checkpoint(self, snaps):
        to_c = self.layout.from_slices      # shards hold the partitioned layout, in order
        params = to_c([m["params"] for m in snaps])
        state = {k: to_c([m["state"][k] for m in snaps]) for k in snaps[0]["state"]}
        counters = {"updates": sum(m["version"] for m in snaps),
                    **{f"shard{m['shard']}_version": m["version"] for m in snaps}}
        for i, (st, ep, off) in self.positions.items():
            counters.update({f"replica{i}_step": st, f"replica{i}_epoch": ep,
                             f"replica{i}_offset": off})
        save_checkpoint(self.run.checkpoint, params, state, counters, self.cfg)
        return params

    def eval(self):
        self.client.fetch(self.theta)
        ev = self.evaluate(self.layout.to_canonical(self.theta))
        updates = sum(self.client.fetched_version.values())
        self.run.log("eval", updates=updates, test_loss=ev["loss"], test_accuracy=ev["accuracy"])
        return ev, updates

    def handle_messages(self):
        from mpi4py import MPI
        ctrl, st, any_msg = self.topo.ctrl, MPI.Status(), False
        while ctrl.Iprobe(source=MPI.ANY_SOURCE, status=st):
            any_msg = True
            src, tag = st.Get_source(), st.Get_tag()
            m = ctrl.recv(source=src, tag=tag)
            if tag == tags.LOG:
                self.positions[m["replica"]] = (m["step"], m.pop("epoch"), m.pop("offset"))
                self.run.log("train", **m)
            elif tag == tags.DONE:
                self.done[m["replica"]] = m
                self.positions[m["replica"]] = (m["steps"], m["epoch"], m["offset"])
            elif tag == tags.DIVERGED:
                self.diverged = True
            elif tag == tags.WARM:
                for reps in self.topo.replica_ranks[1:]:
                    ctrl.send(None, dest=reps[0], tag=tags.GO)
        return any_msg

    def train(self):
        backoff = Backoff(hi=0.02)

        def step():
            """Serve the replicas' messages until there is nothing to do."""
            if self.handle_messages():
                backoff.busy()
            else:
                backoff.idle()
            if self.diverged:
                return DIVERGED
            return DONE if len(self.done) == self.topo.replicas else 0

        def evaluate():
            ev, updates = self.eval()
            self.say(f"{loop.elapsed():6.1f} s  updates {updates}  test accuracy "
                     f"{ev['accuracy']:.4f}  replicas done {len(self.done)}/"
                     f"{self.topo.replicas}")
            if not np.isfinite(ev["loss"]):
                self.diverged = True
            return ev

        loop = RunLoop(self.cfg.run)
        stop = loop.run(step, evaluate, lambda: self.checkpoint(self.snapshots()))
        wall = loop.elapsed()
        ctrl = self.topo.ctrl
        for reps in self.topo.replica_ranks:
            for rank in reps:
                ctrl.send(None, dest=rank, tag=tags.STOP)
        while len(self.done) < self.topo.replicas:
            if not self.handle_messages():
                backoff.idle()
        snaps = self.snapshots(tags.DRAIN)   # every push the replicas sent is applied by now
        params = self.checkpoint(snaps)
        self.say(f"stopped ({stop}); checkpoint {self.run.checkpoint}", force=True)
        ev = self.evaluate(params)
        self.run.log("eval", updates=sum(m["version"] for m in snaps),
                     test_loss=ev["loss"], test_accuracy=ev["accuracy"])
        return self.summary(stop, wall, ev, snaps)

    def summary(self, stop, wall, ev, snaps):
        reps = [self.done[i] for i in range(self.topo.replicas)]
        # inbox pushes are timed by the shards, direct ones by the replicas
        stal = np.sum([m["staleness"] for m in snaps] + [d["staleness"] for d in reps], axis=0)
        last = int(np.flatnonzero(stal)[-1]) + 1 if stal.any() else 0
        samples = sum(d["samples"] for d in reps)
        o = self.cfg.optimizer
        return {
            "algorithm": "downpour", "ranks": self.topo.ctrl.Get_size(), "stop_reason": stop,
            "wall_time_s": wall, "samples_per_s": samples / wall if wall else 0.0,
            "final_test_loss": ev["loss"], "final_test_accuracy": ev["accuracy"],
            "num_params": self.net.num_params,
            "pushes_sent": sum(d["pushes_sent"] for d in reps),
            "pushes_applied": sum(m["applied"] for m in snaps),
            "pushes_rejected": (sum(m["rejected"] for m in snaps)
                                + sum(d["pushes_rejected"] for d in reps)),
            "push_attempts": sum(d["push_attempts"] for d in reps),
            "nonfinite_dropped": sum(d["nonfinite_dropped"] for d in reps),
            "updates": sum(m["version"] for m in snaps),
            "staleness_histogram": stal[:last].tolist(),
            "staleness_mean": float((stal * np.arange(len(stal))).sum() / max(stal.sum(), 1)),
            "partitions": self.topo.partitions,
            "partition_bytes_per_step": reps[0]["partition_bytes_per_step"],
            "partition_exchange_ms_per_step": reps[0]["partition_exchange_ms_per_step"],
            "replicas": [{"replica": d["replica"], "steps": d["steps"],
                          "samples_per_s": d["samples"] / d["wall_s"] if d["wall_s"] else 0.0,
                          "step_s": d["wall_s"] / max(d["steps"], 1),
                          "compute_s": d["compute_s"], "fetch_s": d["fetch_s"],
                          "push_s": d["push_s"], "fetches": d["fetches"],
                          "pushes_sent": d["pushes_sent"]} for d in reps],
            "shards": [{"shard": m["shard"], "applied": m["applied"],
                        "rejected": m["rejected"], "cpu_s": m["cpu_s"],
                        "attended_s": m["attended_s"],
                        "cpu_fraction": m["cpu_s"] / wall if wall else 0.0} for m in snaps],
            "config": {"replicas": self.topo.replicas, "ps_shards": self.topo.shards,
                       "n_fetch": o.n_fetch, "n_push": o.n_push,
                       "adagrad": o.adagrad, "batch_size": o.batch_size,
                       "pushes": "direct" if direct_pushes(self.cfg) else "inbox",
                       "attended_pairs": self.pairs["attended"]},
            "ps_pairs": self.pairs,
        }
