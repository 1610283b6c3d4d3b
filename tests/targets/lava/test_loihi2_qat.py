"""``--quantize loihi2``: the exact mode's arithmetic with Loihi 2's integer constraints, fine-tuned
with straight-through rounding, and Lava's bit-accurate fixed point running the trained integers
spike for spike.

The model is the run's shared sdt-tiny (``tests/conftest.py``: trained 2 epochs on 480 digits,
every layer checked to fire). Lava itself runs in ``tests/export/test_netx.py``
(``test_loihi2_netx_equals_our_fixed_point_lava``: a loihi2 mlp-tiny on Lava's bit-accurate
fixed point equals PyTorch and lava-dl netx spike for spike); the whole sdt-tiny on Lava (about 30 s
of Lava start-up, over this suite's budget) is measured by ``benchmarks/loihi2_qat.py``.
"""

import numpy as np
import pytest
import torch

from stdeploy.checkpoint import load_checkpoint
from stdeploy.errors import ConfigError
from stdeploy.models import direct_encode
from stdeploy.models.quantize import (LOIHI2_INPUT_FRAC_BITS, InputContract, input_contract_of, loihi2_unit, loihi2_units, quant_mode,
                                      to_exact)
from stdeploy.neurons import neurons_of
from stdeploy.prune import QuantizeConfig, quantize_model


@pytest.fixture(scope="module")
def loihi2_sdt(trained_sdt):
    model, data = trained_sdt
    return to_exact(model, mode="loihi2").eval(), data


def test_loihi2_mode_arithmetic(loihi2_sdt):
    """Thresholds are Loihi integers ``(vth + 2^-3) U`` in each population's current unit ``U = d s_in``
    (the first layer reads the 2^-4 input grid, the others spikes), read back the same way by the
    lowering; exponents are fixed; a second conversion in another mode is refused."""
    q, _ = loihi2_sdt
    assert quant_mode(q) == "loihi2"
    units = loihi2_units(q)
    s0 = float(q.embed.stages[0].conv.scale())
    d = 0.5
    assert torch.all(units["embed.stages.0.lif"] == d * s0 * 2.0 ** -LOIHI2_INPUT_FRAC_BITS)
    assert torch.all(units["blocks.0.attn.q_lif"] == d * float(q.blocks[0].attn.q.scale()))
    for name, lif in neurons_of(q).items():
        theta = lif.threshold.double().numpy()
        back = loihi2_unit(theta, lif.decay.double().numpy(), q.cfg.timesteps)
        assert np.array_equal(back, units[name].numpy()), name
        vth = theta / back - 2.0 ** -(q.cfg.timesteps - 1)
        assert np.array_equal(vth, np.rint(vth)) and vth.min() >= 0, name
    with pytest.raises(ConfigError, match="already quantised"):
        to_exact(q, mode="exact")


def test_loihi2_finetune_keeps_exponents_and_checkpoint(loihi2_sdt, trained_sdt, digits_subset, tmp_path, one_thread):
    """One straight-through epoch on 64 images moves the mantissas, never the exponents or the
    thresholds; the checkpoint records the mode and loads back to the same outputs."""
    model, _ = trained_sdt
    data = digits_subset(64, 16)
    before = to_exact(model, mode="loihi2")
    scales = {n: float(m.scale()) for n, m in before.named_modules() if hasattr(m, "fixed_scale")}
    thresholds = {n: l.threshold.clone() for n, l in neurons_of(before).items()}
    q, report = quantize_model(model, data, QuantizeConfig(mode="loihi2", epochs=1, batch_size=16, lr=5e-3), out=tmp_path / "ck",
                               progress=False)
    assert report["mode"] == "loihi2" and set(report["accuracy"]) == {"float", "quantized", "quantized_finetuned"}
    assert {n: float(m.scale()) for n, m in q.named_modules() if hasattr(m, "fixed_scale")} == scales
    assert any(not torch.equal(a.weight, b.weight) for a, b in zip(before.modules(), q.modules()) if hasattr(a, "fixed_scale"))
    assert all(torch.equal(l.threshold, thresholds[n]) for n, l in neurons_of(q).items())
    back = load_checkpoint(tmp_path / "ck")
    assert back.meta["quantize"] == "loihi2" and quant_mode(back.model) == "loihi2"
    # the mode's default contract (digits: [0, 1] on 2^-4) is recorded next to the mode and restored
    assert back.meta["input_contract"] == {"lo": 0.0, "hi": 1.0, "frac_bits": LOIHI2_INPUT_FRAC_BITS}
    assert input_contract_of(back.model) == input_contract_of(q) == InputContract(0.0, 1.0, LOIHI2_INPUT_FRAC_BITS)
    x = direct_encode(torch.stack([data.test[i][0] for i in range(4)]), q.cfg.timesteps)
    with torch.no_grad():
        assert torch.equal(back.model.eval()(x), q.eval()(x))


def test_loihi2_input_contract_kept_if_it_fits_else_refused(trained_sdt, loihi2_sdt):
    """The loihi2 mode's grid is its default input contract; a given contract on a coarser grid is
    kept (the first population's unit follows it), a finer one is refused by name, and the mode is
    a keyword (a mode string in the contract's place is refused, not misread)."""
    model, _ = trained_sdt
    q, _ = loihi2_sdt
    assert input_contract_of(q) == InputContract(0.0, 1.0, LOIHI2_INPUT_FRAC_BITS)
    coarse = to_exact(model, InputContract(-1.0, 1.0, 3), mode="loihi2")
    assert input_contract_of(coarse) == InputContract(-1.0, 1.0, 3) and quant_mode(coarse) == "loihi2"
    s0 = float(coarse.embed.stages[0].conv.scale())
    assert torch.all(loihi2_units(coarse)["embed.stages.0.lif"] == 0.5 * s0 * 2.0 ** -3)
    with pytest.raises(ConfigError, match=r"input contract grid 2\^-8 is finer than Loihi 2's 2\^-4.*--input-frac-bits"):
        to_exact(model, InputContract(0.0, 1.0, 8), mode="loihi2")
    with pytest.raises(ConfigError, match="thresholds are in units of its input grid 2\\^-4"):
        to_exact(q, InputContract(0.0, 1.0, 3), mode="loihi2")  # the trained thresholds belong to 2^-4
    with pytest.raises(ConfigError, match="mode="):
        to_exact(model, "loihi2")


def test_cli_quantize_loihi2_and_refusals(trained_sdt, tmp_path, capsys, one_thread):
    """``stdeploy quantize --mode loihi2`` records the mode; an unknown mode is refused with exit 2."""
    import json

    from stdeploy.checkpoint import save_checkpoint
    from stdeploy.cli import main

    model, _ = trained_sdt
    save_checkpoint(tmp_path / "ck", model)
    assert main(["quantize", str(tmp_path / "ck"), "--mode", "loihi2", "--epochs", "0", "--out", str(tmp_path / "q"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "loihi2" and report["accuracy"]["quantized"] > 0.5
    assert quant_mode(load_checkpoint(tmp_path / "q").model) == "loihi2"
    assert main(["quantize", str(tmp_path / "ck"), "--mode", "loihi2", "--input-frac-bits", "8", "--epochs", "0",
                 "--out", str(tmp_path / "fine")]) == 2  # finer than Loihi's grid: refused by name, nothing written
    err = capsys.readouterr().err.strip()
    assert "--input-frac-bits" in err and "2^-8" in err and "Traceback" not in err and not (tmp_path / "fine").exists()
    with pytest.raises(SystemExit) as exit_:  # argparse's own refusal: exit 2, usage and one error line
        main(["quantize", str(tmp_path / "ck"), "--mode", "loihi3", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "loihi3" in err.splitlines()[-1] and "Traceback" not in err and not (tmp_path / "bad").exists()
