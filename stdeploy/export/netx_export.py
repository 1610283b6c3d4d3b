"""lava-dl ``netx`` export: the spiking chain of a model as the HDF5 file ``netx.h5``.

lava-dl's ``lava.lib.dl.netx.hdf5.Network(net_config="netx.h5")`` reads it and builds Lava
processes: an ``Input`` block (a CUBA LIF population fed straight from a source), then ``Dense`` or
``Conv`` blocks (a synapse process and a CUBA LIF population each), in the order of
``layer/0, layer/1, ...``. Run it with ``Loihi2SimCfg(select_tag="fixed_pt")``: netx's blocks
have bit-accurate integer models only.

What netx can hold
------------------
A chain: synaptic layer -> LIF -> synaptic layer -> LIF ... with one decay per layer. Of our
models that is the dense stem (``mlp-tiny``) and the convolutional stem up to its position
embedding, with ``depth = 0`` also the head (``conv-tiny``). Pruned layers keep their zeros; a
low-rank (DSP) layer is multiplied out into one dense weight (``U V`` in float64), a low-rank
convolution (``LowRankConv2d``: ``k x k`` then 1x1) likewise into one dense convolution of the
layer's kernel: netx has no low-rank layer, so the file holds and Loihi computes the dense layer. The position embedding's residual
``x + conv(x)`` reads the same spikes on both paths, so it is one convolution with the identity
added to its centre tap (exact). A max-pool of spikes is a logical OR: a depthwise 2x2 stride-2
convolution of ones into a memoryless CUBA population with ``vThMant = 0``. Anything else
(attention blocks: spike products, residual adds around multi-layer branches; per-neuron leaks
of sLIF) is refused with :class:`UnsupportedPrimitive` naming the first module.
``part="stem"`` exports the stem alone (the conv stages up to their last LIF or pool) as a
sub-network of any model, attention or not.

The host's two ends (not netx layers; stored in the same file under ``host/``, which netx ignores)
--------------------------------------------------------------------------------------------------
* ``host/encoder``: the first synaptic layer sees the analog frame (direct encoding), which Loihi
  cannot take as spikes. The host computes the integer current of the first population per step,
  ``a = clip(rint(W_e x + b_e), -2**15, 2**15 - 1)`` (``W_e``, ``b_e`` already scaled, float32;
  ``op`` ``linear`` on the frame flattened in (C, H, W) order, or ``conv2d`` with the stored
  stride/padding) and feeds it to the ``Input`` block's neuron, ``net.layers[0].neuron.a_in``
  (shape in netx's (W, H, C) order: transpose the (C, H, W) current; :func:`netx_input_data`).
  Not ``net.inp``: lava-dl 0.6's ``Input`` block never connects its ``inp`` port to its neuron,
  and a network fed through it does not compile (lava-dl is archived; no fix will come).
  Graded spikes into the first ``dense`` block are no way round either: Lava 0.10's bit-accurate
  ``Dense`` model declares a 1-bit input port, and graded payloads sent to it came out as wrong
  sums when tried (Loihi2SimCfg, ``fixed_pt``).
* ``host/readout`` (whole models only): ``logits = mean over steps and tokens of the last layer's
  spikes @ weight.T + bias`` (float32), the model's linear classifier.

Integer arithmetic (Loihi's CUBA, as Lava's ``PyLifModelBitAcc`` computes it; the documented
equations the reference :func:`loihi_reference` implements)::

    u[t] = a[t] << 6                                  (iDecay = 4096: the current decays fully)
    v[t] = sign(v') * (|v'| >> 12) + u[t] + (bias << 6),  v' = v[t-1] * (4096 - vDecay)
    v clipped to +-(2**23 - 1);  s[t] = v[t] > (vThMant << 6);  v[t] = 0 where s[t]
    a[t] = W s_prev[t - 1]  (every synaptic layer delays by one step; the Input block does not)

Our LIF (``v = (1 - d) v + d x``, spike ``v >= theta``, reset 0) maps onto it with the membrane
scaled so that the threshold is the integer ``vThMant = V``: ``vDecay = rint(4096 d)``, weights
``rint(d V W / theta)`` (per output neuron, so per-neuron thresholds fold into the rows), bias
``rint(d V b / theta)``. ``V`` per layer is the largest value at which the weights fit 8 signed
bits (|w| <= 127), the bias 13 bits (|bias| <= 4095), ``V <= 2**17 - 1``, and every current fits
Lava's 16-bit ``a_in`` (row sums of |w| plus |bias| <= 2**15 - 1). Differences from the float
model: weight and current rounding, Loihi's truncating decay and its strict ``v > vth`` (ours
``v >= theta``); the export reports the spike agreement on its validation input.

Loihi 2 mode models: the trained integers, spike-exact
------------------------------------------------------
A model quantised with ``--quantize loihi2`` (:mod:`stdeploy.models.quantize`; ``to_netx(...,
quantize={"mode": "loihi2", ...})``) is not re-scaled or re-rounded: each population's unit is its
current unit ``U = d s_in``, read back from its threshold ``theta = (vth + 2**(-j (T-1))) U``
(:func:`stdeploy.models.quantize.loihi2_vth`, the rule the Lava lowering uses too), so ``vThMant = vth``,
weights ``d w / U`` (the layer's 8-bit mantissas) and biases ``d b / U`` are integers that the
export checks (exactly, never rounded) and refuses by name where they do not fit netx
(``|w| <= 127``, ``|bias| <= 4095``, one threshold per layer: sLIF's per-neuron thresholds are
refused). The host encoder's currents ``d (w x + b) / U`` are integers for inputs on the model's
input contract (the manifest's ``quantize.input_range`` / ``input_frac_bits``; the mode's default
grid ``2**-4``), which the encoder records (``encoder["input_contract"]``). This is the arithmetic of our Lava fixed-point lowering of the same model (Loihi's
units there too), so the two give the same spikes; on Lava, load the network with
``hdf5.Network(net_config=..., reset_interval=T)`` to run samples back to back as separate
samples (each layer's ``u`` and ``v`` reset at its first step of a sample, which also discards
what a layer integrates of its bias before its first input arrives). The export's own check then
demands 0 spike mismatches against PyTorch.

Timing: a chain of ``L`` layers after the input block emits the model's step ``t`` at Lava step
``t + L`` (``depth`` in the file's ``host`` attributes); run ``T + depth`` steps with zero current
after the ``T`` input steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, UnsupportedPrimitive
from ..models.fold import FoldedConv
from ..models.quantize import loihi2_vth
from ..models.structure import LowRankConv2d, LowRankLinear
from ..neurons import LIF

__all__ = ["NETX_FILE", "NetxLayer", "NetxNetwork", "to_netx", "write_netx", "read_netx", "host_currents",
           "loihi_reference", "readout_logits", "netx_input_data"]

NETX_FILE = "netx.h5"
DECAY_UNITY = 4096            # Loihi's 12-bit decays: vDecay = rint(4096 d); iDecay 4096 is a full current decay
WEIGHT_MAX = 127              # 8-bit signed synaptic weights
BIAS_MAX = 4095               # 13-bit signed bias mantissa (bias_exp 6: bias << 6)
VTH_MAX = 2 ** 17 - 1         # vThMant << 6 must stay within the 24-bit membrane
CURRENT_MAX = 2 ** 15 - 1     # Lava's LIF a_in is 16 bits
V_PREFERRED = 2 ** 12         # the first population's scale when its currents allow (its weights stay on the host)
STATE_MAX = 2 ** 23 - 1       # 24-bit u and v
PARTS = ("model", "stem")


@dataclass(frozen=True)
class NetxLayer:
    """One netx layer: ``kind`` ``input`` (a population fed by the host), ``dense`` or ``conv``.

    ``shape`` is ours, channel first ((n,) or (C, H, W)); ``weight`` integers ((out, in) or
    (out, in/groups, kh, kw)); ``bias`` integers per channel ``(shape[0],)`` or None; ``vth``,
    ``v_decay`` and ``i_decay`` Loihi's integer ``vThMant``, ``vDecay``, ``iDecay``."""

    name: str
    kind: str
    shape: tuple[int, ...]
    vth: int
    v_decay: int
    i_decay: int = DECAY_UNITY
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    groups: int = 1

    def __post_init__(self):
        if self.kind not in ("input", "dense", "conv"):
            raise ConfigError(f"netx layer {self.name}: kind must be input, dense or conv, got {self.kind!r}")
        if not 0 <= self.vth <= VTH_MAX:
            raise ConfigError(f"netx layer {self.name}: vThMant {self.vth} outside [0, {VTH_MAX}]")
        if not 0 <= self.v_decay <= DECAY_UNITY or not 0 <= self.i_decay <= DECAY_UNITY:
            raise ConfigError(f"netx layer {self.name}: decays must lie in [0, {DECAY_UNITY}]")
        if (self.weight is None) != (self.kind == "input"):
            raise ConfigError(f"netx layer {self.name}: an input layer has no weight, a {self.kind} layer needs one")
        if self.weight is not None and int(np.abs(self.weight).max(initial=0)) > WEIGHT_MAX:
            raise ConfigError(f"netx layer {self.name}: weights beyond 8 signed bits (|w| <= {WEIGHT_MAX})")
        if self.bias is not None and (tuple(self.bias.shape) != tuple(self.shape[:1]) or int(np.abs(self.bias).max(initial=0)) > BIAS_MAX):
            raise ConfigError(f"netx layer {self.name}: bias must be one per channel ({self.shape[0]}) with |bias| <= {BIAS_MAX}")


@dataclass(frozen=True)
class NetxNetwork:
    """The chain netx holds plus the host's ends (see the module docstring)."""

    layers: tuple[NetxLayer, ...]
    encoder: dict                     # {"op": "linear"|"conv2d", "weight", "bias", "stride", "padding"} (floats)
    readout: dict | None = None       # {"weight", "bias"} (floats) or None (a sub-network)
    part: str = "model"
    modules: dict = field(default_factory=dict)   # netx layer -> our module names it holds
    exact: bool = False               # loihi2 mode: the model's integers (spike-exact against it), not re-rounded

    def __post_init__(self):
        if not self.layers or self.layers[0].kind != "input" or any(l.kind == "input" for l in self.layers[1:]):
            raise ConfigError("a netx network starts with exactly one input layer")
        if self.part not in PARTS:
            raise ConfigError(f"netx part must be one of {', '.join(PARTS)}, got {self.part!r}")

    @property
    def depth(self) -> int:
        """Steps by which the last layer lags the first (one per synaptic layer)."""
        return len(self.layers) - 1


# ----------------------------------------------------------------------------- model -> chain
def _lif_params(lif: nn.Module, name: str) -> tuple[float, np.ndarray]:
    if not isinstance(lif, LIF):
        raise UnsupportedPrimitive(f"{name}: {type(lif).__name__} is not a LIF population netx can hold")
    d = lif.decay.detach().double().numpy()
    if not np.all(d == d[0]):
        raise UnsupportedPrimitive(f"{name}: per-neuron leaks (sLIF); netx's CUBA layer has one vDecay per layer")
    return float(d[0]), lif.threshold.detach().double().numpy()


def _scale(d: float, theta: np.ndarray, w: np.ndarray, b: np.ndarray, per_row_in: int | None) -> int:
    """The largest integer membrane scale ``V`` at which ``rint(d V w / theta)`` and the bias fit
    their bits and every current fits 16 bits (inputs are spikes)."""
    rows = (d / theta).reshape(-1, *([1] * (w.ndim - 1)))
    wr, br = np.abs(rows * w), np.abs(d / theta * b)
    limits = [VTH_MAX, WEIGHT_MAX / max(float(wr.max(initial=0.0)), 1e-30)]
    if np.any(br):
        limits.append(BIAS_MAX / float(br.max()))
    gain = float((wr.reshape(wr.shape[0], -1).sum(1) + br).max(initial=0.0))
    limits.append((CURRENT_MAX - (per_row_in or 0)) / max(gain, 1e-30))  # headroom for rint's half units
    return max(1, int(math.floor(min(limits))))


def _loihi2_params(lif: nn.Module, name: str, timesteps: int) -> tuple[float, float, int]:
    """``(d, U, vth)`` of a loihi2-mode population (module docstring); refuses what netx cannot hold."""
    d, theta = _lif_params(lif, name)
    unit, vth = loihi2_vth(theta, d, timesteps, name)
    if not (np.all(unit == unit[0]) and np.all(vth == vth[0])):
        raise UnsupportedPrimitive(f"{name}: per-neuron thresholds (sLIF); a netx CUBA layer has one vThMant")
    return d, float(unit[0]), int(vth[0])


def _loihi2_integers(name: str, a: np.ndarray, limit: int, what: str) -> np.ndarray:
    q = np.rint(a)
    if not np.array_equal(q, a):
        raise UnsupportedPrimitive(f"{name}: loihi2 mode: {what} are not integers in the population's current unit")
    if float(np.abs(q).max(initial=0.0)) > limit:
        raise UnsupportedPrimitive(f"{name}: loihi2 mode: {what} reach {int(np.abs(q).max()):,}, beyond netx's |{what}| <= {limit}")
    return q.astype(np.int64)


def _synaptic(name: str, kind: str, w: np.ndarray, b: np.ndarray, lif, lif_name: str, shape, timesteps: int = 0, **geom) -> NetxLayer:
    if timesteps:  # loihi2 mode: the model's own integers
        d, unit, vth = _loihi2_params(lif, lif_name, timesteps)
        q = _loihi2_integers(name, d * w / unit, WEIGHT_MAX, "weights")
        bias = _loihi2_integers(name, d * b / unit, BIAS_MAX, "bias")
        return NetxLayer(name=name, kind=kind, shape=tuple(shape), vth=vth, v_decay=int(round(DECAY_UNITY * d)),
                         weight=q, bias=bias if np.any(bias) else None, **geom)
    d, theta = _lif_params(lif, lif_name)
    fan_in = int(np.prod(w.shape[1:]))
    v = _scale(d, theta, w, b, fan_in)
    rows = (d * v / theta).reshape(-1, *([1] * (w.ndim - 1)))
    q = np.rint(rows * w).astype(np.int64)
    bias = np.rint(d * v / theta * b).astype(np.int64)
    return NetxLayer(name=name, kind=kind, shape=tuple(shape), vth=v, v_decay=int(round(DECAY_UNITY * d)),
                     weight=q, bias=bias if np.any(bias) else None, **geom)


def _conv(m: nn.Module, name: str) -> tuple[nn.Conv2d, np.ndarray, np.ndarray]:
    """``(conv, weight, bias)``: the convolution whose kernel, stride, padding and groups netx
    takes, and its weight ``(out, in, kh, kw)`` and bias in float64; a low-rank ``LowRankConv2d``
    (DSP) is multiplied out, ``U V`` in float64 (netx has no low-rank layer), with ``v``'s geometry."""
    conv = m.conv if isinstance(m, FoldedConv) else m
    if isinstance(conv, LowRankConv2d) and conv.u.bias is not None:
        w, b = conv.product(torch.float64).detach().numpy(), conv.u.bias.detach().double().numpy()
        conv = conv.v
    elif isinstance(conv, nn.Conv2d) and conv.bias is not None:
        w, b = conv.weight.detach().double().numpy(), conv.bias.detach().double().numpy()
    else:
        raise UnsupportedPrimitive(f"{name}: {type(m).__name__} is not a folded convolution (fold BatchNorm first)")
    if tuple(conv.dilation) != (1, 1) or isinstance(conv.padding, str):
        raise UnsupportedPrimitive(f"{name}: dilated or string-padded convolutions are not exported to netx")
    return conv, w, b


def _linear(m: nn.Module, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(weight (out, in), bias (out,))`` in float64; a low-rank ``U V`` (DSP) is multiplied out
    (netx has no low-rank layer; the product is then rounded to 8 bits like any weight)."""
    if type(m) is nn.Linear and m.bias is not None:
        return m.weight.detach().double().numpy(), m.bias.detach().double().numpy()
    if isinstance(m, LowRankLinear) and m.u.bias is not None:
        w = m.u.weight.detach().double() @ m.v.weight.detach().double()
        return w.numpy(), m.u.bias.detach().double().numpy()
    raise UnsupportedPrimitive(f"{name}: {type(m).__name__} is not a folded dense layer netx can hold (fold BatchNorm first)")


def _out_hw(h: int, w: int, conv: nn.Conv2d) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def to_netx(model: nn.Module, part: str = "model", quantize: dict | None = None) -> NetxNetwork:
    """The netx chain of a folded (BatchNorm-free) model: the whole model (``depth = 0``) or its
    stem (``part="stem"``). Raises :class:`UnsupportedPrimitive` naming the first module netx
    cannot hold. ``quantize`` (the export manifest's ``quantize``) with ``mode == "loihi2"``: the
    model's own integers in Loihi's units, exactly (module docstring)."""
    loihi2 = isinstance(quantize, dict) and quantize.get("mode") == "loihi2"
    T = int(model.cfg.timesteps) if loihi2 else 0
    if part not in PARTS:
        raise ConfigError(f"--netx-part must be one of {', '.join(PARTS)}, got {part!r}")
    cfg = model.cfg
    if part == "model" and cfg.depth > 0:
        raise UnsupportedPrimitive("blocks.0.attn: attention (spike products) and the residual adds around it are not "
                                   "a netx chain; export the stem alone with --netx-part stem")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise UnsupportedPrimitive("netx export needs the BatchNorm-folded model (stdeploy.models.fold.fold_batchnorm)")
    layers: list[NetxLayer] = []
    modules: dict[str, list[str]] = {}
    enc: dict
    if cfg.stem == "dense":
        fcs, lifs = model.embed.fcs, list(model.embed.lifs)
        if part == "stem" and not lifs:
            raise UnsupportedPrimitive("embed: a dense stem with one layer has no spiking layer to export")
        pops = lifs + ([model.head.lif] if part == "model" else [])
        names = [f"embed.lifs.{i}" for i in range(len(lifs))] + (["head.lif"] if part == "model" else [])
        fc_names = [f"embed.fcs.{i}" for i in range(len(fcs))]
        w0, b0 = _linear(fcs[0], fc_names[0])
        d, theta = _lif_params(pops[0], names[0])
        enc = _encoder_loihi2("linear", w0, b0, pops[0], names[0], T) if loihi2 else _encoder_linear(w0, b0, d, theta)
        layers.append(NetxLayer(name="input", kind="input", shape=(w0.shape[0],), vth=enc.pop("vth"),
                                v_decay=int(round(DECAY_UNITY * d))))
        modules["input"] = [fc_names[0], names[0]]
        for i in range(1, len(pops)):
            w, b = _linear(fcs[i], fc_names[i])
            layers.append(_synaptic(f"dense{i}", "dense", w, b, pops[i], names[i], (w.shape[0],), timesteps=T))
            modules[f"dense{i}"] = [fc_names[i], names[i]]
    else:
        if cfg.input_dims != 2:
            raise UnsupportedPrimitive("embed.stages.0: 1-D stems are not exported to netx (2-D convolutions only)")
        h = w_ = cfg.image_size
        stages = model.embed.stages
        for i, stage in enumerate(stages):
            cname, lname = f"embed.stages.{i}.conv", f"embed.stages.{i}.lif"
            conv, w, b = _conv(stage.conv, cname)
            h, w_ = _out_hw(h, w_, conv)
            shape = (w.shape[0], h, w_)
            geom = {"stride": tuple(conv.stride), "padding": tuple(conv.padding), "groups": int(conv.groups)}
            if i == 0:
                d, theta = _lif_params(stage.lif, lname)
                enc = (_encoder_loihi2("conv2d", w, b, stage.lif, lname, T, **geom) if loihi2
                       else _encoder_conv(w, b, d, theta, **geom))
                layers.append(NetxLayer(name="input", kind="input", shape=shape, vth=enc.pop("vth"),
                                        v_decay=int(round(DECAY_UNITY * d))))
                modules["input"] = [cname, lname]
            else:
                layers.append(_synaptic(f"conv{i}", "conv", w, b, stage.lif, lname, shape, timesteps=T, **geom))
                modules[f"conv{i}"] = [cname, lname]
            if not isinstance(stage.pool, nn.Identity):
                kh, kw = stage.pool.kernel
                c = shape[0]
                h, w_ = h // kh, w_ // kw
                layers.append(NetxLayer(name=f"pool{i}", kind="conv", shape=(c, h, w_), vth=0, v_decay=DECAY_UNITY - 1,
                                        weight=np.ones((c, 1, kh, kw), np.int64), stride=(kh, kw), groups=c))
                modules[f"pool{i}"] = [f"embed.stages.{i}.pool"]
        if part == "model":  # x + rpe(x): the identity joins the centre tap; then the head's LIF
            conv, w, b = _conv(model.embed.rpe, "embed.rpe")
            if tuple(conv.stride) != (1, 1) or any(2 * p + 1 != k for p, k in zip(conv.padding, conv.kernel_size)):
                raise UnsupportedPrimitive("embed.rpe: the residual x + rpe(x) needs a same-size convolution")
            w = w.copy()
            kh, kw = conv.kernel_size
            for c in range(w.shape[0]):
                w[c, c, kh // 2, kw // 2] += 1.0
            shape = (w.shape[0], h, w_)
            layers.append(_synaptic("conv_rpe", "conv", w, b, model.head.lif, "head.lif", shape, timesteps=T,
                                    stride=(1, 1), padding=tuple(conv.padding), groups=1))
            modules["conv_rpe"] = ["embed.rpe", "embed (residual x + rpe(x))", "head.lif"]
    readout = None
    if part == "model":
        w, b = _linear(model.head.fc, "head.fc")   # a DSP-factored classifier multiplied out
        readout = {"weight": w.astype(np.float32), "bias": b.astype(np.float32)}
    if loihi2:  # the input contract the integer currents assume (the manifest's, a loihi2 model's own)
        from .exact import manifest_input_contract

        enc["input_contract"] = manifest_input_contract({"quantize": quantize}).to_dict()
    return NetxNetwork(layers=tuple(layers), encoder=enc, readout=readout, part=part, modules=modules,
                       exact=loihi2)


def _encoder_loihi2(op: str, w: np.ndarray, b: np.ndarray, lif, name: str, timesteps: int, stride=(1, 1), padding=(0, 0),
                    groups: int = 1) -> dict:
    """The host encoder of a loihi2-mode model: ``d (w x + b) / U``, integers for inputs on the
    mode's grid (weights and bias on the layer's grid times ``d / U``, exact in float32)."""
    if groups != 1:
        raise UnsupportedPrimitive(f"{name}: a grouped first convolution is not exported to netx")
    d, unit, vth = _loihi2_params(lif, name, timesteps)
    f = d / unit
    enc = {"op": op, "weight": (f * w).astype(np.float32), "bias": (f * b).astype(np.float32), "vth": vth}
    if not (np.array_equal(enc["weight"].astype(np.float64), f * w) and np.array_equal(enc["bias"].astype(np.float64), f * b)):
        raise UnsupportedPrimitive(f"{name}: loihi2 mode: the encoder's weights are not exact in float32")
    if op == "conv2d":
        enc.update(stride=list(stride), padding=list(padding))
    return enc


def _encoder_linear(w: np.ndarray, b: np.ndarray, d: float, theta: np.ndarray) -> dict:
    gain = float((np.abs(w).sum(1) + np.abs(b)).max() * (d / theta).max())   # inputs assumed in [-1, 1]
    v = int(max(1, min(V_PREFERRED, VTH_MAX, math.floor((CURRENT_MAX - 1) / max(gain, 1e-30)))))
    rows = d * v / theta
    return {"op": "linear", "weight": (rows[:, None] * w).astype(np.float32), "bias": (rows * b).astype(np.float32), "vth": v}


def _encoder_conv(w: np.ndarray, b: np.ndarray, d: float, theta: np.ndarray, stride, padding, groups) -> dict:
    if groups != 1:
        raise UnsupportedPrimitive("embed.stages.0.conv: a grouped first convolution is not exported to netx")
    gain = float((np.abs(w).reshape(w.shape[0], -1).sum(1) + np.abs(b)).max() * (d / theta).max())
    v = int(max(1, min(V_PREFERRED, VTH_MAX, math.floor((CURRENT_MAX - 1) / max(gain, 1e-30)))))
    rows = d * v / theta
    return {"op": "conv2d", "weight": (rows[:, None, None, None] * w).astype(np.float32), "bias": (rows * b).astype(np.float32),
            "stride": list(stride), "padding": list(padding), "vth": v}


# ----------------------------------------------------------------------------- file
def _string(group, key: str, value: str) -> None:
    group.create_dataset(key, (1,), "S10", [value.encode("ascii")])


def write_netx(net: NetxNetwork, path: str | Path) -> Path:
    """Write ``net`` in the layout netx reads (``layer/i/{type, shape, weight, bias, stride, padding,
    dilation, groups, neuron/{type, iDecay, vDecay, vThMant, refDelay, gradedSpike}}``, a ``flatten``
    layer before a dense layer fed by a (C, H, W) layer (netx flattens in (C, H, W) order); shapes
    channel first as netx expects them, i.e. reversed (W, H, C) inside netx) plus ``host/``."""
    import h5py

    path = Path(path)
    with h5py.File(path, "w") as f:
        layers = f.create_group("layer")
        i = 0
        for k, layer in enumerate(net.layers):
            if layer.kind == "dense" and len(net.layers[k - 1].shape) > 1:  # (C, H, W) spikes into a dense layer
                _string(layers.create_group(str(i)), "type", "flatten")
                i += 1
            g = layers.create_group(str(i))
            i += 1
            _string(g, "type", layer.kind)
            g.create_dataset("shape", data=np.array(layer.shape, np.int64))
            g.attrs["stdeploy_name"] = layer.name
            g.attrs["stdeploy_modules"] = ", ".join(net.modules.get(layer.name, []))
            if layer.weight is not None:
                g.create_dataset("weight", data=layer.weight.astype(np.float64))
            if layer.bias is not None:
                g.create_dataset("bias", data=layer.bias.astype(np.float64))
            if layer.kind == "conv":
                g.create_dataset("stride", data=np.array(layer.stride, np.int64))
                g.create_dataset("padding", data=np.array(layer.padding, np.int64))
                g.create_dataset("dilation", data=np.array([1, 1], np.int64))
                g.create_dataset("groups", data=np.int64(layer.groups))
            n = g.create_group("neuron")
            _string(n, "type", "CUBA")
            n.create_dataset("iDecay", data=np.int64(layer.i_decay))
            n.create_dataset("vDecay", data=np.int64(layer.v_decay))
            n.create_dataset("vThMant", data=np.int64(layer.vth))
            n.create_dataset("refDelay", data=np.int64(1))
            n.create_dataset("gradedSpike", data=False)
        host = f.create_group("host")
        host.attrs["part"] = net.part
        host.attrs["depth"] = net.depth
        host.attrs["exact"] = net.exact
        host.attrs["contract"] = ("current of layer/0 per step: clip(rint(encoder(x)), -32768, 32767); logits (whole "
                                  "models): mean over steps and tokens of the last layer's spikes @ readout/weight.T + readout/bias")
        enc = host.create_group("encoder")
        _string(enc, "op", net.encoder["op"])
        for k in ("weight", "bias"):
            enc.create_dataset(k, data=np.asarray(net.encoder[k], np.float32))
        for k in ("stride", "padding"):
            if k in net.encoder:
                enc.create_dataset(k, data=np.array(net.encoder[k], np.int64))
        if net.readout is not None:
            ro = host.create_group("readout")
            for k in ("weight", "bias"):
                ro.create_dataset(k, data=np.asarray(net.readout[k], np.float32))
    return path


def read_netx(path: str | Path) -> NetxNetwork:
    """The network a ``netx.h5`` file holds, as written by :func:`write_netx` (validated again)."""
    import h5py

    def one(ds):
        v = ds[()]
        return v[0] if getattr(v, "shape", ()) else v

    layers = []
    with h5py.File(path, "r") as f:
        for i in range(len(f["layer"])):
            g = f["layer"][str(i)]
            kind = one(g["type"]).decode("ascii")
            if kind == "flatten":
                continue
            geom = {}
            if kind == "conv":
                geom = {"stride": tuple(int(s) for s in g["stride"][()]), "padding": tuple(int(p) for p in g["padding"][()]),
                        "groups": int(g["groups"][()])}
            n = g["neuron"]
            layers.append(NetxLayer(
                name=str(g.attrs.get("stdeploy_name", f"layer{i}")), kind=kind, shape=tuple(int(s) for s in g["shape"][()]),
                vth=int(n["vThMant"][()]), v_decay=int(n["vDecay"][()]), i_decay=int(n["iDecay"][()]),
                weight=g["weight"][()].astype(np.int64) if "weight" in g else None,
                bias=g["bias"][()].astype(np.int64) if "bias" in g else None, **geom))
        h = f["host"]
        e = h["encoder"]
        enc = {"op": one(e["op"]).decode("ascii"), "weight": e["weight"][()], "bias": e["bias"][()]}
        for k in ("stride", "padding"):
            if k in e:
                enc[k] = [int(s) for s in e[k][()]]
        readout = {k: h["readout"][k][()] for k in ("weight", "bias")} if "readout" in h else None
        part = str(h.attrs["part"])
        exact = bool(h.attrs.get("exact", False))
    return NetxNetwork(layers=tuple(layers), encoder=enc, readout=readout, part=part, exact=exact)


# ----------------------------------------------------------------------------- host ends and the integer reference
def host_currents(net: NetxNetwork, x: torch.Tensor) -> np.ndarray:
    """Integer currents of the input layer, ``(T, B, *shape)`` int64, from frames ``x (T, B, C, H, W)``."""
    xs = x.detach().double().flatten(0, 1)  # (T*B, C, H, W)
    w, b = torch.from_numpy(net.encoder["weight"]).double(), torch.from_numpy(net.encoder["bias"]).double()
    if net.encoder["op"] == "linear":
        a = xs.flatten(1) @ w.T + b
    else:
        a = torch.nn.functional.conv2d(xs, w, b, stride=tuple(net.encoder["stride"]), padding=tuple(net.encoder["padding"]))
    a = torch.clamp(torch.round(a), -CURRENT_MAX - 1, CURRENT_MAX)  # round half to even, as numpy's rint
    return a.reshape(x.shape[0], x.shape[1], *net.layers[0].shape).numpy().astype(np.int64)


def _decay(v: np.ndarray, dv: int) -> np.ndarray:
    p = v * (DECAY_UNITY - dv)
    return np.sign(p) * (np.abs(p) >> 12)


def loihi_reference(net: NetxNetwork, currents: np.ndarray, steps: int | None = None,
                    reset_interval: int | None = None) -> list[np.ndarray]:
    """Every layer's spikes ``(S, B, *shape)`` (uint8) for ``S = steps`` (default ``T + depth``)
    Lava steps, the input layer fed ``currents (T, B, *shape)`` then zeros: Loihi's CUBA integer
    equations of the module docstring, in numpy (no Lava). ``reset_interval = R``: layer ``k``
    sets ``u`` and ``v`` to 0 before integrating at steps ``k, k + R, ...`` (netx's
    ``hdf5.Network(reset_interval=R)``, Lava's ``LIFReset``)."""
    t_in, batch = currents.shape[:2]
    steps = t_in + net.depth if steps is None else steps
    u = [np.zeros((batch, *l.shape), np.int64) for l in net.layers]
    v = [np.zeros((batch, *l.shape), np.int64) for l in net.layers]
    prev = [np.zeros((batch, *l.shape), np.int64) for l in net.layers]
    out = [np.zeros((steps, batch, *l.shape), np.uint8) for l in net.layers]
    for t in range(steps):
        now = []
        for k, layer in enumerate(net.layers):
            if reset_interval and t >= k and (t - k) % reset_interval == 0:
                u[k][...] = 0
                v[k][...] = 0
            if layer.kind == "input":
                a = currents[t] if t < t_in else np.zeros_like(u[k])
            elif layer.kind == "dense":
                a = prev[k - 1].reshape(batch, -1) @ layer.weight.T
            else:
                a = torch.nn.functional.conv2d(torch.from_numpy(prev[k - 1]).double(), torch.from_numpy(layer.weight).double(),
                                               stride=layer.stride, padding=layer.padding, groups=layer.groups)
                a = np.rint(a.numpy()).astype(np.int64)
            a = a.reshape(batch, *layer.shape)
            uu = _decay(u[k], layer.i_decay) + (a << 6)
            u[k] = np.where(uu > STATE_MAX + 1, uu - 2 * (STATE_MAX + 1), np.where(uu <= -(STATE_MAX + 1), uu + 2 * (STATE_MAX + 1), uu))
            bias = 0 if layer.bias is None else layer.bias.reshape(1, -1, *([1] * (len(layer.shape) - 1))) << 6
            v[k] = np.clip(_decay(v[k], layer.v_decay) + u[k] + bias, -STATE_MAX, STATE_MAX)
            s = v[k] > (layer.vth << 6)
            v[k][s] = 0
            out[k][t] = s
            now.append(s.astype(np.int64))
        prev = now
    return out


def readout_logits(net: NetxNetwork, spikes: np.ndarray) -> np.ndarray:
    """Logits ``(B, classes)`` from the last layer's spikes over the model's steps ``(T, B, *shape)``."""
    if net.readout is None:
        raise ConfigError("a netx sub-network (part 'stem') has no readout")
    s = spikes.astype(np.float64)
    feats = s.reshape(*s.shape[:3], -1).mean(-1) if s.ndim == 5 else s  # (T, B, D): mean over tokens (h, w)
    return (feats.mean(0) @ net.readout["weight"].T.astype(np.float64) + net.readout["bias"]).astype(np.float32)


def netx_input_data(currents: np.ndarray, steps: int) -> np.ndarray:
    """One sample's currents ``(T, *shape)`` as the data of a Lava ``io.source.RingBuffer`` feeding
    ``net.layers[0].neuron.a_in``: netx's (W, H, C) order, time last, zeros after ``T``: ``(*reversed shape, steps)``."""
    t_in = currents.shape[0]
    data = np.zeros((*currents.shape[1:][::-1], steps), np.int64)
    data[..., :t_in] = np.moveaxis(currents.transpose(0, *range(currents.ndim - 1, 0, -1)), 0, -1)
    return data


def model_spikes(net: NetxNetwork, out: np.ndarray) -> torch.Tensor:
    """The last layer's spikes ``(S, B, *shape)`` of the Lava run or the reference, aligned to the
    model's steps and laid out as its head spikes ``(T, B, N, D)`` (tokens from (C, h, w))."""
    s = torch.from_numpy(out[net.depth:].astype(np.float32))
    if s.dim() == 3:
        return s.unsqueeze(2)
    return s.flatten(3).transpose(2, 3)
