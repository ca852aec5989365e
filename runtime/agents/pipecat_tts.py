"""A pipecat TTS service on ``AsyncTTS``: an LLM's reply becomes one utterance as its tokens arrive.

pipecat hands a TTS service text one piece at a time (``run_tts(text, context_id)``): sentences by default, or
the LLM's tokens with ``TextAggregationMode.TOKEN``. A service that synthesizes each call on its own would read a
token stream as hundreds of one-word utterances and cut a reply's prosody at every sentence. Here the first text
of a turn (pipecat's context id, shared by the turn's pieces) opens one ``AsyncTTS.astream`` request fed through
the runtime's incremental text path, which waits for text itself and gives the codes of the whole text; later
pieces of the turn are pushed into it and the end of the turn (``flush_audio``) ends its text. A reader task moves
the audio into the turn's audio context (resampled with soxr when the pipeline's output rate is not 24 kHz), so
first audio follows the first words in token mode. An interruption cancels the request, which stops generation
within a frame, and pipecat drops the audio already queued.

Needs the ``[pipecat]`` extra; the runtime never imports this module.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    from pipecat.frames.frames import CancelFrame, EndFrame, ErrorFrame, Frame, InterruptionFrame, TTSAudioRawFrame
    from pipecat.processors.frame_processor import FrameDirection
    from pipecat.services.settings import TTSSettings
    from pipecat.services.tts_service import TextAggregationMode, TTSService
    from pipecat.transcriptions.language import Language
    from pipecat.utils.types import NOT_GIVEN, NotGiven, is_given
except ImportError as exc:  # the lean install
    raise ImportError("the pipecat TTS service needs pipecat-ai: pip install 'qwen3-tts-edge[pipecat]'") from exc

from ..aio import AsyncAudioStream, AsyncTTS
from ..audio import to_s16le
from ..bundle import Bundle
from ..engine.config import EngineConfig
from ..languages import model_language
from ..options import SpeakOptions
from ..pipeline import TTS
from ..text_feed import DEFAULT_TEXT_TIMEOUT_S
from ..voices.voice_pack import is_pack_path
from .engine import plugin_engine, take_engine_settings

# pipecat ends an audio context that receives nothing for this long. Ours end explicitly when their request
# ends; the wait only has to outlast a stall (the first audio of a long prompt on a busy CPU, a slow LLM), or
# late audio of a finished turn would be dropped.
STOP_FRAME_TIMEOUT_S = DEFAULT_TEXT_TIMEOUT_S


@dataclass
class Qwen3TTSSettings(TTSSettings):
    """Runtime-updatable settings (``TTSUpdateSettingsFrame(delta=Qwen3TTSService.Settings(...))``).

    Parameters:
        voice: a preset speaker of the bundle (CustomVoice), a ``.voice`` file or a ``.voicepack`` (Base).
        language: a pipecat ``Language`` or a model language name; None lets the model decide.
        instruct: a voice or style description (VoiceDesign; 1.7B CustomVoice).
    """

    instruct: str | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)


class _Utterance:
    """One request fed by one turn's text: pieces are queued as they come, ``end()`` closes the text."""

    def __init__(self, context_id: str):
        self.context_id = context_id
        self.pieces: asyncio.Queue[str | None] = asyncio.Queue()
        self.text = ""  # what was pushed so far (joins sentences)
        self.text_ended = False
        self.done = False  # the request has ended (its audio is all in the audio context)
        self.cancelled = False
        self.failed = False  # the request raised: the rest of the turn's text is dropped, not retried per token
        self.stream: AsyncAudioStream | None = None
        self.reader: asyncio.Task | None = None

    async def source(self) -> AsyncIterator[str]:
        while (piece := await self.pieces.get()) is not None:
            yield piece

    def push(self, piece: str) -> None:
        self.text += piece
        self.pieces.put_nowait(piece)

    def end(self) -> None:
        if not self.text_ended:
            self.text_ended = True
            self.pieces.put_nowait(None)

    def cancel(self) -> None:
        self.cancelled = True
        self.end()
        if self.stream is not None:
            self.stream.cancel()  # generation stops within a frame; the engine's lane frees itself
        if self.reader is not None:
            self.reader.cancel()


def _join(before: str, piece: str) -> str:
    """A sentence as it continues the utterance: pipecat's sentence aggregator strips the space between sentences,
    which the tokenizer needs back (not after CJK text, which has none)."""
    if before and piece and not before[-1].isspace() and not piece[0].isspace() and ord(before[-1]) < 0x2E80:
        return " " + piece
    return piece


class Qwen3TTSService(TTSService):
    """Qwen3-TTS Edge in a pipecat pipeline, in process.

    ``Qwen3TTSService("path/to/bundle", threads=4)`` loads an engine (an :class:`EngineConfig` and/or its flat
    settings, as ``TTS`` takes them); ``Qwen3TTSService(engine=shared)`` speaks on an ``AsyncTTS`` (or ``TTS``)
    that several services share (its lanes take their requests in turn, or batch them with ``max_batch``).
    ``options``: the ``SpeakOptions`` of every request (seed, sampling, limits, chunk schedule); ``settings``:
    voice, language and instruct, updatable while the pipeline runs. Text aggregation defaults to
    ``TextAggregationMode.TOKEN`` (first audio after the first words); ``SENTENCE`` feeds whole sentences into
    the same utterance. Other keyword arguments go to pipecat's ``TTSService`` (``sample_rate`` and so on).
    """

    Settings = Qwen3TTSSettings
    _settings: Qwen3TTSSettings

    def __init__(self, bundle: str | Path | Bundle | None = None, config: EngineConfig | None = None, *,
                 engine: AsyncTTS | TTS | None = None, options: SpeakOptions | None = None,
                 settings: Qwen3TTSSettings | None = None,
                 text_aggregation_mode: TextAggregationMode = TextAggregationMode.TOKEN,
                 stop_frame_timeout_s: float = STOP_FRAME_TIMEOUT_S, **kwargs: Any):
        engine = plugin_engine("Qwen3TTSService", bundle, config, engine, take_engine_settings(kwargs))
        if options is not None and not isinstance(options, SpeakOptions):
            raise TypeError(f"options must be SpeakOptions, got {type(options).__name__}")
        self.engine = engine
        self._options = options or SpeakOptions()
        defaults = Qwen3TTSSettings(model=engine.tts.bundle.root.name, voice=None, language=None, instruct=None)
        if settings is not None:
            defaults.apply_update(settings)
        super().__init__(settings=defaults, text_aggregation_mode=text_aggregation_mode,
                         stop_frame_timeout_s=stop_frame_timeout_s, push_start_frame=True, push_stop_frames=True,
                         **kwargs)
        self._voice_fields(self._settings.voice)  # a bad voice fails here, not at the first reply
        self._utterances: dict[str, _Utterance] = {}

    # ---- what pipecat asks of a service ----------------------------------------------------------------

    def can_generate_metrics(self) -> bool:
        return True

    @property
    def supports_processing_metrics(self) -> bool:
        """False: ``run_tts`` hands text over and returns; TTFB (first text to first audio) carries the timing."""
        return False

    def language_to_service_language(self, language: Language) -> str | None:
        """pipecat's language ('en', 'en-US'...) as the model's name ('english'); None where it has none."""
        return model_language(str(getattr(language, "value", language)), self.engine.tts.languages)

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Push ``text`` into its turn's utterance, starting the utterance with the turn's first text. Audio arrives
        through the reader task, so this yields nothing but a settings error."""
        u = self._utterances.get(context_id)
        if u is not None and u.failed:
            return
        if u is None or u.done:  # the turn's first text, or text after the model ended its speech early
            try:
                options = self._request_options()
            except ValueError as exc:
                yield ErrorFrame(error=f"{self}: {exc}")
                return
            u = self._open(context_id, options)
        piece = text if self._is_streaming_tokens else _join(u.text, text)
        await self.start_tts_usage_metrics(text)
        u.push(piece)
        yield None

    async def flush_audio(self, context_id: str | None = None) -> None:
        """The turn's text is complete: end its utterance's text (the model hears end-of-text and finishes)."""
        context_id = context_id or self.get_active_audio_context_id()
        if context_id:
            await self._end_text(context_id)

    async def on_turn_context_completed(self) -> None:
        # pipecat flushes only a turn whose audio context is still open; a turn whose context went quiet must
        # still end its text, or its request would wait for text until the text timeout.
        context_id = self._turn_context_id
        flushed = context_id is not None and self.audio_context_available(context_id)
        await super().on_turn_context_completed()
        if context_id and not flushed:
            await self._end_text(context_id)

    async def on_audio_context_interrupted(self, context_id: str) -> None:
        u = self._utterances.pop(context_id, None)
        if u is not None:
            u.cancel()

    async def _handle_interruption(self, frame: InterruptionFrame, direction: FrameDirection) -> None:
        await super()._handle_interruption(frame, direction)
        # A request whose audio context pipecat no longer has (dropped, or ended by its quiet timeout) would only
        # make stale audio: stop it too. Uninterruptible contexts are kept, and so are their requests.
        for context_id, u in list(self._utterances.items()):
            if not self.audio_context_available(context_id):
                self._utterances.pop(context_id, None)
                u.cancel()

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)  # the open turns' audio plays out first
        self._cancel_all()

    async def cancel(self, frame: CancelFrame) -> None:
        self._cancel_all()
        await super().cancel(frame)

    async def cleanup(self) -> None:
        self._cancel_all()
        await super().cleanup()

    # ---- requests ----------------------------------------------------------------------------------------

    def _voice_fields(self, voice: Any) -> dict[str, Any]:
        """A voice setting as speak options: a preset speaker, or a voice file / voice pack path."""
        if not is_given(voice) or voice is None or voice == "":
            return {}
        if not isinstance(voice, str | Path):
            raise ValueError(f"voice must be a preset speaker name or a .voice / .voicepack path, got "
                             f"{type(voice).__name__}")
        speakers = self.engine.tts.speakers
        if isinstance(voice, str) and voice.strip().lower() in speakers:
            return {"speaker": voice.strip().lower(), "voice": None}
        path = Path(voice)
        if path.suffix == ".voice" or is_pack_path(path):
            if not path.exists():
                raise ValueError(f"voice file {str(path)!r} does not exist; make one with `qwen3-tts-edge voice "
                                 "create` (Base bundles)")
            return {"voice": str(path), "speaker": None}
        presets = ", ".join(speakers) if speakers else "none (this bundle takes .voice files or instruct)"
        raise ValueError(f"unknown voice {str(voice)!r}: give a preset speaker ({presets}) or the path of a .voice "
                         "or .voicepack file")

    def _request_options(self) -> SpeakOptions:
        """The options of a new utterance: the service's options with the current voice, language, instruct."""
        s = self._settings
        fields = self._voice_fields(s.voice)
        if is_given(s.language) and s.language:
            language = s.language if isinstance(s.language, str) else str(s.language.value)
            named = model_language(language, self.engine.tts.languages)
            if named is None:
                raise ValueError(f"language {language!r} is not one this bundle speaks; choose one of "
                                 f"{', '.join(self.engine.tts.languages)}")
            fields["language"] = named
        if is_given(s.instruct) and s.instruct:
            fields["instruct"] = s.instruct
        return self._options.replace(**fields) if fields else self._options

    def _open(self, context_id: str, options: SpeakOptions) -> _Utterance:
        u = _Utterance(context_id)
        u.stream = self.engine.astream(u.source(), options)
        u.reader = self.create_task(self._read(u), name=f"qwen3_tts_{context_id[:8]}")
        self._utterances[context_id] = u
        return u

    async def _read(self, u: _Utterance) -> None:
        """The request's audio into its audio context, at the pipeline's rate; the context ends with the request
        once the turn's text has ended (until then later text may start a new request in it)."""
        rate, engine_rate = self.sample_rate, self.engine.sample_rate
        resampler = None
        if rate != engine_rate:
            import soxr

            resampler = soxr.ResampleStream(engine_rate, rate, 1, dtype="float32")
        try:
            async for chunk in u.stream:
                pcm = chunk.pcm if resampler is None else resampler.resample_chunk(chunk.pcm)
                await self._emit(u, pcm)
            if resampler is not None:
                await self._emit(u, resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        except asyncio.CancelledError:
            u.cancel()
            raise
        except Exception as exc:  # a request error (voice, language, text) or an engine failure
            u.failed = True
            await self.push_error(error_msg=f"{self}: {exc}", exception=exc)
        finally:
            u.done = True
            if u.stream is not None:
                u.stream.cancel()
        if self._utterances.get(u.context_id) is u and u.text_ended:
            self._utterances.pop(u.context_id, None)
        if u.text_ended and not u.cancelled and self.audio_context_available(u.context_id):
            await self.remove_audio_context(u.context_id)

    async def _emit(self, u: _Utterance, pcm: np.ndarray) -> None:
        if len(pcm) and not u.cancelled:
            await self.append_to_audio_context(
                u.context_id, TTSAudioRawFrame(to_s16le(pcm), self.sample_rate, 1, context_id=u.context_id))

    async def _end_text(self, context_id: str) -> None:
        u = self._utterances.get(context_id)
        if u is not None and not u.done:
            u.end()  # the reader ends the audio context when the request has spoken the rest
            return
        self._utterances.pop(context_id, None)
        if self.audio_context_available(context_id):  # the request ended before the text did
            await self.remove_audio_context(context_id)

    def _cancel_all(self) -> None:
        for u in self._utterances.values():
            u.cancel()
        self._utterances.clear()


__all__ = ["Qwen3TTSService", "Qwen3TTSSettings", "TextAggregationMode"]
