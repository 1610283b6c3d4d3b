"""Operation counts from a real run, and energy = counts x per-operation figures of a device profile.

Counted on the folded PyTorch reference (the arithmetic every exported artifact reproduces):

* **SOPs** (synaptic operations) for layers fed by spikes: every input spike times its fan-out,
  counting only nonzero weights, so pruned synapses cost nothing. For a linear layer that is
  ``sum_j s_j * nnz(W[:, j])``; for a convolution, the number of (input spike, nonzero weight,
  output position) triples.
* **MACs** for layers fed by real values (the first convolution under direct encoding): every
  output times its nonzero fan-in, whatever the input value.
* **Neuron updates** (one per neuron per step) and **spikes** of every LIF.

Energy models (figures and sources come from the profile's ``[energy]`` table):

* ``45nm``: ``E = MACs * mac_pj + SOPs * ac_pj`` (the model spiking-transformer papers use);
* ``loihi``: ``E = (SOPs + MACs) * synop_pj + neuron_updates * neuron_update_pj + spikes * spike_pj``;
  a layer fed by real values runs on Loihi as graded synaptic events, one per MAC.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..neurons import LIF


@dataclass
class LayerCount:
    kind: str                 # "linear" or "conv"
    input: str                # "spikes" or "real"
    sops: float = 0.0
    macs: float = 0.0
    input_rate: float = 0.0   # mean input firing rate (spike-fed layers)


@dataclass
class Counts:
    samples: int = 0
    layers: dict[str, LayerCount] = field(default_factory=dict)
    neurons: dict[str, dict] = field(default_factory=dict)  # name -> updates, spikes, rate

    @property
    def sops(self) -> float:
        return sum(layer.sops for layer in self.layers.values())

    @property
    def macs(self) -> float:
        return sum(layer.macs for layer in self.layers.values())

    @property
    def neuron_updates(self) -> float:
        return sum(n["updates"] for n in self.neurons.values())

    @property
    def spikes(self) -> float:
        return sum(n["spikes"] for n in self.neurons.values())

    def per_sample(self) -> dict:
        s = max(self.samples, 1)
        return {"sops": self.sops / s, "macs": self.macs / s, "neuron_updates": self.neuron_updates / s, "spikes": self.spikes / s}

    def to_dict(self) -> dict:
        return {"samples": self.samples, "per_sample": self.per_sample(),
                "layers": {k: asdict(v) for k, v in self.layers.items()}, "neurons": self.neurons}


def _is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def _linear_ops(m: nn.Linear, x: torch.Tensor, spiking: bool) -> float:
    nz = (m.weight != 0)
    if spiking:  # each spike j reaches nnz(W[:, j]) synapses
        return float((x.reshape(-1, m.in_features) @ nz.sum(0).to(x.dtype)).sum())
    rows = x.numel() // m.in_features  # every output computes its nonzero fan-in
    return float(rows * nz.sum())


def _conv_ops(m: nn.Conv2d, x: torch.Tensor, spiking: bool) -> float:
    ind = (m.weight != 0).to(x.dtype)
    x2 = x.reshape(-1, *x.shape[-3:])
    src = x2 if spiking else torch.ones_like(x2)
    y = nn.functional.conv2d(src, ind, None, m.stride, m.padding, m.dilation, m.groups)
    return float(y.sum())


@torch.no_grad()
def count_operations(model: nn.Module, inputs, timesteps: int | None = None) -> Counts:
    """Run ``model`` on ``inputs`` (an iterable of ``(T, B, ...)`` tensors) and count operations."""
    counts = Counts()
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            def hook(mod, args, out, name=name):
                x = args[0]
                spiking = _is_binary(x)
                layer = counts.layers.setdefault(name, LayerCount("conv" if isinstance(mod, nn.Conv2d) else "linear",
                                                                  "spikes" if spiking else "real"))
                ops = _conv_ops(mod, x, spiking) if isinstance(mod, nn.Conv2d) else _linear_ops(mod, x, spiking)
                if spiking:
                    layer.sops += ops
                    layer.input_rate = float(x.mean())
                else:
                    layer.input = "real"
                    layer.macs += ops
            hooks.append(m.register_forward_hook(hook))
        elif isinstance(m, LIF):
            def lif_hook(mod, args, out, name=name):
                n = counts.neurons.setdefault(name, {"updates": 0.0, "spikes": 0.0, "rate": 0.0})
                n["updates"] += float(out.numel())
                n["spikes"] += float(out.sum())
                n["rate"] = n["spikes"] / n["updates"]
            hooks.append(m.register_forward_hook(lif_hook))
    try:
        model.eval()
        for x in inputs:
            model(x)
            counts.samples += x.shape[1]
    finally:
        for h in hooks:
            h.remove()
    return counts


def energy(counts: Counts, figures: dict) -> dict:
    """Energy per sample in joules (and the terms) from a profile's ``[energy]`` table."""
    c = counts.per_sample()
    model = figures.get("model")
    if model == "45nm":
        terms = {"mac": c["macs"] * figures["mac_pj"], "ac": c["sops"] * figures["ac_pj"]}
    elif model == "loihi":
        terms = {"synop": (c["sops"] + c["macs"]) * figures["synop_pj"], "neuron_update": c["neuron_updates"] * figures["neuron_update_pj"],
                 "spike": c["spikes"] * figures.get("spike_pj", 0.0)}
    else:
        from ..errors import ConfigError

        raise ConfigError(f"unknown energy model {model!r} (known: 45nm, loihi)")
    total_pj = sum(terms.values())
    return {"model": model, "joules_per_sample": total_pj * 1e-12, "terms_pj": terms, "source": figures.get("source")}
