"""Text in, audio out as it is made: ``TTS``, the torch-free runtime's entry class.

``TTS`` opens a bundle and assembles its engines through the backend table (``runtime/backends``), and
``stream()`` turns a request into prompts, frame loops per long-text segment and an ``AudioStream`` that
yields PCM chunks while generation runs (``runtime/streaming.py``). Options and records: ``runtime/options.py``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import TALKER_CONTEXT
from .backends import load as load_engines
from .bundle import DECODER_PREFERENCE, GENERATION_BACKENDS, TALKER_PREFERENCE, Bundle, BundleError, load_bundle
from .checks import require_int
from .frame_loop import STOP_CONTEXT, STOP_MAX_FRAMES, FrameLoop, Guards
from .options import AudioChunk, SpeakOptions, StreamStats
from .prefix_cache import DEFAULT_CACHE_BYTES, PrefixReusingTalker
from .prompt import ModelIds, PromptError, VoicePrompt, build_prompt, validate_text
from .sampler import CodeSampler, SamplingParams
from .segments import split_segments
from .streaming import AudioStream, run_stream
from .text import TextTokenizer
from .voices.voice_file import Voice, VoiceError, checkpoint_identity


@dataclass(frozen=True)
class Backends:
    """Ready engines for a ``TTS``: talker + code predictor + their embedding tables (llama.cpp, or e.g. the
    PyTorch reference), and optionally the decoder (else the bundle's ONNX decoder is loaded)."""

    talker: object
    predictor: object
    tables: object
    name: str = "custom"
    decoder: object | None = None


def _pick(bundle: Bundle, role: str, wanted: str | None, preference: Sequence[str],
          backend: str | None = None) -> str:
    fmt = GENERATION_BACKENDS[backend].format if backend else None
    have = [c.precision for c in bundle.manifest.find(role) if fmt is None or c.format == fmt]
    if not have:
        if backend:
            raise BundleError(f"bundle {bundle.root} has no {role} for the {backend} backend; export one with "
                              f"`qwen3-tts-edge export MODEL -o {bundle.root} --force --backend {backend}`")
        raise BundleError(f"bundle {bundle.root} has no {role}; export it with `qwen3-tts-edge export MODEL -o "
                          f"{bundle.root} --force --talker q8_0 --decoder fp32`")
    if wanted is not None:
        if wanted not in have:
            engine = f" for the {backend} backend" if backend else ""
            raise BundleError(f"bundle has no {role} in precision {wanted!r}{engine}; available: {sorted(have)}")
        return wanted
    return next((p for p in preference if p in have), have[0])


DEFAULT_DECODER_THREADS = 1


class TTS:
    """A loaded bundle ready to speak. Not thread-safe: one request at a time per instance."""

    def __init__(self, bundle: str | Path, *, talker_precision: str | None = None,
                 decoder_precision: str | None = None, predictor_precision: str | None = None,
                 backend: str | None = None, threads: int | None = None,
                 decoder_threads: int | None = None,
                 providers: Sequence[str] | None = None, n_gpu_layers: int = 0, verify: bool = True,
                 max_queued_frames: int = 64, backends: Backends | None = None, n_ctx: int = TALKER_CONTEXT,
                 prefix_cache: bool = True, voice_cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.bundle = load_bundle(Path(bundle), verify=verify)
        m = self.bundle.manifest
        require_int("max_queued_frames", max_queued_frames, minimum=1)
        self.max_queued_frames = max_queued_frames
        self.decoder_precision = _pick(self.bundle, "decoder", decoder_precision, DECODER_PREFERENCE)
        if backends is None:
            if backend is not None and backend not in GENERATION_BACKENDS:
                raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(GENERATION_BACKENDS)}")
            self.talker_precision = _pick(self.bundle, "talker", talker_precision, TALKER_PREFERENCE, backend)
            talker_format = m.component("talker", self.talker_precision).format
            self.backend = next(n for n, b in GENERATION_BACKENDS.items() if b.format == talker_format)
            # The predictor is two thirds of generation time (15 calls per frame) and decides most of the
            # speed and code fidelity, so it can be paired separately (default: the talker's precision) — from
            # the same engine, which runs both.
            self.predictor_precision = _pick(self.bundle, "predictor", predictor_precision or self.talker_precision,
                                             TALKER_PREFERENCE, self.backend)
            engines = load_engines("generation", self.bundle, self.talker_precision, n_ctx=n_ctx, threads=threads,
                                   n_gpu_layers=n_gpu_layers, predictor_precision=self.predictor_precision,
                                   providers=providers)
            backends = Backends(engines.talker, engines.predictor, engines.tables)
            for name, engine in (("talker", engines.talker), ("predictor", engines.predictor)):
                if n_gpu_layers and engine.placement.device != "gpu":
                    warnings.warn(f"{name}: {n_gpu_layers} GPU layers requested but it runs on the CPU "
                                  f"({engine.placement.note or 'this llama-cpp-python build has no GPU backend'})",
                                  RuntimeWarning, stacklevel=2)
        else:
            self.talker_precision = self.predictor_precision = self.backend = backends.name
        self.talker, self.predictor, self.tables = backends.talker, backends.predictor, backends.tables
        if prefix_cache and hasattr(self.talker, "rewind"):
            # Keeps the last prompt's KV and, within voice_cache_bytes, the voice prefixes of recent voices.
            self.talker = PrefixReusingTalker(self.talker, cache_bytes=voice_cache_bytes)
        ctx = getattr(self.talker, "n_ctx", None)
        self.n_ctx: int | None = int(ctx) if ctx else None
        if backends.decoder is not None:
            self.decoder = backends.decoder
        else:
            # The decoder runs on the consumer's thread while llama.cpp generates. Default: one thread, which
            # keeps up with real time (int8 ~47 ms per 80 ms frame) and leaves the other cores to llama.cpp;
            # measured on 2 cores (bench/README, "Thread placement"): 0.6B q4_k_m + int8 RTF 1.78 vs 1.90
            # (medians of 5 and 4 alternated runs) and q8_0 + int8 2.58 vs 2.95 with both engines on both cores.
            self.decoder = load_engines("decoder", self.bundle, self.decoder_precision, providers=providers,
                                        threads=decoder_threads or DEFAULT_DECODER_THREADS)
        self.tokenizer = TextTokenizer.from_folder(self.bundle.root / "tokenizer")
        self.ids = ModelIds.from_manifest(m)
        self.sample_rate = int(m.audio["sample_rate"])
        self.last_stats: StreamStats | None = None
        self.threads = threads
        self._speaker_encoder = self._codec_encoder = None  # loaded on the first create_voice

    def create_voice(self, audio, ref_text: str | None = None, *, x_vector_only: bool = False,
                     language: str | None = None) -> Voice:
        """Clone a voice from reference audio (a file soundfile reads, or ``(samples, rate)``); Base bundles only.

        With the reference transcript the voice clones in context (ICL: x-vector + reference codes + text, the
        official default); without one, or with ``x_vector_only``, from the x-vector only.
        """
        from .voices.audio_in import describe_source, load_reference

        m = self.bundle.manifest
        if self.ids.model_type != "base":
            raise VoiceError(f"this is a {self.ids.model_type} bundle; only Base models clone voices (export "
                             "Qwen3-TTS-12Hz-0.6B-Base or -1.7B-Base)")
        icl = bool(ref_text and ref_text.strip()) and not x_vector_only
        if self._speaker_encoder is None:
            self._speaker_encoder = load_engines("speaker_encoder", self.bundle, "fp32", threads=self.threads)
        samples = load_reference(audio)
        if icl:
            self._check_reference_fits(len(samples))
        x_vector = self._speaker_encoder.embed(samples)
        ref_codes = None
        if icl:
            if not m.find("codec_encoder"):
                raise VoiceError("this bundle has no codec encoder, which ICL cloning needs; re-export it (the "
                                 "default includes it) or clone from the x-vector only (--x-vector-only)")
            if self._codec_encoder is None:
                self._codec_encoder = load_engines("codec_encoder", self.bundle, "fp32", threads=self.threads)
            ref_codes = self._codec_encoder.encode(samples)
        return Voice(x_vector=x_vector, mode="icl" if icl else "xvec", ref_codes=ref_codes, ref_text=ref_text,
                     language=language,
                     checkpoint=checkpoint_identity(m),
                     provenance={**describe_source(audio), "seconds_24k": round(len(samples) / 24000, 3),
                                 "resampler": "soxr HQ (librosa's default)"})

    def _check_reference_fits(self, samples: int) -> None:
        """An ICL reference's frames go into every prompt: at most half the talker context, so the new text and
        its speech keep the other half."""
        if self.n_ctx is None:
            return
        per_frame = int(self.bundle.manifest.audio["samples_per_frame"])
        limit = self.n_ctx // 2 - 1
        if -(-samples // per_frame) > limit:
            raise VoiceError(f"reference audio is {samples / self.sample_rate:.1f} s; an in-context voice can use at "
                             f"most {limit * per_frame / self.sample_rate:.1f} s with this talker context (n_ctx "
                             f"{self.n_ctx}): trim it (3-20 s clones best) or use --x-vector-only")

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
        language = voice.language if o.language == "auto" and voice.language else o.language
        return o.replace(voice=voice.prompt(), language=language)

    def forget_voices(self) -> None:
        """Drop every cached voice state: talker prompt prefixes and primed decoder states (memory, or a cold
        measurement); later requests rebuild what they need."""
        forget = getattr(self.talker, "forget", None)
        if forget is not None:
            forget()
        forget_primed = getattr(self.decoder, "forget_primed", None)
        if forget_primed is not None:
            forget_primed()

    @property
    def speakers(self) -> list[str]:
        return sorted(self.ids.speakers)

    @property
    def languages(self) -> list[str]:
        return self.ids.public_languages()

    def devices(self) -> dict[str, str]:
        """Where each stage actually runs (fallbacks included)."""
        def where(engine) -> str:
            placement = getattr(engine, "placement", None)
            if placement is None:
                return type(engine).__name__
            return placement.device + (f" ({placement.note})" if placement.note else "")

        return {"talker": where(self.talker), "predictor": where(self.predictor),
                "decoder": ",".join(self.decoder.providers)}

    def _sampler(self, o: SpeakOptions) -> CodeSampler:
        params = SamplingParams.from_generation_config(
            self.bundle.manifest.sampling, seed=o.seed, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p,
            repetition_penalty=o.repetition_penalty, subtalker_temperature=o.temperature,
        )
        if o.greedy:
            params = params.greedy()
        return CodeSampler(params, vocab_size=int(self.bundle.manifest.model["talker"]["vocab_size"]),
                           eos_id=int(self.bundle.manifest.codec_ids["codec_eos_token_id"]),
                           min_new_frames=o.min_frames)

    def stream(self, text: str | Iterable[str], options: SpeakOptions | None = None,
               **overrides) -> AudioStream:
        """Yield audio chunks of ``text`` as they are generated (lazy: nothing runs until iterated).

        ``text`` is a string, or an iterable of pieces still arriving (e.g. a chat LLM's tokens) that are fed
        into one running utterance. Request errors (unknown speaker, bad options) raise here, before any audio.
        """
        o = options or SpeakOptions()
        if overrides:
            o = o.replace(**overrides)
        t0 = time.perf_counter()
        o = self._with_voice_prompt(o)
        voice = dict(language=o.language, speaker=o.speaker, instruct=o.instruct, voice=o.voice,
                     streaming_text=o.streaming_text, text_timeout_s=o.text_timeout_s)
        segments: list[str | Iterable[str]] = [text]
        if isinstance(text, str):
            validate_text(text)
            budget = self._segment_budget(o)
            if budget is not None:
                segments = list(split_segments(text, self.tokenizer, budget))
        first = build_prompt(self.ids, self.tokenizer, self.tables, segments[0], **voice)  # validates now
        max_frames = o.max_frames or int(self.bundle.manifest.sampling.get("max_new_tokens", 8192))
        sampler = self._sampler(o)

        def loops() -> Iterator[tuple[int, FrameLoop]]:
            remaining = max_frames
            for i, segment in enumerate(segments):
                prompt = first if i == 0 else build_prompt(self.ids, self.tokenizer, self.tables, segment, **voice)
                limit, reason = remaining, STOP_MAX_FRAMES
                if self.n_ctx is not None and self.n_ctx - len(prompt.embeds) < limit:
                    limit, reason = max(1, self.n_ctx - len(prompt.embeds)), STOP_CONTEXT
                sampler.generated.clear()  # each segment is a fresh generation (repetition penalty history)
                loop = FrameLoop(self.talker, self.predictor, self.tables, prompt, sampler,
                                 Guards(max_frames=limit, frames_per_text_token=o.frames_per_text_token,
                                        max_frames_reason=reason))
                yield i, loop
                remaining -= loop.frames
                if remaining <= 0:
                    return

        ref_codes = None if o.voice is None or o.voice.ref_codes is None else np.asarray(o.voice.ref_codes)
        stats = StreamStats(devices=self.devices())
        return AudioStream(self._run(loops(), o.chunk_frames, ref_codes, time.perf_counter() - t0, stats), stats,
                           self.sample_rate)

    def _segment_budget(self, o: SpeakOptions) -> int | None:
        """Text tokens per segment so that a segment's prompt and frames fit the talker's context."""
        if o.segment_tokens is not None:
            return o.segment_tokens
        if self.n_ctx is None:
            return None
        per_token = o.frames_per_text_token or 8.0
        room = self.n_ctx - 64 - Guards.text_ceiling_slack - len(self.tokenizer.encode(o.instruct or ""))
        per_token += 0 if o.streaming_text else 1  # the full-text layout also puts every token in the prompt
        return max(8, int(room / per_token))

    def _run(self, loops: Iterator[tuple[int, FrameLoop]], schedule: Sequence[int], ref_codes: np.ndarray | None,
             prompt_s: float, stats: StreamStats) -> Iterator[AudioChunk]:
        """The request runs now (lazily, on first iteration): it becomes ``last_stats``; see ``run_stream``."""
        self.last_stats = stats
        yield from run_stream(loops, self.decoder, schedule, ref_codes, prompt_s, stats, self.sample_rate,
                              self.max_queued_frames)

    def synthesize(self, text: str | Iterable[str], options: SpeakOptions | None = None,
                   **overrides) -> tuple[np.ndarray, int]:
        """The whole utterance at once: (float32 PCM, sample rate)."""
        chunks = [c.pcm for c in self.stream(text, options, **overrides)]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32), self.sample_rate


__all__ = ["TTS", "SpeakOptions", "AudioChunk", "AudioStream", "StreamStats", "PromptError", "VoicePrompt"]
