"""Long text: sentence segments within the context, one continuous audio stream, prompt-prefix reuse, flat RSS."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import needs_export
from qwen3_tts_edge.runtime.prefix_cache import PrefixReusingTalker
from qwen3_tts_edge.runtime.segments import split_segments, split_sentences
from qwen3_tts_edge.runtime.text import TextTokenizer

LONG = ("The first sentence is short. The second one is a little longer, with a comma! Is the third a question? "
        "那么这是中文句子。还有一句！ And a final line without a full stop\nplus a new line.")


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return TextTokenizer.from_folder(tiny_checkpoint)


def test_sentences_round_trip():
    parts = split_sentences(LONG)
    assert "".join(parts) == LONG
    assert parts[0] == "The first sentence is short. " and parts[3] == "那么这是中文句子。"
    assert len(parts) == 7


@pytest.mark.parametrize("budget", [4, 12, 30, 1000])
def test_segments_respect_the_budget_and_keep_the_text(tok, budget):
    segments = split_segments(LONG, tok, budget)
    assert "".join(segments).split() == LONG.split()  # nothing lost, nothing duplicated
    assert all(len(tok.encode(s)) <= budget for s in segments)
    assert (len(segments) == 1) == (budget >= len(tok.encode(LONG)))
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        split_segments(LONG, tok, 0)


@needs_export
def test_prefix_reuse_prefills_only_the_new_positions(tiny_bundle):
    from qwen3_tts_edge.runtime.backends.llama_cpp.talker import Talker

    m = __import__("qwen3_tts_edge.runtime.bundle", fromlist=["load_bundle"]).load_bundle(tiny_bundle).manifest
    path = tiny_bundle / m.component("talker", "f32").file
    rng = np.random.default_rng(0)
    voice = rng.standard_normal((12, 64)).astype(np.float32) * 0.1
    a = np.concatenate([voice, rng.standard_normal((1, 64)).astype(np.float32)])
    b = np.concatenate([voice, rng.standard_normal((1, 64)).astype(np.float32)])
    plain = Talker(path, kv_type="f32", flash_attn=False)
    cached = PrefixReusingTalker(Talker(path, kv_type="f32", flash_attn=False))
    cached.prefill_embeds(a)
    for _ in range(5):
        cached.step(rng.standard_normal(64).astype(np.float32))  # a generation happened in between
    out = cached.prefill_embeds(b)
    assert (cached.reused_positions, cached.prefilled_positions) == (12, 1)
    ref = plain.prefill(b)
    np.testing.assert_allclose(out.logits, ref.logits, atol=1e-4)
    np.testing.assert_allclose(out.hidden, ref.hidden, atol=1e-4)
    assert cached.n_past == 13


@needs_export
def test_long_text_is_one_stream_over_several_segments(tiny_bundle, tiny_checkpoint):
    import torch

    from qwen3_tts_edge.export.torch_reference import load_official
    from qwen3_tts_edge.runtime.pipeline import TTS

    tts = TTS(tiny_bundle, talker_precision="q8_0", n_ctx=256)
    assert tts._segment_budget(__import__("qwen3_tts_edge.runtime.pipeline", fromlist=["SpeakOptions"])
                               .SpeakOptions(frames_per_text_token=3.0)) == (256 - 64 - 40) // 3
    chunks = list(tts.stream(LONG, speaker="vivian", seed=1, frames_per_text_token=3.0, chunk_frames=(4,),
                             segment_tokens=20))
    stats = tts.last_stats
    assert stats.segments >= 2 and len(stats.segment_stops) == stats.segments
    assert [c.segment for c in chunks] == sorted(c.segment for c in chunks)  # segments in order
    assert chunks[-1].segment == stats.segments - 1
    assert stats.prompt_positions_reused > 0  # later segments reuse the voice prefix
    pcm = np.concatenate([c.pcm for c in chunks])
    codes = np.concatenate([c.codes for c in chunks])
    model = load_official(tiny_checkpoint)
    with torch.no_grad():
        ref = model.speech_tokenizer.model.decoder(torch.from_numpy(codes.T[None])).reshape(-1).numpy()
    assert np.max(np.abs(pcm - ref)) <= 1e-4  # no seam between segments: one decoder stream


@needs_export
def test_context_limit_is_reported_for_live_text(tiny_bundle):
    from qwen3_tts_edge.runtime.pipeline import TTS

    tts = TTS(tiny_bundle, talker_precision="q8_0", n_ctx=64)
    list(tts.stream(iter(["A live ", "text ", "that ", "keeps ", "coming."]), speaker="vivian", seed=1,
                    frames_per_text_token=None))
    assert tts.last_stats.stop_reason == "context_limit"


@needs_export
@pytest.mark.slow
def test_ten_minutes_of_audio_keep_rss_flat(tiny_bundle):
    """7500 frames (10 min) through segments: resident memory after the first minute stays flat."""
    psutil = pytest.importorskip("psutil")
    from qwen3_tts_edge.runtime.pipeline import TTS

    proc = psutil.Process()
    tts = TTS(tiny_bundle, talker_precision="q8_0", n_ctx=512)
    text = " ".join(f"This is sentence number {i} of a very long reading, spoken without a break." for i in range(90))
    frames, rss = 0, []
    for chunk in tts.stream(text, speaker="vivian", seed=1, max_frames=7500, chunk_frames=(25,)):
        frames += chunk.n_frames
        rss.append((frames, proc.memory_info().rss))
    assert frames == 7500, tts.last_stats.segment_stops
    assert tts.last_stats.segments > 5
    after_first_minute = next(r for f, r in rss if f >= 750)
    assert max(r for _, r in rss) - after_first_minute < 64 * 2**20  # generous bound: no growth with length


@needs_export
def test_saved_voice_prefixes_come_back_after_other_voices(tiny_bundle):
    """Voice A, then B, then A again: A's voice part is restored from its saved KV state (llama.cpp sequence
    state), only the new text is prefilled, and the outputs equal a fresh prefill. A budget too small for two
    voices keeps only the most recent one."""
    from qwen3_tts_edge.runtime.backends.llama_cpp.talker import Talker

    m = __import__("qwen3_tts_edge.runtime.bundle", fromlist=["load_bundle"]).load_bundle(tiny_bundle).manifest
    path = tiny_bundle / m.component("talker", "f32").file
    rng = np.random.default_rng(1)

    def prompt(voice: np.ndarray, n_text: int) -> np.ndarray:
        return np.concatenate([voice, rng.standard_normal((n_text, 64)).astype(np.float32)])

    voice_a, voice_b = (rng.standard_normal((10, 64)).astype(np.float32) * 0.1 for _ in range(2))
    plain = Talker(path, kv_type="f32", flash_attn=False)
    cached = PrefixReusingTalker(Talker(path, kv_type="f32", flash_attn=False))
    cached.prefill_embeds(prompt(voice_a, 3), voice_positions=10)
    assert cached.saved_voices == 1 and cached.saved_bytes > 0
    cached.prefill_embeds(prompt(voice_b, 4), voice_positions=10)
    assert (cached.reused_positions, cached.saved_voices) == (0, 2)
    again = prompt(voice_a, 5)
    out = cached.prefill_embeds(again, voice_positions=10)
    assert (cached.reused_positions, cached.prefilled_positions) == (10, 5) and cached.n_past == 15
    ref = plain.prefill(again)
    np.testing.assert_allclose(out.logits, ref.logits, atol=1e-4)
    np.testing.assert_allclose(out.hidden, ref.hidden, atol=1e-4)

    one_voice = PrefixReusingTalker(Talker(path, kv_type="f32", flash_attn=False),
                                    cache_bytes=cached.saved_bytes // 2 + 1)
    one_voice.prefill_embeds(prompt(voice_a, 3), voice_positions=10)
    one_voice.prefill_embeds(prompt(voice_b, 3), voice_positions=10)
    assert one_voice.saved_voices == 1  # A was evicted for B
    one_voice.prefill_embeds(prompt(voice_a, 3), voice_positions=10)
    assert one_voice.reused_positions == 0
    no_save = PrefixReusingTalker(Talker(path, kv_type="f32", flash_attn=False), cache_bytes=0)
    no_save.prefill_embeds(prompt(voice_a, 3), voice_positions=10)
    assert no_save.saved_voices == 0


@needs_export
def test_an_instruction_is_tokenised_once_per_request(tiny_bundle):
    """Every segment's prompt repeats the instruction; a server lets it run to 2048 characters, so it is tokenised
    once when the request is planned, not once per segment (1.7B CustomVoice ids: that model takes instruct)."""
    import dataclasses

    from qwen3_tts_edge.runtime.pipeline import TTS, SpeakOptions
    from qwen3_tts_edge.runtime.plan import plan_request
    from qwen3_tts_edge.runtime.text import instruct_text

    tts = TTS(tiny_bundle, talker_precision="q8_0", n_ctx=256)
    instruct = "Speak slowly and warmly, like a late-night radio host. " * 8
    seen: list[str] = []

    class Counting:
        def __getattr__(self, name):
            return getattr(tts.tokenizer, name)

        def encode(self, text):
            seen.append(text)
            return tts.tokenizer.encode(text)

    plan = plan_request(LONG, SpeakOptions(speaker="vivian", instruct=instruct, segment_tokens=12),
                        ids=dataclasses.replace(tts.ids, model_size="1b7"), tokenizer=Counting(), tables=tts.tables,
                        manifest=tts.bundle.manifest, n_ctx=256)
    prompts = [plan.first_prompt] + [plan.build(s) for s in plan.segments[1:]]  # as the frame loop builds them
    assert len(plan.segments) >= 3
    assert sum(instruct in text for text in seen) == 1 and seen.count(instruct_text(instruct)) == 1
    head = len(tts.tokenizer.encode(instruct_text(instruct)))
    for p in prompts[1:]:  # the same instruction rows lead every segment's prompt
        np.testing.assert_array_equal(p.embeds[:head], prompts[0].embeds[:head])
