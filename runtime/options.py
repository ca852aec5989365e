"""Per-request records: the options of a request, the chunks it yields, and what it cost."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .checks import is_int, require_int
from .prompt import VoicePrompt
from .text_feed import DEFAULT_TEXT_TIMEOUT_S
from .voices.voice_file import Voice


@dataclass(frozen=True)
class PromptOptions:
    """Who speaks and how the prompt is laid out."""

    language: str = "auto"
    speaker: str | None = None  # preset speaker (CustomVoice)
    instruct: str | None = None  # voice/style instruction (VoiceDesign; 1.7B CustomVoice)
    # Base models: a Voice, a voice file path, or a raw VoicePrompt (x-vector [+ reference codes and text]).
    voice: VoicePrompt | Voice | str | Path | None = None
    # Voice packs (LoRA, ``NAME.voicepack``): the adapters' scale in [0, 2] (None: the pack's default).
    voice_scale: float | None = None
    # Prompt layout, not streaming output: True feeds the text one token per frame (the official streaming-text
    # layout, needed for incremental text); False puts the whole text in the prompt.
    streaming_text: bool = True


@dataclass(frozen=True)
class SamplingOptions:
    """Overrides of the bundle's generation_config sampling (None keeps its value); checked by SamplingParams."""

    seed: int | None = None
    greedy: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None


@dataclass(frozen=True)
class Limits:
    """Stop rules and runaway guards of one request: the only record of them (the frame loop reads it too)."""

    max_frames: int | None = None  # hard cap on 80 ms frames (None: the bundle's max_new_tokens)
    frames_per_text_token: float | None = 8.0  # runaway ceiling per text token (None disables it)
    # Hold the end of speech back for this many frames (default 2, as the official generate). With
    # max_frames equal to it and frames_per_text_token=None a run makes exactly that many frames (bench).
    min_frames: int = 2
    # Long text: at most this many text tokens per segment (None: as many as the talker's context allows).
    segment_tokens: int | None = None
    # Incremental text: how long one frame may wait for its next text token before the utterance stops
    # (stop reason "text_stalled"); None waits forever.
    text_timeout_s: float | None = DEFAULT_TEXT_TIMEOUT_S
    # Frames allowed beyond frames_per_text_token x text tokens (short texts need a floor).
    text_ceiling_slack: int = 40
    # Stop when codebook 0 has not changed for this many frames (a stuck loop; None disables). 100 frames
    # is 8 s of one code: longer than any pause, so real speech never trips it.
    repeat_frames: int | None = 100

    def __post_init__(self) -> None:
        require_int("max_frames", self.max_frames, minimum=1, optional=True)
        require_int("segment_tokens", self.segment_tokens, minimum=1, optional=True)
        require_int("min_frames", self.min_frames)
        require_int("text_ceiling_slack", self.text_ceiling_slack)
        require_int("repeat_frames", self.repeat_frames, minimum=2, optional=True)
        if self.frames_per_text_token is not None and not (isinstance(self.frames_per_text_token, int | float)
                                                           and self.frames_per_text_token > 0):
            raise ValueError(f"frames_per_text_token must be positive or None, got {self.frames_per_text_token!r}")
        if self.text_timeout_s is not None and not self.text_timeout_s > 0:
            raise ValueError(f"text_timeout_s must be positive seconds or None, got {self.text_timeout_s!r}")

    def text_ceiling(self, n_text_tokens: int) -> int | None:
        """Frames the runaway guard allows for ``n_text_tokens`` text tokens (None: no ceiling)."""
        if self.frames_per_text_token is None:
            return None
        return int(self.frames_per_text_token * max(1, n_text_tokens)) + self.text_ceiling_slack


_GROUPS = {"prompt": PromptOptions, "sampling": SamplingOptions, "limits": Limits}
_FIELD_GROUP = {name: group for group, cls in _GROUPS.items() for name in cls.__dataclass_fields__}


@dataclass(frozen=True, init=False)
class SpeakOptions:
    """Per-request options in three groups (``prompt``, ``sampling``, ``limits``) plus the decode schedule.

    Build it from groups, from flat keywords (``SpeakOptions(speaker="ryan", seed=1, max_frames=40)``), or
    both; read any field flat (``o.speaker``) or through its group (``o.prompt.speaker``).
    """

    prompt: PromptOptions
    sampling: SamplingOptions
    limits: Limits
    # Frames per decoded chunk: the first chunk after 1 frame (first sound early), then growing; the last repeats.
    chunk_frames: tuple[int, ...]

    def __init__(self, prompt: PromptOptions | None = None, sampling: SamplingOptions | None = None,
                 limits: Limits | None = None, chunk_frames: tuple[int, ...] = (1, 2, 4, 8), **fields: Any) -> None:
        unknown = sorted(set(fields) - set(_FIELD_GROUP))
        if unknown:
            raise TypeError(f"unknown speak options {unknown}; choose from {', '.join(sorted(_FIELD_GROUP))}, "
                            "chunk_frames")
        groups = {"prompt": prompt or PromptOptions(), "sampling": sampling or SamplingOptions(),
                  "limits": limits or Limits()}
        for group in groups:
            values = {k: v for k, v in fields.items() if _FIELD_GROUP[k] == group}
            if values:
                groups[group] = replace(groups[group], **values)
        chunk_frames = tuple(chunk_frames) if isinstance(chunk_frames, list | tuple) else chunk_frames
        if not chunk_frames or not isinstance(chunk_frames, tuple) or not all(is_int(n) and n >= 1
                                                                                for n in chunk_frames):
            raise ValueError(f"chunk_frames must be positive integers (a schedule such as (1, 2, 4, 8)), "
                             f"got {chunk_frames!r}")
        for name, value in {**groups, "chunk_frames": chunk_frames}.items():
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        group = _FIELD_GROUP.get(name)
        if group is None:
            raise AttributeError(f"{type(self).__name__!r} has no option {name!r}")
        return getattr(object.__getattribute__(self, group), name)

    def replace(self, **fields: Any) -> SpeakOptions:
        """A copy with some options changed (flat names, groups or chunk_frames)."""
        base = {"prompt": self.prompt, "sampling": self.sampling, "limits": self.limits,
                "chunk_frames": self.chunk_frames}
        return SpeakOptions(**{**base, **{k: fields.pop(k) for k in list(fields) if k in base}}, **fields)


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
    """What one request cost; filled in as the stream runs, by its consumer only (what the generating thread
    knows travels with the frames and the segment ends)."""

    ttfa_s: float | None = None
    total_s: float = 0.0
    audio_s: float = 0.0
    frames: int = 0
    prefill_ms: float = 0.0
    talker_ms: float = 0.0
    predictor_ms: float = 0.0
    decoder_ms: float = 0.0
    host_ms: float = 0.0  # the generation loop's own work per frame (code-0 sampling, next input), see Frame
    text_wait_ms: float = 0.0  # incremental text: generation waited this long for text still arriving
    stop_reason: str | None = None
    segments: int = 0
    segment_stops: list[str] = field(default_factory=list)
    segment_frames: list[int] = field(default_factory=list)  # frames each finished segment made
    prompt_positions_reused: int = 0  # prompt KV positions known before (previous request or a saved voice)
    prompt_positions_prefilled: int = 0  # prompt positions computed for this request
    devices: dict[str, str] = field(default_factory=dict)

    def add_frame(self, frame: Any) -> None:
        """Count one decoded frame's costs (a ``frame_loop.Frame``)."""
        self.frames += 1
        self.talker_ms += frame.talker_ms
        self.predictor_ms += frame.predictor_ms
        self.host_ms += frame.host_ms

    def add_segment(self, end: Any) -> None:
        """Count one finished segment (a ``frame_loop.SegmentEnd``, queued behind its last frame)."""
        self.segments = end.segment + 1
        self.segment_stops.append(end.stop_reason)
        self.segment_frames.append(end.frames)
        self.prefill_ms += end.prefill_ms
        self.text_wait_ms += end.text_wait_ms
        self.prompt_positions_reused += end.reused_positions
        self.prompt_positions_prefilled += end.prefilled_positions

    @property
    def rtf(self) -> float | None:
        return self.total_s / self.audio_s if self.audio_s else None

    def per_frame_ms(self) -> dict[str, float]:
        n = max(self.frames, 1)
        stages = {"talker": self.talker_ms / n, "predictor": self.predictor_ms / n, "decoder": self.decoder_ms / n}
        stages["host"] = self.host_ms / n
        if self.text_wait_ms:
            stages["text_wait"] = self.text_wait_ms / n
        return stages
