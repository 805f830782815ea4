"""Shared pieces of the study scripts: run a training job, read its results, write CSV/PNG.

Each run is a real ``python -m dbmpi train`` (under ``MPIEXEC`` when it needs more than one
rank), so a study measures exactly what users run.  Ranks beyond the cores here are
oversubscribed; on a cluster, launch the study inside an allocation and set ``MPIEXEC``
(for example ``MPIEXEC="srun --mpi=pmix"``).  ``train(..., cores=[...])`` pins rank r to the
r-th of those cores (:mod:`dbmpi.pinned`), whatever the launcher.  The scripts live in
``jobs/studies`` and ``jobs/bench``; this module is importable as ``dbmpi.study``.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from dbmpi.mpienv import launcher_env

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = launcher_env()   # one BLAS thread a rank, Open MPI settings, DBMPI_TRANSPORT

NETWORKS = ROOT / "jobs" / "networks"      # every network the jobs share, one file each


def network(name: str) -> str:
    """The ``[model]`` table that includes jobs/networks/NAME.toml."""
    return f'[model]\nfile = "{NETWORKS / (name + ".toml")}"\n'


DIGITS_MODEL = network("digits")


def mpiexec() -> list[str]:
    return shlex.split(os.environ.get("MPIEXEC", str(Path(PY).parent / "mpiexec")))


def add_cores_option(parser) -> None:
    """The scripts' ``--cores`` option (read it with ``parse_cores``)."""
    parser.add_argument("--cores", default=None,
                        help="comma-separated CPUs: partition r pinned to the r-th (default: "
                             "the launcher's placement)")


def parse_cores(text: str | None) -> list[int] | None:
    """A ``--cores`` value (``"2,5"``) as a list of CPU numbers this process may run on;
    None for None or ""; a clear error otherwise."""
    if not text:
        return None
    from .pinned import parse_cores as parse
    return parse(text)


STUDY_COUNT = 4000    # training images of the studies' synthetic sets: speed needs few


def ensure_data(name: str) -> Path:
    """data/digits.h5, or the studies' and benchmarks' own synthetic set of STUDY_COUNT
    training images, data/synth32-4000.h5 or data/synth64-4000.h5, made if missing.  Not
    data/synth64.h5: that name is the jobs' full dataset (bash data/make.sh), which a
    small file of the same name would silently stand in for."""
    path = ROOT / "data" / (f"{name}.h5" if name == "digits" else f"{name}-{STUDY_COUNT}.h5")
    if not path.exists():
        args = (["digits"] if name == "digits" else
                ["synthetic", "--size", name[len("synth"):], "--count", str(STUDY_COUNT)])
        subprocess.run([PY, "-m", "dbmpi", "data", *args, "--out", str(path)], check=True,
                       cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path


def config(data: Path, model: str, **tables) -> str:
    """A config file's text: [data], the model, then tables given as dicts."""
    out = [f'[data]\npath = "{data}"', model.strip()]
    for name, keys in tables.items():
        out.append(f"[{name}]")
        for k, v in keys.items():
            out.append(f"{k} = " + (f'"{v}"' if isinstance(v, str) else
                                    str(v).lower() if isinstance(v, bool) else repr(v)))
    return "\n".join(out) + "\n"


def sgd_run(data, model, P, steps, batch, workdir, name, cores=None) -> dict:
    """One timed run: algorithm sgd, P partitions, no evaluation or checkpoint on the way;
    partition r pinned to cores[r] where ``cores`` is given."""
    text = config(data, model, cluster={"partitions": P},
                    optimizer={"algorithm": "sgd", "batch_size": batch, "learning_rate": 0.01},
                    run={"max_steps": steps, "eval_every_s": 1e6, "checkpoint_every_s": 1e6,
                         "log_every": 1000})
    return train(text, Path(workdir), name, cores=cores)


def _sgemm(seed):
    """A function that times 200 products of a 64x64 float32 matrix (L1-resident: compute
    alone) and returns their GFLOP/s."""
    import time
    import numpy as np
    a = np.random.default_rng(seed).random((64, 64), dtype=np.float32)
    c = a @ a

    def rate():
        t = time.perf_counter()
        for _ in range(200):
            np.matmul(a, a, out=c)
        return 200 * 2 * 64 ** 3 / (time.perf_counter() - t) / 1e9
    return rate


def core_speeds(cores=None, seconds: float = 0.25) -> dict[int, float]:
    """GFLOP/s of a 64x64 float32 matmul (L1-resident: compute alone) on each core, this
    process pinned to one core after another; {} where affinity cannot be set.

    A P-partition step runs at the pace of its slowest partition, so cores of unequal speed
    cap the speed-up: on a shared VM a core whose physical sibling is busy runs 20-40%
    slower, and that changes from minute to minute."""
    import time
    if not hasattr(os, "sched_setaffinity"):
        return {}
    mask = os.sched_getaffinity(0)
    cores = sorted(mask if cores is None else set(cores) & mask)
    sgemm = _sgemm(0)
    out = {}
    try:
        for core in cores:
            os.sched_setaffinity(0, {core})
            best, end = 0.0, time.perf_counter() + seconds
            while time.perf_counter() < end:
                best = max(best, sgemm())
            out[core] = best
    finally:
        os.sched_setaffinity(0, mask)
    return out


def core_speeds_line(speeds: dict[int, float]) -> str:
    if not speeds:
        return "core speeds: not measured (no CPU affinity here)"
    v = list(speeds.values())
    return ("core speeds (64x64 sgemm, GFLOP/s): "
            + ", ".join(f"cpu{c} {g:.1f}" for c, g in speeds.items())
            + f"; slowest/fastest {min(v) / max(v):.2f}")


def _pace_worker(core, start, seconds, mib, out):
    """On ``core``: the median GFLOP/s of a 64x64 float32 matmul (L1-resident), then the
    median GB/s (read + write) of copying a ``mib`` MiB array (memory-bound), each for
    ``seconds``; both begin when every worker of the same barrier ``start`` is ready."""
    import time
    import numpy as np
    os.sched_setaffinity(0, {core})
    src = np.ones(mib * 2 ** 18, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)                  # pages touched before the clock runs

    def copy():
        t = time.perf_counter()
        np.copyto(dst, src)
        return 2 * src.nbytes / (time.perf_counter() - t) / 1e9
    res = []
    for rate in (_sgemm(core), copy):
        start.wait()
        rates, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            rates.append(rate())
        res.append(sorted(rates)[len(rates) // 2])
    out.put((core, res[0], res[1]))


def pace_together(cores, seconds: float = 0.5, mib: int = 64):
    """How fast each core computes and streams memory while all of ``cores`` do so at once,
    against one at a time: {core: (compute ratio, memory ratio)}, {} without CPU affinity.

    P partitions on P cores run at the cores' together-pace, so this is the ceiling a
    P = len(cores) speed-up meets on this machine: compute-bound work scales by P times the
    compute ratio at best, memory-bound work by P times the memory ratio."""
    import multiprocessing as mp
    if not hasattr(os, "sched_setaffinity"):
        return {}
    cores = sorted(set(cores) & os.sched_getaffinity(0))
    ctx = mp.get_context("fork")

    def run(group):
        out, start = ctx.Queue(), ctx.Barrier(len(group))
        procs = [ctx.Process(target=_pace_worker, args=(c, start, seconds, mib, out))
                 for c in group]
        for pr in procs:
            pr.start()
        got = {}
        for _ in group:
            core, gf, gb = out.get(timeout=60 + 4 * seconds)
            got[core] = (gf, gb)
        for pr in procs:
            pr.join()
        return got
    alone = {}
    for c in cores:
        alone.update(run([c]))
    together = run(cores)
    return {c: (together[c][0] / alone[c][0], together[c][1] / alone[c][1]) for c in cores}


def pace_together_line(ratios: dict) -> str:
    if not ratios:
        return "cores together: not measured (no CPU affinity here)"
    return ("all these cores at once, each at (of its pace alone): "
            + ", ".join(f"cpu{c} compute {g:.2f}x, memory copy {m:.2f}x"
                        for c, (g, m) in ratios.items()))


def ranks_of(text: str, workdir: Path) -> int:
    cfg = workdir / "probe.toml"
    cfg.write_text(text)
    r = subprocess.run([PY, "-m", "dbmpi", "validate", str(cfg), "--no-data"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, check=True)
    return json.loads(r.stdout)["ranks"]


def train(text: str, workdir: Path, name: str, timeout: float = 900, cores=None) -> dict:
    """Run one training job; return its summary with ``metrics`` (list of dicts) and ranks.
    ``cores``: a list of CPU numbers, rank r pinned to the r-th (None: the launcher's
    placement)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / f"{name}.toml"
    cfg.write_text(text)
    out = workdir / name
    ranks = ranks_of(text, workdir)
    cmd = [PY, "-m", "dbmpi", "train", str(cfg), "--out", str(out), "--quiet"]
    if cores:
        cmd[1:1] = ["-m", "dbmpi.pinned", ",".join(map(str, cores))]
    if ranks > 1:
        cmd = mpiexec() + ["-n", str(ranks), PY, "-m", "mpi4py"] + cmd[1:]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{name}: train failed ({r.returncode}):\n{r.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    s["metrics"] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    s["ranks"] = ranks
    return s


def interleaved(run, values, repeats: int):
    """``run(v, rep)`` for every value, the values interleaved, ``repeats`` times (so drifting
    load on a shared machine hits them alike).  Returns {v: [summaries]}, and the best and the
    median samples/s of each value."""
    import numpy as np
    runs = {v: [] for v in values}
    for rep in range(repeats):
        for v in values:
            runs[v].append(run(v, rep))
    best = {v: best_run(runs[v])["samples_per_s"] for v in values}
    median = {v: float(np.median([s["samples_per_s"] for s in runs[v]])) for v in values}
    return runs, best, median


def best_run(summaries: list[dict]) -> dict:
    """The run with the most samples/s (the one ``interleaved``'s best figure comes from)."""
    return max(summaries, key=lambda s: s["samples_per_s"])


def step_ms(summary: dict) -> float:
    """Milliseconds per training step of an ``sgd`` run (its compute_s over its steps)."""
    return 1e3 * summary["compute_s"] / max(summary["steps"], 1)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as p
    return p


def header(title: str) -> str:
    import platform
    return (f"{title}\nmachine: {platform.node()}, {os.cpu_count()} cores; launcher: "
            f"{' '.join(mpiexec())}\n")
