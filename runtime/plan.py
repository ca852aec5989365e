"""``RequestPlan``: what one request will do, decided once before any audio.

The plan holds the request's segments (long text split to fit the talker's context), the first segment's
prompt (built at once, so request errors raise before any audio), the limits, the sampling parameters, the
decode schedule and the voice. :meth:`RequestPlan.loops` turns it into one frame loop per segment on the
generating thread; their frames and segment ends then travel to the consumer (``runtime/streaming.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .engine.contract import EmbeddingTables, PredictorEngine, PromptTalker
from .frame_loop import DEFAULT_MAX_FRAMES, STOP_CONTEXT, STOP_MAX_FRAMES, FrameLoop
from .options import Limits, SpeakOptions
from .prompt import ModelIds, Prompt, VoicePrompt, build_prompt, instruct_token_ids, validate_text
from .sampler import CodeSampler, SamplingParams
from .segments import split_segments
from .text import TextTokenizer

# Positions a segment's prompt may take besides its text (role, codec tags, speaker) when sizing segments.
PROMPT_OVERHEAD = 64


@dataclass(frozen=True)
class RequestPlan:
    """One request, decided: build it with :func:`plan_request`, run it with :meth:`loops`."""

    segments: tuple[str | Iterable[str], ...]
    first_prompt: Prompt
    limits: Limits
    max_frames: int  # for the whole request, over all segments
    sampling: SamplingParams
    vocab_size: int
    eos_id: int
    schedule: tuple[int, ...]  # frames per decoded chunk, the last repeating
    n_ctx: int | None
    voice: VoicePrompt | None = None
    adapter: tuple[Any, float] | None = None  # a voice pack and its scale (runtime/voices/voice_pack.py)
    tables: EmbeddingTables | None = None  # the request's own tables (a pack's codec rows); None: the engine's
    build: Callable[[str | Iterable[str]], Prompt] | None = field(default=None, repr=False, compare=False)

    @property
    def ref_codes(self) -> np.ndarray | None:
        """Reference codes the decoder continues from (ICL voice clones), else None."""
        return None if self.voice is None or self.voice.ref_codes is None else np.asarray(self.voice.ref_codes)

    def sampler(self) -> CodeSampler:
        """A fresh sampler for this request (its seed replays the same codes)."""
        return CodeSampler(self.sampling, vocab_size=self.vocab_size, eos_id=self.eos_id,
                           min_new_frames=self.limits.min_frames)

    def segment_cap(self, prompt: Prompt, remaining: int) -> tuple[int, str]:
        """Frames a segment may make: what is left of the request, or the talker's room after its prompt."""
        if self.n_ctx is not None and self.n_ctx - len(prompt.embeds) < remaining:
            return max(1, self.n_ctx - len(prompt.embeds)), STOP_CONTEXT
        return remaining, STOP_MAX_FRAMES

    def loops(self, talker: PromptTalker, predictor: PredictorEngine, tables: EmbeddingTables, *,
              idle: Callable[[], AbstractContextManager] = contextlib.nullcontext) -> Iterator[FrameLoop]:
        """One frame loop per segment (run on the generating thread), each a fresh generation with one sampler."""
        sampler = self.sampler()
        remaining = self.max_frames
        for i, segment in enumerate(self.segments):
            prompt = self.first_prompt if i == 0 else self.build(segment)
            cap, reason = self.segment_cap(prompt, remaining)
            sampler.generated.clear()  # each segment is a fresh generation (repetition penalty history)
            loop = FrameLoop(talker, predictor, tables, prompt, sampler, self.limits, segment=i, max_frames=cap,
                             max_frames_reason=reason, idle=idle)
            yield loop
            remaining -= loop.frames
            if remaining <= 0:
                return


def segment_budget(o: SpeakOptions, n_ctx: int | None, instruct_tokens: int = 0) -> int | None:
    """Text tokens per segment so that a segment's prompt (with ``instruct_tokens`` of instruction) and frames fit
    the talker's context."""
    if o.segment_tokens is not None:
        return o.segment_tokens
    if n_ctx is None:
        return None
    per_token = o.frames_per_text_token or 8.0
    room = n_ctx - PROMPT_OVERHEAD - o.limits.text_ceiling_slack - instruct_tokens
    per_token += 0 if o.streaming_text else 1  # the full-text layout also puts every token in the prompt
    return max(8, int(room / per_token))


def plan_request(text: str | Iterable[str], o: SpeakOptions, *, ids: ModelIds, tokenizer: TextTokenizer,
                 tables: EmbeddingTables, manifest: Any, n_ctx: int | None) -> RequestPlan:
    """Validate ``text`` and the options against the bundle and decide the request (``o.voice`` is already a
    ``VoicePrompt`` or None). Builds the first prompt now: with incremental text it waits for the first token."""
    instruct_ids = instruct_token_ids(tokenizer, o.instruct)  # once: every segment's prompt repeats them
    settings = dict(language=o.language, speaker=o.speaker, instruct=o.instruct, instruct_ids=instruct_ids,
                    voice=o.voice, streaming_text=o.streaming_text, text_timeout_s=o.text_timeout_s)

    def build(segment: str | Iterable[str]) -> Prompt:
        return build_prompt(ids, tokenizer, tables, segment, **settings)

    segments: list[str | Iterable[str]] = [text]
    if isinstance(text, str):
        validate_text(text)
        budget = segment_budget(o, n_ctx, 0 if instruct_ids is None else len(instruct_ids))
        if budget is not None:
            segments = list(split_segments(text, tokenizer, budget))
    first = build(segments[0])  # validates speaker, language, voice now
    sampling = SamplingParams.from_generation_config(
        manifest.sampling, seed=o.seed, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p,
        repetition_penalty=o.repetition_penalty, subtalker_temperature=o.temperature)
    if o.greedy:
        sampling = sampling.greedy()
    max_frames = o.max_frames or int(manifest.sampling.get("max_new_tokens", DEFAULT_MAX_FRAMES))
    return RequestPlan(segments=tuple(segments), first_prompt=first, limits=o.limits,
                       max_frames=max_frames, sampling=sampling,
                       vocab_size=int(manifest.model["talker"]["vocab_size"]),
                       eos_id=int(manifest.codec_ids["codec_eos_token_id"]), schedule=tuple(o.chunk_frames),
                       n_ctx=n_ctx, voice=o.voice, build=build)
