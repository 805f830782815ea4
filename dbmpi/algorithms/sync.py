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
from .common import (CHECKPOINT, DIVERGED, EVAL, STOP, TARGET, Batches, Evaluator, Progress,
                     lead_decision)

__all__ = ["run_sync"]


def run_sync(topo, cfg, net, out, resume=None, quiet=False):
    from mpi4py import MPI

    from ..model.partition import PartitionedNetwork
    o, r = cfg["optimizer"], cfg["run"]
    P, R, rep = topo.partitions, topo.replicas, topo.index
    model = PartitionedNetwork(cfg["model"], topo.model) if P > 1 else net
    local = (lambda v: model.local(v)) if P > 1 else (lambda v: np.array(v))
    theta = model.init_local(o["seed"]) if P > 1 else net.init_params(o["seed"])
    opt = make_optimizer(o, len(theta))
    step0, c = 0, resume["counters"] if resume is not None else {}
    if resume is not None:
        theta[:] = local(resume["params"])
        for k, v in resume["state"].items():
            if k in opt.state:
                opt.state[k][:] = local(v)
        step0 = int(c.get("step", 0))
    position = (int(c.get(f"replica{rep}_epoch", 0)), int(c.get(f"replica{rep}_offset", 0)))
    batches = Batches(cfg["data"]["path"], o["batch_size"], o["seed"], rep, R,
                      cfg["data"]["cache_mb"], position=position,
                      share=topo.model if P > 1 else None)
    world, peers = topo.ctrl, topo.peers
    lead = world.Get_rank() == 0
    run = RunDir(out, cfg, append=resume is not None) if lead else None
    evaluate = Evaluator(net, cfg["data"]["path"]) if lead else None
    say = Progress(enabled=lead and not quiet)

    def canonical(v):
        """Replica 0's whole vector on world rank 0 (collective over replica 0)."""
        if P == 1:
            return v
        return model.gather_canonical(v)

    def checkpoint(step):
        """Collective over every rank: replica 0's vectors and every replica's place in
        its data order."""
        places = world.gather((rep, *batches.position), root=0)
        if rep != 0:
            return
        params = canonical(theta)
        state = {k: canonical(v) for k, v in opt.state.items()}
        if lead:
            counters = {"step": step}
            for r_, epoch, offset in places:
                counters[f"replica{r_}_epoch"], counters[f"replica{r_}_offset"] = epoch, offset
            save_checkpoint(run.checkpoint, params, state, counters, cfg)

    gsum = aligned.empty_like(theta)
    t0 = time.time()
    last_eval = last_ckpt = t0
    step, stop, t_comm, ev = step0, "max_steps", 0.0, None
    flag = np.zeros(1, dtype=np.int32)           # bits: EVAL, STOP, ... (common.py)
    gbuf = aligned.empty_like(theta)  # the gradient's buffer, every step
    while step < r["max_steps"]:
        x, y = batches.next()
        loss, g = model.loss_and_grad(theta, x, y, out=gbuf)
        t = time.perf_counter()
        wait([peers.Iallreduce(g, gsum, op=MPI.SUM)])
        t_comm += time.perf_counter() - t
        finite = all_finite(gsum)     # the same verdict on every replica of my partition
        if finite:
            gsum /= R
            opt.step(theta, gsum)
            step += 1
        flag[0] = 0 if finite else DIVERGED
        if lead and finite:
            if step % r["log_every"] == 0 or step == 1:
                run.log("train", replica=0, step=step, loss=loss)
            bits, why = lead_decision(r, t0, last_eval, last_ckpt)
            flag[0] |= bits
            stop = why or stop
        wait([world.Iallreduce(MPI.IN_PLACE, flag, op=MPI.BOR)])
        if flag[0] & DIVERGED:       # no rank applied this step's gradient
            stop = "diverged"
            break
        if flag[0] & EVAL and rep == 0:
            params = canonical(theta)
            if lead:
                ev = evaluate(params)
                run.log("eval", updates=step, test_loss=ev["loss"], test_accuracy=ev["accuracy"])
                last_eval = time.time()
                say(f"step {step}  test accuracy {ev['accuracy']:.4f}  {time.time() - t0:.1f} s")
                if r["target_accuracy"] and ev["accuracy"] >= r["target_accuracy"]:
                    stop = "target_accuracy"
                    flag[0] |= TARGET
        if flag[0] & EVAL:
            wait([world.Ibcast(flag, root=0)])   # did the evaluation reach the target?
            if flag[0] & TARGET:
                break
        if flag[0] & CHECKPOINT:
            checkpoint(step)
            last_ckpt = time.time()
        if flag[0] & STOP:
            break
    wall = time.time() - t0
    params = canonical(theta) if rep == 0 else None
    checkpoint(step)
    if not lead:
        return None
    ev = evaluate(params)
    run.log("eval", updates=step, test_loss=ev["loss"], test_accuracy=ev["accuracy"])
    summary = {"algorithm": "sync", "ranks": world.Get_size(), "partitions": P,
               "stop_reason": stop, "steps": step, "wall_time_s": wall,
               "samples_per_s": (step - step0) * o["batch_size"] * R / wall if wall else 0.0,
               "allreduce_s": t_comm, "final_test_loss": ev["loss"],
               "final_test_accuracy": ev["accuracy"], "num_params": net.num_params,
               "pushes_sent": 0, "pushes_applied": 0}
    run.write_summary(summary)
    run.close()
    return summary
