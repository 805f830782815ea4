#!/usr/bin/env python
"""Usage: python jobs/bench/bench_kernels.py [--quick] [--only lc,fc,pool,net]

Layer-kernel benchmark, one process, one BLAS thread.  Prints, per shape, GFLOP/s of our
forward, backward and forward+backward, the float32 GEMM ceiling measured in the same run
(numpy matmul), our fraction of it, our ratio to the numpy reference, and (when PyTorch is
installed) our ratio to a PyTorch unfold+einsum locally connected layer.  Also the fully
connected layer against numpy's three matmuls, pooling and LCN against the numpy reference,
and loss_and_grad of jobs/configs/digits_sgd.toml against the numpy reference path.
"""

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from dbmpi import aligned  # noqa: E402
from dbmpi import kernels as KO  # noqa: E402
from dbmpi.config import load  # noqa: E402
from dbmpi.model import build  # noqa: E402
from dbmpi.model import ops_reference as RO  # noqa: E402
from dbmpi.model.reference import out_size  # noqa: E402

LC_SHAPES = [(3, 32, 16, 5, 1), (16, 32, 32, 5, 1), (3, 64, 16, 7, 2), (16, 64, 32, 5, 2)]
FC_SHAPES = [(2560, 2560), (784, 1024)]


def best(fn, min_time=0.4, min_reps=3):
    """Fastest of repeated calls (seconds): the least disturbed by other load."""
    fn()
    times, t_end = [], time.perf_counter() + min_time
    while len(times) < min_reps or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def best_of(*fns, min_time=0.8, min_reps=5, turn=0.03):
    """Fastest call of each function (seconds), the functions taking turns so that drifting
    load on a shared machine hits all of them alike: ratios between them hold in any
    moment.  A turn calls its function once untimed, then times calls for ``turn`` seconds
    (at least one): the other functions in between evict its data from the caches, and a
    single warm call after a 1024^3 GEMM still ran 15% slower than a repeated one."""
    times, t_end = [[] for _ in fns], time.perf_counter() + min_time
    while len(times[0]) < min_reps or time.perf_counter() < t_end:
        for fn, ts in zip(fns, times):
            fn()
            t_turn = time.perf_counter() + turn
            while True:
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
                if t + ts[-1] >= t_turn:
                    break
    return [min(ts) for ts in times]


def _gemm_1024():
    """The ceiling's product (numpy matmul 1024^3 float32) and its flop count."""
    n = 1024
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b, c = a.copy(), np.empty_like(a)
    return (lambda: np.matmul(a, b, out=c)), 2.0 * n**3


def gemm_ceiling(quick):
    gemm, flops = _gemm_1024()
    return flops / best(gemm, 0.3 if quick else 1.0) / 1e9


def torch_lc(c, size, f, k, s, n):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    ho = out_size(size, k, s)
    x = torch.randn(n, c, size, size)
    w = (torch.randn(ho * ho, c * k * k, f) * 0.1).requires_grad_()
    b = torch.zeros(ho * ho, f, requires_grad=True)
    x.requires_grad_()
    dy = torch.randn(n, ho * ho, f)

    def step():
        p = torch.nn.functional.unfold(x, k, stride=s)           # (n, c*k*k, L)
        y = torch.relu(torch.einsum("ncl,lcf->nlf", p, w) + b)
        y.backward(dy)
    return best(step)


def bench_lc(args):
    print(f"\nLocally connected, batch {args.batch}, relu, no padding.  ceil: the GEMM ceiling "
          "(numpy matmul 1024^3), its calls alternated with the shape's forward and backward")
    hdr = ("shape (c, in -> f, k, s)", "fwd GF/s", "bwd GF/s", "f+b GF/s", "ceil", "f+b/ceil",
           "fwd/ceil", "x numpy ref", "x torch")
    print("{:<26}{:>9}{:>9}{:>9}{:>7}{:>9}{:>9}{:>12}{:>9}".format(*hdr))
    gemm, gemm_flops = _gemm_1024()
    rng = np.random.default_rng(0)
    rows = []
    for c, size, f, k, s in LC_SHAPES:    # arrays placed as training places them (dbmpi.aligned)
        n = args.batch
        ho = out_size(size, k, s)
        x = aligned.copy(rng.standard_normal((n, size, size, c)).astype(np.float32))
        w = aligned.copy((rng.standard_normal((ho, ho, k * k * c, f)) * 0.1).astype(np.float32))
        b = aligned.zeros((ho, ho, f))
        dw, db = aligned.empty_like(w), aligned.empty_like(b)
        y = KO.lc_forward(x, w, b, k, s, 0, "relu")
        dy = aligned.copy(rng.standard_normal(y.shape).astype(np.float32))
        flops = 2.0 * n * ho * ho * k * k * c * f
        tf, tb, tg = best_of(lambda: KO.lc_forward(x, w, b, k, s, 0, "relu"),
                             lambda: KO.lc_backward(x, w, y, dy, k, s, 0, "relu", dw, db, True),
                             gemm, min_time=0.5 if args.quick else 1.5)
        tfb, ceiling = tf + tb, gemm_flops / tg / 1e9

        def ref():
            yr = RO.lc_forward(x, w, b, k, s, 0, "relu")
            RO.lc_backward(x, w, yr, dy, k, s, 0, "relu", dw, db, True)
        tr = best(ref, 0.2, 2)
        tt = torch_lc(c, size, f, k, s, n)
        fb = 3 * flops / tfb / 1e9
        row = (f"({c}, {size} -> {f}, {k}, {s})", flops / tf / 1e9, 2 * flops / tb / 1e9, fb,
               ceiling, fb / ceiling, flops / tf / 1e9 / ceiling, tr / tfb,
               f"{tt / tfb:.1f}x" if tt else "n/a")
        rows.append(row)
        print("{:<26}{:>9.1f}{:>9.1f}{:>9.1f}{:>7.1f}{:>9.0%}{:>9.0%}{:>11.1f}x{:>9}".format(*row))
    return rows


def bench_fc(args):
    print(f"\nFully connected, batch {args.fc_batch}, sigmoid: ours (bias and activation "
          "fused) against numpy's three matmuls")
    print("{:<16}{:>12}{:>14}{:>10}".format("shape (in, out)", "ours GF/s", "numpy GF/s", "ratio"))
    rng = np.random.default_rng(1)
    for d, u in FC_SHAPES:
        n = args.fc_batch
        x = aligned.copy(rng.standard_normal((n, d)).astype(np.float32))
        w = aligned.copy((rng.standard_normal((u, d)) * 0.05).astype(np.float32))
        b = aligned.zeros(u)
        dw, db = aligned.empty_like(w), aligned.empty_like(b)
        dy = aligned.copy(rng.standard_normal((n, u)).astype(np.float32))

        def ours():
            y = KO.fc_forward(x, w, b, "sigmoid")
            KO.fc_backward(x, w, y, dy, "sigmoid", dw, db, True)

        def numpy3():
            x @ w.T
            dy.T @ x
            dy @ w
        flops = 6.0 * n * d * u
        to, tn = best_of(ours, numpy3)
        print("{:<16}{:>12.1f}{:>14.1f}{:>9.2f}x".format(f"({d}, {u})", flops / to / 1e9,
                                                         flops / tn / 1e9, tn / to))


def bench_pool_lcn(args):
    """Pooling and local contrast normalization, forward+backward, against the reference."""
    n, h, c = args.batch, 30, 16
    print(f"\nPooling and LCN, forward+backward, batch {n}, {h}x{h}x{c}: ours against the "
          "numpy reference")
    print("{:<22}{:>10}{:>12}{:>9}".format("layer", "ours ms", "numpy ms", "ratio"))
    x = np.random.default_rng(2).random((n, h, h, c), dtype=np.float32)

    def pool(ops, kind):
        y, aux = ops.pool_forward(x, 2, 2, kind)
        ops.pool_backward(x, y, aux, 2, 2, kind)

    def lcn(ops):
        y, aux = ops.lcn_forward(x, 5, 1e-2)
        ops.lcn_backward(y, aux, 5)
    for name, fn in (("max_pool 2", lambda o: pool(o, "max")), ("l2_pool 2", lambda o: pool(o, "l2")),
                     ("lcn 5", lcn)):
        to, tr = best(lambda: fn(KO), 0.2), best(lambda: fn(RO), 0.2)
        print("{:<22}{:>10.3f}{:>12.3f}{:>8.1f}x".format(name, to * 1e3, tr * 1e3, tr / to))


def bench_network():
    root = Path(__file__).resolve().parents[2]
    cfg = load(root / "jobs" / "configs" / "digits_sgd.toml")
    nk, nr = build(cfg.model, "kernels"), build(cfg.model, "reference")
    theta = nk.init_params(0)
    rng = np.random.default_rng(0)
    x = rng.random((cfg.optimizer.batch_size, *nk.input_shape), dtype=np.float32)
    y = rng.integers(0, 10, len(x))
    tk = best(lambda: nk.loss_and_grad(theta, x, y))
    tr = best(lambda: nr.loss_and_grad(theta, x, y))
    print(f"\njobs/configs/digits_sgd.toml loss_and_grad, batch {len(x)}: kernels {tk * 1e3:.3f} ms, "
          f"numpy reference {tr * 1e3:.3f} ms: {tr / tk:.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--fc-batch", type=int, default=128)
    p.add_argument("--only", default="lc,fc,pool,net",
                   help="which tables, comma-separated: lc (locally connected), fc, pool "
                        "(pooling and LCN), net")
    args = p.parse_args()
    only = set(args.only.split(","))
    if unknown := only - {"lc", "fc", "pool", "net"}:
        p.error(f"--only: unknown table(s) {sorted(unknown)}; choose from lc, fc, pool, net")
    if "lc" in only:
        print(f"GEMM ceiling at the start: {gemm_ceiling(args.quick):.1f} GFLOP/s")
        bench_lc(args)
    if "fc" in only:
        bench_fc(args)
    if "pool" in only:
        bench_pool_lcn(args)
    if "net" in only:
        bench_network()
    if "lc" in only:
        print(f"\nGEMM ceiling re-measured at the end: {gemm_ceiling(args.quick):.1f} GFLOP/s")


if __name__ == "__main__":
    main()
