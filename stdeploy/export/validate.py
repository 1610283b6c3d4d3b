"""Validation of exported artifacts against the PyTorch reference, in the manner of Optimum's
``validate_model_outputs``: run both on the same input, collect every mismatch, report them all.

Spikes are compared exactly. A flipped spike is explained, where possible, by the reference
membrane's distance from threshold at that neuron and step: a flip within the tolerance's
``rounding_limit`` of threshold is float summation order (reported, not an error); one farther away
is a bug. Only the onset is judged: in the first layer that diverges (its inputs are still
identical), each neuron's *first* flip in time; its later flips follow from its own state (reset or
not) and are counted, not judged.

The near-threshold rule explains where a divergence *starts*; it never says how much damage is
acceptable. Whether a comparison passes is decided by one rule, :meth:`Comparison.problems`, which
``stdeploy run`` applies too, with each target's :class:`stdeploy.tolerance.Tolerance` (rounding
flips at most ``max_flip_fraction`` of the output spikes, logits within ``logits_atol`` when every
spike agrees) *and* a task-level :class:`Bound` (defaults ``DEFAULT_BOUND``):

* prediction agreement (same argmax as the reference) >= ``min_prediction_agreement`` (0.95),
  one disagreeing sample always allowed (a near-tie on a 16-image check is not a failure);
* output-spike mismatch fraction <= ``max_spike_mismatch_fraction`` (0.01);
* logits max abs error <= ``logits_atol + logits_rtol * max|reference logits|`` (1e-4 + 0.1 x).

One near-threshold flip followed by every later spike inverted fails both. Deep float models,
where one rounding flip can cascade beyond the bound, need the integer-exact mode
(:mod:`stdeploy.export.exact`); this rule does not widen itself for them.
"""

from __future__ import annotations

from typing import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, OutputMismatch
from ..neurons import LIF, LIFParams, lif_inference
from ..tolerance import Tolerance

DEFAULT_TOLERANCE = Tolerance()
ROUNDING_LIMIT = DEFAULT_TOLERANCE.rounding_limit  # a flip farther than this from threshold cannot be float rounding


@dataclass(frozen=True)
class Bound:
    """How far an artifact's task-level outputs may stray from the reference and still pass."""

    min_prediction_agreement: float = 0.95     # fraction of samples with the reference's argmax
    max_spike_mismatch_fraction: float = 0.01  # of all output spikes (T x B x N x D)
    logits_atol: float = 1e-4                  # logits error allowed outright ...
    logits_rtol: float = 0.1                   # ... plus this fraction of the largest |reference logit|

    def __post_init__(self):
        for name in ("min_prediction_agreement", "max_spike_mismatch_fraction"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ConfigError(f"bound.{name} must be in [0, 1], got {v!r}")
        for name in ("logits_atol", "logits_rtol"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0.0):
                raise ConfigError(f"bound.{name} must be a number >= 0, got {v!r}")


DEFAULT_BOUND = Bound()


@dataclass
class Comparison:
    """Result of comparing one artifact's outputs with the reference on the same input."""

    artifact: str
    spikes_total: int
    spike_mismatches: int
    logits_max_abs_error: float
    predictions_agree: float                     # fraction of samples with the same argmax
    flips: list[dict] = field(default_factory=list)  # where localised: layer, count, min/max distance
    max_flip_distance: float | None = None       # first diverging layer: largest distance at a neuron's first flip
    reference_logits_max_abs: float = 0.0            # scale of the relative logits bound
    samples: int = 0                                 # compared samples (one may disagree)
    bound: Bound = DEFAULT_BOUND

    @property
    def flips_at_rounding_level(self) -> bool:
        """Every divergence starts within ``ROUNDING_LIMIT`` of threshold (or there is none)."""
        return self.spike_mismatches == 0 or (self.max_flip_distance is not None and self.max_flip_distance < ROUNDING_LIMIT)

    def bound_violations(self) -> list[str]:
        """Each task-level figure outside the bound, as a sentence; empty when inside."""
        b, out = self.bound, []
        need = min(b.min_prediction_agreement, 1 - 1 / self.samples) if self.samples > 1 else b.min_prediction_agreement
        if self.predictions_agree < need - 1e-12:
            out.append(f"prediction agreement {self.predictions_agree:.4f} < {b.min_prediction_agreement} "
                       f"(one of {self.samples} samples may disagree)")
        fraction = self.spike_mismatches / self.spikes_total if self.spikes_total else 0.0
        if fraction > b.max_spike_mismatch_fraction:
            out.append(f"output-spike mismatch fraction {fraction:.4g} > {b.max_spike_mismatch_fraction}")
        limit = b.logits_atol + b.logits_rtol * self.reference_logits_max_abs
        if not self.logits_max_abs_error <= limit:  # NaN fails too
            out.append(f"logits error {self.logits_max_abs_error:.4g} > {limit:.4g} "
                       f"({b.logits_atol} + {b.logits_rtol} x max|reference logit| {self.reference_logits_max_abs:.4g})")
        return out

    @property
    def within_bound(self) -> bool:
        return not self.bound_violations()

    @property
    def rounding_only(self) -> bool:
        """The artifact passes: flips start at rounding level and the outcome is inside the bound."""
        return self.flips_at_rounding_level and self.within_bound

    def problems(self, tolerance: Tolerance = DEFAULT_TOLERANCE, *, quantised: bool = False, localised: bool = True) -> list[str]:
        """Every way this comparison breaks ``tolerance`` or its task-level :class:`Bound` (empty: it
        agrees); ``localised``: the flips were measured at the first layer that diverged (see
        :meth:`Tolerance.problems`). A quantised run is judged by the tolerance's spike agreement
        alone (its logits are not expected to be close)."""
        out = tolerance.problems(self.spikes_total, self.spike_mismatches, self.logits_max_abs_error,
                                 self.max_flip_distance, quantised=quantised, localised=localised)
        return out if quantised else out + self.bound_violations()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spike_mismatch_fraction"] = self.spike_mismatches / self.spikes_total if self.spikes_total else 0.0
        d["flips_at_rounding_level"] = self.flips_at_rounding_level
        d["bound_violations"] = self.bound_violations()
        d["within_bound"] = not d["bound_violations"]
        d["rounding_only"] = self.rounding_only
        return d


def membrane_before_reset(lif: LIF, x: torch.Tensor) -> torch.Tensor:
    """The membrane ``v[t]`` after integration and before reset, ``(T, ...)``, for input ``x``."""
    if lif.takes_inference_path(x):  # the same operations, in cache-sized blocks (stdeploy.neurons.lif_inference)
        return lif_inference(x, lif.decay, lif.threshold, lif.channel_dim, membranes=True)[1]
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


@torch.no_grad()
def logits_and_spikes(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, output spikes)`` of ``model`` on ``x`` in one pass without autograd: the output
    spikes are those of its ``head.lif`` (``(T, B, N, D)``, what every artifact's ``spikes`` output
    holds); no other neuron is kept (:func:`record_neurons` keeps them all)."""
    kept = []
    hook = model.head.lif.register_forward_hook(lambda m, inputs, out: kept.append(out))
    try:
        logits = model(x)
    finally:
        hook.remove()
    return logits, kept[0]


def flip_distances(record: dict[str, torch.Tensor], other_spikes: torch.Tensor) -> tuple[int, float, float]:
    """Count of flipped spikes in one layer and the min / max distance of the reference membrane
    from threshold at the flips."""
    flipped = record["spikes"] != other_spikes
    n = int(flipped.sum())
    if n == 0:
        return 0, 0.0, 0.0
    dist = (record["membrane"] - record["threshold"]).abs().expand_as(flipped)[flipped]
    return n, float(dist.min()), float(dist.max())


def onset_distance(record: dict[str, torch.Tensor], other_spikes: torch.Tensor) -> float | None:
    """The largest distance of the reference membrane from threshold at each neuron's first flip
    in time (``None`` without flips): what rounding must explain in the first diverging layer."""
    flipped = record["spikes"] != other_spikes  # (T, ...)
    if not bool(flipped.any()):
        return None
    first = flipped & (flipped.to(torch.int32).cumsum(0) == 1)
    dist = (record["membrane"] - record["threshold"]).abs().expand_as(flipped)[first]
    return float(dist.max())


def compare(artifact: str, ref_logits: torch.Tensor, ref_spikes: torch.Tensor, logits: torch.Tensor, spikes: torch.Tensor,
            records: dict[str, dict[str, torch.Tensor]] | None = None, layer_spikes: dict[str, torch.Tensor] | None = None,
            output_layer: str = "head.lif", bound: Bound = DEFAULT_BOUND) -> Comparison:
    """Compare an artifact's logits and output spikes with the reference. ``layer_spikes`` (by
    LIF module name) localises flips to the first layer that diverges; without it, flips are
    measured at the output layer only. ``bound`` states the task-level agreement required (see
    the module docstring); the result's ``rounding_only`` is False outside it."""
    if spikes.shape != ref_spikes.shape:
        from ..errors import ShapeError

        raise ShapeError(f"{artifact}: output spikes have shape {tuple(spikes.shape)}, the reference {tuple(ref_spikes.shape)}")
    mismatches = int((spikes != ref_spikes).sum())
    result = Comparison(artifact=artifact, spikes_total=ref_spikes.numel(), spike_mismatches=mismatches,
                        logits_max_abs_error=float((logits - ref_logits).abs().max()),
                        predictions_agree=float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
                        reference_logits_max_abs=float(ref_logits.abs().max()) if ref_logits.numel() else 0.0, bound=bound,
                        samples=int(ref_logits.shape[0]) if ref_logits.dim() else 1)
    if records is None:
        return result
    layers = layer_spikes if layer_spikes else ({output_layer: spikes} if mismatches else {})
    first = None
    for name in records:  # model order: the first layer that diverges is the cause
        if name in layers:
            n, lo, hi = flip_distances(records[name], layers[name])
            if n:
                result.flips.append({"layer": name, "flips": n, "min_distance": lo, "max_distance": hi})
                first = first or (name, onset_distance(records[name], layers[name]))
    if first is not None:
        result.max_flip_distance = first[1]
    return result


def require_agreement(comparisons: list[Comparison], what: str, tolerances: Mapping[str, Tolerance] | None = None) -> None:
    """Raise one :class:`OutputMismatch` listing every comparison that fails :meth:`Comparison.problems`
    under its artifact's tolerance (``tolerances[c.artifact]``, default ``DEFAULT_TOLERANCE``) and
    its bound; ``what`` starts the message. For export and run alike."""
    tolerances = tolerances or {}
    bad = [(c, p) for c in comparisons if (p := c.problems(tolerances.get(c.artifact, DEFAULT_TOLERANCE)))]
    if bad:
        raise OutputMismatch(f"{what}:\n  " + "\n  ".join(
            f"{c.artifact}: {'; '.join(p)} ({c.spike_mismatches} of {c.spikes_total} output spikes differ, logits by up to "
            f"{c.logits_max_abs_error:.3g}; flips {c.flips})" for c, p in bad))
