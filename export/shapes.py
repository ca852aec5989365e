"""Shipped Qwen3-TTS 12 Hz configuration values, as data.

The qwen-tts config classes default to values that were never shipped (20 talker layers, codec ids
4196..., decoder hidden 1024), so random checkpoints must spell out every size and id. The 0.6b/1.7b
tables follow the released checkpoints' ``config.json`` files;
``tiny`` keeps every id, vocabulary and rate of the real models but shrinks the widths so tests run in
seconds. Runtime and exporters never read this module: they read the checkpoint's own config.json.
"""

from __future__ import annotations

import copy
from typing import Any

SHAPES = ("tiny", "0.6b", "1.7b")
VARIANTS = ("base", "custom_voice", "voice_design")

# Text-side special ids (Qwen2 vocabulary + Qwen3-TTS added tokens).
TEXT_IDS = {
    "im_start_token_id": 151644,
    "im_end_token_id": 151645,
    "tts_pad_token_id": 151671,
    "tts_bos_token_id": 151672,
    "tts_eos_token_id": 151673,
}
ASSISTANT_TOKEN_ID = 77091
TEXT_VOCAB_SIZE = 151936

CODEC_IDS = {
    "codec_pad_id": 2148,
    "codec_bos_id": 2149,
    "codec_eos_token_id": 2150,
    "codec_think_id": 2154,
    "codec_nothink_id": 2155,
    "codec_think_bos_id": 2156,
    "codec_think_eos_id": 2157,
}

LANGUAGE_IDS = {
    "english": 2050,
    "german": 2053,
    "spanish": 2054,
    "chinese": 2055,
    "japanese": 2058,
    "french": 2061,
    "sichuan_dialect": 2062,
    "korean": 2064,
    "russian": 2069,
    "italian": 2070,
    "portuguese": 2071,
    "beijing_dialect": 2074,
}

# CustomVoice preset speakers: codec_embedding row ids, and the dialect some of them imply.
SPEAKER_IDS = {
    "aiden": 2861,
    "sohee": 2864,
    "ono_anna": 2873,
    "eric": 2875,
    "dylan": 2878,
    "uncle_fu": 3010,
    "ryan": 3061,
    "vivian": 3065,
    "serena": 3066,
}
SPEAKER_DIALECT = {"eric": "sichuan_dialect", "dylan": "beijing_dialect"}

GENERATION_CONFIG = {
    "do_sample": True,
    "repetition_penalty": 1.05,
    "temperature": 0.9,
    "top_k": 50,
    "top_p": 1.0,
    "subtalker_dosample": True,
    "subtalker_temperature": 0.9,
    "subtalker_top_k": 50,
    "subtalker_top_p": 1.0,
    "max_new_tokens": 8192,
}

# Per-shape sizes. Keys: talker (backbone), predictor, speaker encoder, codec decoder, codec encoder.
_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "0.6b": {
        "talker": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, text_hidden_size=2048, mrope_section=[24, 20, 20]),
        "predictor": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=5, num_attention_heads=16,
                          num_key_value_heads=8, head_dim=128),
        "speaker": dict(enc_dim=1024, enc_channels=[512, 512, 512, 512, 1536], enc_attention_channels=128,
                        enc_res2net_scale=8, enc_se_channels=128),
    },
    "1.7b": {
        "talker": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, text_hidden_size=2048, mrope_section=[24, 20, 20]),
        "predictor": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=5, num_attention_heads=16,
                          num_key_value_heads=8, head_dim=128),
        "speaker": dict(enc_dim=2048, enc_channels=[512, 512, 512, 512, 1536], enc_attention_channels=128,
                        enc_res2net_scale=8, enc_se_channels=128),
    },
    # tiny: real ids, vocabularies, code groups, sample/frame rates and decoder window; small widths.
    # The predictor is narrower than the talker so the 1.7B-style small_to_mtp_projection is exercised.
    "tiny": {
        "talker": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, text_hidden_size=64, mrope_section=[4, 2, 2]),
        "predictor": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8),
        "speaker": dict(enc_dim=64, enc_channels=[32, 32, 32, 32, 96], enc_attention_channels=16,
                        enc_res2net_scale=4, enc_se_channels=16),
    },
}

_DECODER_REAL = dict(
    codebook_size=2048, codebook_dim=512, num_quantizers=16, latent_dim=1024, hidden_size=512, head_dim=64,
    num_attention_heads=16, num_key_value_heads=16, intermediate_size=1024, num_hidden_layers=8,
    sliding_window=72, rope_theta=10000, rms_norm_eps=1e-5, layer_scale_initial_scale=0.01,
    upsample_rates=[8, 5, 4, 3], upsampling_ratios=[2, 2], decoder_dim=1536, max_position_embeddings=8000,
    attention_bias=False, attention_dropout=0.0, hidden_act="silu",
    semantic_codebook_size=4096, vector_quantization_hidden_dimension=512,
)
_DECODER_TINY = dict(
    _DECODER_REAL, codebook_dim=64, latent_dim=64, hidden_size=64, head_dim=16, num_attention_heads=4,
    num_key_value_heads=4, intermediate_size=128, num_hidden_layers=2, decoder_dim=64,
    vector_quantization_hidden_dimension=64,
)
# Stock Mimi encoder (only its encoder half is used by the 12 Hz tokenizer).
_ENCODER_REAL = dict(
    sampling_rate=24000, frame_rate=12.5, audio_channels=1, hidden_size=512, num_filters=64,
    num_residual_layers=1, upsampling_ratios=[8, 6, 5, 4], kernel_size=7, last_kernel_size=3,
    residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=True, pad_mode="constant",
    compress=2, trim_right_ratio=1.0, codebook_size=2048, codebook_dim=256, num_quantizers=32,
    use_conv_shortcut=False, vector_quantization_hidden_dimension=256, num_semantic_quantizers=1,
    upsample_groups=512, num_hidden_layers=8, intermediate_size=2048, hidden_act="gelu",
    max_position_embeddings=8000, num_attention_heads=8, num_key_value_heads=8, head_dim=64,
    sliding_window=250, rope_theta=10000.0, norm_eps=1e-5, layer_scale_initial_scale=0.01,
    use_streaming=False,
)
_ENCODER_TINY = dict(
    _ENCODER_REAL, hidden_size=32, num_filters=4, codebook_dim=16, vector_quantization_hidden_dimension=16,
    upsample_groups=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
    num_key_value_heads=2, head_dim=16,
)


def _check(shape: str, variant: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def model_config(shape: str, variant: str) -> dict[str, Any]:
    """config.json content (before the official class fills in its remaining keys) for shape × variant."""
    _check(shape, variant)
    sizes = copy.deepcopy(_SIZES[shape])
    mrope = sizes["talker"].pop("mrope_section")
    speakers = dict(SPEAKER_IDS) if variant == "custom_voice" else {}
    talker = dict(
        sizes["talker"],
        vocab_size=3072,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000,
        rope_scaling={"rope_type": "default", "mrope_section": mrope, "interleaved": True},
        attention_bias=False,
        attention_dropout=0.0,
        use_sliding_window=False,
        tie_word_embeddings=False,
        num_code_groups=16,
        text_vocab_size=TEXT_VOCAB_SIZE,
        position_id_per_seconds=13,
        codec_language_id=dict(LANGUAGE_IDS),
        spk_id=speakers,
        spk_is_dialect={name: SPEAKER_DIALECT.get(name, False) for name in speakers},
        code_predictor_config=dict(
            sizes["predictor"],
            vocab_size=2048,
            hidden_act="silu",
            max_position_embeddings=65536,
            rms_norm_eps=1e-6,
            rope_theta=1000000,
            attention_bias=False,
            attention_dropout=0.0,
            use_sliding_window=False,
            num_code_groups=16,
        ),
        **CODEC_IDS,
    )
    speaker = dict(sizes["speaker"], mel_dim=128, enc_kernel_sizes=[5, 3, 3, 3, 1],
                   enc_dilations=[1, 2, 3, 4, 1], sample_rate=24000)
    return dict(
        architectures=["Qwen3TTSForConditionalGeneration"],
        model_type="qwen3_tts",
        tokenizer_type="qwen3_tts_tokenizer_12hz",
        tts_model_size="1b7" if shape == "1.7b" else "0b6",
        tts_model_type=variant,
        assistant_token_id=ASSISTANT_TOKEN_ID,
        talker_config=talker,
        speaker_encoder_config=speaker,
        **TEXT_IDS,
    )


def speech_tokenizer_config(shape: str) -> dict[str, Any]:
    """speech_tokenizer/config.json content (Qwen3-TTS-Tokenizer-12Hz) for a shape."""
    _check(shape, "base")
    tiny = shape == "tiny"
    return dict(
        architectures=["Qwen3TTSTokenizerV2Model"],
        model_type="qwen3_tts_tokenizer_12hz",
        encoder_valid_num_quantizers=16,
        input_sample_rate=24000,
        output_sample_rate=24000,
        decode_upsample_rate=1920,
        encode_downsample_rate=1920,
        encoder_config=copy.deepcopy(_ENCODER_TINY if tiny else _ENCODER_REAL),
        decoder_config=copy.deepcopy(_DECODER_TINY if tiny else _DECODER_REAL),
    )


SPEECH_TOKENIZER_PREPROCESSOR = {
    "chunk_length_s": None,
    "feature_extractor_type": "EncodecFeatureExtractor",
    "feature_size": 1,
    "overlap": None,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": True,
    "sampling_rate": 24000,
}
