"""The layer-ops interface over the numpy reference (any float dtype).

:mod:`dbmpi.kernels` implements the same functions with Cython kernels for float32; layers
call whichever the network picked.  Forward functions of the spatial layers take ``out``,
where to put the output (its samples may be rows of a larger batch, as a partition's share
of a region is); backward functions take such strided samples too.  Backward functions
write the parameter gradients into the caller's ``dw``/``db`` views (``dw = beta*dw +
gradient``; beta 0 overwrites) and return the input gradient (or None), which is computed
before ``dw`` is written, so ``dw`` may be the weights themselves (an SGD step fused into
the backward pass).
"""

import numpy as np

from . import reference as R

__all__ = ["lc_forward", "lc_backward", "fc_forward", "fc_backward", "fc_forward_blocks",
           "fc_backward_blocks", "copy_samples", "pool_forward",
           "pool_backward", "lcn_forward", "lcn_backward", "softmax_xent"]


def _into(out, y):
    """y, or y copied into ``out`` (the kernels write there directly)."""
    if out is None:
        return y
    if out.shape != y.shape:
        raise ValueError(f"out has shape {out.shape}, the output is {y.shape}")
    out[...] = y
    return out


def lc_forward(x, w, b, k, stride, pad, act, out=None):
    return _into(out, R.act_forward(R.lc_forward(x, w, b, k, stride, pad), act))


def _store(out, value, beta):
    if beta == 0:
        out[...] = value
    else:
        out *= beta
        out += value


def lc_backward(x, w, y, dy, k, stride, pad, act, dw, db, need_dx, beta=0.0):
    dz = R.act_backward(y, dy, act)
    dx, dw_, db_ = R.lc_backward(x, w, dz, k, stride, pad, need_dx)
    _store(dw, dw_, beta)
    _store(db, db_, beta)
    return dx


def fc_forward(x, w, b, act):
    return R.act_forward(R.fc_forward(x, w, b), act)


def fc_backward(x, w, y, dy, act, dw, db, need_dx, beta=0.0):
    dz = R.act_backward(y, dy, act)
    dx, dw_, db_ = R.fc_backward(x, w, dz, need_dx)
    _store(dw, dw_, beta)
    _store(db, db_, beta)
    return dx


def fc_forward_blocks(blocks, w, b, act):
    """fc_forward with x's columns given as blocks [(x_i, first column)], in order."""
    z = b + sum(x @ w[:, c0:c0 + x.shape[1]].T for x, c0 in blocks)
    return R.act_forward(z.astype(w.dtype, copy=False), act)


def fc_backward_blocks(blocks, w, y, dy, act, dw, db, dxs, beta=0.0):
    """fc_backward for fc_forward_blocks: block i's input gradient into dxs[i] (or None)."""
    dz = R.act_backward(y, dy, act)
    for (x, c0), dx in zip(blocks, dxs):
        if dx is not None:
            dx[...] = dz @ w[:, c0:c0 + x.shape[1]]
    for x, c0 in blocks:
        _store(dw[:, c0:c0 + x.shape[1]], dz.T @ x, beta)
    _store(db, dz.sum(axis=0), beta)


def copy_samples(dst, src, add=False):
    """dst[...] = src, or += src (the blocks a partition's exchanges move)."""
    if add:
        dst += src
    else:
        np.copyto(dst, src)


def pool_forward(x, size, stride, kind, out=None):
    y, aux = R.pool_forward(x, size, stride, kind)
    y = _into(out, y)
    return y, (y if kind == "l2" else aux)


pool_backward = R.pool_backward
lcn_forward = R.lcn_forward
lcn_backward = R.lcn_backward


softmax_xent = R.softmax_xent
