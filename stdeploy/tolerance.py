"""The one rule for "this artifact agrees with the PyTorch reference".

Export validation (:mod:`stdeploy.export`) and ``stdeploy run`` (:mod:`stdeploy.runner`) both judge
a comparison with :meth:`Tolerance.problems`; every target declares its own :class:`Tolerance`
(``Target.tolerance``). Torch-free, so targets and the on-device runtime can import it.

The rule, for output spikes ``(T, B, N, D)`` compared exactly and logits ``(B, classes)``:

- a flipped spike whose reference membrane lies within ``rounding_limit`` of the threshold (same
  units as the membrane: threshold 1.0) is float summation order, not an error; at most
  ``max_flip_fraction`` of all output spikes may flip that way;
- at most ``spike_mismatches`` output spikes may differ for any other reason (0: none); this needs
  the flips *localised* (the distance measured at the first layer that diverged, as export
  validation does); a run that sees only the output layer (``localised=False``, ``stdeploy run``)
  cannot tell a rounding flip upstream from a bug, so there every flip counts against
  ``max_flip_fraction`` instead;
- when every spike agrees, logits may differ by at most ``logits_atol`` (absolute);
- a quantised run (fixed-point arithmetic, e.g. Lava's ``mode = "fixed"``) is judged by spike
  agreement alone: at least ``quantised_spike_agreement`` of the output spikes equal; a target
  that declares none cannot run quantised within tolerance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Mapping

from .errors import ConfigError

__all__ = ["Tolerance", "ONNXRUNTIME", "NIR_INTERPRETER"]


@dataclass(frozen=True)
class Tolerance:
    logits_atol: float = 1e-5             # logits, absolute, when every output spike agrees
    spike_mismatches: int = 0             # output spikes that may differ for reasons other than rounding
    max_flip_fraction: float = 1e-3       # rounding flips allowed, as a fraction of the output spikes
    rounding_limit: float = 1e-4          # a flip farther than this from threshold cannot be float rounding
    quantised_spike_agreement: float | None = None  # fixed point: fraction of output spikes equal

    def __post_init__(self) -> None:
        for f in ("logits_atol", "rounding_limit"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise ConfigError(f"tolerance {f} must be a number >= 0, got {v!r}")
        if not isinstance(self.spike_mismatches, int) or isinstance(self.spike_mismatches, bool) or self.spike_mismatches < 0:
            raise ConfigError(f"tolerance spike_mismatches must be an integer >= 0, got {self.spike_mismatches!r}")
        for f in ("max_flip_fraction", "quantised_spike_agreement"):
            v = getattr(self, f)
            if v is None and f == "quantised_spike_agreement":
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
                raise ConfigError(f"tolerance {f} must be a fraction in [0, 1], got {v!r}")

    @classmethod
    def coerce(cls, declared: "Tolerance | Mapping") -> "Tolerance":
        """A target's declared tolerance as a record: a :class:`Tolerance`, or a mapping of its
        field names (``fixed_spike_agreement`` is read as ``quantised_spike_agreement``)."""
        if isinstance(declared, Tolerance):
            return declared
        if not isinstance(declared, Mapping):
            raise ConfigError(f"a tolerance is a Tolerance or a mapping, got {type(declared).__name__}")
        d = dict(declared)
        if "fixed_spike_agreement" in d:
            d["quantised_spike_agreement"] = d.pop("fixed_spike_agreement")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown tolerance field(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**d)

    def __getitem__(self, key: str):
        """``tolerance["logits_atol"]``: the mapping form targets declared before this record."""
        if key == "fixed_spike_agreement":
            key = "quantised_spike_agreement"
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def to_dict(self) -> dict:
        return asdict(self)

    def problems(self, spikes_total: int, spike_mismatches: int, logits_max_abs_error: float,
                 max_flip_distance: float | None, *, quantised: bool = False, localised: bool = True) -> list[str]:
        """Every way a comparison breaks this rule, as readable lines (empty: within tolerance).
        ``max_flip_distance`` is the largest distance of the reference membrane from threshold at a
        flip of the first diverging layer (None: not measured, so no flip counts as rounding)."""
        if spikes_total <= 0:
            return ["no output spikes were compared"]
        if quantised:
            if self.quantised_spike_agreement is None:
                return ["this target declares no tolerance for quantised (fixed-point) runs"]
            agreement = 1 - spike_mismatches / spikes_total
            if agreement < self.quantised_spike_agreement:
                return [f"{agreement:.4f} of output spikes agree, below the quantised tolerance {self.quantised_spike_agreement:g}"]
            return []
        out = []
        if spike_mismatches:
            rounding = max_flip_distance is not None and max_flip_distance < self.rounding_limit
            if not rounding and localised and spike_mismatches > self.spike_mismatches:
                far = "not measured" if max_flip_distance is None else f"up to {max_flip_distance:.3g}"
                out.append(f"{spike_mismatches} of {spikes_total} output spikes differ and are not float "
                           f"rounding (membrane {far} from threshold, limit {self.rounding_limit:g}; "
                           f"{self.spike_mismatches} allowed)")
            if (rounding or not localised) and spike_mismatches > self.max_flip_fraction * spikes_total:
                out.append(f"{spike_mismatches} of {spikes_total} output spikes flipped"
                           + (" at threshold" if rounding else " (not localised)")
                           + f" (tolerance {self.max_flip_fraction:g} of them)")
        elif not logits_max_abs_error <= self.logits_atol:
            out.append(f"logits differ by up to {logits_max_abs_error:.3g} (tolerance {self.logits_atol:g})")
        return out


# onnxruntime vs PyTorch: the same float32 operations, sums in another order (the ONNX export's
# validation and the onnxruntime target both apply it).
ONNXRUNTIME = Tolerance(logits_atol=1e-5)
# The NIR interpreter (the NIR export's validation): PyTorch kernels on the NIR graph's parameters.
NIR_INTERPRETER = Tolerance(logits_atol=1e-5)
