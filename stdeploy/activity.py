"""Activity of a spiking model on data: per-layer firing rates and input densities.

A spiking layer that never fires makes every comparison pass (zeros equal zeros) and every sparse
kernel look fast (it skips everything); one that fires at every step is no longer sparse. So every
check and every timing that means something about spikes records the activity it ran at, and
refuses a model outside stated bounds with :func:`require_active`.

* **firing rate** of a LIF: spikes / (neurons x steps x samples), in [0, 1];
* **input density** of a ``Linear`` / ``Conv2d``: the fraction of nonzero entries of its input
  (for a spike-fed layer, the spike rate it sees; for the direct-encoded first convolution, the
  fraction of nonzero pixels).

Only torch, :mod:`stdeploy.neurons` and :mod:`stdeploy.errors` are used, so every room (export,
profile, targets, benchmarks, tests) may import this one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .errors import ConfigError, InactiveModel
from .neurons import LIF

SILENT_BELOW = 1e-3     # default: a LIF firing less often than this is silent
SATURATED_ABOVE = 0.9   # default: a LIF firing more often than this is saturated


@dataclass
class Activity:
    """Activity of one model on some data (means over every sample seen)."""

    samples: int = 0
    firing_rates: dict[str, float] = field(default_factory=dict)     # LIF name -> rate
    input_densities: dict[str, float] = field(default_factory=dict)  # Linear/Conv2d name -> nonzero fraction
    real_inputs: list[str] = field(default_factory=list)             # of those, the layers fed real values
    spike_input_density: float | None = None  # nonzero fraction of all entries fed to spike-fed layers together

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: the range of firing rates and the input density of the spike-fed layers."""
        r = list(self.firing_rates.values())
        if not r:
            return "no spiking layers"
        n = len(self.input_densities) - len(self.real_inputs)
        density = "n/a" if self.spike_input_density is None else f"{self.spike_input_density:.3f}"
        return f"firing rates {min(r):.3f}-{max(r):.3f} over {len(r)} LIFs; input density {density} over {n} spike-fed layers"


@torch.no_grad()
def measure_activity(model: nn.Module, inputs) -> Activity:
    """Run ``model`` (eval mode is the caller's choice) on ``inputs`` (one ``(T, B, ...)`` tensor or
    an iterable of them) and record every LIF's firing rate and every Linear/Conv2d's input density."""
    if isinstance(inputs, torch.Tensor):
        inputs = [inputs]
    spikes: dict[str, list[float]] = {}
    nonzero: dict[str, list[float]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, LIF):
            def lif_hook(mod, args, out, name=name):
                s = spikes.setdefault(name, [0.0, 0.0])
                s[0] += float(out.sum())
                s[1] += out.numel()
            hooks.append(m.register_forward_hook(lif_hook))
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            def in_hook(mod, args, out, name=name):
                x = args[0]
                s = nonzero.setdefault(name, [0.0, 0.0, True])
                s[0] += float(torch.count_nonzero(x))
                s[1] += x.numel()
                s[2] = s[2] and bool(((x == 0) | (x == 1)).all())
            hooks.append(m.register_forward_hook(in_hook))
    activity = Activity()
    try:
        for x in inputs:
            model(x)
            activity.samples += x.shape[1]
    finally:
        for h in hooks:
            h.remove()
    activity.firing_rates = {k: v[0] / v[1] for k, v in spikes.items() if v[1]}
    activity.input_densities = {k: v[0] / v[1] for k, v in nonzero.items() if v[1]}
    activity.real_inputs = [k for k, v in nonzero.items() if v[1] and not v[2]]
    fed = [v for v in nonzero.values() if v[1] and v[2]]
    if fed:
        activity.spike_input_density = sum(v[0] for v in fed) / sum(v[1] for v in fed)
    return activity


@torch.no_grad()
def estimate_batchnorm(model: nn.Module, batches, gain: float = 1.0) -> nn.Module:
    """Estimate every BatchNorm's running statistics over ``batches`` (an iterable of model
    inputs), layer by layer, in place; returns ``model`` in eval mode.

    Each BatchNorm's statistics are the cumulative average over all batches of the batch mean and
    (unbiased) variance of its input (``momentum=None`` semantics), and every layer normalises with
    its statistics *so far* while the next layers are measured: the layers downstream see inputs
    already normalised by the layers upstream, as they will at inference. One train-mode pass with
    the default momentum 0.1 moves the running statistics only 10% of the way from (0, 1); on a
    random-weight model that leaves nearly every LIF silent. Affine weights are left as they are;
    ``gain`` > 1 stores the variance divided by ``gain**2``, so each normalised output has standard
    deviation ``gain`` (with unit affine weight): a random-weight model's LIFs (threshold 1) then fire
    more often, as a trained one's do."""
    if not gain > 0:
        raise ConfigError(f"estimate_batchnorm: gain must be > 0, got {gain}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    seen = {id(m): 0 for m in bns}

    def pre_hook(mod, args):
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=True) / gain ** 2
        k = seen[id(mod)] = seen[id(mod)] + 1
        if k == 1:
            mod.running_mean.copy_(mean)
            mod.running_var.copy_(var)
        else:
            mod.running_mean.add_((mean - mod.running_mean) / k)
            mod.running_var.add_((var - mod.running_var) / k)

    model.eval()
    hooks = [m.register_forward_pre_hook(pre_hook) for m in bns]
    try:
        for x in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    for m in bns:
        m.num_batches_tracked.fill_(seen[id(m)])
    return model


def rates_from_records(records: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Firing rates from :func:`stdeploy.export.validate.record_neurons`' records (no second run)."""
    return {name: float(rec["spikes"].float().mean()) for name, rec in records.items()}


def require_active(rates: dict[str, float], low: float = SILENT_BELOW, high: float = SATURATED_ABOVE, *,
                   what: str = "model") -> None:
    """Refuse spiking layers that are silent (rate < ``low``) or saturated (rate > ``high``),
    naming every such layer; also refuse an empty ``rates`` (nothing that spikes was measured)."""
    if not 0.0 <= low < high <= 1.0:
        raise InactiveModel(f"activity bounds must satisfy 0 <= low < high <= 1, got low={low}, high={high}")
    if not rates:
        raise InactiveModel(f"{what}: no spiking layer recorded; cannot tell whether it fires")
    silent = [f"{k} ({v:.4g})" for k, v in rates.items() if v < low]
    saturated = [f"{k} ({v:.4g})" for k, v in rates.items() if v > high]
    problems = []
    if silent:
        problems.append(f"silent (rate < {low}): " + ", ".join(silent))
    if saturated:
        problems.append(f"saturated (rate > {high}): " + ", ".join(saturated))
    if problems:
        raise InactiveModel(f"{what}: spiking layers outside the activity bounds; " + "; ".join(problems))
