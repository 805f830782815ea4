"""Layers over a flat parameter vector.

Each layer knows its input and output shapes (channels-last ``(h, w, c)``), its parameter
shapes, and runs forward and backward through an *ops* backend: the numpy reference
(:mod:`dbmpi.model.ops_reference`) or the Cython kernels (:mod:`dbmpi.kernels`), which share
one interface.  Gradients are written into caller-provided views of the flat gradient.
"""

from __future__ import annotations

import numpy as np

from .reference import out_size

__all__ = ["Layer", "LocallyConnected", "FullyConnected", "Pool", "LCN", "Softmax", "make_layer"]


class Layer:
    kind = ""
    param_shapes: tuple = ()

    def __init__(self, index: int, spec: dict, in_shape: tuple):
        self.index = index
        self.spec = spec
        self.in_shape = tuple(in_shape)
        self.name = f"model.layers[{index}] ({spec['type']})"

    @property
    def num_params(self) -> int:
        return sum(n for n, _ in self._sizes())

    def _sizes(self):
        # (size, shape) of each parameter array, computed once: views() runs every step
        if getattr(self, "_sizes_cache", None) is None:
            self._sizes_cache = tuple((int(np.prod(s)), tuple(s)) for s in self.param_shapes)
        return self._sizes_cache

    def views(self, flat):
        """Split this layer's slice of the flat vector into arrays of ``param_shapes``."""
        out, o = [], 0
        for n, s in self._sizes():
            out.append(flat[o:o + n].reshape(s))
            o += n
        return out

    def init_scales(self) -> tuple:
        """Each parameter array's initial values: standard normal times this scale (0:
        zeros).  The values themselves come from Network.init_range."""
        return (0.0,) * len(self.param_shapes)

    def _misfit(self, why: str) -> ValueError:
        h, w, c = self.in_shape
        return ValueError(f"{self.name}: cannot take an input of shape (channels={c}, "
                          f"height={h}, width={w}): {why}")


def _weight_scale(fan_in, act):
    """He (relu) or LeCun scaling of standard normal weights."""
    return float(np.sqrt((2.0 if act == "relu" else 1.0) / fan_in))


class LocallyConnected(Layer):
    kind = "locally_connected"

    def __init__(self, index, spec, in_shape):
        super().__init__(index, spec, in_shape)
        h, w, c = self.in_shape
        self.k, self.stride, self.pad = spec["kernel"], spec["stride"], spec["padding"]
        self.act = self.back_act = spec["activation"]   # back_act: see Network.__init__
        if self.k > h + 2 * self.pad or self.k > w + 2 * self.pad:
            raise self._misfit(f"kernel {self.k} with padding {self.pad} is larger than the "
                               "input; use a smaller kernel or more padding")
        ho = out_size(h, self.k, self.stride, self.pad)
        wo = out_size(w, self.k, self.stride, self.pad)
        f = spec["channels"]
        self.out_shape = (ho, wo, f)
        self.param_shapes = ((ho, wo, self.k * self.k * c, f), (ho, wo, f))

    def init_scales(self):
        return (_weight_scale(self.param_shapes[0][2], self.act), 0.0)

    def forward(self, x, params, ops):
        w, b = params
        y = ops.lc_forward(x, w, b, self.k, self.stride, self.pad, self.act)
        return y, (x, y)

    def backward(self, dy, cache, params, grads, ops, need_dx, beta=0.0):
        x, y = cache
        return ops.lc_backward(x, params[0], y, dy, self.k, self.stride, self.pad,
                               self.back_act, grads[0], grads[1], need_dx, beta)


class FullyConnected(Layer):
    kind = "fully_connected"

    def __init__(self, index, spec, in_shape):
        super().__init__(index, spec, in_shape)
        self.inputs = int(np.prod(self.in_shape))
        self.units = spec["units"] if "units" in spec else spec["classes"]
        self.act = self.back_act = spec.get("activation", "linear")
        self.out_shape = (1, 1, self.units)
        self.param_shapes = ((self.units, self.inputs), (self.units,))

    def init_scales(self):
        return (_weight_scale(self.inputs, self.act), 0.0)

    def forward(self, x, params, ops):
        x2 = x.reshape(x.shape[0], self.inputs)
        y = ops.fc_forward(x2, params[0], params[1], self.act)
        return y.reshape(x.shape[0], 1, 1, self.units), (x2, y)

    def backward(self, dy, cache, params, grads, ops, need_dx, beta=0.0):
        x2, y = cache
        dx = ops.fc_backward(x2, params[0], y, dy.reshape(y.shape), self.back_act,
                             grads[0], grads[1], need_dx, beta)
        return None if dx is None else dx.reshape((x2.shape[0],) + self.in_shape)


class Softmax(FullyConnected):
    """Fully connected to ``classes`` linear units; the network applies softmax cross-entropy."""
    kind = "softmax"

    def init_scales(self):
        return (float(0.1 / np.sqrt(self.inputs)), 0.0)


class Pool(Layer):
    def __init__(self, index, spec, in_shape):
        super().__init__(index, spec, in_shape)
        self.kind = spec["type"]
        self.mode = "max" if self.kind == "max_pool" else "l2"
        h, w, c = self.in_shape
        self.size, self.stride = spec["size"], spec["stride"]
        if self.size > h or self.size > w:
            raise self._misfit(f"pool size {self.size} is larger than the input")
        self.out_shape = (out_size(h, self.size, self.stride), out_size(w, self.size, self.stride), c)

    def forward(self, x, params, ops):
        y, aux = ops.pool_forward(x, self.size, self.stride, self.mode)
        return y, (x, aux)

    def backward(self, dy, cache, params, grads, ops, need_dx, beta=0.0):
        if not need_dx:
            return None
        x, aux = cache
        return ops.pool_backward(x, dy, aux, self.size, self.stride, self.mode)


class LCN(Layer):
    kind = "lcn"

    def __init__(self, index, spec, in_shape):
        super().__init__(index, spec, in_shape)
        self.size, self.eps = spec["size"], spec["eps"]
        self.out_shape = self.in_shape

    def forward(self, x, params, ops):
        y, aux = ops.lcn_forward(x, self.size, self.eps)
        return y, aux

    def backward(self, dy, cache, params, grads, ops, need_dx, beta=0.0):
        return ops.lcn_backward(dy, cache, self.size) if need_dx else None


_TYPES = {"locally_connected": LocallyConnected, "fully_connected": FullyConnected,
          "max_pool": Pool, "l2_pool": Pool, "lcn": LCN, "softmax": Softmax}


def make_layer(index: int, spec: dict, in_shape: tuple) -> Layer:
    return _TYPES[spec["type"]](index, spec, in_shape)
