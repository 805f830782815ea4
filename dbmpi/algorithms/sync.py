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

import numpy as np

from .. import aligned
from ..mpiwait import wait
from ..optim import all_finite, make_optimizer
from ..rundir import RunDir, save_checkpoint
from .common import Batches, Evaluator, Progress
from .loop import DIVERGED, DONE, RunLoop, agree_by

__all__ = ["run_sync"]


def run_sync(topo, cfg, net, out, resume=None, quiet=False):
    from mpi4py import MPI

    from ..model.partition import PartitionedNetwork
    o, r = cfg["optimizer"], cfg["run"]
    P, R, rep = topo.partitions, topo.replicas, topo.index
    model = PartitionedNetwork(cfg["model"], topo.model)
    theta = model.init_local(o["seed"])
    opt = make_optimizer(o, len(theta))
    c = resume["counters"] if resume is not None else {}
    if resume is not None:
        theta[:] = model.local(resume["params"])
        for k, v in resume["state"].items():
            if k in opt.state:
                opt.state[k][:] = model.local(v)
    step0 = int(c.get("step", 0))
    position = (int(c.get(f"replica{rep}_epoch", 0)), int(c.get(f"replica{rep}_offset", 0)))
    batches = Batches(cfg["data"]["path"], o["batch_size"], o["seed"], rep, R,
                      cfg["data"]["cache_mb"], position=position,
                      share=topo.model)
    world, peers = topo.ctrl, topo.peers
    lead = world.Get_rank() == 0
    run = RunDir(out, cfg, append=resume is not None) if lead else None
    evaluate_on = Evaluator(net, cfg["data"]["path"]) if lead else None
    say = Progress(enabled=lead and not quiet)
    at = {"step": step0, "comm_s": 0.0}

    def checkpoint():
        """Collective over every rank: replica 0's vectors and every replica's place in
        its data order."""
        places = world.gather((rep, *batches.position), root=0)
        if rep != 0:
            return
        params = model.gather_canonical(theta)
        state = {k: model.gather_canonical(v) for k, v in opt.state.items()}
        if lead:
            counters = {"step": at["step"]}
            for r_, epoch, offset in places:
                counters[f"replica{r_}_epoch"], counters[f"replica{r_}_offset"] = epoch, offset
            save_checkpoint(run.checkpoint, params, state, counters, cfg)

    gsum = aligned.empty_like(theta)
    gbuf = aligned.empty_like(theta)  # the gradient's buffer, every step

    def step():
        x, y = batches.next()
        loss, g = model.loss_and_grad(theta, x, y, out=gbuf)
        t = time.perf_counter()
        wait([peers.Iallreduce(g, gsum, op=MPI.SUM)])
        at["comm_s"] += time.perf_counter() - t
        if not all_finite(gsum):     # the same verdict on every replica of my partition
            return DIVERGED
        np.divide(gsum, R, out=gsum)
        opt.step(theta, gsum)
        at["step"] += 1
        if lead and (at["step"] % r["log_every"] == 0 or at["step"] == 1):
            run.log("train", replica=0, step=at["step"], loss=loss)
        return DONE if at["step"] >= r["max_steps"] else 0

    def evaluate():
        """Replica 0's parameters, evaluated by world rank 0."""
        if rep != 0:
            return None
        params = model.gather_canonical(theta)
        if not lead:
            return None
        ev = evaluate_on(params)
        run.log("eval", updates=at["step"], test_loss=ev["loss"], test_accuracy=ev["accuracy"])
        say(f"step {at['step']}  test accuracy {ev['accuracy']:.4f}  {loop.elapsed():.1f} s")
        return ev

    loop = RunLoop(r, lead, agree_by(world))
    stop = loop.run(step, evaluate, checkpoint) if step0 < r["max_steps"] else "max_steps"
    wall = loop.elapsed()
    params = model.gather_canonical(theta) if rep == 0 else None
    checkpoint()
    if not lead:
        return None
    ev = evaluate_on(params)
    run.log("eval", updates=at["step"], test_loss=ev["loss"], test_accuracy=ev["accuracy"])
    summary = {"algorithm": "sync", "ranks": world.Get_size(), "partitions": P,
               "stop_reason": stop, "steps": at["step"], "wall_time_s": wall,
               "samples_per_s": ((at["step"] - step0) * o["batch_size"] * R / wall
                                 if wall else 0.0),
               "allreduce_s": at["comm_s"], "step_ms_quartiles": loop.step_quartiles(),
               "final_test_loss": ev["loss"], "final_test_accuracy": ev["accuracy"],
               "num_params": net.num_params, "pushes_sent": 0, "pushes_applied": 0}
    run.write_summary(summary)
    run.close()
    return summary
