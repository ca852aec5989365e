"""Random Wyoming event streams against the server (hypothesis, bounded in examples and time).

Each example opens a connection, writes a random mix of events (written by the ``wyoming`` package, with fields of
any JSON type) and raw bytes, closes its sending side and reads what comes back with the ``wyoming`` reader. It
must end within seconds; afterwards no worker is held, no connection is counted, no exception reached the event
loop, no ``error`` says "internal", and ``describe`` on a fresh connection is answered within 1 s.
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from dataclasses import dataclass

import pytest

pytest.importorskip("wyoming")
pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from wyoming.error import Error  # noqa: E402
from wyoming.event import Event, read_event, write_event  # noqa: E402
from wyoming.info import Describe, Info  # noqa: E402
from wyoming.server import AsyncTcpServer  # noqa: E402

from qwen3_tts_edge.runtime.servers.pool import EnginePool  # noqa: E402
from qwen3_tts_edge.runtime.servers.voices import VoiceCatalog  # noqa: E402
from qwen3_tts_edge.runtime.servers.wyoming_server import WyomingLimits, WyomingService  # noqa: E402

SENT_TYPES = {"info", "pong", "error", "audio-start", "audio-chunk", "audio-stop", "synthesize-stopped"}


@dataclass
class Running:
    port: int
    service: WyomingService
    pool: EnginePool
    loop: asyncio.AbstractEventLoop
    loop_errors: list

    def call(self, coro, timeout: float = 15.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@pytest.fixture(scope="module")
def server(tiny_bundle):
    """One server for every example, on its own event loop thread, with short limits and 1-3 frame replies."""
    pool = EnginePool.load(tiny_bundle, workers=1, max_queue=4, threads=1)
    engine = pool.engines[0]
    limits = WyomingLimits(idle_timeout_s=2.0, stream_limit_s=8.0, max_data_bytes=4096, max_text_chars=300)
    service = WyomingService(pool, VoiceCatalog(engine.speakers, engine.ids.model_type),
                             options={"min_frames": 1, "max_frames": 3, "text_timeout_s": 1.0}, limits=limits)
    loop = asyncio.new_event_loop()
    loop_errors: list = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    thread = threading.Thread(target=loop.run_forever, name="fuzz-wyoming-loop", daemon=True)
    thread.start()
    tcp = AsyncTcpServer("127.0.0.1", 0)
    asyncio.run_coroutine_threadsafe(tcp.start(service.handler), loop).result(10)
    running = Running(tcp._server.sockets[0].getsockname()[1], service, pool, loop, loop_errors)
    try:
        yield running
    finally:
        running.call(tcp.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        pool.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
texts = st.sampled_from(["Hello.", "Hi there. ", "  ", "", "How are you today?"]) | st.text(max_size=40)
voices = st.none() | json_values | st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["vivian", "ryan", "nobody", "VIVIAN"]) | json_values,
    "speaker": st.sampled_from(["ryan", "x"]) | json_values,
    "language": st.sampled_from(["en", "zh", "xx", "english"]) | json_values,
})
event_types = st.sampled_from(["describe", "ping", "synthesize", "synthesize-start", "synthesize-chunk",
                               "synthesize-stop", "audio-chunk", "info"]) | st.text(min_size=1, max_size=12)
datas = st.fixed_dictionaries({}, optional={"text": texts | json_values, "voice": voices, "extra": json_values})
events = st.builds(Event, type=event_types, data=datas)


def _encoded(event: Event) -> bytes:
    buffer = io.BytesIO()
    write_event(event, buffer)
    return buffer.getvalue()


raw_frames = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"\n", b"{}\n", b"[[[[\n", b'{"type": "synthesize", "data_length": 99999999}\n',
                     b'{"type": "synthesize", "payload_length": 5}\nabcde', b'{"type": 5}\n',
                     b'{"type": "synthesize-chunk", "data": {"text": "\\ud800"}}\n']))
frames = st.lists(events.map(_encoded) | raw_frames, min_size=1, max_size=8)


def exchange(port: int, data: bytes, deadline_s: float = 20.0) -> list[Event]:
    """Write ``data``, half-close, read events until the server closes; fails if it does not within the deadline."""
    received: list[Event] = []
    with socket.create_connection(("127.0.0.1", port), timeout=deadline_s) as sock:
        t0 = time.monotonic()
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused an early frame and closed
        stream = sock.makefile("rb")
        try:
            while (event := read_event(stream)) is not None:
                received.append(event)
                assert time.monotonic() - t0 < deadline_s, "the connection did not end"
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(f"the connection did not end within {deadline_s} s; got "
                                 f"{[e.type for e in received]}") from None
    return received


def describe_latency(port: int) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        t0 = time.perf_counter()
        sock.sendall(_encoded(Describe().event()))
        reply = read_event(sock.makefile("rb"))
        latency = time.perf_counter() - t0
    assert reply is not None and Info.is_type(reply.type)
    return latency


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(frames=frames)
def test_random_event_streams_always_end_and_leave_the_server_healthy(server, frames):
    received = exchange(server.port, b"".join(frames))
    assert {e.type for e in received} <= SENT_TYPES, [e.type for e in received]
    for event in received:
        if Error.is_type(event.type):
            error = Error.from_event(event)
            assert error.text and error.code != "InternalError", error
    assert server.call(server.pool.drain(10)), server.pool.health()
    deadline = time.monotonic() + 5
    while server.service.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.service.connections == 0
    assert not server.loop_errors, server.loop_errors
    assert describe_latency(server.port) < 1.0
