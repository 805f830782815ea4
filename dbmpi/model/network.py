"""A network over one flat parameter vector: the Python API of the README."""

from __future__ import annotations

import numpy as np

from .. import aligned
from ..config import check_model
from ..optim import sum_sq
from . import ops_reference
from .initializer import normals
from .layers import make_layer

__all__ = ["Network", "build", "kernel_ops"]


def kernel_ops():
    """The Cython kernel ops module, or None when the extensions are not built."""
    try:
        from .. import kernels
    except ImportError:
        return None
    return kernels


class Network:
    """A feed-forward network whose parameters live in one flat vector.

    Parameters
    ----------
    spec : dict
        The ``[model]`` table of a config.
    backend : {"auto", "kernels", "reference"}
        "auto" uses the Cython kernels for float32 when they are built, else the numpy
        reference; float64 always runs on the reference.
    """

    def __init__(self, spec: dict, backend: str = "auto"):
        self.spec = check_model(spec)
        c, h, w = self.spec["input_shape"]
        self.input_shape = (c, h, w)
        shape = (h, w, c)
        self.layers, self.offsets = [], [0]
        for i, ls in enumerate(self.spec["layers"]):
            layer = make_layer(i, ls, shape)
            self.layers.append(layer)
            self.offsets.append(self.offsets[-1] + layer.num_params)
            shape = layer.out_shape
        for layer, above in zip(self.layers, self.layers[1:]):
            if getattr(layer, "act", None) == "relu" and above.kind == "l2_pool":
                # the L2 pool's input gradient, dy * x / y, is already 0 wherever relu output
                # x is 0, so relu's backward would change nothing: skip its pass over the
                # layer's output (the largest activation of a DistBelief-style stage)
                layer.back_act = "linear"
        self.classes = self.layers[-1].units
        self.l2 = self.spec["l2"]
        if backend not in ("auto", "kernels", "reference"):
            raise ValueError(f"backend {backend!r}: use auto, kernels or reference")
        kops = kernel_ops() if backend != "reference" else None
        if backend == "kernels" and kops is None:
            raise ImportError("the Cython kernels are not built: run `pip install -e .` "
                              "(or `python setup.py build_ext --inplace`)")
        self._kernel_ops = kops

    @property
    def num_params(self) -> int:
        return self.offsets[-1]

    def layer_slice(self, i: int) -> slice:
        return slice(self.offsets[i], self.offsets[i + 1])

    def init_params(self, seed: int = 0) -> np.ndarray:
        return self.init_range(seed, 0, self.num_params)

    def init_range(self, seed: int, lo: int, hi: int, out=None) -> np.ndarray:
        """``init_params(seed)[lo:hi]`` (into ``out`` if given), computed without the rest:
        every value depends only on the seed and its position (dbmpi.model.initializer),
        so a partition or a shard initialises just its slice."""
        if not 0 <= lo <= hi <= self.num_params:
            raise ValueError(f"parameter range [{lo}, {hi}) is outside [0, {self.num_params})")
        if out is None:
            out = aligned.empty(hi - lo)             # see dbmpi.aligned
        for i, layer in enumerate(self.layers):
            start = self.offsets[i]
            for j, ((n, _), scale) in enumerate(zip(layer._sizes(), layer.init_scales())):
                a, z = max(lo, start), min(hi, start + n)
                if a < z and scale:          # array j of layer i: its own stream
                    normals((seed, i, j), a - start, z - a, out[a - lo:z - lo], scale)
                elif a < z:
                    out[a - lo:z - lo] = 0
                start += n
        return out

    # -- checks ------------------------------------------------------------------------
    def _ops(self, dtype):
        return self._kernel_ops if (dtype == np.float32 and self._kernel_ops) else ops_reference

    def _check(self, theta, x, y=None):
        theta = np.asarray(theta)
        if theta.ndim != 1 or theta.shape[0] != self.num_params:
            raise ValueError(f"theta has shape {theta.shape}; this network needs "
                             f"({self.num_params},)")
        if theta.dtype not in (np.float32, np.float64):
            theta = theta.astype(np.float32)
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"model.input_shape: x has shape {tuple(x.shape)}, expected "
                             f"(batch, {', '.join(map(str, self.input_shape))})")
        # channels-last, in theta's dtype, contiguous
        xh = np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=theta.dtype)
        if y is not None:
            y = np.asarray(y)
            if y.shape != (x.shape[0],):
                raise ValueError(f"y has shape {y.shape}, expected ({x.shape[0]},)")
            y = y.astype(np.intp, copy=False)
            # one pass: a negative label is a huge unsigned one
            if y.size and (y.view(np.uintp) >= self.classes).any():
                raise ValueError(f"labels must be in [0, {self.classes}); got "
                                 f"{int(y.min())}..{int(y.max())}")
        return theta, xh, y

    # -- compute -----------------------------------------------------------------------
    def _forward(self, theta, xh, ops):
        caches, params = [], []
        a = xh
        for i, layer in enumerate(self.layers):
            p = layer.views(theta[self.layer_slice(i)])
            a, cache = layer.forward(a, p, ops)
            caches.append(cache)
            params.append(p)
        return a.reshape(a.shape[0], self.classes), caches, params

    def logits(self, theta, x):
        theta, xh, _ = self._check(theta, x)
        return self._forward(theta, xh, self._ops(theta.dtype))[0]

    def loss_and_grad(self, theta, x, y, out=None, scale=1.0, accumulate=False):
        """Mean cross-entropy (+ l2/2 ||theta||^2) and its gradient times ``scale``, in
        theta's dtype.

        ``out``: an array like theta to write the gradient into (and return); training
        loops pass one buffer for every step: a fresh array of more than 32 MB costs its
        page faults again each step (3.6 ms for 40 MB here).  ``scale`` multiplies the
        top gradient before the backward pass, so ``-learning_rate`` gives the update itself
        with no extra pass over the parameters.  ``accumulate``: add to ``out`` instead of
        overwriting it; ``out`` may then be theta itself, and ``out=theta,
        scale=-learning_rate, accumulate=True`` is one SGD step fused into the backward
        pass (see :func:`_accumulate_beta`).  The loss is always theta's before any step."""
        theta, xh, y = self._check(theta, x, y)
        ops = self._ops(theta.dtype)
        z, caches, params = self._forward(theta, xh, ops)
        loss, dz = ops.softmax_xent(z, y)
        if scale != 1.0:
            dz *= dz.dtype.type(scale)
        grad = _grad_buffer(out, theta, accumulate)
        if self.l2:
            loss += 0.5 * self.l2 * sum_sq(theta)
        beta, inplace = _accumulate_beta(grad, theta, accumulate, scale, self.l2)
        d = dz.reshape(dz.shape[0], 1, 1, self.classes)
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            g = layer.views(grad[self.layer_slice(i)])
            d = layer.backward(d, caches[i], params[i], g, ops, need_dx=i > 0, beta=beta)
        if self.l2 and not inplace:
            grad += (scale * self.l2) * theta
        return loss, grad

    def predict(self, theta, x, batch: int = 1024) -> np.ndarray:
        x = np.asarray(x)
        out = [self.logits(theta, x[i:i + batch]).argmax(axis=1) for i in range(0, len(x), batch)]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.intp)

    def evaluate(self, theta, x, y, batch: int = 1024) -> dict:
        """Mean loss, accuracy and objective (loss + l2 term) over (x, y), in batches."""
        from .reference import softmax_xent
        n = len(y)
        total, correct = 0.0, 0
        for i in range(0, n, batch):
            z = self.logits(theta, x[i:i + batch])
            yb = np.asarray(y[i:i + batch], dtype=np.intp)
            total += softmax_xent(z.astype(np.float64), yb)[0] * len(yb)
            correct += int((z.argmax(axis=1) == yb).sum())
        loss = total / max(n, 1)
        obj = loss + 0.5 * self.l2 * sum_sq(theta)
        return {"loss": loss, "accuracy": correct / max(n, 1), "objective": obj}


def build(spec: dict, backend: str = "auto") -> Network:
    """Build a :class:`Network` from the ``[model]`` table of a config."""
    return Network(spec, backend)


def _grad_buffer(out, theta, accumulate=False):
    """``out`` checked to fit theta, or a new array (only when overwriting: accumulating
    needs something to add to)."""
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True adds to out: pass out (theta itself for an "
                             "SGD step, or a zeroed array)")
        return aligned.empty_like(theta)
    if out.shape != theta.shape or out.dtype != theta.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous {theta.dtype} array of shape {theta.shape}; "
                         f"got {out.dtype} {out.shape}")
    return out


def _accumulate_beta(grad, theta, accumulate, scale, l2):
    """The layers' ``beta`` (their parameter gradients become ``beta*grad + gradient``) and
    whether the gradient lands in theta itself.

    In place (grad is theta), each layer takes its input gradient before its weights change,
    and the l2 term's gradient, ``scale*l2*theta``, becomes beta = 1 + scale*l2: a decay of
    the weights in the same pass."""
    if not accumulate:
        return 0.0, False
    if not np.shares_memory(grad, theta):
        return 1.0, False
    if grad.ctypes.data != theta.ctypes.data:
        raise ValueError("out overlaps theta without being theta; pass theta itself or a "
                         "separate array")
    return 1.0 + scale * l2, True
