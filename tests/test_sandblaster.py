"""Sandblaster L-BFGS: scheduling (serial), convergence against scipy, portion gradients."""

import json

import h5py
import numpy as np
import pytest

from conftest import job_config, run_mpi
from dbmpi.algorithms.sandblaster import (Gram, PortionScheduler, SandblasterShard,
                                          wolfe_line_search)
from dbmpi.config import load
from dbmpi.model import build
from dbmpi.rundir import load_checkpoint


def test_scheduler_balances_and_backs_up_first_result_wins():
    s = PortionScheduler(range(10), 3)
    got = {r: [s.next_for(r)[0]] for r in range(3)}
    assert got == {0: [0], 1: [3], 2: [6]}                  # contiguous chunks
    for _ in range(3):                                      # replica 0 is fast
        assert s.result(0, got[0][-1])
        got[0].append(s.next_for(0)[0])
    assert got[0] == [0, 1, 2, 9]                           # then steals from the largest chunk
    assert s.result(0, 9) and s.result(1, 3)
    while True:
        nxt = s.next_for(0)
        if nxt is None or nxt[1]:
            break
        s.result(0, nxt[0])
    assert nxt is not None and nxt[1] and nxt[2]            # a backup copy, last round
    backed = nxt[0]
    assert s.result(0, backed) is True                      # the backup wins ...
    holder = 1 if backed in range(3, 6) else 2
    assert s.result(holder, backed) is False                # ... and the original is dropped
    s2 = PortionScheduler(range(4), 2, balance=False, backups=False)
    assert s2.next_for(0)[0] == 0 and s2.result(0, 0)
    assert s2.next_for(0)[0] == 1 and s2.result(0, 1)
    assert s2.next_for(0) is None                           # no stealing, no backups


def test_line_search_quadratic():
    phi = lambda t: ((t - 3.0) ** 2, 2 * (t - 3.0))         # noqa: E731
    t, f, gd, ok = wolfe_line_search(phi, 9.0, -6.0, 1.0)
    assert ok and f < 9.0 and abs(gd) <= 0.9 * 6.0


def _two_loop(g, pairs, gamma):
    """The textbook recursion on the vectors themselves (Nocedal & Wright, Algorithm 7.4)."""
    q, alphas = g.copy(), []
    for s, y in reversed(pairs):
        a = (s @ q) / (s @ y)
        q -= a * y
        alphas.append(a)
    q *= gamma
    for (s, y), a in zip(pairs, reversed(alphas)):
        q += (a - (y @ q) / (s @ y)) * s
    return -q


def test_gram_two_loop_equals_the_recursion_on_vectors():
    """The coordinator's two-loop on coefficients, from the shards' summed Gram rows, gives
    the direction of the textbook recursion, with history slots reused out of order."""
    rng = np.random.default_rng(0)
    m, n = 4, 50
    halves = [SandblasterShard.__new__(SandblasterShard) for _ in range(2)]
    v = {k: rng.standard_normal(n) for k in [f"s{i}" for i in range(m)]
         + [f"y{i}" for i in range(m)] + ["g"]}
    for i in range(m):                       # curvature pairs: s.y > 0
        v[f"y{i}"] = v[f"s{i}"] * rng.uniform(0.5, 2.0, n) + 0.1 * v[f"y{i}"]
    for h, sl in zip(halves, (slice(0, 20), slice(20, n))):   # two shards' ranges
        h.v = {k: x[sl] for k, x in v.items()}
        h.basis = [f"s{i}" for i in range(m)] + [f"y{i}" for i in range(m)] + ["g"]
    gram = Gram(m)
    names = list(v)
    gram.update(names, [h.rows(names) for h in halves])
    np.testing.assert_allclose(gram.G[gram.g, gram.s(2)], v["g"] @ v["s2"])
    hist = [(2, 0.0), (0, 0.0), (3, 0.0)]    # oldest first, slot 1 unused
    hist = [(i, 1.0 / (v[f"s{i}"] @ v[f"y{i}"])) for i, _ in hist]
    gamma = 0.7
    coef, gd = gram.direction(hist, gamma)
    d = sum(c * v[k] for c, k in zip(coef, halves[0].basis))
    want = _two_loop(v["g"], [(v[f"s{i}"], v[f"y{i}"]) for i, _ in hist], gamma)
    np.testing.assert_allclose(d, want, rtol=1e-10, atol=1e-12)
    assert gd == pytest.approx(v["g"] @ want, rel=1e-10)
    coef, gd = gram.direction([], 1.0)       # no history: steepest descent
    assert coef[gram.g] == -1.0 and np.count_nonzero(coef) == 1 and gd < 0


def _cfg(tmp_path, digits_path, extra=""):
    return job_config(tmp_path, digits_path, "digits_sandblaster.toml", extra)


def _train_arrays(digits_path):
    with h5py.File(digits_path, "r") as f:
        return f["train"]["x"][...], f["train"]["y"][...].astype(np.int64)


def test_softmax_regression_reaches_scipy_optimum(tmp_path, digits_path):
    """Acceptance: objective within 1e-5 relative of scipy's L-BFGS-B optimum."""
    from scipy.optimize import minimize
    cfg_path = _cfg(tmp_path, digits_path)
    spec = {"input_shape": [1, 8, 8], "l2": 1e-3, "layers": [{"type": "softmax", "classes": 10}]}
    text = cfg_path.read_text()
    head, _, tail = text.partition("[[model.layers]]")
    tail = tail[tail.index("[cluster]"):]
    cfg_path.write_text(head + '[[model.layers]]\ntype = "softmax"\nclasses = 10\n\n' + tail)
    out = tmp_path / "run"
    r = run_mpi(6, "train", cfg_path, "--out", out, "--quiet", "--set", "run.max_steps=400",
                "--set", "run.eval_every_s=100", timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    x, y = _train_arrays(digits_path)
    net = build(spec, backend="reference")
    fun = lambda th: net.loss_and_grad(th, x.astype(np.float64), y)  # noqa: E731
    best = minimize(fun, np.zeros(net.num_params), jac=True, method="L-BFGS-B",
                    options={"maxiter": 5000, "gtol": 1e-10, "ftol": 1e-15})
    print(f"\nsandblaster objective {s['final_objective']:.10f}, scipy L-BFGS-B {best.fun:.10f}, "
          f"relative difference {abs(s['final_objective'] - best.fun) / abs(best.fun):.2e}, "
          f"{s['iterations']} iterations")
    assert abs(s["final_objective"] - best.fun) <= 1e-5 * abs(best.fun), (s, best.fun)
    theta = load_checkpoint(out / "checkpoint.h5")["params"]
    assert abs(fun(theta.astype(np.float64))[0] - best.fun) <= 2e-5 * abs(best.fun)
    assert s["pushes_sent"] == s["pushes_applied"] > 0


# 1: each portion's sums pushed alone; 0: held and pushed together when a portion would
# take longer than a push (a straggler pushes, a fast replica holds)
@pytest.mark.parametrize("push_every", [1, 0])
def test_portion_gradient_equals_full_batch_with_straggler(tmp_path, digits_path, push_every):
    """Acceptance: the batch gradient assembled from portions, with replica 0 slowed 5x and
    backup copies in play, equals the single-process full-batch gradient."""
    out = tmp_path / "run"
    r = run_mpi(6, "train", _cfg(tmp_path, digits_path), "--out", out, "--quiet",
                "--set", "run.max_steps=2", "--set", "faults.slow_replica=0",
                "--set", "faults.slow_factor=5", "--set", "optimizer.portion_size=16",
                "--set", f"optimizer.push_every={push_every}", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["backup_copies"] > 0
    ck = load_checkpoint(out / "checkpoint.h5")
    cfg = load(out / "config.toml")
    net = build(cfg.model)
    x, y = _train_arrays(digits_path)
    loss, g = net.loss_and_grad(ck["params"], x, y)      # float32, one process, full batch
    g_sb = ck["state"]["lbfgs_g"]
    np.testing.assert_allclose(g_sb, g, atol=2e-5 * np.abs(g).max(), rtol=1e-3)
