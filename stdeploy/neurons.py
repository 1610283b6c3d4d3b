"""Leaky integrate-and-fire neurons: one pure step function, two thin multi-step modules.

The dynamics, in discrete time with step ``dt`` (one timestep of the model)::

    v[t] = (1 - d) * v[t-1] + d * x[t]        # decay-input leak, d = dt / tau in (0, 1)
    s[t] = H(v[t] - theta)                    # spike when the membrane reaches the threshold
    v[t] = v[t] * (1 - s[t])                  # hard reset to 0

``H`` is the Heaviside step in the forward pass; its gradient is replaced by the derivative of a
sigmoid of slope ``alpha`` (a surrogate gradient) so the network trains with backpropagation
through time.

* :class:`LIF` holds ``d`` and ``theta`` as fixed buffers (scalar or per neuron).
* :class:`SLIF` runs the same step with *learnable per-neuron* ``theta`` and ``d`` (intrinsic
  plasticity) that train together with the weights. They stay valid by construction::

      theta = theta0 * exp(a)       > 0 for every a
      d     = d0 ** exp(b)          in (0, 1) for every b, since d0 in (0, 1)

  with ``a = b = 0`` at conversion, which gives ``theta0`` and ``d0`` exactly, so an sLIF built
  from a LIF fires identically until it is trained.

"Per neuron" means per feature channel: parameters vary along ``channel_dim`` and are shared by
every token or pixel of that channel, as a convolution shares its weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LIFParams", "lif_step", "lif_inference", "spike_fn", "LIF", "SLIF", "to_slif", "to_lif", "neurons_of"]


class _SpikeFn(torch.autograd.Function):
    """Heaviside forward, sigmoid-derivative surrogate backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        sig = torch.sigmoid(ctx.alpha * x)
        return grad * ctx.alpha * sig * (1 - sig), None


def spike_fn(x: torch.Tensor, alpha: float = 4.0) -> torch.Tensor:
    """``H(x)`` (1 where ``x >= 0``) with a sigmoid-derivative surrogate gradient of slope ``alpha``.
    Without autograd (inference, export) it is a plain comparison, which exporters trace as one op."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _SpikeFn.apply(x, alpha)
    return (x >= 0).to(x.dtype)


@dataclass(frozen=True)
class LIFParams:
    """Parameters of one step. ``decay`` is ``d = dt/tau``; both may be floats or tensors that
    broadcast against the input (per-neuron values)."""

    decay: float | torch.Tensor = 0.5
    threshold: float | torch.Tensor = 1.0
    alpha: float = 4.0

    def __post_init__(self):
        if not isinstance(self.decay, torch.Tensor) and not 0.0 < self.decay < 1.0:
            raise ValueError(f"LIF decay dt/tau must lie in (0, 1), got {self.decay}")
        if not isinstance(self.threshold, torch.Tensor) and not self.threshold > 0.0:
            raise ValueError(f"LIF threshold must be > 0, got {self.threshold}")


def lif_step(x: torch.Tensor, v: torch.Tensor, p: LIFParams) -> tuple[torch.Tensor, torch.Tensor]:
    """One timestep: ``(input, membrane) -> (spikes, new membrane)``. Pure: nothing is mutated."""
    v = (1 - p.decay) * v + p.decay * x
    s = spike_fn(v - p.threshold, p.alpha)
    return s, v * (1 - s)


INFERENCE_CHUNK = 1 << 15  # neurons lif_inference takes through all T steps at a time: 128 KB in float32, and at most
# torch's parallel grain (32,768 elements), so each operation runs on the calling thread with no thread
# handover (thousands of small operations, each a parallel region, cost more than they save on a busy machine)


@torch.no_grad()
def lif_inference(x: torch.Tensor, decay: torch.Tensor, threshold: torch.Tensor, channel_dim: int = -1,
                  chunk: int = INFERENCE_CHUNK, final_state: bool = False, membranes: bool = False):
    """The LIF over ``x (T, ...)`` without autograd: the spikes of :func:`lif_step` applied step
    by step, bit for bit, with ``decay`` and ``threshold`` per channel ``(features,)`` along
    ``channel_dim`` of a step. Each float operation of the step is the same IEEE operation on the
    same operands (``(1-d)*v``, ``d*x``, their sum, ``v - theta >= 0``, ``v * (1 - s)``), only
    done in place, and a block of about ``chunk`` neurons at a time is taken through every step
    before the next, so that its membrane stays in cache instead of every step streaming the whole
    layer through memory several times. Returns spikes ``(T, ...)`` in ``x``'s dtype (with
    ``final_state``, also the membrane after the last step's reset, ``x[0]``'s shape; with
    ``membranes``, also every step's membrane before its reset, ``(T, ...)``)."""
    steps, shape = x.shape[0], x.shape[1:]
    c = channel_dim % len(shape)
    pre, features, post = math.prod(shape[:c]), shape[c], math.prod(shape[c + 1:])
    d, th = decay.detach(), threshold.detach()
    if post == 1:  # channels last: rows of features, the parameters broadcast along them
        xv = x.reshape(steps, pre, features)
    else:  # channels then positions: one row per (leading index, channel), its parameters a column
        xv = x.reshape(steps, pre * features, post)
        d, th = d.repeat(pre).unsqueeze(1), th.repeat(pre).unsqueeze(1)
    keep_rate = 1 - d
    rows, cols = xv.shape[1], xv.shape[2]
    block = max(1, chunk // cols)
    spikes = torch.empty(xv.shape, dtype=torch.bool, device=x.device)
    v = torch.empty((min(block, rows), cols), dtype=x.dtype, device=x.device)
    state = torch.empty(xv.shape[1:], dtype=x.dtype, device=x.device) if final_state else None
    before = torch.empty(xv.shape, dtype=x.dtype, device=x.device) if membranes else None
    tmp, keep = torch.empty_like(v), torch.empty(v.shape, dtype=torch.bool, device=x.device)
    for r0 in range(0, rows, block):
        r1 = min(r0 + block, rows)
        vb, tb, kb = v[: r1 - r0], tmp[: r1 - r0], keep[: r1 - r0]
        a, db, thb = (keep_rate, d, th) if post == 1 else (keep_rate[r0:r1], d[r0:r1], th[r0:r1])
        vb.zero_()  # init_state: zeros
        for t in range(steps):
            torch.mul(db, xv[t, r0:r1], out=tb)  # d * x
            vb.mul_(a).add_(tb)                  # (1 - d) * v + d * x
            if before is not None:
                before[t, r0:r1] = vb
            torch.sub(vb, thb, out=tb)           # v - theta
            st = spikes[t, r0:r1]
            torch.ge(tb, 0, out=st)              # s = H(v - theta)
            torch.logical_not(st, out=kb)        # 1 - s
            vb.mul_(kb)                          # v * (1 - s)
        if state is not None:
            state[r0:r1] = vb
    out = spikes.to(x.dtype).view(x.shape)
    extra = ([state.view(shape)] if state is not None else []) + ([before.view(x.shape)] if before is not None else [])
    return (out, *extra) if extra else out


class LIF(nn.Module):
    """Multi-step LIF over the leading time dimension: ``(T, ...) -> (T, ...)`` spikes.

    Args:
        features: number of channels along ``channel_dim`` (sizes the per-neuron parameters).
        tau: membrane time constant in timesteps (``d = 1/tau``), > 1.
        threshold: firing threshold, > 0.
        channel_dim: dimension of the *per-step* input that indexes channels (-1 for tokens
            ``(B, N, D)``, 1 for images ``(B, C, H, W)``).
        alpha: slope of the surrogate gradient.
    """

    def __init__(self, features: int, tau: float = 2.0, threshold: float = 1.0, channel_dim: int = -1, alpha: float = 4.0):
        super().__init__()
        if features < 1:
            raise ValueError(f"LIF features must be >= 1, got {features}")
        if not tau > 1.0:
            raise ValueError(f"LIF tau must be > 1 timestep, got {tau}")
        if not threshold > 0.0:
            raise ValueError(f"LIF threshold must be > 0, got {threshold}")
        self.features = features
        self.channel_dim = channel_dim
        self.alpha = alpha
        self.register_buffer("decay_", torch.full((features,), 1.0 / tau))
        self.register_buffer("threshold_", torch.full((features,), float(threshold)))

    # The effective per-neuron values, shape (features,). sLIF overrides these two.
    @property
    def decay(self) -> torch.Tensor:
        return self.decay_

    @property
    def threshold(self) -> torch.Tensor:
        return self.threshold_

    def _shape(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Reshape a (features,) vector to broadcast against a per-step input of ``ndim`` dims."""
        dim = self.channel_dim % ndim
        shape = [1] * ndim
        shape[dim] = self.features
        return t.view(shape)

    def params(self, ndim: int) -> LIFParams:
        return LIFParams(self._shape(self.decay, ndim), self._shape(self.threshold, ndim), self.alpha)

    def init_state(self, x0: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, ...) -> (T, ...)
        if x.shape[1:][self.channel_dim] != self.features:
            raise ValueError(f"{type(self).__name__}: expected {self.features} channels at dim {self.channel_dim} of a step, got shape {tuple(x.shape[1:])}")
        if self.takes_inference_path(x):
            return lif_inference(x, self.decay, self.threshold, self.channel_dim)
        p = self.params(x.dim() - 1)
        v = self.init_state(x[0])
        out = []
        for t in range(x.shape[0]):
            s, v = lif_step(x[t], v, p)
            out.append(s)
        return torch.stack(out)

    def takes_inference_path(self, x: torch.Tensor) -> bool:
        """Whether :func:`lif_inference` may run this call: no gradient wanted, on the CPU, not
        traced or compiled (exporters record :func:`lif_step`'s operations), and a module whose
        state and parameters are the LIF's own (a subclass overriding them keeps the loop)."""
        if x.device.type != "cpu" or type(self).init_state is not LIF.init_state or type(self).params is not LIF.params:
            return False
        if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))

    def extra_repr(self) -> str:
        return f"{self.features}, channel_dim={self.channel_dim}"


class SLIF(LIF):
    """LIF with learnable per-neuron threshold and leak (intrinsic plasticity).

    ``learn_threshold`` / ``learn_leak`` select which of the two learn (the other stays fixed);
    both default to True. The raw parameters ``threshold_log_scale`` and ``leak_log_exponent``
    are zero at construction, which reproduces the LIF's values exactly.
    """

    def __init__(self, features: int, tau: float = 2.0, threshold: float = 1.0, channel_dim: int = -1, alpha: float = 4.0,
                 learn_threshold: bool = True, learn_leak: bool = True):
        super().__init__(features, tau, threshold, channel_dim, alpha)
        self.threshold_log_scale = nn.Parameter(torch.zeros(features), requires_grad=learn_threshold)
        self.leak_log_exponent = nn.Parameter(torch.zeros(features), requires_grad=learn_leak)

    @property
    def decay(self) -> torch.Tensor:
        return self.decay_ ** torch.exp(self.leak_log_exponent)

    @property
    def threshold(self) -> torch.Tensor:
        return self.threshold_ * torch.exp(self.threshold_log_scale)

    @classmethod
    def from_lif(cls, lif: LIF, learn_threshold: bool = True, learn_leak: bool = True) -> "SLIF":
        """An sLIF whose initial per-neuron values equal ``lif``'s (a trained sLIF's current values)."""
        new = cls(lif.features, 2.0, 1.0, lif.channel_dim, lif.alpha, learn_threshold, learn_leak)
        with torch.no_grad():
            new.decay_.copy_(lif.decay.detach())
            new.threshold_.copy_(lif.threshold.detach())
        return new.to(lif.decay_.device)

    def intrinsic_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.threshold_log_scale, self.leak_log_exponent) if p.requires_grad]


def _swap_neurons(model: nn.Module, make) -> nn.Module:
    for name, child in list(model.named_children()):
        if isinstance(child, LIF):
            setattr(model, name, make(child))
        else:
            _swap_neurons(child, make)
    return model


def to_slif(model: nn.Module, learn_threshold: bool = True, learn_leak: bool = True) -> nn.Module:
    """Replace every LIF (and sLIF) of ``model`` in place by an sLIF with the same current values."""
    return _swap_neurons(model, lambda n: SLIF.from_lif(n, learn_threshold, learn_leak))


def to_lif(model: nn.Module) -> nn.Module:
    """Replace every sLIF of ``model`` in place by a fixed LIF holding its current per-neuron values."""

    def freeze(n: LIF) -> LIF:
        if type(n) is LIF:
            return n
        new = LIF(n.features, 2.0, 1.0, n.channel_dim, n.alpha).to(n.decay_.device)
        with torch.no_grad():
            new.decay_.copy_(n.decay.detach())
            new.threshold_.copy_(n.threshold.detach())
        return new

    return _swap_neurons(model, freeze)


def neurons_of(model: nn.Module) -> dict[str, LIF]:
    """Every LIF/sLIF of ``model`` by fully qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LIF)}


def tau_of(decay: float) -> float:
    """``tau = dt / d`` with ``dt = 1`` (helper for reporting)."""
    return 1.0 / decay if decay > 0 else math.inf
