"""Prompt builder parity: our torch-free prompt vectors equal the official ``inputs_embeds`` in every mode.

The embedding tables here are plain numpy copies of the checkpoint weights (the text projection computed
in numpy), so this test isolates the prompt *layout*; the bundle-backed tables get their own parity test.
The official ``generate`` is run up to the point where it hands its prompt to ``talker.generate``.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import needs_export
from qwen3_tts_edge.bench.parity import official_prompt
from qwen3_tts_edge.runtime.prompt import ModelIds, PromptError, VoicePrompt, build_prompt
from qwen3_tts_edge.runtime.text import TextTokenizer

pytestmark = needs_export

TEXTS = ["Hello world, this is a test of the prompt builder.", "你好，世界！今天天气很好。", "Hi"]


class NumpyTables:
    """Reference EmbeddingTables from the official weights (numpy, float64 maths, float32 out)."""

    def __init__(self, model):
        talker = model.talker
        sd = {k: v.detach().double().numpy() for k, v in talker.state_dict().items()}
        self.text = sd["model.text_embedding.weight"]
        self.w1, self.b1 = sd["text_projection.linear_fc1.weight"], sd["text_projection.linear_fc1.bias"]
        self.w2, self.b2 = sd["text_projection.linear_fc2.weight"], sd["text_projection.linear_fc2.bias"]
        self.codec = sd["model.codec_embedding.weight"]
        n = talker.config.num_code_groups - 1
        self.residual = [sd[f"code_predictor.model.codec_embedding.{j}.weight"] for j in range(n)]
        self.hidden_size = talker.config.hidden_size

    def text_embeds(self, ids):
        x = self.text[np.asarray(ids)] @ self.w1.T + self.b1
        x = x / (1 + np.exp(-x))
        return (x @ self.w2.T + self.b2).astype(np.float32)

    def codec_embeds(self, ids):
        return self.codec[np.asarray(ids)].astype(np.float32)

    def frame_embeds(self, codes):
        codes = np.asarray(codes)
        out = self.codec[codes[:, 0]].copy()
        for j, table in enumerate(self.residual):
            out += table[codes[:, j + 1]]
        return out.astype(np.float32)


def _load(variant):
    import torch

    from qwen3_tts_edge.export.official import qwen_tts
    from qwen3_tts_edge.export.sources import resolve_model

    path = resolve_model(f"random:tiny-{variant}").path
    wrapper = qwen_tts().Qwen3TTSModel.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    return path, wrapper.model


@pytest.fixture(scope="module", params=["custom_voice", "voice_design", "base"])
def setup(request):
    import json

    path, model = _load(request.param)
    cfg = json.loads((path / "config.json").read_text())
    t = cfg["talker_config"]
    ids = ModelIds(
        model_type=cfg["tts_model_type"], model_size="1b7",  # official generate() itself accepts instruct on any size
        token_ids={k: cfg[k] for k in ("tts_pad_token_id", "tts_bos_token_id", "tts_eos_token_id")},
        codec_ids={k: t[k] for k in ("codec_pad_id", "codec_bos_id", "codec_eos_token_id", "codec_think_id",
                                     "codec_nothink_id", "codec_think_bos_id", "codec_think_eos_id")},
        languages=t["codec_language_id"], speakers=t["spk_id"],
        speaker_dialects={k: v for k, v in t["spk_is_dialect"].items() if v},
    )
    return model, ids, TextTokenizer.from_folder(path), NumpyTables(model)


def _official(model, tok, text, *, language, speaker=None, instruct=None, voice=None, streaming=True):
    return official_prompt(model, tok, text, language=language, speaker=speaker, instruct=instruct, voice=voice,
                           streaming=streaming)


def _cases(model_type, hidden):
    rng = np.random.default_rng(0)
    xvec = (rng.standard_normal(hidden) * 0.05).astype(np.float32)
    short = rng.integers(0, 2048, size=(3, 16))
    long = rng.integers(0, 2048, size=(40, 16))
    if model_type == "custom_voice":
        return [dict(language="english", speaker="vivian"), dict(language="auto", speaker="eric"),
                dict(language="chinese", speaker="dylan"), dict(language="auto", speaker="aiden"),
                dict(language="japanese", speaker="ono_anna", instruct="Speak slowly and warmly."),
                dict(language="english")]  # no speaker: allowed, as in the official code
    if model_type == "voice_design":
        return [dict(language="english", instruct="A calm, deep male voice."), dict(language="auto", instruct=None),
                dict(language="chinese", instruct="温柔的女声")]
    return [dict(language="english", voice=VoicePrompt(xvec)),
            dict(language="auto", voice=VoicePrompt(xvec, short, "A short reference.")),
            dict(language="english", voice=VoicePrompt(xvec, long, "Reference text that is said in the clip."))]


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming_text", "full_text"])
def test_prompt_vectors_equal_official_inputs_embeds(setup, streaming):
    model, ids, tok, tables = setup
    checked = 0
    for case in _cases(ids.model_type, tables.hidden_size):
        for text in TEXTS:
            ours = build_prompt(ids, tok, tables, text, streaming_text=streaming, **case)
            ref_embeds, ref_trailing, ref_pad = _official(model, tok, text, streaming=streaming, **case)
            assert ours.embeds.shape == ref_embeds.shape, (case, text)
            assert ours.trailing.shape == ref_trailing.shape, (case, text)
            assert np.max(np.abs(ours.embeds - ref_embeds)) <= 1e-5
            assert np.max(np.abs(ours.trailing - ref_trailing)) <= 1e-5
            assert np.max(np.abs(ours.tts_pad - ref_pad)) <= 1e-5
            checked += 1
    assert checked >= 9


def test_prompt_lengths_match_reference_example(setup):
    """Architecture reference §5.2: language + speaker, N = 7 content tokens: 10 positions streaming, 18 full."""
    model, ids, tok, tables = setup
    if ids.model_type != "custom_voice":
        pytest.skip("the worked example is a CustomVoice prompt")
    text = next(t for t in ("one two three four five six seven", "a b c d e f g")
                if len(tok.encode(f"<|im_start|>assistant\n{t}<|im_end|>\n<|im_start|>assistant\n")) - 8 == 7)
    s = build_prompt(ids, tok, tables, text, language="english", speaker="vivian", streaming_text=True)
    f = build_prompt(ids, tok, tables, text, language="english", speaker="vivian", streaming_text=False)
    assert (len(s.embeds), len(s.trailing), len(f.embeds), len(f.trailing)) == (10, 7, 18, 1)
    assert s.n_text_tokens == 7


def test_mode_errors_list_valid_choices(setup):
    model, ids, tok, tables = setup
    with pytest.raises(PromptError, match="unsupported language 'klingon'; choose one of auto, chinese"):
        build_prompt(ids, tok, tables, "hi", **_cases(ids.model_type, tables.hidden_size)[0] | {"language": "klingon"})
    with pytest.raises(PromptError, match="non-empty"):
        build_prompt(ids, tok, tables, "   ", **_cases(ids.model_type, tables.hidden_size)[0])
    if ids.model_type == "custom_voice":
        with pytest.raises(PromptError, match="unknown speaker 'bob'; choose one of aiden, dylan"):
            build_prompt(ids, tok, tables, "hi", speaker="bob")
        small = ModelIds(**{**ids.__dict__, "model_size": "0b6"})
        with pytest.raises(PromptError, match="0.6B CustomVoice model does not support instruct"):
            build_prompt(small, tok, tables, "hi", speaker="vivian", instruct="whisper")
    elif ids.model_type == "voice_design":
        with pytest.raises(PromptError, match="speaker names exist only on CustomVoice"):
            build_prompt(ids, tok, tables, "hi", speaker="vivian")
        with pytest.raises(PromptError, match="voice prompts are for Base models"):
            build_prompt(ids, tok, tables, "hi", voice=VoicePrompt(np.zeros(tables.hidden_size, np.float32)))
    else:
        with pytest.raises(PromptError, match="give a voice prompt"):
            build_prompt(ids, tok, tables, "hi")
        with pytest.raises(PromptError, match="speaker embedding must be 64 finite floats"):
            build_prompt(ids, tok, tables, "hi", voice=VoicePrompt(np.zeros(3, np.float32)))
        with pytest.raises(PromptError, match=r"reference codes must be integers of shape \(frames, 16\)"):
            bad_codes = VoicePrompt(np.zeros(64, np.float32), np.zeros((4, 8), int), "x")
            build_prompt(ids, tok, tables, "hi", voice=bad_codes)
        with pytest.raises(PromptError, match="needs the reference text"):
            build_prompt(ids, tok, tables, "hi", voice=VoicePrompt(np.zeros(64, np.float32), np.zeros((4, 16), int)))
        with pytest.raises(PromptError, match="take no instruct"):
            build_prompt(ids, tok, tables, "hi", instruct="x", voice=VoicePrompt(np.zeros(64, np.float32)))
