"""Model parallelism: partitioned loss and gradient equal the whole network's; traffic equals
the analytic cut-edge count; sgd and Downpour run with P > 1, P = 8 oversubscribed."""

import json

import numpy as np
import pytest

from conftest import ROOT, job_config, run_cli, run_mpi
from dbmpi.config import load
from dbmpi.model import build
from dbmpi.model.layout import Layout, split

CHECK = ["lc", "lc_stride", "lc_deep", "pools", "lcn", "fc", "softmax", "thin", "thin_fc",
         "thin_fc_inputs", "softmax_inputs", "lc_units",
         "digits_sgd", "digits_downpour", "digits_sandblaster"]


def _check(P):
    r = run_mpi(P, ROOT / "tests" / "mpi_partition_check.py", *CHECK, module=False, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "persistent request" not in r.stderr, r.stderr[-3000:]   # all freed before exit
    assert "pending" not in r.stderr, r.stderr[-3000:]       # and every send completed
    return json.loads(r.stdout.strip().splitlines()[-1])


def _rows_read(layer, o):
    """Input rows output row o of a spatial layer reads (from the layer's definition)."""
    kind, h = layer.spec["type"], layer.in_shape[0]
    if kind == "lcn":                    # y = v / d: d averages v, v averages x
        r = 2 * (layer.size // 2)
        return range(max(o - r, 0), min(o + r + 1, h))
    k = layer.k if kind == "locally_connected" else layer.size
    pad = layer.pad if kind == "locally_connected" else 0
    return range(max(o * layer.stride - pad, 0), min(o * layer.stride - pad + k, h))


def by_inputs(spec, P):
    """The softmax's split, from README's rule: by inputs where asked, or (auto) where it
    is not the first layer and classes x (P - 1) < 2 x inputs."""
    net = build(spec)
    last = net.layers[-1]
    mode = spec["layers"][-1].get("split", "auto")
    if P == 1 or mode == "units":
        return False
    return mode == "inputs" or (len(net.layers) > 1 and last.units * (P - 1) < 2 * last.inputs)


def cut_edge_bytes(spec, P, batch):
    """Bytes partition p sends per step, counted from the network's edges: every input
    activation owned by p that some output unit owned by q != p reads goes from p to q once
    in the forward pass, and its gradient from q back to p once in the backward pass; plus
    the logits slice each partition shares with the others.  A softmax split by inputs
    has no edge that crosses (each partition's weights meet only its own inputs): every
    partition sends its partial logits, all classes, to each other partition instead."""
    net = build(spec)
    out = [0] * P
    inputs_split = by_inputs(spec, P)
    for i, layer in enumerate(net.layers):
        spatial = layer.spec["type"] in ("locally_connected", "max_pool", "l2_pool", "lcn")
        if i > 0 and not (inputs_split and i == len(net.layers) - 1):
            prev = net.layers[i - 1]
            prev_spatial = prev.spec["type"] in ("locally_connected", "max_pool", "l2_pool", "lcn")
            h, w, c = layer.in_shape
            for q in range(P):
                if spatial:
                    a, z = split(layer.out_shape[0], P, q)
                    rows = set().union(*[set(_rows_read(layer, o)) for o in range(a, z)])
                else:
                    rows = set(range(h)) if split(layer.out_shape[2], P, q)[1] > split(layer.out_shape[2], P, q)[0] else set()
                for p in range(P):
                    if p == q:
                        continue
                    if prev_spatial:
                        a, z = split(prev.out_shape[0], P, p)
                        n = len(rows & set(range(a, z))) * w * c
                    else:
                        a, z = split(prev.out_shape[2], P, p)
                        n = len(rows) * (z - a)
                    out[p] += n * batch * 4      # activations, p -> q
                    out[q] += n * batch * 4      # their gradients, q -> p
    for p in range(P):                   # the logits (slices or partial sums), to every other
        a, z = (0, net.classes) if inputs_split else split(net.classes, P, p)
        out[p] += (P - 1) * (z - a) * batch * 4
    return out


@pytest.mark.parametrize("P", [2, 3, 4])
def test_partitioned_loss_grad_and_traffic(P):
    """Acceptance: P = 2, 3, 4 (widths P does not divide included) equal P = 1 within float32
    tolerance for every layer type and the jobs networks; bytes = cut edges."""
    from mpi_partition_check import NETS
    res = _check(P)
    for name, r in res.items():
        assert r["loss_diff"] < 1e-6 and r["grad_diff"] < 2e-6, (name, r)
        assert r["step_diff"] < 2e-6 and r["step_loss_diff"] == 0, (name, r)
        assert r["bytes_sent"] == cut_edge_bytes(NETS[name], P, 5), name
        assert r["softmax_by_inputs"] == by_inputs(NETS[name], P), name
        assert all(r["local_aligned"]), (name, r["local_aligned"])   # each partition's slice
        assert r["fc_columns"], name
        assert r["l2_term"][0] == 2e6 * P and r["l2_term"][1] < 64 * 1024, (name, r["l2_term"])


def test_layout_roundtrip_and_contiguous_slices():
    from mpi_partition_check import NETS
    net = build(NETS["lc_stride"])
    lay = Layout(net, 3)
    theta = net.init_params(0)
    assert np.array_equal(lay.to_canonical(lay.to_partitioned(theta)), theta)
    assert lay.ranges[0][0] == 0 and lay.ranges[-1][1] == net.num_params
    assert all(lay.ranges[i][1] == lay.ranges[i + 1][0] for i in range(2))
    # every canonical position once, and any range of either layout block by block
    canon = np.arange(net.num_params)
    perm = lay.to_partitioned(canon)
    assert sorted(perm.tolist()) == canon.tolist()
    for lo, hi in [(0, 1), (5, 300), (lay.ranges[1][0] - 3, lay.ranges[2][0] + 7),
                   (0, net.num_params)]:
        assert np.array_equal(lay.take(canon, lo, hi), perm[lo:hi])
        assert np.array_equal(lay.init_range(net, 0, lo, hi), lay.to_partitioned(theta)[lo:hi])
    # back from consecutive slices that cut across partitions (shards' ranges, say)
    cuts = [0, 7, lay.ranges[1][0] + 1, net.num_params - 2, net.num_params]
    assert np.array_equal(lay.from_slices([perm[a:b] for a, b in zip(cuts, cuts[1:])]), canon)


def test_slices_initialise_without_the_whole_vector(monkeypatch):
    """A partition or a shard draws only its own slice: the values are init_params' (above),
    and no rank needs the whole vector to cut its slice from."""
    from mpi_partition_check import NETS
    net = build(NETS["lc_deep"])
    lay = Layout(net, 4)
    want = lay.to_partitioned(net.init_params(5))

    def whole(*a, **k):
        raise AssertionError("init_params called for a slice")
    monkeypatch.setattr(type(net), "init_params", whole)
    for lo, hi in lay.ranges + [(3, 11)]:
        assert np.array_equal(lay.init_range(net, 5, lo, hi), want[lo:hi])
    assert not np.array_equal(lay.init_range(net, 6, 0, 50), want[:50])   # the seed counts


def test_pooling_stripe_reads_its_whole_input_stripe():
    """Where a partition's input rows run past its pooling windows, it reads them all (its
    gradient then lands in place); the windows' rows, the output and the traffic (checked
    above on this net) are unchanged."""
    from mpi_partition_check import NETS
    net = build(NETS["lc_deep"])          # LC 23 rows -> 2x2 pool -> 11 rows
    pool = Layout(net, 2).parts[0][1]
    assert pool.out_rows == [(0, 5), (5, 11)]
    # windows cover rows 0-9 and 10-21; the owned rows are 0-10 and 11-22
    assert pool.need == [(0, 11), (10, 23)]
    net = build({"input_shape": [1, 10, 3], "layers": [
        {"type": "locally_connected", "channels": 1, "kernel": 2},
        {"type": "max_pool", "size": 2, "stride": 2}, SM_SPEC]})
    # 9 rows, 4 windows in 3 stripes: partition 1's one window reads rows 2-3 (it owns 3-5);
    # reading on to row 5 would add a window, so its need stays as the windows say; the
    # others read on to the end of their stripes
    assert Layout(net, 3).parts[0][1].need == [(0, 3), (2, 4), (4, 9)]


SM_SPEC = {"type": "softmax", "classes": 3}


def _cfg(tmp_path, digits_path, name):
    return job_config(tmp_path, digits_path, name)


def test_sgd_losses_match_single_partition_for_50_steps(tmp_path, digits_path):
    cfg = _cfg(tmp_path, digits_path, "digits_sgd.toml")
    sets = ["--set", "run.max_steps=50", "--set", "run.log_every=1", "--quiet"]
    r = run_cli("train", cfg, "--out", tmp_path / "p1", *sets)
    assert r.returncode == 0, r.stderr
    r = run_mpi(3, "train", cfg, "--out", tmp_path / "p3", "--set", "cluster.partitions=3",
                *sets, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    losses = []
    for d in ("p1", "p3"):
        lines = (tmp_path / d / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(line)["loss"] for line in lines if '"train"' in line])
    assert len(losses[0]) == len(losses[1]) == 50
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-5)
    s = json.loads((tmp_path / "p3" / "summary.json").read_text())
    assert s["partitions"] == 3
    # the summary counts training steps only, not the evaluation at the end
    spec = load(cfg).model
    assert s["partition_bytes_per_step"] == cut_edge_bytes(spec, 3, 32)
    exch, step_ms = s["partition_exchange_ms_per_step"], 1e3 * s["compute_s"] / s["steps"]
    assert len(exch) == 3 and all(0 < e < step_ms for e in exch), (exch, step_ms)
    # the steps' time quartiles (ms): ordered, and within what the run's wall time allows
    # (half the steps took the median or longer, a quarter the upper quartile or longer)
    for d in ("p1", "p3"):
        s = json.loads((tmp_path / d / "summary.json").read_text())
        q1, med, q3 = s["step_ms_quartiles"]
        mean_ms = 1e3 * s["wall_time_s"] / s["steps"]
        assert 0 < q1 <= med <= q3 and med <= 2 * mean_ms and q3 <= 4 * mean_ms, s
        # each rank's peak memory: one replica of 1 or 3 partitions
        assert [len(p) for p in s["peak_rss_mb"]["replicas"]] == [1 if d == "p1" else 3]
        assert all(mb > 10 for mb in s["peak_rss_mb"]["replicas"][0])


@pytest.mark.parametrize("sets,reason", [
    (["run.max_time_s=3", "run.eval_every_s=0.5", "run.checkpoint_every_s=1"], "max_time_s"),
    (["run.target_accuracy=0.9", "run.eval_every_s=0.2"], "target_accuracy")])
def test_partitioned_sgd_stops_evaluates_and_checkpoints_on_partition_0s_word(
        tmp_path, digits_path, sets, reason):
    """Partition 0 decides (time, target) and every partition acts on the same step: a
    partition acting alone would hang the others in their next exchange."""
    cfg = _cfg(tmp_path, digits_path, "digits_sgd.toml")
    out = tmp_path / "p2"
    args = ["--set", "cluster.partitions=2", "--set", "run.max_steps=1000000"]
    for kv in sets:
        args += ["--set", kv]
    r = run_mpi(2, "train", cfg, "--out", out, "--quiet", *args, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["stop_reason"] == reason and 0 < s["steps"] < 1000000, s
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert len(evals) >= (3 if reason == "max_time_s" else 2)   # periodic ones and the last
    if reason == "target_accuracy":
        assert evals[-2]["test_accuracy"] >= 0.9 and s["final_test_accuracy"] >= 0.9
    assert (out / "checkpoint.h5").exists()


def test_eight_partitions_oversubscribed(tmp_path, digits_path):
    cfg = _cfg(tmp_path, digits_path, "digits_sgd.toml")
    out = tmp_path / "p8"
    r = run_mpi(8, "train", cfg, "--out", out, "--quiet", "--set", "cluster.partitions=8",
                "--set", "run.max_steps=30", timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 30 and s["partitions"] == 8
    r = run_cli("evaluate", out)           # the checkpoint is in the canonical layout
    assert r.returncode == 0 and json.loads(r.stdout)["accuracy"] == pytest.approx(
        s["final_test_accuracy"])


def test_downpour_with_two_partitions(tmp_path, digits_path):
    out = tmp_path / "run"
    r = run_mpi(7, "train", _cfg(tmp_path, digits_path, "digits_downpour.toml"), "--out", out,
                "--quiet", "--set", "cluster.partitions=2", "--set", "run.max_steps=300",
                timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["pushes_sent"] == s["pushes_applied"] > 0 and s["partitions"] == 2
    assert s["final_test_accuracy"] > 0.8
    spec = load(tmp_path / "digits_downpour.toml").model
    assert s["partition_bytes_per_step"] == cut_edge_bytes(spec, 2, 32)
    assert len(s["partition_exchange_ms_per_step"]) == 2
    assert all(0 < e < 1e3 * d["step_s"] for e in s["partition_exchange_ms_per_step"]
               for d in s["replicas"][:1])
    assert run_cli("evaluate", out).returncode == 0


def test_sync_with_partitions_follows_the_same_trajectory(tmp_path, digits_path):
    cfg = _cfg(tmp_path, digits_path, "digits_sgd.toml")
    sets = ["--quiet", "--set", "optimizer.algorithm=sync", "--set", "cluster.replicas=2",
            "--set", "run.max_steps=120", "--set", "run.log_every=1"]
    r = run_mpi(2, "train", cfg, "--out", tmp_path / "p1", *sets, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_mpi(4, "train", cfg, "--out", tmp_path / "p2", "--set", "cluster.partitions=2",
                *sets, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("p1", "p2"))
    assert b["partitions"] == 2 and b["steps"] == a["steps"] == 120
    assert b["final_test_loss"] == pytest.approx(a["final_test_loss"], rel=1e-4)


def test_sandblaster_with_partitions_matches_one_partition(tmp_path, digits_path):
    cfg = _cfg(tmp_path, digits_path, "digits_sandblaster.toml")
    sets = ["--quiet", "--set", "cluster.replicas=2", "--set", "cluster.ps_shards=1",
            "--set", "run.max_steps=15"]
    r = run_mpi(4, "train", cfg, "--out", tmp_path / "p1", *sets, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_mpi(6, "train", cfg, "--out", tmp_path / "p2", "--set", "cluster.partitions=2",
                *sets, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("p1", "p2"))
    assert b["final_objective"] == pytest.approx(a["final_objective"], rel=1e-4)
    assert b["pushes_sent"] == b["pushes_applied"] > 0
    assert run_cli("evaluate", tmp_path / "p2").returncode == 0


@pytest.mark.parametrize("name", ["lc_stride", "pools", "lcn", "softmax_inputs", "digits_sgd"])
def test_one_partition_without_mpi_is_the_whole_network(name):
    """P = 1 is the one-partition case of the same object: no communicator, no MPI, and the
    loss, gradient, fused update and evaluation of the whole network, bit for bit; its
    layout is the canonical one, in one piece."""
    from mpi_partition_check import NETS
    from dbmpi.model.partition import PartitionedNetwork
    spec = NETS[name]
    net, one = build(spec), PartitionedNetwork(spec)
    assert (one.P, one.p, one.local_range) == (1, 0, (0, net.num_params))
    assert one.layout._pieces == [(0, 0, net.num_params)]
    theta = net.init_params(3)
    assert np.array_equal(one.init_local(3), theta)
    rng = np.random.default_rng(0)
    x = rng.random((6, *net.input_shape), dtype=np.float32)
    y = rng.integers(0, net.classes, 6)
    (la, ga), (lb, gb) = one.loss_and_grad(theta, x, y), net.loss_and_grad(theta, x, y)
    assert la == lb and np.array_equal(ga, gb)
    ta, tb = theta.copy(), theta.copy()
    one.loss_and_grad(ta, x, y, out=ta, scale=-0.1, accumulate=True)
    net.loss_and_grad(tb, x, y, out=tb, scale=-0.1, accumulate=True)
    assert np.array_equal(ta, tb) and not np.array_equal(ta, theta)
    assert one.evaluate(theta, x, y) == net.evaluate(theta, x, y)
    assert np.array_equal(one.gather_canonical(theta), theta)
