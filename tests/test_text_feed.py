"""Incremental text: pieces in, exactly the whole-text token ids out; one running generation fed live."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from conftest import needs_export
from qwen3_tts_edge.runtime.text import TextTokenizer
from qwen3_tts_edge.runtime.text_feed import IncrementalText, TextFeed, TextPieces

TEXTS = [
    "Hello world, this is a test. It has several sentences!\n\nAnd a new paragraph with numbers 12345.",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "Mixed: English と日本語 and emoji 🎉🎉 plus   spaces\tand tabs... 'quotes' don't break.",
    "CamelCaseWords and snake_case and URLs like https://example.com/a?b=c",
]


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return TextTokenizer.from_folder(tiny_checkpoint)


def _whole(tok, text):
    return tok.encode(f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n")[3:-5]


def _random_pieces(text, rng):
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 25))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize("text", TEXTS)
def test_any_split_gives_the_whole_text_ids(tok, text):
    rng = random.Random(0)
    want = _whole(tok, text)
    for _ in range(40):
        inc = IncrementalText(tok)
        got = []
        for piece in _random_pieces(text, rng):
            got.extend(inc.push(piece))
            assert got == want[: len(got)]  # never commits a token that later changes
        got.extend(inc.finish())
        assert got == want
    # character by character, and word by word as a chat LLM would stream
    for pieces in (list(text), [w + " " for w in text.split(" ")[:-1]] + [text.split(" ")[-1]]):
        inc = IncrementalText(tok)
        got = [i for p in pieces for i in inc.push(p)] + inc.finish()
        assert got == want


def test_commits_words_before_the_text_ends(tok):
    inc = IncrementalText(tok)
    assert inc.push("Hello") == []  # the last word may still grow
    assert inc.push(" wor") == _whole(tok, "Hello")
    assert inc.push("ld and more") != []
    with pytest.raises(TypeError, match="text pieces must be str"):
        inc.push(3)


def test_feed_pulls_in_background_and_reports_errors(tok):
    def slow():
        for word in ["One ", "two ", "three"]:
            time.sleep(0.05)
            yield word

    feed = TextFeed(slow(), tok)
    assert feed.available() == ([], False)  # nothing yet: the consumer is not blocked
    assert feed.wait_for(10**6, timeout=5) is False
    ids, done = feed.available()
    assert done and ids == _whole(tok, "One two three")

    def broken():
        yield "fine "
        raise OSError("the LLM connection dropped")

    feed = TextFeed(broken(), tok)
    with pytest.raises(RuntimeError, match="the text iterator failed"):
        feed.wait_for(10**6, timeout=5)


def test_pushed_pieces_feed_like_an_iterator(tok):
    """TextPieces: pushed from another thread, pulled by a TextFeed; end, close and errors reach the reader."""
    import threading

    text = "One two three, pushed from another thread."
    pieces = TextPieces()
    feed = TextFeed(pieces, tok)

    def writer():
        for word in text.split(" "):
            time.sleep(0.01)
            pieces.push(word if word.endswith(".") else word + " ")
        pieces.end()

    threading.Thread(target=writer).start()
    assert feed.wait_for(10**6, timeout=5) is False and feed.ended
    assert feed.available() == (_whole(tok, text), True) and pieces.text == text
    with pytest.raises(ValueError, match="after end"):
        pieces.push("more")
    with pytest.raises(TypeError, match="must be str"):
        TextPieces().push(b"bytes")

    failing = TextPieces()
    failing.push("fine ")
    failing.end(OSError("the LLM connection dropped"))
    assert next(iter(failing)) == "fine "  # the pieces before the failure still come out
    with pytest.raises(RuntimeError, match="the text iterator failed"):
        TextFeed(failing, tok).wait_for(10**6, timeout=5)

    waiting = TextPieces()
    waiting.push("Nothing more comes ")
    feed = TextFeed(waiting, tok)
    assert feed.wait_for(1, timeout=5) and not feed.ended  # the reader blocks for the next piece
    feed.close()  # cancellation ends the reading thread at once, not at the next piece
    feed._thread.join(timeout=1)
    assert not feed._thread.is_alive()
    waiting.push("dropped")  # nobody reads it any more
    assert list(waiting) == []


@needs_export
def test_live_text_equals_whole_text_when_it_arrives_in_time(tiny_checkpoint, tiny_bundle):
    """Same greedy codes whether the text is given whole or as pieces that are all there in time."""
    import torch

    from qwen3_tts_edge.export.torch_reference import TorchPredictor, TorchTables, TorchTalker, load_official
    from qwen3_tts_edge.runtime.bundle import load_bundle
    from qwen3_tts_edge.runtime.engine.contract import FreshPromptTalker
    from qwen3_tts_edge.runtime.frame_loop import FrameLoop
    from qwen3_tts_edge.runtime.options import Limits
    from qwen3_tts_edge.runtime.prompt import ModelIds, build_prompt
    from qwen3_tts_edge.runtime.sampler import CodeSampler, SamplingParams

    torch.set_num_threads(1)
    model = load_official(tiny_checkpoint)
    manifest = load_bundle(tiny_bundle).manifest
    ids, tok = ModelIds.from_manifest(manifest), TextTokenizer.from_folder(tiny_bundle / "tokenizer")
    tables, talker, predictor = TorchTables(model), TorchTalker(model), TorchPredictor(model)
    text = "Streaming text from a language model, word by word."

    def run(prompt, frames=40):
        sampler = CodeSampler(SamplingParams().greedy(), vocab_size=3072, eos_id=2150)
        loop = FrameLoop(FreshPromptTalker(talker), predictor, tables, prompt, sampler, Limits(max_frames=frames))
        return np.stack([f.codes for f in loop])

    whole = run(build_prompt(ids, tok, tables, text, speaker="ryan"))
    live_prompt = build_prompt(ids, tok, tables, iter(text.split(" ")[i] + (" " if i < 8 else "")
                                                      for i in range(9)), speaker="ryan")
    live_prompt.live.feed.wait_for(10**6, timeout=10)  # all pieces arrived before generation starts
    assert np.array_equal(run(live_prompt), whole)
    assert live_prompt.live.finished and live_prompt.live.wait_ms == 0

    def slow_words():
        for i, word in enumerate(text.split(" ")):
            time.sleep(0.15)  # slower than the frame loop: the loop waits for each token, never pads
            yield word + (" " if i < 8 else "")

    prompt = build_prompt(ids, tok, tables, slow_words(), speaker="ryan")
    frames = run(prompt, frames=40)
    assert np.array_equal(frames, whole)  # the same input sequence as the whole text, whatever the timing
    assert prompt.live.wait_ms > 0
    assert prompt.live.consumed == len(_whole(tok, text))  # every token was fed, in order
    assert prompt.live.finished


def _char_by_char(text: str, seed: int, max_delay_s: float = 0.02):
    """Text one character at a time with random delays: slower and faster than the frame loop by turns."""
    rng = random.Random(seed)
    for ch in text:
        if rng.random() < 0.5:
            time.sleep(rng.uniform(0.0, max_delay_s))
        yield ch


@needs_export
@pytest.mark.parametrize("mode", [{"greedy": True}, {"seed": 7}], ids=["greedy", "sampled"])
def test_char_by_char_with_random_delays_equals_whole_text(tiny_bundle, mode):
    """The llama.cpp runtime: any arrival timing gives the whole text's codes (never a pad mid-sentence)."""
    from qwen3_tts_edge.runtime.pipeline import TTS

    text = "Streaming text, one character at a time: it must sound like the whole sentence."
    tts = TTS(tiny_bundle, talker_precision="f32")
    opts = dict(speaker="ryan", max_frames=90, chunk_frames=(4,), **mode)
    whole = np.concatenate([c.codes for c in tts.stream(text, **opts)])
    whole_stop = tts.last_stats.stop_reason
    live = np.concatenate([c.codes for c in tts.stream(_char_by_char(text, seed=3), **opts)])
    stats = tts.last_stats
    assert live.shape == whole.shape and np.array_equal(live, whole)
    assert stats.stop_reason == whole_stop
    assert stats.text_wait_ms > 0  # generation did catch up with the text and waited instead of padding
    assert "text_wait" in stats.per_frame_ms()


@needs_export
def test_a_stalled_text_iterator_stops_with_a_reason(tiny_bundle):
    from qwen3_tts_edge.runtime.pipeline import TTS

    def stalls():
        yield "Hello there, "
        time.sleep(3.0)  # far beyond the limit below
        yield "world."

    tts = TTS(tiny_bundle, talker_precision="f32")
    t0 = time.perf_counter()
    chunks = list(tts.stream(stalls(), speaker="ryan", seed=1, max_frames=200, text_timeout_s=0.3))
    assert time.perf_counter() - t0 < 2.5
    assert chunks[-1].final and chunks[-1].stop_reason == "text_stalled"
    assert tts.last_stats.stop_reason == "text_stalled" and tts.last_stats.text_wait_ms >= 300


@needs_export
def test_blank_text_is_refused_alike_whole_or_incremental(tiny_bundle):
    from qwen3_tts_edge.runtime.pipeline import TTS, PromptError

    tts = TTS(tiny_bundle, talker_precision="f32")
    for text in ("   ", ["   "], iter([" ", "\n", "\t"]), []):
        with pytest.raises(PromptError, match="non-empty"):
            tts.stream(text, speaker="ryan")
    # Leading whitespace before the words is kept, like in a whole string.
    chunks = list(tts.stream(iter(["  ", "Hi."]), speaker="ryan", seed=1, max_frames=4))
    assert sum(c.n_frames for c in chunks) >= 1


@needs_export
def test_invalid_unicode_is_a_clear_error(tiny_bundle):
    from qwen3_tts_edge.runtime.errors import Qwen3TTSEdgeError
    from qwen3_tts_edge.runtime.pipeline import TTS, PromptError

    tts = TTS(tiny_bundle, talker_precision="f32")
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of a latin-1 byte in argv
    with pytest.raises(PromptError, match="lone surrogate"):
        tts.stream(bad, speaker="ryan")
    with pytest.raises(Qwen3TTSEdgeError, match="lone surrogate"):  # found while the text arrives
        list(tts.stream(iter(["Hello ", bad]), speaker="ryan", max_frames=40))
