"""NIR export and the reference interpreter: each converter, the exact AND/OR lowerings, the LIF
mapping, a trained sdt-tiny round-tripped through a file (0 spike mismatches), structure and errors."""

import copy
import subprocess
import sys

import nir
import numpy as np
import pytest
import torch
from torch import nn

from stdeploy.activity import measure_activity, require_active
from stdeploy.errors import ShapeError, UnsupportedPrimitive
from stdeploy.export.nir_export import (INPUT, OUTPUT_LOGITS, OUTPUT_SPIKES, GraphBuilder, default_converters, nir_stats,
                                        to_nir, write_nir)
from stdeploy.export.nir_interpreter import SUPPORTED, run_nir
from stdeploy.models import build_model, direct_encode
from stdeploy.models.fold import FoldedConv, fold_batchnorm
from stdeploy.models.layers import MLP, Block, DenseEmbed, EmbedStage, Head, MaxPool, PatchEmbed, SpikeDrivenAttention, SpikformerAttention
from stdeploy.models.structure import LowRankConv2d, LowRankLinear, attach_mask
from stdeploy.models.transformer import SpikingTransformer
from stdeploy.neurons import LIF, SLIF, LIFParams, lif_step, neurons_of
from stdeploy.train import TrainConfig, train

# Every default converter, and the test that covers it (a converter without a test fails below).
COVERED = {
    SpikingTransformer: "test_trained_sdt_round_trips_with_zero_spike_mismatches",
    PatchEmbed: "test_every_node_matches_pytorch_hooks",
    DenseEmbed: "test_dense_stem_matches_pytorch",
    EmbedStage: "test_conv_stage_and_pool_match_pytorch",
    FoldedConv: "test_conv_stage_and_pool_match_pytorch",
    nn.Conv2d: "test_plain_conv2d_and_sequential",
    MaxPool: "test_or_pool_truth_table",
    nn.Identity: "test_conv_stage_and_pool_match_pytorch",
    nn.Sequential: "test_plain_conv2d_and_sequential",
    LIF: "test_lif_mapping_equals_lif_step",
    SLIF: "test_lif_mapping_equals_lif_step",
    Block: "test_every_node_matches_pytorch_hooks",
    SpikeDrivenAttention: "test_every_node_matches_pytorch_hooks",
    SpikformerAttention: "test_spikformer_exact_lowering_matches",  # refused by default: test_spikformer_is_refused_naming_sdt
    MLP: "test_every_node_matches_pytorch_hooks",
    nn.Linear: "test_every_node_matches_pytorch_hooks",
    LowRankLinear: "test_lowrank_is_two_chained_conv1d",
    LowRankConv2d: "test_dsp_whole_model_conv_is_two_chained_conv2d_read_back_exact",
    Head: "test_every_node_matches_pytorch_hooks",
}


def test_every_converter_and_primitive_has_a_test():
    assert set(default_converters()) == set(COVERED)
    assert all(name in globals() for name in COVERED.values())
    assert set(SUPPORTED) == {"Input", "Output", "Affine", "Linear", "Conv1d", "Conv2d", "LIF", "Threshold", "SumPool2d", "Flatten"}


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one intra-op thread is as fast, and far faster when other jobs share the cores
    (training below took 66 s with 2 threads and 5 s with 1 on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def graph_of(module: nn.Module, in_shape, converters=None) -> nir.NIRGraph:
    """Input(in_shape) -> module's converter -> Output, type-checked by nir."""
    b = GraphBuilder(converters={**default_converters(), **(converters or {})})
    b.add(INPUT, nir.Input(input_type=np.array(in_shape)), [], in_shape)
    outs = b.convert("m", module, [INPUT])
    shape = b.input_shape("out", outs)
    b.add("out", nir.Output(output_type=np.array(shape)), outs, shape)
    return nir.NIRGraph(nodes=b.nodes, edges=b.edges, metadata={"dt": 1.0})


def perturb_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.7 - 0.2)
    return model


def tokens(t: torch.Tensor) -> torch.Tensor:
    """NIR tokens (T, B, D, N) -> the model's (T, B, N, D)."""
    return t.transpose(-1, -2)


def hook_all(model: nn.Module, names) -> dict:
    seen = {}
    for name in names:
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (i[0], o)))
    return seen


def assert_same_graph(a: nir.NIRGraph, b: nir.NIRGraph) -> None:
    """Field by field (``a == b`` is identity in nir)."""
    assert sorted(a.nodes) == sorted(b.nodes) and [tuple(e) for e in a.edges] == [tuple(e) for e in b.edges]
    for name, node in a.nodes.items():
        other = b.nodes[name]
        assert type(node) is type(other), name
        for key, value in node.to_dict().items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value, other.to_dict()[key], err_msg=f"{name}.{key}")


# ----------------------------------------------------------------------------- neurons and lowerings
@pytest.mark.parametrize("cls", [LIF, SLIF])
def test_lif_mapping_equals_lif_step(cls, tmp_path):
    torch.manual_seed(0)
    f, n, steps = 6, 5, 100
    lif = cls(f, tau=2.0, threshold=1.0, channel_dim=-1)
    if cls is SLIF:  # per-neuron leak and threshold after "training"
        with torch.no_grad():
            lif.threshold_log_scale.uniform_(-0.5, 0.5)
            lif.leak_log_exponent.uniform_(-1.0, 1.0)
        x = torch.rand(steps, 3, n, f) * 3
    else:  # integer inputs with d = 0.5 put the membrane exactly on theta = 1 (v = 0.5 * 2)
        x = torch.randint(0, 3, (steps, 3, n, f)).float()
    graph = graph_of(lif, (f, n))
    node = graph.nodes["m"]
    assert node.tau.shape == (f, n) and node.tau.dtype == np.float64
    np.testing.assert_array_equal((1.0 / node.tau).astype(np.float32), lif.decay.detach().numpy()[:, None].repeat(n, 1))
    assert np.all(node.r == 1) and np.all(node.v_leak == 0) and np.all(node.v_reset == 0)
    assert np.all(node.v_threshold < lif.threshold.detach().numpy()[:, None])  # one float32 ulp below theta
    write_nir(graph, tmp_path / "lif.nir")
    ref, v, on_threshold = [], torch.zeros_like(x[0]), 0
    p = LIFParams(lif.decay.detach(), lif.threshold.detach())
    for t in range(steps):
        on_threshold += int(((1 - p.decay) * v + p.decay * x[t] == p.threshold).sum())
        s, v = lif_step(x[t], v, p)
        ref.append(s)
    ref = torch.stack(ref)
    for g in (graph, tmp_path / "lif.nir"):
        out = run_nir(g, tokens(x), record=True)
        assert torch.equal(tokens(out["m"]), ref)
    assert 0.05 < ref.mean() < 0.6
    if cls is LIF:
        assert on_threshold > 100  # the >= vs > case is exercised


def test_lif_on_image_layout_uses_channel_dim_1():
    lif = SLIF(3, channel_dim=1)
    with torch.no_grad():
        lif.threshold_log_scale.copy_(torch.tensor([-0.5, 0.0, 0.5]))
    x = torch.rand(10, 2, 3, 4, 4) * 3
    out = run_nir(graph_of(lif, (3, 4, 4)), x)["out"]
    assert torch.equal(out, lif(x))
    with pytest.raises(ShapeError, match="channels first"):
        graph_of(LIF(3, channel_dim=-1), (3, 4, 4))  # a per-W neuron has no channel-first form


def _split_spikes(n: int) -> tuple[GraphBuilder, list[str]]:
    """Input (2, n) -> rows 0 and 1 as two spike nodes (kernel-1 selections, then Threshold 0.5)."""
    b = GraphBuilder(converters=default_converters())
    b.add(INPUT, nir.Input(input_type=np.array([2, n])), [], (2, n))
    rows = []
    for i in range(2):
        sel = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            sel.weight.copy_(torch.eye(2)[i:i + 1])
        picked = b.convert(f"pick{i}", sel, [INPUT])
        rows.append(b.threshold(f"row{i}", picked, 0.5))
    return b, rows


def test_and_truth_table():
    b, rows = _split_spikes(4)
    out = b.spike_and("and", rows)
    b.add("out", nir.Output(output_type=np.array([1, 4])), [out], (1, 4))
    x = torch.tensor([[0.0, 0, 1, 1], [0, 1, 0, 1]])[None, None]
    y = run_nir(nir.NIRGraph(nodes=b.nodes, edges=b.edges, metadata={}), x)["out"]
    assert y.flatten().tolist() == [0, 0, 0, 1]
    with pytest.raises(UnsupportedPrimitive, match="only on spikes"):
        b.spike_and("bad", [INPUT, rows[0]])


def test_or_pool_truth_table():
    combos = torch.tensor([[(i >> k) & 1 for k in range(4)] for i in range(16)], dtype=torch.float32)  # (16, 4)
    x = combos.view(16, 2, 2).permute(1, 0, 2).reshape(2, 32)  # 16 side-by-side 2x2 windows
    b = GraphBuilder(converters=default_converters())
    b.add(INPUT, nir.Input(input_type=np.array([1, 2, 32])), [], (1, 2, 32))
    spikes = b.threshold("spikes", [INPUT], 0.5)
    out = b.convert("pool", MaxPool(), [spikes])
    b.add("out", nir.Output(output_type=np.array([1, 1, 16])), out, (1, 1, 16))
    graph = nir.NIRGraph(nodes=b.nodes, edges=b.edges, metadata={})
    assert isinstance(graph.nodes["pool.sum"], nir.SumPool2d) and isinstance(graph.nodes["pool.or"], nir.Threshold)
    y = run_nir(graph, x[None, None, None])["out"].flatten()
    assert y.tolist() == [float(any(c)) for c in combos.tolist()]
    assert torch.equal(y, MaxPool()(x[None, None, None]).flatten())


def test_conv_stage_and_pool_match_pytorch():
    cfg = build_model("sdt-tiny").cfg
    torch.manual_seed(0)
    for pool in (False, True):
        stage = fold_batchnorm(perturb_bn(EmbedStage(cfg, 2, 8, pool=pool)))
        graph = graph_of(stage, (2, 8, 8))
        assert isinstance(graph.nodes["m.conv"], nir.Conv2d) and isinstance(graph.nodes["m.lif"], nir.LIF)
        x = torch.randn(4, 3, 2, 8, 8) * 2
        out = run_nir(graph, x, record=True)
        assert torch.equal(out["out"], stage(x)) and 0.01 < out["m.lif"].mean() < 0.5


def test_plain_conv2d_and_sequential():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), LIF(4, channel_dim=1), nn.Conv2d(4, 3, 3, stride=2, padding="valid"))
    x = torch.randn(3, 2, 2, 9, 9) * 2
    with torch.no_grad():  # T and B merged around each conv, as the model's FoldedConv does
        ref = seq[2](seq[1](seq[0](x.flatten(0, 1)).view(3, 2, 4, 9, 9)).flatten(0, 1)).view(3, 2, 3, 4, 4)
    out = run_nir(graph_of(seq, (2, 9, 9)), x)["out"]
    assert torch.equal(out, ref)


# ----------------------------------------------------------------------------- whole models
@pytest.fixture(scope="module")
def trained(digits_subset, digits_full):
    """sdt-tiny with sLIF neurons, trained 3 epochs on 256 digits (a few seconds): realistic activity."""
    d = digits_full
    data = digits_subset(256, 64)
    torch.manual_seed(0)
    model = build_model("sdt-tiny", neuron="slif")
    train(model, data, TrainConfig(epochs=3, batch_size=16), None, progress=False)
    images = torch.stack([d.test[i][0] for i in range(128)])
    return model, direct_encode(images, model.cfg.timesteps)


def test_trained_sdt_round_trips_with_zero_spike_mismatches(trained, tmp_path):
    model, x = trained
    folded = fold_batchnorm(model)
    seen = hook_all(folded, ["head.lif"])
    with torch.no_grad():
        logits = folded(x)
    ref_spikes = seen["head.lif"][1]  # (T, B, N, D)
    assert 0.02 < ref_spikes.mean() < 0.5

    graph = to_nir(folded)
    path = write_nir(graph, tmp_path / "sdt.nir")
    check = "import nir, sys; g = nir.read(sys.argv[1]); print(len(g.nodes), g.metadata['family'], int(g.metadata['timesteps']))"
    done = subprocess.run([sys.executable, "-c", check, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(graph.nodes)), "sdt", "4"]

    read = nir.read(path)
    assert_same_graph(graph, read)
    meta = read.metadata
    assert float(meta["dt"]) == 1.0 and meta["input_encoding"] == "direct" and meta["config"]["embed_dim"] == 64
    for g in (graph, path):
        out = run_nir(g, x)
        assert int((tokens(out[OUTPUT_SPIKES]) != ref_spikes).sum()) == 0
        torch.testing.assert_close(out[OUTPUT_LOGITS].mean(0), logits, rtol=0, atol=1e-5)


def test_every_node_matches_pytorch_hooks(trained):
    """Every LIF, the AND/sum/broadcast lowerings and the head, node by node (record=True)."""
    model, x = trained
    folded = fold_batchnorm(model)
    lifs = list(neurons_of(folded))
    seen = hook_all(folded, lifs + ["embed", "embed.stages.1.pool", "blocks.0.attn.proj", "head.fc"])
    with torch.no_grad():
        folded(x)
    out = run_nir(to_nir(folded), x, record=True)
    for name in lifs:
        got = out[name] if out[name].dim() == 5 else tokens(out[name])
        assert torch.equal(got, seen[name][1]), name
    pooled = out["embed.stages.1.pool.or"]
    assert torch.equal(pooled, seen["embed.stages.1.pool"][1])
    assert torch.equal(tokens(out["embed.stages.1.pool.or.flatten"] + out["embed.rpe.flatten"]), seen["embed"][1])
    attn = "blocks.0.attn."
    q, k, v, mask = (seen[attn + n][1] for n in ("q_lif", "k_lif", "v_lif", "attn_lif"))
    assert torch.equal(tokens(out[attn + "qk_and"]), q * k)
    assert torch.equal(tokens(out[attn + "token_sum"]), (q * k).sum(2, keepdim=True))
    assert torch.equal(tokens(out[attn + "mask_broadcast"]), mask.expand_as(v))
    assert torch.equal(tokens(out[attn + "v_and"]), v * mask)
    assert torch.equal(tokens(out[attn + "proj"]), seen[attn + "proj"][1])
    assert torch.equal(out["head.token_mean"][..., 0], seen["head.lif"][1].mean(2))
    assert torch.equal(out[OUTPUT_LOGITS], seen["head.fc"][1])
    assert 0.01 < mask.mean() < 0.5 and 0.01 < q.mean() < 0.5


def test_bn_folding_is_exported():
    model = perturb_bn(build_model("sdt-tiny"), seed=1).eval()
    with pytest.raises(UnsupportedPrimitive, match=r"(?s)embed\.stages\.0\.conv \(ConvBN\).*fold_batchnorm.*blocks\.0\.attn\.q \(LinearBN\)"):
        to_nir(model)
    folded = fold_batchnorm(model)
    graph = to_nir(folded)
    bn, w = model.blocks[0].attn.q.bn, model.blocks[0].attn.q.linear.weight
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    node = graph.nodes["blocks.0.attn.q"]
    assert isinstance(node, nir.Conv1d) and node.weight.shape == (64, 64, 1)
    np.testing.assert_allclose(node.weight[:, :, 0], (w * scale[:, None]).detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(node.bias, (bn.bias - bn.running_mean * scale).detach().numpy(), rtol=1e-6, atol=1e-7)
    x = direct_encode(torch.rand(16, 1, 8, 8) * 4, 4)
    out = run_nir(graph, x)
    with torch.no_grad():
        torch.testing.assert_close(out[OUTPUT_LOGITS].mean(0), folded(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(out[OUTPUT_LOGITS].mean(0), model(x), rtol=0, atol=1e-3)  # unfolded: rounding only


def test_lowrank_is_two_chained_conv1d():
    lowrank = perturb_bn(build_model("sdt-tiny"), seed=2)
    q = lowrank.blocks[0].attn.q
    q.linear = LowRankLinear.from_dense(q.linear, rank=8)
    fc1 = lowrank.blocks[0].mlp.fc1
    fc1.linear = LowRankLinear.from_dense(fc1.linear, rank=16)
    folded = fold_batchnorm(lowrank)
    graph = to_nir(folded)
    assert "blocks.0.attn.q" not in graph.nodes
    v, u = graph.nodes["blocks.0.attn.q.v"], graph.nodes["blocks.0.attn.q.u"]
    assert isinstance(v, nir.Conv1d) and isinstance(u, nir.Conv1d)
    assert v.weight.shape == (8, 64, 1) and u.weight.shape == (64, 8, 1) and not np.any(v.bias)
    assert ("blocks.0.attn.q.v", "blocks.0.attn.q.u") in graph.edges
    assert v.metadata["lowrank"] and u.metadata["rank"] == 8 and graph.nodes["blocks.0.mlp.fc1.u"].metadata["rank"] == 16
    xs = direct_encode(torch.rand(16, 1, 8, 8) * 4, 4)
    seen = hook_all(folded, ["head.lif"])
    with torch.no_grad():
        folded(xs)
    assert torch.equal(tokens(run_nir(graph, xs)[OUTPUT_SPIKES]), seen["head.lif"][1])


def test_dsp_whole_model_conv_is_two_chained_conv2d_read_back_exact(trained_sdt, tmp_path):
    """DSP ``--layers all`` (the shared trained sdt-tiny, one-shot 50%): a factored convolution is
    ``name.v`` (3x3, zero bias) -> ``name.u`` (1x1, the bias), the stem one node (dense by the rule);
    the file reads back through NIR's type-checked reader and our interpreter gives PyTorch's head
    spikes on real digits, the model firing. A bare ``LowRankConv2d`` converts alike."""
    from stdeploy.prune import ALL_LAYERS, PruneConfig, make_pruner

    model, data = trained_sdt
    model = copy.deepcopy(model)
    pruner = make_pruner(PruneConfig(method="dsp", param_ratio=0.5, layers=ALL_LAYERS))
    pruner.prepare(model)
    pruner.step(model)
    pruner.finalize(model)
    folded = fold_batchnorm(model.eval())
    graph = nir.read(write_nir(to_nir(folded), tmp_path / "dsp.nir"))
    assert isinstance(graph.nodes["embed.stages.0.conv"], nir.Conv2d) and "embed.rpe" not in graph.nodes
    for name in ("embed.stages.1.conv", "embed.rpe"):
        lr = folded.get_submodule(name).conv
        v, u = graph.nodes[f"{name}.v"], graph.nodes[f"{name}.u"]
        assert isinstance(v, nir.Conv2d) and isinstance(u, nir.Conv2d) and (f"{name}.v", f"{name}.u") in graph.edges
        assert v.weight.shape == (lr.rank, lr.in_channels, 3, 3) and u.weight.shape == (64, lr.rank, 1, 1) and not np.any(v.bias)
        np.testing.assert_array_equal(u.bias, lr.u.bias.detach().numpy())
        assert v.metadata["lowrank"] and int(u.metadata["rank"]) == lr.rank and u.metadata["factor"] == "u"
    images = torch.stack([data.test[i][0] for i in range(32)])
    xs = direct_encode(images, 4)
    seen = hook_all(folded, ["head.lif"])
    with torch.no_grad():
        ref_logits = folded(xs)
    ref = seen["head.lif"][1]
    assert float(ref.mean()) > 0.01
    require_active(measure_activity(folded, xs).firing_rates, low=1e-3, high=0.9)   # every LIF fires, none saturates
    out = run_nir(graph, xs)
    assert torch.equal(tokens(out[OUTPUT_SPIKES]), ref)
    torch.testing.assert_close(out[OUTPUT_LOGITS].mean(0), ref_logits, rtol=0, atol=1e-5)
    torch.manual_seed(0)
    bare = LowRankConv2d.from_dense(nn.Conv2d(4, 6, 3, padding=1, bias=True), rank=3)
    g = graph_of(bare, (4, 5, 5))
    assert list(g.nodes) == [INPUT, "m.v", "m.u", "out"]
    x = torch.rand(2, 3, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(run_nir(g, x)["out"], bare(x.flatten(0, 1)).view(2, 3, 6, 5, 5), rtol=1e-6, atol=1e-6)


def test_sparse_weights_keep_their_zeros(tmp_path):
    model = perturb_bn(build_model("sdt-tiny"), seed=3)
    w = model.blocks[0].mlp.fc1.linear.weight
    with torch.no_grad():
        w[w.abs() <= w.abs().flatten().kthvalue(int(0.9 * w.numel())).values] = 0.0
    zeros = (w == 0).numpy()
    graph = to_nir(fold_batchnorm(model))
    read = nir.read(write_nir(graph, tmp_path / "sparse.nir"))
    for g in (graph, read):
        node = g.nodes["blocks.0.mlp.fc1"]
        np.testing.assert_array_equal(node.weight[:, :, 0] == 0, zeros)
        assert float(node.metadata["sparsity"]) == pytest.approx(zeros.mean()) and abs(zeros.mean() - 0.9) < 1e-3
        assert int(node.metadata["nonzeros"]) == int((~zeros).sum())
        assert float(g.nodes["blocks.0.mlp.fc2"].metadata["sparsity"]) == 0.0
    stats = nir_stats(graph)
    assert stats["synapses"] - stats["nonzero_synapses"] == int(zeros.sum())
    assert stats["neurons"]["LIF"] == 32 * 64 + 64 * 64 + 64 * 16 * 6 + 256 * 16 + 64  # embed, 6 token LIFs, mlp hidden, mask


def test_spikformer_exact_lowering_matches(tmp_path):
    """Opt-in: Q·Kᵀ·V as three-input AND units, exact (0 mismatches), with its cost recorded."""
    folded = fold_batchnorm(perturb_bn(build_model("spikformer-tiny"), seed=0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # biases that make q, k and v fire at about 40 %
        for n in ("q", "k", "v"):
            getattr(folded.blocks[0].attn, n).bias.copy_(torch.rand(64, generator=g) * 2 + 0.5)
    graph = to_nir(folded, spikformer="exact")
    cost = graph.metadata["lowerings"]["blocks.0.attn"]
    assert cost["extra_neurons"] == 4 * 16 * 16 * 16 * 16 == graph.nodes["blocks.0.attn.qkv_and"].threshold.size
    assert cost["extra_synapses"] == 3 * (64 * 256 * 16 + 1024 * 64) + 64 * 1024 + 64 * 16 * 256
    x = direct_encode(torch.rand(16, 1, 8, 8) * 4, 4)
    lifs = list(neurons_of(folded))
    seen = hook_all(folded, lifs)
    with torch.no_grad():
        logits = folded(x)
    out = run_nir(nir.read(write_nir(graph, tmp_path / "spikformer.nir")), x, record=True)
    for name in lifs:
        got = out[name] if out[name].dim() == 5 else tokens(out[name])
        assert torch.equal(got, seen[name][1]), name
    assert torch.equal(tokens(out["blocks.0.attn.sum_j"]), seen["blocks.0.attn.attn_lif"][0])  # (Q·Kᵀ·V)·scale, bitwise
    assert torch.equal(out[OUTPUT_LOGITS].mean(0), logits)
    assert 0.1 < seen["blocks.0.attn.attn_lif"][1].mean() < 0.9


# ----------------------------------------------------------------------------- errors
def test_spikformer_is_refused_naming_sdt():
    with pytest.raises(UnsupportedPrimitive, match=r"blocks\.0\.attn \(SpikformerAttention\).*no product of two.*family = 'sdt'"):
        to_nir(fold_batchnorm(build_model("spikformer-tiny")))
    big = build_model(build_model("spikformer-4-384").cfg.replace(depth=1))  # 64 tokens of D = 384
    with pytest.raises(UnsupportedPrimitive, match=r"blocks\.0\.attn: the exact Spikformer lowering would add 421,527,552"):
        to_nir(fold_batchnorm(big), spikformer="exact")


def test_all_offenders_in_one_error_and_user_converters_override():
    folded = fold_batchnorm(build_model("sdt-tiny"))
    folded.blocks[0].mlp.lif2 = nn.GELU()
    attach_mask(folded.blocks[0].attn.k, torch.rand(64, 64) > 0.5)
    with pytest.raises(UnsupportedPrimitive, match="2 unsupported") as err:
        to_nir(folded)
    msg = str(err.value)
    assert "blocks.0.mlp.lif2 (GELU): no NIR converter" in msg and "blocks.0.attn.k (ParametrizedLinear): a pruning mask" in msg
    torch.nn.utils.parametrize.remove_parametrizations(folded.blocks[0].attn.k, "weight", leave_parametrized=True)
    graph = to_nir(folded, converters={nn.GELU: lambda b, name, m, inputs: inputs})  # a user entry: treat as identity
    assert "blocks.0.mlp.fc2" in graph.nodes and ("blocks.0.mlp.fc1", "blocks.0.mlp.fc2") in graph.edges


def test_attached_mask_is_refused():
    folded = fold_batchnorm(build_model("sdt-tiny"))
    attach_mask(folded.blocks[0].mlp.fc1, torch.ones(256, 64, dtype=torch.bool))
    with pytest.raises(UnsupportedPrimitive, match=r"blocks\.0\.mlp\.fc1 .*pruning mask is still attached"):
        to_nir(folded)


def test_unwritable_path_is_a_clear_error_and_leaves_no_temp_file(tmp_path):
    graph = to_nir(fold_batchnorm(build_model("sdt-tiny")))
    (tmp_path / "file.txt").write_text("not a folder")
    with pytest.raises(OSError, match="cannot write NIR graph"):
        write_nir(graph, tmp_path / "file.txt" / "g.nir")
    bad = nir.NIRGraph(nodes=graph.nodes, edges=graph.edges, metadata={"unstorable": object()}, type_check=False)
    with pytest.raises(TypeError):
        write_nir(bad, tmp_path / "g.nir")  # fails inside nir.write, after the temporary file exists
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_interpreter_errors_name_the_node():
    graph = to_nir(fold_batchnorm(build_model("sdt-tiny")))
    with pytest.raises(ShapeError, match=r"Input node 'input' expects \(T, B, 1, 8, 8\)"):
        run_nir(graph, torch.zeros(4, 2, 3, 8, 8))
    nodes = {"input": nir.Input(input_type=np.array([3])), "delay": nir.Delay(delay=np.ones(3)),
             "li": nir.LI(tau=np.ones(3), r=np.ones(3), v_leak=np.zeros(3)), "out": nir.Output(output_type=np.array([3]))}
    odd = nir.NIRGraph(nodes=nodes, edges=[("input", "delay"), ("delay", "li"), ("li", "out")], metadata={})
    with pytest.raises(UnsupportedPrimitive, match=r"delay \(Delay\), li \(LI\)"):
        run_nir(odd, torch.zeros(2, 1, 3))


def test_dense_stem_matches_pytorch():
    """mlp-tiny (dense stem, depth 0): Flatten of the frame, Affine and LIF on vectors, the head on
    one token (no mean), spike for spike."""
    torch.manual_seed(0)
    folded = fold_batchnorm(perturb_bn(build_model("mlp-tiny").eval()))
    with torch.no_grad():
        for m in folded.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(4.0)  # an untrained net is quiet: louder weights make it fire
    x = direct_encode(torch.rand(8, 1, 8, 8), 4)
    seen = hook_all(folded, ["embed.lifs.0", "head.lif"])
    with torch.no_grad():
        logits = folded(x)
    out = run_nir(to_nir(folded), x, record=True)
    assert out["embed.flatten"].shape == (4, 8, 64)
    for name in ("embed.lifs.0", "head.lif"):
        ref = seen[name][1].squeeze(2)  # (T, B, 1, D) -> (T, B, D)
        assert ref.mean() > 0.02, name
        assert torch.equal(out[name], ref), name
    torch.testing.assert_close(out[OUTPUT_LOGITS].mean(0), logits, rtol=0, atol=1e-5)


def test_run_nir_frees_what_it_does_not_return_and_diagonal_convs_are_exact(trained, tmp_path):
    """``record=[names]`` returns those nodes and the Output, bit-identical to ``record=True``; the
    channel-diagonal Conv2d nodes of the portable graph (identity sums, token sums, broadcasts),
    run as depthwise convolutions, give the dense convolution's bits on the recorded inputs; and
    ``write_nir``'s node-by-node file is the one ``nir.write`` writes."""
    import warnings

    import h5py
    import torch.nn.functional as F

    from stdeploy.errors import ConfigError
    from stdeploy.export.nir_interpreter import EVALUATORS, EvalContext, channel_diagonal, int_tuple
    from stdeploy.export.nir_portable import to_portable_nir

    model, x = trained
    x = x[:, :8]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sLIF thresholds kept unfolded warn
        graph = to_portable_nir(fold_batchnorm(model))
    full = run_nir(graph, x, record=True)
    some = run_nir(graph, x, record=["head.lif"])
    assert set(some) == {"head.lif", "output"}
    assert 0.02 < float(full["head.lif"].mean()) < 0.5  # the head fires: the comparison means something
    assert torch.equal(some["head.lif"], full["head.lif"]) and torch.equal(some["output"], full["output"])
    with pytest.raises(ConfigError, match="no.such"):
        run_nir(graph, x, record=["no.such"])

    diagonal = [n for n, node in graph.nodes.items() if isinstance(node, nir.Conv2d) and channel_diagonal(node.weight, int(node.groups))]
    ops = {graph.nodes[n].metadata.get("op") for n in diagonal}
    assert {"sum over tokens", "broadcast over tokens", "residual sum (identity)"} <= ops, ops
    ctx = EvalContext(x.shape[0], x.shape[1], float(graph.metadata["dt"]), x.device)
    for name in diagonal:
        node = graph.nodes[name]
        inp = sum(full[src] for src, dst in graph.edges if dst == name).flatten(0, 1)
        dense = F.conv2d(inp, torch.from_numpy(node.weight), torch.from_numpy(node.bias), int_tuple(node.stride, 2),
                         int_tuple(node.padding, 2), int_tuple(node.dilation, 2), 1)
        assert torch.equal(EVALUATORS[nir.Conv2d](node, inp, ctx), dense), name

    def same(a, b, at=""):
        assert set(a) == set(b), at
        for k in a:
            if isinstance(a[k], h5py.Group):
                same(a[k], b[k], f"{at}/{k}")
            else:
                assert a[k].dtype == b[k].dtype and a[k].compression == b[k].compression, f"{at}/{k}"
                assert np.array_equal(a[k][()], b[k][()]), f"{at}/{k}"

    nir.write(tmp_path / "nir.nir", graph)
    write_nir(graph, tmp_path / "ours.nir")
    with h5py.File(tmp_path / "nir.nir") as a, h5py.File(tmp_path / "ours.nir") as b:
        same(a, b)
