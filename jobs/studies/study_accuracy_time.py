#!/usr/bin/env python
"""Usage: python jobs/studies/study_accuracy_time.py --out DIR [--quick] [--replicas R] [--shards S]

The DistBelief paper's Figure 4: test accuracy against wall time for single-replica SGD,
Downpour SGD, Downpour SGD with Adagrad, Sandblaster L-BFGS and synchronous data-parallel
SGD, on the same network (locally connected + pooling + fully connected + softmax) and data
(8x8 digits).  Writes accuracy_time.csv (every evaluation of every run), accuracy_time.png
and summary.txt into DIR.  --quick: 2 replicas, 1 shard, 20 s a method (about 2 minutes);
without it 60 s a method and the replicas/shards you give (ranks: 1 + S + R).
"""

import argparse
from pathlib import Path

from dbmpi import study as S


def methods(R, shards):
    c = {"replicas": R, "ps_shards": shards}
    return {
        "SGD (1 replica)": ({"algorithm": "sgd", "learning_rate": 0.1}, {"replicas": 1}),
        f"Downpour SGD ({R} replicas)": ({"algorithm": "downpour", "learning_rate": 0.1}, c),
        f"Downpour SGD + Adagrad ({R} replicas)": (
            {"algorithm": "downpour", "learning_rate": 0.05, "adagrad": True}, c),
        f"Sandblaster L-BFGS ({R} replicas)": (
            {"algorithm": "sandblaster", "portion_size": 64}, c),
        f"sync SGD ({R} replicas)": ({"algorithm": "sync", "learning_rate": 0.1},
                                     {"replicas": R}),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true", help="seconds, for tests")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--seconds", type=float, default=None)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = args.seconds or (3 if args.smoke else 20 if args.quick else 60)
    data = S.ensure_data("digits")
    rows, finals = [], {}
    for name, (opt, cluster) in methods(args.replicas, args.shards).items():
        text = S.config(data, S.DIGITS_MODEL, cluster=cluster,
                        optimizer=dict(batch_size=32, seed=0, **opt),
                        run={"max_steps": 10**7, "max_time_s": budget, "eval_every_s": 0.5,
                             "checkpoint_every_s": 1e6, "log_every": 50})
        s = S.train(text, out / "runs", name.split(" (")[0].replace(" ", "_").replace("+", "p"))
        for m in s["metrics"]:
            if m["kind"] == "eval":
                rows.append({"method": name, "ranks": s["ranks"], "time_s": m["time"],
                             "test_accuracy": m["test_accuracy"], "test_loss": m["test_loss"]})
        finals[name] = (s["ranks"], s["final_test_accuracy"])
        print(name, finals[name], flush=True)
    S.write_csv(out / "accuracy_time.csv", rows)
    plt = S.plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in finals:
        r = [x for x in rows if x["method"] == name]
        ax.plot([x["time_s"] for x in r], [100 * x["test_accuracy"] for x in r],
                label=f"{name}, {finals[name][0]} ranks")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(80, 100)
    ax.set_title("Accuracy against time, 8x8 digits (paper Fig. 4)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "accuracy_time.png", dpi=110)
    lines = [S.header(f"study_accuracy_time: {budget:g} s per method")]
    for name, (ranks, acc) in finals.items():
        r = [x for x in rows if x["method"] == name]
        hit = next((x["time_s"] for x in r if x["test_accuracy"] >= 0.97), None)
        lines.append(f"{name:<40} {ranks} ranks  final {100 * acc:.2f}%  97% reached at "
                     + (f"{hit:.1f} s" if hit is not None else "never"))
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
