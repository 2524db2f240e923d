"""Graph access for the ONNX rewrite: producers and consumers of each tensor, constants read
without loading large external weights, shape inference on a weightless copy, pruning.

Used by :mod:`kvcl.onnx.matching` (finding each layer's attention core),
:mod:`kvcl.onnx.shapes` (re-deriving shapes) and :mod:`kvcl.onnx.rewrite` (the entry point).
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from ..errors import KvclError
from .customop import OP_DOMAIN
from .modelio import tensor_dims, tensor_value

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


_LAYOUT = {"Unsqueeze", "Expand", "Reshape", "Transpose", "Squeeze", "Cast", "Identity", "Flatten"}


class RewriteError(KvclError, ValueError):
    """The model does not have a pattern the rewrite knows."""


class _Graph:
    def __init__(self, model):
        self.model = model
        self.g = model.graph
        for i, n in enumerate(self.g.node):
            if not n.name:
                n.name = f"_kvcl_node_{i}"
        self.init = {t.name: t for t in self.g.initializer}
        self.index()

    def const_dims(self, name):
        """The shape of an initializer or Constant output (without reading its data), else None."""
        if name in self.init:
            return tensor_dims(self.init[name])
        v = self.const_value(name) if self.prod.get(name) is not None else None
        return None if v is None else v.shape

    def index(self):
        self.prod = {}
        self.cons = defaultdict(list)
        for n in self.g.node:
            for o in n.output:
                if o:
                    self.prod[o] = n
            for i in n.input:
                if i:
                    self.cons[i].append(n)

    def const_value(self, name):
        """numpy value of an initializer or Constant output, else None."""
        from onnx import numpy_helper
        if name in self.init:
            return tensor_value(self.init[name])
        n = self.prod.get(name)
        if n is not None and n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name == "value_float":
                    return np.array(a.f, np.float32)
                if a.name == "value_int":
                    return np.array(a.i, np.int64)
        return None


def _attr(node, name, default=None):
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _weightless(model):
    """``model`` with its large float initializers turned into graph inputs of the same type and
    shape, for shape inference: onnx serialises the whole model to infer it (9 s and 16 s of
    the rewrite of a 600 MB export went there). Integer tensors (shapes, indices) stay."""
    import onnx
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g, src = m.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    ints = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT8, onnx.TensorProto.BOOL}
    declared = {i.name for i in src.input}   # IR < 4 lists initializers among the inputs too
    for t in src.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if (n > 1024 and t.data_type not in ints) or t.data_location == onnx.TensorProto.EXTERNAL:
            if t.name not in declared:
                g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            g.initializer.append(t)
    return m


def _infer_shapes(model) -> dict:
    """name -> list of dims (int or None) for tensors whose rank onnx shape inference knows."""
    import onnx
    out = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(_weightless(model), strict_mode=False)
    except Exception:  # pragma: no cover - inference is best effort
        return out
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return out


def _elem_types(model) -> dict:
    import onnx
    out = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(_weightless(model), strict_mode=False)
    except Exception:  # pragma: no cover
        return out
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        out[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        out[t.name] = t.data_type
    return out


def _as_initializer(G: "_Graph", name: str) -> str:
    """``name`` if it is an initializer, else an initializer holding its constant value (one per
    constant, however many layers read it)."""
    from onnx import numpy_helper
    if name in G.init:
        return name
    new_name = f"kvcl_const_{name}"
    if new_name in G.init:
        return new_name
    t = numpy_helper.from_array(np.asarray(G.const_value(name), np.float32), new_name)
    G.g.initializer.append(t)
    G.init[new_name] = t
    return new_name


def _last_dim(G: "_Graph", name: str):
    """Static last dim of ``name`` if a MatMul by a constant weight (plus bias) produced it."""
    n = G.prod.get(name)
    if n is not None and n.op_type == "Add":
        for i in n.input:
            if G.prod.get(i) is not None and G.prod[i].op_type == "MatMul":
                n = G.prod[i]
                break
    if n is not None and n.op_type == "MatMul":
        dims = G.const_dims(n.input[1])
        if dims:
            return int(dims[-1])
    return None


def _prune(g) -> None:
    """Drop nodes whose outputs reach no graph output; unused initializers too."""
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output if o):
            keep.append(n)
            needed.update(i for i in n.input if i)
            if n.domain == OP_DOMAIN:   # RoPE tables that kvcl ops name instead of reading
                needed.update(a.s.decode() for a in n.attribute if a.name in ("cos_table", "sin_table"))
            for a in n.attribute:  # subgraphs (If/Loop) read outer names
                for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    for sn in sg.node:
                        needed.update(i for i in sn.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
