"""Command line: ``python -m dbmpi {data,validate,train,evaluate}``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import exitcodes
from .config import ConfigError, load, ranks_needed
from .data import DataError, check_file
from .rundir import CheckpointError

__all__ = ["main"]


class UsageError(Exception):
    """An error the user fixes; printed as one line without a traceback."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dbmpi", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="make an HDF5 dataset")
    dsub = d.add_subparsers(dest="name", required=True)
    dd = dsub.add_parser("digits", help="the real 8x8 digits that scikit-learn ships")
    dd.add_argument("--out", required=True)
    dd.add_argument("--seed", type=int, default=0)
    ds = dsub.add_parser("synthetic", help="digits drawn at SIZE x SIZE with distortions")
    ds.add_argument("--size", type=int, default=32)
    ds.add_argument("--count", type=int, default=10000, help="training samples")
    ds.add_argument("--test-count", type=int, default=None, help="default: count / 5")
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--out", required=True)
    di = dsub.add_parser("idx", help="convert MNIST-format IDX files")
    for name in ("train-images", "train-labels", "test-images", "test-labels"):
        di.add_argument(f"--{name}", required=True)
    di.add_argument("--out", required=True)

    v = sub.add_parser("validate", help="check a config (and its data); print JSON")
    v.add_argument("config")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--no-data", action="store_true", help="do not check the dataset file")

    t = sub.add_parser("train", help="train (under mpiexec for the MPI algorithms)")
    t.add_argument("config", nargs="?")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--out", default=None, help="run directory (default runs/NAME-TIME)")
    t.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress lines")

    e = sub.add_parser("evaluate", help="evaluate a run's checkpoint; print JSON")
    e.add_argument("run_dir")
    e.add_argument("--split", choices=("train", "test"), default="test")
    return p


def _model_summary(net) -> list:
    return [{"type": layer.spec["type"],
             "out_shape": [layer.out_shape[2], layer.out_shape[0], layer.out_shape[1]],
             "params": layer.num_params} for layer in net.layers]


def cmd_data(args) -> int:
    from .data import make_digits, make_idx, make_synthetic
    t0 = time.time()
    if args.name == "digits":
        info = make_digits(args.out, args.seed)
    elif args.name == "synthetic":
        info = make_synthetic(args.out, args.size, args.count, args.test_count, args.seed)
    else:
        info = make_idx(args.out, args.train_images, args.train_labels, args.test_images,
                        args.test_labels)
    info.update(out=str(args.out), seconds=round(time.time() - t0, 2))
    print(json.dumps(info))
    return exitcodes.OK


def cmd_validate(args) -> int:
    from .model import build
    cfg = load(args.config, args.set)
    net = build(cfg.model)
    out = {"ok": True, "algorithm": cfg.optimizer.algorithm, "ranks": ranks_needed(cfg),
           "num_params": net.num_params, "layers": _model_summary(net),
           "data_path": str(cfg.data.path)}
    if not args.no_data:
        out["data"] = check_file(cfg.data.path, net.classes, net.input_shape)
    print(json.dumps(out))
    return exitcodes.OK


def _from_env(names, default):
    for var in names:
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return default


def mpi_size_from_env() -> int:
    """World size as the MPI launcher advertises it, without initialising MPI."""
    return _from_env(("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_NTASKS"), 1)


def mpi_rank_from_env() -> int:
    return _from_env(("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"), 0)


def prepare(args):
    """Load the config (and the resume checkpoint's), check the data; no heavy work."""
    from .model import build
    from .rundir import load_checkpoint
    resume = None
    if args.resume:
        rd = Path(args.resume)
        cfg_path = Path(args.config) if args.config else rd / "config.toml"
        cfg = load(cfg_path, args.set)
    else:
        if not args.config:
            raise UsageError("train: give a CONFIG file (or --resume RUN_DIR)")
        cfg = load(args.config, args.set)
    net = build(cfg.model)
    # shapes and fields here, on every rank; under MPI, reading every value (NaN, label
    # range) is rank 0's job once MPI is up, and its verdict is broadcast (launch.train_mpi)
    check_file(cfg.data.path, net.classes, net.input_shape,
               scan=mpi_size_from_env() == 1)
    if args.resume:
        # each rank reads the slices it owns when its algorithm restores them
        resume = load_checkpoint(Path(args.resume) / "checkpoint.h5", net.num_params,
                                 lazy=True)
        out = Path(args.resume)
    elif args.out:
        out = Path(args.out)
    else:   # under MPI, rank 0's choice is broadcast (clocks may straddle a second)
        stem = Path(args.config).stem
        out = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg, net, resume, out


def cmd_train(args) -> int:
    from .signals import install_preemption
    install_preemption()
    cfg, net, resume, out = prepare(args)
    algo = cfg.optimizer.algorithm
    need = ranks_needed(cfg)
    size = mpi_size_from_env()
    if algo == "sgd" and need == 1 and size == 1:
        from .algorithms.sgd import run_sgd
        from .rundir import add_to_summary, peak_rss_mb
        summary = run_sgd(None, cfg, net, out, resume, quiet=args.quiet)
        add_to_summary(out, {"peak_rss_mb": {"replicas": [[peak_rss_mb()]]}})
        print(json.dumps({"run_dir": str(out), **summary}))
        return exitcodes.PREEMPTED if summary["stop_reason"] == "preempted" else exitcodes.OK
    from .launch import train_mpi
    from .signals import Guard
    from .topology import describe, role_of
    rank = mpi_rank_from_env()
    guard = Guard(rank, describe(*role_of(rank, cfg)), size) if size == need else None
    return train_mpi(cfg, net, resume, out, quiet=args.quiet, guard=guard,
                     agree_out=not (args.out or args.resume))


def cmd_evaluate(args) -> int:
    from .algorithms.common import Evaluator
    from .model import build
    from .rundir import load_checkpoint
    rd = Path(args.run_dir)
    if not (rd / "config.toml").exists():
        raise UsageError(f"{rd}: not a run directory (no config.toml)")
    cfg = load(rd / "config.toml")
    net = build(cfg.model)
    check_file(cfg.data.path, net.classes, net.input_shape, scan=False)
    ck = load_checkpoint(rd / "checkpoint.h5", net.num_params)
    ev = Evaluator(net, cfg.data.path, args.split)(ck["params"])
    print(json.dumps({"run_dir": str(rd), "split": args.split, **ev,
                      "counters": ck["counters"]}))
    return exitcodes.OK


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    cmd = {"data": cmd_data, "validate": cmd_validate, "train": cmd_train,
           "evaluate": cmd_evaluate}[args.command]
    # Under mpiexec every rank reaches the same verdict on a bad config or dataset: rank 0
    # alone says it, so the user reads one line, and every rank exits with the same code.
    say = mpi_rank_from_env() == 0
    try:
        return cmd(args)
    except (ConfigError, DataError, CheckpointError, UsageError) as e:
        code, msg = exitcodes.USAGE, str(e)
    except FloatingPointError as e:
        code, msg = exitcodes.DIVERGED, str(e)
    except ValueError as e:  # a layer that cannot take its input, a bad batch size
        code, msg = exitcodes.USAGE, str(e)
    if say:
        print(f"dbmpi: error: {msg}", file=sys.stderr, flush=True)
    elif mpi_size_from_env() > 1:
        # every rank reaches this verdict without MPI; an MPI launcher that ends the job at
        # the first non-zero exit (Open MPI's) must not end it before rank 0 has said why
        time.sleep(1.0)
    return code
