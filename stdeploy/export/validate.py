"""Validation of exported artifacts against the PyTorch reference, in the manner of Optimum's
``validate_model_outputs``: run both on the same input, collect every mismatch, report them all.

Spikes are compared exactly. A flipped spike is explained, where possible, by the reference
membrane's distance from threshold at that neuron and step: a flip within the tolerance's
``rounding_limit`` of threshold is float summation order (reported, not an error); one farther away
is a bug. Whether a comparison passes is decided by one rule, :class:`stdeploy.tolerance.Tolerance`
(:meth:`Comparison.problems`), the same one ``stdeploy run`` applies with each target's tolerance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..neurons import LIF, LIFParams
from ..tolerance import Tolerance

DEFAULT_TOLERANCE = Tolerance()
ROUNDING_LIMIT = DEFAULT_TOLERANCE.rounding_limit  # a flip farther than this from threshold cannot be float rounding


@dataclass
class Comparison:
    """Result of comparing one artifact's outputs with the reference on the same input."""

    artifact: str
    spikes_total: int
    spike_mismatches: int
    logits_max_abs_error: float
    predictions_agree: float                     # fraction of samples with the same argmax
    flips: list[dict] = field(default_factory=list)  # where localised: layer, count, min/max distance
    max_flip_distance: float | None = None

    @property
    def rounding_only(self) -> bool:
        return self.spike_mismatches == 0 or (self.max_flip_distance is not None and self.max_flip_distance < ROUNDING_LIMIT)

    def problems(self, tolerance: Tolerance = DEFAULT_TOLERANCE, *, quantised: bool = False, localised: bool = True) -> list[str]:
        """Every way this comparison breaks ``tolerance`` (empty: it agrees); ``localised``: the flips
        were measured at the first layer that diverged (see :meth:`Tolerance.problems`)."""
        return tolerance.problems(self.spikes_total, self.spike_mismatches, self.logits_max_abs_error,
                                  self.max_flip_distance, quantised=quantised, localised=localised)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rounding_only"] = self.rounding_only
        return d


def membrane_before_reset(lif: LIF, x: torch.Tensor) -> torch.Tensor:
    """The membrane ``v[t]`` after integration and before reset, ``(T, ...)``, for input ``x``."""
    p: LIFParams = lif.params(x.dim() - 1)
    v = torch.zeros_like(x[0])
    out = []
    for t in range(x.shape[0]):
        v = (1 - p.decay) * v + p.decay * x[t]
        out.append(v)
        v = v * (v - p.threshold < 0).to(v.dtype)
    return torch.stack(out)


@torch.no_grad()
def record_neurons(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """Run ``model`` on ``x`` and record, for every LIF, its input, output spikes and membrane."""
    records: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, LIF):
            def hook(mod, inputs, output, name=name):
                records[name] = {"input": inputs[0], "spikes": output}
            hooks.append(m.register_forward_hook(hook))
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    lifs = dict(model.named_modules())
    for name, rec in records.items():
        lif = lifs[name]
        rec["membrane"] = membrane_before_reset(lif, rec["input"])
        rec["threshold"] = lif.params(rec["input"].dim() - 1).threshold
    return logits, records


def flip_distances(record: dict[str, torch.Tensor], other_spikes: torch.Tensor) -> tuple[int, float, float]:
    """Count of flipped spikes in one layer and the min / max distance of the reference membrane
    from threshold at the flips."""
    flipped = record["spikes"] != other_spikes
    n = int(flipped.sum())
    if n == 0:
        return 0, 0.0, 0.0
    dist = (record["membrane"] - record["threshold"]).abs().expand_as(flipped)[flipped]
    return n, float(dist.min()), float(dist.max())


def compare(artifact: str, ref_logits: torch.Tensor, ref_spikes: torch.Tensor, logits: torch.Tensor, spikes: torch.Tensor,
            records: dict[str, dict[str, torch.Tensor]] | None = None, layer_spikes: dict[str, torch.Tensor] | None = None,
            output_layer: str = "head.lif") -> Comparison:
    """Compare an artifact's logits and output spikes with the reference. ``layer_spikes`` (by
    LIF module name) localises flips to the first layer that diverges; without it, flips are
    measured at the output layer only."""
    if spikes.shape != ref_spikes.shape:
        from ..errors import ShapeError

        raise ShapeError(f"{artifact}: output spikes have shape {tuple(spikes.shape)}, the reference {tuple(ref_spikes.shape)}")
    mismatches = int((spikes != ref_spikes).sum())
    result = Comparison(artifact=artifact, spikes_total=ref_spikes.numel(), spike_mismatches=mismatches,
                        logits_max_abs_error=float((logits - ref_logits).abs().max()),
                        predictions_agree=float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()))
    if records is None:
        return result
    layers = layer_spikes if layer_spikes else ({output_layer: spikes} if mismatches else {})
    first = None
    for name in records:  # model order: the first layer that diverges is the cause
        if name in layers:
            n, lo, hi = flip_distances(records[name], layers[name])
            if n:
                result.flips.append({"layer": name, "flips": n, "min_distance": lo, "max_distance": hi})
                first = first or (name, hi)
    if first is not None:
        result.max_flip_distance = first[1]
    return result
