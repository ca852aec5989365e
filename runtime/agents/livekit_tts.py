"""A LiveKit Agents TTS plugin on ``AsyncTTS``: an LLM's reply becomes one utterance as its tokens arrive.

LiveKit's voice pipeline opens ``stream()`` for each reply, pushes the LLM's text deltas with ``push_text()`` and
ends with ``end_input()``. This TTS says it streams, so LiveKit uses it as it is instead of wrapping it in a
``StreamAdapter`` that cuts the reply into sentences and waits for each: the deltas go straight into the runtime's
incremental text path (one utterance, the same codes as the whole text), and audio follows the first words.
``flush()`` ends LiveKit's segment: the utterance's text is complete there, so the model hears end-of-text and
finishes speaking (LiveKit 1.8 drops any text pushed after it). Closing a stream (an interruption, or the plugin's
``aclose()``) cancels generation within a frame. Audio goes out as 24 kHz mono 16-bit PCM.

Needs the ``[livekit]`` extra; the runtime never imports this module.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

try:
    from livekit.agents import DEFAULT_API_CONNECT_OPTIONS, APIConnectOptions, APIError, tts, utils
except ImportError as exc:  # the lean install
    raise ImportError("the LiveKit Agents plugin needs livekit-agents: pip install 'qwen3-tts-edge[livekit]'") from exc

from ..aio import AsyncTTS
from ..audio import to_s16le
from ..bundle import Bundle
from ..engine.config import EngineConfig
from ..languages import model_language
from ..options import SpeakOptions
from ..pipeline import TTS as EngineTTS
from ..voices.voice_file import Voice
from ..voices.voice_pack import is_pack_path
from .engine import plugin_engine, take_engine_settings

PROVIDER = "qwen3-tts-edge"
# Options are checked by planning this text with them: the engine's own checks (speaker, language, voice, voice
# pack, sampling) in the caller's frame rather than at the first reply.
_PROBE_TEXT = "Hello."


class TTS(tts.TTS):
    """Qwen3-TTS for LiveKit Agents: ``TTS("bundle", threads=4, speaker="ryan")`` or ``TTS(engine=shared)``.

    With a bundle it loads an engine as ``runtime.TTS`` does (an :class:`EngineConfig` and/or flat engine settings;
    blocking, so do it in the worker's prewarm). ``engine`` takes a loaded ``AsyncTTS`` or ``TTS`` instead, so
    several agents in one process share one engine (``max_batch=N`` batches N replies frame by frame; the others
    wait their turn). Speak options (``speaker``, ``language``: a name or a code such as ``"en"``, ``voice``: a
    ``.voice`` file or a ``.voicepack``, ``voice_scale``, ``instruct``, sampling and limits) are any other keywords,
    or ``options``; they are checked against the engine at once, and :meth:`update_options` changes them for the
    streams opened afterwards.
    """

    def __init__(self, bundle: str | Path | Bundle | None = None, config: EngineConfig | None = None, *,
                 engine: AsyncTTS | EngineTTS | None = None, options: SpeakOptions | None = None,
                 **settings: Any) -> None:
        engine = plugin_engine("TTS", bundle, config, engine, take_engine_settings(settings))
        super().__init__(capabilities=tts.TTSCapabilities(streaming=True), sample_rate=engine.sample_rate,
                         num_channels=1)
        self.engine = engine
        self._opts = self._checked(_with(options or SpeakOptions(), settings))
        self._streams: weakref.WeakSet[SynthesizeStream | ChunkedStream] = weakref.WeakSet()

    @property
    def model(self) -> str:
        return str(self.engine.tts.bundle.manifest.source.get("model", self.engine.tts.bundle.root.name))

    @property
    def provider(self) -> str:
        return PROVIDER

    @property
    def options(self) -> SpeakOptions:
        """The speak options new streams take (each stream keeps the ones it started with)."""
        return self._opts

    def update_options(self, **changes: Any) -> None:
        """Change speak options (``speaker``, ``language``, ``voice``, ``seed``...) for the streams opened next."""
        engine_settings = sorted(set(changes) & set(EngineConfig.field_names()))
        if engine_settings:
            raise TypeError(f"{engine_settings} are engine settings, fixed once the engine is loaded; open another "
                            "TTS (or engine) with them")
        self._opts = self._checked(_with(self._opts, changes))

    def _checked(self, o: SpeakOptions) -> SpeakOptions:
        """``o`` with a language code as the model's name and a voice file loaded once, after planning a request
        with it (which raises what is wrong)."""
        if isinstance(o.language, str) and o.language != "auto":  # LiveKit passes codes: "en", "de-DE"
            named = model_language(str(o.language), self.engine.tts.languages)
            if named is None:
                raise ValueError(f"language {str(o.language)!r} is not one this bundle speaks; choose one of "
                                 f"{', '.join(self.engine.tts.languages)} (or their codes: en, de, ...)")
            o = o.replace(language=named)
        if isinstance(o.voice, str | Path) and not is_pack_path(o.voice):
            o = o.replace(voice=Voice.load(o.voice))
        self.engine.tts.plan(_PROBE_TEXT, o).first_prompt.close()
        return o

    def synthesize(self, text: str, *,
                   conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> ChunkedStream:
        """The whole ``text`` as one utterance (LiveKit's ``say()`` of a string, or a sentence adapter's call)."""
        stream = ChunkedStream(tts=self, input_text=text, conn_options=conn_options)
        self._streams.add(stream)
        return stream

    def stream(self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> SynthesizeStream:
        """A reply whose text is still arriving: ``push_text()`` its tokens, then ``end_input()``."""
        stream = SynthesizeStream(tts=self, conn_options=conn_options)
        self._streams.add(stream)
        return stream

    async def aclose(self) -> None:
        """Close every stream still open: their generation stops within a frame. A shared engine stays loaded."""
        await asyncio.gather(*(stream.aclose() for stream in list(self._streams)))
        self._streams.clear()


def _with(options: SpeakOptions, changes: dict[str, Any]) -> SpeakOptions:
    """``options`` with flat speak options changed; an unknown name's error also lists the engine settings."""
    try:
        return options.replace(**changes) if changes else options
    except TypeError as exc:
        raise TypeError(f"{exc}; engine settings (when the TTS loads the bundle): "
                        f"{', '.join(EngineConfig.field_names())}") from None


async def _speak(engine: AsyncTTS, text: Any, options: SpeakOptions, emitter: tts.AudioEmitter) -> None:
    """One utterance into ``emitter`` as s16le PCM, chunk by chunk as it is decoded. Closing the task stops it
    within a frame (``AsyncAudioStream`` cancels on any exception). Engine and request failures become LiveKit's
    non-retryable ``APIError``, so the session reports them as TTS errors."""
    try:
        async with engine.astream(text, options) as audio:
            async for chunk in audio:
                emitter.push(to_s16le(chunk.pcm))
    except APIError:
        raise
    except Exception as exc:
        raise APIError(f"{PROVIDER} could not speak: {exc}", retryable=False) from exc


class ChunkedStream(tts.ChunkedStream):
    """``synthesize(text)``: the whole text, spoken with the options of the moment it was asked for."""

    def __init__(self, *, tts: TTS, input_text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._engine, self._opts = tts.engine, tts.options

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(request_id=utils.shortuuid(), sample_rate=self._engine.sample_rate, num_channels=1,
                                  mime_type="audio/pcm")
        if self._input_text.strip():  # LiveKit expects no audio for blank text; the runtime refuses it
            await _speak(self._engine, self._input_text, self._opts, output_emitter)
        # No flush() here: LiveKit ends the input after _run, which sends the held-back tail as the final frame,
        # whereas a flush first would make it append 10 ms of silence as the end marker.


class _SegmentText:
    """One LiveKit segment's text as it is pushed: the async text source of one ``astream`` request."""

    def __init__(self) -> None:
        self._pieces: asyncio.Queue[str | None] = asyncio.Queue()
        self._decided = asyncio.Event()  # a piece with content has come, or the text ended
        self._content = False

    def push(self, piece: str) -> None:
        self._pieces.put_nowait(piece)
        if piece.strip():
            self._content = True
            self._decided.set()

    def end(self) -> None:
        self._pieces.put_nowait(None)
        self._decided.set()

    async def has_content(self) -> bool:
        """Whether there is anything to say (waits for the first non-blank piece, or the end)."""
        await self._decided.wait()
        return self._content

    async def __aiter__(self) -> AsyncIterator[str]:
        while (piece := await self._pieces.get()) is not None:
            yield piece


class SynthesizeStream(tts.SynthesizeStream):
    """``stream()``: text pushed as it arrives, one utterance per LiveKit segment (a reply, up to ``flush()``)."""

    def __init__(self, *, tts: TTS, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, conn_options=conn_options)
        self._engine, self._opts = tts.engine, tts.options

    async def _read_input(self, segments: asyncio.Queue[_SegmentText | None]) -> None:
        """LiveKit's input channel into segments: text goes to the open one, a flush ends it."""
        text: _SegmentText | None = None
        async for item in self._input_ch:
            if isinstance(item, self._FlushSentinel):
                if text is not None:
                    text.end()
                    text = None
                continue
            if text is None:
                text = _SegmentText()
                segments.put_nowait(text)
            text.push(item)
        if text is not None:
            text.end()
        segments.put_nowait(None)

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(request_id=utils.shortuuid(), sample_rate=self._engine.sample_rate, num_channels=1,
                                  mime_type="audio/pcm", stream=True)
        segments: asyncio.Queue[_SegmentText | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read_input(segments))
        try:
            while (text := await segments.get()) is not None:
                output_emitter.start_segment(segment_id=utils.shortuuid())
                self._mark_started()  # LiveKit's time to first byte counts from the first text
                if await text.has_content():
                    await _speak(self._engine, text, self._opts, output_emitter)
                output_emitter.end_segment()
        finally:
            await utils.aio.cancel_and_wait(reader)


__all__ = ["TTS", "ChunkedStream", "SynthesizeStream", "PROVIDER"]
