"""The layer-ops interface over the numpy reference (any float dtype).

:mod:`dbmpi.kernels` implements the same functions with Cython kernels for float32; layers
call whichever the network picked.  Backward functions write the parameter gradients into
the caller's ``dw``/``db`` views (``dw = beta*dw + gradient``; beta 0 overwrites) and return
the input gradient (or None), which is computed before ``dw`` is written, so ``dw`` may be the
weights themselves (an SGD step fused into the backward pass).
"""

from . import reference as R

__all__ = ["lc_forward", "lc_backward", "fc_forward", "fc_backward", "pool_forward",
           "pool_backward", "lcn_forward", "lcn_backward", "softmax_xent"]


def lc_forward(x, w, b, k, stride, pad, act):
    return R.act_forward(R.lc_forward(x, w, b, k, stride, pad), act)


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


pool_forward = R.pool_forward
pool_backward = R.pool_backward
lcn_forward = R.lcn_forward
lcn_backward = R.lcn_backward


softmax_xent = R.softmax_xent
