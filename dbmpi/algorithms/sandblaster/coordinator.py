"""Sandblaster's coordinator: runs L-BFGS on the shards' vectors by commands and scalars,
hands out the work portions of each batch gradient, and runs the run loop."""

from __future__ import annotations

import json
import time

import numpy as np

from ... import tags
from ...mpiwait import Backoff, recv
from ...rundir import save_checkpoint
from ..common import Evaluator, Progress
from ..loop import DONE, RunLoop
from .lbfgs import Gram, wolfe_line_search
from .portions import PortionScheduler

__all__ = ["Coordinator"]


class _Shards:
    """The coordinator's handle on the shards: every command goes to all, scalars come back."""

    def __init__(self, topo):
        self.topo = topo
        self.backoff = Backoff(lo=2e-5, hi=5e-4)

    def __call__(self, cmd, *args):
        ctrl = self.topo.ctrl
        for rank in self.topo.shard_ranks:
            ctrl.send((cmd, args), dest=rank, tag=tags.CMD)
        out = []
        for rank in self.topo.shard_ranks:
            self.backoff.busy()
            out.append(recv(ctrl, rank, tags.REPLY, self.backoff))
        return out


class Coordinator:
    """World rank 0: L-BFGS on the shards' vectors.  Each iteration is one step of the run
    loop: a direction from the Gram matrix, a line search whose every trial point's batch
    gradient the replicas compute on work portions, and the new pair."""

    def __init__(self, topo, cfg, net, ps, run, quiet, resume=None):
        import h5py
        self.topo, self.cfg, self.net, self.run, self.resume = topo, cfg, net, run, resume
        self.client, self.ranges, self.layout, self.pairs = ps.client, ps.ranges, ps.layout, ps.pairs
        self.shards = _Shards(topo)
        self.evaluate_test = Evaluator(net, cfg.data.path)
        self.say = Progress(enabled=not quiet)
        with h5py.File(cfg.data.path, "r") as f:
            n = len(f["train"]["y"])
        o = cfg.optimizer
        self.n_portions = -(-n // o.portion_size)
        self.rng = np.random.default_rng(o.seed)
        self.batch = self.evals = self.copies = self.pushes_applied = 0
        self.batch_times: list[float] = []
        self.theta = self.client.theta      # fetches land here (MPI memory)
        self.portions = self._portions()
        # the L-BFGS state: objective, iterations, history [(slot, rho)], oldest first,
        # scale, and the Gram matrix of the basis
        self.f, self.it, self.hist, self.gamma = np.nan, 0, [], 1.0
        self.gram = Gram(o.lbfgs_history)
        self.loop = RunLoop(cfg.run)

    def _portions(self):
        frac = self.cfg.optimizer.batch_fraction
        if frac >= 1.0:
            return range(self.n_portions)
        k = max(1, int(round(frac * self.n_portions)))
        return sorted(self.rng.choice(self.n_portions, k, replace=False).tolist())

    def batch_gradient(self, t):
        """f and f'.d at x + t d: the shards set the trial point, the replicas compute the
        batch gradient on portions, the shards collect it."""
        from mpi4py import MPI
        t0 = time.perf_counter()
        self.shards("set_eval", t)
        self.batch += 1
        b, ctrl, R = self.batch, self.topo.ctrl, self.topo.replicas
        o = self.cfg.optimizer
        sched = PortionScheduler(self.portions, R, o.balance, o.backups)
        for reps in self.topo.replica_ranks:
            ctrl.send(("batch", b), dest=reps[0], tag=tags.WORK)
        accepted, pushed = [0] * R, [0] * R
        loss, count = 0.0, 0
        st, backoff = MPI.Status(), Backoff(lo=2e-5, hi=5e-4)
        while not (sched.complete and accepted == pushed):
            if not ctrl.Iprobe(source=MPI.ANY_SOURCE, tag=tags.WORK, status=st):
                backoff.idle()
                continue
            backoff.busy()
            m = ctrl.recv(source=st.Get_source(), tag=tags.WORK)
            if m[1] != b:
                continue                       # a straggler's result from an earlier batch
            kind, r = m[0], m[2]
            pushed[r] = m[3]
            if kind == "flushed":
                continue
            ok = None
            if kind == "result":
                ok = sched.result(r, m[4])
                if ok:
                    accepted[r] += 1
                    loss += m[5]
                    count += m[6]
            nxt = sched.next_for(r)
            dest = self.topo.replica_ranks[r][0]
            if nxt is None:
                ctrl.send(("idle", b, ok), dest=dest, tag=tags.WORK)
            else:
                ctrl.send(("work", b, ok, nxt[0], nxt[2]), dest=dest, tag=tags.WORK)
        self.copies += sched.copies
        c = self.shards("collect", count, self.net.l2)
        self.evals += 1
        self.batch_times.append(time.perf_counter() - t0)
        if not all(x["finite"] for x in c):
            return np.inf, np.inf
        f = loss / count + 0.5 * self.net.l2 * sum(x["xx"] for x in c)
        return f, sum(x["gd"] for x in c)

    def save(self, f, it, hist, gamma):
        """Checkpoint at an iteration boundary: every vector, and the coordinator's state."""
        counts = self.shards("counts")
        self.pushes_applied = sum(s["applied"] for s in counts)
        params = self.gather_vector("x").astype(np.float32)
        # every L-BFGS vector, each gathered as it is written (save_checkpoint calls these)
        state = {f"lbfgs_{k}": (lambda k=k: self.gather_vector(k)) for k in counts[0]["vectors"]}
        save_checkpoint(self.run.checkpoint, params, state, {
            "iterations": it, "evaluations": self.evals, "batch": self.batch, "objective": f,
            "gamma": gamma, "history": json.dumps(hist),
            "gram": json.dumps(self.gram.G.tolist()),
            "rng": json.dumps(self.rng.bit_generator.state)}, self.cfg)
        return params

    def _restore(self):
        """Put the checkpoint's vectors back on the shards; return (f, it, hist, gamma)."""
        c = self.resume["counters"]
        ctrl, names = self.topo.ctrl, self.shards("counts")[0]["vectors"]
        for k, v in self.resume["state"].items():     # one shard's slice at a time
            if not (k.startswith("lbfgs_") and k[len("lbfgs_"):] in names):
                continue
            for (lo, hi), rank in zip(self.ranges, self.topo.shard_ranks):
                ctrl.send(("recv_vector", (k[len("lbfgs_"):],)), dest=rank, tag=tags.CMD)
                ctrl.Send(self.layout.take(v, lo, hi).astype(np.float64, copy=False),
                          dest=rank, tag=tags.DATA)
                ctrl.recv(source=rank, tag=tags.REPLY)
        self.shards("publish")
        self.evals, self.batch = int(c["evaluations"]), int(c["batch"])
        self.rng.bit_generator.state = json.loads(c["rng"])
        hist = [tuple(h) for h in json.loads(c["history"])]
        m = self.cfg.optimizer.lbfgs_history
        if "gram" in c:                  # exactly the dots the uninterrupted run goes on with
            gram = Gram(m, json.loads(c["gram"]))
        else:                            # a checkpoint from before the Gram matrix was kept
            gram = Gram(m)
            names = [f"{v}{i}" for v in "sy" for i in range(m)] + ["g"]
            gram.update(names, self.shards("gram", names))
        return float(c["objective"]), int(c["iterations"]), hist, float(c["gamma"]), gram

    def start(self) -> None:
        """The first point: the checkpoint's, or x0 with f and g evaluated there."""
        if self.resume is not None:
            self.f, self.it, self.hist, self.gamma, self.gram = self._restore()
            return
        # f and g at x0: evaluate at t = 0 (d is zero), then take it as the current point
        self.shards("direction", [0.0] * len(self.gram.G))       # d = 0
        self.f, _ = self.batch_gradient(0.0)
        self.shards("copy", "gt", "g")
        self.gram.update(["g"], self.shards("gram", ["g"]))
        self.run.log("train", replica=0, step=0, loss=self.f)

    def iterate(self) -> int:
        """One L-BFGS iteration (the run loop's step): a direction, a line search along it,
        the new pair.  Returns the step's bits."""
        o, gram, sh, loop = self.cfg.optimizer, self.gram, self.shards, self.loop
        f = self.f
        gg = gram.G[gram.g, gram.g]
        if gg ** 0.5 <= 1e-7 * max(1.0, abs(f)):
            return loop.done("converged")
        coef, gd = gram.direction(self.hist, self.gamma)
        if gd >= 0:                        # not a descent direction: restart
            self.hist = []
            coef, gd = np.zeros(len(gram.G)), -gg
            coef[gram.g] = -1.0
        sh("direction", coef.tolist())
        t0 = 1.0 if self.hist else min(1.0, 1.0 / max(gg ** 0.5, 1e-12))
        if o.batch_fraction < 1.0:
            self.portions = self._portions()   # a new mini-batch for this iteration
        t, fn, _, ok = wolfe_line_search(self.batch_gradient, f, gd, t0,
                                         max_evals=o.max_line_search)
        if t == 0.0:
            return loop.done("line_search_failed")
        self._accept()
        rel = abs(f - fn) / max(abs(f), abs(fn), 1e-12)
        self.f = fn
        self.it += 1
        self.run.log("train", replica=0, step=self.it, loss=fn)
        self.run.log("lbfgs", iteration=self.it, objective=fn, step=t, wolfe=ok,
                     evaluations=self.evals)
        if rel < 1e-12:
            return loop.done("converged")
        return DONE if self.it >= self.cfg.run.max_steps else 0

    def _accept(self) -> None:
        """The line search's point becomes the current one; its pair enters the history
        (in the oldest slot once it is full) where it keeps H positive definite."""
        gram, m = self.gram, self.cfg.optimizer.lbfgs_history
        free = sorted(set(range(m)) - {sl for sl, _ in self.hist})
        slot = free[0] if free else self.hist.pop(0)[0]
        gram.update([f"s{slot}", f"y{slot}", "g"], self.shards("accept", slot))
        sy, yy = gram.G[gram.s(slot), gram.y(slot)], gram.G[gram.y(slot), gram.y(slot)]
        if sy > 1e-12 * yy and sy > 0:
            self.hist.append((slot, 1.0 / sy))
            self.gamma = sy / yy

    def train(self) -> dict:
        """The run: the run loop over iterations, the last checkpoint and evaluation, the
        replicas and shards told to stop; returns the summary."""
        loop = self.loop
        loop.start()                 # the first point's evaluation counts in the run's time
        self.start()
        stop = "max_steps"
        if self.it < self.cfg.run.max_steps:
            stop = loop.run(self.iterate, self._eval,
                            lambda: self.save(self.f, self.it, self.hist, self.gamma))
        wall = loop.elapsed()
        params = self.save(self.f, self.it, self.hist, self.gamma)
        ev = self.evaluate_test(params)
        self.run.log("eval", updates=self.it, test_loss=ev["loss"],
                     test_accuracy=ev["accuracy"])
        topo = self.topo
        for reps in topo.replica_ranks:
            topo.ctrl.send(("stop",), dest=reps[0], tag=tags.WORK)
        reps = [topo.ctrl.recv(source=reps[0], tag=tags.REPLY) for reps in topo.replica_ranks]
        for rank in topo.shard_ranks:
            topo.ctrl.send(("finish", ()), dest=rank, tag=tags.CMD)
        return self.summary(stop, wall, ev, reps)

    def summary(self, stop, wall, ev, reps) -> dict:
        bt = np.array(self.batch_times)
        return {
            "algorithm": "sandblaster", "ranks": self.topo.ctrl.Get_size(),
            "stop_reason": stop, "iterations": self.it, "evaluations": self.evals,
            "final_objective": self.f, "wall_time_s": wall,
            "samples_per_s": sum(x["portions"] for x in reps)
            * self.cfg.optimizer.portion_size / wall if wall else 0.0,
            "batch_time_mean_s": float(bt.mean()) if len(bt) else 0.0,
            "batch_time_median_s": float(np.median(bt)) if len(bt) else 0.0,
            "portions_per_batch": len(self.portions), "backup_copies": self.copies,
            "final_test_loss": ev["loss"], "final_test_accuracy": ev["accuracy"],
            "num_params": self.net.num_params,
            "pushes_sent": sum(x["pushes_sent"] for x in reps),
            "pushes_applied": self.pushes_applied,
            "ps_pairs": self.pairs,
            "replicas": reps,
        }

    def gather_vector(self, name):
        """Vector ``name`` of the shards (float64), in the canonical layout: each shard's
        slice goes straight into place, one slice in memory at a time besides the result."""
        ctrl = self.topo.ctrl
        for rank in self.topo.shard_ranks:
            ctrl.send(("send_vector", (name,)), dest=rank, tag=tags.CMD)
        out = np.empty(self.net.num_params)
        for (lo, hi), rank in zip(self.ranges, self.topo.shard_ranks):
            part = np.empty(hi - lo)
            ctrl.Recv(part, source=rank, tag=tags.DATA)
            self.layout.scatter(part, lo, out)
        return out

    def _eval(self):
        self.client.fetch(self.theta)       # after accept, the published point is x
        ev = self.evaluate_test(self.layout.to_canonical(self.theta))
        self.run.log("eval", updates=self.evals, test_loss=ev["loss"],
                     test_accuracy=ev["accuracy"])
        self.say(f"{self.loop.elapsed():6.1f} s  iteration {self.it}  objective {self.f:.6g}  "
                 f"test accuracy {ev['accuracy']:.4f}")
        return ev
