"""The frame loop: talker step -> code predictor (15 residual codes) -> next talker input, frame by frame.

Engines implement the contract of ``runtime/engine/contract.py``; the loop owns sampling, stop rules and
runaway guards and yields each frame's 16 codes as soon as they exist, so the decoder can stream them. When it
ends, :meth:`FrameLoop.segment_end` is the record of what it did, which travels to the consumer behind the
frames. Torch-free.

End of speech: the model may end the utterance (EOS) at any frame after ``min_frames``, whether the text came
whole or is still arriving — the official generate's rule. Incremental text gives the talker exactly the
inputs the whole text gives (the loop waits for each token), so with one rule for both modes the same
request gives the same codes however its text arrives, sampled or greedy.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np

from .engine.contract import EmbeddingTables, PredictorEngine, PromptTalker
from .options import Limits
from .prompt import Prompt
from .sampler import CodeSampler
from .text_feed import TextStalled

STOP_EOS = "eos"
STOP_MAX_FRAMES = "max_frames"
STOP_TEXT_CEILING = "frames_per_text_token"
STOP_CONTEXT = "context_limit"
STOP_REPEAT = "repeated_frames"
STOP_TEXT_STALLED = "text_stalled"  # incremental text: no new token within the per-step wait limit
STOP_CANCELLED = "cancelled"
DEFAULT_MAX_FRAMES = 8192


@dataclass(frozen=True)
class Frame:
    """One 80 ms frame: its 16 codes, which segment of the request made it, and what it cost."""

    index: int
    codes: np.ndarray  # (16,) int64: codebook 0, then the 15 residual codebooks
    talker_ms: float  # the talker step that made this frame's logits (0 for frame 0: that is the prefill)
    predictor_ms: float
    text_wait_ms: float = 0.0  # incremental text: time this frame's input waited for its text token
    host_ms: float = 0.0  # the loop's own work: choosing code 0, building the next input (text wait excluded)
    segment: int = 0


@dataclass(frozen=True)
class SegmentEnd:
    """The end of one segment's frame loop, queued behind its last frame: why it stopped and what it cost."""

    segment: int
    stop_reason: str
    frames: int
    prefill_ms: float
    text_wait_ms: float
    reused_positions: int  # prompt KV positions known before (previous request or a saved voice)
    prefilled_positions: int


@dataclass
class FrameLoop:
    """Iterate frames of one segment; after iteration ``stop_reason`` says why it ended.

    ``max_frames`` caps this segment (default: ``limits.max_frames``), ``max_frames_reason`` names that cap
    (e.g. ``STOP_CONTEXT`` when it is the KV room left). ``idle`` wraps the waits for incremental text (a batched
    engine does not hold the other streams' frames for this one meanwhile).
    """

    talker: PromptTalker
    predictor: PredictorEngine
    tables: EmbeddingTables
    prompt: Prompt
    sampler: CodeSampler
    limits: Limits = field(default_factory=Limits)
    segment: int = 0
    max_frames: int | None = None
    max_frames_reason: str = STOP_MAX_FRAMES
    idle: Callable[[], AbstractContextManager] = contextlib.nullcontext
    stop_reason: str | None = None
    prefill_ms: float = 0.0
    text_wait_ms: float = 0.0  # incremental text: all waits for text, the one that stalled included
    frames: int = 0  # frames yielded so far

    def _cap(self, n_text_tokens: int) -> tuple[int, str]:
        """Frames allowed so far and the rule that sets the limit."""
        cap = self.max_frames or self.limits.max_frames or DEFAULT_MAX_FRAMES
        ceiling = self.limits.text_ceiling(n_text_tokens)
        if ceiling is not None and ceiling < cap:
            return ceiling, STOP_TEXT_CEILING
        return cap, self.max_frames_reason

    def segment_end(self) -> SegmentEnd:
        report = self.talker.last_prefill
        return SegmentEnd(segment=self.segment, stop_reason=self.stop_reason or STOP_CANCELLED, frames=self.frames,
                          prefill_ms=self.prefill_ms, text_wait_ms=self.text_wait_ms,
                          reused_positions=report.reused, prefilled_positions=report.prefilled)

    def __iter__(self) -> Iterator[Frame]:
        eos = self.sampler.eos_id
        residual = self.sampler.residual_sampling()
        repeat_frames = self.limits.repeat_frames
        try:
            t0 = time.perf_counter()
            out = self.talker.prefill(self.prompt)
            self.prefill_ms = (time.perf_counter() - t0) * 1e3
            talker_ms = 0.0
            k = run = 0
            last_c0 = -1
            text_wait_ms = prep_ms = 0.0
            while True:
                t_c0 = time.perf_counter()
                c0 = self.sampler.choose_c0(out.logits, k)
                if c0 == eos:
                    self.stop_reason = STOP_EOS
                    return
                t1 = time.perf_counter()
                codes15 = self.predictor.predict(out.hidden, c0, residual)
                t2 = time.perf_counter()
                codes = np.concatenate([[c0], np.asarray(codes15, dtype=np.int64)])
                self.frames = k + 1
                host_ms = prep_ms + (t1 - t_c0 + time.perf_counter() - t2) * 1e3
                yield Frame(index=k, codes=codes, talker_ms=talker_ms, predictor_ms=(t2 - t1) * 1e3,
                            text_wait_ms=text_wait_ms, host_ms=host_ms, segment=self.segment)
                t_prep = time.perf_counter()
                run = run + 1 if c0 == last_c0 else 1
                last_c0 = c0
                if repeat_frames is not None and run >= repeat_frames:
                    self.stop_reason = STOP_REPEAT
                    return
                limit, reason = self._cap(self.prompt.text_tokens())
                if k + 1 >= limit:
                    self.stop_reason = reason
                    return
                t_wait = time.perf_counter()
                try:
                    if self.prompt.live is None:
                        text_vec = self.prompt.text_track(k)
                    else:
                        with self.idle():  # incremental text may wait here for its next token
                            text_vec = self.prompt.text_track(k)
                except TextStalled:
                    self.stop_reason = STOP_TEXT_STALLED
                    return
                finally:
                    text_wait_ms = (time.perf_counter() - t_wait) * 1e3 if self.prompt.live is not None else 0.0
                    self.text_wait_ms += text_wait_ms
                embed = self.tables.frame_embeds(codes[None])[0] + text_vec
                t3 = time.perf_counter()
                prep_ms = (t3 - t_prep) * 1e3 - text_wait_ms
                out = self.talker.step(embed.astype(np.float32))
                talker_ms = (time.perf_counter() - t3) * 1e3
                k += 1
        finally:
            self.prompt.close()  # stops an incremental text feed when the consumer cancels
