"""The NIR graph as the Lava lowering sees it: checked once, then analysed.

:func:`check_graph` raises one :class:`LavaUnsupported` listing every node the lowering cannot
take (node types outside :data:`SUPPORTED`; LIF with ``r != 1``, ``v_leak != 0`` or
``v_reset != 0``; thresholds ``<= 0``; not exactly one Input; reshapes of a sum; nodes without
input). :func:`analyse` finds every node's output shape (channel-first, no batch dim) by running
the reference interpreter on zeros, and resolves reshape nodes (``Flatten``) into
``(base source, reshape)`` terms so that no process is made for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...errors import UnsupportedPrimitive
from ...export.nir_interpreter import run_nir, topological_order
from ..base import TargetError

__all__ = ["LavaUnsupported", "NEURONS", "SYNAPSES", "VIEWS", "SUPPORTED", "node_kind", "GraphInfo", "check_graph", "analyse",
           "decay", "uniform", "is_spiking"]


class LavaUnsupported(TargetError, UnsupportedPrimitive):
    """The NIR graph has nodes (or node parameters) the Lava lowering cannot express."""


NEURONS = ("LIF", "Threshold")
SYNAPSES = ("Conv2d", "Conv1d", "Linear", "Affine", "SumPool2d")
VIEWS = ("Flatten",)
SUPPORTED = ("Input", "Output", *NEURONS, *SYNAPSES, *VIEWS)


def node_kind(node) -> str:
    """The NIR node's type name (``LIF``, ``Conv2d``, ...)."""
    return type(node).__name__


@dataclass
class GraphInfo:
    """The facts of a NIR graph the lowering needs, found once."""

    graph: object
    order: list[str]                           # topological, views included
    into: dict[str, list[str]]                 # node -> its sources, in edge order
    shapes: dict[str, tuple[int, ...]]         # node -> output shape (no batch dim)
    terms: dict[str, list[tuple[str, tuple | None]]] = field(default_factory=dict)  # node -> (base source, reshape)
    users: dict[str, list[str]] = field(default_factory=dict)                       # base source -> consumers
    input: str = ""
    dt: float = 1.0


def check_graph(graph) -> None:
    """Raise one :class:`LavaUnsupported` listing every node the lowering cannot take."""
    problems = []
    for name, node in graph.nodes.items():
        kind = node_kind(node)
        if kind not in SUPPORTED:
            problems.append(f"{name} ({kind}): no Lava lowering")
        elif kind == "LIF":
            bad = [f for f, want in (("r", 1.0), ("v_leak", 0.0), ("v_reset", 0.0))
                   if getattr(node, f) is not None and not np.all(np.asarray(getattr(node, f)) == want)]
            if bad:
                problems.append(f"{name} (LIF): only r = 1, v_leak = 0, v_reset = 0 are lowered (Lava's LIF has no input gain, "
                                f"and a leak or reset level would drive neurons during the pipeline's fill steps); has {', '.join(bad)}")
        elif kind == "Threshold" and not np.all(np.asarray(node.threshold) > 0):
            problems.append(f"{name} (Threshold): thresholds <= 0 fire on zero input (the pipeline's fill steps); not lowered")
    inputs = [n for n, node in graph.nodes.items() if node_kind(node) == "Input"]
    if len(inputs) != 1:
        problems.append(f"the graph needs exactly one Input node, it has {len(inputs)}: {inputs}")
    into: dict[str, list[str]] = {n: [] for n in graph.nodes}
    for src, dst in graph.edges:
        if src not in graph.nodes or dst not in graph.nodes:
            problems.append(f"edge {src} -> {dst} names a missing node")
            continue
        into[dst].append(src)
    for name, node in graph.nodes.items():
        if node_kind(node) in VIEWS and len(into[name]) != 1:
            problems.append(f"{name} ({node_kind(node)}): a reshape with {len(into[name])} inputs (a sum) is not lowered")
        if node_kind(node) not in ("Input",) and name in into and not into[name]:
            problems.append(f"{name} ({node_kind(node)}): has no incoming edge")
    if problems:
        raise LavaUnsupported(f"cannot lower the NIR graph to Lava: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems)
                              + f"\nsupported node types: {', '.join(SUPPORTED)}")


def analyse(graph) -> GraphInfo:
    """Check the graph, find node shapes (by running the reference interpreter on zeros), and
    resolve reshapes into (base source, reshape) terms."""
    check_graph(graph)
    order = topological_order(graph)
    into: dict[str, list[str]] = {n: [] for n in graph.nodes}
    for src, dst in graph.edges:
        into[dst].append(src)
    in_name = next(n for n, node in graph.nodes.items() if node_kind(node) == "Input")
    in_shape = tuple(int(s) for s in np.atleast_1d(graph.nodes[in_name].input_type["input"]))
    with torch.no_grad():
        rec = run_nir(graph, torch.zeros((1, 1, *in_shape)), record=True)
    shapes = {n: tuple(int(s) for s in t.shape[2:]) for n, t in rec.items()}
    dt = float(np.asarray(graph.metadata.get("dt", 1.0))) if isinstance(graph.metadata, dict) else 1.0
    info = GraphInfo(graph=graph, order=order, into=into, shapes=shapes, input=in_name, dt=dt)

    def base(src: str, reshape):
        """Follow reshapes back to a node that computes something; the reshape nearest the consumer wins."""
        while node_kind(graph.nodes[src]) in VIEWS:
            reshape = reshape if reshape is not None else shapes[src]
            src = into[src][0]
        return src, reshape

    for name in order:
        if node_kind(graph.nodes[name]) in VIEWS or node_kind(graph.nodes[name]) == "Input":
            continue
        terms = [base(src, None) for src in into[name]]
        terms = [(s, r if r is not None and r != shapes[s] else None) for s, r in terms]
        info.terms[name] = terms
        for s, _ in terms:
            info.users.setdefault(s, []).append(name)
    return info


def decay(node, dt: float) -> np.ndarray:
    """``d = float32(dt/tau)`` per neuron, as the reference interpreter computes it."""
    return (dt / np.asarray(node.tau, dtype=np.float64)).astype(np.float32)


def uniform(a: np.ndarray) -> bool:
    """True when ``a`` is non-empty and all its values are equal."""
    a = np.asarray(a)
    return a.size > 0 and bool(np.all(a == a.reshape(-1)[0]))


def is_spiking(info: GraphInfo, name: str) -> bool:
    """True when node ``name`` emits spikes (a LIF or Threshold)."""
    return node_kind(info.graph.nodes[name]) in NEURONS
