"""Speaker encoder (Base models): the exported fp32 graph and the torch-free x-vector equal the official ones."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import needs_export

pytestmark = needs_export


def _voice(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 24000
    phase = 2 * np.pi * np.cumsum(120 + 40 * np.sin(2 * np.pi * 0.7 * t)) / 24000
    return (0.3 * sum(np.sin(k * phase) / k for k in range(1, 9)) + 0.01 * rng.standard_normal(n)).astype(np.float32)


def test_base_export_ships_the_encoder_with_its_fidelity(base_bundle):
    from qwen3_tts_edge.runtime.bundle import load_bundle

    m = load_bundle(base_bundle).manifest
    enc = m.component("speaker_encoder", "fp32")
    assert enc.format == "onnx" and enc.meta["enc_dim"] == m.model["talker"]["hidden_size"]
    assert enc.meta["fidelity"]["cosine_min"] >= 0.99999 and enc.meta["fidelity"]["max_abs"] <= 1e-4
    assert 100 not in enc.meta["fidelity"]["frames"]  # checked away from the traced length
    assert m.component("speaker_mel", "fp32").meta["shape"] == [128, 513]


def test_x_vector_equals_the_official_extraction(base_bundle, tiny_checkpoint):
    import torch

    from qwen3_tts_edge.export.sources import resolve_model
    from qwen3_tts_edge.export.torch_reference import load_official
    from qwen3_tts_edge.runtime.bundle import load_bundle
    from qwen3_tts_edge.runtime.engine.assemble import load_stage

    encoder = load_stage("speaker_encoder", load_bundle(base_bundle), "fp32", threads=1)
    model = load_official(resolve_model("random:tiny-base").path)
    for n in (1280, 24000 + 17, 24000 * 4):
        audio = _voice(n, seed=n)
        ours = encoder.embed(audio)
        with torch.no_grad():
            ref = model.extract_speaker_embedding(audio, 24000).float().numpy()
        assert ours.shape == ref.shape == (encoder.enc_dim,)
        cos = float(ours @ ref / (np.linalg.norm(ours) * np.linalg.norm(ref)))
        assert cos > 0.99999 and np.max(np.abs(ours - ref)) < 1e-4, (n, cos)


def test_info_says_which_bundles_can_clone(base_bundle, tiny_bundle):
    from qwen3_tts_edge.runtime.bundle import load_bundle
    from qwen3_tts_edge.runtime.cli import format_manifest

    assert "voice cloning   speaker encoder fp32" in format_manifest(load_bundle(base_bundle).manifest)
    assert "custom_voice checkpoints have no speaker encoder" in format_manifest(load_bundle(tiny_bundle).manifest)


def test_a_speaker_encoder_for_a_model_without_one_is_refused(tmp_path):
    from qwen3_tts_edge.export.build import ExportError, export_bundle

    with pytest.raises(ExportError, match="custom_voice checkpoint has no speaker encoder"):
        export_bundle("random:tiny-custom_voice", tmp_path / "b", speaker_encoder=["fp32"], progress=lambda m: None)
    assert not (tmp_path / "b").exists()
