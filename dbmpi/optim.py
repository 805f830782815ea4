"""Update rules that take gradients explicitly: ``opt.step(params, grads)``.

Used by single-process SGD, by replicas between fetches, and by parameter-server shards
(each shard holds an optimizer over its own slice, so Adagrad accumulators live there).
"""

from __future__ import annotations

import numpy as np

__all__ = ["SGD", "Adagrad", "make_optimizer", "all_finite", "sum_sq"]

try:  # one-pass Cython updates; the numpy versions below are their reference
    from . import _kernels as _K
except ImportError:  # pragma: no cover - kernels not built
    _K = None


def _fast(*arrays) -> bool:
    return _K is not None and all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)


def all_finite(g: np.ndarray) -> bool:
    """Whether every element of g is finite, without allocating."""
    if _fast(g):
        return bool(_K.all_finite(g.reshape(-1)))
    return bool(np.isfinite(g).all())


def sum_sq(a: np.ndarray) -> float:
    """||a||^2 accumulated in double, without allocating (the l2 term of a loss: a float32
    dot drifts by ~1e-5 relative over millions of values, and a float64 copy of 5M
    parameters costs more than a training step)."""
    a = np.asarray(a)
    if _fast(a):
        return float(_K.sum_sq(a.reshape(-1)))
    a = a.reshape(-1).astype(np.float64, copy=False)
    return float(np.dot(a, a))


class SGD:
    """params -= lr * grads.

    ``delta(grads, out)`` computes the step alone (``params -= out`` applies it), so a shard
    can do the arithmetic before it takes the lock that fetches wait on."""

    def __init__(self, size: int, lr: float):
        self.lr = np.float32(lr)
        self.state: dict[str, np.ndarray] = {}

    def step(self, params: np.ndarray, grads: np.ndarray) -> None:
        if _fast(params, grads):
            _K.sgd_update(params, grads, self.lr)
        else:
            params -= self.lr * grads

    def delta(self, grads: np.ndarray, out: np.ndarray, offset: int = 0) -> None:
        np.multiply(grads, self.lr, out=out)


class Adagrad:
    """Adagrad (Duchi et al. 2011), as in the DistBelief paper: each parameter's rate is
    ``lr / sqrt(sum of its squared gradients)``.  ``acc`` is kept by whoever owns the slice.
    """

    def __init__(self, size: int, lr: float, eps: float = 1e-8):
        self.lr = np.float32(lr)
        self.eps = np.float32(eps)
        self.state = {"adagrad_acc": np.zeros(size, dtype=np.float32)}
        self._tmp = np.empty(size, dtype=np.float32)  # the numpy path's scratch

    def step(self, params: np.ndarray, grads: np.ndarray) -> None:
        acc = self.state["adagrad_acc"]
        if _fast(params, grads, acc):
            _K.adagrad_update(params, acc, grads, self.lr, self.eps)
            return
        self.delta(grads, self._tmp[:len(params)])
        params -= self._tmp[:len(params)]

    def delta(self, grads: np.ndarray, out: np.ndarray, offset: int = 0) -> None:
        """Update the accumulators of elements ``offset:offset+len(grads)`` with grads and
        write the step into ``out``."""
        acc = self.state["adagrad_acc"][offset:offset + len(grads)]
        if _fast(grads, acc, out):
            _K.adagrad_delta(acc, grads, out, self.lr, self.eps)
            return
        tmp = out
        np.multiply(grads, grads, out=tmp)
        acc += tmp
        np.sqrt(acc, out=tmp)
        tmp += self.eps
        np.divide(grads, tmp, out=tmp)
        tmp *= self.lr


def make_optimizer(opt_cfg: dict, size: int):
    """The update rule an ``[optimizer]`` table asks for, over ``size`` parameters."""
    if opt_cfg.adagrad:
        return Adagrad(size, opt_cfg.learning_rate, opt_cfg.adagrad_eps)
    return SGD(size, opt_cfg.learning_rate)
