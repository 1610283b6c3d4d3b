"""Loihi 2 resource report of a standard plan (:func:`.standard.lower_standard`): what the network,
as lowered to Lava's standard processes, asks of a chip's cores under a profile's ``[limits]``.

Contract
--------
:func:`resource_report` returns a :class:`ResourceReport` (validated, frozen; ``to_dict()`` for
JSON). Counts are per sample (the chip runs batch 1), in these units:

* a **layer** is one ``LIFReset`` population of the plan (NIR ``LIF`` and ``Threshold`` nodes, and
  the relays that repeat spikes later), one ``ProdNeuron`` or ``GradedVec`` population of a
  Spikformer attention block (kinds ``product``, ``graded``; :mod:`.attention`), plus one ``readout`` layer per graded Output term (the
  classifier's sums leave the chip as graded values of as many compartments);
* **neurons**: compartments of the layer;
* **synapses**: nonzero weights of every synaptic process into the layer (a convolution unrolled:
  taps in the zero padding are not synapses; a spike edge is one synapse per neuron);
* **synaptic memory** (bits): ``synapses * weight_bits`` plus ``delay_bits`` for every synapse
  of a delayed process (``DelaySparse``), as the profile states them; index and routing tables are
  not modelled;
* **fan-in**: the largest number of synapses into one neuron of the layer; **fan-out**: the
  largest number of synapses leaving one neuron of the layer (into every layer it feeds);
* **cores** of a layer: ``max(ceil(neurons / neurons_per_core), ceil(synapses / synapses_per_core),
  ceil(memory / synaptic_memory_bits_per_core), 1)``: layers do not share cores;
* the layers are placed in plan order (by latency) on one chip: the **first layer that does not
  fit** is the first whose fan-in exceeds ``fan_in_per_neuron`` or whose cores take the running
  total past ``cores_per_chip``; ``chips`` is the total cores over ``cores_per_chip``, rounded up.

Limits missing from the profile take :data:`DEFAULT_LIMITS` (the ``loihi2`` profile's figures) and
are listed in ``assumed_limits``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from ...errors import ConfigError

__all__ = ["DEFAULT_LIMITS", "CoreLimits", "LayerResources", "ResourceReport", "resource_report", "layer_cores", "place"]

# The loihi2 profile's figures (targets/loihi2.toml cites their sources)
DEFAULT_LIMITS = {"cores_per_chip": 128, "neurons_per_core": 8192, "synapses_per_core": 937500,
                  "synaptic_memory_bits_per_core": 7500000, "fan_in_per_neuron": 4096, "weight_bits": 8, "delay_bits": 6}


@dataclass(frozen=True)
class CoreLimits:
    """Per-chip and per-core limits (positive integers; bits for the memory and word sizes)."""

    cores_per_chip: int
    neurons_per_core: int
    synapses_per_core: int
    synaptic_memory_bits_per_core: int
    fan_in_per_neuron: int
    weight_bits: int
    delay_bits: int

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ConfigError(f"[limits] {f.name} must be a positive integer, got {v!r}")

    @classmethod
    def from_profile(cls, limits: dict | None) -> tuple["CoreLimits", tuple[str, ...]]:
        """The limits of a profile's ``[limits]`` table (other keys ignored), and the names taken
        from :data:`DEFAULT_LIMITS` because the table lacks them."""
        given = {k: v for k, v in (limits or {}).items() if k in DEFAULT_LIMITS}
        assumed = tuple(sorted(k for k in DEFAULT_LIMITS if k not in given))
        return cls(**{**DEFAULT_LIMITS, **given}), assumed


@dataclass(frozen=True)
class LayerResources:
    """One layer's demand (see the module docstring for the units)."""

    layer: str
    kind: str                      # LIF, Threshold, relay, product, graded or readout
    neurons: int
    synapses: int
    synaptic_memory_bits: int
    fan_in: int
    fan_out: int
    cores: int
    inputs: tuple[str, ...]

    def __post_init__(self):
        for name in ("neurons", "synapses", "synaptic_memory_bits", "fan_in", "fan_out", "cores"):
            if getattr(self, name) < 0:
                raise ConfigError(f"layer {self.layer}: {name} must be >= 0, got {getattr(self, name)}")
        if self.neurons < 1 or self.cores < 1:
            raise ConfigError(f"layer {self.layer}: a layer has at least one neuron and one core")


@dataclass(frozen=True)
class ResourceReport:
    """Per-layer demand, totals, cores and chips, and the first layer that does not fit one chip."""

    limits: CoreLimits
    assumed_limits: tuple[str, ...]
    layers: tuple[LayerResources, ...]
    neurons: int
    synapses: int
    synaptic_memory_bits: int
    cores: int
    chips: int
    first_unfit: str | None        # the first layer that does not fit, or None
    unfit_reason: str | None

    def __post_init__(self):
        if self.neurons != sum(x.neurons for x in self.layers) or self.synapses != sum(x.synapses for x in self.layers) \
                or self.cores != sum(x.cores for x in self.layers):
            raise ConfigError("resource report: totals do not match the layers")
        if (self.first_unfit is None) != (self.unfit_reason is None):
            raise ConfigError("resource report: a first unfit layer needs its reason, and only then")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["note"] = ("per sample, as lowered to Lava's standard processes; memory = synapses x weight_bits + delayed synapses x "
                     "delay_bits; layers placed in latency order on one chip")
        return d


def _csr_counts(m: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per row (output neuron) and per column (input neuron): nonzero weights of a plan matrix."""
    rows_n, cols_n = (int(n) for n in m["shape"])
    if m["format"] == "sparse":
        vals = np.asarray(m["values"])
        keep = vals != 0
        return (np.bincount(np.asarray(m["rows"])[keep], minlength=rows_n),
                np.bincount(np.asarray(m["cols"])[keep], minlength=cols_n))
    nz = np.asarray(m["values"]) != 0
    return nz.sum(axis=1), nz.sum(axis=0)


def layer_cores(neurons: int, synapses: int, memory_bits: int, lim: CoreLimits) -> int:
    """Cores of one layer (layers do not share cores): the most of its neurons, synapses and
    synaptic memory over the per-core limits, at least 1."""
    return max(math.ceil(neurons / lim.neurons_per_core), math.ceil(synapses / lim.synapses_per_core),
               math.ceil(memory_bits / lim.synaptic_memory_bits_per_core), 1)


def place(layers, lim: CoreLimits, assumed: tuple[str, ...] = ()) -> ResourceReport:
    """The report of ``layers`` (:class:`LayerResources`, in placement order) on chips of
    ``lim``: totals, chips, and the first layer that does not fit one chip: the first whose
    fan-in exceeds ``fan_in_per_neuron`` or whose cores take the running total past
    ``cores_per_chip``."""
    layers = tuple(layers)
    used, first, reason = 0, None, None
    for layer in layers:
        if first is None and layer.fan_in > lim.fan_in_per_neuron:
            first, reason = layer.layer, f"fan-in {layer.fan_in} > fan_in_per_neuron {lim.fan_in_per_neuron}"
        elif first is None and used + layer.cores > lim.cores_per_chip:
            first, reason = layer.layer, (f"needs cores {used + 1}-{used + layer.cores}; a chip has {lim.cores_per_chip} "
                                          f"({layer.cores} for this layer: {layer.neurons} neurons, {layer.synapses} synapses, "
                                          f"{layer.synaptic_memory_bits} bits)")
        used += layer.cores
    return ResourceReport(limits=lim, assumed_limits=assumed, layers=layers, neurons=sum(x.neurons for x in layers),
                          synapses=sum(x.synapses for x in layers),
                          synaptic_memory_bits=sum(x.synaptic_memory_bits for x in layers), cores=used,
                          chips=math.ceil(used / lim.cores_per_chip), first_unfit=first, unfit_reason=reason)


def resource_report(plan: dict, limits: dict | CoreLimits | None = None) -> ResourceReport:
    """The resource report of a standard plan under ``limits`` (a profile's ``[limits]`` table or
    :class:`CoreLimits`)."""
    if plan.get("lowering") != "standard":
        raise ConfigError("resource_report takes a standard plan (stdeploy.targets.lava.standard.lower_standard)")
    lim, assumed = (limits, ()) if isinstance(limits, CoreLimits) else CoreLimits.from_profile(limits)
    sizes = {p["name"]: int(p["size"]) for p in plan["populations"]}
    kinds = {p["name"]: p["node_kind"] for p in plan["populations"]}
    order = [p["name"] for p in sorted(plan["populations"], key=lambda p: p["latency"])]  # stable: plan order within a latency
    readouts = {}
    for outs in plan["outputs"].values():
        for t in outs:
            if t["synapse"] is not None:
                readouts[t["sink"]] = int(t["size"])
                kinds[t["sink"]] = "readout"
    order += list(readouts)
    sizes.update(readouts)
    fan_in = {n: np.zeros(sizes[n], np.int64) for n in order}
    fan_out = {n: np.zeros(sizes[n], np.int64) for n in sizes}
    memory = {n: 0 for n in order}
    inputs: dict[str, list[str]] = {n: [] for n in order}
    for s in plan["synapses"]:
        per_row, per_col = _csr_counts(s["matrix"])
        dst = s["dst"]
        fan_in[dst] += per_row
        if s["src"] in fan_out:
            fan_out[s["src"]] += per_col
        memory[dst] += int(per_row.sum()) * (lim.weight_bits + (lim.delay_bits if s["delay"] > 0 else 0))
        if s["src"] not in inputs[dst]:
            inputs[dst].append(s["src"])
    layers = []
    for n in order:
        syn = int(fan_in[n].sum())
        layers.append(LayerResources(layer=n, kind=kinds[n], neurons=sizes[n], synapses=syn, synaptic_memory_bits=memory[n],
                                     fan_in=int(fan_in[n].max(initial=0)), fan_out=int(fan_out[n].max(initial=0)),
                                     cores=layer_cores(sizes[n], syn, memory[n], lim), inputs=tuple(inputs[n])))
    return place(layers, lim, assumed)
