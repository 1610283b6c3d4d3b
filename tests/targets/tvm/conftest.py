"""Fixtures the TVM tests share: the CPU profile's LLVM target, a check of a Relax module against
onnxruntime, and a whole-model pruned sdt-tiny."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def target():
    """The ``cpu`` profile's LLVM target (the host's), for kernels compiled in the tests."""
    from stdeploy.targets.profiles import load_profile
    from stdeploy.targets.tvm.host import cpu_target

    return cpu_target(load_profile("cpu"))


@pytest.fixture(scope="session")
def equals_onnxruntime(target):
    """``check(mod, graph, x)``: ``mod`` built for ``target`` and run on ``x`` gives exactly the
    logits and output spikes onnxruntime gives on the graph's ONNX file, and the spikes fire."""
    import numpy as np

    def check(mod, graph, x) -> None:
        import onnxruntime as ort
        import tvm
        from tvm import relax

        from stdeploy.targets.tvm.cpu import outputs_to_numpy

        vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(target)), tvm.cpu())
        out = outputs_to_numpy(vm["main"](tvm.runtime.tensor(x.numpy())), graph.outputs)
        session = ort.InferenceSession(str(graph.path), providers=["CPUExecutionProvider"])
        ort_logits, ort_spikes = session.run(["logits", "spikes"], {"input": x.numpy()})
        assert 0 < out["spikes"].mean() < 1
        np.testing.assert_array_equal(out["spikes"], ort_spikes)
        np.testing.assert_array_equal(out["logits"], ort_logits)

    return check


@pytest.fixture
def whole_model_pruned_sdt(trained_sdt):
    """The trained sdt-tiny pruned to 95% over every weight layer (embedding convolutions and
    classifier included, ``ALL_LAYERS``), BatchNorm re-estimated on 128 training images: a fresh
    ``(model, data)`` for each test, which may change it."""
    from stdeploy.activity import estimate_batchnorm
    from stdeploy.models import clone_model, direct_encode
    from stdeploy.prune import ALL_LAYERS, PruneConfig, make_pruner

    base, data = trained_sdt
    model = clone_model(base)
    pruner = make_pruner(PruneConfig(method="l1p", sparsity=0.95, layers=ALL_LAYERS))
    pruner.prepare(model)
    pruner.step(model, 1.0)
    model = pruner.finalize(model)
    train_x = torch.stack([data.train[i][0] for i in range(128)])
    estimate_batchnorm(model, [direct_encode(train_x[i:i + 64], model.cfg.timesteps) for i in range(0, 128, 64)])
    return model, data
