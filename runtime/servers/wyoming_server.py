"""The Wyoming TTS server (Home Assistant's voice pipeline): one handler per connection over an engine pool.

- ``describe`` -> ``info``: one installed TTS program; its voices are the bundle's preset speakers and the
  saved voices (re-read on every describe), with the language codes Home Assistant groups by, and
  ``supports_synthesize_streaming``. Synthesis runs on worker threads, so ``describe`` is answered at once
  even while other connections synthesise (Home Assistant waits one second for it). ``ping`` -> ``pong``.
- ``synthesize`` -> one ``audio-start``, the ``audio-chunk``s as they are made (24000 Hz, 2 bytes, mono) and
  exactly one ``audio-stop``.
- ``synthesize-start`` / ``-chunk`` / ``-stop``: the chunks (an LLM's reply as it is written) are fed into one
  running utterance through the runtime's incremental-text path, answered with one audio block and
  ``synthesize-stopped``. The full-text ``synthesize`` Home Assistant sends inside an open stream (for older
  servers) is ignored, or the reply would be spoken twice. ICL voices (reference codes) cannot take text
  that is still arriving, so for them the text is collected and spoken at ``synthesize-stop``.

Every sequence ends the way the client waits for it, also when it fails (Home Assistant ignores ``error`` and
reads a plain ``synthesize`` until ``audio-stop`` or EOF, a stream until ``synthesize-stopped``):

- a plain ``synthesize`` that fails (bad voice or text, full queue, engine failure): ``error``, then the
  connection closes. EOF makes Home Assistant report "no TTS" instead of playing an empty WAV;
- a stream that fails (at its start, in its text, in generation): ``error``, an ``audio-stop`` for an audio
  block already started, the rest of its text is dropped, and ``synthesize-stop`` is still answered with
  ``synthesize-stopped``;
- a stream that runs past ``stream_limit_s``, or a connection idle for ``idle_timeout_s`` inside a stream:
  ``error``, ``audio-stop`` if a block is open, ``synthesize-stopped``, close;
- an event this server will not read (over the size limits, not Wyoming JSON, a payload): ``error``, close;
  an event with fields of the wrong type: ``error`` (closing for a plain ``synthesize``); an unknown event
  type: ``error``, the connection stays open.

A client that goes away (or stops reading for ``idle_timeout_s``) cancels its request and leaves the server as
it was. The ``wyoming`` library's own reader takes any ``data_length`` / ``payload_length`` a client declares,
so this handler reads events itself, with the limits of ``WyomingLimits``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped, SynthesizeVoice

from ..aio import AsyncAudioStream
from ..audio import to_s16le
from ..errors import Qwen3TTSEdgeError
from ..options import SpeakOptions
from ..text_feed import TextPieces
from .pool import SERVER_CHUNK_FRAMES, EnginePool
from .voices import VoiceCatalog, language_code, language_name

log = logging.getLogger("qwen3_tts_edge.wyoming")

PROGRAM = "qwen3-tts-edge"
ATTRIBUTION = Attribution(name="Qwen", url="https://huggingface.co/Qwen")
WIDTH, CHANNELS = 2, 1
# An event's JSON header line: asyncio's stream reader refuses longer lines (its default limit).
MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class WyomingLimits:
    """What one client may cost the server: it listens on every interface by default and runs for months."""

    max_connections: int = 16  # open at once; the next one gets an error and is closed
    idle_timeout_s: float = 60.0  # no complete event for this long (or a write that cannot drain): closed
    stream_limit_s: float = 600.0  # synthesize-start to synthesize-stopped, whatever the text's pace
    max_data_bytes: int = 256 * 1024  # an event's JSON data (a synthesize's text travels here)
    max_text_chars: int = 20_000  # one synthesize's text, or one stream's chunks together

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_data_bytes", "max_text_chars"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("idle_timeout_s", "stream_limit_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive seconds, got {getattr(self, name)!r}")


class BadEvent(Qwen3TTSEdgeError):
    """An event whose fields this server cannot take (no text, a voice name that is not a string, ...)."""


class FramingError(BadEvent):
    """Bytes that are not an event this server will read; the connection cannot go on after them."""


class TooManyConnections(Qwen3TTSEdgeError):
    pass


class TimedOut(Qwen3TTSEdgeError):
    """The connection was idle too long, or a stream ran past its time limit."""


class _ClientStalled(ConnectionError):
    """The client stopped reading the audio; treated as gone."""


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FramingError(f"event header {key} must be a non-negative integer, got {value!r}")
    if value > limit:
        what = "this server takes no payloads" if limit == 0 else f"this server's limit is {limit} bytes"
        raise FramingError(f"event {key} {value} refused: {what}")
    return value


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
        raise FramingError(f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise FramingError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


async def read_event(reader: asyncio.StreamReader, limits: WyomingLimits) -> Event | None:
    """The next event, read within the limits (None at EOF); ``FramingError`` for anything else."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise FramingError("the connection ended inside an event header") from None
        return None
    except asyncio.LimitOverrunError:
        raise FramingError(f"event header longer than {MAX_HEADER_BYTES} bytes") from None
    if not line.strip():
        raise FramingError("empty event header line")
    header = _json_object(line, "event header")
    kind = header.get("type")
    if not isinstance(kind, str) or not kind:
        raise FramingError("event header has no string 'type'")
    data = header.get("data")
    if data is None:
        data = {}
    elif not isinstance(data, dict):
        raise FramingError(f"event data must be a JSON object, got {type(data).__name__}")
    data_length = _length(header, "data_length", limits.max_data_bytes)
    _length(header, "payload_length", 0)
    if data_length:
        try:
            data.update(_json_object(await reader.readexactly(data_length), "event data"))
        except asyncio.IncompleteReadError:
            return None  # the client left mid-event
    return Event(type=kind, data=data)


def _text(data: dict[str, Any], event: str, limits: WyomingLimits) -> str:
    text = data.get("text")
    if not isinstance(text, str):
        raise BadEvent(f"{event} needs a 'text' string, got {type(text).__name__}")
    if len(text) > limits.max_text_chars:
        raise BadEvent(f"{event} text has {len(text)} characters; this server takes at most {limits.max_text_chars}")
    return text


def _voice(data: dict[str, Any], event: str) -> SynthesizeVoice | None:
    voice = data.get("voice")
    if voice is None:
        return None
    if not isinstance(voice, dict):
        raise BadEvent(f"{event} voice must be an object with name / speaker / language, got {type(voice).__name__}")
    fields = {key: voice.get(key) for key in ("name", "speaker", "language")}
    for key, value in fields.items():
        if value is not None and not isinstance(value, str):
            raise BadEvent(f"{event} voice.{key} must be a string, got {type(value).__name__}")
    if not any(fields.values()):
        return None
    return SynthesizeVoice(**fields)


class WyomingService:
    """What every connection shares: the pool, the voices, the server-wide options and limits."""

    def __init__(self, pool: EnginePool, catalog: VoiceCatalog, *, max_frames: int | None = None,
                 options: dict[str, Any] | None = None, limits: WyomingLimits | None = None):
        self.pool, self.catalog = pool, catalog
        engine = pool.engines[0]
        self.sample_rate = int(engine.sample_rate)
        self.languages = list(engine.languages)
        self.language_codes = sorted({language_code(n) for n in self.languages if n != "auto"})
        self.max_frames = max_frames
        self.options = dict(options or {})  # extra SpeakOptions fields for every request (tests, benchmarks)
        self.limits = limits or WyomingLimits()
        self.connections = 0  # handlers running now
        self.refused = 0  # connections turned away at the cap

    def info(self) -> Info:
        from .. import __version__

        kind, packs = self.catalog.model_type, set(self.catalog.packs())

        def label(name: str) -> str:
            if name in self.catalog.speakers:
                return name.replace("_", " ").title()
            return f"{name} (voice pack)" if name in packs else f"{name} ({kind} voice)"

        voices = [TtsVoice(name=name, attribution=ATTRIBUTION, installed=True, version=None, description=label(name),
                           languages=self.language_codes) for name in self.catalog.names()]
        program = TtsProgram(name=PROGRAM, attribution=ATTRIBUTION, installed=True, version=__version__,
                             description="Qwen3-TTS Edge (torch-free, streaming)", voices=voices,
                             supports_synthesize_streaming=True)
        return Info(tts=[program])

    def speak_options(self, voice: SynthesizeVoice | None) -> SpeakOptions:
        """A request's voice (name, speaker, language) to speak options; unknown ones raise with the choices."""
        name = voice.name if voice else None
        speaker = voice.speaker if voice else None
        choice = self.catalog.resolve(speaker if speaker and speaker.lower() in self.catalog.speakers else name)
        language = language_name(voice.language if voice else None, self.languages)
        if language == "auto" and choice.voice is not None and choice.voice.language:
            language = choice.voice.language
        return SpeakOptions(language=language, speaker=choice.speaker, voice=choice.spoken,
                            chunk_frames=SERVER_CHUNK_FRAMES, **{"max_frames": self.max_frames, **self.options})

    def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> TtsHandler:
        return TtsHandler(reader, writer, self)


@dataclass
class _OpenStream:
    """A ``synthesize-start`` ... ``synthesize-stop`` stream of one connection."""

    options: SpeakOptions | None
    incremental: bool
    deadline: float  # time.monotonic() by which synthesize-stopped must be sent
    feed: TextPieces = field(default_factory=TextPieces)
    task: asyncio.Task | None = None
    failed: bool = False  # an error was sent: the rest of the stream is dropped until synthesize-stop
    block_open: bool = False  # an audio-start was sent and its audio-stop not yet
    spoken: bool = False  # the running utterance wrote its audio-stop: it reads no more text
    chars: int = 0


class TtsHandler(AsyncEventHandler):
    """One client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, service: WyomingService):
        super().__init__(reader, writer)
        self.service = service
        self.limits = service.limits
        self._write_lock = asyncio.Lock()
        self._stream: _OpenStream | None = None
        self._streams: set[AsyncAudioStream] = set()
        self._finishing: set[asyncio.Task] = set()  # stream tasks past their audio-stop, replaced by newer ones

    async def write_event(self, event: Event) -> None:
        async with self._write_lock:  # audio from a stream's task and answers to events never interleave
            try:
                async with asyncio.timeout(self.limits.idle_timeout_s):
                    await super().write_event(event)
            except TimeoutError:
                self.writer.transport.abort()  # a client that stopped reading holds no worker
                raise _ClientStalled(f"the client read nothing for {self.limits.idle_timeout_s:g} s") from None

    async def run(self) -> None:
        """Read events within the limits until EOF, a framing error, a timeout or ``handle_event`` says stop."""
        service = self.service
        admitted = service.connections < self.limits.max_connections
        try:
            if not admitted:
                service.refused += 1
                await self._error(TooManyConnections(f"this server takes at most {self.limits.max_connections} "
                                                     "connections at once; try again later"))
                return
            service.connections += 1
            while True:
                try:
                    async with asyncio.timeout(self._read_timeout()):
                        event = await read_event(self.reader, self.limits)
                except TimeoutError:
                    await self._timed_out()
                    return
                except FramingError as exc:
                    await self._error(exc)
                    return
                except (ConnectionError, OSError):
                    return
                if event is None or not await self.handle_event(event):
                    return
        finally:
            if admitted:
                service.connections -= 1
            try:
                await self.disconnect()
            finally:
                await self._close_writer()

    def _read_timeout(self) -> float:
        timeout = self.limits.idle_timeout_s
        if self._stream is not None:
            timeout = min(timeout, self._stream.deadline - time.monotonic())
        return max(timeout, 0.0)

    async def _timed_out(self) -> None:
        stream = self._stream
        if stream is not None and time.monotonic() >= stream.deadline:
            exc = TimedOut(f"the stream ran past this server's limit of {self.limits.stream_limit_s:g} s")
        else:
            exc = TimedOut(f"no event for {self.limits.idle_timeout_s:g} s; closing the connection")
        if stream is None:
            await self._error(exc)
        else:
            await self._end_stream(stream, exc)

    async def _close_writer(self) -> None:
        self.writer.close()
        try:
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()
        except (TimeoutError, ConnectionError, OSError):
            self.writer.transport.abort()

    async def handle_event(self, event: Event) -> bool:
        try:
            return await self._handle(event)
        except (ConnectionError, BrokenPipeError):
            return False  # the client went away; disconnect() cleans up
        except Qwen3TTSEdgeError as exc:
            await self._error(exc)
            return True
        except Exception:  # a bug: say so to the client without internals, keep the trace in the log
            log.exception("handling a %s event failed", event.type)
            await self._error(RuntimeError("internal error; see the server log"))
            return False

    async def _error(self, exc: BaseException) -> None:
        code = "InternalError" if not isinstance(exc, Qwen3TTSEdgeError) else type(exc).__name__
        with contextlib.suppress(ConnectionError, BrokenPipeError, OSError):
            await self.write_event(Error(text=str(exc), code=code).event())

    async def _handle(self, event: Event) -> bool:
        data = event.data
        if Describe.is_type(event.type):
            await self.write_event(self.service.info().event())
        elif Ping.is_type(event.type):
            text = data.get("text")
            await self.write_event(Pong(text=text if isinstance(text, str) else None).event())
        elif SynthesizeStart.is_type(event.type):
            await self._start_stream(data)
        elif SynthesizeChunk.is_type(event.type):
            await self._chunk(data)
        elif Synthesize.is_type(event.type):
            if self._stream is not None:
                return True  # Home Assistant's compatibility copy of the streamed text: already being spoken
            return await self._synthesize(data)
        elif SynthesizeStop.is_type(event.type):
            return await self._stop_stream()
        else:
            raise BadEvent(f"unsupported event type {event.type[:64]!r}; this is a TTS server (describe, synthesize, "
                           "synthesize-start/-chunk/-stop)")
        return True

    async def _synthesize(self, data: dict[str, Any]) -> bool:
        """A plain synthesize; on any failure the error is sent and the connection closes (False)."""
        try:
            text = _text(data, "synthesize", self.limits)
            if not text.strip():
                raise BadEvent("nothing to say: the synthesize text is empty")
            options = self.service.speak_options(_voice(data, "synthesize"))
            return await self._unless_gone(self._speak(text, options))
        except Qwen3TTSEdgeError as exc:
            await self._error(exc)
            return False

    async def _unless_gone(self, work) -> bool:
        """Run a plain request while watching for the client's EOF: one that leaves while queued or speaking
        cancels it at once (its socket no longer waits in CLOSE_WAIT behind other requests). False if it left."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(self._eof())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait([task])
        if task.cancelled():
            return False
        task.result()  # its error, if any
        return True

    async def _eof(self) -> None:
        # No events are read while a plain request runs, so EOF shows once the client's bytes are consumed.
        while not self.reader.at_eof():
            await asyncio.sleep(0.1)

    async def _start_stream(self, data: dict[str, Any]) -> None:
        await self._close_stream(cancel=True)
        stream = _OpenStream(options=None, incremental=False,
                             deadline=time.monotonic() + self.limits.stream_limit_s)
        self._stream = stream
        try:
            options = self.service.speak_options(_voice(data, "synthesize-start"))
        except Qwen3TTSEdgeError as exc:
            # Reported once; the rest of this stream (chunks, the compatibility synthesize) is dropped and
            # synthesize-stop is still answered, so the client's sequence ends as it expects.
            await self._fail_stream(stream, exc)
            return
        stream.options = options
        stream.incremental = not (options.voice is not None and getattr(options.voice, "mode", None) == "icl")

    async def _chunk(self, data: dict[str, Any]) -> None:
        stream = self._stream
        if stream is None:
            raise BadEvent("synthesize-chunk outside a stream: send synthesize-start first")
        if stream.failed:
            return
        try:
            text = _text(data, "synthesize-chunk", self.limits)
            stream.chars += len(text)
            if stream.chars > self.limits.max_text_chars:
                raise BadEvent(f"the stream's text passed {self.limits.max_text_chars} characters, this server's "
                               "limit for one reply")
        except BadEvent as exc:
            await self._fail_stream(stream, exc)
            return
        if not text:
            return
        if stream.incremental and stream.task is not None and (stream.spoken or stream.task.done()):
            # The utterance already ended (the text stalled past text_timeout_s, or the frame cap): the text that
            # arrives now is spoken as a new audio block rather than dropped. The old feed is closed, so nothing
            # keeps waiting on it; its task may still be handing its place back.
            stream.feed.close()
            self._finishing.add(stream.task)
            stream.task.add_done_callback(self._finishing.discard)
            stream.feed, stream.task, stream.spoken = TextPieces(), None, False
        stream.feed.push(text)
        if stream.incremental and stream.task is None and stream.feed.text.strip():
            stream.task = asyncio.create_task(self._speak_stream(stream))

    async def _stop_stream(self) -> bool:
        stream = self._stream
        if stream is None:
            await self.write_event(SynthesizeStopped().event())
            return True
        stream.feed.end()
        try:
            async with asyncio.timeout(max(stream.deadline - time.monotonic(), 0.0)):
                if stream.task is not None:
                    await asyncio.wait([stream.task])  # the task reports its own failure; a timeout cancels it
                elif not stream.failed and not stream.incremental and stream.feed.text.strip():
                    await self._speak(stream.feed.text, stream.options, stream)
        except TimeoutError:
            await self._end_stream(stream, TimedOut(f"the stream ran past this server's limit of "
                                                    f"{self.limits.stream_limit_s:g} s"))
            return False
        except ConnectionError:
            return False
        except Qwen3TTSEdgeError as exc:
            await self._fail_stream(stream, exc)
        except Exception:
            log.exception("streamed synthesis failed")
            await self._fail_stream(stream, RuntimeError("internal error; see the server log"))
        if self._stream is stream:
            self._stream = None
        await self.write_event(SynthesizeStopped().event())
        return True

    async def _speak_stream(self, stream: _OpenStream) -> None:
        """The task of an incremental stream: text arrives in the feed while audio is written."""
        try:
            await self._speak(stream.feed, stream.options, stream)
        except ConnectionError:
            pass
        except Qwen3TTSEdgeError as exc:
            await self._fail_stream(stream, exc)
        except Exception:  # a bug: say so to the client, keep the trace in the log
            log.exception("streamed synthesis failed")
            await self._fail_stream(stream, RuntimeError("internal error; see the server log"))

    async def _fail_stream(self, stream: _OpenStream, exc: BaseException) -> None:
        """Stop a stream's work, send ``error`` and close its open audio block; synthesize-stop is still answered."""
        stream.failed = True
        stream.feed.close()
        task = stream.task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.wait([task])
        await self._error(exc)
        if stream.block_open:
            stream.block_open = False
            with contextlib.suppress(ConnectionError, OSError):
                await self.write_event(AudioStop().event())

    async def _end_stream(self, stream: _OpenStream, exc: BaseException) -> None:
        """A stream that cannot go on (time limit, idle client): error, audio-stop, synthesize-stopped."""
        await self._fail_stream(stream, exc)
        self._stream = None
        with contextlib.suppress(ConnectionError, OSError):
            await self.write_event(SynthesizeStopped().event())

    async def _speak(self, text: str | Iterable[str], options: SpeakOptions | None,
                     stream: _OpenStream | None = None) -> None:
        """Run one utterance on the pool: one audio-start, the chunks as made, one audio-stop."""
        async with self.service.pool.checkout() as engine:
            audio = engine.astream(text, options)
            self._streams.add(audio)
            try:
                async with audio:  # request errors (a bad voice) raise here, before audio-start
                    rate = self.service.sample_rate
                    await self.write_event(AudioStart(rate=rate, width=WIDTH, channels=CHANNELS).event())
                    if stream is not None:
                        stream.block_open = True
                    async for chunk in audio:
                        if len(chunk.pcm):
                            await self.write_event(AudioChunk(rate=rate, width=WIDTH, channels=CHANNELS,
                                                              audio=to_s16le(chunk.pcm)).event())
                    await self.write_event(AudioStop().event())
                    if stream is not None:
                        stream.block_open, stream.spoken = False, True
            finally:
                self._streams.discard(audio)

    async def _close_stream(self, cancel: bool) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        stream.feed.close()
        if stream.task is not None and cancel and not stream.task.done():
            stream.task.cancel()
            await asyncio.wait([stream.task])
        if stream.block_open:  # a new stream replaces this one: its audio block still gets its stop
            stream.block_open = False
            with contextlib.suppress(ConnectionError, OSError):
                await self.write_event(AudioStop().event())

    async def disconnect(self) -> None:
        """The client is gone: stop its work so the worker is free for the next request."""
        for audio in list(self._streams):
            audio.cancel()
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.feed.close()
            if stream.task is not None and not stream.task.done():
                stream.task.cancel()
                await asyncio.wait([stream.task])
        if self._finishing:
            await asyncio.wait(list(self._finishing))
