import json

import pytest
import torch

from stdeploy.checkpoint import load_checkpoint, load_train_state, save_checkpoint
from stdeploy.errors import CheckpointError
from stdeploy.models import build_model
from stdeploy.models.structure import LowRankLinear, attach_mask


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_roundtrip_plain_and_slif(tmp_path):
    for neuron in ("lif", "slif"):
        model = build_model("sdt-tiny", neuron=neuron)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        save_checkpoint(tmp_path / neuron, model, meta={"note": "x"})
        ck = load_checkpoint(tmp_path / neuron)
        assert ck.config == model.cfg and ck.meta == {"note": "x"} and _same(ck.model, model)
        assert not list(tmp_path.glob(f"{neuron}/*.tmp")), "no temporary files left behind"


def test_roundtrip_structure(tmp_path):
    model = build_model("spikformer-tiny")
    q = model.blocks[0].attn.q
    q.linear = LowRankLinear.from_dense(q.linear, rank=5)
    fc = model.blocks[0].mlp.fc1.linear
    attach_mask(fc, torch.rand_like(fc.weight) > 0.5)
    save_checkpoint(tmp_path / "c", model)
    doc = json.loads((tmp_path / "c" / "config.json").read_text())
    assert doc["structure"] == {"blocks.0.attn.q.linear": {"type": "lowrank", "rank": 5}, "blocks.0.mlp.fc1.linear": {"type": "mask"}}
    loaded = load_checkpoint(tmp_path / "c").model
    assert isinstance(loaded.blocks[0].attn.q.linear, LowRankLinear) and _same(loaded, model)
    x = torch.rand(4, 2, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_train_state_loads_weights_only(tmp_path):
    model = build_model("sdt-tiny")
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, model, train_state={"epoch": 3, "optimizer": opt.state_dict()})
    assert load_train_state(tmp_path)["epoch"] == 3


def test_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing")
    model = build_model("sdt-tiny")
    save_checkpoint(tmp_path / "a", model)
    # corrupt weights: sha mismatch
    w = tmp_path / "a" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_checkpoint(tmp_path / "a")
    # config for another architecture: shape mismatch named
    save_checkpoint(tmp_path / "b", model)
    doc = json.loads((tmp_path / "b" / "config.json").read_text())
    doc["model"]["embed_dim"] = 32
    (tmp_path / "b" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"shape mismatch .*blocks"):
        load_checkpoint(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        load_checkpoint(tmp_path / "b")
    (tmp_path / "b" / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="train_state.pt"):
        load_train_state(tmp_path / "b")
