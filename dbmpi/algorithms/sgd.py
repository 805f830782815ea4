"""Algorithm ``sgd``: one replica, mini-batch SGD (or Adagrad) in a single process."""

from __future__ import annotations

import time

import numpy as np

from .. import aligned
from ..optim import SGD, make_optimizer
from ..rundir import save_checkpoint
from .common import (CHECKPOINT, EVAL, STOP, Batches, Evaluator, Progress,
                     lead_decision, stop_for_time)

__all__ = ["train_sgd", "run_sgd"]


def _check_loss(loss, step, o) -> None:
    if not np.isfinite(loss):
        raise FloatingPointError(
            f"training diverged at step {step} (loss {loss}); try a smaller "
            f"optimizer.learning_rate than {o['learning_rate']}")


def _step_quartiles(step_s) -> list[float]:
    """Quartiles (ms) of the training steps' times: the median is the steady pace, which an
    evaluation, a checkpoint or a busy neighbour now and then does not move (samples_per_s
    is the whole run's)."""
    if not step_s:
        return []
    return [round(1e3 * float(v), 4) for v in np.percentile(step_s, [25, 50, 75])]


def _trainer(net, opt, theta):
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


def train_sgd(cfg: dict, net, run, resume: dict | None = None, progress: bool = True) -> dict:
    """Train ``net`` on ``cfg`` in this process, writing into the RunDir ``run``.

    Returns the summary dict (also written to summary.json).
    """
    o, r = cfg["optimizer"], cfg["run"]
    theta = net.init_params(o["seed"])
    opt = make_optimizer(o, net.num_params)
    step0, position = 0, (0, 0)
    if resume is not None:
        theta[:] = resume["params"][...]
        for k, v in resume["state"].items():
            if k in opt.state:
                opt.state[k][:] = v
        step0 = int(resume["counters"].get("step", 0))
        position = (int(resume["counters"].get("epoch", 0)),
                    int(resume["counters"].get("offset", 0)))
    batches = Batches(cfg["data"]["path"], o["batch_size"], o["seed"],
                      cache_mb=cfg["data"]["cache_mb"], position=position)
    evaluate = Evaluator(net, cfg["data"]["path"])
    say = Progress(enabled=progress)
    t_start = time.time()
    last_eval = last_ckpt = t_start
    step, ev, loss = step0, None, float("nan")
    compute_s = 0.0

    def checkpoint():
        save_checkpoint(run.checkpoint, theta, opt.state,
                        {"step": step, "epoch": batches.epoch, "offset": batches.offset},
                        cfg)

    def do_eval():
        e = evaluate(theta)
        run.log("eval", updates=step, test_loss=e["loss"], test_accuracy=e["accuracy"])
        return e

    stop = "max_steps"
    train_step = _trainer(net, opt, theta)
    step_s = []      # each step's time: data, update and bookkeeping (not evaluations)
    while step < r["max_steps"]:
        t0 = time.perf_counter()
        x, y = batches.next()
        tc = time.perf_counter()
        loss = train_step(x, y)
        _check_loss(loss, step, o)   # a diverged step is never checkpointed: the run stops
        compute_s += time.perf_counter() - tc
        step_s.append(time.perf_counter() - t0)
        step += 1
        if step % r["log_every"] == 0 or step == 1:
            run.log("train", replica=0, step=step, loss=loss)
        now = time.time()
        if now - last_eval >= r["eval_every_s"]:
            ev, last_eval = do_eval(), time.time()
            say(f"step {step}/{r['max_steps']}  loss {loss:.4f}  test accuracy "
                f"{ev['accuracy']:.4f}  {now - t_start:.1f} s")
            if r["target_accuracy"] and ev["accuracy"] >= r["target_accuracy"]:
                stop = "target_accuracy"
                break
        if why := stop_for_time(t_start, r, now):
            stop = why
            break
        if now - last_ckpt >= r["checkpoint_every_s"]:
            checkpoint()
            last_ckpt = time.time()
    wall = time.time() - t_start
    ev = do_eval()
    checkpoint()
    steps = step - step0
    summary = {
        "algorithm": "sgd", "ranks": cfg["cluster"]["partitions"], "stop_reason": stop,
        "steps": step, "wall_time_s": wall,
        "samples_per_s": steps * o["batch_size"] / wall if wall > 0 else 0.0,
        "compute_s": compute_s, "step_ms_quartiles": _step_quartiles(step_s),
        "final_train_loss": loss,
        "final_test_loss": ev["loss"], "final_test_accuracy": ev["accuracy"],
        "num_params": net.num_params, "pushes_sent": 0, "pushes_applied": 0,
    }
    run.write_summary(summary)
    say(f"done: {step} steps in {wall:.1f} s, test accuracy {ev['accuracy']:.4f} "
        f"({stop})", force=True)
    return summary


def run_sgd(topo, cfg, net, out, resume=None, quiet=False) -> dict | None:
    """Algorithm ``sgd`` with one replica of P > 1 partitions (model parallelism).

    Every partition reads the same batches (the order never depends on P), computes its
    units and updates its own slice of the parameters; partition 0 logs, decides when to
    evaluate and stop (broadcast each step), and writes the run directory.
    """
    from ..data import open_split
    from ..model.partition import PartitionedNetwork
    from ..mpiwait import wait
    from ..rundir import RunDir
    comm = topo.model
    lead = comm.Get_rank() == 0
    o, r = cfg["optimizer"], cfg["run"]
    pn = PartitionedNetwork(cfg["model"], comm)
    theta = pn.init_local(o["seed"])
    opt = make_optimizer(o, pn.local_size)
    step0, position = 0, (0, 0)
    if resume is not None:
        theta[:] = pn.local(resume["params"])
        for k, v in resume["state"].items():
            if k in opt.state:
                opt.state[k][:] = pn.local(v)
        step0 = int(resume["counters"].get("step", 0))
        position = (int(resume["counters"].get("epoch", 0)),
                    int(resume["counters"].get("offset", 0)))
    # the partitions on a node share one cache of the data (they all read every sample)
    batches = Batches(cfg["data"]["path"], o["batch_size"], o["seed"],
                      cache_mb=cfg["data"]["cache_mb"], position=position, share=comm)
    test = open_split(cfg["data"]["path"], "test", share=comm)
    tx, ty = test.all()
    test.close()
    run = RunDir(out, cfg, append=resume is not None) if lead else None
    say = Progress(enabled=lead and not quiet)
    flag = np.zeros(1, dtype=np.int32)          # bits: EVAL, STOP, CHECKPOINT (common.py)
    # the clock starts when every partition is ready: setup times differ by rank, and the
    # first exchange would count the slowest one's setup as training time
    wait([comm.Ibarrier()])
    t_start = time.time()
    last_eval = last_ckpt = t_start
    step, stop, loss = step0, "max_steps", float("nan")

    def checkpoint():
        params = pn.gather_canonical(theta)
        state = {k: pn.gather_canonical(v) for k, v in opt.state.items()}
        if lead:
            save_checkpoint(run.checkpoint, params, state,
                            {"step": step, "epoch": batches.epoch, "offset": batches.offset}, cfg)

    train_step = _trainer(pn, opt, theta)
    # the training steps' time, traffic and exchange time (evaluations' are not counted)
    compute_s = sent = exch = 0.0
    step_s = []      # each step's time, the decision broadcast included (not evaluations)
    while step < r["max_steps"]:
        t0 = time.perf_counter()
        x, y = batches.next()
        b0, e0, tc = pn.bytes_sent, pn.exchange_seconds, time.perf_counter()
        loss = train_step(x, y)
        compute_s += time.perf_counter() - tc
        sent += pn.bytes_sent - b0
        exch += pn.exchange_seconds - e0
        _check_loss(loss, step, o)   # every partition has the same loss, so all stop
        step += 1
        if lead:   # one broadcast a step carries partition 0's decisions
            if step % r["log_every"] == 0 or step == 1:
                run.log("train", replica=0, step=step, loss=loss)
            flag[0], why = lead_decision(r, t_start, last_eval, last_ckpt)
            stop = why or stop
        wait([comm.Ibcast(flag, root=0)])
        step_s.append(time.perf_counter() - t0)
        if flag[0] & EVAL:
            ev = pn.evaluate(theta, tx, ty)
            last_eval = time.time()
            if lead:
                run.log("eval", updates=step, test_loss=ev["loss"], test_accuracy=ev["accuracy"])
                say(f"step {step}/{r['max_steps']}  loss {loss:.4f}  test accuracy "
                    f"{ev['accuracy']:.4f}")
            if r["target_accuracy"] and ev["accuracy"] >= r["target_accuracy"]:
                stop = "target_accuracy"
                break
        if flag[0] & STOP:
            break
        if flag[0] & CHECKPOINT:
            checkpoint()
            last_ckpt = time.time()
    wall = time.time() - t_start
    ev = pn.evaluate(theta, tx, ty)
    checkpoint()
    sent, exch = comm.gather(sent, root=0), comm.gather(exch, root=0)
    if not lead:
        return None
    run.log("eval", updates=step, test_loss=ev["loss"], test_accuracy=ev["accuracy"])
    steps = step - step0
    summary = {
        "algorithm": "sgd", "ranks": comm.Get_size(), "partitions": comm.Get_size(),
        "stop_reason": stop, "steps": step, "wall_time_s": wall,
        "samples_per_s": steps * o["batch_size"] / wall if wall > 0 else 0.0,
        "final_train_loss": loss, "final_test_loss": ev["loss"],
        "final_test_accuracy": ev["accuracy"], "num_params": pn.num_params,
        "partition_bytes_per_step": [b / max(steps, 1) for b in sent],
        "compute_s": compute_s, "step_ms_quartiles": _step_quartiles(step_s),
        "partition_exchange_ms_per_step": [1e3 * e / max(steps, 1) for e in exch],
        "pushes_sent": 0, "pushes_applied": 0,
    }
    run.write_summary(summary)
    run.close()
    return summary
