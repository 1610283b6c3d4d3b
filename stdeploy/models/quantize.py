"""The integer-exact mode: weights, biases, thresholds and leaks on power-of-two grids, so that
every sum a runtime computes is exact in float32 in any order.

Why
---
Spiking networks are discontinuous: a membrane equal to its threshold in one runtime and one ulp
below it in another flips a spike, and a deep model amplifies one flip into a large fraction of its
output spikes (measured on ``sdt-8-512``: one flip at ``embed.stages.1.lif`` became 26% of the
output spikes eight blocks later). Float runtimes order their sums differently, so float exports of
deep models cannot be spike-exact. Sums of numbers on one grid ``q`` (integer multiples of a power of
two) are exact in float32, in any order, while every partial sum stays below ``2**24 * q``; then
PyTorch, onnxruntime, TVM and NIR readers produce the same spikes at any depth and batch.

The arithmetic (mode ``"exact"``)
---------------------------------
* BatchNorm is folded first (:func:`~stdeploy.models.fold.fold_batchnorm`); every ``nn.Linear``
  (also the head classifier) becomes a :class:`QuantLinear`, every folded convolution a
  :class:`QuantConv`. A low-rank (DSP) ``LowRankLinear`` is merged first (:func:`merge_low_rank`):
  its dense product ``U V`` becomes one :class:`QuantLinear` (see "Low-rank layers" below); a
  folded ``LowRankConv2d`` likewise becomes one dense ``Conv2d``, then one :class:`QuantConv`.
* Weights: ``w = s * W`` with ``W`` an integer in ``[-127, 127]`` (8 bits) and ``s = 2**-k`` a
  per-layer power of two, the smallest that fits the largest weight
  (:func:`power_of_two_scale`); the layers that write the residual stream share the coarsest of
  their scales (:func:`share_stream_scale`). Bias: ``b = s * B`` with ``B`` an integer on the same grid.
  Pruned zeros stay zeros (a fixed ``mask`` of the nonzeros at conversion).
* Input: the layer that reads the analog input (``embed.stages.0.conv``, or ``embed.fcs.0`` of a
  dense stem) sees it clipped to the range ``[lo, hi]`` and rounded to ``2**-frac_bits`` (the
  model's :class:`InputContract`; default ``[0, 1]`` on ``2**-INPUT_FRAC_BITS`` for images, a signed
  range for standardised data such as MNIST-1D, derived from the training split by
  :meth:`InputContract.covering` or given). The contract is recorded in the checkpoint's meta
  (``input_contract``), the export's manifest and NIR metadata, and the export's proof assumes it.
  Inputs outside the range are clipped, not refused: the model was fine-tuned with the same clip,
  and runs count the clipped values (see :func:`stdeploy.runner.run_export`).
* Head: the mean over ``N`` tokens is ``1/N`` times a sum, not dyadic unless ``N`` is a power of
  two; for other ``N`` (``sdt-1d-tiny``: 20) :func:`power_of_two_token_mean` makes it the sum times
  ``2**-ceil(log2 N)`` and moves ``2**k / N`` into the classifier's weight before it is quantised.
* Neurons: the leak ``d`` is rounded to a power of two ``2**-j`` (``tau = 2`` gives ``d = 1/2``
  exactly); the threshold to ``2**-THRESHOLD_FRAC_BITS``. sLIF neurons are frozen to LIF first.
* Gradients: rounding is straight-through (identity gradient), so a model fine-tunes in this mode
  with the usual surrogate gradients (quantisation-aware training).

Why the membrane stays exact (the bound that :mod:`stdeploy.export.exact` checks)
---------------------------------------------------------------------------------
The membrane update is ``v = (1 - d) v + d x``. If every input ``x`` is a multiple of ``q`` and
``d = 2**-j``, then ``(1 - d)`` and ``d`` are multiples of ``2**-j``, so after ``t`` steps ``v`` is a
multiple of ``q * 2**(-j t)``: the leak adds ``j`` fractional bits per step, at most ``j * T``
over a sample of ``T`` steps (a reset to 0 only removes bits). Since ``v`` is a convex combination
of 0 and past inputs, ``|v| <= max |x|``. Hence with ``M = max |x|`` and ``theta`` on the grid too,
every intermediate value (``(1-d) v``, ``d x``, their sum, ``x - v`` in NIR's form, ``v - theta``)
is a multiple of ``q * 2**(-j T)`` bounded by ``2 M + theta``, and is exact in float32 when
``(2 M + theta) / (q * 2**(-j T)) <= 2**24``. For ``T = 4`` and ``d = 1/2`` that leaves 19 bits
for the input sums of a layer in units of its grid, e.g. 4096 binary inputs at weight 127.

Low-rank (DSP) layers: merged, then quantised
---------------------------------------------
Quantising DSP's two factors separately puts ``u(v(x))`` on the product of two layer grids
(``s_u s_v``, far finer than a dense layer's ``s``), and the residual stream that ``fc2.u`` writes
inherits it: on the DSP-30 form of a 4-block ``sdt`` (D = 32) with separately quantised ``fc2``
factors the checker refuses the stream's readers from ``blocks.1.mlp.lif1`` on (2^24.5 to 2^25.6
grid units at ``head.lif``; ``tests/export/test_exact.py``). Rounding the inner activation back to a coarse
grid would be exact but changes the function by a second rounding per layer. The exact mode instead
merges the factors into the dense ``W = U V`` (computed in float64) and quantises that like any
linear layer: one 8-bit grid, one scale, the same bound as a dense layer. What it costs: the
exported and fine-tuned layer is dense, ``in * out`` parameters and multiply-adds per token instead
of ``rank * (in + out)`` (DSP's saving on those layers is given back: e.g. ``sdt-tiny``'s ``fc1``,
64 -> 256, at rank 16 holds 16,384 instead of 5,120 weights); a checkpoint saved in the exact mode
records no low-rank structure, and quantisation-aware fine-tuning updates the dense weight. A
low-rank convolution (DSP's whole-model scope) is merged the same way: its ``k x k`` factor ``v``
and 1x1 factor ``u`` become one dense convolution of the layer's kernel, ``out * in * kh * kw``
weights, quantised as one :class:`QuantConv` on one grid.

The Loihi 2 mode (mode ``"loihi2"``): the exact arithmetic plus Loihi's integer constraints
---------------------------------------------------------------------------------------------
One arithmetic, not two: a ``loihi2`` model is an exact-mode model (the same modules, the same
straight-through rounding, the same float32 proof) whose integers are also the ones Lava's
bit-accurate LIF (``PyLifModelBitAcc``) and lava-dl netx hold, so that fixed-point Lava runs the
trained integers as they are. On top of the exact mode:

* Input grid ``2**-LOIHI2_INPUT_FRAC_BITS`` (4 bits; the digits' own ``k/16``): the mode's default
  :class:`InputContract` is its range (``[0, 1]``, or the training split's) on that grid
  (:func:`default_input_contract`); with 8 fractional input bits the analog first layer's membrane
  needs more than Loihi's 24-bit ``u``/``v``. A given contract is kept if its grid is ``2**-4`` or
  coarser and refused by name otherwise; the contract is the only carrier of range and grid here
  as in the exact mode (checkpoint meta ``input_contract`` next to ``quantize``, manifest, metadata).
* Per-layer exponents are fixed at conversion (:func:`to_exact` ``mode="loihi2"``): ``s`` no
  longer follows the weights during fine-tuning; mantissas saturate at ``+-127``. A layer's grid is
  then a property of the model, and so is every population's current unit.
* Integer thresholds in units of the current: the population fed (directly, summed) by layers of
  grid ``s_in`` (``s`` times the input contract's grid, ``2**-4`` by default, for a layer on the
  analog input, the weight scale ``s`` for a layer on spikes; spike edges have grid 1) receives Loihi currents ``a_in = d x / U`` with ``U = d s_in``
  (the 8-bit mantissas themselves: ``a_in = W s + B``). Loihi spikes on ``v > vth`` for an integer
  ``vth`` (Lava's ``v > vth << 6``), the model on ``v >= theta``; the two agree for every membrane
  when ``theta = (vth + 2**(-j (T-1))) U`` (:func:`loihi2_threshold`), because the membrane is a
  multiple of ``U 2**(-j (T-1))`` at every step of a sample (``d = 2**-j``). Thresholds are rounded
  to that form once at conversion (buffers; they do not train).
* Lava holds the membrane in units of ``U / 64`` (``a_in << 6``): the decay
  ``sign(v') (|v'| >> 12)`` is exact while ``j (T - 1) <= LOIHI2_FRACTION_BITS`` (6), checked at
  conversion; 12-bit decays need ``j <= 12``.
:func:`loihi2_units` finds each population's ``s_in`` from the model's structure (which quantised
layers reach which neurons; a probe with NaN outputs, one layer at a time, so values never
matter). The Lava fixed-point lowering and the netx export read the unit back from the threshold
(``grid(theta) 2**(j (T-1))``) and refuse a graph whose integers do not fit, never rounding.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError, UnsupportedPrimitive
from ..neurons import LIF, neurons_of, to_lif
from .fold import FoldedConv, fold_batchnorm
from .structure import LowRankConv2d, LowRankLinear, set_submodule

__all__ = ["MODES", "WEIGHT_BITS", "INPUT_FRAC_BITS", "THRESHOLD_FRAC_BITS", "QuantLinear", "QuantConv", "power_of_two_scale",
           "quantize_input", "merge_low_rank", "to_exact", "is_exact", "deployable", "check_mode",
           "InputContract", "INPUT_LAYERS", "input_contract_of", "with_input_contract", "power_of_two_token_mean",
           "LOIHI2_INPUT_FRAC_BITS", "LOIHI2_FRACTION_BITS", "LOIHI2_DECAY_BITS", "quant_mode",
           "default_input_contract", "check_input_contract", "loihi2_units", "loihi2_threshold", "loihi2_unit", "loihi2_vth"]

MODES = ("float", "exact", "loihi2")
WEIGHT_BITS = 8                # integer weights in [-127, 127]
QMAX = 2 ** (WEIGHT_BITS - 1) - 1
INPUT_FRAC_BITS = 8            # the analog input on a grid of 1/256, clipped to [0, 1]
INPUT_RANGE = (0.0, 1.0)
THRESHOLD_FRAC_BITS = 8        # thresholds on a grid of 1/256
LOIHI2_INPUT_FRAC_BITS = 4     # loihi2 mode: the analog input on a grid of 1/16 (the first layer fits 24-bit u, v)
LOIHI2_FRACTION_BITS = 6       # loihi2 mode: Lava's a_in << 6, the membrane's fractional bits below one current unit
LOIHI2_DECAY_BITS = 12         # loihi2 mode: Loihi's 12-bit decays, dv = 4096 d


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown quantisation mode {mode!r}; known: {', '.join(MODES)}")
    return mode


INPUT_FRAC_BITS_MAX = 16       # finer input grids than 2**-16 are refused (and Lava's source sends 24-bit integers)
INPUT_LAYERS = ("embed.stages.0.conv", "embed.fcs.0")  # the layer that reads the analog input: conv stem, dense stem


@dataclass(frozen=True)
class InputContract:
    """What an exact-mode model accepts: every input value a multiple of ``2**-frac_bits`` in
    ``[lo, hi]`` (model units, the data set's own scale). ``lo`` and ``hi`` lie on the grid, so
    clipping then rounding (:meth:`apply`) stays in range. The export's proof
    (:func:`stdeploy.export.exact.check_exact`) bounds every partial sum over this range."""

    lo: float = 0.0
    hi: float = 1.0
    frac_bits: int = INPUT_FRAC_BITS

    def __post_init__(self):
        if isinstance(self.frac_bits, bool) or not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits <= INPUT_FRAC_BITS_MAX:
            raise ConfigError(f"input contract: frac_bits must be an integer in [0, {INPUT_FRAC_BITS_MAX}], got {self.frac_bits!r}")
        for key in ("lo", "hi"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"input contract: {key} must be a finite number, got {v!r}")
            object.__setattr__(self, key, float(v))
            if float(v) * 2 ** self.frac_bits != round(float(v) * 2 ** self.frac_bits):
                raise ConfigError(f"input contract: {key} = {v!r} is not a multiple of the grid 2^-{self.frac_bits}; "
                                  "use InputContract.covering(lo, hi, frac_bits)")
        if not self.lo < self.hi:
            raise ConfigError(f"input contract: the range [{self.lo:g}, {self.hi:g}] is empty (lo must be below hi)")
        if max(abs(self.lo), abs(self.hi)) * 2 ** self.frac_bits > 2 ** 24:
            raise ConfigError(f"input contract: [{self.lo:g}, {self.hi:g}] on 2^-{self.frac_bits} needs more than float32's "
                              "24 bits; use a coarser grid")

    @property
    def grid(self) -> float:
        return 2.0 ** -self.frac_bits

    @property
    def signed(self) -> bool:
        return self.lo < 0

    @classmethod
    def covering(cls, lo: float, hi: float, frac_bits: int = INPUT_FRAC_BITS, *, unit: bool = True) -> "InputContract":
        """The smallest contract on ``2**-frac_bits`` that holds ``[lo, hi]`` (rounded outward to
        the grid); with ``unit``, a range inside ``[0, 1]`` gives ``[0, 1]``, the images' contract."""
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ConfigError(f"input contract: the range [{lo}, {hi}] is not finite")
        if unit and lo >= 0 and hi <= 1:
            lo, hi = 0.0, 1.0
        n = 2 ** frac_bits
        lo, hi = math.floor(lo * n) / n, math.ceil(hi * n) / n
        return cls(lo, hi if hi > lo else lo + 1.0 / n, frac_bits)

    @classmethod
    def from_dict(cls, d, where: str = "input contract") -> "InputContract":
        """From ``{"lo", "hi", "frac_bits"}`` (checkpoint meta, manifest, NIR metadata); ``None``: the default."""
        if d is None:
            return cls()
        if not isinstance(d, dict) or set(d) != {"lo", "hi", "frac_bits"}:
            raise ConfigError(f"{where}: must be {{\"lo\", \"hi\", \"frac_bits\"}}, got {d!r}")
        try:
            return cls(d["lo"], d["hi"], d["frac_bits"])
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"exact mode: every input value a multiple of 2^-{self.frac_bits} in [{self.lo:g}, {self.hi:g}] "
                "(values outside are clipped, then rounded to the grid)")

    def apply(self, x):
        """``x`` clipped to ``[lo, hi]`` and rounded to the grid (half to even); a torch tensor or a numpy array."""
        n = 2 ** self.frac_bits
        if isinstance(x, torch.Tensor):
            return torch.round(x.clamp(self.lo, self.hi) * n) / n
        return np.rint(np.clip(x, self.lo, self.hi) * n) / n


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity gradient (straight-through)."""
    return x + (torch.round(x) - x).detach()


def power_of_two_scale(w: torch.Tensor, bits: int = WEIGHT_BITS) -> torch.Tensor:
    """The smallest ``s = 2**k`` (integer ``k``) with ``max|w| / s <= 2**(bits-1) - 1``; 1 for an all-zero ``w``.
    Returned as a 0-d tensor without gradient."""
    with torch.no_grad():
        top = w.detach().abs().max().double()
        if top == 0:
            return torch.ones((), dtype=w.dtype, device=w.device)
        k = math.ceil(math.log2(float(top) / (2 ** (bits - 1) - 1)))
        return torch.tensor(2.0 ** k, dtype=w.dtype, device=w.device)


def quantize_input(x: torch.Tensor, contract: InputContract | None = None) -> torch.Tensor:
    """The exact mode's input contract applied to ``x`` (default: clip to ``[0, 1]`` and round to
    multiples of ``2**-INPUT_FRAC_BITS``; digits, ``k/16``, are already on that grid)."""
    return (contract or InputContract()).apply(x)


class _QuantWeights(nn.Module):
    """Weight and bias parameters held in float, used as ``s * round(w / s)`` (straight-through)."""

    def _init(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("mask", weight.detach() != 0)
        # the scale is at least 2**scale_floor: layers that write the residual stream share one grid
        self.register_buffer("scale_floor", torch.tensor(-1000.0))
        self.input_contract: InputContract | None = None  # the layer that reads the analog input: its contract

    def scale(self) -> torch.Tensor:
        if getattr(self, "fixed_scale", False):  # loihi2 mode: the exponent fixed at conversion (scale_floor)
            return torch.pow(2.0, self.scale_floor).to(self.weight.dtype)
        own = power_of_two_scale(self.weight * self.mask)
        return torch.maximum(own, torch.pow(2.0, self.scale_floor).to(own))

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(w, b)`` on the layer's grid: ``w = s * W``, ``W`` integer in ``[-QMAX, QMAX]``, ``b = s * B``."""
        s = self.scale()
        w = torch.clamp(_ste_round(self.weight / s), -QMAX, QMAX) * s * self.mask
        b = None if self.bias is None else _ste_round(self.bias / s) * s
        return w, b

    def integers(self) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """``(W, B, s)``: the integer weight and bias and the scale (for exports' metadata and tests)."""
        with torch.no_grad():
            w, b = self.quantized()
            s = float(self.scale())
            return torch.round(w / s), None if b is None else torch.round(b / s), s


class QuantLinear(_QuantWeights):
    """``y = x Wᵀ s + B s`` on the last dim (a ``nn.Linear`` in the exact mode)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_contract is not None:
            x = self.input_contract.apply(x)
        w, b = self.quantized()
        return F.linear(x, w, b)

    def frozen(self) -> nn.Linear:
        w, b = self.quantized()
        new = nn.Linear(self.in_features, self.out_features, bias=b is not None)
        with torch.no_grad():
            new.weight.copy_(w)
            if b is not None:
                new.bias.copy_(b)
        return new.to(self.weight.device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={WEIGHT_BITS}"


class QuantConv(_QuantWeights):
    """A folded 3x3 convolution in the exact mode, ``(T, B, C, H, W)`` with T and B merged;
    ``quantize_input`` applies the input contract to the analog input (the first convolution only;
    ``input_contract``, default :class:`InputContract`)."""

    def __init__(self, folded: FoldedConv, quantize_input: bool = False, input_contract: InputContract | None = None):
        super().__init__()
        c = folded.conv
        self.in_channels, self.out_channels = c.in_channels, c.out_channels
        self.kernel_size, self.stride, self.padding, self.dilation, self.groups = c.kernel_size, c.stride, c.padding, c.dilation, c.groups
        self.quantize_input = quantize_input
        self._init(c.weight, c.bias)
        if quantize_input:
            self.input_contract = input_contract or InputContract()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_contract is not None:
            x = self.input_contract.apply(x)
        w, b = self.quantized()
        y = F.conv2d(x.flatten(0, 1), w, b, self.stride, self.padding, self.dilation, self.groups)
        return y.view(x.shape[0], x.shape[1], *y.shape[1:])

    def frozen(self) -> FoldedConv:
        w, b = self.quantized()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
                         self.groups, bias=b is not None)
        with torch.no_grad():
            conv.weight.copy_(w)
            if b is not None:
                conv.bias.copy_(b)
        return FoldedConv(conv.to(self.weight.device))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, bits={WEIGHT_BITS}, input_contract={self.input_contract}"


def _power_of_two_decay(d: torch.Tensor) -> torch.Tensor:
    j = torch.clamp(torch.round(-torch.log2(d.double())), min=1)
    return (2.0 ** -j).to(d.dtype)


def _grid_threshold(theta: torch.Tensor) -> torch.Tensor:
    n = 2 ** THRESHOLD_FRAC_BITS
    return torch.clamp(torch.round(theta.double() * n), min=1).div(n).to(theta.dtype)


def merge_low_rank(m: LowRankLinear | LowRankConv2d, dtype: torch.dtype = torch.float64) -> nn.Linear | nn.Conv2d:
    """The dense ``nn.Linear`` with weight ``U V`` (product in ``dtype``) and ``u``'s bias: the same
    function as ``m`` up to float32 rounding of the product, ``in * out`` parameters. A
    ``LowRankConv2d`` gives the dense ``nn.Conv2d`` of its kernel, stride, padding and dilation with
    weight ``U V`` reshaped to ``(out, in, kh, kw)`` and ``u``'s bias."""
    bias = m.u.bias is not None
    if isinstance(m, LowRankConv2d):
        v = m.v
        dense = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, v.stride, v.padding, v.dilation, bias=bias)
        product = m.product(dtype)
    else:
        dense = nn.Linear(m.in_features, m.out_features, bias=bias)
        product = m.u.weight.to(dtype) @ m.v.weight.to(dtype)
    with torch.no_grad():
        dense.weight.copy_(product.to(dense.weight.dtype))
        if bias:
            dense.bias.copy_(m.u.bias)
    return dense.to(m.u.weight.device)


def power_of_two_token_mean(model: nn.Module) -> None:
    """For a token count ``N`` that is not a power of two: the head's mean over tokens becomes the
    sum times ``2**-k`` (``k = ceil(log2 N)``), and ``fc``'s weight is multiplied by ``2**k / N``
    (float64) before it is quantised, so the function is unchanged and every value stays dyadic
    (``1/N`` is not: ``sdt-1d-tiny``'s 20 tokens put the logits on a 2^-37 grid). A low-rank (DSP)
    classifier is left as it is (:func:`to_exact` merges low-rank layers before it)."""
    from .layers import Head

    head, n = getattr(model, "head", None), int(getattr(model.cfg, "tokens", 1))
    if not isinstance(head, Head) or n <= 1 or n & (n - 1) == 0 or type(head.fc) is not nn.Linear:
        return
    k = math.ceil(math.log2(n))
    with torch.no_grad():
        head.fc.weight.copy_((head.fc.weight.double() * (2.0 ** k / n)).to(head.fc.weight.dtype))
    head.token_scale = 2.0 ** -k


def default_input_contract(mode: str = "exact") -> InputContract:
    """A mode's input contract when none is given: ``[0, 1]`` (the images') on the mode's grid,
    ``2**-INPUT_FRAC_BITS`` in the exact mode and ``2**-LOIHI2_INPUT_FRAC_BITS`` in the loihi2 mode
    (:class:`~stdeploy.prune.QuantizeConfig` derives the range from the training split instead)."""
    frac = LOIHI2_INPUT_FRAC_BITS if check_mode(mode) == "loihi2" else INPUT_FRAC_BITS
    return InputContract(*INPUT_RANGE, frac)


def to_exact(model: nn.Module, input_contract: InputContract | None = None, mode: str = "exact") -> nn.Module:
    """The exact-mode copy of a finalized ``model`` (the caller's model is not changed): BatchNorm
    folded, low-rank layers merged (:func:`merge_low_rank`), every linear layer and convolution quantised, sLIF frozen to LIF, leaks rounded to
    powers of two and thresholds to the threshold grid; the layer that reads the input applies
    ``input_contract`` (default :func:`default_input_contract` of the mode: ``[0, 1]`` on ``2**-8``,
    or on ``2**-4`` in the loihi2 mode; an exact ``model`` keeps its own unless one is given). The
    copy keeps ``model``'s training mode. ``mode="loihi2"`` adds Loihi's constraints (module
    docstring): an input grid no finer than ``2**-4``, exponents fixed, thresholds on
    :func:`loihi2_threshold`'s form.

    Raises :class:`ConfigError` when a pruning mask is still attached (finalize pruning first), and
    in the loihi2 mode when a leak does not fit Loihi's 12-bit decay exactly."""
    if mode not in ("exact", "loihi2"):
        raise ConfigError(f"to_exact: mode must be exact or loihi2, got {mode!r}")
    if input_contract is not None and not isinstance(input_contract, InputContract):
        raise ConfigError(f"to_exact: input_contract must be an InputContract, got {input_contract!r} "
                          "(the quantisation mode is the keyword mode=...)")
    training = model.training
    from torch.nn.utils import parametrize

    attached = [n for n, m in model.named_modules() if parametrize.is_parametrized(m)]
    if attached:
        raise ConfigError(f"exact mode: pruning masks still attached at {', '.join(attached[:4])}; finalize pruning first")
    if is_exact(model):
        if quant_mode(model) != mode:
            raise ConfigError(f"to_exact: the model is already quantised in the {quant_mode(model)} mode, not {mode}")
        own = input_contract_of(model)
        if input_contract is None or input_contract == own:
            return copy.deepcopy(model)
        if mode == "loihi2" and own is not None and input_contract.frac_bits != own.frac_bits:
            raise ConfigError(f"to_exact: loihi2 mode: the model's thresholds are in units of its input grid "
                              f"2^-{own.frac_bits}; a contract on 2^-{input_contract.frac_bits} needs quantising the float "
                              "model again")
        return with_input_contract(model, input_contract)
    contract = input_contract or default_input_contract(mode)
    check_input_contract(contract, mode)
    new = to_lif(fold_batchnorm(model))  # a folded copy; to_lif swaps sLIF in place on it
    for fqn, m in list(new.named_modules()):   # low-rank (DSP) layers merged: one dense weight each
        if isinstance(m, LowRankLinear):
            set_submodule(new, fqn, merge_low_rank(m))
        elif isinstance(m, FoldedConv) and isinstance(m.conv, LowRankConv2d):
            m.conv = merge_low_rank(m.conv)
    power_of_two_token_mean(new)

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            fqn = f"{prefix}.{name}" if prefix else name
            if type(child) is nn.Linear:
                setattr(parent, name, QuantLinear(child))
                if fqn in INPUT_LAYERS:
                    getattr(parent, name).input_contract = contract
            elif isinstance(child, FoldedConv):
                setattr(parent, name, QuantConv(child, quantize_input=fqn in INPUT_LAYERS, input_contract=contract))
            elif isinstance(child, nn.Conv2d):
                raise UnsupportedPrimitive(f"exact mode: {fqn} is a bare Conv2d; only folded convolutions are quantised")
            else:
                walk(child, fqn)

    walk(new, "")
    with torch.no_grad():
        share_stream_scale(new)
        for lif in neurons_of(new).values():
            lif.decay_.copy_(_power_of_two_decay(lif.decay_))
            lif.threshold_.copy_(_grid_threshold(lif.threshold_))
    if mode == "loihi2":
        _to_loihi2(new)
    return new.train(training)


def input_contract_of(model: nn.Module) -> InputContract | None:
    """The input contract of an exact-mode ``model`` (None for a float model)."""
    for name, m in model.named_modules():
        if isinstance(m, _QuantWeights) and m.input_contract is not None:
            return m.input_contract
    return None


def with_input_contract(model: nn.Module, contract: InputContract) -> nn.Module:
    """A copy of the exact-mode ``model`` whose input layer applies ``contract`` (weights unchanged)."""
    if not is_exact(model):
        raise ConfigError("an input contract belongs to an exact-mode model; quantise it first (to_exact)")
    new = copy.deepcopy(model)
    layers = [m for n, m in new.named_modules() if isinstance(m, _QuantWeights) and n in INPUT_LAYERS]
    if not layers:
        raise UnsupportedPrimitive(f"exact mode: no input layer ({', '.join(INPUT_LAYERS)}) to hold an input contract")
    for m in layers:
        m.input_contract = contract
    return new


# The layers whose outputs are summed into the residual stream (with the embedding's spikes).
STREAM_WRITERS = ("embed.rpe", "blocks.*.attn.proj", "blocks.*.mlp.fc2")


def share_stream_scale(model: nn.Module) -> dict[str, float]:
    """Give every layer that writes the residual stream the coarsest of their scales.

    The neurons that read the stream sum the outputs of all of them, on the finest of their grids;
    with per-layer scales one layer with small weights makes that grid fine while the others make
    the sums large, and a deep model then needs more than 24 bits (measured: ``sdt-8-512`` with
    random weights, 2^26 at ``head.lif``). One shared scale keeps the stream on the grid of its
    largest writer; the smaller writers keep fewer significant bits."""
    import fnmatch

    writers = {n: m for n, m in model.named_modules()
               if isinstance(m, _QuantWeights) and any(fnmatch.fnmatchcase(n, p) for p in STREAM_WRITERS)}
    if not writers:
        return {}
    with torch.no_grad():
        for m in writers.values():
            m.scale_floor.fill_(-1000.0)
        top = max(float(torch.log2(m.scale())) for m in writers.values())
        for m in writers.values():
            m.scale_floor.fill_(top)
    return {n: 2.0 ** top for n in writers}


def is_exact(model: nn.Module) -> bool:
    return any(isinstance(m, _QuantWeights) for m in model.modules())


def deployable(model: nn.Module) -> nn.Module:
    """An eval-mode copy in the plain folded form that exporters know (``nn.Linear``,
    ``FoldedConv``) with the quantised values; a float model is folded as usual. The exact mode's
    input rounding is not part of it: exports state the input contract instead."""
    if not is_exact(model):
        return fold_batchnorm(model)
    new = copy.deepcopy(model).eval()

    def walk(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if isinstance(child, (QuantLinear, QuantConv)):
                setattr(parent, name, child.frozen())
            else:
                walk(child)

    with torch.no_grad():
        walk(new)
    return new


def exact_layers(model: nn.Module) -> dict[str, dict]:
    """Per quantised layer: scale exponent and integer ranges (recorded in checkpoints and exports)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, _QuantWeights):
            w, b, s = m.integers()
            out[name] = {"scale": s, "scale_exponent": int(round(math.log2(s))), "weight_int_max": int(w.abs().max()),
                         "bias_int_max": None if b is None else int(b.abs().max())}
    return out


# ----------------------------------------------------------------------------- the loihi2 mode
def quant_mode(model: nn.Module) -> str:
    """``"float"``, ``"exact"`` or ``"loihi2"`` (the exact arithmetic with Loihi's constraints)."""
    layers = [m for m in model.modules() if isinstance(m, _QuantWeights)]
    if not layers:
        return "float"
    return "loihi2" if all(getattr(m, "fixed_scale", False) for m in layers) else "exact"


def check_input_contract(contract: InputContract, mode: str) -> InputContract:
    """``contract`` if it fits ``mode``, else :class:`ConfigError` naming it. The exact mode takes
    any contract; the loihi2 mode holds inputs on ``2**-LOIHI2_INPUT_FRAC_BITS`` or a coarser grid:
    a finer one multiplies the analog first layer's currents, in units of its threshold's unit, past
    what Loihi's 24-bit ``u`` and ``v`` hold (the range itself is proven by the Lava lowering and
    the netx export, which refuse by name what does not fit)."""
    if check_mode(mode) == "loihi2" and contract.frac_bits > LOIHI2_INPUT_FRAC_BITS:
        raise ConfigError(f"loihi2 mode: input contract grid 2^-{contract.frac_bits} is finer than Loihi 2's "
                          f"2^-{LOIHI2_INPUT_FRAC_BITS} (the first layer's membrane would outgrow 24-bit u, v); "
                          f"use --input-frac-bits {LOIHI2_INPUT_FRAC_BITS} or less")
    return contract


def loihi2_threshold(theta: torch.Tensor, unit: torch.Tensor, decay: torch.Tensor, timesteps: int) -> torch.Tensor:
    """``(vth + 2**(-j (T-1))) U`` with the integer ``vth >= 0`` nearest to ``theta / U``: spiking on
    ``v >= `` it is Loihi's ``v > vth`` (in units of ``U``) for every membrane on the grid
    ``U 2**(-j (T-1))`` (``d = 2**-j``; see the module docstring)."""
    th, u, d = theta.double(), unit.double(), decay.double()
    frac = torch.pow(2.0, torch.log2(d) * (timesteps - 1))  # 2**(-j (T-1))
    vth = torch.clamp(torch.round(th / u - frac), min=0)
    return ((vth + frac) * u).to(theta.dtype)


def loihi2_units(model: nn.Module, timesteps: int | None = None) -> dict[str, torch.Tensor]:
    """Per LIF population (fully qualified name): its current unit ``U = d * s_in`` per neuron,
    where ``s_in`` is the finest grid of the quantised layers whose outputs reach the population's
    input (``s * 2**-frac_bits`` of the input contract for a layer that reads the analog input) and 1 for spike
    edges. Found structurally: one forward pass per quantised layer with that layer's output
    replaced by NaN (NaN crosses every weight, zero or not, and never crosses a spike), plus one
    with a NaN input to find the layers that read it."""
    cfg = model.cfg
    T = timesteps or cfg.timesteps
    quant = {n: m for n, m in model.named_modules() if isinstance(m, _QuantWeights)}
    lifs = neurons_of(model)
    device = next(model.parameters()).device
    x0 = torch.zeros((T, 1, *cfg.input_shape), device=device)

    def reached(run_input, replace: str | None, watch: dict[str, nn.Module]) -> set[str]:
        hit: set[str] = set()
        handles = [m.register_forward_pre_hook(lambda mod, args, n=n: hit.add(n) if torch.isnan(args[0]).any() else None)
                   for n, m in watch.items()]
        if replace is not None:
            handles.append(quant[replace].register_forward_hook(lambda mod, args, out: torch.full_like(out, float("nan"))))
        training = model.training
        try:
            with torch.no_grad():
                model.eval()(run_input)
        finally:
            model.train(training)
            for h in handles:
                h.remove()
        return hit

    analog = reached(torch.full_like(x0, float("nan")), None, quant)
    contract = input_contract_of(model) or default_input_contract("loihi2")
    grid = {n: float(m.scale()) * (contract.grid if n in analog else 1.0) for n, m in quant.items()}
    s_in = {n: 1.0 for n in lifs}
    for q in quant:
        for n in reached(x0, q, lifs):
            s_in[n] = min(s_in[n], grid[q])
    return {n: lif.decay.detach().double() * s_in[n] for n, lif in lifs.items()}


def loihi2_unit(theta, d, timesteps: int):
    """The current unit ``U`` per neuron (float64 array) of a loihi2-mode population, read back
    from its thresholds ``theta = (vth + 2**(-j (T-1))) U``: an odd multiple of ``U 2**(-j (T-1))``,
    so ``U`` is ``theta``'s lowest set bit times ``2**(j (T-1))`` (what the Lava lowering and the
    netx export use; :func:`loihi2_units` is what the model was built with)."""
    import numpy as np

    theta = np.asarray(theta, np.float64)
    mant, exp = np.frexp(np.abs(theta))
    m = (mant * 2.0 ** 53).astype(np.uint64)
    low = np.log2((m & (~m + np.uint64(1))).astype(np.float64))
    grid = np.where(theta != 0, np.power(2.0, exp - 53 + low), np.inf)
    return grid / np.power(2.0, np.log2(np.asarray(d, np.float64)) * (timesteps - 1))


def loihi2_vth(theta, d, timesteps: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Loihi's integer threshold of a loihi2-mode population: ``(U, vth)`` per neuron (float64
    arrays), with ``U`` the current unit read back from the thresholds (:func:`loihi2_unit`) and
    ``vth = theta / U - 2**(-j (T-1))`` (``d = 2**-j``), so that Lava's ``v > vth`` (in units of
    ``U``, 6 fractional bits below) is the model's ``v >= theta``. The one rule the Lava lowering
    and the netx export share; thresholds not of the form ``(vth + 2**(-j (T-1))) U`` with an
    integer ``vth >= 0`` raise :class:`UnsupportedPrimitive` naming ``where``."""
    theta = np.asarray(theta, np.float64)
    d = np.broadcast_to(np.asarray(d, np.float64), theta.shape)
    unit = loihi2_unit(theta, d, timesteps)
    vth = theta / unit - np.power(2.0, np.log2(d) * (timesteps - 1))
    if not (np.all(vth == np.rint(vth)) and np.all(vth >= 0)):
        raise UnsupportedPrimitive(f"{where}: loihi2 mode: thresholds are not Loihi integers (vth + 2^-j(T-1)) U with an "
                                   "integer vth >= 0: quantise with --quantize loihi2")
    return unit, vth


def _to_loihi2(model: nn.Module) -> None:
    """Fix every quantised layer's exponent and put every threshold on Loihi's integer form."""
    T = model.cfg.timesteps
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _QuantWeights):
                m.scale_floor.fill_(float(torch.log2(m.scale())))
                m.fixed_scale = True
        lifs = neurons_of(model)
        for name, lif in lifs.items():
            j = torch.round(-torch.log2(lif.decay.double()))
            if float(j.max()) > LOIHI2_DECAY_BITS or float(j.max()) * (T - 1) > LOIHI2_FRACTION_BITS:
                raise ConfigError(f"loihi2 mode: {name}: leak 2^-{int(j.max())} over T = {T} steps needs "
                                  f"{int(j.max()) * (T - 1)} fractional membrane bits, Loihi's LIF has {LOIHI2_FRACTION_BITS} "
                                  f"(and {LOIHI2_DECAY_BITS}-bit decays)")
        for name, unit in loihi2_units(model, T).items():
            lif = lifs[name]
            lif.threshold_.copy_(loihi2_threshold(lif.threshold_, unit, lif.decay_, T))
