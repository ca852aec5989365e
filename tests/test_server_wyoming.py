"""The Wyoming server, driven by the ``wyoming`` package's own ``AsyncTcpClient`` on 127.0.0.1.

Lengths are forced through the service's options (``min_frames`` = ``max_frames`` = N: N x 3840 bytes).
"""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("wyoming")

from wyoming.audio import AudioChunk, AudioStart, AudioStop  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.error import Error  # noqa: E402
from wyoming.info import Describe, Info  # noqa: E402
from wyoming.server import AsyncTcpServer  # noqa: E402
from wyoming.tts import (  # noqa: E402
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from qwen3_tts_edge.runtime.servers.pool import EnginePool  # noqa: E402
from qwen3_tts_edge.runtime.servers.voices import VoiceCatalog  # noqa: E402
from qwen3_tts_edge.runtime.servers.wyoming_server import WyomingService  # noqa: E402

BYTES_PER_FRAME = 1920 * 2


@pytest.fixture(scope="module")
def pool(tiny_bundle):
    p = EnginePool.load(tiny_bundle, workers=1, max_queue=16, threads=1)
    yield p
    p.close()


def run(pool, frames: int | None, scenario, **options):
    """Start a server on an ephemeral port, run ``scenario(port, service)``, stop it."""
    engine = pool.engines[0]
    forced = {"min_frames": frames, "max_frames": frames, **options} if frames else options
    service = WyomingService(pool, VoiceCatalog(engine.speakers, engine.ids.model_type), options=forced)

    async def main():
        server = AsyncTcpServer("127.0.0.1", 0)
        await server.start(service.handler)
        port = server._server.sockets[0].getsockname()[1]
        try:
            return await asyncio.wait_for(scenario(port, service), timeout=120)
        finally:
            await server.stop()
            # the pool is shared by the module: leave it idle
            assert await pool.drain(10), pool.health()

    return asyncio.run(main())


async def read_until(client, stop_type: str) -> list:
    events = []
    while True:
        event = await client.read_event()
        assert event is not None, f"connection closed before {stop_type}; got {[e.type for e in events]}"
        events.append(event)
        if event.type == stop_type or Error.is_type(event.type):
            return events


def check_audio(events, frames: int) -> None:
    types = [e.type for e in events]
    assert types.count("audio-start") == 1 and types.count("audio-stop") == 1
    assert types.index("audio-start") < types.index("audio-chunk") and types[-1] in ("audio-stop",
                                                                                     "synthesize-stopped")
    chunks = [AudioChunk.from_event(e) for e in events if AudioChunk.is_type(e.type)]
    start = AudioStart.from_event(events[types.index("audio-start")])
    assert (start.rate, start.width, start.channels) == (24000, 2, 1)
    assert {(c.rate, c.width, c.channels) for c in chunks} == {(24000, 2, 1)}
    assert sum(len(c.audio) for c in chunks) == frames * BYTES_PER_FRAME


def test_describe_lists_the_speakers_and_streaming(pool):
    async def scenario(port, _service):
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await c.write_event(Describe().event())
            return Info.from_event(await c.read_event())

    info = run(pool, None, scenario)
    assert len(info.tts) == 1
    program = info.tts[0]
    assert program.installed and program.supports_synthesize_streaming and program.name == "qwen3-tts-edge"
    names = [v.name for v in program.voices]
    assert names == sorted(pool.engines[0].speakers) and "vivian" in names
    assert all(v.installed for v in program.voices)
    assert {"en", "zh"} <= set(program.voices[0].languages) and "auto" not in program.voices[0].languages


def test_synthesize_gives_one_start_chunks_and_one_stop(pool):
    async def scenario(port, _service):
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await c.write_event(Synthesize(text="Hello world.", voice=SynthesizeVoice(name="ryan")).event())
            events = await read_until(c, "audio-stop")
            # nothing else follows the stop
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(c.read_event(), timeout=0.3)
            return events

    check_audio(run(pool, 12, scenario), 12)


def test_home_assistant_streaming_sequence_is_spoken_once(pool):
    """start, chunks, the compatibility full-text synthesize, stop: one utterance, then synthesize-stopped."""
    async def scenario(port, _service):
        async with AsyncTcpClient("127.0.0.1", port) as c:
            voice = SynthesizeVoice(name="vivian")
            for event in (SynthesizeStart(voice=voice), SynthesizeChunk(text="Hello there. "),
                          SynthesizeChunk(text="How are "), SynthesizeChunk(text="you today?"),
                          Synthesize(text="Hello there. How are you today?", voice=voice), SynthesizeStop()):
                await c.write_event(event.event())
            return await read_until(c, "synthesize-stopped")

    events = run(pool, 15, scenario)
    assert events[-1].type == "synthesize-stopped"
    check_audio(events, 15)  # 15 frames once: the compatibility synthesize was not spoken again


def test_streamed_text_matches_the_whole_text(pool):
    """The chunks go through the incremental-text path: the audio equals speaking the joined text."""
    async def streamed(port, _service):
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="vivian")).event())
            for piece in ("The quick brown ", "fox jumps", " over the lazy dog."):
                await c.write_event(SynthesizeChunk(text=piece).event())
                await asyncio.sleep(0.05)
            await c.write_event(SynthesizeStop().event())
            return await read_until(c, "synthesize-stopped")

    async def whole(port, _service):
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await c.write_event(Synthesize(text="The quick brown fox jumps over the lazy dog.",
                                           voice=SynthesizeVoice(name="vivian")).event())
            return await read_until(c, "audio-stop")

    def audio(events):
        return b"".join(AudioChunk.from_event(e).audio for e in events if AudioChunk.is_type(e.type))

    a = audio(run(pool, 10, streamed, seed=4))
    b = audio(run(pool, 10, whole, seed=4))
    assert len(a) == 10 * BYTES_PER_FRAME and a == b


def test_describe_is_fast_while_another_connection_synthesises(pool):
    async def scenario(port, _service):
        async with AsyncTcpClient("127.0.0.1", port) as busy, AsyncTcpClient("127.0.0.1", port) as probe:
            await busy.write_event(Synthesize(text="A long answer. " * 30, voice=SynthesizeVoice(name="ryan")).event())
            first = await busy.read_event()
            assert first.type == "audio-start"
            latencies = []
            for _ in range(5):
                t0 = time.perf_counter()
                await probe.write_event(Describe().event())
                info = await probe.read_event()
                latencies.append(time.perf_counter() - t0)
                assert Info.is_type(info.type)
                assert pool.busy == 1  # still synthesising on the other connection
                await asyncio.sleep(0.05)
            await read_until(busy, "audio-stop")
            return latencies

    latencies = run(pool, 600, scenario)
    assert max(latencies) < 1.0, latencies  # Home Assistant's info timeout is 1 s; in practice a few ms
    print(f"describe latency under load: max {max(latencies) * 1e3:.1f} ms")


def test_unknown_voice_is_an_error_event(pool):
    async def scenario(port, _service):
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await c.write_event(Synthesize(text="Hi.", voice=SynthesizeVoice(name="nobody")).event())
            bad = await c.read_event()
            # Home Assistant's sequence with a bad voice: one error, and the stream still ends as expected
            for event in (SynthesizeStart(voice=SynthesizeVoice(name="nobody")), SynthesizeChunk(text="Hi."),
                          Synthesize(text="Hi.", voice=SynthesizeVoice(name="nobody")), SynthesizeStop()):
                await c.write_event(event.event())
            bad_stream = await c.read_event()
            assert (await c.read_event()).type == "synthesize-stopped"
            await c.write_event(Synthesize(text="Hi.", voice=SynthesizeVoice(language="xx")).event())
            bad_language = await c.read_event()
            # the connection is still usable
            await c.write_event(Synthesize(text="Hi.", voice=SynthesizeVoice(name="vivian")).event())
            return bad, bad_stream, bad_language, await read_until(c, "audio-stop")

    bad, bad_stream, bad_language, good = run(pool, 3, scenario)
    for event in (bad, bad_stream):
        err = Error.from_event(event)
        assert err.code == "UnknownVoice" and "vivian" in err.text and "nobody" in err.text
    assert Error.from_event(bad_language).code == "VoiceRequestError" and "en" in Error.from_event(bad_language).text
    check_audio(good, 3)


def test_disconnect_mid_stream_leaves_the_server_healthy(pool):
    async def scenario(port, _service):
        c = AsyncTcpClient("127.0.0.1", port)
        await c.connect()
        await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="vivian")).event())
        await c.write_event(SynthesizeChunk(text="This reply is long. " * 40).event())
        while not AudioChunk.is_type((await c.read_event()).type):
            pass
        await c.disconnect()  # gone mid-stream, without synthesize-stop
        t0 = time.monotonic()
        assert await pool.drain(5), pool.health()  # the worker is free again within moments
        freed = time.monotonic() - t0
        c2 = AsyncTcpClient("127.0.0.1", port)
        await c2.connect()
        try:
            await c2.write_event(Synthesize(text="Still here?", voice=SynthesizeVoice(name="ryan")).event())
            return freed, await read_until(c2, "audio-stop")
        finally:
            await c2.disconnect()

    freed, events = run(pool, None, scenario, max_frames=1500)
    assert freed < 5
    assert events[-1].type == "audio-stop" and AudioStop.is_type(events[-1].type)


def test_an_empty_stream_just_stops(pool):
    async def scenario(port, _service):
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await c.write_event(SynthesizeStart().event())
            await c.write_event(SynthesizeStop().event())
            return await read_until(c, "synthesize-stopped")

    assert [e.type for e in run(pool, None, scenario)] == [SynthesizeStopped().event().type]


def test_text_after_a_stalled_utterance_is_spoken_as_a_new_block(pool):
    """An LLM that pauses longer than text_timeout_s: the utterance ends, and the later text still gets spoken."""
    async def scenario(port, _service):
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="vivian")).event())
            await c.write_event(SynthesizeChunk(text="Let me check that for you. ").event())
            first = await read_until(c, "audio-stop")  # ends once the text has stalled for 0.3 s
            await c.write_event(SynthesizeChunk(text="The lights are off.").event())
            await c.write_event(SynthesizeStop().event())
            return first, await read_until(c, "synthesize-stopped")

    first, rest = run(pool, None, scenario, max_frames=40, text_timeout_s=0.3)
    assert [e.type for e in first].count("audio-start") == 1
    types = [e.type for e in rest]
    assert types.count("audio-start") == 1 and types.count("audio-stop") == 1 and types[-1] == "synthesize-stopped"
    assert sum(len(AudioChunk.from_event(e).audio) for e in rest if AudioChunk.is_type(e.type)) > 0
