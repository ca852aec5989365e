"""``EngineConfig``: every setting that decides which engines a ``TTS`` loads and how they run, in one record.

``TTS``, ``AsyncTTS``, the servers, the agent plugins, ``bench`` and ``parity`` all take one, and the CLI's
engine flags are generated from its fields (:func:`add_engine_arguments`), so ``speak``, ``serve``,
``wyoming``, ``bench`` and ``parity`` cannot drift apart.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..checks import require_int
from .specs import GENERATION_ENGINES

# Talker context (positions) an engine reserves by default: it holds a segment of ~200 text tokens with its
# frames (long text is split to fit) and a 30 s voice-clone reference. The KV cache is allocated up front, so
# a larger context costs resident memory for no audible gain (bench/README, "Where the memory goes").
TALKER_CONTEXT = 2048
# The decoder runs on the consumer's thread while generation runs on the others: one thread keeps up with
# real time and leaves the remaining cores to generation (bench/README, "Thread placement").
DEFAULT_DECODER_THREADS = 1
# Saved voice prefixes (talker KV of a voice's prompt part) kept per engine, least recently used dropped first.
DEFAULT_CACHE_BYTES = 64 * 2**20


def _flag(flag: str, help: str, **argparse_kw: Any) -> dict[str, Any]:
    return {"flag": flag, "help": help, "argparse": argparse_kw}


def _int_at_least(minimum: int, what: str):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = None
        if n is None or n < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} integer, got {value!r}")
        return n
    return parse


positive_int = _int_at_least(1, "a positive")  # argparse types for the engine flags (and the servers' own)
non_negative_int = _int_at_least(0, "a non-negative")


@dataclass(frozen=True)
class EngineConfig:
    """Which engines and precisions to load from a bundle, and their threads, devices, caches and queue.

    ``None`` precisions take the bundle's preferred one (``runtime/engine/specs.py``); ``backend`` None takes
    the engine of the chosen talker precision. Validated on construction, so a bad value fails before any
    engine loads.
    """

    backend: str | None = field(default=None, metadata=_flag(
        "--backend", "talker + predictor engine (default: the engine of the talker precision chosen)",
        choices=tuple(GENERATION_ENGINES)))
    talker_precision: str | None = field(default=None, metadata=_flag(
        "--talker-precision", "talker precision in the bundle (a GGUF or ONNX precision; default: its preferred "
        "one)"))
    predictor_precision: str | None = field(default=None, metadata=_flag(
        "--predictor-precision", "code-predictor precision if other than the talker's (e.g. q8_0 beside a q4_k_m "
        "talker; same engine)"))
    predictor_heads: str | None = field(default=None, metadata=_flag(
        "--predictor-heads", "the llama.cpp code predictor's output heads: int8 (a bundle exported with "
        "--predictor-heads int8; its default then) or f32 (the tables' own)", choices=("f32", "int8")))
    decoder_precision: str | None = field(default=None, metadata=_flag(
        "--decoder-precision", "decoder ONNX precision in the bundle"))
    threads: int | None = field(default=None, metadata=_flag(
        "--threads", "CPU threads for generation and the voice encoders (default: all cores)", type=positive_int))
    decoder_threads: int = field(default=DEFAULT_DECODER_THREADS, metadata=_flag(
        "--decoder-threads", f"CPU threads for the ONNX decoder (default: {DEFAULT_DECODER_THREADS})",
        type=positive_int))
    share_cores: bool = field(default=True, metadata=_flag(
        "--no-share-cores", "one stream (also a batching server's lone request): keep llama.cpp on all its threads "
        "while the decoder decodes (by default it narrows to the cores the decoder leaves when both together "
        "outnumber the cores)",
        action="store_false", dest="share_cores"))
    providers: tuple[str, ...] | None = field(default=None, metadata=_flag(
        "--provider", "onnxruntime execution provider, best first (repeatable; default: the best available)",
        action="append", dest="providers", metavar="EP"))
    n_gpu_layers: int = field(default=0, metadata=_flag(
        "--n-gpu-layers", "llama.cpp layers to offload (GPU builds of llama.cpp)", type=non_negative_int))
    n_ctx: int = field(default=TALKER_CONTEXT, metadata=_flag(
        "--n-ctx", f"talker context in positions (default {TALKER_CONTEXT}; long text is split to fit)",
        type=positive_int))
    prefix_cache: bool = field(default=True, metadata=_flag(
        "--no-prefix-cache", "prefill every prompt whole (no KV reuse between requests)",
        action="store_false", dest="prefix_cache"))
    voice_cache_bytes: int = field(default=DEFAULT_CACHE_BYTES, metadata=_flag(
        "--voice-cache-mb", f"memory for saved voice prompt prefixes (default {DEFAULT_CACHE_BYTES >> 20} MB)",
        type=non_negative_int, metavar="MB"))
    max_batch: int = field(default=1, metadata=_flag(
        "--max-batch", "requests that share one engine at once, batched frame by frame (llama.cpp backend; "
        "default 1: one at a time, the rest wait; the servers batch 4)", type=positive_int))
    max_queued_frames: int = 64  # frames generation may run ahead of the decoder (back-pressure)
    verify: bool = True  # sha256 of every bundle file on load

    def __post_init__(self) -> None:
        if self.backend is not None and self.backend not in GENERATION_ENGINES:
            raise ValueError(f"unknown backend {self.backend!r}; choose from {', '.join(GENERATION_ENGINES)}")
        for name in ("talker_precision", "predictor_precision", "decoder_precision"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise ValueError(f"{name} must be a precision name or None, got {value!r}")
        require_int("threads", self.threads, minimum=1, optional=True)
        require_int("decoder_threads", self.decoder_threads, minimum=1)
        require_int("n_gpu_layers", self.n_gpu_layers)
        require_int("n_ctx", self.n_ctx, minimum=1)
        require_int("voice_cache_bytes", self.voice_cache_bytes)
        require_int("max_queued_frames", self.max_queued_frames, minimum=1)
        require_int("max_batch", self.max_batch, minimum=1)
        if self.providers is not None:
            if isinstance(self.providers, str) or not all(isinstance(p, str) and p for p in self.providers):
                raise ValueError(f"providers must be a list of onnxruntime provider names, got {self.providers!r}")
            object.__setattr__(self, "providers", tuple(self.providers))

    @classmethod
    def build(cls, config: EngineConfig | None = None, **settings: Any) -> EngineConfig:
        """``config`` (default: the defaults) with flat ``settings`` applied; unknown names are refused."""
        base = config or cls()
        unknown = sorted(set(settings) - set(cls.field_names()))
        if unknown:
            raise TypeError(f"unknown engine settings {unknown}; choose from {', '.join(cls.field_names())}")
        if "decoder_threads" in settings and settings["decoder_threads"] is None:
            settings["decoder_threads"] = DEFAULT_DECODER_THREADS
        return replace(base, **settings) if settings else base

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_args(cls, args: argparse.Namespace, **settings: Any) -> EngineConfig:
        """The config the flags of :func:`add_engine_arguments` describe (absent flags keep the defaults)."""
        given = {name: getattr(args, name) for name in cls.field_names()
                 if getattr(args, name, None) is not None}
        if "voice_cache_bytes" in given:  # the flag is in MB
            given["voice_cache_bytes"] = int(given["voice_cache_bytes"]) << 20
        return cls.build(**{**given, **settings})

    def loader_settings(self) -> dict[str, Any]:
        """Keyword settings for the generation loaders (runtime/engine/specs.py ``loader``)."""
        settings = {"n_ctx": self.n_ctx, "threads": self.threads, "n_gpu_layers": self.n_gpu_layers,
                    "predictor_heads": self.predictor_heads,
                    "providers": list(self.providers) if self.providers else None}
        if self.max_batch > 1:
            settings["sequences"] = self.max_batch
        return settings


def add_engine_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                         skip: Iterable[str] = (), defaults: dict[str, Any] | None = None) -> None:
    """Add one flag per :class:`EngineConfig` field that has one (``skip``: field names a command sets itself).

    ``defaults`` changes a flag's default for one command (e.g. ``bench`` pins ``threads``); read the result
    back with :meth:`EngineConfig.from_args`.
    """
    skip, defaults = set(skip), dict(defaults or {})
    for f in fields(EngineConfig):
        meta = f.metadata
        if not meta or f.name in skip:
            continue
        kw = dict(meta["argparse"])
        kw.setdefault("dest", f.name)
        help_text = meta["help"]
        if f.name in defaults:
            kw["default"] = defaults[f.name]
            help_text += f" [this command: {defaults[f.name]}]"
        elif kw.get("action") not in ("store_false", "store_true"):
            kw["default"] = None
        parser.add_argument(meta["flag"], help=help_text, **kw)
