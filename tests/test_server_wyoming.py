"""The Wyoming server, driven by the ``wyoming`` package's own ``AsyncTcpClient`` on 127.0.0.1.

Lengths are forced through the service's options (``min_frames`` = ``max_frames`` = N: N x 3840 bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
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


async def read_to_eof(client, timeout: float = 5.0) -> list:
    """Every event until the server closes the connection; fails if it is still open after ``timeout``."""
    events = []
    async with asyncio.timeout(timeout):
        while (event := await client.read_event()) is not None:
            events.append(event)
    return events


def test_a_failed_synthesize_ends_with_an_error_and_eof(pool):
    """Home Assistant reads a plain synthesize until audio-stop or EOF and ignores errors: after the error the
    connection closes (an error left open made it wait for its own timeout)."""
    async def scenario(port, _service):
        results = []
        for voice in (SynthesizeVoice(name="nobody"), SynthesizeVoice(language="xx")):
            async with AsyncTcpClient("127.0.0.1", port) as c:
                await c.write_event(Synthesize(text="Hi.", voice=voice).event())
                results.append(await read_to_eof(c))
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await c.write_event(Synthesize(text="   ").event())
            results.append(await read_to_eof(c))
        return results

    unknown, language, empty = run(pool, 3, scenario)
    assert [e.type for e in unknown] == ["error"]
    err = Error.from_event(unknown[0])
    assert err.code == "UnknownVoice" and "vivian" in err.text and "nobody" in err.text
    assert [e.type for e in language] == ["error"]
    assert Error.from_event(language[0]).code == "VoiceRequestError" and "en" in Error.from_event(language[0]).text
    assert [e.type for e in empty] == ["error"] and "empty" in Error.from_event(empty[0]).text


def test_a_stream_with_an_unknown_voice_still_ends_with_synthesize_stopped(pool):
    async def scenario(port, _service):
        async with AsyncTcpClient("127.0.0.1", port) as c:
            # Home Assistant's sequence with a bad voice: one error, and the stream still ends as expected
            for event in (SynthesizeStart(voice=SynthesizeVoice(name="nobody")), SynthesizeChunk(text="Hi."),
                          Synthesize(text="Hi.", voice=SynthesizeVoice(name="nobody")), SynthesizeStop()):
                await c.write_event(event.event())
            events = await read_until(c, "synthesize-stopped")
            events.append(await c.read_event())
            # the connection is still usable
            await c.write_event(Synthesize(text="Hi.", voice=SynthesizeVoice(name="vivian")).event())
            return events, await read_until(c, "audio-stop")

    events, good = run(pool, 3, scenario)
    assert [e.type for e in events] == ["error", "synthesize-stopped"]
    assert Error.from_event(events[0]).code == "UnknownVoice"
    check_audio(good, 3)


async def write_raw(client, line: bytes) -> None:
    """Bytes the wyoming client would never write (a lone surrogate, lying lengths): straight to its socket."""
    client._writer.write(line)
    await client._writer.drain()


def test_a_stream_failing_mid_audio_closes_its_block_and_stops(pool):
    """Text that fails after audio started: error, the open block's audio-stop, then synthesize-stopped."""
    async def scenario(port, _service):
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="vivian")).event())
            await c.write_event(SynthesizeChunk(text="Hello there, this is the first part. ").event())
            events = []
            while not AudioChunk.is_type((event := await c.read_event()).type):
                events.append(event)
            events.append(event)
            # a lone surrogate (JSON can carry it escaped): the tokenizer refuses it while audio is running
            await write_raw(c, b'{"type": "synthesize-chunk", "data": {"text": "bad \\ud800 text"}}\n')
            await c.write_event(SynthesizeChunk(text="dropped").event())
            await c.write_event(SynthesizeStop().event())
            events += await read_until(c, "synthesize-stopped")
            if Error.is_type(events[-1].type):
                events += await read_until(c, "synthesize-stopped")
            return events

    events = run(pool, None, scenario, max_frames=400, text_timeout_s=20)
    types = [e.type for e in events if e.type != "audio-chunk"]
    assert types == ["audio-start", "error", "audio-stop", "synthesize-stopped"], types
    assert Error.from_event(events[[e.type for e in events].index("error")]).code == "TextError"


def test_queue_full_ends_every_sequence(tiny_bundle):
    """One place, no queue: a second plain request gets error + EOF, a second stream error + synthesize-stopped."""
    small = EnginePool.load(tiny_bundle, workers=1, max_queue=0, threads=1)
    try:
        async def scenario(port, _service):
            async with AsyncTcpClient("127.0.0.1", port) as busy:
                await busy.write_event(Synthesize(text="A long answer. " * 10, voice=SynthesizeVoice(name="ryan"))
                                       .event())
                assert (await busy.read_event()).type == "audio-start"
                async with AsyncTcpClient("127.0.0.1", port) as plain:
                    await plain.write_event(Synthesize(text="Hi.").event())
                    refused = await read_to_eof(plain)
                async with AsyncTcpClient("127.0.0.1", port) as streamed:
                    for event in (SynthesizeStart(), SynthesizeChunk(text="Hi there."), SynthesizeStop()):
                        await streamed.write_event(event.event())
                    stream = await read_until(streamed, "synthesize-stopped")
                    if Error.is_type(stream[-1].type):
                        stream += await read_until(streamed, "synthesize-stopped")
                await read_until(busy, "audio-stop")
                return refused, stream

        refused, stream = run(small, 200, scenario)
        assert [e.type for e in refused] == ["error"] and Error.from_event(refused[0]).code == "QueueFull"
        assert [e.type for e in stream] == ["error", "synthesize-stopped"]
        assert Error.from_event(stream[0]).code == "QueueFull"
    finally:
        small.close()


@pytest.mark.parametrize("data,closes", [
    ({"type": "synthesize", "data": {}}, True),  # no text: was a KeyError that killed the handler
    ({"type": "synthesize", "data": {"text": 5}}, True),
    ({"type": "synthesize", "data": {"text": "Hi.", "voice": "vivian"}}, True),
    ({"type": "synthesize", "data": {"text": "Hi.", "voice": {"name": 7}}}, True),
    ({"type": "synthesize", "data": {"text": "Hi.", "voice": {"name": "vivian", "speaker": ["x"]}}}, True),
    ({"type": "synthesize-start", "data": {"voice": [1]}}, False),
    ({"type": "synthesize-chunk", "data": {"text": "outside any stream"}}, False),
    ({"type": "no-such-event", "data": {"x": 1}}, False),
    ({"type": "audio-chunk", "data": {"rate": 1}}, False),
])
def test_bad_events_get_an_error_and_never_kill_the_handler(pool, data, closes):
    import json

    async def scenario(port, _service):
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await write_raw(c, json.dumps(data).encode() + b"\n")
            first = await asyncio.wait_for(c.read_event(), timeout=5)
            if closes:
                return first, await read_to_eof(c)
            await c.write_event(Describe().event())  # still answering
            return first, [await asyncio.wait_for(c.read_event(), timeout=5)]

    first, rest = run(pool, 3, scenario)
    assert first is not None and Error.is_type(first.type), first
    assert Error.from_event(first).text
    assert [e.type for e in rest] == ([] if closes else ["info"])


def test_voice_null_is_the_default_voice(pool):
    import json

    async def scenario(port, _service):
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await write_raw(c, json.dumps({"type": "synthesize", "data": {"text": "Hi.", "voice": None}}).encode()
                            + b"\n")
            return await read_until(c, "audio-stop")

    check_audio(run(pool, 3, scenario), 3)


def test_ping_is_answered(pool):
    from wyoming.ping import Ping, Pong

    async def scenario(port, _service):
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await c.write_event(Ping(text="hello").event())
            return await asyncio.wait_for(c.read_event(), timeout=5)

    assert Pong.from_event(run(pool, None, scenario)).text == "hello"


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


def _threads(name: str) -> int:
    import threading

    return sum(t.name == name for t in threading.enumerate())


def test_the_replaced_text_feed_is_closed(pool):
    """After a stalled utterance the stream's text goes to a new feed; the old one must not keep a thread."""
    async def scenario(port, _service):
        before = _threads("qwen3-tts-edge-text-feed")
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="vivian")).event())
            await c.write_event(SynthesizeChunk(text="Let me check. ").event())
            await read_until(c, "audio-stop")  # the text stalled for 0.3 s: the utterance ended
            await c.write_event(SynthesizeChunk(text="The lights are off. ").event())
            assert (await c.read_event()).type == "audio-start"
            await read_until(c, "audio-stop")
            await c.write_event(SynthesizeStop().event())
            await read_until(c, "synthesize-stopped")
        deadline = time.monotonic() + 5
        while _threads("qwen3-tts-edge-text-feed") > before and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return before, _threads("qwen3-tts-edge-text-feed")

    before, after = run(pool, None, scenario, max_frames=40, text_timeout_s=0.3)
    assert after == before


def _server_sockets(port: int, status: str) -> int:
    import psutil

    return sum(1 for c in psutil.Process().net_connections("tcp") if c.laddr and c.laddr.port == port
               and c.status == status)


def test_a_client_that_leaves_leaves_no_socket_behind(pool):
    """After the client's EOF the server closes its side (sockets sat in CLOSE_WAIT)."""
    async def scenario(port, _service):
        for _ in range(3):
            async with AsyncTcpClient("127.0.0.1", port) as c:
                await c.write_event(Describe().event())
                assert Info.is_type((await c.read_event()).type)
            async with AsyncTcpClient("127.0.0.1", port) as c:
                await c.write_event(Synthesize(text="Hi.", voice=SynthesizeVoice(name="ryan")).event())
                await read_until(c, "audio-stop")
        deadline = time.monotonic() + 3
        while _server_sockets(port, "CLOSE_WAIT") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return _server_sockets(port, "CLOSE_WAIT"), _server_sockets(port, "ESTABLISHED")

    close_wait, established = run(pool, 3, scenario)
    assert (close_wait, established) == (0, 0)


def limited(**limits):
    from qwen3_tts_edge.runtime.servers.wyoming_server import WyomingLimits

    return WyomingLimits(**limits)


def run_limited(pool, frames, scenario, limits, send_buffer: int | None = None, **options):
    """``run`` with a service built with ``limits`` (``send_buffer``: the server sockets' SO_SNDBUF)."""
    import socket

    engine = pool.engines[0]
    forced = {"min_frames": frames, "max_frames": frames, **options} if frames else options
    service = WyomingService(pool, VoiceCatalog(engine.speakers, engine.ids.model_type), options=forced,
                             limits=limits)

    def handler(reader, writer):
        if send_buffer:
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        return service.handler(reader, writer)

    async def main():
        server = AsyncTcpServer("127.0.0.1", 0)
        await server.start(handler)
        port = server._server.sockets[0].getsockname()[1]
        try:
            return await asyncio.wait_for(scenario(port, service), timeout=120)
        finally:
            await server.stop()
            assert await pool.drain(10), pool.health()

    return asyncio.run(main())


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[list, float]:
    """Send raw bytes, read events with the wyoming reader until the server closes: (events, seconds)."""
    from wyoming.event import async_read_event

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    try:
        writer.write(data)
        await writer.drain()
        events = []
        async with asyncio.timeout(timeout):
            while (event := await async_read_event(reader)) is not None:
                events.append(event)
        return events, time.monotonic() - t0
    finally:
        writer.close()


@pytest.mark.parametrize("name,data", [
    ("declared data far beyond the limit", b'{"type": "synthesize", "data_length": 100000000000}\n{"text": "'),
    ("a payload", b'{"type": "synthesize", "payload_length": 1000000}\n' + b"x" * 1000),
    ("a header line over 64 KiB", b'{"type": "synthesize", "data": {"text": "' + b"a" * 70000 + b'"}}\n'),
    ("deeply nested JSON", b"[" * 60000 + b"\n"),
    ("not JSON", b"hello there\n"),
    ("a JSON list", b"[1, 2]\n"),
    ("no type", b'{"data": {"text": "hi"}}\n'),
    ("a non-integer length", b'{"type": "synthesize", "data_length": "12"}\n'),
    ("data that is not an object", b'{"type": "synthesize", "data_length": 2}\n[]'),
])
def test_frames_beyond_the_limits_are_refused_before_they_are_read(pool, name, data):
    async def scenario(port, _service):
        return await raw_exchange(port, data)

    events, seconds = run(pool, None, scenario)
    assert [e.type for e in events] == ["error"], name
    assert Error.from_event(events[0]).code == "FramingError" and seconds < 2, (name, Error.from_event(events[0]))


def test_idle_and_half_sent_connections_are_closed(pool):
    async def scenario(port, _service):
        idle = await raw_exchange(port, b"")
        half = await raw_exchange(port, b'{"type": "desc')  # a header that never ends
        return idle, half

    for events, seconds in run_limited(pool, None, scenario, limited(idle_timeout_s=0.5)):
        assert [e.type for e in events] == ["error"] and Error.from_event(events[0]).code == "TimedOut"
        assert 0.4 < seconds < 2


def test_open_connections_are_capped(pool):
    async def scenario(port, service):
        held = [AsyncTcpClient("127.0.0.1", port) for _ in range(2)]
        for c in held:
            await c.connect()
            await c.write_event(Describe().event())
            assert Info.is_type((await c.read_event()).type)
        async with AsyncTcpClient("127.0.0.1", port) as third:
            refused = await read_to_eof(third)
        await held[0].disconnect()
        deadline = time.monotonic() + 2
        while service.connections > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        async with AsyncTcpClient("127.0.0.1", port) as again:
            await again.write_event(Describe().event())
            answered = await again.read_event()
        await held[1].disconnect()
        return refused, answered, service.refused

    refused, answered, count = run_limited(pool, None, scenario, limited(max_connections=2))
    assert [e.type for e in refused] == ["error"] and Error.from_event(refused[0]).code == "TooManyConnections"
    assert Info.is_type(answered.type) and count == 1


def test_a_trickled_stream_ends_at_the_stream_limit(pool):
    """One word every 0.4 s (under every per-token wait) still cannot hold a worker past the stream limit."""
    async def scenario(port, _service):
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="vivian")).event())

            async def trickle():
                with contextlib.suppress(ConnectionError, OSError):
                    for i in range(100):
                        await c.write_event(SynthesizeChunk(text=f"word{i} ").event())
                        await asyncio.sleep(0.4)

            writer = asyncio.create_task(trickle())
            t0 = time.monotonic()
            try:
                events = await read_to_eof(c, timeout=10)
            finally:
                writer.cancel()
            return events, time.monotonic() - t0

    events, seconds = run_limited(pool, None, scenario, limited(stream_limit_s=1.5), max_frames=1500,
                                  text_timeout_s=20)
    types = [e.type for e in events if e.type != "audio-chunk"]
    assert types[-3:] == ["error", "audio-stop", "synthesize-stopped"], types
    assert types.count("audio-start") == types.count("audio-stop") == 1
    assert Error.from_event(next(e for e in events if Error.is_type(e.type))).code == "TimedOut"
    assert 1.4 < seconds < 4


def test_a_client_that_stops_reading_frees_its_worker(pool):
    """A slow reader: once its socket buffers are full and nothing drains for idle_timeout_s, it is dropped."""
    import socket

    async def scenario(port, _service):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b'{"type": "synthesize", "data": {"text": "A long answer that nobody reads."}}\n')
        try:
            deadline = time.monotonic() + 5
            while not pool.busy and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert pool.busy == 1
            await asyncio.sleep(0.5)
            assert pool.busy == 1  # stuck behind the full socket buffers
            t0 = time.monotonic()
            freed = await pool.drain(10)
            return freed, time.monotonic() - t0
        finally:
            sock.close()

    freed, seconds = run_limited(pool, 600, scenario, limited(idle_timeout_s=1.0), send_buffer=4096)
    assert freed and seconds < 5


def test_a_queued_client_that_leaves_is_dropped_at_once(tiny_bundle):
    """A plain synthesize waiting for a place whose client closes: cancelled then, not spoken later for nobody."""
    small = EnginePool.load(tiny_bundle, workers=1, max_queue=4, threads=1)
    try:
        async def scenario(port, _service):
            async with AsyncTcpClient("127.0.0.1", port) as busy:
                await busy.write_event(Synthesize(text="A long answer. " * 10).event())
                assert (await busy.read_event()).type == "audio-start"
                served = small.served
                leaving = AsyncTcpClient("127.0.0.1", port)
                await leaving.connect()
                await leaving.write_event(Synthesize(text="Never mind.").event())
                await asyncio.sleep(0.3)
                assert small.queued == 1
                await leaving.disconnect()
                await asyncio.sleep(0.5)
                left = small.queued, _server_sockets(port, "CLOSE_WAIT")
                await read_until(busy, "audio-stop")
            assert await small.drain(5)
            return left, small.served - served

        (queued, close_wait), served = run(small, 300, scenario)
        assert (queued, close_wait) == (0, 0) and served == 1
    finally:
        small.close()
