"""Run a NIR graph in third-party readers, one time step at a time, the same way for each.

``run_reader(name, graph, x)`` loads ``graph`` with reader ``name`` (:data:`READERS`) at its
default settings plus the flags in :data:`FLAGS` and returns the Output node's tensor
``(T, B, *shape)`` for ``x`` ``(T, B, *input shape)``. What each reader does (measured with
snntorch 1.0.0, spikingjelly 2.0.0, norse 1.1.0, nirtorch 2.6 on our portable dialect):

* ``snntorch``: ``snntorch.import_nir.import_from_nir(graph)``; hard-codes ``dt = 1e-4``, wants
  one ``v_threshold`` per LIF node and ``v_leak = 0``, maps LIF to ``snn.Leaky`` (reset to zero,
  ``beta = 1 - dt/tau``, threshold divided by ``r*dt/tau``). Prints while importing (silenced here).
* ``spikingjelly``: ``spikingjelly.activation_based.nir_exchange.import_from_nir(graph)``
  (``dt = 1e-4`` by default); wants uniform ``tau``, ``r``, ``v_threshold`` per node,
  ``tau/dt > 1``, ``r`` equal to 1 or ``tau/dt``, ``v_leak = v_reset``; no Threshold, no SumPool2d.
* ``norse``: ``norse.torch.from_nir(graph, dt=...)`` (``dt = 1e-3`` by default: pass the graph's
  ``dt``, :data:`FLAGS`). It loads through nirtorch's deprecated ``load``, whose executor visits
  nodes in depth-first preorder from the input, feeds a node whose other inputs are not computed
  yet with their values from the *previous* step, and returns the last visited node's value: joins
  of two sibling branches (an AND of q and k) come out wrong.
* ``norse-modules``: Norse's own node mapping (``norse.torch.utils.import_nir._import_norse_module``,
  private) run by nirtorch's current executor ``nirtorch.nir_to_torch``, which orders nodes
  topologically: the workaround for the limit above.
* ``nirtorch``: ``nirtorch.nir_to_torch(graph, stdeploy.interop.nirtorch_map.node_map(graph))``.
"""

from __future__ import annotations

import contextlib
import io
from typing import Callable

import nir
import numpy as np
import torch

from ..errors import StdeployError
from .nirtorch_map import graph_dt, load as load_nirtorch

__all__ = ["READERS", "FLAGS", "load_reader", "run_reader"]

READERS = ("snntorch", "spikingjelly", "norse", "norse-modules", "nirtorch")
FLAGS = {"snntorch": "", "spikingjelly": "", "norse": "dt=graph.metadata['dt']",
         "norse-modules": "Norse's node mapping (private _import_norse_module, dt=graph.metadata['dt']) in nirtorch.nir_to_torch",
         "nirtorch": "node_map=stdeploy.interop.nirtorch_map.node_map(graph)"}


def _snntorch(graph: nir.NIRGraph) -> torch.nn.Module:
    from snntorch.import_nir import import_from_nir

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its weight-scaling "warnings"
        return import_from_nir(graph)


def _spikingjelly(graph: nir.NIRGraph) -> torch.nn.Module:
    from spikingjelly.activation_based.nir_exchange import import_from_nir

    return import_from_nir(graph)


def _norse(graph: nir.NIRGraph) -> torch.nn.Module:
    import warnings

    import norse.torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # nirtorch.load's deprecation notice
        return norse.torch.from_nir(graph, dt=graph_dt(graph))


def _norse_modules(graph: nir.NIRGraph) -> torch.nn.Module:
    import functools

    import nirtorch
    from norse.torch.utils.import_nir import _import_norse_module

    fn = functools.partial(_import_norse_module, dt=graph_dt(graph))
    return nirtorch.nir_to_torch(graph, {kind: fn for kind in (nir.Affine, nir.Conv2d, nir.LIF, nir.Flatten, nir.SumPool2d)})


_LOADERS: dict[str, Callable[[nir.NIRGraph], torch.nn.Module]] = {
    "snntorch": _snntorch, "spikingjelly": _spikingjelly, "norse": _norse, "norse-modules": _norse_modules,
    "nirtorch": load_nirtorch,
}


def load_reader(name: str, graph: nir.NIRGraph) -> torch.nn.Module:
    """The reader's module for ``graph`` (a fresh one: readers keep state inside their modules)."""
    if name not in _LOADERS:
        raise StdeployError(f"unknown NIR reader {name!r}; known: {', '.join(READERS)}")
    return _LOADERS[name](graph)


def run_reader(name: str, graph: nir.NIRGraph, x: torch.Tensor) -> torch.Tensor:
    """The Output node's values ``(T, B, *shape)`` for ``x`` ``(T, B, *input shape)``, stepping a
    freshly loaded module once per time step (``module(x_t, state) -> (y_t, state)``; snnTorch's
    neurons keep their state inside, ``module(x_t)``)."""
    graph = nir.NIRGraph(nodes=dict(graph.nodes), edges=list(graph.edges), metadata=dict(graph.metadata), type_check=False)
    net = load_reader(name, graph)  # the readers may rewrite the graph they get: hand them a copy
    outs, state = [], None
    with torch.no_grad():
        for t in range(x.shape[0]):
            y = net(x[t]) if name == "snntorch" else net(x[t], state)
            if isinstance(y, tuple):
                y, state = y[0], y[1]
            outs.append(torch.as_tensor(y).to(torch.float32))
    return torch.stack(outs)
