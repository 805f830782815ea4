#!/usr/bin/env python
"""Usage: python jobs/bench/bench_downpour.py [--steps N] [--optimizers sgd,adagrad]

Downpour benchmark, all runs in one invocation: a replica's step time with and without the
parameter server (n_fetch = n_push = 1, every parameter fetched and pushed every step), and
the samples/s of 1 and 2 replicas, for each update rule: plain SGD (replicas apply their
pushes to the shards themselves with MPI Accumulate where the transport carries RMA without
the shard, else through the inbox) and Adagrad (pushes go to the shard's inbox and the shard
applies them with its accumulators).  First, the physical limit on the same transport
(jobs/bench/raw_rma.py): raw steps (the model's matrix products, then a raw MPI Get and Put of
the model's bytes) by 1 and 2 replicas at once, whose ratio is the ceiling of the 2/1
replicas ratio on this machine; the Get and the Put in those steps, as a step issues them,
are the baselines of the ratios fetch/Get and push/Put.  A Get and a Put back to back
(faster: warm caches, a busy link) are printed beside them.
DBMPI_TRANSPORT=tcp runs it all with every message over TCP.  The model is fully connected,
5.25M parameters (1024 -> 2560 -> 1024 -> 10), batch 128, on synthetic 32x32 digits.  The
coordinator and the shard ranks share the cores with the replicas (on this 2-core machine:
3 and 4 ranks).  Launcher: MPIEXEC (default: the mpiexec beside this Python).
"""

import argparse
import tempfile
from pathlib import Path

from dbmpi import study as S

LAYERS = (1024, 2560, 1024, 10)    # MODEL's fully connected widths, input first
MODEL = S.network("fc_bench")


def config(data, algo, replicas, shards, steps, batch, adagrad):
    return S.config(data, MODEL, cluster={"ps_shards": shards, "replicas": replicas,
                                          "partitions": 1},
                    optimizer={"algorithm": algo, "learning_rate": 0.01, "adagrad": adagrad,
                               "batch_size": batch, "n_fetch": 1, "n_push": 1},
                    run={"max_steps": steps, "max_time_s": 600, "eval_every_s": 1000,
                         "checkpoint_every_s": 1000, "log_every": 10})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--data", default=None,
                   help=f"HDF5 of 32x32 images (default: data/synth32-{S.STUDY_COUNT}.h5, made "
                        "if missing)")
    p.add_argument("--optimizers", default="sgd,adagrad")
    p.add_argument("--raw-steps", type=int, default=30,
                   help="steps of each raw run that measures the 2/1 replicas ceiling")
    args = p.parse_args()
    args.data = args.data or str(S.ensure_data("synth32"))
    print(f"batch {args.batch}, {args.steps} steps per replica, n_fetch = n_push = 1; "
          f"DBMPI_TRANSPORT={S.ENV.get('DBMPI_TRANSPORT', '') or '(default)'}")
    n = num_params()
    for opt in args.optimizers.split(","):
        raw = raw_transfers(n)    # just before the runs it is compared with: the load drifts
        print(f"\nraw MPI on this transport, {raw['floats'] * 4 / 1e6:.1f} MB: Put "
              f"{raw['put_ms']:.2f} ms, Get {raw['get_ms']:.2f} ms (median of {raw['repeats']})")
        raw["ceiling"] = [raw_transfers(n, R, args.batch, args.raw_steps) for R in (1, 2)]
        print("raw steps (the step's products, then Get and Put), 1 and 2 replicas at once: "
              + ", ".join(f"{c['steps_per_s']:.2f} steps/s (step "
                          f"{'/'.join(f'{t:.0f}' for t in c['step_ms'])} ms)"
                          for c in raw["ceiling"]))
        one = raw["ceiling"][0]
        print(f"raw MPI in a step (once a step, after its products; mean of "
              f"{one['repeats'] - 1}): Put {one['put_ms']:.2f} ms, Get {one['get_ms']:.2f} ms")
        ada = opt == "adagrad"
        with tempfile.TemporaryDirectory() as tmp:
            runs = {name: S.train(config(args.data, algo, reps, 1, args.steps, args.batch,
                                         ada), Path(tmp), name)
                    for name, algo, reps in [("alone", "sgd", 1), ("one", "downpour", 1),
                                             ("two", "downpour", 2)]}
        report(opt, runs, args.steps, raw)


def num_params() -> int:
    from dbmpi.config import load
    from dbmpi.model import build
    return build(load(S.NETWORKS / "fc_bench.toml").model).num_params


def raw_transfers(floats: int, replicas: int = 0, batch: int = 0, steps: int = 0) -> dict:
    """jobs/bench/raw_rma.py: median raw Put and Get of ``floats`` float32 (3 ranks), or, given
    ``replicas``, the raw steps per second of that many replicas (their products, Get and
    Put, ``steps`` times; 2 + replicas ranks)."""
    import json
    import subprocess
    cmd = S.mpiexec() + ["-n", str(2 + max(replicas, 1)), S.PY,
                         str(Path(__file__).parent / "raw_rma.py"), str(floats)]
    if replicas:
        cmd += [str(steps), "--layers", ",".join(map(str, LAYERS)), "--batch", str(batch)]
    r = subprocess.run(cmd, env=S.ENV, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"raw_rma.py failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def report(opt, runs, steps, raw):
    alone, one, two = runs["alone"], runs["one"], runs["two"]
    step_alone = alone["wall_time_s"] / alone["steps"]
    r1 = one["replicas"][0]
    print(f"{opt} ({two['config']['pushes']} pushes), model "
          f"{alone['num_params'] / 1e6:.2f}M parameters")
    print(f"step without parameter server (sgd, 1 rank):     {step_alone * 1e3:8.1f} ms")
    print(f"step with parameter server (1 replica, 1 shard):  {r1['step_s'] * 1e3:8.1f} ms "
          f"(fetch {r1['fetch_s'] / steps * 1e3:.1f} ms, push "
          f"{r1['push_s'] / steps * 1e3:.1f} ms per step)")
    fetch, push = r1['fetch_s'] / steps, r1['push_s'] / steps
    # the raw transfers as a step issues them (after its products: caches cold, the link
    # idle since the last step), and back to back (the optimistic bound)
    get, put = raw["ceiling"][0]['get_ms'] / 1e3, raw["ceiling"][0]['put_ms'] / 1e3
    get_b2b, put_b2b = raw['get_ms'] / 1e3, raw['put_ms'] / 1e3
    print(f"  ratio with/without:                             {r1['step_s'] / step_alone:8.3f}x")
    print(f"  fetch / raw Get in a step:                      {fetch / get:8.3f}x "
          f"(back to back: {fetch / get_b2b:.3f}x)")
    print(f"  push / raw Put in a step:                       {push / put:8.3f}x "
          f"(back to back: {push / put_b2b:.3f}x)")
    print(f"  step with / (step without + raw Get + raw Put): "
          f"{r1['step_s'] / (step_alone + get + put):8.3f}x "
          f"(back to back: {r1['step_s'] / (step_alone + get_b2b + put_b2b):.3f}x)")
    print(f"samples/s, 1 replica (3 ranks):                   {one['samples_per_s']:8.1f}")
    print(f"samples/s, 2 replicas (4 ranks):                  {two['samples_per_s']:8.1f}")
    ceiling = raw["ceiling"][1]["steps_per_s"] / raw["ceiling"][0]["steps_per_s"]
    print(f"  ratio 2/1 replicas:                             "
          f"{two['samples_per_s'] / one['samples_per_s']:8.3f}x")
    print(f"  ratio 2/1 of the raw steps (the ceiling):       {ceiling:8.3f}x")
    for rep in two["replicas"]:
        print(f"  2 replicas: replica {rep['replica']} step {rep['step_s'] * 1e3:.1f} ms "
              f"(fetch {rep['fetch_s'] / rep['steps'] * 1e3:.1f} ms, push "
              f"{rep['push_s'] / rep['steps'] * 1e3:.1f} ms, compute "
              f"{rep['compute_s'] / rep['steps'] * 1e3:.1f} ms)")
    print(f"pushes sent/applied (2 replicas): {two['pushes_sent']}/{two['pushes_applied']}, "
          f"mean staleness {two['staleness_mean']:.2f}, shard CPU "
          f"{two['shards'][0]['cpu_fraction']:.0%} of a core; attended client-shard pairs "
          f"{two['config']['attended_pairs']}")


if __name__ == "__main__":
    main()
