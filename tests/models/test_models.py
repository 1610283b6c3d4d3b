from pathlib import Path

import pytest
import torch

from stdeploy.errors import ConfigError, ShapeError
from stdeploy.models import PRESETS, ModelConfig, build_model, direct_encode, load_config_file, resolve_config
from stdeploy.neurons import SLIF, neurons_of, to_slif

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["sdt-tiny", "spikformer-tiny"])
@pytest.mark.parametrize("neuron", ["lif", "slif"])
def test_tiny_shapes_and_gradients(name, neuron):
    model = build_model(name, neuron=neuron)
    x = direct_encode(torch.rand(3, 1, 8, 8), model.cfg.timesteps)
    assert x.shape == (4, 3, 1, 8, 8)
    y = model(x)
    assert y.shape == (3, 10)
    y.sum().backward()
    assert model.blocks[0].attn.q.linear.weight.grad is not None
    assert all(isinstance(n, SLIF) for n in neurons_of(model).values()) == (neuron == "slif")


def test_intermediate_shapes_sdt_and_spikformer():
    for name in ("sdt-tiny", "spikformer-tiny"):
        model = build_model(name)
        tokens = model.embed(torch.rand(4, 2, 1, 8, 8))
        assert tokens.shape == (4, 2, 16, 64)  # 8x8 / one 2x2 pool -> 16 tokens of D=64
        assert model.blocks[0].attn(tokens).shape == tokens.shape


def test_cifar_presets_shapes():
    for name in ("spikformer-4-384", "sdt-8-512"):
        cfg = PRESETS[name].replace(depth=1)  # one block keeps the test fast; shapes are per block
        model = build_model(cfg)
        assert model.embed(torch.rand(4, 1, 3, 32, 32)).shape == (4, 1, 64, cfg.embed_dim)
        assert model(torch.rand(4, 1, 3, 32, 32)).shape == (1, 10)


def test_spike_driven_attention_is_and_sum_lif_mask():
    model = build_model("sdt-tiny").eval()
    attn = model.blocks[0].attn
    captured = {}
    for n in ("q_lif", "k_lif", "v_lif", "attn_lif"):
        getattr(attn, n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, (i[0], o)))
    attn(torch.randn(4, 2, 16, 64) * 3)
    q, k, v = captured["q_lif"][1], captured["k_lif"][1], captured["v_lif"][1]
    torch.testing.assert_close(captured["attn_lif"][0], (q * k).sum(2, keepdim=True))
    assert set(torch.unique(captured["attn_lif"][1]).tolist()) <= {0.0, 1.0}


def test_wrong_input_shape_is_named():
    with pytest.raises(ShapeError, match=r"expected input \(T=4, B, C=1, H=8, W=8\), got \(4, 2, 3, 8, 8\)"):
        build_model("sdt-tiny")(torch.zeros(4, 2, 3, 8, 8))


def test_slif_model_equals_lif_model_at_conversion():
    torch.manual_seed(0)
    model = build_model("spikformer-tiny").eval()
    x = torch.rand(4, 5, 1, 8, 8)
    ref = model(x)
    to_slif(model)
    assert torch.equal(model(x), ref)


@pytest.mark.parametrize("path", sorted((ROOT / "models").glob("*.toml")), ids=lambda p: p.name)
def test_model_files_match_presets(path):
    cfg = load_config_file(path)
    if cfg.name in PRESETS:
        assert cfg == PRESETS[cfg.name]


def test_every_preset_has_a_file():
    assert {p.stem for p in (ROOT / "models").glob("*.toml")} >= set(PRESETS)


@pytest.mark.parametrize("changes, match", [
    ({"family": "resnet"}, "family"), ({"embed_dim": 30, "heads": 4}, "divisible"),
    ({"embed_pools": 3}, "embed_pools"), ({"neuron": "izh"}, "neuron"), ({"tau": 0.5}, "tau"), ({"depth": -1}, "depth"),
    ({"input_dims": 3}, "input_dims must be 1"), ({"embed_kernel": 4}, "embed_kernel must be an odd"),
    ({"embed_widths": (32, 32)}, "embed_widths must be 2 positive integers ending with embed_dim 64"),
    ({"embed_widths": (64,)}, "embed_widths must be 2"),
    ({"stem": "resnet"}, "stem"), ({"stem": "dense", "embed_pools": 1}, "dense stem has no pooling"),
])
def test_bad_config(changes, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**changes)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nembed_dimm = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown model config keys \['embed_dimm'\]"):
        load_config_file(bad)
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        resolve_config("nope")
    yml = tmp_path / "m.yaml"
    yml.write_text("model:\n  family: spikformer\n  depth: 2\n")
    assert load_config_file(yml).depth == 2


def test_input_shape_and_tokens_of_images_and_sequences():
    img, seq = PRESETS["sdt-tiny"], PRESETS["sdt-1d-tiny"]
    assert (img.input_shape, img.tokens) == ((1, 8, 8), 16)
    assert (seq.input_shape, seq.tokens) == ((1, 1, 40), 20)
    # the image presets are unchanged by the 1-D options: 3x3 convolutions, 2x2 pools
    model = build_model("sdt-tiny")
    assert [tuple(m.kernel_size) for m in model.modules() if isinstance(m, torch.nn.Conv2d)] == [(3, 3)] * 3
    assert model.embed.stages[1].pool.kernel == (2, 2)
