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
from .common import Batches, Progress
from .loop import DONE, RunLoop, agree_by

__all__ = ["run_sgd"]


def _check_loss(loss, step, o) -> None:
    if not np.isfinite(loss):
        raise FloatingPointError(
            f"training diverged at step {step} (loss {loss}); try a smaller "
            f"optimizer.learning_rate than {o['learning_rate']}")


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


def run_sgd(topo, cfg, net, out, resume=None, quiet=False) -> dict | None:
    """Train on every partition of the replica (``topo=None``: this process alone).
    Returns the summary on partition 0 (also written to summary.json), None elsewhere."""
    from ..data import open_split
    from ..model.partition import PartitionedNetwork
    comm = topo.model if topo is not None else None
    o, r = cfg["optimizer"], cfg["run"]
    model = PartitionedNetwork(cfg["model"], comm)
    lead = model.p == 0
    share = comm                # the partitions on a node share one cache of the data
    theta = model.init_local(o["seed"])
    opt = make_optimizer(o, model.local_size)
    c = resume["counters"] if resume is not None else {}
    if resume is not None:
        theta[:] = model.local(resume["params"])
        for k, v in resume["state"].items():
            if k in opt.state:
                opt.state[k][:] = model.local(v)
    step0 = int(c.get("step", 0))
    batches = Batches(cfg["data"]["path"], o["batch_size"], o["seed"],
                      cache_mb=cfg["data"]["cache_mb"],
                      position=(int(c.get("epoch", 0)), int(c.get("offset", 0))), share=share)
    test = open_split(cfg["data"]["path"], "test", share=share)
    tx, ty = test.all()
    test.close()
    run = RunDir(out, cfg, append=resume is not None) if lead else None
    say = Progress(enabled=lead and not quiet)
    train_step = trainer(model, opt, theta)
    at = {"step": step0, "loss": float("nan"), "compute_s": 0.0, "sent": 0, "exch": 0.0}

    def step():
        x, y = batches.next()
        b0, e0, tc = model.bytes_sent, model.exchange_seconds, time.perf_counter()
        loss = train_step(x, y)
        at["compute_s"] += time.perf_counter() - tc
        at["sent"] += model.bytes_sent - b0
        at["exch"] += model.exchange_seconds - e0
        _check_loss(loss, at["step"], o)   # every partition has the same loss: all stop
        at["step"] += 1
        at["loss"] = loss
        if lead and (at["step"] % r["log_every"] == 0 or at["step"] == 1):
            run.log("train", replica=0, step=at["step"], loss=loss)
        return DONE if at["step"] >= r["max_steps"] else 0

    def evaluate():
        ev = model.evaluate(theta, tx, ty)
        if not lead:
            return None
        run.log("eval", updates=at["step"], test_loss=ev["loss"], test_accuracy=ev["accuracy"])
        say(f"step {at['step']}/{r['max_steps']}  loss {at['loss']:.4f}  test accuracy "
            f"{ev['accuracy']:.4f}  {loop.elapsed():.1f} s")
        return ev

    def checkpoint():
        params = model.gather_canonical(theta)
        state = {k: model.gather_canonical(v) for k, v in opt.state.items()}
        if lead:
            save_checkpoint(run.checkpoint, params, state,
                            {"step": at["step"], "epoch": batches.epoch,
                             "offset": batches.offset}, cfg)

    loop = RunLoop(r, lead, agree_by(comm))
    # the clock starts when every partition is ready: setup times differ by rank, and the
    # first exchange would count the slowest one's setup as training time
    if model.P > 1:
        wait([comm.Ibarrier()])
    loop.start()
    stop = loop.run(step, evaluate, checkpoint) if step0 < r["max_steps"] else "max_steps"
    wall = loop.elapsed()
    ev = model.evaluate(theta, tx, ty)
    checkpoint()
    sent, exch = [at["sent"]], [at["exch"]]
    if model.P > 1:
        sent, exch = comm.gather(at["sent"], root=0), comm.gather(at["exch"], root=0)
    if not lead:
        return None
    run.log("eval", updates=at["step"], test_loss=ev["loss"], test_accuracy=ev["accuracy"])
    steps = at["step"] - step0
    summary = {
        "algorithm": "sgd", "ranks": model.P, "partitions": model.P,
        "stop_reason": stop, "steps": at["step"], "wall_time_s": wall,
        "samples_per_s": steps * o["batch_size"] / wall if wall > 0 else 0.0,
        "final_train_loss": at["loss"], "final_test_loss": ev["loss"],
        "final_test_accuracy": ev["accuracy"], "num_params": model.num_params,
        "partition_bytes_per_step": [b / max(steps, 1) for b in sent],
        "compute_s": at["compute_s"], "step_ms_quartiles": loop.step_quartiles(),
        "partition_exchange_ms_per_step": [1e3 * e / max(steps, 1) for e in exch],
        "pushes_sent": 0, "pushes_applied": 0,
    }
    run.write_summary(summary)
    run.close()
    say(f"done: {at['step']} steps in {wall:.1f} s, test accuracy {ev['accuracy']:.4f} "
        f"({stop})", force=True)
    return summary
