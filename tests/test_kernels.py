"""Cython kernels against the numpy reference, on many shapes."""

import numpy as np
import pytest

from dbmpi import kernels as KO
from dbmpi.model import build
from dbmpi.model import ops_reference as RO
from dbmpi.model.reference import out_size

ACTS = ["relu", "sigmoid", "tanh", "linear"]

# (batch, h, w, c, kernel, stride, pad, filters)
LC_SHAPES = [
    (1, 8, 8, 1, 3, 1, 0, 4),      # batch 1, one channel
    (3, 7, 9, 2, 3, 2, 1, 5),      # odd sizes, stride 2, padding
    (4, 11, 10, 3, 4, 3, 2, 6),    # stride 3, even kernel
    (2, 5, 5, 1, 5, 1, 0, 3),      # receptive field as large as the input
    (2, 13, 7, 5, 2, 2, 0, 1),     # one filter
    (5, 16, 16, 16, 5, 1, 2, 8),
    (1, 9, 9, 3, 7, 2, 3, 7),
    (33, 12, 12, 3, 5, 1, 0, 16),  # batch past the vector padding, 2-vector blocks
    (9, 10, 10, 4, 3, 2, 1, 24),   # 2- and 1-vector blocks, padded edges
    (7, 9, 11, 1, 3, 2, 0, 8),     # patch rows too short for row blocks, no padding
    # forward in passes of patch rows (bias and relu on the last): 2 + 2 + 1 rows in place,
    # one row a pass in place, and one row a pass with padding (batch-last)
    (2, 11, 11, 16, 5, 2, 0, 32),
    (3, 9, 9, 40, 3, 2, 0, 16),
    (2, 6, 7, 70, 3, 1, 1, 8),
    (3, 16, 16, 4, 3, 1, 0, 8),    # samples 4 KB apart: batch-last in backward only
    (3, 12, 34, 2, 3, 1, 0, 16),   # an output row of 512 floats: the backward's dz rows padded
]


def _tol(a):
    return 1e-5 * max(1.0, float(np.abs(a).max()))


@pytest.mark.parametrize("shape", LC_SHAPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_locally_connected(shape, act):
    n, h, w, c, k, s, p, f = shape
    rng = np.random.default_rng(hash((shape, act)) % 2**32)
    ho, wo = out_size(h, k, s, p), out_size(w, k, s, p)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    # weights scaled by the fan-in keep pre-activations O(1) (the reference's sigmoid
    # overflows exp, harmlessly but loudly, for a 630-wide patch of unit weights)
    wt = (rng.standard_normal((ho, wo, k * k * c, f)) / np.sqrt(k * k * c)).astype(np.float32)
    b = rng.standard_normal((ho, wo, f)).astype(np.float32)
    y1, y2 = KO.lc_forward(x, wt, b, k, s, p, act), RO.lc_forward(x, wt, b, k, s, p, act)
    # rounding scales with the pre-activations, not with a saturated output
    z = RO.lc_forward(x, wt, b, k, s, p, "linear")
    np.testing.assert_allclose(y1, y2, atol=_tol(z), rtol=1e-5)
    dy = rng.standard_normal(y1.shape).astype(np.float32)
    g1 = [np.full_like(wt, np.nan), np.full_like(b, np.nan)]
    g2 = [np.empty_like(wt), np.empty_like(b)]
    dx1 = KO.lc_backward(x, wt, y1, dy, k, s, p, act, *g1, True)
    dx2 = RO.lc_backward(x, wt, y2, dy, k, s, p, act, *g2, True)
    for a, r in [(dx1, dx2)] + list(zip(g1, g2)):
        np.testing.assert_allclose(a, r, atol=_tol(r), rtol=1e-4)
    assert KO.lc_backward(x, wt, y1, dy, k, s, p, act, *g1, False) is None


@pytest.mark.parametrize("n,d,u", [(1, 1, 1), (3, 7, 5), (32, 130, 67), (5, 64, 1), (9, 33, 1024),
                                   (32, 40, 10),    # fewer units than samples: the direct product
                                   # thin layers (dot products; register-blocked backward where
                                   # the width is whole vectors): a softmax and its shares
                                   (32, 5408, 10), (33, 160, 5), (7, 48, 13), (2, 96, 16)])
@pytest.mark.parametrize("act", ACTS)
def test_fully_connected(n, d, u, act):
    rng = np.random.default_rng(n * 1000 + d)
    x = rng.standard_normal((n, d)).astype(np.float32)
    # pre-activations of order 1 (float32 sums of 5408 terms of order 1 differ by 1e-4)
    wt = (rng.standard_normal((u, d)) / np.sqrt(d)).astype(np.float32)
    b = rng.standard_normal(u).astype(np.float32)
    y1, y2 = KO.fc_forward(x, wt, b, act), RO.fc_forward(x, wt, b, act)
    np.testing.assert_allclose(y1, y2, atol=_tol(y2), rtol=1e-5)
    dy = rng.standard_normal(y1.shape).astype(np.float32)
    g1 = [np.full_like(wt, np.nan), np.full_like(b, np.nan)]
    g2 = [np.empty_like(wt), np.empty_like(b)]
    dx1 = KO.fc_backward(x, wt, y1, dy, act, *g1, True)
    dx2 = RO.fc_backward(x, wt, y2, dy, act, *g2, True)
    for a, r in [(dx1, dx2)] + list(zip(g1, g2)):
        np.testing.assert_allclose(a, r, atol=_tol(r), rtol=1e-4)


@pytest.mark.parametrize("ops", [KO, RO], ids=["kernels", "reference"])
@pytest.mark.parametrize("u,act", [(5, "linear"), (40, "sigmoid")])
def test_fully_connected_input_in_column_blocks(ops, u, act):
    """A partition's input as it arrives from each owner, not assembled: the same output and
    gradients as the whole input; block 2's dx not wanted; block 1 has no columns (an owner
    with none of the layer before's units); a fused SGD step (dw = w, beta)."""
    rng = np.random.default_rng(u)
    n, cuts = 9, [0, 64, 64, 96, 200]
    x = rng.standard_normal((n, cuts[-1])).astype(np.float32)
    w = rng.standard_normal((u, cuts[-1])).astype(np.float32)
    b = rng.standard_normal(u).astype(np.float32)
    blocks = [(np.ascontiguousarray(x[:, a:z]), a) for a, z in zip(cuts, cuts[1:])]
    y = ops.fc_forward_blocks(blocks, w, b, act)
    np.testing.assert_allclose(y, RO.fc_forward(x, w, b, act), atol=1e-4, rtol=1e-4)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    g = [np.empty_like(w), np.empty_like(b)]
    dx = RO.fc_backward(x, w, y, dy, act, *g, True)
    dxs = [np.full(bx.shape, np.nan, np.float32) for bx, _ in blocks]
    dxs[2] = None
    w2, b2, lr = w.copy(), b.copy(), np.float32(0.5)
    ops.fc_backward_blocks(blocks, w2, y, -lr * dy, act, w2, b2, dxs, 1.0)
    for i, (a, z) in enumerate(zip(cuts, cuts[1:])):
        if dxs[i] is not None:
            np.testing.assert_allclose(dxs[i], -lr * dx[:, a:z], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(w2, w - lr * g[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(b2, b - lr * g[1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="do not tile"):
        ops.fc_forward_blocks(blocks[::-1], w, b, act) if ops is KO else KO.fc_forward_blocks(
            blocks[:2] + blocks[3:], w, b, act)
    # a layer with no input columns at all (a partition's share of a softmax split by
    # inputs, where it has none of the input): act(b), whatever the buffers held
    empty = [(np.zeros((n, 0), np.float32), 0)]
    for _ in range(2):
        y0 = ops.fc_forward_blocks(empty, np.zeros((u, 0), np.float32), b, act)
        np.testing.assert_allclose(y0, RO.fc_forward(np.zeros((n, 1), np.float32),
                                                     np.zeros((u, 1), np.float32), b, act),
                                   atol=1e-6)


@pytest.mark.parametrize("kind", ["max", "l2"])
@pytest.mark.parametrize("n,h,w,c,size,stride", [(1, 4, 4, 1, 2, 2), (3, 7, 9, 5, 3, 2),
                                                  (2, 6, 5, 2, 2, 1), (2, 5, 5, 3, 5, 1),
                                                  (1, 10, 10, 4, 3, 3), (2, 7, 9, 16, 2, 2)])
def test_pooling(kind, n, h, w, c, size, stride):
    rng = np.random.default_rng(h * w + c)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    y1, a1 = KO.pool_forward(x, size, stride, kind)
    y2, a2 = RO.pool_forward(x, size, stride, kind)
    np.testing.assert_allclose(y1, y2, atol=1e-5, rtol=1e-5)
    dy = rng.standard_normal(y1.shape).astype(np.float32)
    np.testing.assert_allclose(KO.pool_backward(x, dy, a1, size, stride, kind),
                               RO.pool_backward(x, dy, a2, size, stride, kind), atol=1e-5, rtol=1e-5)


def _rows_of_larger(a, rng, above=2, below=1):
    """``a``'s values in rows of a larger batch: a view whose samples are strided."""
    n, h, w, c = a.shape
    big = rng.standard_normal((n, above + h + below, w, c)).astype(np.float32)
    v = big[:, above:above + h]
    v[...] = a
    return v


@pytest.mark.parametrize("ops", [KO, RO], ids=["kernels", "reference"])
@pytest.mark.parametrize("act", ["relu", "linear"])
@pytest.mark.parametrize("c", [3, 16])    # x batch-last in the kernels (short patch rows), or not
def test_strided_samples_in_and_out(ops, act, c):
    """A partition's layer reads and writes row ranges of larger regions in place: outputs
    via ``out``, and x, y, dy (and a pool's x) with strided samples, all equal to contiguous."""
    rng = np.random.default_rng(7)
    n, h, w, k, f = 5, 9, 8, 3, 8
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    wt = rng.standard_normal((h - 2, w - 2, k * k * c, f)).astype(np.float32)
    b = rng.standard_normal((h - 2, w - 2, f)).astype(np.float32)
    y = ops.lc_forward(x, wt, b, k, 1, 0, act)
    out = _rows_of_larger(np.zeros_like(y), rng)
    assert ops.lc_forward(x, wt, b, k, 1, 0, act, out=out) is out
    np.testing.assert_allclose(out, y, rtol=1e-6, atol=1e-6)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    grads = [(np.zeros_like(wt), np.zeros_like(b)) for _ in range(2)]
    dx = ops.lc_backward(x, wt, y, dy, k, 1, 0, act, *grads[0], True)
    dx2 = ops.lc_backward(x, wt, out, _rows_of_larger(dy, rng), k, 1, 0, act, *grads[1], True)
    for a, b_ in zip((dx,) + grads[0], (dx2,) + grads[1]):
        np.testing.assert_allclose(b_, a, rtol=1e-5, atol=1e-5)
    # x itself rows of a larger region (a partition's first layer reads its rows of the
    # input batch so, uncopied)
    xr = _rows_of_larger(x, rng, 2, 1)
    np.testing.assert_allclose(ops.lc_forward(xr, wt, b, k, 1, 0, act), y, rtol=1e-6, atol=1e-6)
    g3 = (np.zeros_like(wt), np.zeros_like(b))
    np.testing.assert_allclose(ops.lc_backward(xr, wt, y, dy, k, 1, 0, act, *g3, True), dx,
                               rtol=1e-5, atol=1e-5)
    for a, b_ in zip(grads[0], g3):
        np.testing.assert_allclose(b_, a, rtol=1e-5, atol=1e-5)
    for kind in ("max", "l2"):
        py, aux = ops.pool_forward(x, 2, 2, kind)
        xs = _rows_of_larger(x, rng)
        pout = _rows_of_larger(np.zeros_like(py), rng, 1, 3)
        py2, aux2 = ops.pool_forward(xs, 2, 2, kind, out=pout)
        assert py2 is pout
        np.testing.assert_allclose(py2, py, rtol=1e-6)
        pdy = rng.standard_normal(py.shape).astype(np.float32)
        np.testing.assert_allclose(
            ops.pool_backward(xs, _rows_of_larger(pdy, rng), aux2, 2, 2, kind),
            ops.pool_backward(x, pdy, aux, 2, 2, kind), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="out has shape"):
        ops.lc_forward(x, wt, b, k, 1, 0, act, out=np.zeros((n, 1, 1, f), np.float32))


@pytest.mark.parametrize("n,h,w,c,size", [(1, 1, 1, 1, 1), (2, 5, 7, 3, 3), (3, 8, 6, 16, 5),
                                          (1, 4, 3, 2, 9), (2, 9, 9, 1, 7)])
def test_lcn(n, h, w, c, size):
    rng = np.random.default_rng(h * 100 + w * 10 + c)
    x = (rng.standard_normal((n, h, w, c)) * 3 + 1).astype(np.float32)
    y1, aux1 = KO.lcn_forward(x, size, 1e-2)
    y2, aux2 = RO.lcn_forward(x, size, 1e-2)
    np.testing.assert_allclose(y1, y2, atol=1e-5, rtol=1e-4)
    for a, r in zip(aux1, aux2):
        np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-4)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_allclose(KO.lcn_backward(dy, aux1, size), RO.lcn_backward(dy, aux2, size),
                               atol=1e-5, rtol=1e-4)


def test_network_kernels_match_reference():
    spec = {"input_shape": [2, 12, 11], "l2": 1e-3, "layers": [
        {"type": "lcn", "size": 3},
        {"type": "locally_connected", "channels": 6, "kernel": 3, "stride": 2, "padding": 1},
        {"type": "lcn", "size": 5},
        {"type": "max_pool", "size": 2, "stride": 1},
        {"type": "locally_connected", "channels": 4, "kernel": 3, "activation": "tanh"},
        {"type": "l2_pool", "size": 2},
        {"type": "fully_connected", "units": 9, "activation": "sigmoid"},
        {"type": "softmax", "classes": 5}]}
    nk, nr = build(spec, backend="kernels"), build(spec, backend="reference")
    theta = nk.init_params(3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 2, 12, 11)).astype(np.float32)
    y = rng.integers(0, 5, 6)
    lk, gk = nk.loss_and_grad(theta, x, y)
    lr, gr = nr.loss_and_grad(theta, x, y)
    assert abs(lk - lr) < 1e-5 * max(1, abs(lr))
    np.testing.assert_allclose(gk, gr, atol=1e-5 * np.abs(gr).max(), rtol=1e-3)
    # the training loops' form: the gradient written into one buffer, every element of it
    buf = np.full_like(theta, np.nan)
    lo, go = nk.loss_and_grad(theta, x, y, out=buf)
    assert go is buf and lo == lk
    np.testing.assert_array_equal(go, gk)
    with pytest.raises(ValueError, match="out must be a contiguous float32 array"):
        nk.loss_and_grad(theta, x, y, out=np.empty(3, np.float32))
    # Downpour's direct pushes: the update -lr x gradient, scaled inside the backward pass
    ls, gs = nk.loss_and_grad(theta, x, y, scale=-0.25)
    assert ls == lk
    np.testing.assert_allclose(gs, -0.25 * gk, rtol=1e-5, atol=1e-7 * np.abs(gk).max())


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_update_rules_match_numpy(n, monkeypatch):
    import dbmpi.optim as O
    rng = np.random.default_rng(n)
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    for make in (lambda: O.Adagrad(n, 0.1), lambda: O.SGD(n, 0.1)):
        a, b = make(), make()
        p1, p2 = p.copy(), p.copy()
        for _ in range(3):
            a.step(p1, g)
        monkeypatch.setattr(O, "_K", None)
        for _ in range(3):
            b.step(p2, g)
        monkeypatch.undo()
        np.testing.assert_allclose(p1, p2, rtol=1e-5, atol=1e-6)
        d1, d2 = np.empty_like(p), np.empty_like(p)
        a.delta(g, d1)
        monkeypatch.setattr(O, "_K", None)
        b.delta(g, d2)
        monkeypatch.undo()
        np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-7)
    for bad in (np.nan, np.inf, -np.inf):
        q = g.copy()
        q[n // 2] = bad
        assert not O.all_finite(q)
    assert O.all_finite(g)


def test_sum_sq_in_double_without_a_copy():
    """||theta||^2 for the l2 term (dbmpi.optim.sum_sq: Network's and each partition's):
    within 1e-6 of float64 over 4M values, where a float32 dot drifts by ~3e-5, and no
    temporary; float64 and strided arrays take the numpy way."""
    import tracemalloc
    from dbmpi import optim as O
    rng = np.random.default_rng(0)
    for n in (0, 1, 255, 256, 257, 4_000_003):
        a = (rng.standard_normal(n) * 0.05).astype(np.float32)
        exact = float(a.astype(np.float64) @ a.astype(np.float64))
        assert O.sum_sq(a) == pytest.approx(exact, rel=1e-6, abs=1e-300), n
        assert O.sum_sq(a.astype(np.float64)) == pytest.approx(exact, rel=1e-12, abs=1e-300)
        assert O.sum_sq(a[::3]) == pytest.approx(float(np.sum(a[::3].astype(np.float64) ** 2)),
                                                 rel=1e-6, abs=1e-300)
    tracemalloc.start()
    O.sum_sq(a)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 1024, peak


@pytest.mark.parametrize("act,exact", [("sigmoid", lambda z: 1 / (1 + np.exp(-z))),
                                       ("tanh", np.tanh)])
def test_vectorized_activations_match_float64(act, exact):
    """The vectorized exp behind sigmoid and tanh, over its whole range (clamps, tiny inputs)."""
    z = np.concatenate([np.linspace(-120, 120, 400_001), 1e-6 * np.arange(-999, 1000),
                        [0.0, -0.0, 1e-30, 88.5, -88.5]]).astype(np.float32)
    y = KO.fc_forward(z.reshape(-1, 1), np.ones((1, 1), np.float32), np.zeros(1, np.float32),
                      act).ravel()
    r = exact(z.astype(np.float64))
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, r, rtol=1e-6, atol=3e-7)


FAULTS = """
import resource, numpy as np
from dbmpi.model import build
net = build({"input_shape": [1, 64, 64], "layers": [   # jobs/networks/lc64.toml
    {"type": "locally_connected", "channels": 16, "kernel": 5},
    {"type": "l2_pool", "size": 2},
    {"type": "locally_connected", "channels": 32, "kernel": 5},
    {"type": "l2_pool", "size": 2},
    {"type": "softmax", "classes": 10}]})
theta = net.init_params(0)
rng = np.random.default_rng(0)
x = rng.random((32, 1, 64, 64), dtype=np.float32)
y = rng.integers(0, 10, 32)
for i in range(3):
    net.loss_and_grad(theta, x, y, out=theta, scale=-1e-3, accumulate=True)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(5):
    net.loss_and_grad(theta, x, y, out=theta, scale=-1e-3, accumulate=True)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5)
"""


def test_steps_do_not_page_fault():
    """A training step's fresh buffers (MBs each) come from memory the process keeps, not
    from new pages: without dbmpi's malloc settings this loop takes ~5,000 faults a step."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True,
                       timeout=120, check=True)
    assert float(r.stdout) < 50, r.stdout


def test_parameters_gradients_and_outputs_lie_on_cache_lines():
    """Weights the kernels stream start on 64-byte lines (dbmpi.aligned): numpy's own
    placement, 16 bytes past a page, split a third of the vector loads of every weight row."""
    from dbmpi import aligned
    # from SMALL bytes up every array is placed (numpy alone lands on a 64-byte line one
    # time in four); below, numpy places it
    large = (((aligned.SMALL // 4,), np.float32), ((16385,), np.float32),
             ((300, 50), np.float64), ((20, 30, 40), np.int32), (70001, np.float32))
    small = (((4099,), np.float32), ((300, 5), np.float64), (0, np.float32), (7, np.float32))
    for (shape, dtype), placed in [(c, True) for c in large] + [(c, False) for c in small]:
        for make in (aligned.empty, aligned.zeros):
            a = make(shape, dtype)
            assert a.dtype == dtype and a.flags.c_contiguous
            assert a.shape == (shape if isinstance(shape, tuple) else (shape,))
            assert (a.nbytes >= aligned.SMALL) == placed
            if placed:
                assert aligned.is_aligned(a), (shape, dtype, a.ctypes.data % 64)
    assert not aligned.zeros((4, 4)).any()
    net = build({"input_shape": [1, 20, 20], "layers": [      # y: 83 KB
        {"type": "locally_connected", "channels": 16, "kernel": 3},
        {"type": "softmax", "classes": 3}]})
    theta = net.init_params(0)
    x = np.random.default_rng(0).random((4, 1, 20, 20), dtype=np.float32)
    _, g = net.loss_and_grad(theta, x, np.arange(4) % 3)
    assert aligned.is_aligned(theta) and aligned.is_aligned(g)
    w = net.layers[0].views(theta[net.layer_slice(0)])[0]
    assert aligned.is_aligned(w)
    y = KO.lc_forward(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), w,
                      np.zeros((18, 18, 16), np.float32), 3, 1, 0, "relu")
    assert aligned.is_aligned(y)


@pytest.mark.parametrize("add", [False, True])
def test_copy_samples_between_blocks_of_larger_batches(add):
    """The exchanges' copies: samples strided on either side, the rows around untouched;
    a block of some channels only (samples not contiguous) goes the numpy way, same result."""
    rng = np.random.default_rng(3)
    big = rng.standard_normal((5, 7, 3, 4)).astype(np.float32)
    src = rng.standard_normal((5, 9, 3, 4)).astype(np.float32)[:, 4:6]
    want = big.copy()
    want[:, 2:4] = (want[:, 2:4] + src) if add else src
    KO.copy_samples(big[:, 2:4], src, add=add)
    np.testing.assert_array_equal(big, want)
    want[:, 1:3, :, 1:3] = (want[:, 1:3, :, 1:3] + src[..., :2]) if add else src[..., :2]
    KO.copy_samples(big[:, 1:3, :, 1:3], src[..., :2], add=add)
    np.testing.assert_array_equal(big, want)
