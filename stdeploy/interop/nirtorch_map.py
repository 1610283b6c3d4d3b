"""A public nirtorch node map for stdeploy's NIR graphs: ``nirtorch.nir_to_torch(graph, node_map(graph))``.

nirtorch 2.6's default map has no neurons, its ``Affine`` entry never sets the bias, and its
``Flatten`` counts the batch dim as NIR's ``start_dim`` does not; this map fixes all three and
runs every primitive either dialect writes (:mod:`stdeploy.export.nir_portable`, the default for
other frameworks, and :mod:`stdeploy.export.nir_export`'s) in the same float order as the PyTorch
model, so the spikes are the model's:

* ``LIF``: ``d = float32(dt/tau)`` with ``dt`` from ``graph.metadata["dt"]``;
  ``v = (1-d)*v + d*(r*I + v_leak)`` (written ``(1-d)*v + d*I`` when ``r = 1, v_leak = 0``, the
  model's order); spike where ``v > v_threshold``; spiking neurons go to ``v_reset``. State: the
  membrane, kept by nirtorch's executor (``module(x, state) -> (spikes, state)``).
* ``Affine``/``Linear`` (2-D or batched weights), ``Conv1d``, ``Conv2d``, ``SumPool2d``,
  ``Threshold`` (``x > threshold``), ``Flatten`` (NIR dims, the batch dim added).

Graphs with more than one Output node hang nirtorch 2.6's graph construction: export one output.
"""

from __future__ import annotations

from typing import Callable

import nir
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StdeployError

__all__ = ["node_map", "load", "NirLIF", "graph_dt"]


def graph_dt(graph: nir.NIRGraph, dt: float | None = None) -> float:
    """The time step: ``dt`` if given, else ``graph.metadata["dt"]``; refused when neither is known."""
    if dt is None:
        meta = graph.metadata if isinstance(graph.metadata, dict) else {}
        if "dt" not in meta:
            raise StdeployError("the NIR graph has no 'dt' in its metadata: give the time step in seconds")
        dt = float(np.asarray(meta["dt"]))
    if not dt > 0:
        raise StdeployError(f"dt must be > 0, got {dt}")
    return float(dt)


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


class NirLIF(nn.Module):
    """NIR's LIF in discrete time with step ``dt`` (see the module docstring)."""

    def __init__(self, node: nir.LIF, dt: float):
        super().__init__()
        self.register_buffer("d", torch.as_tensor((dt / np.asarray(node.tau, np.float64)).astype(np.float32)))
        self.register_buffer("r", _t(node.r))
        self.register_buffer("v_leak", _t(node.v_leak))
        self.register_buffer("v_threshold", _t(node.v_threshold))
        self.register_buffer("v_reset", _t(node.v_reset))
        self.plain = bool(np.all(np.asarray(node.r) == 1) and np.all(np.asarray(node.v_leak) == 0))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        v = torch.zeros_like(x) if state is None else state
        drive = x if self.plain else self.r * x + self.v_leak
        v = (1 - self.d) * v + self.d * drive
        s = v > self.v_threshold
        return s.to(x.dtype), torch.where(s, self.v_reset.expand_as(v), v)


class _Batched(nn.Module):
    """``Affine``/``Linear`` on the last dim; weights ``(..., out, in)`` batched over leading dims."""

    def __init__(self, weight, bias):
        super().__init__()
        self.register_buffer("weight", _t(weight))
        self.register_buffer("bias", None if bias is None else _t(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dim() == 2:
            return F.linear(x, self.weight, self.bias)
        y = torch.matmul(self.weight, x.unsqueeze(-1)).squeeze(-1)
        return y if self.bias is None else y + self.bias


class _Conv(nn.Module):
    def __init__(self, node, fn):
        super().__init__()
        self.register_buffer("weight", _t(node.weight))
        self.register_buffer("bias", _t(node.bias))
        n = self.weight.dim() - 2
        pad = node.padding
        self.padding = pad.decode() if isinstance(pad, bytes) else pad if isinstance(pad, str) else _tuple(pad, n)
        self.stride, self.dilation, self.groups, self.fn = _tuple(node.stride, n), _tuple(node.dilation, n), int(node.groups), fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _tuple(v, n: int) -> tuple[int, ...]:
    a = np.atleast_1d(np.asarray(v)).astype(int)
    return tuple(int(i) for i in (np.repeat(a, n) if a.size == 1 else a))


class _SumPool(nn.Module):
    def __init__(self, node: nir.SumPool2d):
        super().__init__()
        self.k, self.s, self.p = _tuple(node.kernel_size, 2), _tuple(node.stride, 2), _tuple(node.padding, 2)

    def forward(self, x):
        return F.avg_pool2d(x, self.k, self.s, self.p, count_include_pad=True, divisor_override=1)


class _Threshold(nn.Module):
    def __init__(self, node: nir.Threshold):
        super().__init__()
        self.register_buffer("threshold", _t(node.threshold))

    def forward(self, x):
        return (x > self.threshold).to(x.dtype)


class _Flatten(nn.Module):
    def __init__(self, node: nir.Flatten):
        super().__init__()
        self.start, self.end = int(node.start_dim), int(node.end_dim)

    def forward(self, x):
        nd = x.dim() - 1
        return x.flatten(self.start % nd + 1, self.end % nd + 1)


def node_map(graph: nir.NIRGraph | None = None, *, dt: float | None = None) -> dict[type, Callable[[nir.NIRNode], nn.Module]]:
    """``{NIR node type: fn(node) -> module}`` for ``nirtorch.nir_to_torch``; the LIF time step is
    ``dt`` or ``graph.metadata["dt"]``."""
    if graph is not None:
        step = graph_dt(graph, dt)
    elif dt is None or not dt > 0:
        raise StdeployError(f"node_map needs the graph or a time step dt > 0, got dt={dt}")
    else:
        step = float(dt)
    return {
        nir.Input: lambda n: nn.Identity(),
        nir.Output: lambda n: nn.Identity(),
        nir.LIF: lambda n: NirLIF(n, step),
        nir.Affine: lambda n: _Batched(n.weight, n.bias),
        nir.Linear: lambda n: _Batched(n.weight, None),
        nir.Conv1d: lambda n: _Conv(n, F.conv1d),
        nir.Conv2d: lambda n: _Conv(n, F.conv2d),
        nir.SumPool2d: _SumPool,
        nir.Threshold: _Threshold,
        nir.Flatten: _Flatten,
    }


def load(graph: nir.NIRGraph, *, dt: float | None = None) -> nn.Module:
    """``nirtorch.nir_to_torch`` with :func:`node_map` (call ``module(x_t, state) -> (y_t, state)``
    once per step, ``state=None`` at the first)."""
    try:
        import nirtorch
    except ImportError as err:
        raise ImportError("nirtorch is not installed: pip install 'stdeploy[interop]' -c constraints.txt") from err
    outputs = [k for k, v in graph.nodes.items() if isinstance(v, nir.Output)]
    if len(outputs) != 1:
        raise StdeployError(f"nirtorch 2.6 hangs on a graph with {len(outputs)} Output nodes ({', '.join(outputs)}): export one")
    table = node_map(graph, dt=dt)
    return nirtorch.nir_to_torch(graph, table, default_map={})
