"""How a NIR graph maps onto Loihi 2 cores under a device profile's ``[limits]``.

A *layer* is a population of compartments: every ``LIF`` and ``Threshold`` node, plus a relay
population for each synaptic node whose output feeds something other than a neuron (another
synaptic layer or an Output: on Loihi such a value travels as graded spikes of a population).
A layer's synapses are the nonzero connections into it, expanded over positions and tokens (a
kernel-1 Conv1d of ``W (Do, Di)`` on ``N`` tokens has ``nnz(W) * N``; a 3x3 convolution loses the
taps that fall into the zero padding); a spike edge straight into a population is one-to-one.
A synaptic node feeding several populations counts at each (each needs its own weights on
Loihi). Fan-in is the largest number of synapses into one neuron of the layer. Cores per layer:
``max(ceil(neurons / neurons_per_core), ceil(synapses / synapses_per_core), 1)``; per sample (one
copy of the network), since the batch of the simulation is not a hardware dimension.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from ...export.nir_interpreter import EVALUATORS, EvalContext

__all__ = ["mapping_report", "DEFAULT_LIMITS", "synapse_fan_in"]

# Used where a profile's [limits] lacks a key (the loihi2 profile's values; see targets/loihi2.toml).
DEFAULT_LIMITS = {"cores_per_chip": 128, "neurons_per_core": 8192, "synapses_per_core": 937500, "fan_in_per_neuron": 4096}

_NEURONS = ("LIF", "Threshold")
_SYNAPSES = ("Conv2d", "Conv1d", "Linear", "Affine", "SumPool2d")
_VIEWS = ("Flatten",)


def _kind(node) -> str:
    return type(node).__name__


def synapse_fan_in(node, in_shape: tuple[int, ...]) -> np.ndarray:
    """Per output neuron of synaptic node ``node``: how many nonzero connections reach it (the
    node applied with 0/1 indicator weights and no bias to an input of ones)."""
    ind = copy.copy(node)
    if hasattr(node, "weight") and _kind(node) != "SumPool2d":
        ind.weight = (np.asarray(node.weight) != 0).astype(np.float32)
    if getattr(node, "bias", None) is not None:
        ind.bias = np.zeros_like(np.asarray(node.bias, np.float32))
    ctx = EvalContext(1, 1, 1.0, torch.device("cpu"))
    with torch.no_grad():
        y = EVALUATORS[type(node)](ind, torch.ones((1, *in_shape)), ctx)
    return np.rint(y[0].numpy()).astype(np.int64)


def mapping_report(graph, shapes: dict[str, tuple[int, ...]], limits: dict | None) -> dict:
    """Per-layer neurons, synapses, fan-in and cores; totals; layers over the fan-in limit."""
    lim = {**DEFAULT_LIMITS, **{k: v for k, v in (limits or {}).items() if k in DEFAULT_LIMITS}}
    assumed = sorted(k for k in DEFAULT_LIMITS if k not in (limits or {}))
    into: dict[str, list[str]] = {n: [] for n in graph.nodes}
    for src, dst in graph.edges:
        into[dst].append(src)

    def base(src: str) -> str:
        while _kind(graph.nodes[src]) in _VIEWS:
            src = into[src][0]
        return src

    fan: dict[str, np.ndarray] = {}

    def fan_of(name: str) -> np.ndarray:
        if name not in fan:
            srcs = into[name]
            in_shape = shapes[srcs[0]]
            fan[name] = synapse_fan_in(graph.nodes[name], in_shape)
        return fan[name]

    users: dict[str, list[str]] = {}
    for dst in graph.nodes:
        if _kind(graph.nodes[dst]) in _VIEWS:
            continue
        for src in into[dst]:
            users.setdefault(base(src), []).append(dst)

    layers = []

    def layer(name: str, kind: str, neurons: int, fan_map: np.ndarray, sources: list[str]) -> None:
        synapses = int(fan_map.sum())
        cores = max(math.ceil(neurons / lim["neurons_per_core"]), math.ceil(synapses / lim["synapses_per_core"]), 1)
        layers.append({"layer": name, "type": kind, "neurons": int(neurons), "synapses": synapses,
                       "fan_in": int(fan_map.max(initial=0)), "cores": int(cores), "inputs": sources})

    for name, node in graph.nodes.items():
        kind = _kind(node)
        if kind in _NEURONS:
            size = int(np.prod(shapes[name]))
            total = np.zeros(size, np.int64)
            sources = []
            for src in into[name]:
                b = base(src)
                sources.append(b)
                if _kind(graph.nodes[b]) in _SYNAPSES:
                    total += fan_of(b).reshape(-1)
                else:  # a spike (or input) edge straight in: one-to-one
                    total += 1
            layer(name, kind, size, total, sources)
        elif kind in _SYNAPSES and any(_kind(graph.nodes[u]) not in _NEURONS for u in users.get(name, [])):
            layer(f"{name} (relay)", kind, int(np.prod(shapes[name])), fan_of(name).reshape(-1), [base(s) for s in into[name]])

    total_cores = sum(layer_["cores"] for layer_ in layers)
    over = [f"{layer_['layer']}: fan-in {layer_['fan_in']} > {lim['fan_in_per_neuron']}" for layer_ in layers
            if layer_["fan_in"] > lim["fan_in_per_neuron"]]
    return {
        "limits": lim,
        "assumed_limits": assumed,
        "layers": layers,
        "neurons": sum(layer_["neurons"] for layer_ in layers),
        "synapses": sum(layer_["synapses"] for layer_ in layers),
        "cores": total_cores,
        "chips": math.ceil(total_cores / lim["cores_per_chip"]),
        "over_fan_in": over,
        "note": "per sample; a layer takes max(neurons/neurons_per_core, synapses/synapses_per_core) cores, rounded up",
    }
