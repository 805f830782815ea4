#!/usr/bin/env python
"""Usage: python jobs/studies/study_partitions.py --out DIR [--quick] [--partitions 1,2,4,8] [--repeats R]

The DistBelief paper's Figure 3: training speed-up against the number of partitions of one
model replica, for a locally connected image network (64x64 inputs) and a fully connected,
speech-like network (4 sigmoid layers of 2560 units and a softmax).  Algorithm sgd with P
partitions; speed-up = samples/s over the same network's P = 1 in the same run.  Writes
partitions.csv, partitions.png and summary.txt into DIR.  Each P runs --repeats times, the P
values interleaved; the figure uses the best samples/s of each (a disturbance on a shared
machine stalls all partitions at once), the summary adds the median.  --quick: P = 1, 2, 4
and few steps (about 5 minutes on 2 cores); on a cluster give --partitions up to the cores
of the allocation and set MPIEXEC.  --cores 2,5,...: partition r pinned to the r-th CPU
listed (see jobs/bench/bench_partitions.py).
"""

import argparse
from pathlib import Path

from dbmpi import study as S

NETS = {
    "locally connected, 64x64 images": ("synth64", S.network("lc64")),
    "fully connected, speech-like": ("synth32", S.network("speech_fc")),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true", help="seconds, for tests")
    p.add_argument("--partitions", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None,
                   help="runs of each P, interleaved; the best and the median are reported "
                        "(default 3; 1 with --smoke)")
    S.add_cores_option(p)
    args = p.parse_args()
    pin = S.parse_cores(args.cores)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = [int(x) for x in (args.partitions or ("1,2" if args.smoke else "1,2,4" if args.quick
                                                  else "1,2,4,8,16")).split(",")]
    steps = args.steps or (3 if args.smoke else 30 if args.quick else 100)
    repeats = args.repeats or (1 if args.smoke else 3)
    rows = []
    for net, (data, model) in NETS.items():
        if args.smoke:   # a small stand-in of the same shape of network
            model = model.replace("units = 2560", "units = 64").replace("channels = 32", "channels = 8")
        path = S.ensure_data(data)
        runs, best, med = S.interleaved(
            lambda P, rep: S.sgd_run(path, model, P, steps, 32, out / "runs", f"{data}-p{P}-{rep}",
                                   cores=pin),
            parts, repeats)
        for P in parts:
            bst = S.best_run(runs[P])
            bps = bst.get("partition_bytes_per_step", [0])
            ems = bst.get("partition_exchange_ms_per_step", [0.0])
            rows.append({"network": net, "partitions": P, "num_params": runs[P][0]["num_params"],
                         "samples_per_s": round(best[P], 2),
                         "speedup": round(best[P] / best[parts[0]], 3),
                         "median_samples_per_s": round(med[P], 2),
                         "median_speedup": round(med[P] / med[parts[0]], 3),
                         "repeats": repeats,
                         "bytes_per_step_per_partition": round(sum(bps) / len(bps)),
                         "step_ms": round(S.step_ms(bst), 3),
                         "exchange_ms_per_step": round(sum(ems) / len(ems), 3)})
            print(rows[-1], flush=True)
    S.write_csv(out / "partitions.csv", rows)
    plt = S.plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for net in NETS:
        r = [x for x in rows if x["network"] == net]
        ax.plot([x["partitions"] for x in r], [x["speedup"] for x in r], "o-", label=net)
    ax.plot(parts, parts, "k:", label="ideal")
    ax.set_xscale("log", base=2)
    ax.set_xticks(parts, [str(x) for x in parts])
    ax.set_xlabel("partitions per model replica (one core each)")
    ax.set_ylabel("training speed-up over 1 partition (samples/s ratio)")
    ax.set_title("Model parallelism (paper Fig. 3)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "partitions.png", dpi=110)
    lines = [S.header(f"study_partitions: speed-up against partitions (sgd, batch 32, {steps} "
                      f"steps; best and median of {repeats} runs"
                      + (f"; partitions pinned to cpu {args.cores})" if pin else ")"))]
    for x in rows:
        lines.append(f"{x['network']:<34} P={x['partitions']:<3} {x['samples_per_s']:>8.1f} "
                     f"samples/s {x['speedup']:.2f}x  median {x['median_samples_per_s']:>8.1f} "
                     f"{x['median_speedup']:.2f}x  {x['bytes_per_step_per_partition']} B/step  "
                     f"step {x['step_ms']:.2f} ms, exchanging {x['exchange_ms_per_step']:.2f} ms")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
