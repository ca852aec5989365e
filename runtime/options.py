"""Per-request records: the options of a request, the chunks it yields, and what it cost."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .prompt import VoicePrompt
from .text_feed import DEFAULT_TEXT_TIMEOUT_S


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
