"""The engine contract: what the frame loop, ``TTS`` and the servers use from a talker, a code predictor, their
embedding tables and a decoder — and nothing they have to discover by probing.

Every engine (llama.cpp, ONNX Runtime, the official PyTorch modules as the parity reference, the tests' fake
engine, a future TensorRT engine or batched scheduler) implements these Protocols and proves it by passing
``tests/test_engine_contract.py``. Optional abilities are *capabilities*: an engine declares them in its
``capabilities`` attribute and :func:`check_engine` verifies them once, at assembly; callers then read the
declaration, never ``hasattr``.

- ``KV_STATE``: the talker can rewind its KV cache and save/restore it (:class:`KVState`). With it, assembly
  wraps the talker in the prompt-prefix cache (``runtime/prefix_cache.py``); without it every prompt is
  prefilled whole (:class:`FreshPromptTalker`).
- ``DECODER_PRIMED_CACHE``: the decoder keeps primed states of recent voice-clone references, can hand one out
  (``primed_state``, saved with a voice) and take one back (``keep_primed``), and can forget them.
- ``ADAPTERS``: the talker (and the predictor) load LoRA adapters once and set them per request
  (``load_adapter``/``set_adapters``; voice packs, ``runtime/engine/adapters.py``).
- ``SEQUENCES``: the talker and the predictor hold several sequences and decode them together (the batch
  scheduler, ``runtime/engine/scheduler.py``, drives them); the decoder can ``fork`` a decoder of its own state
  that shares the loaded model, one per stream.

Rules every engine keeps (the conformance suite checks them):

- ``prefill(a ++ b)`` equals ``prefill(a)`` then ``extend(b)``, and ``reset()`` then ``extend(a)`` equals
  ``prefill(a)``; positions past ``n_ctx`` raise ``ValueError`` (or the engine's own error) before any work.
- A saved KV state is a copy: later steps do not change it (the prefix cache restores it many times).
- A sampled frame takes exactly 15 numbers from ``ResidualSampling.uniforms``, one per residual step in order,
  whether the engine draws on the host or in its graph: a seed then replays the same codes on every engine.
- Arrays an engine passes to a chooser may be buffers reused on the next step: a chooser copies what it keeps.
- Engines are made on one thread and used on another (generation runs on the request's worker thread, the
  decoder on the consumer's), one call at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import Qwen3TTSEdgeError
from ..sampler import GREEDY, ResidualSampling

if TYPE_CHECKING:  # pragma: no cover
    from ..prompt import Prompt

KV_STATE = "kv_state"
DECODER_PRIMED_CACHE = "primed_cache"
SEQUENCES = "sequences"
ADAPTERS = "adapters"
CORE_SHARE = "core_share"  # share_cores(CoreShare): the thread count is chosen per decode call
CAPABILITIES = frozenset({KV_STATE, DECODER_PRIMED_CACHE, SEQUENCES, ADAPTERS, CORE_SHARE})


class EngineContractError(Qwen3TTSEdgeError, TypeError):
    """An engine that does not implement the contract it is used under (a programming error in the engine)."""


@dataclass(frozen=True)
class StepOutput:
    """One talker forward: codec-0 logits (vocab,) and the final-normed hidden state (H,) of the last position."""

    logits: np.ndarray
    hidden: np.ndarray


@dataclass(frozen=True)
class Placement:
    """Where an engine really runs ("cpu" or "gpu"), and why when that differs from what was asked."""

    device: str
    note: str = ""
    requested_gpu_layers: int = 0
    devices: tuple[str, ...] = ()  # the engine's own device names (e.g. ggml backend devices of the build)

    def describe(self) -> str:
        return self.device + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class PrefillReport:
    """What the last prompt prefill did: positions whose KV was known before, and positions computed."""

    reused: int = 0
    prefilled: int = 0


def checked_ids(ids: Any, size: int, what: str) -> np.ndarray:
    """``ids`` as int64 (n,), refused with a clear error unless every one is in [0, size) (embedding lookups)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= size):
        raise ValueError(f"{what} ids must be in [0, {size})")
    return ids


def split_frame_codes(codes: Any, num_steps: int, codebook_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames of codes (T, 1 + num_steps) as codebook 0 (T,) and the checked residual codes (T, num_steps)."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2 or codes.shape[1] != num_steps + 1:
        raise ValueError(f"expected codes of shape (T, {num_steps + 1}), got {codes.shape}")
    return codes[:, 0], checked_ids(codes[:, 1:], codebook_size, "residual").reshape(codes.shape[0], -1)


class TalkerEngine(Protocol):
    """The talker LM with its KV cache: embeddings in, logits + hidden state out. ``n_past`` positions are
    cached; ``n_ctx`` is the room (None: unbounded)."""

    capabilities: frozenset[str]
    hidden_size: int
    placement: Placement

    @property
    def n_past(self) -> int: ...
    @property
    def n_ctx(self) -> int | None: ...
    def reset(self) -> None: ...
    def prefill(self, embeds: np.ndarray) -> StepOutput: ...  # a new sequence
    def extend(self, embeds: np.ndarray) -> StepOutput: ...  # more positions after the cached ones
    def step(self, embed: np.ndarray) -> StepOutput: ...  # one position (H,)


class KVState(Protocol):
    """Capability ``KV_STATE``: rewind to a prefix, save the cached positions, restore them later."""

    def rewind(self, n_past: int) -> None: ...  # keep only the first n_past cached positions
    def save_state(self) -> tuple[int, np.ndarray]: ...
    def load_state(self, state: tuple[int, np.ndarray]) -> None: ...


class PromptTalker(Protocol):
    """What the frame loop drives: one sequence, started from a whole :class:`~runtime.prompt.Prompt`.

    Built once at assembly around a :class:`TalkerEngine` (:func:`prompt_talker`); ``last_prefill`` says
    how much of the last prompt was reused, ``forget`` drops whatever it keeps between requests.
    """

    hidden_size: int
    placement: Placement
    last_prefill: PrefillReport

    @property
    def n_ctx(self) -> int | None: ...
    def prefill(self, prompt: Prompt) -> StepOutput: ...
    def step(self, embed: np.ndarray) -> StepOutput: ...
    def forget(self) -> None: ...


class PredictorEngine(Protocol):
    """The code predictor: 15 residual codes of one frame from the talker's hidden state and code 0."""

    capabilities: frozenset[str]
    placement: Placement

    def predict(self, past_hidden: np.ndarray, c0: int, sampling: ResidualSampling = GREEDY) -> np.ndarray: ...


class EmbeddingTables(Protocol):
    """Host-side input embeddings the prompt builder and the frame loop sum into talker inputs."""

    hidden_size: int

    def text_embeds(self, ids: np.ndarray) -> np.ndarray:
        """Projected text-track vectors P(x), shape (n, H)."""

    def codec_embeds(self, ids: np.ndarray) -> np.ndarray:
        """Talker codec embedding rows E(c), shape (n, H)."""

    def frame_embeds(self, codes: np.ndarray) -> np.ndarray:
        """Per frame, E(c0) + sum of the 15 residual-codebook rows: (T, 16) codes -> (T, H)."""


class DecoderEngine(Protocol):
    """A stateful streaming codec decoder: codes in, the PCM they add out, equal to decoding all at once."""

    capabilities: frozenset[str]
    providers: list[str]

    def reset(self) -> None: ...
    def prime(self, ref_codes: np.ndarray) -> None: ...  # continue after reference audio (voice cloning)
    def decode(self, codes: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class GenerationEngines:
    """A loaded talker + predictor + their tables (what a generation loader returns)."""

    talker: TalkerEngine
    predictor: PredictorEngine
    tables: EmbeddingTables


# What each role must have, beyond its declared capabilities; checked once by check_engine.
REQUIRED: dict[str, tuple[str, ...]] = {
    "talker": ("hidden_size", "placement", "n_past", "n_ctx", "reset", "prefill", "extend", "step"),
    "predictor": ("placement", "predict"),
    "tables": ("hidden_size", "text_embeds", "codec_embeds", "frame_embeds"),
    "decoder": ("providers", "reset", "prime", "decode"),
}
CAPABILITY_METHODS: dict[str, tuple[str, ...]] = {
    KV_STATE: ("rewind", "save_state", "load_state"),
    DECODER_PRIMED_CACHE: ("forget_primed", "primed_state", "keep_primed"),
    ADAPTERS: ("load_adapter", "set_adapters"),
    CORE_SHARE: ("share_cores",),
}
# SEQUENCES asks for different methods in each role.
ROLE_CAPABILITY_METHODS: dict[tuple[str, str], tuple[str, ...]] = {
    ("talker", SEQUENCES): ("sequences", "decode_sequences", "seq_remove", "seq_state", "set_seq_state"),
    ("predictor", SEQUENCES): ("sequences", "predict_many"),
    ("decoder", SEQUENCES): ("fork",),
}


def capabilities(engine: Any) -> frozenset[str]:
    """The capabilities ``engine`` declares (none when it declares nothing)."""
    return frozenset(getattr(engine, "capabilities", None) or ())  # an instance may narrow its class's set


def check_engine(role: str, engine: Any) -> frozenset[str]:
    """Verify once that ``engine`` can play ``role`` and has what its declared capabilities promise.

    Returns the declared capabilities; raises :class:`EngineContractError` naming what is missing.
    """
    declared = capabilities(engine)
    unknown = sorted(declared - CAPABILITIES)
    if unknown:
        raise EngineContractError(f"{type(engine).__name__} declares unknown capabilities {unknown}; known: "
                                  f"{sorted(CAPABILITIES)}")
    wanted: list[str] = list(REQUIRED[role])
    for cap in sorted(declared):
        wanted += ROLE_CAPABILITY_METHODS.get((role, cap), CAPABILITY_METHODS.get(cap, ()))
    missing = [name for name in wanted if not _has(engine, name)]
    if missing:
        raise EngineContractError(f"{type(engine).__name__} cannot be a {role} engine: it lacks {missing} "
                                  "(runtime/engine/contract.py lists what each role needs)")
    return declared


def _has(engine: Any, name: str) -> bool:
    if isinstance(getattr(type(engine), name, None), property):
        return True
    try:
        getattr(engine, name)
    except AttributeError:
        return False
    return True


class FreshPromptTalker:
    """A :class:`PromptTalker` over a talker without ``KV_STATE``: every prompt is prefilled whole."""

    def __init__(self, engine: TalkerEngine) -> None:
        self.inner = engine
        self.hidden_size = engine.hidden_size
        self.placement = engine.placement
        self.last_prefill = PrefillReport()

    @property
    def n_ctx(self) -> int | None:
        return self.inner.n_ctx

    def prefill(self, prompt: Prompt) -> StepOutput:
        out = self.inner.prefill(prompt.embeds)
        self.last_prefill = PrefillReport(reused=0, prefilled=len(prompt.embeds))
        return out

    def step(self, embed: np.ndarray) -> StepOutput:
        return self.inner.step(embed)

    def forget(self) -> None:
        self.inner.reset()


def prompt_talker(engine: TalkerEngine, *, prefix_cache: bool = True, cache_bytes: int | None = None) -> PromptTalker:
    """The frame loop's talker for ``engine``: the prefix cache when the engine has ``KV_STATE`` (and the cache is
    wanted), else whole-prompt prefills. Checks the engine against the contract first."""
    from ..prefix_cache import DEFAULT_CACHE_BYTES, PrefixReusingTalker

    if isinstance(engine, PrefixReusingTalker | FreshPromptTalker):
        return engine
    declared = check_engine("talker", engine)
    if prefix_cache and KV_STATE in declared:
        return PrefixReusingTalker(engine, cache_bytes=DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes)
    return FreshPromptTalker(engine)


def describe_placements(engines: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """Role -> where it runs, from the engines' placements (the decoder: its providers)."""
    out = {}
    for role, engine in engines:
        out[role] = ",".join(engine.providers) if role == "decoder" else engine.placement.describe()
    return out
