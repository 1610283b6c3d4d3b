"""One Spikformer attention block of a preset's sizes run on Lava's own processes
(:func:`stdeploy.targets.lava.attention.run_preset`): the block plan is built by ``lower_block``
(the NIR lowering's code), run by the worker's ``run_standard_plan`` (``ProdNeuron``,
``GradedVec``, ``Sparse``/``DelaySparse``, ``LIFReset``, RingBuffers on ``Loihi2SimCfg``) on the
q/k/v spikes of a random-weight spikformer-tiny's first block on a digits image (Q/K/V BatchNorm
biases raised by 0.5 so that the attention LIF fires, rate about 0.13), and compared with the
model's own attention LIF: exact. The full spikformer-4-384 size is the module's ``--run``
(a benchmark, not a test: README)."""

import numpy as np
import pytest

from stdeploy.activity import require_active
from stdeploy.targets.lava.attention import (AttentionBlock, bilinear, block_counts, block_plan, lava_input, main,
                                             model_block_spikes, run_block, run_preset, strassen_levels)
from stdeploy.targets.lava.worker import LavaTimeout, group_members


@pytest.fixture(scope="module")
def tiny_spikes():
    return model_block_spikes("spikformer-tiny", qkv_bias=0.5)


@pytest.mark.lava
@pytest.mark.timeout(240)
@pytest.mark.parametrize("attention", ["product", "and", "strassen"])
def test_block_on_lavas_processes_is_exact(attention, tiny_spikes, one_thread):
    r = run_preset("spikformer-tiny", attention, check_wiring=attention == "product", timeout_s=180, spikes=tiny_spikes)
    assert r["reference"]["qkv_bias"] == 0.5
    assert (r["heads"], r["dh"], r["tokens"], r["timesteps"]) == (4, 16, 16, 4)
    c = r["compare"]
    # the model fires: q, k, v and the attention LIF (PyTorch's and Lava's rates)
    require_active({**r["input_rates"], "attn_lif": c["attn"]["rate_reference"]}, what="spikformer-tiny block 0")
    assert c["attn"]["rate_reference"] > 0.05 and c["attn"]["total"] == 4 * 64 * 16
    assert c["attn"]["differ"] == 0, c
    if attention != "and":  # the graded sums M = K^T V read from kv_sum's graded spikes
        assert c["sums"]["differ"] == 0 and c["sums"]["max"] >= 2, c
    if attention == "product":  # one synapse shifted by a neuron: the comparison fails
        assert r["miswired"]["attn"]["differ"] > 0
    # neurons and synapses read from the processes Lava instantiated = the plan's = the formula's
    want = block_counts(4, 16, 16, attention)
    assert r["counts"]["lava"] == r["counts"]["plan"] == want, r["counts"]
    assert all(cls.startswith("lava.proc.") for cls in r["processes"]), r["processes"]
    assert ("lava.proc.prodneuron.process.ProdNeuron" in r["processes"]) == (attention != "and")
    assert r["peak_pss_bytes"] > 0 and r["steps"] == 4 + (3 if attention == "and" else 5)


def test_run_refuses_bad_arguments(capsys):
    assert main(["spikformer-tiny", "--run", "--attention", "softmax"]) == 2
    assert "--attention must be one of product, and" in capsys.readouterr().err
    assert main(["sdt-tiny", "--run"]) == 2
    assert main(["spikformer-tiny", "--run", "--timeout-s", "0"]) == 2


@pytest.mark.lava
@pytest.mark.timeout(60)
def test_block_run_past_its_timeout_is_stopped_whole(tiny_spikes):
    block = AttentionBlock(name="a", q="a.q", k="a.k", v="a.v", heads=4, dh=16, tokens=16, scale=0.125, and_node="a.and")
    plan = block_plan(block, 0.5, 0.49999997, "product")
    with pytest.raises(LavaTimeout, match="did not finish within 0.5 s") as err:
        run_block(plan, lava_input(tiny_spikes), timeout_s=0.5)
    assert [m for m in group_members(err.value.pgid) if m[1] not in ("Z", "X")] == []


@pytest.mark.parametrize("m, n, p", [(32, 64, 32), (64, 32, 32), (16, 16, 16), (4, 8, 2)])
def test_strassen_bilinear_is_exact(m, n, p):
    rng = np.random.default_rng(0)
    levels = strassen_levels(min(m, n, p), min(m, n, p))
    for lv in range(levels + 1):
        u, v, w = bilinear(m, n, p, lv)
        assert u.shape[0] == 7 ** lv * (m * n * p) // 8 ** lv
        assert set(np.unique(np.concatenate([u.data, v.data, w.data]))) <= {-1, 1}
        for _ in range(2):
            a, b = rng.integers(0, 2, (m, n)), rng.integers(0, n + 1, (n, p))  # spikes; counts up to N
            assert np.array_equal(w @ ((u @ a.ravel()) * (v @ b.ravel())), (a @ b).ravel()), (m, n, p, lv)
    assert strassen_levels(32, 64) == 5 and strassen_levels(16, 16) == 4 and strassen_levels(12, 64) == 2
    # spikformer-4-384's sizes: fewer product neurons than H·dh²·N per stage, more synapses
    assert block_counts(12, 32, 64, "strassen") == {"neurons": 819_024, "synapses": 35_831_808}
