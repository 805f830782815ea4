"""Launched by tests under mpiexec -n P: loss and gradient of the partitioned network equal
the whole network's (computed serially on every rank), for the networks given by name, and
so does an SGD step fused into the backward pass (``out=theta, accumulate=True``).
Prints one JSON line from rank 0.  Usage: python tests/mpi_partition_check.py NAME..."""

import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
from mpi4py import MPI

from dbmpi import aligned
from dbmpi.config import load
from dbmpi.model import build
from dbmpi.model.partition import PartitionedNetwork

ROOT = Path(__file__).resolve().parents[1]
SM = {"type": "softmax", "classes": 7}
NETS = {
    "lc": {"input_shape": [2, 11, 9], "layers": [
        {"type": "locally_connected", "channels": 3, "kernel": 3, "stride": 1, "padding": 1}, SM]},
    "lc_stride": {"input_shape": [3, 13, 10], "l2": 1e-2, "layers": [
        {"type": "locally_connected", "channels": 4, "kernel": 4, "stride": 2, "padding": 2,
         "activation": "tanh"},
        {"type": "locally_connected", "channels": 2, "kernel": 3, "stride": 2}, SM]},
    "pools": {"input_shape": [2, 14, 9], "layers": [
        {"type": "max_pool", "size": 3, "stride": 2}, {"type": "l2_pool", "size": 2, "stride": 1},
        {"type": "fully_connected", "units": 5, "activation": "sigmoid"}, SM]},
    "lcn": {"input_shape": [3, 12, 8], "layers": [
        {"type": "lcn", "size": 3}, {"type": "locally_connected", "channels": 2, "kernel": 3},
        {"type": "lcn", "size": 5}, SM]},
    # padded and strided locally connected layers after others (their stripes' halos come
    # from layers split differently); the last layer's fields (2 rows, 3 apart) skip rows
    "lc_deep": {"input_shape": [2, 23, 6], "layers": [
        {"type": "locally_connected", "channels": 3, "kernel": 3, "padding": 1},
        {"type": "l2_pool", "size": 2},
        {"type": "locally_connected", "channels": 4, "kernel": 3, "padding": 1,
         "activation": "tanh"},
        {"type": "locally_connected", "channels": 2, "kernel": 2, "stride": 3}, SM]},
    "fc": {"input_shape": [1, 5, 5], "l2": 1e-3, "layers": [
        {"type": "fully_connected", "units": 9, "activation": "relu"},
        {"type": "fully_connected", "units": 11, "activation": "tanh"}, SM]},
    "softmax": {"input_shape": [1, 8, 8], "layers": [{"type": "softmax", "classes": 10}]},
    # fewer rows and units than partitions at P = 3 and 4: some own no pooling rows, no
    # units of the fully connected layer (they read no input there) but classes, or neither
    "thin": {"input_shape": [2, 6, 5], "layers": [
        {"type": "locally_connected", "channels": 2, "kernel": 3},
        {"type": "max_pool", "size": 2},
        {"type": "fully_connected", "units": 2, "activation": "sigmoid"},
        {"type": "softmax", "classes": 3}]},
    # at P = 4 partition 0 owns no parameters at all
    "thin_fc": {"input_shape": [1, 3, 3], "l2": 1e-3, "layers": [
        {"type": "fully_connected", "units": 2, "activation": "tanh"},
        {"type": "softmax", "classes": 3}]},
    # the softmax split by inputs where auto would not: at P = 3 and 4 some partitions have
    # none of its input columns (partition 0 then only the bias), and a first layer
    "thin_fc_inputs": {"input_shape": [1, 3, 3], "l2": 1e-3, "layers": [
        {"type": "fully_connected", "units": 2, "activation": "tanh"},
        {"type": "softmax", "classes": 3, "split": "inputs"}]},
    "softmax_inputs": {"input_shape": [1, 8, 8], "layers": [
        {"type": "softmax", "classes": 10, "split": "inputs"}]},
    # and by units where auto would split it by inputs
    "lc_units": {"input_shape": [2, 11, 9], "layers": [
        {"type": "locally_connected", "channels": 3, "kernel": 3, "stride": 1, "padding": 1},
        {"type": "softmax", "classes": 7, "split": "units"}]},
}
for name in ("digits_sgd", "digits_downpour", "digits_sandblaster"):
    NETS[name] = load(ROOT / "jobs" / "configs" / f"{name}.toml").model


KEEP = []    # partitions alive until exit, as in a user's script: their requests must be freed


def main():
    comm = MPI.COMM_WORLD
    out = {}
    for name in sys.argv[1:]:
        spec = NETS[name]
        full = build(spec)
        pn = PartitionedNetwork(spec, comm)
        KEEP.append(pn)
        rng = np.random.default_rng(0)
        theta = full.init_params(1)
        theta += (rng.standard_normal(theta.shape) * 0.05).astype(np.float32)
        x = rng.standard_normal((5,) + full.input_shape).astype(np.float32)
        y = rng.integers(0, full.classes, 5)
        l1, g1 = full.loss_and_grad(theta, x, y)
        b0 = pn.bytes_sent
        lp, gp = pn.loss_and_grad(pn.local(theta), x, y)
        sent = pn.bytes_sent - b0
        lr = 0.5
        stepped = pn.local(theta).copy()
        ls, _ = pn.loss_and_grad(stepped, x, y, out=stepped, scale=-lr, accumulate=True)
        parts = comm.gather(gp, root=0)
        steps = comm.gather(stepped, root=0)
        sends = comm.gather(sent, root=0)
        # the l2 term's ||theta||^2 of a 2M-parameter slice takes no copy of it (a float64
        # one cost more than the step: 40 MB, 25 ms for 5M parameters)
        big = np.ones(2_000_000, np.float32)
        tracemalloc.start()
        sq = pn._sum_sq(big)
        l2_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        mine = pn.local(theta)       # on a cache line, unless too small to bother
        placed = comm.gather(aligned.is_aligned(mine) or mine.nbytes < aligned.SMALL, root=0)
        if comm.Get_rank() == 0:
            g = pn.to_canonical(np.concatenate(parts))
            out[name] = {"loss_diff": abs(lp - l1) / max(1.0, abs(l1)),
                         "grad_diff": float(np.abs(g - g1).max() / max(1e-12, np.abs(g1).max())),
                         "bytes_sent": sends, "local_aligned": placed,
                         # every fully connected layer after the first takes its input as
                         # the blocks that arrive (no region assembled), where it has units
                         "fc_columns": all(ex.columns is not None
                                           for ex, part in zip(pn.exchanges[1:], pn.mine[1:])
                                           if not part.spatial and not part.by_inputs
                                           and part.chans[0] < part.chans[1]),
                         "softmax_by_inputs": pn.mine[-1].by_inputs,
                         "step_diff": float(np.abs(pn.to_canonical(np.concatenate(steps))
                                                   - (theta - lr * g1)).max()),
                         "step_loss_diff": abs(ls - lp),
                         "l2_term": [sq, l2_peak]}
    if comm.Get_rank() == 0:
        print(json.dumps(out))
    # a step as a script's last MPI call, its messages above MPICH's eager size: its sends,
    # which the step itself does not wait for, must still be completed and freed before
    # MPI_Finalize (which would warn)
    spec = {"input_shape": [1, 20, 64], "layers": [
        {"type": "locally_connected", "channels": 8, "kernel": 3},
        {"type": "locally_connected", "channels": 8, "kernel": 3}, SM]}
    pn = PartitionedNetwork(spec, comm)
    KEEP.append(pn)
    x = np.random.default_rng(1).standard_normal((64, 1, 20, 64)).astype(np.float32)
    pn.loss_and_grad(pn.init_local(0), x, np.arange(64) % 7)


if __name__ == "__main__":
    main()
