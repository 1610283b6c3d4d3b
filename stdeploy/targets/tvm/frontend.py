"""The TVM front end: an export directory's unrolled ``model.onnx`` read, checked and imported into
Relax at a static input shape.

Contract: the graph has one input ``input`` of shape ``(T, B, C, H, W)`` (T, C, H, W fixed; B
fixed or dynamic) and the outputs ``logits`` ``(B, classes)`` and ``spikes`` ``(T, B, N, D)``;
anything else raises :class:`~stdeploy.targets.base.TargetError` naming the file. TVM's ONNX
frontend cannot read ONNX sparse initializers, so they are densified in a copy first (the
file is not changed). :func:`relax_module` imports at one batch size: a compiled module has a
static shape.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import ShapeError
from ..base import TargetError, read_manifest
from .sdk import load_tvm

__all__ = ["INPUT", "OUTPUTS", "OnnxGraph", "densify_sparse_initializers", "load_onnx_graph", "relax_module"]

INPUT, OUTPUTS = "input", ("logits", "spikes")


@dataclass(frozen=True)
class OnnxGraph:
    path: Path
    model: object                      # onnx.ModelProto with dense initializers only
    input_dims: tuple                  # (T, B, C, H, W); B an int or the name of the dynamic dim
    outputs: tuple[str, ...]           # graph outputs in order
    densified: tuple[str, ...] = ()    # sparse initializers made dense

    def shape(self, batch: int) -> tuple[int, ...]:
        t, b, c, h, w = self.input_dims
        if isinstance(b, int) and b != batch:
            raise ShapeError(f"{self.path}: the graph has a fixed batch of {b}, asked for {batch}")
        return (t, batch, c, h, w)


def densify_sparse_initializers(model):
    """``(model, [])`` when ``model`` has no ``graph.sparse_initializer``; else a copy with each
    one turned into a dense initializer of the same name, and the names. The input is not changed."""
    import onnx
    from onnx import numpy_helper

    if not len(model.graph.sparse_initializer):
        return model, []
    dense_model = onnx.ModelProto()
    dense_model.CopyFrom(model)
    graph = dense_model.graph
    names = []
    for sparse in graph.sparse_initializer:
        values = numpy_helper.to_array(sparse.values)
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
        dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
        if indices.ndim == 1:  # linear indices into the flattened tensor
            dense.reshape(-1)[indices] = values
        else:                  # one row of coordinates per value
            dense[tuple(indices.T)] = values
        graph.initializer.append(numpy_helper.from_array(dense, name=sparse.values.name))
        names.append(sparse.values.name)
    del graph.sparse_initializer[:]
    return dense_model, names


def _dims(value) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def load_onnx_graph(export_dir: str | os.PathLike) -> OnnxGraph:
    """Read the ``onnx`` artifact of an export directory and check its interface."""
    import onnx

    path, _ = read_manifest(export_dir, "onnx")
    try:
        model = onnx.load(str(path))
    except Exception as err:  # protobuf's DecodeError and friends: the file is not an ONNX model
        raise TargetError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from err
    model, densified = densify_sparse_initializers(model)
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    inputs = {v.name: _dims(v) for v in graph.input if v.name not in weights}
    outputs = tuple(v.name for v in graph.output)
    problems = []
    if INPUT not in inputs:
        problems.append(f"no input named {INPUT!r} (inputs: {', '.join(inputs) or 'none'})")
    elif len(inputs[INPUT]) != 5 or not all(isinstance(d, int) and d > 0 for i, d in enumerate(inputs[INPUT]) if i != 1):
        problems.append(f"input {INPUT!r} must be (T, batch, C, H, W) with T, C, H, W fixed, got {inputs[INPUT]}")
    if len(inputs) > 1:
        problems.append(f"extra inputs {sorted(set(inputs) - {INPUT})}: expected the unrolled graph (is this the streaming one?)")
    missing = [o for o in OUTPUTS if o not in outputs]
    if missing:
        problems.append(f"missing outputs {missing} (outputs: {', '.join(outputs) or 'none'})")
    if problems:
        raise TargetError(f"{path}: not an unrolled stdeploy graph: " + "; ".join(problems))
    return OnnxGraph(path=path, model=model, input_dims=tuple(inputs[INPUT]), outputs=outputs, densified=tuple(densified))


def relax_module(graph: OnnxGraph, batch: int):
    """The Relax module of ``graph`` with its input fixed at ``batch``; :class:`TargetError`
    when the frontend cannot map the graph."""
    load_tvm()
    from tvm.relax.frontend import onnx as rx_onnx

    try:
        return rx_onnx.from_onnx(graph.model, shape_dict={INPUT: list(graph.shape(batch))})
    except Exception as err:  # the frontend raises KeyError, TVMError, ... for graphs it cannot map
        raise TargetError(f"{graph.path}: TVM's ONNX frontend cannot import it ({type(err).__name__}: {err})") from err
