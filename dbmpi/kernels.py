"""The layer-ops interface over the Cython kernels (float32, channels-last).

Same functions and signatures as :mod:`dbmpi.model.ops_reference`.  This layer checks
shapes and dtypes and allocates outputs; the kernels in ``kernels/_kernels.pyx`` never raise.
Importing this module raises ImportError when the extension is not built.
"""

from __future__ import annotations

import numpy as np

from . import _kernels as K
from . import aligned
from .model import ops_reference as RO
from .model import reference as R

__all__ = ["lc_forward", "lc_backward", "fc_forward", "fc_backward", "fc_forward_blocks",
           "fc_backward_blocks", "copy_samples", "pool_forward",
           "pool_backward", "lcn_forward", "lcn_backward", "softmax_xent"]

_ACT = {"linear": 0, "relu": 1, "sigmoid": 2, "tanh": 3}
_F32 = np.float32


def _keep_freed_memory() -> bool:
    """Keep freed blocks of up to 32 MB in the process (glibc), so the buffers every step
    allocates afresh (activations, patches, input gradients) do not page-fault afresh.

    glibc maps blocks above M_MMAP_THRESHOLD straight from the kernel and unmaps them on
    free; the threshold starts at 128 KB and rises only as such blocks are freed, so a
    process that has not yet freed a large block pays the faults every step: a 10M-parameter
    locally connected network took 56 ms a step with 5,700 faults, 40 ms with none.
    Fixing the thresholds also stops the heap's top being trimmed back to the kernel.
    Set DBMPI_MALLOC_TUNING=0 to leave malloc alone."""
    import ctypes
    import os
    if os.environ.get("DBMPI_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 256 << 20))


_keep_freed_memory()
_VW = K.VECTOR_WIDTH
_RB = K.ROW_BLOCK


def _flat(a, name):
    if a.dtype != _F32:
        raise TypeError(f"{name} must be float32, not {a.dtype}")
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a.reshape(-1)


def _samples(a, name, out=False):
    """(flat, stride): a 1-D view from ``a``'s first element and the elements between its
    samples, for an array whose every sample is contiguous (rows of a larger batch: a
    partition's share of a region, say).  Others are copied; ``out`` arrays cannot be."""
    if a.dtype != _F32:
        raise TypeError(f"{name} must be float32, not {a.dtype}")
    n, per = a.shape[0], a[0].size if a.shape[0] else 0
    if a.flags.c_contiguous:
        return a.reshape(-1), per
    if n > 1 and a[0].flags.c_contiguous and a.strides[0] > 0 and a.strides[0] % a.itemsize == 0:
        st = a.strides[0] // a.itemsize
        return np.lib.stride_tricks.as_strided(a, ((n - 1) * st + per,), (a.itemsize,)), st
    if out:
        raise ValueError(f"{name}: each sample must be contiguous, not strides {a.strides}")
    return np.ascontiguousarray(a).reshape(-1), per


def copy_samples(dst, src, add=False):
    """dst[...] = src, or += src, for (n, h, w, c) arrays whose samples are each contiguous
    (rows of larger batches: the blocks a partition exchanges); others go to numpy.  One
    pass: numpy took 2-4x as long for such strided copies and in-place adds (it buffers an
    in-place add whose operands it cannot prove apart)."""
    if not (dst.dtype == src.dtype == _F32 and dst.ndim == src.ndim == 4
            and K.copy_samples(src, dst, add)):
        RO.copy_samples(dst, src, add)


def _lc_dims(x, w, k, stride, pad):
    n, h, wd, c = x.shape
    ho, wo, kkc, f = w.shape
    if kkc != k * k * c or ho != R.out_size(h, k, stride, pad) or wo != R.out_size(wd, k, stride, pad):
        raise ValueError(f"locally connected: weights {w.shape} do not fit input {x.shape} "
                         f"with kernel {k}, stride {stride}, padding {pad}")
    return n, h, wd, c, ho, wo, f


def _lc_plan(n, h, wd, c, k, pad, f, backward=False):
    """Buffers' batch padding, and whether the kernels read x batch-last (see lc_forward_c):
    with padding, or with patch rows too short for full row blocks; and in the backward
    pass, when the samples lie a multiple of 4 KB apart.  The weight gradient's product
    runs over the batch, reading one line of each sample per step, and at such strides all
    the lines fall in one L1 set (8 ways) and evict each other: batch-last was 3-13% faster
    there for 16 channels (32x32 and 64x64 inputs), and equal elsewhere."""
    npad = -(-n // _VW) * _VW
    batch_last = f % _VW == 0 and (pad > 0 or k * c < 2 * _RB
                                   or (backward and h * wd * c % 1024 == 0))
    xt = (aligned.zeros((h + 2 * pad) * (wd + 2 * pad) * c * npad) if batch_last
          else np.empty(1, dtype=_F32))
    p = aligned.empty(k * k * c * (npad if batch_last else n))
    return npad, batch_last, xt, p


def _out(out, shape):
    """The output array: ``out`` (checked; samples may be strided) or a new one."""
    if out is None:
        return aligned.empty(shape, _F32)
    if out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, the output is {shape}")
    return out


def lc_forward(x, w, b, k, stride, pad, act, out=None):
    n, h, wd, c, ho, wo, f = _lc_dims(x, w, k, stride, pad)
    y = _out(out, (n, ho, wo, f))
    yf, ys = _samples(y, "out", out=True)
    xf, xs = _samples(x, "x")
    npad, batch_last, xt, p = _lc_plan(n, h, wd, c, k, pad, f)
    K.lc_forward(xf, xs, xt, _flat(w, "w"), _flat(b, "b"), yf, ys, p, n, npad,
                 h, wd, c, k, stride, pad, ho, wo, f, _ACT[act], batch_last)
    return y


def lc_backward(x, w, y, dy, k, stride, pad, act, dw, db, need_dx, beta=0.0):
    n, h, wd, c, ho, wo, f = _lc_dims(x, w, k, stride, pad)
    if dy.shape != y.shape:
        raise ValueError(f"locally connected: gradient {dy.shape} does not match output {y.shape}")
    xf, xs = _samples(x, "x")
    dyf, dys = _samples(dy, "dy")
    yf, ys = _samples(y, "y")
    dz = aligned.empty(n * (wo * f + 16))   # an output row's dz (see lc_backward_c)
    npad, batch_last, xt, p = _lc_plan(n, h, wd, c, k, pad, f, backward=True)
    if need_dx:     # the input gradient is accumulated batch-last (see lc_backward_c)
        dx = aligned.empty((n, h, wd, c))
        dxt = aligned.zeros((h + 2 * pad) * (wd + 2 * pad) * c * npad)
        dzt = aligned.zeros(f * npad)
    else:
        dx = dxt = dzt = np.empty(1, dtype=_F32)
    dwf, dbf = dw.reshape(-1), db.reshape(-1)  # views into the flat gradient
    K.lc_backward(xf, xs, xt, _flat(w, "w"), yf, ys, dyf, dys, dz, dxt, dx.reshape(-1), dwf,
                  dbf, p, dzt, n, npad, h, wd, c, k, stride, pad, ho, wo, f, _ACT[act],
                  need_dx, batch_last, beta)
    return dx if need_dx else None


def fc_forward(x, w, b, act):
    return fc_forward_blocks([(x, 0)], w, b, act)


def _fc_blocks(blocks, w):
    """Check that the column blocks [(x (n, d_i), first column)] tile w's columns."""
    n, (u, d) = blocks[0][0].shape[0], w.shape
    col = 0
    for x, c0 in blocks:
        if x.ndim != 2 or x.shape[0] != n or c0 != col:
            raise ValueError(f"fully connected: input blocks {[(x.shape, c) for x, c in blocks]} "
                             f"do not tile the {d} input columns of weights {w.shape}")
        col += x.shape[1]
    if col != d:
        raise ValueError(f"fully connected: weights {w.shape} do not fit input blocks of "
                         f"{col} columns in all")
    return n, u, d


def fc_forward_blocks(blocks, w, b, act):
    """act(x @ w^T + b) where x's columns come as blocks [(x_i (n, d_i), first column)] in
    order (a partition's input as it arrives from each owner): no x is assembled."""
    n, u, d = _fc_blocks(blocks, w)
    y = aligned.empty((n, u))
    yt = aligned.empty(n * u)            # the transposed product (see the kernel)
    wf = _flat(w, "w")
    first = True
    for x, c0 in blocks:
        if x.shape[1] == 0:              # an owner with no columns adds nothing
            continue
        K.fc_product(_flat(x, "x"), wf, c0, d, y.reshape(-1), yt, n, x.shape[1], u,
                     0.0 if first else 1.0)
        first = False
    if first:                            # no columns at all (a partition's empty share)
        y[...] = 0
        yt[...] = 0
    K.fc_finish(_flat(b, "b"), y.reshape(-1), yt, n, u, _ACT[act])
    return y


def fc_backward(x, w, y, dy, act, dw, db, need_dx, beta=0.0):
    dx = aligned.empty(x.shape) if need_dx else None
    fc_backward_blocks([(x, 0)], w, y, dy, act, dw, db, [dx], beta)
    return dx


def fc_backward_blocks(blocks, w, y, dy, act, dw, db, dxs, beta=0.0):
    """The backward pass of fc_forward_blocks: the input gradient of block i into dxs[i]
    (contiguous, x_i's shape; None: not wanted), the parameters' as for fc_backward."""
    n, u, d = _fc_blocks(blocks, w)
    dyf = _flat(dy, "dy")
    dz = dyf if act == "linear" else aligned.empty(n * u)    # only read after this
    dwf, none = _contiguous_view(dw, "dw"), np.empty(1, dtype=_F32)
    K.fc_dz(_flat(y, "y"), dyf, dz, _contiguous_view(db, "db"), n, u, _ACT[act], beta)
    wf = _flat(w, "w")
    for (x, c0), dx in zip(blocks, dxs):
        if dx is not None and (dx.shape != x.shape or not dx.flags.c_contiguous
                               or dx.dtype != _F32):
            raise ValueError(f"fully connected: dx must be contiguous float32 {x.shape}")
        if x.shape[1] == 0:              # no columns: no gradient to write
            continue
        K.fc_backward_block(_flat(x, "x"), wf, dwf, c0, d, dz,
                            none if dx is None else dx.reshape(-1), n, x.shape[1], u,
                            dx is not None, beta)


def _contiguous_view(a, name):
    """a as 1-D, written through: a gradient view the kernel writes into."""
    if a.dtype != _F32 or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a contiguous float32 view, got {a.dtype} {a.shape}")
    return a.reshape(-1)


def pool_forward(x, size, stride, kind, out=None):
    n, h, w, c = x.shape
    ho, wo = R.out_size(h, size, stride), R.out_size(w, size, stride)
    y = _out(out, (n, ho, wo, c))
    xf, xs = _samples(x, "x")
    yf, ys = _samples(y, "out", out=True)
    if kind == "max":
        arg = np.empty((n, ho, wo, c), dtype=np.intc)
        K.max_pool(xf, xs, yf, ys, arg.reshape(-1), n, h, w, c, size, stride, ho, wo)
        return y, arg
    K.l2_pool(xf, xs, yf, ys, n, h, w, c, size, stride, ho, wo, R._L2_POOL_EPS)
    return y, y


def pool_backward(x, dy, aux, size, stride, kind):
    n, h, w, c = x.shape
    ho, wo = dy.shape[1:3]
    tiled = stride == size        # every covered element written once: no zeroing first
    dx = (aligned.empty if tiled else aligned.zeros)(x.shape)
    if tiled:
        dx[:, ho * size:] = 0     # the rows and columns no window covers
        dx[:, :ho * size, wo * size:] = 0
    dyf, dys = _samples(dy, "dy")
    if kind == "max":
        K.max_pool_back(dyf, dys, np.ascontiguousarray(aux).reshape(-1), dx.reshape(-1), n,
                        h, w, c, size, stride, ho, wo, tiled)
    else:
        (xf, xs), (yf, ys) = _samples(x, "x"), _samples(aux, "y")
        K.l2_pool_back(xf, xs, yf, ys, dyf, dys, dx.reshape(-1), np.empty(c, dtype=_F32), n,
                       h, w, c, size, stride, ho, wo, tiled)
    return dx


def softmax_xent(z, y):
    """Mean cross-entropy of float32 logits z (n, classes) against labels y; (loss, dz)."""
    n, k = z.shape
    dz = np.empty((n, k), dtype=_F32)
    loss = K.softmax_xent(_flat(z, "z"), np.ascontiguousarray(y, dtype=np.intp), dz.reshape(-1),
                          n, k)
    return loss, dz


def lcn_forward(x, size, eps):
    """As the reference: (y, (v, d)), v = x - local mean, d = local norm (n, h, w, 1)."""
    n, h, w, c = x.shape
    y, v = aligned.empty((n, h, w, c)), aligned.empty((n, h, w, c))
    d = aligned.empty((n, h, w, 1))
    K.lcn_forward(_flat(x, "x"), y.reshape(-1), v.reshape(-1), d.reshape(-1),
                  np.empty(3 * h * w, dtype=_F32), n, h, w, c, size, eps)
    return y, (v, d)


def lcn_backward(dy, aux, size):
    v, d = aux
    n, h, w, c = v.shape
    dx = aligned.empty((n, h, w, c))
    K.lcn_backward(_flat(dy, "dy"), _flat(v, "v"), _flat(d, "d"), dx.reshape(-1),
                   np.empty(3 * h * w, dtype=_F32), n, h, w, c, size)
    return dx
