"""Plain numpy reference of every layer, forward and backward: the test oracle.

Activations are channels-last, ``(batch, height, width, channels)``, in any float dtype
(float64 for finite-difference checks).  Weight layouts are the ones the flat parameter
vector uses:

- locally connected: ``w`` of shape ``(ho, wo, k*k*c, f)`` (one filter bank per output
  location, patch flattened in ``(ky, kx, c)`` order) and ``b`` of shape ``(ho, wo, f)``;
- fully connected: ``w`` of shape ``(units, inputs)`` (a unit's weights are contiguous) and
  ``b`` of shape ``(units,)``.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["out_size", "lc_forward", "lc_backward", "fc_forward", "fc_backward",
           "pool_forward", "pool_backward", "lcn_forward", "lcn_backward",
           "act_forward", "act_backward", "softmax_xent"]


def out_size(n: int, k: int, stride: int, pad: int = 0) -> int:
    return (n + 2 * pad - k) // stride + 1


def _windows(x, k, stride, pad):
    """Patches of ``x`` as a strided view ``(n, ho, wo, k, k, c)``."""
    if pad:
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    n, h, w, c = x.shape
    ho, wo = out_size(h, k, stride), out_size(w, k, stride)
    v = sliding_window_view(x, (k, k), axis=(1, 2))  # (n, h-k+1, w-k+1, c, k, k)
    v = v[:, ::stride, ::stride][:, :ho, :wo]
    return v.transpose(0, 1, 2, 4, 5, 3)


def lc_forward(x, w, b, k, stride, pad):
    """z[n,i,j,f] = sum_p patch(x)[n,i,j,p] * w[i,j,p,f] + b[i,j,f]."""
    n = x.shape[0]
    ho, wo, kkc, f = w.shape
    p = _windows(x, k, stride, pad).reshape(n, ho * wo, kkc).transpose(1, 0, 2)
    z = np.matmul(p, w.reshape(ho * wo, kkc, f))  # (ho*wo, n, f)
    return z.transpose(1, 0, 2).reshape(n, ho, wo, f) + b


def lc_backward(x, w, dz, k, stride, pad, need_dx=True):
    """Gradients of :func:`lc_forward`: returns ``(dx, dw, db)``; dx is None if not needed."""
    n, h, wd, c = x.shape
    ho, wo, kkc, f = w.shape
    p = _windows(x, k, stride, pad).reshape(n, ho * wo, kkc).transpose(1, 0, 2)
    dzt = dz.reshape(n, ho * wo, f).transpose(1, 0, 2)  # (ho*wo, n, f)
    dw = np.matmul(p.transpose(0, 2, 1), dzt).reshape(w.shape)
    db = dz.sum(axis=0)
    if not need_dx:
        return None, dw, db
    dp = np.matmul(dzt, w.reshape(ho * wo, kkc, f).transpose(0, 2, 1))  # (ho*wo, n, kkc)
    dp = dp.transpose(1, 0, 2).reshape(n, ho, wo, k, k, c)
    dxp = np.zeros((n, h + 2 * pad, wd + 2 * pad, c), dtype=dz.dtype)
    for ky in range(k):
        for kx in range(k):
            dxp[:, ky:ky + stride * (ho - 1) + 1:stride,
                kx:kx + stride * (wo - 1) + 1:stride, :] += dp[:, :, :, ky, kx, :]
    dx = dxp[:, pad:pad + h, pad:pad + wd, :] if pad else dxp
    return dx, dw, db


def fc_forward(x, w, b):
    """z = x @ w.T + b, x of shape (n, inputs)."""
    return x @ w.T + b


def fc_backward(x, w, dz, need_dx=True):
    dw = dz.T @ x
    db = dz.sum(axis=0)
    return (dz @ w if need_dx else None), dw, db


def pool_forward(x, size, stride, kind):
    """Max or L2 pooling over size x size windows, no padding.  Returns (y, aux)."""
    v = _windows(x, size, stride, 0)  # (n, ho, wo, s, s, c)
    if kind == "max":
        n, ho, wo, _, _, c = v.shape
        flat = v.reshape(n, ho, wo, size * size, c)
        arg = flat.argmax(axis=3)
        return np.take_along_axis(flat, arg[:, :, :, None, :], axis=3)[:, :, :, 0, :], arg
    y = np.sqrt((v * v).sum(axis=(3, 4)) + _L2_POOL_EPS)
    return y, y


# Keeps the L2 pool differentiable at an all-zero window (after a relu).
_L2_POOL_EPS = 1e-6


def pool_backward(x, dy, aux, size, stride, kind):
    n, h, w, c = x.shape
    ho, wo = dy.shape[1:3]
    dx = np.zeros_like(x, dtype=dy.dtype)
    for ky in range(size):
        for kx in range(size):
            sl = (slice(None), slice(ky, ky + stride * (ho - 1) + 1, stride),
                  slice(kx, kx + stride * (wo - 1) + 1, stride), slice(None))
            if kind == "max":
                dx[sl] += dy * (aux == ky * size + kx)
            else:
                dx[sl] += dy * x[sl] / aux
    return dx


def _box(a, size):
    """Sum of ``a`` (n, h, w, 1) over size x size windows centred on each pixel, zero padded."""
    r = size // 2
    ap = np.pad(a, ((0, 0), (r + 1, r), (r + 1, r), (0, 0)))
    s = ap.cumsum(axis=1).cumsum(axis=2)
    return (s[:, size:, size:] - s[:, :-size, size:] - s[:, size:, :-size]
            + s[:, :-size, :-size])


def lcn_forward(x, size, eps):
    """Local contrast normalization over a size x size x channels window (zero padded):
    v = x - mean(x), y = v / sqrt(mean(v^2) + eps).  Returns (y, (v, d))."""
    m = float(size * size * x.shape[3])
    v = x - _box(x.sum(axis=3, keepdims=True), size) / m
    d = np.sqrt(_box((v * v).sum(axis=3, keepdims=True), size) / m + eps)
    return v / d, (v, d)


def lcn_backward(dy, aux, size):
    v, d = aux
    m = float(size * size * v.shape[3])
    # y = v / d with d = sqrt(box(sum_c v^2)/m + eps); the box filter is symmetric, so its
    # transpose is itself.
    dd = -(dy * v).sum(axis=3, keepdims=True) / (d * d)
    dv = dy / d + v * (_box(dd / d, size) / m)
    return dv - _box(dv.sum(axis=3, keepdims=True), size) / m


def act_forward(z, act):
    if act == "relu":
        return np.maximum(z, 0)
    if act == "sigmoid":
        return 1 / (1 + np.exp(-z))
    if act == "tanh":
        return np.tanh(z)
    return z


def act_backward(y, dy, act):
    """Gradient through the activation, from its output ``y``."""
    if act == "relu":
        return dy * (y > 0)
    if act == "sigmoid":
        return dy * y * (1 - y)
    if act == "tanh":
        return dy * (1 - y * y)
    return dy


def softmax_xent(z, y):
    """Mean cross-entropy of logits z (n, classes) against labels y; returns (loss, dz)."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    n = z.shape[0]
    idx = np.arange(n)
    loss = float(np.mean(np.log(s[:, 0]) - z[idx, y]))
    dz = e / s
    dz[idx, y] -= 1
    dz /= n
    return loss, dz
