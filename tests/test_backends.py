"""The engine table (runtime/engine/specs.py): a bundle component's format picks its loader; an unknown format is a
clear error."""

from __future__ import annotations

import pytest

from conftest import needs_export
from qwen3_tts_edge.runtime import backends
from qwen3_tts_edge.runtime.bundle import BundleError, load_bundle
from qwen3_tts_edge.runtime.engine import specs
from qwen3_tts_edge.runtime.engine.assemble import load_stage

pytestmark = needs_export


def test_each_stage_loads_through_the_table(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    engines = load_stage("generation", bundle, "q8_0", n_ctx=256, threads=1)
    assert engines.talker.n_ctx == 256 and engines.talker.n_past == 0
    assert engines.tables.hidden_size == engines.talker.hidden_size
    assert engines.talker.placement.device == "cpu" and isinstance(engines.talker.placement, backends.Placement)
    out = engines.talker.prefill(engines.tables.text_embeds([9707, 1879]))
    assert isinstance(out, backends.StepOutput) and out.hidden.shape == (engines.talker.hidden_size,)
    decoder = load_stage("decoder", bundle, "fp32", threads=1)
    assert decoder.providers == ["CPUExecutionProvider"]


def test_a_format_without_an_engine_names_the_ones_there_are(tiny_bundle, monkeypatch):
    bundle = load_bundle(tiny_bundle)
    monkeypatch.setattr(specs, "ENGINE_SPECS", tuple(s for s in specs.ENGINE_SPECS if s.stage != "decoder"))
    with pytest.raises(BundleError, match="no engine for a 'onnx' decoder"):
        load_stage("decoder", bundle, "fp32")
