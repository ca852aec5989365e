"""The Wyoming TTS server (Home Assistant's voice pipeline): one handler per connection over an engine pool.

- ``describe`` -> ``info``: one installed TTS program; its voices are the bundle's preset speakers and the
  saved voices (re-read on every describe), with the language codes Home Assistant groups by, and
  ``supports_synthesize_streaming``. Synthesis runs on worker threads, so ``describe`` is answered at once
  even while other connections synthesise (Home Assistant waits one second for it).
- ``synthesize`` -> one ``audio-start``, the ``audio-chunk``s as they are made (24000 Hz, 2 bytes, mono) and
  exactly one ``audio-stop``.
- ``synthesize-start`` / ``-chunk`` / ``-stop``: the chunks (an LLM's reply as it is written) are fed into one
  running utterance through the runtime's incremental-text path, answered with one audio block and
  ``synthesize-stopped``. The full-text ``synthesize`` Home Assistant sends inside an open stream (for older
  servers) is ignored, or the reply would be spoken twice. ICL voices (reference codes) cannot take text
  that is still arriving, so for them the text is collected and spoken at ``synthesize-stop``.
- Errors become an ``error`` event; a client that goes away cancels its request and leaves the server as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
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


class WyomingService:
    """What every connection shares: the pool, the voices, the server-wide options."""

    def __init__(self, pool: EnginePool, catalog: VoiceCatalog, *, max_frames: int | None = None,
                 options: dict[str, Any] | None = None):
        self.pool, self.catalog = pool, catalog
        engine = pool.engines[0]
        self.sample_rate = int(engine.sample_rate)
        self.languages = list(engine.languages)
        self.language_codes = sorted({language_code(n) for n in self.languages if n != "auto"})
        self.max_frames = max_frames
        self.options = dict(options or {})  # extra SpeakOptions fields for every request (tests, benchmarks)

    def info(self) -> Info:
        from .. import __version__

        kind = self.catalog.model_type

        def label(name: str) -> str:
            return name.replace("_", " ").title() if name in self.catalog.speakers else f"{name} ({kind} voice)"

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
        return SpeakOptions(language=language, speaker=choice.speaker, voice=choice.voice,
                            chunk_frames=SERVER_CHUNK_FRAMES, **{"max_frames": self.max_frames, **self.options})

    def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> TtsHandler:
        return TtsHandler(reader, writer, self)


@dataclass
class _OpenStream:
    """A ``synthesize-start`` ... ``synthesize-stop`` stream of one connection."""

    options: SpeakOptions | None
    incremental: bool
    feed: TextPieces = field(default_factory=TextPieces)
    task: asyncio.Task | None = None
    failed: bool = False  # its start was refused (bad voice): the error is sent, the rest is dropped


class TtsHandler(AsyncEventHandler):
    """One client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, service: WyomingService):
        super().__init__(reader, writer)
        self.service = service
        self._write_lock = asyncio.Lock()
        self._stream: _OpenStream | None = None
        self._streams: set[AsyncAudioStream] = set()

    async def write_event(self, event: Event) -> None:
        async with self._write_lock:  # audio from a stream's task and answers to events never interleave
            await super().write_event(event)

    async def handle_event(self, event: Event) -> bool:
        try:
            return await self._handle(event)
        except (ConnectionError, BrokenPipeError):
            return False  # the client went away; disconnect() cleans up
        except Qwen3TTSEdgeError as exc:
            await self._error(exc)
            return True

    async def _error(self, exc: BaseException) -> None:
        with contextlib.suppress(ConnectionError, BrokenPipeError):
            await self.write_event(Error(text=str(exc), code=type(exc).__name__).event())

    async def _handle(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event(self.service.info().event())
        elif SynthesizeStart.is_type(event.type):
            await self._close_stream(cancel=True)
            start = SynthesizeStart.from_event(event)
            try:
                options = self.service.speak_options(start.voice)
            except Qwen3TTSEdgeError:
                # Reported once; the rest of this stream (chunks, the compatibility synthesize) is dropped and
                # synthesize-stop is still answered, so the client's sequence ends as it expects.
                self._stream = _OpenStream(options=None, incremental=False, failed=True)
                raise
            icl = options.voice is not None and getattr(options.voice, "mode", None) == "icl"
            self._stream = _OpenStream(options=options, incremental=not icl)
        elif SynthesizeChunk.is_type(event.type):
            stream = self._stream
            if stream is not None and not stream.failed:
                text = SynthesizeChunk.from_event(event).text
                if text and stream.incremental and stream.task is not None and stream.task.done():
                    # The utterance already ended (the text stalled past text_timeout_s, or the frame cap): the
                    # text that arrives now is spoken as a new audio block rather than dropped.
                    stream.feed = TextPieces()
                    stream.task = None
                if text:
                    stream.feed.push(text)
                    if stream.incremental and stream.task is None and stream.feed.text.strip():
                        stream.task = asyncio.create_task(self._speak_stream(stream))
        elif Synthesize.is_type(event.type):
            if self._stream is not None:
                return True  # Home Assistant's compatibility copy of the streamed text: already being spoken
            synth = Synthesize.from_event(event)
            if not synth.text.strip():
                raise _EmptyText("nothing to say: the synthesize text is empty")
            options = self.service.speak_options(synth.voice)
            await self._speak(synth.text, options)
        elif SynthesizeStop.is_type(event.type):
            stream = self._stream
            if stream is not None:
                stream.feed.end()
                try:
                    if stream.task is not None:
                        await stream.task
                    elif not stream.failed and not stream.incremental and stream.feed.text.strip():
                        await self._speak(stream.feed.text, stream.options)
                finally:
                    self._stream = None
            await self.write_event(SynthesizeStopped().event())
        return True

    async def _speak_stream(self, stream: _OpenStream) -> None:
        """The task of an incremental stream: text arrives in the feed while audio is written."""
        try:
            await self._speak(stream.feed, stream.options)
        except (ConnectionError, BrokenPipeError):
            pass
        except Qwen3TTSEdgeError as exc:
            await self._error(exc)
        except Exception as exc:  # a bug: say so to the client, keep the trace in the log
            log.exception("streamed synthesis failed")
            await self._error(exc)

    async def _speak(self, text: str | Iterable[str], options: SpeakOptions | None) -> None:
        """Run one utterance on the pool: one audio-start, the chunks as made, one audio-stop."""
        async with self.service.pool.checkout() as engine:
            stream = engine.astream(text, options)
            self._streams.add(stream)
            try:
                async with stream:  # request errors (a bad voice) raise here, before audio-start
                    rate = self.service.sample_rate
                    await self.write_event(AudioStart(rate=rate, width=WIDTH, channels=CHANNELS).event())
                    async for chunk in stream:
                        if len(chunk.pcm):
                            await self.write_event(AudioChunk(rate=rate, width=WIDTH, channels=CHANNELS,
                                                              audio=to_s16le(chunk.pcm)).event())
                    await self.write_event(AudioStop().event())
            finally:
                self._streams.discard(stream)

    async def _close_stream(self, cancel: bool) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        stream.feed.close()
        if stream.task is not None and cancel:
            stream.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await stream.task

    async def disconnect(self) -> None:
        """The client is gone: stop its work so the worker is free for the next request."""
        for stream in list(self._streams):
            stream.cancel()
        await self._close_stream(cancel=True)


class _EmptyText(Qwen3TTSEdgeError):
    pass
