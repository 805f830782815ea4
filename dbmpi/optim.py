"""Update rules that take gradients explicitly: ``opt.step(params, grads)``.

Used by single-process SGD, by replicas between fetches, and by parameter-server shards
(each shard holds an optimizer over its own slice, so Adagrad accumulators live there).
"""

from __future__ import annotations

import numpy as np

__all__ = ["SGD", "Adagrad", "make_optimizer"]


class SGD:
    """params -= lr * grads."""

    def __init__(self, size: int, lr: float):
        self.lr = np.float32(lr)
        self.state: dict[str, np.ndarray] = {}

    def step(self, params: np.ndarray, grads: np.ndarray) -> None:
        params -= self.lr * grads


class Adagrad:
    """Adagrad (Duchi et al. 2011), as in the DistBelief paper: each parameter's rate is
    ``lr / sqrt(sum of its squared gradients)``.  ``acc`` is kept by whoever owns the slice.
    """

    def __init__(self, size: int, lr: float, eps: float = 1e-8):
        self.lr = np.float32(lr)
        self.eps = np.float32(eps)
        self.state = {"adagrad_acc": np.zeros(size, dtype=np.float32)}
        self._tmp = np.empty(size, dtype=np.float32)

    def step(self, params: np.ndarray, grads: np.ndarray) -> None:
        acc, tmp = self.state["adagrad_acc"], self._tmp[:len(params)]
        np.multiply(grads, grads, out=tmp)
        acc += tmp
        np.sqrt(acc, out=tmp)
        tmp += self.eps
        np.divide(grads, tmp, out=tmp)
        tmp *= self.lr
        params -= tmp


def make_optimizer(opt_cfg: dict, size: int):
    """The update rule an ``[optimizer]`` table asks for, over ``size`` parameters."""
    if opt_cfg["adagrad"]:
        return Adagrad(size, opt_cfg["learning_rate"], opt_cfg["adagrad_eps"])
    return SGD(size, opt_cfg["learning_rate"])
