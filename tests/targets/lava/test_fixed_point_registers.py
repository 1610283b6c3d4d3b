"""The fixed-point plan's static check of an exact graph against Loihi's 24-bit ``u`` and ``v``:
per population, the bits its proven range needs on each input grid
(:func:`stdeploy.targets.lava.fixed_point.register_bits`, ``input_grids``), the grid the plan
fits, the refusal that names what no grid fits, and ``unproven="guard"`` (the ``loihi2-fixed``
profile's ``[lava] unproven``).

The model: sdt, 1 block, D = 64, MLP ratio 4, T = 4, random weights, BatchNorm statistics
estimated on noise, then the exact mode. At T = 4 its second stem population's worst case needs
24.2 bits on every grid (the leak adds 4 fractional bits): the smallest model with what the exact
``sdt-8-512`` shows at scale (``benchmarks/exact_lava.py --model sdt-8-512``). Nothing here runs
Lava's processes except the guard's own arithmetic, in a subprocess (lava sets multiprocessing's
start method at import).
"""

import subprocess
import sys
import textwrap

import pytest
import torch

from stdeploy.export.manifest import write_manifest
from stdeploy.export.nir_export import to_nir, write_nir
from stdeploy.models import build_model, direct_encode
from stdeploy.models.quantize import deployable, to_exact
from stdeploy.targets.lava.fixed_point import UV_BITS, fit_input_contract, input_grids, register_bits
from stdeploy.targets.lava.graph import LavaUnsupported, analyse
from stdeploy.targets.base import TargetError
from stdeploy.targets.lava.lowering import lower
from stdeploy.targets.lava.target import LavaTarget
from stdeploy.targets.lava.worker import worker_env
from stdeploy.targets.profiles import load_profile
from stdeploy.shipped import shipped_dir

FIRST, SECOND = "embed.stages.0.lif", "embed.stages.1.lif"
LIMIT = UV_BITS  # 24 bits, sign included


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    model = build_model("sdt-tiny", depth=1, embed_dim=64, heads=2, mlp_ratio=4.0, timesteps=4)
    c = model.cfg
    for bn in [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        model(direct_encode(torch.rand(32, c.in_channels, c.image_size, c.image_size), c.timesteps))
    g = to_nir(deployable(to_exact(model.eval()).eval()))
    g.metadata["quantize"] = {"mode": "exact"}  # the default contract: [0, 1] on 2^-8
    return g


def test_register_bits_per_population_and_input_grid(graph):
    info = analyse(graph)
    grids = input_grids(info)
    assert [c.frac_bits for c, _ in grids] == list(range(8, -1, -1))
    assert all((c.lo, c.hi) == (0.0, 1.0) for c, _ in grids)
    own = grids[0][1]
    assert own == register_bits(info)  # the graph's own contract by default
    assert set(own) == {n for n, node in graph.nodes.items() if type(node).__name__ == "LIF"}
    first = [bits[FIRST] for _, bits in grids]
    assert first[0] > LIMIT and first[0] - first[1] == pytest.approx(1.0)  # one bit off the input grid, one bit off its need
    assert all(a >= b for a, b in zip(first, first[1:]))
    for name in own:  # past the analog first layer no range depends on the input grid
        if name != FIRST:
            assert len({bits[name] for _, bits in grids}) == 1, name
    assert LIMIT < own[SECOND] < LIMIT + 1  # 24.2 bits: past the registers on every grid
    assert sum(b > LIMIT for b in own.values()) == 2


def test_no_grid_fits_is_refused_by_name(graph):
    info = analyse(graph)
    with pytest.raises(LavaUnsupported, match=rf"on the graph's own grid 2\^-8 {FIRST} needs \d+\.\d bits, {SECOND} needs 24\.2 "
                                              rf"bits; on the coarsest, 2\^-0, still 1 population\(s\): {SECOND} needs 24\.2"):
        fit_input_contract(info)
    with pytest.raises(LavaUnsupported, match=SECOND):
        lower(graph, "fixed", weight_bits=8)


def test_guard_lowers_the_unproven_with_their_bits(graph):
    info = analyse(graph)
    grids = input_grids(info)
    finest = next(c for c, bits in grids if bits[FIRST] <= LIMIT)  # where every provable population is proven
    contract, _ = fit_input_contract(info, unproven="guard")
    assert contract == finest and contract.frac_bits < 8
    with pytest.warns(UserWarning, match=r"1 of \d+ populations unproven .* up to 24\.2 bits"):
        plan = lower(graph, "fixed", weight_bits=8, unproven="guard")
    assert plan["input_contract"] == contract.to_dict()
    bits = dict(grids)[contract]
    pops = {k: v for k, v in plan["quant"].items() if "proven" in v}
    assert set(pops) == set(bits)
    for name, q in pops.items():  # the per-population table the compile info carries (info["quantisation"])
        assert q["register_bits"] == round(bits[name], 2)
        assert q["proven"] == (bits[name] <= LIMIT), name
    assert [n for n, q in pops.items() if not q["proven"]] == [SECOND]
    with pytest.raises(Exception, match="unproven must be one of"):
        lower(graph, "fixed", weight_bits=8, unproven="wrap")


def test_profile_key_unproven_picks_refuse_or_guard(graph, tmp_path):
    write_nir(graph, tmp_path / "model.nir")
    write_manifest(tmp_path, {"artifacts": {"nir": {"file": "model.nir"}}})
    shipped = (shipped_dir("profiles") / "loihi2-fixed.toml").read_text()
    assert 'unproven = "refuse"' in shipped

    def profile(value: str):
        path = tmp_path / f"loihi2-fixed-{value}.toml"
        path.write_text(shipped.replace('unproven = "refuse"', f'unproven = "{value}"'))
        return load_profile(str(path))

    with pytest.raises(LavaUnsupported, match=SECOND):
        LavaTarget().compile(tmp_path, load_profile("loihi2-fixed"))
    with pytest.warns(UserWarning, match="unproven"):
        runnable = LavaTarget().compile(tmp_path, profile("guard"))
    with runnable:
        assert runnable.info["unproven"] == "guard"
        assert [n for n, q in runnable.info["quantisation"].items() if q.get("proven") is False] == [SECOND]
    with pytest.raises(TargetError, match=r"loihi2-fixed-wrap\.toml: \[lava\] unproven must be one of 'refuse', 'guard', got 'wrap'"):
        LavaTarget().compile(tmp_path, profile("wrap"))


@pytest.mark.lava
def test_guard_stops_where_lava_would_wrap():
    """The guarded model's step on hand-set registers: Lava's arithmetic where it stays in 24 bits,
    OverflowError where Lava would wrap ``u`` or clip ``v`` below (never a silent wrap)."""
    code = textwrap.dedent("""
        import numpy as np
        from stdeploy.targets.lava.processes import PyLifModelBitAccGuarded
        from lava.proc.lif.models import PyLifModelBitAcc

        def model(cls, u, v):
            m = cls.__new__(cls)
            for k, val in dict(ds_offset=1, dm_offset=0, decay_unity=4096, decay_shift=12, act_shift=6, max_uv_val=2 ** 23,
                               effective_bias=0, time_step=3, proc_params={"name": "pop"}, du=4095, dv=2048).items():
                setattr(m, k, val)
            m.u, m.v = np.array(u, np.int32), np.array(v, np.int32)
            return m

        ok = model(PyLifModelBitAccGuarded, [0, 0], [1000, 1000])
        ref = model(PyLifModelBitAcc, [0, 0], [1000, 1000])
        a = np.array([(2 ** 23 - 64) >> 6, -(2 ** 17) + 1], np.int32)
        ok.subthr_dynamics(a.copy()); ref.subthr_dynamics(a.copy())
        assert np.array_equal(ok.u, ref.u) and np.array_equal(ok.v, ref.v), (ok.u, ref.u, ok.v, ref.v)
        # Lava wraps u > 2^23 and u <= -2^23 and clips v below -2^23 + 1
        for u_in, v0 in (([2 ** 17 + 1, 0], [0, 0]), ([0, -(2 ** 17)], [0, 0]), ([0, -(2 ** 16) - 1], [0, -(2 ** 23) + 2])):
            m = model(PyLifModelBitAccGuarded, [0, 0], v0)
            try:
                m.subthr_dynamics(np.array(u_in, np.int32))
            except OverflowError as err:
                assert "pop" in str(err) and "step 3" in str(err), err
            else:
                raise SystemExit(f"no OverflowError for a_in {u_in}, v {v0}")
        print("guard ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=worker_env())
    assert res.returncode == 0 and "guard ok" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]
