"""``AsyncTTS``: the same audio as ``TTS.stream``, text from async sources, cancellation that leaves no thread.

Runs the tiny bundle's llama.cpp f32 engines; coroutines run under ``asyncio.run`` (no pytest plugin needed).
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from conftest import llm_reply, needs_export
from qwen3_tts_edge.runtime.aio import BUFFER_CHUNKS, AsyncTTS

pytestmark = needs_export
TEXT = "Streaming text from a language model, read aloud while it is still being written."
# A request that would run for a long time: no end of speech before 1500 frames, no runaway guard.
ENDLESS = dict(speaker="ryan", seed=1, min_frames=1500, max_frames=1500, frames_per_text_token=None,
               chunk_frames=(1,))


@pytest.fixture(scope="module")
def tts(tiny_bundle):
    from qwen3_tts_edge.runtime.pipeline import TTS

    return TTS(tiny_bundle, talker_precision="f32")


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("qwen3-tts-edge-")}


async def _left_after(before: set[threading.Thread], timeout: float = 2.0) -> set[str]:
    """The runtime's threads started since ``before`` that are still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := _threads() - before) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return {t.name for t in left}


def _codes(chunks) -> np.ndarray:
    return np.concatenate([c.codes for c in chunks])


def _pcm(chunks) -> np.ndarray:
    return np.concatenate([c.pcm for c in chunks])


def test_a_string_gives_what_tts_stream_gives(tts):
    opts = dict(speaker="vivian", seed=3, max_frames=30, chunk_frames=(1, 2, 4))
    want = list(tts.stream(TEXT, **opts))

    async def main():
        atts = AsyncTTS(tts)
        stream = atts.astream(TEXT, **opts)
        chunks = [chunk async for chunk in stream]
        return chunks, stream.stats, await atts.asynthesize(TEXT, **opts)

    chunks, stats, (pcm, rate) = asyncio.run(main())
    assert [c.n_frames for c in chunks] == [c.n_frames for c in want] and len(chunks) > 3
    assert np.array_equal(_codes(chunks), _codes(want))
    assert np.array_equal(_pcm(chunks), _pcm(want))
    assert stats.frames == sum(c.n_frames for c in want) and stats.stop_reason == want[-1].stop_reason
    assert rate == 24000 and np.array_equal(pcm, _pcm(want))


@pytest.mark.parametrize("mode", [{"greedy": True}, {"seed": 7}], ids=["greedy", "sampled"])
def test_async_pieces_give_the_whole_text_codes(tts, mode):
    opts = dict(speaker="ryan", max_frames=90, chunk_frames=(4,), **mode)
    whole = list(tts.stream(TEXT, **opts))

    async def main():
        stream = AsyncTTS(tts).astream(llm_reply(TEXT, seed=5), **opts)
        return [chunk async for chunk in stream], stream.stats

    chunks, stats = asyncio.run(main())
    assert np.array_equal(_codes(chunks), _codes(whole))
    assert stats.stop_reason == whole[-1].stop_reason
    assert stats.text_wait_ms > 0  # generation did catch up with the text and waited for it


def test_break_after_the_first_chunk_stops_generation(tts):
    async def main():
        before = _threads()
        async for chunk in AsyncTTS(tts).astream(TEXT, **ENDLESS):
            first, running = chunk, {t.name for t in _threads() - before}
            break
        return first, running, await _left_after(before)

    chunk, running, left = asyncio.run(main())
    assert chunk.n_frames == 1
    assert {"qwen3-tts-edge-aio", "qwen3-tts-edge-frames"} <= running
    assert left == set()
    assert tts.last_stats.stop_reason == "cancelled" and tts.last_stats.frames < 100


def test_aclose_stops_generation_and_waits_for_the_worker(tts):
    async def main():
        before = _threads()
        stream = AsyncTTS(tts).astream(TEXT, **ENDLESS)
        async for _ in stream:
            break
        t0 = time.perf_counter()
        await stream.aclose()
        closed_s = time.perf_counter() - t0
        return stream.stats, closed_s, await _left_after(before, timeout=0.5), [c async for c in stream]

    stats, closed_s, left, after = asyncio.run(main())
    assert closed_s < 2.0 and left == set() and after == []
    assert stats.stop_reason == "cancelled" and stats.frames < 100


def test_a_slow_consumer_holds_generation_back(tts):
    async def main():
        stream = AsyncTTS(tts).astream(TEXT, **ENDLESS)
        async with stream:
            await anext(stream)
            await asyncio.sleep(1.5)  # long enough for dozens of frames
            return stream.stats.frames

    # consumed + buffered + the one the worker holds while it waits for room (+ its frame queue, not decoded)
    assert asyncio.run(main()) <= 1 + BUFFER_CHUNKS + 1


def test_cancelling_the_task_stops_generation(tts):
    async def main():
        before = _threads()
        first = asyncio.Event()

        async def speak():
            async for _ in AsyncTTS(tts).astream(TEXT, **ENDLESS):
                first.set()

        task = asyncio.create_task(speak())
        await asyncio.wait_for(first.wait(), timeout=30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await _left_after(before)

    assert asyncio.run(main()) == set()
    assert tts.last_stats.stop_reason == "cancelled" and tts.last_stats.frames < 100


def test_cancelling_while_generation_waits_for_text_closes_the_source(tts):
    closed = threading.Event()

    async def stalls():
        try:
            yield "Hello there, this is "
            await asyncio.sleep(3600)
            yield "never said."
        finally:
            closed.set()

    async def main():
        before = _threads()
        stream = AsyncTTS(tts).astream(stalls(), speaker="ryan", seed=1, max_frames=200, chunk_frames=(1,))
        task = asyncio.create_task(anext(stream))
        await asyncio.wait_for(task, timeout=30)
        waiting = {t.name for t in _threads() - before}
        await asyncio.wait_for(stream.aclose(), timeout=5)
        left = await _left_after(before)
        await asyncio.sleep(0.05)  # the source's task is cancelled once the worker is done
        return waiting, left, closed.is_set()

    waiting, left, source_closed = asyncio.run(main())
    assert "qwen3-tts-edge-text-feed" in waiting and left == set()
    assert source_closed


def test_request_errors_raise_before_any_audio(tts):
    async def main():
        atts = AsyncTTS(tts)
        before = _threads()
        chunks = []
        with pytest.raises(ValueError, match="unknown speaker"):
            async for chunk in atts.astream(TEXT, speaker="nobody"):
                chunks.append(chunk)
        with pytest.raises(ValueError, match="temperature must be a positive number"):
            await atts.astream(TEXT, speaker="vivian", temperature=-1.0)
        with pytest.raises(ValueError, match="unknown speaker"):
            async with atts.astream(TEXT, speaker="nobody"):
                pass
        return chunks, await _left_after(before)

    assert asyncio.run(main()) == ([], set())


def test_a_failing_async_text_source_surfaces_its_error(tts):
    async def fails_later():
        yield "Hello there, how are "
        await asyncio.sleep(0.1)
        raise OSError("the LLM connection dropped")

    async def fails_at_once():
        raise OSError("the LLM is down")
        yield ""  # an async generator

    async def main():
        atts = AsyncTTS(tts)
        before = _threads()
        with pytest.raises(RuntimeError, match="the text iterator failed") as later:
            async for _ in atts.astream(fails_later(), speaker="ryan", seed=1, max_frames=200):
                pass
        with pytest.raises(RuntimeError, match="the text iterator failed") as at_once:
            await atts.astream(fails_at_once(), speaker="ryan", seed=1, max_frames=200)
        return later.value, at_once.value, await _left_after(before)

    later, at_once, left = asyncio.run(main())
    assert isinstance(later.__cause__, OSError) and "dropped" in str(later.__cause__)
    assert isinstance(at_once.__cause__, OSError) and "down" in str(at_once.__cause__)
    assert left == set()


def test_concurrent_requests_on_one_engine_take_turns(tts):
    opts = dict(speaker="vivian", max_frames=12, min_frames=12)
    want = [tts.synthesize(TEXT, seed=s, **opts)[0] for s in (1, 2)]

    async def main():
        atts = AsyncTTS(tts)
        return await asyncio.gather(atts.asynthesize(TEXT, seed=1, **opts), atts.asynthesize(TEXT, seed=2, **opts))

    got = [pcm for pcm, _ in asyncio.run(main())]
    assert len(got[0]) == 12 * 1920 and not np.array_equal(want[0], want[1])
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def test_open_loads_on_a_thread_and_astream_needs_a_loop(tiny_bundle):
    async def main():
        atts = await AsyncTTS.open(tiny_bundle, talker_precision="f32")
        return atts, await atts.asynthesize("Hi.", speaker="ryan", seed=1, max_frames=2, min_frames=2)

    atts, (pcm, rate) = asyncio.run(main())
    assert rate == atts.sample_rate == 24000 and len(pcm) == 2 * 1920
    with pytest.raises(RuntimeError, match="running event loop"):
        atts.astream("Hi.")
