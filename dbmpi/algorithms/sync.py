"""Algorithm ``sync``: synchronous data-parallel SGD, gradients averaged with Allreduce.

No parameter server: every replica holds the whole parameter vector and applies the same
averaged gradient, so all copies stay identical.  The baseline Downpour is compared with.
Replica 0 evaluates, logs and checkpoints (its time counts in the wall time, as it would
for any synchronous trainer).
"""

from __future__ import annotations

import time

import numpy as np

from ..optim import make_optimizer
from ..rundir import RunDir, save_checkpoint
from .common import Batches, Evaluator, Progress

__all__ = ["run_sync"]


def run_sync(topo, cfg, net, out, resume=None, quiet=False):
    from mpi4py import MPI
    comm = topo.replicas_comm
    if topo.partitions != 1:
        raise NotImplementedError("sync with cluster.partitions > 1 is not supported yet; "
                                  "use sgd or downpour for model parallelism")
    o, r = cfg["optimizer"], cfg["run"]
    R, rep = comm.Get_size(), comm.Get_rank()
    theta = net.init_params(o["seed"])
    opt = make_optimizer(o, net.num_params)
    step0 = 0
    if resume is not None:
        theta[:] = resume["params"]
        for k, v in resume["state"].items():
            if k in opt.state:
                opt.state[k][:] = v
        step0 = int(resume["counters"].get("step", 0))
    batches = Batches(cfg["data"]["path"], o["batch_size"], o["seed"], rep, R,
                      cfg["data"]["cache_mb"])
    lead = rep == 0
    run = RunDir(out, cfg, append=resume is not None) if lead else None
    evaluate = Evaluator(net, cfg["data"]["path"]) if lead else None
    say = Progress(enabled=lead and not quiet)
    gsum = np.empty_like(theta)
    t0 = time.time()
    last_eval = last_ckpt = t0
    step, stop, t_comm = step0, "max_steps", 0.0
    flag = np.zeros(1, dtype=np.int32)
    while step < r["max_steps"]:
        x, y = batches.next()
        loss, g = net.loss_and_grad(theta, x, y)
        t = time.perf_counter()
        comm.Allreduce(g, gsum, op=MPI.SUM)
        t_comm += time.perf_counter() - t
        gsum /= R
        opt.step(theta, gsum)
        step += 1
        if lead:
            if step % r["log_every"] == 0 or step == 1:
                run.log("train", replica=0, step=step, loss=loss)
            now = time.time()
            if not flag[0] and now - last_eval >= r["eval_every_s"]:
                ev = evaluate(theta)
                run.log("eval", updates=step, test_loss=ev["loss"], test_accuracy=ev["accuracy"])
                last_eval = time.time()
                say(f"step {step}  test accuracy {ev['accuracy']:.4f}  {now - t0:.1f} s")
                if r["target_accuracy"] and ev["accuracy"] >= r["target_accuracy"]:
                    flag[0] = 1
            if not flag[0] and now - t0 >= r["max_time_s"]:
                flag[0] = 2
            if now - last_ckpt >= r["checkpoint_every_s"]:
                save_checkpoint(run.checkpoint, theta, opt.state, {"step": step}, cfg)
                last_ckpt = time.time()
        if step % 10 == 0:
            comm.Bcast(flag, root=0)   # everyone stops at the same step (flag is sticky)
            if flag[0]:
                stop = "target_accuracy" if flag[0] == 1 else "max_time_s"
                break
    wall = time.time() - t0
    if not lead:
        return None
    ev = evaluate(theta)
    run.log("eval", updates=step, test_loss=ev["loss"], test_accuracy=ev["accuracy"])
    save_checkpoint(run.checkpoint, theta, opt.state, {"step": step}, cfg)
    summary = {"algorithm": "sync", "ranks": topo.ctrl.Get_size(), "stop_reason": stop,
               "steps": step, "wall_time_s": wall,
               "samples_per_s": (step - step0) * o["batch_size"] * R / wall if wall else 0.0,
               "allreduce_s": t_comm, "final_test_loss": ev["loss"],
               "final_test_accuracy": ev["accuracy"], "num_params": net.num_params,
               "pushes_sent": 0, "pushes_applied": 0}
    run.write_summary(summary)
    run.close()
    return summary
