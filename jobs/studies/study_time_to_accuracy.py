#!/usr/bin/env python
"""Usage: python jobs/studies/study_time_to_accuracy.py --out DIR [--quick] [--target A] [--max-cores N]

The DistBelief paper's Figure 5: time to reach a target test accuracy against the total
cores (ranks) used, for several configurations of each method: single-replica SGD, Downpour
SGD with Adagrad (1 shard, growing replicas), Sandblaster L-BFGS (1 shard, growing replicas)
and synchronous SGD (growing replicas), on the 8x8 digits.  Writes time_to_accuracy.csv,
time_to_accuracy.png and summary.txt into DIR.  --quick: target 96%, up to 5 ranks, 30 s
cap a run (about 2-3 minutes on 2 cores); without it, target 97% and configurations up to
--max-cores.
"""

import argparse
import math
from pathlib import Path

from dbmpi import study as S


def configs(max_cores):
    out = [("SGD", {"algorithm": "sgd", "learning_rate": 0.1}, {"replicas": 1})]
    for R in range(1, max_cores - 1):
        out.append(("Downpour + Adagrad", {"algorithm": "downpour", "learning_rate": 0.05,
                                           "adagrad": True}, {"replicas": R, "ps_shards": 1}))
    for R in range(1, max_cores - 1):
        out.append(("Sandblaster L-BFGS", {"algorithm": "sandblaster", "portion_size": 64},
                    {"replicas": R, "ps_shards": 1}))
    R = 1
    while R <= max_cores:
        out.append(("sync SGD", {"algorithm": "sync", "learning_rate": 0.1}, {"replicas": R}))
        R *= 2
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true", help="seconds, for tests")
    p.add_argument("--target", type=float, default=None)
    p.add_argument("--max-cores", type=int, default=None)
    p.add_argument("--cap-s", type=float, default=None, help="give up on a run after this")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = args.target or (0.9 if args.smoke else 0.96 if args.quick else 0.97)
    max_cores = args.max_cores or (3 if args.smoke else 5 if args.quick else 16)
    cap = args.cap_s or (5 if args.smoke else 30 if args.quick else 300)
    data = S.ensure_data("digits")
    rows = []
    for method, opt, cluster in configs(max_cores):
        text = S.config(data, S.DIGITS_MODEL, cluster=cluster,
                        optimizer=dict(batch_size=32, seed=0, **opt),
                        run={"max_steps": 10**7, "max_time_s": cap, "eval_every_s": 0.25,
                             "target_accuracy": target, "checkpoint_every_s": 1e6,
                             "log_every": 100})
        name = f"{method}-r{cluster['replicas']}".replace(" ", "_").replace("+", "p")
        s = S.train(text, out / "runs", name)
        hit = next((m["time"] for m in s["metrics"]
                    if m["kind"] == "eval" and m["test_accuracy"] >= target), math.nan)
        rows.append({"method": method, "replicas": cluster["replicas"], "cores": s["ranks"],
                     "time_to_target_s": round(hit, 3), "final_test_accuracy":
                     round(s["final_test_accuracy"], 4)})
        print(rows[-1], flush=True)
    S.write_csv(out / "time_to_accuracy.csv", rows)
    plt = S.plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        r = [x for x in rows if x["method"] == method and not math.isnan(x["time_to_target_s"])]
        ax.plot([x["cores"] for x in r], [x["time_to_target_s"] for x in r], "o-", label=method)
    ax.set_xlabel("total cores (MPI ranks: coordinator, shards, replicas)")
    ax.set_ylabel(f"time to {100 * target:g}% test accuracy (s)")
    ax.set_title("Time to accuracy against cores, 8x8 digits (paper Fig. 5)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "time_to_accuracy.png", dpi=110)
    lines = [S.header(f"study_time_to_accuracy: target {100 * target:g}%, cap {cap:g} s a run")]
    for x in rows:
        t = "not reached" if math.isnan(x["time_to_target_s"]) else f"{x['time_to_target_s']:.2f} s"
        lines.append(f"{x['method']:<22} replicas {x['replicas']:<2} cores {x['cores']:<3} {t}")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
