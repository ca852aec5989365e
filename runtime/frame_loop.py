"""The frame loop: talker step -> code predictor (15 residual codes) -> next talker input, frame by frame.

Backends (llama.cpp engines in the runtime, the official PyTorch modules as a reference) implement the
Protocols of ``runtime/backends``; the loop owns sampling, stop rules and runaway guards and yields each frame's 16
codes as soon as they exist, so the decoder can stream them. Torch-free.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .backends import EmbeddingTables, PredictorBackend, TalkerBackend
from .checks import require_int
from .prompt import Prompt
from .sampler import CodeSampler
from .text_feed import TextStalled

STOP_EOS = "eos"
STOP_MAX_FRAMES = "max_frames"
STOP_TEXT_CEILING = "frames_per_text_token"
STOP_CONTEXT = "context_limit"
STOP_REPEAT = "repeated_frames"
STOP_TEXT_STALLED = "text_stalled"  # incremental text: no new token within the per-step wait limit


@dataclass(frozen=True)
class Frame:
    """One 80 ms frame: its 16 codes and what it cost."""

    index: int
    codes: np.ndarray  # (16,) int64: codebook 0, then the 15 residual codebooks
    talker_ms: float
    predictor_ms: float
    text_wait_ms: float = 0.0  # incremental text: time this frame's input waited for its text token
    host_ms: float = 0.0  # the loop's own work: choosing code 0, building the next input (text wait excluded)


@dataclass(frozen=True)
class Guards:
    """Runaway protection: hard frame cap and a ceiling of frames per text token (plus a fixed allowance)."""

    max_frames: int = 8192
    frames_per_text_token: float | None = 8.0
    text_ceiling_slack: int = 40
    max_frames_reason: str = STOP_MAX_FRAMES  # e.g. STOP_CONTEXT when the cap is the KV room left
    # Stop when codebook 0 has not changed for this many frames (a stuck loop; None disables). 100 frames
    # is 8 s of one code: longer than any pause, so real speech never trips it.
    repeat_frames: int | None = 100

    def __post_init__(self) -> None:
        require_int("max_frames", self.max_frames, minimum=1)
        require_int("repeat_frames", self.repeat_frames, minimum=2, optional=True)
        if self.frames_per_text_token is not None and not self.frames_per_text_token > 0:
            raise ValueError(f"frames_per_text_token must be positive or None, got {self.frames_per_text_token!r}")

    def limit(self, n_text_tokens: int) -> tuple[int, str]:
        """Frames allowed for a text of ``n_text_tokens`` tokens and the guard that sets the limit."""
        if self.frames_per_text_token is None:
            return self.max_frames, self.max_frames_reason
        ceiling = int(self.frames_per_text_token * max(1, n_text_tokens)) + self.text_ceiling_slack
        if ceiling < self.max_frames:
            return ceiling, STOP_TEXT_CEILING
        return self.max_frames, self.max_frames_reason


@dataclass
class FrameLoop:
    """Iterate frames of one utterance; after iteration ``stop_reason`` says why it ended."""

    talker: TalkerBackend
    predictor: PredictorBackend
    tables: EmbeddingTables
    prompt: Prompt
    sampler: CodeSampler
    guards: Guards = field(default_factory=Guards)
    stop_reason: str | None = None
    prefill_ms: float = 0.0
    text_wait_ms: float = 0.0  # incremental text: all waits for text, the one that stalled included
    frames: int = 0  # frames yielded so far

    def __iter__(self) -> Iterator[Frame]:
        eos = self.sampler.eos_id
        self.talker.reset()
        try:
            t0 = time.perf_counter()
            # A prefix-caching talker (runtime/prefix_cache.py) takes the whole prompt, to keep its voice part.
            prefill_prompt = getattr(self.talker, "prefill_prompt", None)
            out = prefill_prompt(self.prompt) if prefill_prompt else self.talker.prefill(self.prompt.embeds)
            self.prefill_ms = (time.perf_counter() - t0) * 1e3
            talker_ms = self.prefill_ms
            k = run = 0
            last_c0 = -1
            text_wait_ms = prep_ms = 0.0
            while True:
                t_c0 = time.perf_counter()
                c0 = self.sampler.choose_c0(out.logits, k, allow_eos=self.prompt.text_finished())
                if c0 == eos:
                    self.stop_reason = STOP_EOS
                    return
                t1 = time.perf_counter()
                residual = self.predictor.predict(out.hidden, c0, self.sampler.choose_residual)
                t2 = time.perf_counter()
                codes = np.concatenate([[c0], np.asarray(residual, dtype=np.int64)])
                self.frames = k + 1
                host_ms = prep_ms + (t1 - t_c0 + time.perf_counter() - t2) * 1e3
                yield Frame(index=k, codes=codes, talker_ms=talker_ms, predictor_ms=(t2 - t1) * 1e3,
                            text_wait_ms=text_wait_ms, host_ms=host_ms)
                t_prep = time.perf_counter()
                run = run + 1 if c0 == last_c0 else 1
                last_c0 = c0
                if self.guards.repeat_frames is not None and run >= self.guards.repeat_frames:
                    self.stop_reason = STOP_REPEAT
                    return
                limit, reason = self.guards.limit(self.prompt.text_tokens())
                if k + 1 >= limit:
                    self.stop_reason = reason
                    return
                t_wait = time.perf_counter()
                try:
                    text_vec = self.prompt.text_track(k)  # incremental text may wait here for its next token
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
