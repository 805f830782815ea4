"""Sandblaster's shards: each holds its range of every L-BFGS vector (float64) and runs the
coordinator's commands on them."""

from __future__ import annotations

import numpy as np

from ... import tags
from ...server import ShardServer
from ...server.rma import overlaps, settle

__all__ = ["SandblasterShard", "make_shard", "serve_shard"]


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
        # the L-BFGS basis, in the order of the coordinator's Gram matrix (see lbfgs.Gram)
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


def make_shard(topo, cfg, net, ps):
    """The shard's vectors and window memory, initialised before the start barrier."""
    s = topo.index
    lo, hi = ps.ranges[s]
    init = ps.layout.init_range(net, cfg.optimizer.seed, lo, hi)    # my range alone
    # each replica partition's part of my range: (its rank, offset here, offset there, n)
    readers = [(rank, off, there, n) for reps in topo.replica_ranks
               for part, rank in enumerate(reps)
               for _, off, there, n in overlaps([(lo, hi)], *ps.layout.ranges[part])]
    return SandblasterShard(ps.pw[s], ps.iw[s], topo.shard_ranks[s], lo, hi,
                            ps.slot_ranges[s], cfg.optimizer.lbfgs_history,
                            init.astype(np.float64), ps.bell if ps.rung[s] else None,
                            ps.landing, ps.outbox, readers)


def serve_shard(topo, shard):
    from mpi4py import MPI
    ctrl, st, backoff = topo.ctrl, MPI.Status(), shard.backoff(lo=5e-5, hi=1e-3)
    while True:
        busy = shard.serve()
        if ctrl.Iprobe(source=0, tag=tags.CMD, status=st):
            cmd, args = ctrl.recv(source=0, tag=tags.CMD)
            if cmd == "finish":
                return
            if cmd == "send_vector":      # raw, no reply: see Coordinator.gather_vector
                ctrl.Send(shard.v[args[0]], dest=0, tag=tags.DATA)
                continue
            if cmd == "recv_vector":      # raw, then the usual reply (restore)
                ctrl.Recv(shard.v[args[0]], source=0, tag=tags.DATA)
            ctrl.send(None if cmd == "recv_vector" else shard.command(cmd, args), dest=0,
                      tag=tags.REPLY)
            backoff.busy()
        else:
            shard.pause(busy, backoff)
