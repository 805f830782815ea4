"""Sandblaster L-BFGS: the coordinator runs L-BFGS whose vectors live on the shards.

- Shards hold, each for its own range, every L-BFGS vector in float64: ``x`` (parameters),
  ``g`` (gradient), ``d`` (direction), ``xe``/``gt`` (the line search's trial point and its
  gradient) and the history pairs ``s0..``, ``y0..``.  The coordinator sends commands (form
  the direction from coefficients, set the trial point, collect the batch gradient, accept
  a step) and receives only scalars; it runs the two-loop recursion on the Gram matrix of
  the pairs and the gradient (:class:`_Gram`), which each accepted step updates.
- The batch gradient at a trial point is computed by the replicas on work portions of
  ``portion_size`` samples handed out by the coordinator (:class:`PortionScheduler`):
  sequential portions to the same replica, faster replicas get more, idle replicas get
  backup copies of outstanding portions near the end, and the first result of a portion
  wins.  The shards Put each trial point into the replicas' landing windows (RMA) before
  the coordinator starts the batch; replicas push the gradient sums of their accepted
  portions (into their inbox slot, by RMA: see :mod:`dbmpi.server`) before a last-round
  portion, when they run out of work, and every ``push_every`` portions (1: each portion
  alone, so
  the shards' float64 sums, and a resumed run's trajectory, do not depend on timing) or,
  with 0, before any portion they expect to take longer than the push (running means of
  both): a fast transport then pushes every portion and a slow one (TCP) a few times a
  batch, and the batch never waits on held sums much longer than a push takes.
"""

from __future__ import annotations

import json
import time

import numpy as np

from .. import aligned
from ..config import check_model
from ..rundir import RunDir, save_checkpoint
from .. import tags
from ..mpiwait import Backoff, recv, until
from ..server import PSSetup, ShardServer
from ..server.rma import overlaps, settle
from .common import Evaluator, Progress
from .loop import DONE, RunLoop

__all__ = ["PortionScheduler", "run_sandblaster", "wolfe_line_search"]



# -- work portions ---------------------------------------------------------------------------

class PortionScheduler:
    """Hands out the portions of one batch to replicas; the first result of a portion wins.

    ``balance``: a replica that finishes its own contiguous chunk takes portions from the end
    of the largest remaining chunk (else it stops at its chunk).  ``backups``: once nothing is
    unassigned, an idle replica gets a copy of an outstanding portion it does not hold.
    """

    def __init__(self, portions, replicas: int, balance: bool = True, backups: bool = True):
        portions = list(portions)
        self.n = len(portions)
        self.chunks = [portions[self.n * r // replicas:self.n * (r + 1) // replicas]
                       for r in range(replicas)]
        self.balance, self.backups = balance, backups
        self.holders: dict[int, set] = {}     # outstanding portion -> replicas computing it
        self.assigned_at: dict[int, float] = {}
        self.done: set = set()
        self.copies = 0

    @property
    def complete(self) -> bool:
        return len(self.done) == self.n

    def _unassigned(self) -> int:
        return sum(len(c) for c in self.chunks)

    def next_for(self, r: int):
        """``(portion, is_backup, last_round)`` for replica r, or None when it has no work."""
        if self.chunks[r]:
            p = self.chunks[r].pop(0)
        elif self.balance and self._unassigned():
            victim = max(range(len(self.chunks)), key=lambda i: len(self.chunks[i]))
            p = self.chunks[victim].pop()
        else:
            cands = [p for p, h in self.holders.items() if r not in h and p not in self.done]
            if not (self.backups and cands) or (not self.balance and self._unassigned()):
                return None
            p = min(cands, key=lambda p: (len(self.holders[p]), self.assigned_at[p]))
            self.holders[p].add(r)
            self.copies += 1
            return p, True, True
        self.holders[p] = {r}
        self.assigned_at[p] = time.perf_counter()
        last = not (self.chunks[r] if not self.balance else self._unassigned())
        return p, False, last

    def result(self, r: int, p: int) -> bool:
        """Record replica r's result for portion p; True if it is the first (it counts)."""
        h = self.holders.get(p)
        if h is not None:
            h.discard(r)
        if p in self.done:
            return False
        self.done.add(p)
        self.holders.pop(p, None)
        return True


# -- shard -----------------------------------------------------------------------------------

class SandblasterShard(ShardServer):
    """A shard's slice of every L-BFGS vector, and the commands that operate on them."""

    def __init__(self, params_win, inbox_win, rank, lo, hi, slot_ranges, history, init,
                 bell, landing, outbox, readers):
        super().__init__(params_win, inbox_win, rank, lo, hi, slot_ranges, None, init,
                         bell=bell, landing=landing, outbox=outbox)
        # (rank, offset here, offset there, length): every replica partition's part of my
        # range, which set_eval Puts into its landing window
        self.readers = readers
        n = hi - lo
        self.v = {k: np.zeros(n) for k in ("x", "g", "d", "xe", "gt")}
        self.v["x"][:] = init
        for i in range(history):
            self.v[f"s{i}"] = np.zeros(n)
            self.v[f"y{i}"] = np.zeros(n)
        self.acc = np.zeros(n)
        # the L-BFGS basis, in the order of the coordinator's Gram matrix (see _Gram)
        self.basis = ([f"s{i}" for i in range(history)] + [f"y{i}" for i in range(history)]
                      + ["g"])

    def rows(self, names):
        """My part of the Gram matrix's rows for ``names``: their dot products with every
        basis vector (summed over the shards by the coordinator)."""
        return [[float(self.v[a] @ self.v[b]) for b in self.basis] for a in names]

    def _apply(self, grad, fetched, off=0, update=False):
        self.acc[off:off + len(grad)] += grad
        self.applied += 1

    def publish(self) -> None:
        """Put the trial point into every replica's landing window, complete there before
        the coordinator hears back (and only then starts the batch): no replica has to ask
        for it, which over a network is a round trip to a shard that must be awake."""
        from mpi4py import MPI
        win = self.landing.win
        settle([win.Rput(self.params[off:off + n], rank, target=(4 * there, n, MPI.FLOAT))
                for rank, off, there, n in self.readers])
        for rank in {r[0] for r in self.readers}:
            win.Flush(rank)

    def command(self, cmd, args):
        v = self.v
        if cmd == "direction":                    # d = sum of coefficient x basis vector
            d = v["d"]
            d[:] = 0
            for c, name in zip(args[0], self.basis):
                if c:
                    d += c * v[name]
        elif cmd == "gram":                       # the rows of the vectors named
            return self.rows(args[0])
        elif cmd == "copy":
            v[args[1]][:] = v[args[0]]
        elif cmd == "set_eval":                   # xe = x + t d, published to the replicas
            np.add(v["x"], args[0] * v["d"], out=v["xe"])
            with self.seq.writing():
                self.params[:] = v["xe"]
            self.acc[:] = 0
            self.publish()
        elif cmd == "collect":                    # gt = (sum of pushed grads) / n + l2 xe
            n, l2 = args
            while self.poll():
                pass
            np.multiply(self.acc, 1.0 / n, out=v["gt"])
            v["gt"] += l2 * v["xe"]
            return {"xx": float(v["xe"] @ v["xe"]), "gd": float(v["gt"] @ v["d"]),
                    "gg": float(v["gt"] @ v["gt"]),
                    "finite": bool(np.isfinite(v["gt"]).all())}
        elif cmd == "accept":                     # s_i = xe - x, y_i = gt - g; x = xe, g = gt
            i = args[0]
            np.subtract(v["xe"], v["x"], out=v[f"s{i}"])
            np.subtract(v["gt"], v["g"], out=v[f"y{i}"])
            v["x"][:] = v["xe"]
            v["g"][:] = v["gt"]
            return self.rows([f"s{i}", f"y{i}", "g"])     # what changed in the Gram matrix
        elif cmd == "counts":
            return {"vectors": list(v), "applied": self.applied, "rejected": self.rejected}
        elif cmd == "publish":                    # after restoring: x is the point to serve
            with self.seq.writing():
                self.params[:] = v["x"]
        else:
            raise ValueError(f"unknown shard command {cmd!r}")
        return None


def _make_shard(topo, cfg, net, ps):
    """The shard's vectors and window memory, initialised before the start barrier."""
    s = topo.index
    lo, hi = ps.ranges[s]
    init = ps.layout.init_range(net, cfg["optimizer"]["seed"], lo, hi)    # my range alone
    # each replica partition's part of my range: (its rank, offset here, offset there, n)
    readers = [(rank, off, there, n) for reps in topo.replica_ranks
               for part, rank in enumerate(reps)
               for _, off, there, n in overlaps([(lo, hi)], *ps.layout.ranges[part])]
    return SandblasterShard(ps.pw[s], ps.iw[s], topo.shard_ranks[s], lo, hi,
                            ps.slot_ranges[s], cfg["optimizer"]["lbfgs_history"],
                            init.astype(np.float64), ps.bell if ps.rung[s] else None,
                            ps.landing, ps.outbox, readers)


def _serve_shard(topo, shard):
    from mpi4py import MPI
    ctrl, st, backoff = topo.ctrl, MPI.Status(), shard.backoff(lo=5e-5, hi=1e-3)
    while True:
        busy = shard.serve()
        if ctrl.Iprobe(source=0, tag=tags.CMD, status=st):
            cmd, args = ctrl.recv(source=0, tag=tags.CMD)
            if cmd == "finish":
                return
            if cmd == "send_vector":      # raw, no reply: see _Coordinator.gather_vector
                ctrl.Send(shard.v[args[0]], dest=0, tag=tags.DATA)
                continue
            if cmd == "recv_vector":      # raw, then the usual reply (restore)
                ctrl.Recv(shard.v[args[0]], source=0, tag=tags.DATA)
            ctrl.send(None if cmd == "recv_vector" else shard.command(cmd, args), dest=0,
                      tag=tags.REPLY)
            backoff.busy()
        else:
            shard.pause(busy, backoff)


# -- replica ---------------------------------------------------------------------------------



def _run_replica(topo, cfg, client):
    """One partition of one replica.  Partition 0 receives the coordinator's messages and
    relays them to the other partitions, which all compute each portion together (with
    P > 1 the network is split across them) and each push their own slice."""
    from ..data import open_split
    from ..model.partition import PartitionedNetwork
    from ..mpiwait import wait
    o = cfg["optimizer"]
    spec = dict(check_model(cfg["model"]), l2=0.0)   # the l2 term is added at the shards
    P, lead = topo.partitions, topo.partition == 0
    net = PartitionedNetwork(spec, topo.model)
    size = net.local_size
    split = open_split(cfg["data"]["path"], "train", cache_mb=cfg["data"]["cache_mb"],
                       share=topo.model)   # one cache per node (Split)
    ps = o["portion_size"]
    slow = cfg["faults"]["slow_factor"] if cfg["faults"]["slow_replica"] == topo.index else 1.0
    theta = client.theta                    # the shards Put each trial point here
    # the held sums; in my outbox where shards take pushes from there (attended): no copy
    acc = client.outbox if client.outbox is not None else aligned.zeros(size)
    acc[:] = 0
    ctrl, rep = topo.ctrl, topo.index
    batch, accepted, pushed, pending = -1, 0, 0, None
    stats = {"portions": 0, "compute_s": 0.0, "push_s": 0.0}

    # the lead's running means of a portion's compute and of a push (its own clock decides
    # for every partition of the replica, so they all push together)
    mean = {"portion": 0.0, "push": 0.0}

    def next_message():
        """(the coordinator's message, None) on the lead; (message, the lead's decision to
        push first) relayed to the other partitions."""
        backoff = Backoff(lo=5e-5, hi=2e-3)
        if lead:
            return recv(ctrl, 0, tags.WORK, backoff), None
        return recv(topo.model, 0, tags.RELAY, backoff)

    def relay(msg, push=None):
        for q in range(1, P):
            topo.model.send((msg, push), dest=q, tag=tags.RELAY)

    def push_first(last) -> bool:
        """Push the held sums before this portion?  Before a last-round portion; then every
        ``push_every`` portions, or, with 0, whenever the portion is expected to take
        longer than the push, so the batch never waits on held sums longer than a push."""
        held = accepted - pushed
        if o["push_every"]:
            return held > 0 and (last or held >= o["push_every"])
        return held > 0 and (last or mean["portion"] >= mean["push"])

    def running(key, dt):
        mean[key] = dt if mean[key] == 0.0 else 0.75 * mean[key] + 0.25 * dt

    def push_all():
        nonlocal pushed
        if accepted == pushed:
            return
        t = time.perf_counter()
        until(lambda: client.push(acc), Backoff(lo=5e-5, hi=1e-3))   # my slot may be full
        client.wait_applied()            # before the coordinator collects the sums
        acc[:] = 0
        pushed = accepted
        if P > 1:
            wait([topo.model.Ibarrier()])   # every partition's slice is at the shards
        stats["push_s"] += time.perf_counter() - t
        running("push", time.perf_counter() - t)
        if lead:   # tell the coordinator at once: it may be waiting only for these sums
            ctrl.send(("flushed", batch, rep, pushed), dest=0, tag=tags.WORK)

    def verdict(ok):
        nonlocal accepted, pending
        if ok and pending is not None:
            acc.__iadd__(pending)
            accepted += 1
        pending = None

    while True:
        msg, push = next_message()
        kind = msg[0]
        if lead and kind != "work":
            relay(msg)
        if kind == "stop":
            mine = dict(stats, replica=rep, pushes_sent=client.pushes_sent)
            allp = topo.model.gather(mine, root=0)
            if lead:
                mine["pushes_sent"] = sum(m["pushes_sent"] for m in allp)
                ctrl.send(mine, dest=0, tag=tags.REPLY)
            return
        if kind == "batch":      # the shards have Put the trial point into theta
            batch, accepted, pushed, pending = msg[1], 0, 0, None
            acc[:] = 0
            if lead:
                ctrl.send(("ready", batch, rep, 0), dest=0, tag=tags.WORK)
            continue
        _, b, ok = msg[:3]
        if b != batch:
            if lead and kind == "work":
                relay(msg, False)
            continue
        verdict(ok)
        if kind == "idle":
            push_all()
            continue
        p, last = msg[3], msg[4]
        if lead:
            push = push_first(last)
            relay(msg, push)
        if push:
            push_all()
        t = time.perf_counter()
        idx = np.arange(p * ps, min((p + 1) * ps, len(split)))
        x, y = split.take(idx)
        loss, g = net.loss_and_grad(theta, x, y)
        g *= len(idx)                      # sums, not means: portions differ in size
        dt = time.perf_counter() - t
        if slow > 1:
            time.sleep((slow - 1) * dt)    # [faults] straggler for experiments
        stats["compute_s"] += dt
        running("portion", time.perf_counter() - t)     # the straggler's sleep included
        stats["portions"] += 1
        pending = g
        if lead:
            ctrl.send(("result", batch, rep, pushed, p, loss * len(idx), len(idx)), dest=0,
                      tag=tags.WORK)


# -- coordinator -----------------------------------------------------------------------------

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


class _Gram:
    """The dot products of the L-BFGS basis (s_0..s_{m-1}, y_0..y_{m-1}, g), summed over the
    shards: with it the coordinator runs the two-loop recursion on coefficients and the
    shards form the direction in one command ("vector-free" L-BFGS, Chen et al., NeurIPS
    2014), instead of a round trip to every shard for each of its 4m dots and axpys."""

    def __init__(self, m: int, matrix=None):
        self.m = m
        self.G = np.zeros((2 * m + 1, 2 * m + 1)) if matrix is None else np.array(matrix)

    def s(self, slot):
        return slot

    def y(self, slot):
        return self.m + slot

    @property
    def g(self):
        return 2 * self.m

    def update(self, names, parts) -> None:
        """Set the rows (and columns) of ``names`` from every shard's part of them."""
        rows = np.sum(np.array(parts, dtype=np.float64), axis=0)
        for name, row in zip(names, rows):
            i = self.g if name == "g" else (self.m if name[0] == "y" else 0) + int(name[1:])
            self.G[i, :] = row
            self.G[:, i] = row

    def direction(self, hist, gamma):
        """The coefficients of d = -H g on the basis (two-loop recursion, Nocedal & Wright
        Algorithm 7.4), and g.d."""
        G, delta, alphas = self.G, np.zeros(len(self.G)), []
        delta[self.g] = 1.0                          # q = g
        for slot, rho in reversed(hist):
            a = rho * float(delta @ G[:, self.s(slot)])
            delta[self.y(slot)] -= a
            alphas.append(a)
        delta *= gamma
        for (slot, rho), a in zip(hist, reversed(alphas)):
            b = rho * float(delta @ G[:, self.y(slot)])
            delta[self.s(slot)] += a - b
        c = -delta
        return c, float(c @ G[:, self.g])


def wolfe_line_search(phi, f0, g0, t, c1=1e-4, c2=0.9, max_evals=20):
    """Strong Wolfe line search (Nocedal & Wright, Algorithms 3.5 and 3.6).

    ``phi(t)`` returns ``(f(x + t d), f'(x + t d) . d)``.  Returns ``(t, f, gd, ok)`` where
    the last evaluated point is the returned one; ok is False when no step satisfying the
    conditions was found (then the best point seen is returned, re-evaluated).
    """
    evals = 0
    best = (np.inf, 0.0, 0.0)

    def ev(tt):
        nonlocal evals, best
        evals += 1
        f, gd = phi(tt)
        if f < best[0]:
            best = (f, tt, gd)
        return f, gd

    def zoom(lo, flo, glo, hi, fhi):
        while evals < max_evals:
            # safeguarded quadratic interpolation between lo and hi, else bisection
            d = hi - lo
            denom = 2 * (fhi - flo - glo * d)
            tt = lo - glo * d * d / denom if denom > 0 else lo + d / 2
            a, b = min(lo, hi), max(lo, hi)
            if not (a + 0.1 * (b - a) <= tt <= b - 0.1 * (b - a)):
                tt = (lo + hi) / 2
            f, gd = ev(tt)
            if f > f0 + c1 * tt * g0 or f >= flo:
                hi, fhi = tt, f
            else:
                if abs(gd) <= -c2 * g0:
                    return tt, f, gd, True
                if gd * (hi - lo) >= 0:
                    hi, fhi = lo, flo
                lo, flo, glo = tt, f, gd
        return None

    prev_t, prev_f, prev_g = 0.0, f0, g0
    while evals < max_evals:
        f, gd = ev(t)
        if not np.isfinite(f) or f > f0 + c1 * t * g0 or (evals > 1 and f >= prev_f):
            out = zoom(prev_t, prev_f, prev_g, t, f if np.isfinite(f) else np.inf)
            break
        if abs(gd) <= -c2 * g0:
            return t, f, gd, True
        if gd >= 0:
            out = zoom(t, f, gd, prev_t, prev_f)
            break
        prev_t, prev_f, prev_g = t, f, gd
        t *= 2
    else:
        out = None
    if out is not None:
        return out
    fb, tb, gb = best
    if fb < f0:
        f, gd = phi(tb)       # make the trial point the best one again
        return tb, f, gd, False
    return 0.0, f0, g0, False


class _Coordinator:
    def __init__(self, topo, cfg, net, client, run, quiet, resume=None):
        self.resume = resume
        self.topo, self.cfg, self.net, self.client, self.run = topo, cfg, net, client, run
        self.shards = _Shards(topo)
        self.evaluate_test = Evaluator(net, cfg["data"]["path"])
        self.say = Progress(enabled=not quiet)
        import h5py
        with h5py.File(cfg["data"]["path"], "r") as f:
            n = len(f["train"]["y"])
        ps = cfg["optimizer"]["portion_size"]
        self.n_portions = -(-n // ps)
        self.rng = np.random.default_rng(cfg["optimizer"]["seed"])
        self.batch = 0
        self.batch_times: list[float] = []
        self.evals = 0
        self.copies = 0
        self.theta = self.client.theta      # fetches land here (MPI memory)

    def _portions(self):
        frac = self.cfg["optimizer"]["batch_fraction"]
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
        o = self.cfg["optimizer"]
        sched = PortionScheduler(self.portions, R, o["balance"], o["backups"])
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
        m = self.cfg["optimizer"]["lbfgs_history"]
        if "gram" in c:                  # exactly the dots the uninterrupted run goes on with
            gram = _Gram(m, json.loads(c["gram"]))
        else:                            # a checkpoint from before the Gram matrix was kept
            gram = _Gram(m)
            names = [f"{v}{i}" for v in "sy" for i in range(m)] + ["g"]
            gram.update(names, self.shards("gram", names))
        return float(c["objective"]), int(c["iterations"]), hist, float(c["gamma"]), gram

    def loop(self):
        o, r = self.cfg["optimizer"], self.cfg["run"]
        m = o["lbfgs_history"]
        sh = self.shards
        self.portions = self._portions()
        gamma, it = 1.0, 0
        hist: list[tuple[int, float]] = []     # (slot, rho), oldest first
        gram = _Gram(m)
        if self.resume is not None:
            f, it, hist, gamma, gram = self._restore()
        else:
            # f and g at x0: evaluate at t = 0 (d is zero), then take it as the current point
            sh("direction", [0.0] * len(gram.G))       # d = 0
            f, _ = self.batch_gradient(0.0)
            sh("copy", "gt", "g")
            gram.update(["g"], sh("gram", ["g"]))
            self.run.log("train", replica=0, step=0, loss=f)
        self.gram = gram

        def step():
            """One L-BFGS iteration: a direction, a line search along it, the new pair."""
            nonlocal f, it, hist, gamma
            gg = gram.G[gram.g, gram.g]
            if gg ** 0.5 <= 1e-7 * max(1.0, abs(f)):
                return loop.done("converged")
            coef, gd = gram.direction(hist, gamma)
            if gd >= 0:                        # not a descent direction: restart
                hist = []
                coef, gd = np.zeros(len(gram.G)), -gg
                coef[gram.g] = -1.0
            sh("direction", coef.tolist())
            t0 = 1.0 if hist else min(1.0, 1.0 / max(gg ** 0.5, 1e-12))
            if o["batch_fraction"] < 1.0:
                self.portions = self._portions()   # a new mini-batch for this iteration
            t, fn, _, ok = wolfe_line_search(self.batch_gradient, f, gd, t0,
                                             max_evals=o["max_line_search"])
            if t == 0.0:
                return loop.done("line_search_failed")
            free = sorted(set(range(m)) - {sl for sl, _ in hist})
            slot = free[0] if free else hist.pop(0)[0]
            names = [f"s{slot}", f"y{slot}", "g"]
            gram.update(names, sh("accept", slot))
            sy, yy = gram.G[gram.s(slot), gram.y(slot)], gram.G[gram.y(slot), gram.y(slot)]
            if sy > 1e-12 * yy and sy > 0:
                hist.append((slot, 1.0 / sy))
                gamma = sy / yy
            rel = abs(f - fn) / max(abs(f), abs(fn), 1e-12)
            f = fn
            it += 1
            self.run.log("train", replica=0, step=it, loss=f)
            self.run.log("lbfgs", iteration=it, objective=f, step=t, wolfe=ok,
                         evaluations=self.evals)
            if rel < 1e-12:
                return loop.done("converged")
            return DONE if it >= r["max_steps"] else 0

        def evaluate():
            ev = self._eval()
            self.say(f"{loop.elapsed():6.1f} s  iteration {it}  objective {f:.6g}  "
                     f"test accuracy {ev['accuracy']:.4f}")
            return ev

        loop = RunLoop(r)
        stop = "max_steps"
        if it < r["max_steps"]:
            stop = loop.run(step, evaluate, lambda: self.save(f, it, hist, gamma))
        wall = loop.elapsed()
        params = self.save(f, it, hist, gamma)
        ev = self.evaluate_test(params)
        self.run.log("eval", updates=it, test_loss=ev["loss"], test_accuracy=ev["accuracy"])
        return params, f, it, stop, wall, ev

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
        return ev


def run_sandblaster(topo, cfg, net, out, resume=None, quiet=False):
    """Every rank calls this; each plays its role.  Returns the summary on the coordinator."""
    ps = PSSetup(topo, net, progress=cfg["cluster"]["ps_progress"])
    layout, ranges, client = ps.layout, ps.ranges, ps.client
    shard = _make_shard(topo, cfg, net, ps) if topo.role == "shard" else None
    ps.start(topo)                 # every shard's memory is initialised before anyone uses it
    summary = None
    if shard is not None:
        _serve_shard(topo, shard)
    else:
        if topo.role == "replica":
            _run_replica(topo, cfg, client)
        else:
            run = RunDir(out, cfg, append=resume is not None)
            try:
                co = _Coordinator(topo, cfg, net, client, run, quiet, resume)
                co.ranges, co.layout = ranges, layout
                params, f, it, stop, wall, ev = co.loop()
                for reps in topo.replica_ranks:
                    topo.ctrl.send(("stop",), dest=reps[0], tag=tags.WORK)
                reps = [topo.ctrl.recv(source=reps[0], tag=tags.REPLY)
                        for reps in topo.replica_ranks]
                for rank in topo.shard_ranks:
                    topo.ctrl.send(("finish", ()), dest=rank, tag=tags.CMD)
                bt = np.array(co.batch_times)
                summary = {
                    "algorithm": "sandblaster", "ranks": topo.ctrl.Get_size(),
                    "stop_reason": stop, "iterations": it, "evaluations": co.evals,
                    "final_objective": f, "wall_time_s": wall,
                    "samples_per_s": sum(x["portions"] for x in reps)
                    * cfg["optimizer"]["portion_size"] / wall if wall else 0.0,
                    "batch_time_mean_s": float(bt.mean()) if len(bt) else 0.0,
                    "batch_time_median_s": float(np.median(bt)) if len(bt) else 0.0,
                    "portions_per_batch": len(co.portions), "backup_copies": co.copies,
                    "final_test_loss": ev["loss"], "final_test_accuracy": ev["accuracy"],
                    "num_params": net.num_params,
                    "pushes_sent": sum(x["pushes_sent"] for x in reps),
                    "pushes_applied": co.pushes_applied,
                    "ps_pairs": ps.pairs,
                    "replicas": reps,
                }
                run.write_summary(summary)
            finally:
                run.close()
    ps.free()
    return summary
