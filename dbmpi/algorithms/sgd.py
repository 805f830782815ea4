"""Algorithm ``sgd``: one replica, mini-batch SGD (or Adagrad), over P >= 1 partitions.

Every partition reads the same batches (the order never depends on P), computes its units
and updates its own slice of the parameters; partition 0 logs, decides when to evaluate and
stop (:class:`~dbmpi.algorithms.loop.RunLoop`) and writes the run directory.  With one
partition and no communicator (``python -m dbmpi train`` without mpiexec) no MPI is used.
"""

from __future__ import annotations

import time

import numpy as np

from .. import aligned
from ..mpiwait import wait
from ..optim import SGD, make_optimizer
from ..rundir import RunDir, save_checkpoint
from .common import Batches, Progress, restore_local
from .loop import DONE, RunLoop, agree_by

__all__ = ["run_sgd", "trainer"]


def trainer(net, opt, theta):
    """``step(x, y)``: one update of ``theta`` in place; returns the loss before it.

    Plain SGD is fused into the backward pass (``out=theta``, see Network.loss_and_grad):
    no gradient array and no second pass over the parameters, which for a 10M-parameter
    network is 4 ms of memory traffic a step.  Adagrad takes the gradient into one buffer
    reused every step."""
    if isinstance(opt, SGD):
        scale = -float(opt.lr)

        def fused(x, y):
            return net.loss_and_grad(theta, x, y, out=theta, scale=scale, accumulate=True)[0]
        return fused
    gbuf = aligned.empty_like(theta)

    def step(x, y):
        loss, g = net.loss_and_grad(theta, x, y, out=gbuf)
        opt.step(theta, g)
        return loss
    return step


class SgdTrainer:
    """One partition of the replica (``topo=None``: this process alone)."""

    def __init__(self, topo, cfg, out, resume=None, quiet=False):
        from ..data import open_split
        from ..model.partition import PartitionedNetwork
        self.comm = comm = topo.model if topo is not None else None
        self.cfg, o, r = cfg, cfg.optimizer, cfg.run
        self.max_steps, self.log_every, self.lr = r.max_steps, r.log_every, o.learning_rate
        self.model = PartitionedNetwork(cfg.model, comm)
        self.lead = self.model.p == 0
        self.theta = self.model.init_local(o.seed)
        self.opt = make_optimizer(o, self.model.local_size)
        c = restore_local(self.model, self.theta, self.opt, resume)
        self.step0 = self.step = int(c.get("step", 0))
        # the partitions on a node share one cache of the data (they all read every sample)
        self.batches = Batches(cfg.data.path, o.batch_size, o.seed,
                               cache_mb=cfg.data.cache_mb,
                               position=(int(c.get("epoch", 0)), int(c.get("offset", 0))),
                               share=comm)
        test = open_split(cfg.data.path, "test", share=comm)
        self.tx, self.ty = test.all()
        test.close()
        self.run = RunDir(out, cfg, append=resume is not None) if self.lead else None
        self.say = Progress(enabled=self.lead and not quiet)
        self.train_step = trainer(self.model, self.opt, self.theta)
        # every partition's step gives the same bits (a diverged loss raises on all)
        self.loop = RunLoop(r, self.lead, agree_by(comm, lead_only=True), timed=True)
        self.loss, self.compute_s, self.sent, self.exch = float("nan"), 0.0, 0, 0.0

    def one_step(self) -> int:
        model = self.model
        x, y = self.batches.next()
        b0, e0, tc = model.bytes_sent, model.exchange_seconds, time.perf_counter()
        loss = self.train_step(x, y)
        self.compute_s += time.perf_counter() - tc
        self.sent += model.bytes_sent - b0
        self.exch += model.exchange_seconds - e0
        if not np.isfinite(loss):    # every partition has the same loss: all stop
            raise FloatingPointError(
                f"training diverged at step {self.step} (loss {loss}); try a smaller "
                f"optimizer.learning_rate than {self.lr}")
        self.step += 1
        self.loss = loss
        if self.lead and (self.step % self.log_every == 0 or self.step == 1):
            self.run.log("train", replica=0, step=self.step, loss=loss)
        return DONE if self.step >= self.max_steps else 0

    def evaluate(self):
        ev = self.model.evaluate(self.theta, self.tx, self.ty)
        if not self.lead:
            return None
        self.run.log("eval", updates=self.step, test_loss=ev["loss"],
                     test_accuracy=ev["accuracy"])
        self.say(f"step {self.step}/{self.max_steps}  loss {self.loss:.4f}  test accuracy "
                 f"{ev['accuracy']:.4f}  {self.loop.elapsed():.1f} s")
        return ev

    def checkpoint(self) -> None:
        model = self.model
        params = model.gather_canonical(self.theta)
        state = {k: model.gather_canonical(v) for k, v in self.opt.state.items()}
        if self.lead:
            save_checkpoint(self.run.checkpoint, params, state,
                            {"step": self.step, "epoch": self.batches.epoch,
                             "offset": self.batches.offset}, self.cfg)

    def train(self) -> dict | None:
        loop = self.loop
        # the clock starts when every partition is ready: setup times differ by rank, and
        # the first exchange would count the slowest one's setup as training time
        if self.model.P > 1:
            wait([self.comm.Ibarrier()])
        loop.start()
        stop = "max_steps"
        if self.step < self.max_steps:
            stop = loop.run(self.one_step, self.evaluate, self.checkpoint)
        wall = loop.elapsed()
        ev = self.model.evaluate(self.theta, self.tx, self.ty)
        self.checkpoint()
        sent, exch = [self.sent], [self.exch]
        if self.model.P > 1:
            sent, exch = self.comm.gather(self.sent, root=0), self.comm.gather(self.exch, root=0)
        if not self.lead:
            return None
        self.run.log("eval", updates=self.step, test_loss=ev["loss"],
                     test_accuracy=ev["accuracy"])
        summary = self.summary(stop, wall, ev, sent, exch)
        self.run.write_summary(summary)
        self.run.close()
        self.say(f"done: {self.step} steps in {wall:.1f} s, test accuracy "
                 f"{ev['accuracy']:.4f} ({stop})", force=True)
        return summary

    def summary(self, stop, wall, ev, sent, exch) -> dict:
        steps, P = self.step - self.step0, self.model.P
        return {
            "algorithm": "sgd", "ranks": P, "partitions": P,
            "stop_reason": stop, "steps": self.step, "wall_time_s": wall,
            "samples_per_s": (steps * self.cfg.optimizer.batch_size / wall
                              if wall > 0 else 0.0),
            "final_train_loss": self.loss, "final_test_loss": ev["loss"],
            "final_test_accuracy": ev["accuracy"], "num_params": self.model.num_params,
            "partition_bytes_per_step": [b / max(steps, 1) for b in sent],
            "compute_s": self.compute_s, "step_ms_quartiles": self.loop.step_quartiles(),
            "partition_exchange_ms_per_step": [1e3 * e / max(steps, 1) for e in exch],
            "pushes_sent": 0, "pushes_applied": 0,
        }


def run_sgd(topo, cfg, net, out, resume=None, quiet=False) -> dict | None:
    """Train on every partition of the replica (``topo=None``: this process alone).
    Returns the summary on partition 0 (also written to summary.json), None elsewhere."""
    return SgdTrainer(topo, cfg, out, resume, quiet).train()
