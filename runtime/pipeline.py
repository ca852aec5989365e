"""Text in, audio out as it is made: ``TTS``, the torch-free runtime's entry class.

``TTS`` is a bundle plus its engines (``runtime/engine``: one ``EngineConfig``, assembled once); ``stream()``
plans a request (``runtime/plan.py``), runs one frame loop per long-text segment on a worker thread and
yields PCM chunks through an ``AudioStream`` while generation runs (``runtime/streaming.py``). Options and
records: ``runtime/options.py``; the async front: ``runtime/aio.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, load_bundle
from .engine.assemble import CODEC_ENCODER, SPEAKER_ENCODER, SPEAKING_STAGES, Engines, assemble
from .engine.config import EngineConfig
from .engine.contract import DECODER_PRIMED_CACHE, GenerationEngines
from .options import AudioChunk, SpeakOptions, StreamStats
from .plan import RequestPlan, plan_request, segment_budget
from .prompt import ModelIds, PromptError, VoicePrompt, instruct_token_ids
from .streaming import STOP_CANCELLED, AudioStream, run_stream
from .text import TextTokenizer
from .voices.voice_file import Voice, VoiceError, checkpoint_identity
from .voices.voice_pack import PackTables, VoicePack, VoicePackError, check_scale, is_pack_path


class TTS:
    """A loaded bundle ready to speak. Safe to use from several threads: requests run on its lanes
    (``runtime/engine/lanes.py``), one at a time by default; with ``max_batch=N`` up to N at once, batched frame
    by frame on one engine; requests beyond that wait for a lane in arrival order.

    ``TTS(bundle, config)`` with an :class:`EngineConfig`, or flat settings (``TTS(bundle, threads=2,
    talker_precision="q4_k_m")``), or both (flat settings override the config). ``load`` names the stages to
    load now (default: generation and decoder); the others load on first use, so ``TTS(b, load=())`` followed by
    ``create_voice`` runs only the voice encoders. :meth:`from_engines` wraps engines made elsewhere.
    """

    def __init__(self, bundle: str | Path | Bundle, config: EngineConfig | None = None, *,
                 load: Iterable[str] = SPEAKING_STAGES, **settings: Any):
        config = EngineConfig.build(config, **settings)
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(Path(bundle), verify=config.verify)
        self._attach(assemble(bundle, config, load=load))

    @classmethod
    def from_engines(cls, engines: Engines | GenerationEngines, bundle: str | Path | Bundle | None = None, *,
                     decoder: Any = None, name: str = "custom", config: EngineConfig | None = None) -> TTS:
        """A ``TTS`` over engines made by the caller (kokoro-onnx's ``from_session``): an assembled
        :class:`Engines`, or a talker + predictor + tables (``GenerationEngines``) with the ``bundle`` that
        supplies the tokenizer, ids and (unless ``decoder`` is given) the decoder. Checked against the contract."""
        if not isinstance(engines, Engines):
            if bundle is None:
                raise TypeError("from_engines needs the bundle beside a GenerationEngines (tokenizer, ids, decoder)")
            if not isinstance(bundle, Bundle):
                bundle = load_bundle(Path(bundle), verify=(config or EngineConfig()).verify)
            engines = Engines.from_parts(bundle, engines, decoder=decoder, name=name, config=config)
        self = cls.__new__(cls)
        self._attach(engines)
        return self

    def _attach(self, engines: Engines) -> None:
        self.engines = engines
        self.bundle = engines.bundle
        self.config = engines.config
        m = self.bundle.manifest
        self.tokenizer = TextTokenizer.from_folder(self.bundle.root / "tokenizer")
        self.ids = ModelIds.from_manifest(m)
        self.sample_rate = int(m.audio["sample_rate"])
        self.last_stats: StreamStats | None = None

    # -- engines (loaded on first use) ----------------------------------------------------------------------------

    @property
    def talker(self) -> Any:
        """The frame loop's talker (prefix cache included)."""
        return self.engines.talker

    @property
    def predictor(self) -> Any:
        return self.engines.predictor

    @property
    def tables(self) -> Any:
        return self.engines.tables

    @property
    def decoder(self) -> Any:
        return self.engines.decoder

    @property
    def n_ctx(self) -> int | None:
        return self.engines.n_ctx

    @property
    def backend(self) -> str:
        return self.engines.name

    @property
    def talker_precision(self) -> str:
        return self.engines.talker_precision

    @property
    def predictor_precision(self) -> str:
        return self.engines.predictor_precision

    @property
    def decoder_precision(self) -> str:
        return self.engines.decoder_precision

    @property
    def max_queued_frames(self) -> int:
        return self.config.max_queued_frames

    def create_voice(self, audio, ref_text: str | None = None, *, x_vector_only: bool = False,
                     language: str | None = None, prime_decoder: bool = True) -> Voice:
        """Clone a voice from reference audio (a file soundfile reads, or ``(samples, rate)``); Base bundles only.

        With the reference transcript the voice clones in context (ICL: x-vector + reference codes + text, the
        official default); without one, or with ``x_vector_only``, from the x-vector only. An ICL voice also keeps
        the decoder's state after its reference (``prime_decoder``): decoding the reference costs as much as
        speaking it, and without the state a voice's first use pays it before its first audio.
        """
        from .voices.audio_in import describe_source, load_reference

        m = self.bundle.manifest
        if self.ids.model_type != "base":
            raise VoiceError(f"this is a {self.ids.model_type} bundle; only Base models clone voices (export "
                             "Qwen3-TTS-12Hz-0.6B-Base or -1.7B-Base)")
        icl = bool(ref_text and ref_text.strip()) and not x_vector_only
        samples = load_reference(audio)
        if icl:
            self._check_reference_fits(len(samples))
        x_vector = self.engines.encoder(SPEAKER_ENCODER).embed(samples)
        ref_codes = None
        if icl:
            if not m.find("codec_encoder"):
                raise VoiceError("this bundle has no codec encoder, which ICL cloning needs; re-export it (the "
                                 "default includes it) or clone from the x-vector only (--x-vector-only)")
            ref_codes = self.engines.encoder(CODEC_ENCODER).encode(samples)
        states = {}
        if icl and prime_decoder and (primed := self._primed_decoder()) is not None:
            decoder, identity = primed
            states[identity] = decoder.primed_state(ref_codes)
        return Voice(x_vector=x_vector, mode="icl" if icl else "xvec", ref_codes=ref_codes, ref_text=ref_text,
                     language=language,
                     checkpoint=checkpoint_identity(m),
                     provenance={**describe_source(audio), "seconds_24k": round(len(samples) / 24000, 3),
                                 "resampler": "soxr HQ (librosa's default)"},
                     decoder_states=states)

    def _primed_decoder(self) -> tuple[Any, str] | None:
        """The decoder and the sha256 of its graph when it keeps primed states (a voice's saved state is only
        valid for that graph); None for a decoder without them or without a bundle file (made elsewhere)."""
        decoder = self.engines.decoder
        found = self.bundle.manifest.find("decoder", self.engines.decoder_precision)
        if DECODER_PRIMED_CACHE not in self.engines.decoder_capabilities or not found:
            return None
        return decoder, found[0].sha256

    def _check_reference_fits(self, samples: int) -> None:
        """An ICL reference's frames go into every prompt: at most half the talker context, so the new text and
        its speech keep the other half. The talker context is the config's (no engine needs to be loaded)."""
        n_ctx = self.config.n_ctx if not self.engines.generation_loaded else self.n_ctx
        if n_ctx is None:
            return
        per_frame = int(self.bundle.manifest.audio["samples_per_frame"])
        limit = n_ctx // 2 - 1
        if -(-samples // per_frame) > limit:
            raise VoiceError(f"reference audio is {samples / self.sample_rate:.1f} s; an in-context voice can use at "
                             f"most {limit * per_frame / self.sample_rate:.1f} s with this talker context (n_ctx "
                             f"{n_ctx}): trim it (3-20 s clones best) or use --x-vector-only")

    def _with_voice_prompt(self, o: SpeakOptions) -> SpeakOptions:
        """A voice given as a ``Voice`` or a voice file path becomes the prompt's VoicePrompt, after checks."""
        voice = o.voice
        if voice is None or isinstance(voice, VoicePrompt):
            return o
        if isinstance(voice, str | Path):
            voice = Voice.load(voice)
        if not isinstance(voice, Voice):
            raise VoiceError(f"voice must be a Voice, a voice file path or a VoicePrompt, got {type(voice).__name__}")
        if self.ids.model_type != "base":
            raise VoiceError(f"this is a {self.ids.model_type} bundle; voices are for Base models (use --speaker or "
                             "--instruct here)")
        voice.check_for(self.bundle.manifest)
        if voice.mode == "icl" and voice.decoder_states and (primed := self._primed_decoder()) is not None:
            decoder, identity = primed
            state = voice.decoder_states.get(identity)  # another decoder's state is ignored: priming decodes
            if state is not None:
                try:
                    decoder.keep_primed(voice.ref_codes, state)
                except ValueError as exc:
                    raise VoiceError(f"the voice's saved decoder state does not fit this decoder ({exc}); re-create "
                                     "the voice with `qwen3-tts-edge voice create`") from None
        language = voice.language if o.language == "auto" and voice.language else o.language
        return o.replace(voice=voice.prompt(), language=language)

    def forget_voices(self) -> None:
        """Drop every cached voice state: talker prompt prefixes and primed decoder states (memory, or a cold
        measurement); later requests rebuild what they need."""
        self.engines.forget()

    @property
    def speakers(self) -> list[str]:
        return sorted(self.ids.speakers)

    @property
    def languages(self) -> list[str]:
        return self.ids.public_languages()

    def devices(self) -> dict[str, str]:
        """Where each stage actually runs (fallbacks included)."""
        self.engines.load(*SPEAKING_STAGES)
        return self.engines.devices()

    def plan(self, text: str | Iterable[str], options: SpeakOptions | None = None, **overrides) -> RequestPlan:
        """Decide a request without running it: segments, first prompt, limits, sampling, schedule, voice.

        Request errors (unknown speaker, bad options, blank text) raise here. With incremental text this waits
        for the first token of content.
        """
        o = options or SpeakOptions()
        if overrides:
            o = o.replace(**overrides)
        if isinstance(o.voice, VoicePack) or is_pack_path(o.voice):
            return self._plan_with_pack(text, o)
        if o.voice_scale is not None:
            raise VoicePackError("voice_scale applies to voice packs (NAME.voicepack) only")
        o = self._with_voice_prompt(o)
        return plan_request(text, o, ids=self.ids, tokenizer=self.tokenizer, tables=self.tables,
                            manifest=self.bundle.manifest, n_ctx=self.n_ctx)

    def _plan_with_pack(self, text: str | Iterable[str], o: SpeakOptions) -> RequestPlan:
        """A request in a voice pack's voice: its speaker rows in this request's tables (and its speaker names
        known), its adapters set when the request gets the engine (``Engines.use_pack``)."""
        adapters = self.engines.adapters  # refuses where packs cannot run (the engine)
        pack = o.voice if isinstance(o.voice, VoicePack) else adapters.pack(o.voice)
        pack.check_for(self.bundle.manifest)
        scale = pack.scale if o.voice_scale is None else check_scale(o.voice_scale)
        speaker = o.speaker or (next(iter(pack.speakers)) if len(pack.speakers) == 1 else None)
        language = o.language
        if language == "auto" and len(pack.languages) == 1 and pack.languages[0] in self.ids.languages:
            language = pack.languages[0]
        ids, tables = self.ids, self.tables
        if pack.speakers:
            ids = replace(ids, speakers={**ids.speakers, **pack.speakers})
            tables = PackTables(tables, pack.rows())
            if ids.model_type == "base":  # a Base fine-tune speaks as CustomVoice (its row where the x-vector was)
                ids = replace(ids, model_type="custom_voice")
        o = o.replace(voice=None, voice_scale=None, speaker=speaker, language=language)
        plan = plan_request(text, o, ids=ids, tokenizer=self.tokenizer, tables=tables,
                            manifest=self.bundle.manifest, n_ctx=self.n_ctx)
        return replace(plan, adapter=(pack, scale), tables=tables)

    def stream(self, text: str | Iterable[str], options: SpeakOptions | None = None,
               **overrides) -> AudioStream:
        """Yield audio chunks of ``text`` as they are generated (lazy: nothing runs until iterated).

        ``text`` is a string, or an iterable of pieces still arriving (e.g. a chat LLM's tokens) that are fed
        into one running utterance. Request errors (unknown speaker, bad options) raise here, before any audio.
        """
        t0 = time.perf_counter()
        plan = self.plan(text, options, **overrides)
        stats = StreamStats(devices=self.devices())
        stop = threading.Event()
        return AudioStream(self._run(plan, time.perf_counter() - t0, stats, stop), stats, self.sample_rate, stop=stop,
                           on_cancel=plan.first_prompt.close)

    def _segment_budget(self, o: SpeakOptions) -> int | None:
        instruct = instruct_token_ids(self.tokenizer, o.instruct)
        return segment_budget(o, self.n_ctx, 0 if instruct is None else len(instruct))

    def _run(self, plan: RequestPlan, prompt_s: float, stats: StreamStats,
             stop: threading.Event) -> Iterator[AudioChunk]:
        """The request runs now (lazily, on first iteration) on a free lane: it becomes ``last_stats``; see
        ``run_stream``. Its timings include the wait for a lane."""
        t0 = time.perf_counter()
        with self.engines.lanes.lease(stop) as lane:
            if lane is None:  # cancelled while it waited
                plan.first_prompt.close()
                stats.stop_reason = STOP_CANCELLED
                return
            self.engines.use_pack(*(plan.adapter or (None, 0.0)), lane=lane)  # this request's adapters (or none)
            self.last_stats = stats
            waited = time.perf_counter() - t0
            tables = plan.tables or self.tables
            yield from run_stream(plan.loops(lane.talker, lane.predictor, tables, idle=lane.idle), lane.decoder,
                                  plan.schedule, plan.ref_codes, prompt_s + waited, stats, self.sample_rate,
                                  self.max_queued_frames, stop, idle=lane.idle, finish=lane.finish,
                                  decoding=lane.decoding, announcing=lane.announcing)

    def synthesize(self, text: str | Iterable[str], options: SpeakOptions | None = None,
                   **overrides) -> tuple[np.ndarray, int]:
        """The whole utterance at once: (float32 PCM, sample rate)."""
        chunks = [c.pcm for c in self.stream(text, options, **overrides)]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32), self.sample_rate


__all__ = ["TTS", "EngineConfig", "SpeakOptions", "AudioChunk", "AudioStream", "StreamStats", "PromptError",
           "VoicePrompt"]
