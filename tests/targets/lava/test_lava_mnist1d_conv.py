"""The lava target on ``conv-1d-tiny`` (MNIST-1D's small 1-D convolutional preset): Lava float mode
against PyTorch, spike for spike.

``conv-1d-tiny`` (6,826 parameters: sdt-1d-tiny's 1-D convolutional stem at half width, conv k5
1 -> 32 and k3 32 -> 32 with LIFs, max-pool to 20 positions, a k3 position embedding, no block,
then the head's LIF and classifier) is trained 2 epochs (batch 32, lr 5e-3, seed 0) on the first
512 MNIST-1D training sequences (the run's shared ``mnist1d_cache``, tests/conftest.py), BatchNorm
folded, exported to NIR and run by Lava's own processes (Loihi2SimCfg, float mode) on 8 test
sequences at T = 4. Every LIF layer must fire on those inputs, neither silent nor saturated
(:func:`stdeploy.activity.require_active`); then the head LIF's spikes must equal PyTorch's
everywhere (0 mismatches) and the logits agree within the target's tolerance.
"""

from __future__ import annotations

import dataclasses

import nir
import numpy as np
import pytest
import torch

from stdeploy.activity import rates_from_records, require_active
from stdeploy.data import load_dataset
from stdeploy.export.manifest import write_manifest
from stdeploy.export.nir_export import to_nir, write_nir
from stdeploy.export.onnx_export import _Unrolled
from stdeploy.export.validate import record_neurons
from stdeploy.models import build_model, direct_encode
from stdeploy.models.fold import fold_batchnorm
from stdeploy.train import TrainConfig, train

N_TRAIN, N_TEST, T = 512, 8, 4


@pytest.fixture(scope="module")
def conv1d(mnist1d_cache):
    """``(folded conv-1d-tiny, inputs (T, N_TEST, 1, 1, 40))``: seeded, trained 2 epochs on the first
    N_TRAIN training sequences."""
    data = load_dataset("mnist1d", mnist1d_cache / "mnist1d")
    sub = torch.utils.data.Subset
    data = dataclasses.replace(data, train=sub(data.train, range(N_TRAIN)), test=sub(data.test, range(N_TEST)))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model("conv-1d-tiny")
        train(model, data, TrainConfig(epochs=2, batch_size=32, lr=5e-3, seed=0), None, progress=False)
    finally:
        torch.set_num_threads(before)
    x = direct_encode(torch.stack([data.test[i][0] for i in range(N_TEST)]), T)
    return fold_batchnorm(model).eval(), x


@pytest.mark.lava
@pytest.mark.timeout(300)
def test_lava_float_mode_runs_conv_1d_tiny_spike_exact_and_it_fires(conv1d, tmp_path):
    from stdeploy.targets.lava.target import LavaTarget
    from stdeploy.targets.profiles import load_profile

    ok, why = LavaTarget().available()  # the lava marker skips where lava-nc is missing (a failure under CI)
    assert ok, why
    model, x = conv1d
    with torch.no_grad():
        _, records = record_neurons(model, x)
        ref_logits, ref_spikes = _Unrolled(model)(x)
    rates = rates_from_records(records)
    assert set(rates) == {"embed.stages.0.lif", "embed.stages.1.lif", "head.lif"}, rates
    require_active(rates, what="conv-1d-tiny on the test sequences")  # no silent or saturated LIF

    write_nir(to_nir(model), tmp_path / "model.nir")
    write_manifest(tmp_path, {"artifacts": {"nir": {"file": "model.nir"}}})
    result = LavaTarget().compile(tmp_path, load_profile("loihi2")).run(x.numpy())
    ref = ref_spikes.numpy()
    assert result.info["mode"] == "floating"
    assert result.spikes.shape == ref.shape == (T, N_TEST, 20, 32)
    assert 0.005 < ref.mean() < 0.9  # the head itself fires on these sequences
    assert int((result.spikes != ref).sum()) == 0
    np.testing.assert_allclose(result.logits, ref_logits.numpy(), rtol=0, atol=LavaTarget.tolerance["logits_atol"])
    # the NIR the target read is the graph the model exports (NIR's own reader, type-checked)
    assert "Conv2d" not in {type(n).__name__ for n in nir.read(str(tmp_path / "model.nir")).nodes.values()}
