"""``AudioStream.cancel()`` from another thread: the request ends within a frame, also while generation waits for
incremental text, and its threads are gone (what ``AsyncTTS`` and the servers rely on when a client hangs up)."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import needs_export

pytestmark = needs_export


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("qwen3-tts-edge-")]


@pytest.fixture(scope="module")
def tts(tiny_bundle):
    from qwen3_tts_edge.runtime.pipeline import TTS

    return TTS(tiny_bundle, talker_precision="f32", threads=1)


def test_cancel_wakes_a_generation_that_waits_for_text(tts):
    release = threading.Event()

    def pieces():
        yield "Hello there, this is the start of a reply "
        release.wait(30)  # an LLM that has gone quiet
        yield "that never comes."

    before = _threads()
    stream = tts.stream(pieces(), speaker="ryan", seed=1, max_frames=300, min_frames=300, chunk_frames=(1,))
    got, done = [], threading.Event()

    def consume():
        for chunk in stream:
            got.append(chunk)
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    deadline = time.monotonic() + 20
    while stream.stats.text_wait_ms == 0 and not done.is_set() and time.monotonic() < deadline:
        time.sleep(0.02)  # until generation has caught up with the text and waits
    assert got and not done.is_set(), "generation did not reach the text wait"
    t0 = time.perf_counter()
    stream.cancel()
    assert done.wait(2.0), "the consumer did not end after cancel()"
    waited = time.perf_counter() - t0
    release.set()
    assert waited < 1.0, waited
    assert stream.stats.stop_reason == "cancelled"
    deadline = time.monotonic() + 2
    while _threads() != before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [n for n in _threads() if n not in before and n != "qwen3-tts-edge-text-feed"] == []


def test_cancel_stops_generation_within_a_frame_and_drops_queued_audio(tts):
    text = "A long answer that keeps going, sentence after sentence, " * 4
    stream = tts.stream(text, speaker="ryan", seed=2, max_frames=400, min_frames=400, frames_per_text_token=None,
                        chunk_frames=(4,))
    predictor = tts.predictor
    it = iter(stream)
    next(it)  # generation is running now, ahead of the consumer (up to 64 frames queued)
    time.sleep(0.3)
    made_at_cancel = predictor.frames
    stream.cancel()  # thread-safe; here from the consumer's own thread, between chunks
    assert list(it) == []  # what was queued is dropped: a barge-in hears nothing more
    assert predictor.frames - made_at_cancel <= 2  # the frame in flight, at most one more
    assert stream.stats.stop_reason == "cancelled" and stream.stats.frames < 400
