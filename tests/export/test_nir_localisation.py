"""The NIR files' flips are localised layer by layer, as the ONNX files' are: the interpreter's LIF
nodes in the reference's layout (:func:`stdeploy.export.directory.nir_layer_spikes`), so that a
flip deep in the model is judged where it starts, not at the output layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stdeploy.activity import estimate_batchnorm, rates_from_records, require_active
from stdeploy.export.directory import compare_streamed, nir_layer_spikes, reference_layout, stream_outputs
from stdeploy.export.nir_export import to_nir
from stdeploy.export.nir_interpreter import run_nir
from stdeploy.export.nir_portable import to_portable_nir
from stdeploy.export.validate import record_neurons
from stdeploy.models import build_model, direct_encode
from stdeploy.models.quantize import deployable

LAYER = "blocks.0.mlp.lif1"


@pytest.fixture(scope="module")
def folded():
    torch.manual_seed(0)
    model = build_model("sdt-tiny")
    estimate_batchnorm(model, [direct_encode(torch.rand(16, 1, 8, 8), 4) for _ in range(4)], gain=1.5)
    x = direct_encode(torch.rand(4, 1, 8, 8), 4)
    f = deployable(model.eval())
    _, records = record_neurons(f, x)
    require_active(rates_from_records(records), low=0.01, high=0.6)  # every layer fires: comparisons can fail
    return f, x, records


@pytest.mark.parametrize("dialect", ["nir", "portable"])
def test_nir_layer_spikes_are_the_references_in_its_layout(folded, dialect):
    f, x, records = folded
    graph = to_nir(f) if dialect == "nir" else to_portable_nir(f, fold="exact")
    layers = nir_layer_spikes(graph)(x)
    # what compare_streamed compares: every LIF module's spikes, mapped to the reference's layout
    assert set(records) <= set(layers)
    for name, rec in records.items():
        mine = reference_layout(layers[name], rec["spikes"].shape)
        assert mine is not None and torch.equal(mine, rec["spikes"]), name


def test_a_flip_inside_a_nir_file_is_localised_where_it_starts(folded):
    f, x, records = folded
    graph = to_nir(f)
    node = graph.nodes[LAYER]
    node.v_threshold = np.asarray(node.v_threshold) * 1.5  # this layer fires less: not rounding
    ref_logits, ref_spikes = stream_outputs(f, x)
    outs = run_nir(graph, x)
    logits, sp = outs["logits"].mean(0), outs["spikes"].transpose(-1, -2)
    result = compare_streamed("nir", f, x, ref_logits, ref_spikes, logits, sp, nir_layer_spikes(graph))
    assert result.spike_mismatches > 0
    assert result.flips[0]["layer"] == LAYER, result.flips  # not head.lif, where the damage shows
    assert result.max_flip_distance > 1e-4 and not result.flips_at_rounding_level
    unlocalised = compare_streamed("nir", f, x, ref_logits, ref_spikes, logits, sp, None)
    assert unlocalised.flips[0]["layer"] == "head.lif"  # what the NIR files' check saw before
