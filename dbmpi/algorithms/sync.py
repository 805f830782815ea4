"""Algorithm ``sync``: synchronous data-parallel SGD, gradients averaged with Allreduce.

No parameter server: every replica holds the whole parameter vector (with partitions > 1,
each partition its slice, and it averages that slice with the same partition of the other
replicas), and applies the same averaged gradient, so all copies stay identical.  The
baseline Downpour is compared with.  World rank 0 (replica 0, partition 0) evaluates, logs
and checkpoints; one small reduction a step carries its decisions to every rank, and any
rank's finding that the averaged gradient holds NaN/Inf: then no rank applies it and the
run stops as diverged (exit 3), its checkpoint holding the last finite parameters.  A
checkpoint keeps each replica's place in its data order, so a resumed run reads the
batches an uninterrupted one would.
"""

from __future__ import annotations

import time

from .. import aligned
from ..mpiwait import wait
from ..optim import all_finite, make_optimizer
from ..rundir import RunDir, save_checkpoint
from .common import Batches, Evaluator, Progress, restore_local
from .loop import DIVERGED, DONE, RunLoop, agree_by

__all__ = ["run_sync"]


class SyncReplica:
    """One partition of one replica: its slice, averaged with the same partition of every
    other replica each step."""

    def __init__(self, topo, cfg, net, out, resume=None, quiet=False):
        from ..model.partition import PartitionedNetwork
        self.topo, self.cfg, self.net = topo, cfg, net
        o, r = cfg.optimizer, cfg.run
        self.max_steps, self.log_every = r.max_steps, r.log_every
        self.R, self.rep = topo.replicas, topo.index
        self.model = PartitionedNetwork(cfg.model, topo.model)
        self.theta = self.model.init_local(o.seed)
        self.opt = make_optimizer(o, len(self.theta))
        c = restore_local(self.model, self.theta, self.opt, resume)
        self.step0 = self.step = int(c.get("step", 0))
        rep = self.rep
        position = (int(c.get(f"replica{rep}_epoch", 0)), int(c.get(f"replica{rep}_offset", 0)))
        self.batches = Batches(cfg.data.path, o.batch_size, o.seed, rep, self.R,
                               cfg.data.cache_mb, position=position, share=topo.model)
        self.world, self.peers = topo.ctrl, topo.peers
        self.lead = self.world.Get_rank() == 0
        self.run = RunDir(out, cfg, append=resume is not None) if self.lead else None
        self.evaluate_on = Evaluator(net, cfg.data.path) if self.lead else None
        self.say = Progress(enabled=self.lead and not quiet)
        self.gsum = aligned.empty_like(self.theta)
        self.gbuf = aligned.empty_like(self.theta)  # the gradient's buffer, every step
        self.comm_s = 0.0
        self.loop = RunLoop(r, self.lead, agree_by(self.world), timed=True)

    def one_step(self) -> int:
        from mpi4py import MPI
        x, y = self.batches.next()
        loss, g = self.model.loss_and_grad(self.theta, x, y, out=self.gbuf)
        t = time.perf_counter()
        wait([self.peers.Iallreduce(g, self.gsum, op=MPI.SUM)])
        self.comm_s += time.perf_counter() - t
        if not all_finite(self.gsum):   # the same verdict on every replica of my partition
            return DIVERGED
        self.gsum /= self.R
        self.opt.step(self.theta, self.gsum)
        self.step += 1
        if self.lead and (self.step % self.log_every == 0 or self.step == 1):
            self.run.log("train", replica=0, step=self.step, loss=loss)
        return DONE if self.step >= self.max_steps else 0

    def evaluate(self):
        """Replica 0's parameters, evaluated by world rank 0."""
        if self.rep != 0:
            return None
        params = self.model.gather_canonical(self.theta)
        if not self.lead:
            return None
        ev = self.evaluate_on(params)
        self.run.log("eval", updates=self.step, test_loss=ev["loss"],
                     test_accuracy=ev["accuracy"])
        self.say(f"step {self.step}  test accuracy {ev['accuracy']:.4f}  "
                 f"{self.loop.elapsed():.1f} s")
        return ev

    def checkpoint(self) -> None:
        """Collective over every rank: replica 0's vectors and every replica's place in
        its data order."""
        places = self.world.gather((self.rep, *self.batches.position), root=0)
        if self.rep != 0:
            return
        params = self.model.gather_canonical(self.theta)
        state = {k: self.model.gather_canonical(v) for k, v in self.opt.state.items()}
        if self.lead:
            counters = {"step": self.step}
            for r_, epoch, offset in places:
                counters[f"replica{r_}_epoch"], counters[f"replica{r_}_offset"] = epoch, offset
            save_checkpoint(self.run.checkpoint, params, state, counters, self.cfg)

    def train(self) -> dict | None:
        loop = self.loop
        stop = "max_steps"
        if self.step < self.max_steps:
            stop = loop.run(self.one_step, self.evaluate, self.checkpoint)
        wall = loop.elapsed()
        params = self.model.gather_canonical(self.theta) if self.rep == 0 else None
        self.checkpoint()
        if not self.lead:
            return None
        ev = self.evaluate_on(params)
        self.run.log("eval", updates=self.step, test_loss=ev["loss"],
                     test_accuracy=ev["accuracy"])
        o = self.cfg.optimizer
        summary = {"algorithm": "sync", "ranks": self.world.Get_size(),
                   "partitions": self.model.P, "stop_reason": stop, "steps": self.step,
                   "wall_time_s": wall,
                   "samples_per_s": ((self.step - self.step0) * o.batch_size * self.R / wall
                                     if wall else 0.0),
                   "allreduce_s": self.comm_s, "step_ms_quartiles": loop.step_quartiles(),
                   "final_test_loss": ev["loss"], "final_test_accuracy": ev["accuracy"],
                   "num_params": self.net.num_params, "pushes_sent": 0, "pushes_applied": 0}
        self.run.write_summary(summary)
        self.run.close()
        return summary


def run_sync(topo, cfg, net, out, resume=None, quiet=False):
    return SyncReplica(topo, cfg, net, out, resume, quiet).train()
