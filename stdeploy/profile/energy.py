"""Operation counts from a real run, and energy = counts x per-operation figures of a device profile.

Counted on the folded PyTorch reference (the arithmetic every exported artifact reproduces):

* **SOPs** (synaptic operations) for layers fed by spikes: every input spike times its fan-out,
  counting only nonzero weights, so pruned synapses cost nothing. For a linear layer that is
  ``sum_j s_j * nnz(W[:, j])``; for a convolution, the number of (input spike, nonzero weight,
  output position) triples.
* **MACs** for layers fed by real values (the first convolution under direct encoding): every
  output times its nonzero fan-in, whatever the input value. **Direct input is charged once per
  sample** by default (``direct_input="once"``): when a real-valued input is the same at every
  step (direct encoding repeats the image over T), its products are the same at every step and
  need computing once. ``direct_input="per_step"`` charges them T times, the convention of the
  Spikformer / Spike-driven Transformer papers. A real input that changes over T is charged at
  every step either way. Each layer records ``repeats_over_t`` and the steps charged.
* **Attention products** of Spikformer's spiking self-attention, ``(Q·Kᵀ)·V`` per head with binary
  Q, K, V: ``Q·Kᵀ`` costs one accumulate per (i, j, d) with ``q[i,d] = k[j,d] = 1``; ``A·V``
  (``A = Q·Kᵀ``, integer counts) one accumulate per (i, j, d) with ``A[i,j] != 0`` and
  ``v[j,d] = 1``. Both are counted as SOPs (layer ``<attention>.qkv``). The Spike-driven
  Transformer's attention is a mask (AND and a token sum) and is not charged.
* **Neuron updates** of every LIF: ``updates`` (every neuron at every step) and
  ``active_updates`` (steps at which the neuron has nonzero input or a nonzero membrane: a
  neuron at rest with no input needs no update); and **spikes**.

Energy models (figures and sources come from the profile's ``[energy]`` table):

* ``45nm``: ``E = MACs * mac_pj + SOPs * ac_pj`` (the model spiking-transformer papers use; a
  per-operation estimate for a 45 nm chip, not the energy of the CPU the run used);
* ``loihi``: ``E = (SOPs + MACs) * synop_pj + U * neuron_update_pj + spikes * spike_pj``, where
  ``U`` is the active neuron updates when the profile says ``neuron_updates = "active"`` and all of
  them when it says ``"all"`` (a Loihi profile must say which); a layer fed by real values runs
  on Loihi as graded synaptic events, one per MAC.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..neurons import LIF


@dataclass
class LayerCount:
    kind: str                 # "linear", "conv" or "attention"
    input: str                # "spikes" or "real"
    sops: float = 0.0
    macs: float = 0.0
    input_rate: float = 0.0   # mean input firing rate (spike-fed layers)
    repeats_over_t: bool = False  # real input identical at every step (direct encoding)
    steps_charged: int = 0        # real input: steps whose products are charged per sample (1 or T)


@dataclass
class Counts:
    samples: int = 0
    direct_input: str = "once"  # how real input repeated over T is charged: "once" or "per_step"
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
    def active_neuron_updates(self) -> float:
        return sum(n["active_updates"] for n in self.neurons.values())

    @property
    def spikes(self) -> float:
        return sum(n["spikes"] for n in self.neurons.values())

    def per_sample(self) -> dict:
        s = max(self.samples, 1)
        return {"sops": self.sops / s, "macs": self.macs / s, "neuron_updates": self.neuron_updates / s,
                "active_neuron_updates": self.active_neuron_updates / s, "spikes": self.spikes / s}

    def to_dict(self) -> dict:
        return {"samples": self.samples, "direct_input": self.direct_input, "per_sample": self.per_sample(),
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


def _repeats_over_t(x: torch.Tensor, timesteps: int) -> bool:
    """``x`` (time leading, or T and B merged in the leading dimension) is the same at every step."""
    if timesteps <= 1 or x.shape[0] % timesteps:
        return False
    xt = x.reshape(timesteps, -1)
    return bool((xt == xt[:1]).all())


def _active_updates(lif: LIF, x: torch.Tensor) -> float:
    """Neuron updates at steps where the neuron has nonzero input or a nonzero membrane, for LIF
    input ``x`` ``(T, ...)`` (the same step function as :mod:`stdeploy.neurons`)."""
    p = lif.params(x.dim() - 1)
    v = torch.zeros_like(x[0])
    active = 0.0
    for t in range(x.shape[0]):
        active += float(((x[t] != 0) | (v != 0)).sum())
        v = (1 - p.decay) * v + p.decay * x[t]
        v = v * (v - p.threshold < 0).to(v.dtype)
    return active


def _attention_ops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    """Accumulates of ``(Q·Kᵀ)·V`` with binary ``q, k, v`` ``(..., N, d)`` (zero operands skipped)."""
    qk = q.transpose(-2, -1).sum(-1) * k.transpose(-2, -1).sum(-1)  # (..., d): per d, (#q_i = 1) x (#k_j = 1)
    a = q @ k.transpose(-2, -1)  # (..., N, N) integer counts
    av = (a != 0).to(v.dtype).sum(-2) * v.sum(-1)  # (..., N): per j, nnz(A[:, j]) x nnz(V[j, :])
    return float(qk.sum() + av.sum())


DIRECT_INPUT = ("once", "per_step")


@torch.no_grad()
def count_operations(model: nn.Module, inputs, timesteps: int | None = None, direct_input: str = "once") -> Counts:
    """Run ``model`` on ``inputs`` (an iterable of ``(T, B, ...)`` tensors) and count operations.
    ``timesteps`` defaults to each input's leading dimension; ``direct_input`` is how a real input
    repeated over T is charged (``"once"`` per sample, the default, or ``"per_step"``)."""
    from ..errors import ConfigError
    from ..models.layers import SpikformerAttention

    if direct_input not in DIRECT_INPUT:
        raise ConfigError(f"direct_input must be one of {DIRECT_INPUT}, got {direct_input!r}")
    counts = Counts(direct_input=direct_input)
    steps = {"T": timesteps or 1}
    hooks = []
    captured: dict[int, torch.Tensor] = {}
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
                    t = steps["T"]
                    layer.repeats_over_t = _repeats_over_t(x, t)
                    layer.steps_charged = 1 if layer.repeats_over_t and direct_input == "once" else t
                    layer.macs += ops * layer.steps_charged / t
            hooks.append(m.register_forward_hook(hook))
        elif isinstance(m, LIF):
            def lif_hook(mod, args, out, name=name):
                n = counts.neurons.setdefault(name, {"updates": 0.0, "active_updates": 0.0, "spikes": 0.0, "rate": 0.0})
                n["updates"] += float(out.numel())
                n["active_updates"] += _active_updates(mod, args[0])
                n["spikes"] += float(out.sum())
                n["rate"] = n["spikes"] / n["updates"]
            hooks.append(m.register_forward_hook(lif_hook))
            hooks.append(m.register_forward_hook(lambda mod, args, out: captured.__setitem__(id(mod), out)))
        if isinstance(m, SpikformerAttention):
            def attn_hook(mod, args, out, name=name):
                q, k, v = (mod._split(captured[id(lif)]) for lif in (mod.q_lif, mod.k_lif, mod.v_lif))
                layer = counts.layers.setdefault(f"{name}.qkv", LayerCount("attention", "spikes"))
                layer.sops += _attention_ops(q, k, v)
                layer.input_rate = float((q.mean() + k.mean() + v.mean()) / 3)
            hooks.append(m.register_forward_hook(attn_hook))
    try:
        model.eval()
        for x in inputs:
            steps["T"] = timesteps or x.shape[0]
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
        charge = figures.get("neuron_updates")
        if charge not in ("active", "all"):
            from ..errors import ConfigError

            raise ConfigError(f"energy.neuron_updates must say which updates neuron_update_pj charges: 'active' or 'all', got {charge!r}")
        updates = c["active_neuron_updates"] if charge == "active" else c["neuron_updates"]
        terms = {"synop": (c["sops"] + c["macs"]) * figures["synop_pj"], "neuron_update": updates * figures["neuron_update_pj"],
                 "spike": c["spikes"] * figures.get("spike_pj", 0.0)}
    else:
        from ..errors import ConfigError

        raise ConfigError(f"unknown energy model {model!r} (known: 45nm, loihi)")
    total_pj = sum(terms.values())
    return {"model": model, "label": MODEL_LABELS[model], "joules_per_sample": total_pj * 1e-12, "terms_pj": terms,
            "neuron_updates": figures.get("neuron_updates"), "direct_input": counts.direct_input, "source": figures.get("source")}


MODEL_LABELS = {"45nm": "45 nm", "loihi": "Loihi"}  # what a report column calls each energy model
