#!/usr/bin/env python
"""Usage: python jobs/bench/bench_partitions.py [--partitions 1,2,4] [--steps N] [--repeats R]

Model-parallel step throughput against P, all in one run: algorithm sgd (one replica) with
P partitions for (a) a locally connected image network on 64x64 inputs and (b) a
fully connected, speech-like network (4 sigmoid layers of 2560 units and a softmax) on
32x32 frames.  Each P runs R times, the P values interleaved so that drifting load on a
shared machine hits them alike; prints the best and the median samples/s, the speed-ups
over P = 1 from each, and for the best run of each P its time per training step, the part
of it each partition spent exchanging with the others (copies, transfers and waiting for
peers: load imbalance and jitter included) and the bytes each partition sends per step.
Each core's speed is measured at the start and at the end: partitions run at the pace of
the slowest core, so unequal cores (a busy neighbour on a shared VM) cap the speed-up.
P = 2 on 2 cores needs both; a disturbance on either stalls both partitions, which is why
the best is shown beside the median.  "steady" is the samples/s at a run's median step
(best run of each P): the pace between the disturbances, where those are brief.  Ranks
beyond the cores are oversubscribed.
--cores 2,5 pins partition r to the r-th CPU listed (P = 1 to the first) and measures those
cores; without it the launcher places the ranks.  On a VM two virtual CPUs can be the
hardware threads of one physical core (each then computes at 0.6-0.7x beside the other):
the "all these cores at once" line shows it; choose cores that stay near 1.0x there.
Launcher: MPIEXEC (default: the mpiexec beside this Python).
"""

import argparse
import os
import tempfile

from dbmpi import study as S

NETS = {"lc64": ("synth64", S.network("lc64")),   # the partitions study's networks
        "speech": ("synth32", S.network("speech_fc"))}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--partitions", default="1,2,4")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--nets", default="lc64,speech")
    S.add_cores_option(p)
    args = p.parse_args()
    parts = [int(x) for x in args.partitions.split(",")]
    pin = S.parse_cores(args.cores)
    print(f"sgd, batch {args.batch}, {args.steps} steps, best and median of {args.repeats} "
          f"runs each, {os.cpu_count()} cores here"
          + (f"; partitions pinned to cpu {args.cores}" if pin else ""))
    # the cores P partitions run on: those pinned to, else the first (where they are free)
    cores = sorted(set(pin[:max(parts)])) if pin else range(max(parts))
    print("at the start, " + S.core_speeds_line(S.core_speeds(cores)))
    if len(cores) > 1:     # the machine's own ceiling for P partitions on these cores
        print(S.pace_together_line(S.pace_together(cores)))
    for name in args.nets.split(","):
        dataset, model = NETS[name]
        data = S.ensure_data(dataset)
        with tempfile.TemporaryDirectory() as tmp:
            res, best, med = S.interleaved(
                lambda P, rep: S.sgd_run(data, model, P, args.steps, args.batch, tmp,
                                       f"r{P}-{rep}", cores=pin),
                parts, args.repeats)
        b0, m0 = best[parts[0]], med[parts[0]]
        # the steady pace: samples/s at the median step of a run, best run of each P
        steady = {P: max(args.batch * 1e3 / r["step_ms_quartiles"][1] for r in res[P])
                  for P in parts}
        print(f"\n{name} ({res[parts[0]][0]['num_params'] / 1e6:.2f}M parameters)")
        print(f"{'P':>3}{'best/s':>10}{'speed-up':>10}{'median/s':>10}{'speed-up':>10}"
              f"{'steady/s':>10}{'speed-up':>10}{'step ms':>9}   exchange ms per step, "
              f"bytes per step: by partition")
        for P in parts:
            s = S.best_run(res[P])       # the breakdown of the run the best figure is from
            exch = ", ".join(f"{e:.2f}" for e in s.get("partition_exchange_ms_per_step", [0]))
            print(f"{P:>3}{best[P]:>10.1f}{best[P] / b0:>9.2f}x{med[P]:>10.1f}"
                  f"{med[P] / m0:>9.2f}x{steady[P]:>10.1f}{steady[P] / steady[parts[0]]:>9.2f}x"
                  f"{S.step_ms(s):>9.2f}   [{exch}]  "
                  f"{[round(b) for b in s.get('partition_bytes_per_step', [0])]}")
    print("\nat the end, " + S.core_speeds_line(S.core_speeds(cores)))


if __name__ == "__main__":
    main()
