"""Random checkpoints: shipped configuration values, official layout, determinism, realistic scale."""

from __future__ import annotations

import json

import pytest

from conftest import needs_export
from qwen3_tts_edge.export import shapes

pytestmark = needs_export

# Parameter totals of the official classes at the shipped configs (architecture reference §9), millions.
REFERENCE_PARAMS_M = {
    ("0.6b", "base"): 914.6, ("0.6b", "custom_voice"): 905.8, ("0.6b", "voice_design"): 905.8,
    ("1.7b", "base"): 1928.7, ("1.7b", "custom_voice"): 1916.7, ("1.7b", "voice_design"): 1916.7,
}
REFERENCE_TALKER = {"0.6b": dict(hidden_size=1024, intermediate_size=3072, backbone_m=440.5, predictor_m=141.6),
                    "1.7b": dict(hidden_size=2048, intermediate_size=6144, backbone_m=1409.4, predictor_m=175.1)}


def _meta_model(shape: str, variant: str):
    import torch

    from qwen3_tts_edge.export.official import qwen_tts

    qwen_tts()
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration

    with torch.device("meta"):  # shapes only: no memory, no init cost
        return Qwen3TTSForConditionalGeneration(Qwen3TTSConfig(**shapes.model_config(shape, variant)))


def _millions(params) -> float:
    return round(sum(p.numel() for p in params) / 1e6, 1)


@pytest.mark.parametrize("shape,variant", sorted(REFERENCE_PARAMS_M))
def test_real_shape_parameter_counts_match_reference(shape, variant):
    model = _meta_model(shape, variant)
    assert _millions(model.parameters()) == REFERENCE_PARAMS_M[(shape, variant)]
    ref = REFERENCE_TALKER[shape]
    backbone = [p for n, p in model.talker.model.named_parameters() if n.startswith(("layers.", "norm."))]
    assert _millions(backbone) == ref["backbone_m"]
    assert _millions(model.talker.code_predictor.parameters()) == ref["predictor_m"]
    assert (model.speaker_encoder is not None) == (variant == "base")


@pytest.mark.parametrize("shape", ["0.6b", "1.7b"])
def test_real_shape_config_values(shape):
    cfg = shapes.model_config(shape, "custom_voice")
    t, p = cfg["talker_config"], cfg["talker_config"]["code_predictor_config"]
    ref = REFERENCE_TALKER[shape]
    assert (t["hidden_size"], t["intermediate_size"]) == (ref["hidden_size"], ref["intermediate_size"])
    assert (t["num_hidden_layers"], t["num_attention_heads"], t["num_key_value_heads"]) == (28, 16, 8)
    assert t["head_dim"] == 128 and t["num_code_groups"] == 16
    assert (t["vocab_size"], t["text_vocab_size"], t["text_hidden_size"]) == (3072, 151936, 2048)
    assert (t["rope_theta"], t["rms_norm_eps"], t["max_position_embeddings"]) == (1000000, 1e-6, 32768)
    assert t["rope_scaling"]["mrope_section"] == [24, 20, 20]
    assert (t["codec_pad_id"], t["codec_bos_id"], t["codec_eos_token_id"]) == (2148, 2149, 2150)
    assert (t["codec_think_id"], t["codec_nothink_id"], t["codec_think_bos_id"], t["codec_think_eos_id"]) == (
        2154, 2155, 2156, 2157)
    assert t["codec_language_id"]["english"] == 2050 and t["codec_language_id"]["chinese"] == 2055
    assert t["spk_id"]["vivian"] == 3065 and t["spk_is_dialect"]["eric"] == "sichuan_dialect"
    assert (p["hidden_size"], p["num_hidden_layers"], p["intermediate_size"], p["vocab_size"]) == (1024, 5, 3072, 2048)
    assert (cfg["tts_pad_token_id"], cfg["tts_bos_token_id"], cfg["tts_eos_token_id"]) == (151671, 151672, 151673)
    assert cfg["tts_model_size"] == ("1b7" if shape == "1.7b" else "0b6")
    assert cfg["speaker_encoder_config"]["enc_dim"] == ref["hidden_size"]
    dec = shapes.speech_tokenizer_config(shape)["decoder_config"]
    assert (dec["hidden_size"], dec["intermediate_size"], dec["head_dim"], dec["latent_dim"]) == (512, 1024, 64, 1024)
    assert (dec["num_hidden_layers"], dec["sliding_window"]) == (8, 72)
    assert (dec["codebook_dim"], dec["decoder_dim"]) == (512, 1536)
    assert shapes.model_config(shape, "base")["talker_config"]["spk_id"] == {}


def test_real_shape_codec_parameter_counts():
    import torch

    from qwen3_tts_edge.export.official import qwen_tts

    qwen_tts()
    from qwen_tts.core import Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model

    with torch.device("meta"):
        codec = Qwen3TTSTokenizerV2Model(Qwen3TTSTokenizerV2Config(**shapes.speech_tokenizer_config("0.6b")))
    assert _millions(codec.decoder.parameters()) == 114.3
    assert _millions(codec.encoder.parameters()) == 39.4


def test_bad_shape_or_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown shape"):
        shapes.model_config("3b", "base")
    with pytest.raises(ValueError, match="unknown variant"):
        shapes.model_config("tiny", "clone")


@pytest.mark.parametrize("variant", shapes.VARIANTS)
def test_tiny_checkpoint_official_layout_and_loader(variant):
    import torch

    from qwen3_tts_edge.export.official import qwen_tts
    from qwen3_tts_edge.export.sources import REQUIRED_FILES, resolve_model

    path = resolve_model(f"random:tiny-{variant}").path
    for name in REQUIRED_FILES + ("model.safetensors", "speech_tokenizer/model.safetensors"):
        assert (path / name).is_file(), name
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["tts_model_type"] == variant and cfg["talker_config"]["codec_eos_token_id"] == 2150
    model = qwen_tts().Qwen3TTSModel.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    assert (model.model.speaker_encoder is not None) == (variant == "base")
    assert model.model.talker.model.text_embedding.weight.shape == (151936, 64)
    with torch.no_grad():
        wav = model.model.speech_tokenizer.model.decoder(torch.randint(0, 2048, (1, 16, 12)))
    assert wav.shape == (1, 1, 12 * 1920)
    # Randomised codebooks: audible, not silent and not clipped (a fresh codebook outputs zeros).
    assert 0.02 < float(wav.std()) < 0.5
    assert float((wav.abs() > 0.999).float().mean()) < 0.01


def test_random_checkpoints_are_deterministic_per_seed(tmp_path):
    from qwen3_tts_edge.export.random_checkpoint import build_random_checkpoint
    from qwen3_tts_edge.runtime.bundle import sha256_file

    a = build_random_checkpoint("tiny", "voice_design", 7, tmp_path / "a")
    b = build_random_checkpoint("tiny", "voice_design", 7, tmp_path / "b")
    c = build_random_checkpoint("tiny", "voice_design", 8, tmp_path / "c")
    for name in ("model.safetensors", "speech_tokenizer/model.safetensors"):
        assert sha256_file(a / name) == sha256_file(b / name)
        assert sha256_file(a / name) != sha256_file(c / name)


@pytest.mark.slow
def test_real_shape_checkpoint_sizes_match_released_files():
    """random:0.6b-custom_voice is written like the release: bf16 weights 1.81 GB, fp32 codec ~0.68 GB."""
    from qwen3_tts_edge.export.sources import resolve_model

    path = resolve_model("random:0.6b-custom_voice").path
    weights = (path / "model.safetensors").stat().st_size
    assert abs(weights - 905.8e6 * 2) / (905.8e6 * 2) < 0.005
    assert 0.62e9 < (path / "speech_tokenizer" / "model.safetensors").stat().st_size < 0.70e9
