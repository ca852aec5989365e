"""Text in, audio out as it is made: the torch-free runtime's entry class.

``TTS`` opens a bundle (talker + code predictor on llama.cpp, stateful ONNX decoder), and ``stream()``
lazily yields PCM chunks while generation runs: frames go from the frame loop straight into the stateful
decoder on a chunk schedule (1 frame first, then growing), so the first sound comes after the first frame
and the concatenated stream equals the offline decode of the same codes — no re-decoding, no crossfades.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends import load as load_engines
from .bundle import DECODER_PREFERENCE, TALKER_PREFERENCE, Bundle, BundleError, load_bundle
from .generate import STOP_CONTEXT, STOP_MAX_FRAMES, FrameLoop, Guards
from .longform import PrefixReusingTalker, split_segments
from .prompt import ModelIds, PromptError, VoicePrompt, build_prompt, validate_text
from .sampler import CodeSampler, SamplingParams
from .text import TextTokenizer
from .text_feed import DEFAULT_TEXT_TIMEOUT_S

STOP_CANCELLED = "cancelled"
_END = object()



@dataclass(frozen=True)
class SpeakOptions:
    """Per-request options; ``None`` sampling values take the bundle's generation_config defaults."""

    language: str = "auto"
    speaker: str | None = None
    instruct: str | None = None
    voice: VoicePrompt | None = None
    streaming_text: bool = True
    seed: int | None = None
    greedy: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    chunk_frames: tuple[int, ...] = (1, 2, 4, 8)
    max_frames: int | None = None
    frames_per_text_token: float | None = 8.0
    # Hold the end of speech back for this many frames (default 2, as the official generate). With
    # max_frames equal to it and frames_per_text_token=None a run makes exactly that many frames (bench).
    min_frames: int = 2
    # Long text: at most this many text tokens per segment (None: as many as the talker's context allows).
    segment_tokens: int | None = None
    # Incremental text: how long one frame may wait for its next text token before the utterance stops
    # (stop reason "text_stalled"); None waits forever.
    text_timeout_s: float | None = DEFAULT_TEXT_TIMEOUT_S

    def __post_init__(self) -> None:
        sched = self.chunk_frames
        if not sched or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sched):
            raise ValueError(f"chunk_frames must be positive integers (a schedule such as (1, 2, 4, 8)), got {sched!r}")
        if self.segment_tokens is not None and (isinstance(self.segment_tokens, bool)
                                                or not isinstance(self.segment_tokens, int) or self.segment_tokens < 1):
            raise ValueError(f"segment_tokens must be a positive integer or None, got {self.segment_tokens!r}")
        if isinstance(self.min_frames, bool) or not isinstance(self.min_frames, int) or self.min_frames < 0:
            raise ValueError(f"min_frames must be a non-negative integer, got {self.min_frames!r}")
        if self.text_timeout_s is not None and not self.text_timeout_s > 0:
            raise ValueError(f"text_timeout_s must be positive seconds or None, got {self.text_timeout_s!r}")


@dataclass(frozen=True)
class AudioChunk:
    """A piece of the utterance: PCM plus when and from what it was made."""

    pcm: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int
    first_frame: int
    n_frames: int
    elapsed_s: float  # seconds from the request to this chunk being ready
    final: bool = False
    stop_reason: str | None = None
    codes: np.ndarray | None = None  # (n_frames, 16) codes behind this audio (cacheable, re-decodable)
    segment: int = 0  # long text: which segment (same voice, new talker context) the chunk's last frame is from


@dataclass
class StreamStats:
    """What one request cost; filled in as the stream runs."""

    ttfa_s: float | None = None
    total_s: float = 0.0
    audio_s: float = 0.0
    frames: int = 0
    prefill_ms: float = 0.0
    talker_ms: float = 0.0
    predictor_ms: float = 0.0
    decoder_ms: float = 0.0
    text_wait_ms: float = 0.0  # incremental text: generation waited this long for text still arriving
    stop_reason: str | None = None
    segments: int = 0
    segment_stops: list[str] = field(default_factory=list)
    prompt_positions_reused: int = 0  # prompt KV positions kept from the previous request (prefix cache)
    devices: dict[str, str] = field(default_factory=dict)

    @property
    def rtf(self) -> float | None:
        return self.total_s / self.audio_s if self.audio_s else None

    def per_frame_ms(self) -> dict[str, float]:
        n = max(self.frames, 1)
        stages = {"talker": self.talker_ms / n, "predictor": self.predictor_ms / n, "decoder": self.decoder_ms / n}
        if self.text_wait_ms:
            stages["text_wait"] = self.text_wait_ms / n
        stages["overhead"] = max(0.0, self.total_s * 1e3 / n - sum(stages.values()))
        return stages


class AudioStream:
    """The chunks of one request, made lazily, with that request's own ``stats`` (filled in as it runs).

    Iterate it (or ``list()`` it); ``close()`` (or leaving a ``with`` block) stops generation at once. Each
    request has its own stats, so one process can serve several; ``TTS.last_stats`` is the latest request's.
    """

    def __init__(self, chunks: Iterator[AudioChunk], stats: StreamStats, sample_rate: int) -> None:
        self._chunks, self.stats, self.sample_rate = chunks, stats, sample_rate

    def __iter__(self) -> AudioStream:
        return self

    def __next__(self) -> AudioChunk:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def __enter__(self) -> AudioStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Backends:
    """Ready engines for a ``TTS``: talker + code predictor + their embedding tables (llama.cpp, or e.g. the
    PyTorch reference), and optionally the decoder (else the bundle's ONNX decoder is loaded)."""

    talker: object
    predictor: object
    tables: object
    name: str = "custom"
    decoder: object | None = None


def _pick(bundle: Bundle, role: str, wanted: str | None, preference: Sequence[str]) -> str:
    have = [c.precision for c in bundle.manifest.find(role)]
    if not have:
        raise BundleError(f"bundle {bundle.root} has no {role}; export it with `qwen3-tts-edge export MODEL -o "
                          f"{bundle.root} --force --talker q8_0 --decoder fp32`")
    if wanted is not None:
        if wanted not in have:
            raise BundleError(f"bundle has no {role} in precision {wanted!r}; available: {sorted(have)}")
        return wanted
    return next((p for p in preference if p in have), have[0])


def _produce(loops: Iterator[tuple[int, FrameLoop]], frames: queue.Queue, stop: threading.Event,
             stats: StreamStats) -> None:
    """Worker: run the segments' frame loops into ``frames`` until done, failed or ``stop`` is set."""

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                frames.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    item: object = _END
    try:
        for index, loop in loops:
            stats.segments = index + 1
            gen = iter(loop)
            try:
                for frame in gen:
                    if not put(frame):
                        return
            finally:
                gen.close()  # stops an incremental text feed as well
            stats.prefill_ms += loop.prefill_ms
            stats.text_wait_ms += loop.text_wait_ms
            stats.segment_stops.append(loop.stop_reason or STOP_CANCELLED)
            reused = getattr(loop.talker, "reused_positions", 0)
            stats.prompt_positions_reused += reused
            if stop.is_set():
                return
    except BaseException as exc:  # handed to the consumer, who re-raises it
        item = exc
    put(item)


class TTS:
    """A loaded bundle ready to speak. Not thread-safe: one request at a time per instance."""

    def __init__(self, bundle: str | Path, *, talker_precision: str | None = None,
                 decoder_precision: str | None = None, threads: int | None = None,
                 providers: Sequence[str] | None = None, n_gpu_layers: int = 0, verify: bool = True,
                 max_queued_frames: int = 64, backends: Backends | None = None, n_ctx: int = 4096,
                 prefix_cache: bool = True):
        self.bundle = load_bundle(Path(bundle), verify=verify)
        m = self.bundle.manifest
        if isinstance(max_queued_frames, bool) or not isinstance(max_queued_frames, int) or max_queued_frames < 1:
            raise ValueError(f"max_queued_frames must be a positive integer, got {max_queued_frames!r}")
        self.max_queued_frames = max_queued_frames
        self.decoder_precision = _pick(self.bundle, "decoder", decoder_precision, DECODER_PREFERENCE)
        if backends is None:
            self.talker_precision = _pick(self.bundle, "talker", talker_precision, TALKER_PREFERENCE)
            engines = load_engines("generation", self.bundle, self.talker_precision, n_ctx=n_ctx, threads=threads,
                                   n_gpu_layers=n_gpu_layers)
            backends = Backends(engines.talker, engines.predictor, engines.tables)
            for name, engine in (("talker", engines.talker), ("predictor", engines.predictor)):
                if n_gpu_layers and engine.placement.device != "gpu":
                    warnings.warn(f"{name}: {n_gpu_layers} GPU layers requested but it runs on the CPU "
                                  f"({engine.placement.note or 'this llama-cpp-python build has no GPU backend'})",
                                  RuntimeWarning, stacklevel=2)
        else:
            self.talker_precision = backends.name
        self.talker, self.predictor, self.tables = backends.talker, backends.predictor, backends.tables
        if prefix_cache and hasattr(self.talker, "rewind"):
            self.talker = PrefixReusingTalker(self.talker)
        ctx = getattr(self.talker, "n_ctx", None)
        self.n_ctx: int | None = int(ctx) if ctx else None
        if backends.decoder is not None:
            self.decoder = backends.decoder
        else:
            self.decoder = load_engines("decoder", self.bundle, self.decoder_precision, providers=providers,
                                        threads=threads)
        self.tokenizer = TextTokenizer.from_folder(self.bundle.root / "tokenizer")
        self.ids = ModelIds.from_manifest(m)
        self.sample_rate = int(m.audio["sample_rate"])
        self.last_stats: StreamStats | None = None

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
            o = SpeakOptions(**{**o.__dict__, **overrides})
        t0 = time.perf_counter()
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
        """Generation on a worker thread, decoding on the consumer's thread, a bounded queue between them.

        Runs lazily: the decoder state belongs to this stream from its first chunk on. Timings count from the
        start of iteration plus the (eager) prompt building, so requests created early don't inflate them. A
        slow consumer blocks the generator once ``max_queued_frames`` wait; closing the iterator stops it.
        """
        t0 = time.perf_counter() - prompt_s
        self.last_stats = stats  # the request that runs now
        if ref_codes is not None:
            self.decoder.prime(ref_codes)  # clone: continue seamlessly after the reference audio
        else:
            self.decoder.reset()
        frames: queue.Queue = queue.Queue(maxsize=self.max_queued_frames)
        stop = threading.Event()
        worker = threading.Thread(target=_produce, args=(loops, frames, stop, stats), name="qwen3-tts-edge-frames",
                                  daemon=True)
        worker.start()
        pending: list[np.ndarray] = []
        first = chunk_index = 0

        def flush(final: bool) -> AudioChunk:
            nonlocal first, chunk_index
            t = time.perf_counter()
            codes = np.stack(pending) if pending else np.zeros((0, 16), np.int64)
            pcm = self.decoder.decode(codes) if len(codes) else np.zeros(0, np.float32)
            stats.decoder_ms += (time.perf_counter() - t) * 1e3
            elapsed = time.perf_counter() - t0
            if stats.ttfa_s is None and len(pcm):
                stats.ttfa_s = elapsed
            chunk = AudioChunk(pcm=pcm, sample_rate=self.sample_rate, first_frame=first, n_frames=len(codes),
                               elapsed_s=elapsed, final=final, stop_reason=stats.stop_reason if final else None,
                               codes=codes, segment=max(0, stats.segments - 1))
            first += len(codes)
            chunk_index += 1
            pending.clear()
            stats.audio_s += len(pcm) / self.sample_rate
            stats.total_s = elapsed
            return chunk

        try:
            while (item := frames.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                stats.frames += 1
                stats.talker_ms += item.talker_ms
                stats.predictor_ms += item.predictor_ms
                pending.append(item.codes)
                if len(pending) >= schedule[min(chunk_index, len(schedule) - 1)]:
                    yield flush(final=False)
            stats.talker_ms -= stats.prefill_ms  # each segment's frame 0 talker time is its prefill
            stats.stop_reason = stats.segment_stops[-1] if stats.segment_stops else None
            yield flush(final=True)
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue, then wait for it
                try:
                    frames.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)
            if stats.stop_reason is None:
                stats.stop_reason = STOP_CANCELLED

    def synthesize(self, text: str | Iterable[str], options: SpeakOptions | None = None,
                   **overrides) -> tuple[np.ndarray, int]:
        """The whole utterance at once: (float32 PCM, sample rate)."""
        chunks = [c.pcm for c in self.stream(text, options, **overrides)]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32), self.sample_rate


__all__ = ["TTS", "SpeakOptions", "AudioChunk", "AudioStream", "StreamStats", "PromptError", "VoicePrompt"]
