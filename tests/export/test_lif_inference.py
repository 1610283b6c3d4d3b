"""The no-grad LIF path (:func:`stdeploy.neurons.lif_inference`, which export validation's PyTorch
passes run) against :func:`stdeploy.neurons.lif_step` applied step by step: the same spikes and the
same membranes, bit for bit (``torch.equal`` and the raw bits, so a -0.0 for a 0.0 fails too)."""

from __future__ import annotations

import pytest
import torch

from stdeploy.neurons import LIF, SLIF, lif_inference, lif_step


def _loop(x: torch.Tensor, decay: torch.Tensor, threshold: torch.Tensor, channel_dim: int):
    """Spikes and final membrane of the step-by-step loop (``LIF.forward``'s autograd path)."""
    lif = LIF(decay.numel(), channel_dim=channel_dim)
    lif.decay_, lif.threshold_ = decay.to(x.dtype), threshold.to(x.dtype)
    p = lif.params(x.dim() - 1)
    v, out, before = torch.zeros_like(x[0]), [], []
    for t in range(x.shape[0]):
        before.append((1 - p.decay) * v + p.decay * x[t])  # lif_step's membrane before its reset
        s, v = lif_step(x[t], v, p)
        out.append(s)
    return torch.stack(out), v, torch.stack(before)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


# (per-step shape, channel dim): tokens (B, N, D), images (B, C, H, W), one token (B, D)
SHAPES = [((3, 5, 16), -1), ((2, 6, 4, 5), 1), ((7, 24), -1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,channel_dim", SHAPES)
def test_lif_inference_is_bit_identical_to_lif_step(shape, channel_dim, dtype):
    g = torch.Generator().manual_seed(len(shape) + (dtype == torch.float64))
    features = shape[channel_dim]
    decay = torch.rand(features, generator=g, dtype=torch.float64).mul(0.9).add(0.05)  # per neuron, in (0, 1)
    threshold = torch.rand(features, generator=g, dtype=torch.float64).add(0.25)
    x = torch.randn(5, *shape, generator=g, dtype=dtype) * 2
    # some membranes land exactly on the threshold at the first step (d * x == theta): the >= edge
    step0 = x[0].movedim(channel_dim, -1)
    step0[..., ::3] = (threshold.to(dtype) / decay.to(dtype))[::3]
    decay, threshold = decay.to(dtype), threshold.to(dtype)
    fired = 0
    for steps in range(1, x.shape[0] + 1):  # every prefix: the membrane after each step
        want_s, want_v, want_m = _loop(x[:steps], decay, threshold, channel_dim)
        for chunk in (1, 7, 64, 1 << 16):  # blocks of one row, ragged blocks, everything at once
            got_s, got_v, got_m = lif_inference(x[:steps], decay, threshold, channel_dim, chunk=chunk, final_state=True, membranes=True)
            assert torch.equal(got_s, want_s) and _same_bits(got_s, want_s), (steps, chunk)
            assert _same_bits(got_v, want_v) and _same_bits(got_m, want_m), (steps, chunk)
        fired = int(want_s.sum())
    assert 0 < fired < x.numel()  # the neurons fire, and not everywhere: the comparison can fail


@pytest.mark.parametrize("cls", [LIF, SLIF])
def test_lif_module_takes_the_inference_path_only_without_autograd(cls, monkeypatch):
    torch.manual_seed(0)
    lif = cls(16)
    if cls is SLIF:
        with torch.no_grad():  # learned per-neuron values, not the defaults
            lif.threshold_log_scale.normal_(0, 0.3)
            lif.leak_log_exponent.normal_(0, 0.3)
    x = torch.randn(4, 3, 8, 16) * 2
    with torch.enable_grad():
        want = lif(x.clone().requires_grad_(True)).detach()  # the loop: autograd wants the graph
    with torch.no_grad():
        got = lif(x)
    assert torch.equal(got, want) and 0 < int(want.sum()) < want.numel()
    # export validation's membranes (localising a flip) come from the same path, equal to the loop's
    from stdeploy.export.validate import membrane_before_reset

    with torch.enable_grad():
        loop = membrane_before_reset(lif, x.clone().requires_grad_(True)).detach()
    with torch.no_grad():
        assert _same_bits(membrane_before_reset(lif, x), loop)
    # the exporters trace lif_step's operations, never the inference path
    calls = []
    monkeypatch.setattr("stdeploy.neurons.lif_inference", lambda *a, **k: calls.append(1))
    with torch.no_grad():
        torch.jit.trace(lif, (x,), check_trace=False)
    assert not calls
    with torch.no_grad():
        lif(x)
    assert calls == [1]



def _interpreter_loop(xs, d, thr, reset):
    """The NIR interpreter's LIF loop (``r = 1``, ``v_leak = 0``), step by step."""
    v, out = torch.zeros_like(xs[0]), []
    for t in range(xs.shape[0]):
        v = (1 - d) * v + d * xs[t]
        s = v > thr
        v = torch.where(s, reset, v)
        out.append(s.to(torch.float32))
    return torch.stack(out)


@pytest.mark.parametrize("neurons,param_shape", [((6, 5), (6, 5)), ((4, 3, 3), (4, 1, 1)), ((12,), ())])
def test_interpreter_lif_blocks_are_bit_identical_to_its_loop(neurons, param_shape):
    from stdeploy.export.nir_interpreter import lif_blocks

    g = torch.Generator().manual_seed(len(neurons))
    d = torch.rand(param_shape, generator=g).mul(0.9).add(0.05)
    thr = torch.rand(param_shape, generator=g).add(0.25)
    xs = torch.randn(4, 3, *neurons, generator=g) * 2
    xs[0, :, ...] = torch.where(torch.rand(neurons, generator=g) < 0.3, thr / d, xs[0])  # at the threshold, up to rounding
    for reset in (torch.zeros(()), torch.full(param_shape, -0.25)):
        want = _interpreter_loop(xs, d, thr, reset)
        assert 0 < int(want.sum()) < want.numel()
        for block in (1, 5, 1 << 16):
            assert torch.equal(lif_blocks(xs, d, thr, reset, block=block), want), block
