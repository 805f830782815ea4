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
    """A layer, and its geometry under model parallelism: a *spatial* layer is split across
    partitions by output rows (stripes), the others by output units; :meth:`input_rows`
    and :meth:`owned_params` say what a partition's share reads and owns."""
    kind = ""
    param_shapes: tuple = ()
    spatial = False

    def input_rows(self, a: int, z: int) -> tuple[int, int]:
        """The input rows that output rows [a, z) read (a spatial layer's receptive fields;
        all of them for the others)."""
        return (0, self.in_shape[0])

    def owned_params(self, a: int, z: int):
        """The parameters of output rows (spatial) or units [a, z): their blocks, as offsets
        into this layer's slice of the canonical vector, and the shapes of those blocks."""
        return [], ()

    # A partition's share (dbmpi.model.partition.Part: its output rows or units, the input
    # rows it reads) of the forward and backward pass, from the region of the input it
    # holds; the whole layer is the share of one partition.
    def forward_share(self, share, region, params, ops, n, out=None):
        """(my rows or units of the output, what backward_share needs)."""
        return self.forward(region, params, ops)

    def backward_share(self, share, dy, cache, params, grads, ops, need_dx, beta=0.0,
                       dx_targets=None):
        """My parameters' gradients into ``grads``; the gradient of the region I read."""
        return self.backward(dy, cache, params, grads, ops, need_dx, beta)

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

    spatial = True

    def init_scales(self):
        return (_weight_scale(self.param_shapes[0][2], self.act), 0.0)

    def input_rows(self, a, z):
        h, s = self.in_shape[0], self.stride
        return (max(a * s - self.pad, 0), min((z - 1) * s - self.pad + self.k, h))

    def owned_params(self, a, z):
        """Rows [a, z) of the weights (ho, wo, k k c, f) and of the bias (ho, wo, f)."""
        ho, wo, kkc, f = self.param_shapes[0]
        row_w, row_b = wo * kkc * f, wo * f
        nw = ho * row_w
        return ([(a * row_w, z * row_w), (nw + a * row_b, nw + z * row_b)],
                ((z - a, wo, kkc, f), (z - a, wo, f)))

    def forward(self, x, params, ops):
        w, b = params
        y = ops.lc_forward(x, w, b, self.k, self.stride, self.pad, self.act)
        return y, (x, y)

    def backward(self, dy, cache, params, grads, ops, need_dx, beta=0.0):
        x, y = cache
        return ops.lc_backward(x, params[0], y, dy, self.k, self.stride, self.pad,
                               self.back_act, grads[0], grads[1], need_dx, beta)

    def forward_share(self, share, region, params, ops, n, out=None):
        """Output rows [a, z) from the input rows they read (``region``); a stripe's rows
        beyond the image are its zero padding, added here (a slab) unless the stripe is
        the whole image, which the kernel pads itself."""
        h, w, c = self.in_shape
        a, z = share.rows
        if (a, z) == (0, self.out_shape[0]) and region.shape[1] == h:
            y = ops.lc_forward(region, params[0], params[1], self.k, self.stride, self.pad,
                               self.act, out=out)
            return y, (region, y, None, h)
        lo_in = a * self.stride - self.pad
        hi_in = (z - 1) * self.stride - self.pad + self.k
        top = max(lo_in, 0) - lo_in           # rows above the image are zero padding
        if self.pad == 0 and region.shape[1] == hi_in - lo_in:
            slab = region      # no padding to add: the region itself (samples may be
            #                    strided: a first layer's rows of the input batch)
        else:
            slab = np.zeros((n, hi_in - lo_in, w + 2 * self.pad, c), dtype=region.dtype)
            slab[:, top:top + region.shape[1], self.pad:self.pad + w] = region
        y = ops.lc_forward(slab, params[0], params[1], self.k, self.stride, 0, self.act,
                           out=out)
        return y, (slab, y, top, region.shape[1])

    def backward_share(self, share, dy, cache, params, grads, ops, need_dx, beta=0.0,
                       dx_targets=None):
        slab, y, top, rows = cache
        pad = self.pad if top is None else 0      # see forward_share
        dslab = ops.lc_backward(slab, params[0], y, dy, self.k, self.stride, pad,
                                self.back_act, grads[0], grads[1], need_dx, beta)
        if not need_dx or top is None:
            return dslab
        w = self.in_shape[1]
        return np.ascontiguousarray(dslab[:, top:top + rows, self.pad:self.pad + w])


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

    def owned_params(self, a, z):
        """Units [a, z): their rows of the weights (units, inputs) and of the bias."""
        u, d = self.param_shapes[0]
        return [(a * d, z * d), (u * d + a, u * d + z)], ((z - a, d), (z - a,))

    def input_params(self, c0: int, c1: int, bias: bool):
        """Input columns [c0, c1) of every unit's weights (a softmax split by its inputs),
        and the whole bias where ``bias``."""
        u, d = self.param_shapes[0]
        blocks, shapes = [(j * d + c0, j * d + c1) for j in range(u)], ((u, c1 - c0),)
        if bias:
            blocks, shapes = blocks + [(u * d, u * d + u)], shapes + ((u,),)
        return blocks, shapes

    def forward(self, x, params, ops):
        x2 = x.reshape(x.shape[0], self.inputs)
        y = ops.fc_forward(x2, params[0], params[1], self.act)
        return y.reshape(x.shape[0], 1, 1, self.units), (x2, y)

    def backward(self, dy, cache, params, grads, ops, need_dx, beta=0.0):
        x2, y = cache
        dx = ops.fc_backward(x2, params[0], y, dy.reshape(y.shape), self.back_act,
                             grads[0], grads[1], need_dx, beta)
        return None if dx is None else dx.reshape((x2.shape[0],) + self.in_shape)

    def forward_share(self, share, region, params, ops, n, out=None):
        """Units [a, z) from the whole input: a region, or column blocks as they came (a
        list; see partition.Exchange.columns); a softmax split by its inputs (``by_inputs``)
        gives partial logits of every class from its block of the input."""
        a, z = share.chans
        if share.by_inputs:
            x2 = np.ascontiguousarray(region).reshape(n, -1)
            if share.first:             # every partition has the whole input: my columns
                c0, c1 = share.cols[share.p]
                x2 = np.ascontiguousarray(x2[:, c0:c1])
            y = ops.fc_forward(x2, params[0], params[1], self.act)
            return y.reshape(n, 1, 1, z - a), (x2, y, region.shape)
        if isinstance(region, list):
            y = ops.fc_forward_blocks(region, params[0], params[1], self.act)
            return y.reshape(n, 1, 1, z - a), (region, y, None)
        x2 = region.reshape(n, -1)
        y = ops.fc_forward(x2, params[0], params[1], self.act)   # a softmax layer's is linear
        return y.reshape(n, 1, 1, z - a), (x2, y, region.shape)

    def backward_share(self, share, dy, cache, params, grads, ops, need_dx, beta=0.0,
                       dx_targets=None):
        """With column blocks, the gradient of each goes into ``dx_targets`` (None
        returned)."""
        x2, y, shape = cache
        dy2 = np.ascontiguousarray(dy.reshape(y.shape))
        if shape is None:
            ops.fc_backward_blocks(x2, params[0], y, dy2, self.back_act, grads[0], grads[1],
                                   dx_targets if need_dx else [None] * len(x2), beta)
            return None
        dx = ops.fc_backward(x2, params[0], y, dy2, self.back_act, grads[0], grads[1],
                             need_dx, beta)
        return None if dx is None else dx.reshape(shape)


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

    spatial = True

    def input_rows(self, a, z):
        return (max(a * self.stride, 0), min((z - 1) * self.stride + self.size,
                                             self.in_shape[0]))

    def forward(self, x, params, ops):
        y, aux = ops.pool_forward(x, self.size, self.stride, self.mode)
        return y, (x, aux)

    def backward(self, dy, cache, params, grads, ops, need_dx, beta=0.0):
        if not need_dx:
            return None
        x, aux = cache
        return ops.pool_backward(x, dy, aux, self.size, self.stride, self.mode)

    def forward_share(self, share, region, params, ops, n, out=None):
        y, aux = ops.pool_forward(region, self.size, self.stride, self.mode, out=out)
        return y, (region, aux)


class LCN(Layer):
    kind = "lcn"

    def __init__(self, index, spec, in_shape):
        super().__init__(index, spec, in_shape)
        self.size, self.eps = spec["size"], spec["eps"]
        self.out_shape = self.in_shape

    spatial = True

    def input_rows(self, a, z):
        """v averages x over the window, d averages v: twice the half window each side."""
        r = 2 * (self.size // 2)
        return (max(a - r, 0), min(z + r, self.in_shape[0]))

    def forward(self, x, params, ops):
        y, aux = ops.lcn_forward(x, self.size, self.eps)
        return y, aux

    def backward(self, dy, cache, params, grads, ops, need_dx, beta=0.0):
        return ops.lcn_backward(dy, cache, self.size) if need_dx else None

    def forward_share(self, share, region, params, ops, n, out=None):
        """My rows of the output, from the normalisation of the whole region I read."""
        a, z = share.rows
        y, aux = ops.lcn_forward(region, self.size, self.eps)
        off = a - share.need[share.p][0]
        return np.ascontiguousarray(y[:, off:off + (z - a)]), (aux, off, z - a, region.shape)

    def backward_share(self, share, dy, cache, params, grads, ops, need_dx, beta=0.0,
                       dx_targets=None):
        aux, off, rows, shape = cache
        if not need_dx:
            return None
        if (off, rows) == (0, shape[1]):           # all of its rows (one partition)
            dfull = dy
        else:
            dfull = np.zeros(shape, dtype=dy.dtype)
            dfull[:, off:off + rows] = dy
        return ops.lcn_backward(dfull, aux, self.size)


_TYPES = {"locally_connected": LocallyConnected, "fully_connected": FullyConnected,
          "max_pool": Pool, "l2_pool": Pool, "lcn": LCN, "softmax": Softmax}


def make_layer(index: int, spec: dict, in_shape: tuple) -> Layer:
    return _TYPES[spec["type"]](index, spec, in_shape)
