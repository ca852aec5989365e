"""``assemble(bundle, config) -> Engines``: precisions chosen, engines loaded and checked against the contract.

What used to happen inside ``TTS.__init__`` happens here, once: pick each stage's precision from what the
bundle holds (``specs.py`` preference), map the component's format to its engine, load it with the config's
threads/devices, warn when a requested GPU is not used, check every engine against the contract, and give
the frame loop its talker (the prompt-prefix cache when the engine has ``KV_STATE``). Stages load on first use,
so ``voice create`` runs the two voice encoders without loading the generation engine.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterable
from importlib import import_module
from typing import Any

from ..bundle import Bundle, BundleError
from .config import EngineConfig
from .contract import (
    ADAPTERS,
    CORE_SHARE,
    DECODER_PRIMED_CACHE,
    SEQUENCES,
    GenerationEngines,
    PromptTalker,
    capabilities,
    check_engine,
    describe_placements,
    prompt_talker,
)
from .lanes import BatchedLanes, Lane, LanePool, SingleLane
from .specs import GENERATION_ENGINES, STAGE_ROLE, preference, spec_for_format, specs_for

GENERATION = "generation"
DECODER = "decoder"
SPEAKER_ENCODER = "speaker_encoder"
CODEC_ENCODER = "codec_encoder"
SPEAKING_STAGES = (GENERATION, DECODER)


def pick_precision(bundle: Bundle, role: str, wanted: str | None, prefer: Iterable[str], fmt: str | None = None,
                   engine: str | None = None) -> str:
    """The precision of ``role`` to load: ``wanted`` if the bundle has it, else the first preferred one among those
    the export was asked for (an int8 decoder's export also keeps the fp32 one it was made from, marked
    ``requested: false``; the user meant int8), else the first preferred one it has."""
    found = [c for c in bundle.manifest.find(role) if fmt is None or c.format == fmt]
    have = [c.precision for c in found]
    if not have:
        if engine:
            raise BundleError(f"bundle {bundle.root} has no {role} for the {engine} backend; export one with "
                              f"`qwen3-tts-edge export MODEL -o {bundle.root} --force --backend {engine}`")
        raise BundleError(f"bundle {bundle.root} has no {role}; export it with `qwen3-tts-edge export MODEL -o "
                          f"{bundle.root} --force --talker q8_0 --decoder fp32`")
    if wanted is not None:
        if wanted not in have:
            on = f" for the {engine} backend" if engine else ""
            raise BundleError(f"bundle has no {role} in precision {wanted!r}{on}; available: {sorted(have)}")
        return wanted
    asked = [c.precision for c in found if (c.meta or {}).get("requested", True)] or have
    return next((p for p in prefer if p in asked), asked[0])


def load_stage(stage: str, bundle: Bundle, precision: str, **settings: Any) -> Any:
    """Load ``stage`` of ``bundle`` at ``precision`` with the engine its component's format names."""
    component = bundle.manifest.component(STAGE_ROLE[stage], precision)
    spec = spec_for_format(stage, component.format)
    if spec is None:
        formats = ", ".join(s.format for s in specs_for(stage))
        raise BundleError(f"no engine for a {component.format!r} {STAGE_ROLE[stage]} ({component.file}); this "
                          f"runtime runs {formats}")
    module, func = spec.loader.split(":")
    return getattr(import_module(module), func)(bundle, precision, **settings)


class Engines:
    """A bundle's engines under one config: precisions resolved at once, each stage loaded on first use.

    ``talker`` is the frame loop's :class:`~runtime.engine.contract.PromptTalker` (``generation.talker`` is the
    raw engine under it). Build it with :func:`assemble`, or :meth:`from_parts` for engines made elsewhere (the
    PyTorch reference, the tests' fake engine).
    """

    def __init__(self, bundle: Bundle, config: EngineConfig) -> None:
        self.bundle, self.config = bundle, config
        self.name: str | None = None
        self.talker_precision = self.predictor_precision = None
        self.decoder_precision: str | None = None
        self._generation: GenerationEngines | None = None
        self._talker: PromptTalker | None = None
        self._decoder: Any = None
        self._encoders: dict[str, Any] = {}
        self._lanes: LanePool | None = None
        self._lanes_lock = threading.Lock()
        self.decoder_capabilities: frozenset[str] = frozenset()
        self._adapters: Any = None  # AdapterCache when the engines take voice packs (ADAPTERS)
        self._keys_adapters = False

    # -- precisions --------------------------------------------------------------------------------------------

    def _resolve(self) -> None:
        """Choose the talker/predictor engine and precisions and the decoder precision (cheap; no loading)."""
        cfg, m = self.config, self.bundle.manifest
        fmt = GENERATION_ENGINES[cfg.backend].format if cfg.backend else None
        self.talker_precision = pick_precision(self.bundle, "talker", cfg.talker_precision, preference(GENERATION),
                                               fmt, cfg.backend)
        talker_format = m.component("talker", self.talker_precision).format
        self.name = next(s.name for s in specs_for(GENERATION) if s.format == talker_format)
        # The predictor is most of the generation time and fidelity, so it can be paired separately (default:
        # the talker's precision), from the same engine, which runs both.
        self.predictor_precision = pick_precision(self.bundle, "predictor", cfg.predictor_precision or
                                                  self.talker_precision, preference(GENERATION), talker_format,
                                                  self.name)
        if cfg.max_batch > 1 and not GENERATION_ENGINES[self.name].sequences:
            batching = ", ".join(s.name for s in specs_for(GENERATION) if s.sequences)
            raise BundleError(f"max_batch {cfg.max_batch} needs a generation engine that batches requests "
                              f"({batching}); the {self.name} engine runs one request at a time: use max_batch 1 "
                              f"or a {batching} talker precision")
        self._resolve_decoder()

    def _resolve_decoder(self) -> None:
        self.decoder_precision = pick_precision(self.bundle, "decoder", self.config.decoder_precision,
                                                preference(DECODER))

    # -- stages ------------------------------------------------------------------------------------------------

    def load(self, *stages: str) -> Engines:
        """Load ``stages`` now (those already loaded are kept)."""
        for stage in stages:
            if stage == GENERATION:
                self.generation  # noqa: B018 - loads it
            elif stage == DECODER:
                self.decoder  # noqa: B018 - loads it
            else:
                self.encoder(stage)
        return self

    @property
    def generation(self) -> GenerationEngines:
        if self._generation is None:
            cfg = self.config
            engines = load_stage(GENERATION, self.bundle, self.talker_precision,
                                 predictor_precision=self.predictor_precision, **cfg.loader_settings())
            self._set_generation(engines)
            for role, engine in (("talker", engines.talker), ("predictor", engines.predictor)):
                if cfg.n_gpu_layers and engine.placement.device != "gpu":
                    warnings.warn(f"{role}: {cfg.n_gpu_layers} GPU layers requested but it runs on the CPU "
                                  f"({engine.placement.note or 'this llama-cpp-python build has no GPU backend'})",
                                  RuntimeWarning, stacklevel=4)
        return self._generation

    def _set_generation(self, engines: GenerationEngines) -> None:
        check_engine("predictor", engines.predictor)
        check_engine("tables", engines.tables)
        self._talker = prompt_talker(engines.talker, prefix_cache=self.config.prefix_cache,
                                     cache_bytes=self.config.voice_cache_bytes)
        if ADAPTERS in capabilities(engines.talker) and ADAPTERS in check_engine("predictor", engines.predictor):
            from ..prefix_cache import PrefixReusingTalker
            from .adapters import AdapterCache

            self._adapters = AdapterCache(engines.talker, engines.predictor)
            self._keys_adapters = isinstance(self._talker, PrefixReusingTalker)  # its KV cache keys on them
        self._generation = engines

    @property
    def adapters(self) -> Any:
        """The voice-pack adapter cache (loads the generation engine); refuses, with why, where packs cannot run."""
        from ..voices.voice_pack import VoicePackError

        self.generation  # noqa: B018 - loads it
        if self._adapters is None:
            raise VoicePackError(f"the {self.name} engine cannot apply voice packs (LoRA adapters); voice packs run on "
                                 "the llama.cpp engine: load a GGUF talker precision (--backend llama.cpp)")
        return self._adapters

    def use_pack(self, pack: Any, scale: float, lane: Lane | None = None) -> None:
        """A request's voice pack (None: the base model) for the request about to run on ``lane``: set on the
        engines (one request at a time) or on the lane's sequence (batched: the scheduler groups streams by
        set), with the talker's KV cache keyed on it. Engines without adapters only ever run the base model
        (packs were refused at planning)."""
        if self._adapters is None:
            if pack is not None:
                self.adapters  # noqa: B018 - raises with why
            return
        if lane is not None and lane.seq is not None:
            self.lanes.use_adapters(lane, self._adapters.acquire(pack, scale))
            return
        key = self._adapters.activate(pack, scale)
        if self._keys_adapters:
            self._talker.use_adapter_key(key)

    @property
    def talker(self) -> PromptTalker:
        self.generation  # noqa: B018 - loads it
        return self._talker

    @property
    def predictor(self) -> Any:
        return self.generation.predictor

    @property
    def tables(self) -> Any:
        return self.generation.tables

    @property
    def generation_loaded(self) -> bool:
        return self._generation is not None

    @property
    def loaded(self) -> tuple[str, ...]:
        """The stages loaded so far (what this process holds in memory)."""
        return tuple(stage for stage, engine in ((GENERATION, self._generation), (DECODER, self._decoder),
                                                 *self._encoders.items()) if engine is not None)

    @property
    def decoder(self) -> Any:
        if self._decoder is None:
            self._set_decoder(load_stage(DECODER, self.bundle, self.decoder_precision,
                                         providers=list(self.config.providers) if self.config.providers else None,
                                         threads=self.config.decoder_threads))
        return self._decoder

    def _set_decoder(self, decoder: Any) -> None:
        self.decoder_capabilities = check_engine("decoder", decoder)
        self._decoder = decoder

    def encoder(self, stage: str) -> Any:
        """A voice encoder (``speaker_encoder`` or ``codec_encoder``), loaded on first use."""
        if stage not in (SPEAKER_ENCODER, CODEC_ENCODER):
            raise ValueError(f"unknown stage {stage!r}")
        if stage not in self._encoders:
            self._encoders[stage] = load_stage(stage, self.bundle, "fp32", threads=self.config.threads)
        return self._encoders[stage]

    @property
    def lanes(self) -> LanePool:
        """What requests run on: one lane (these engines, one request at a time) or, with ``max_batch`` > 1, a
        sequence each of a batch scheduler over them (``runtime/engine/lanes.py``)."""
        with self._lanes_lock:
            if self._lanes is None:
                cfg = self.config
                self._lanes = self._single_lane(cfg) if cfg.max_batch == 1 else self._batched_lanes(cfg)
            return self._lanes

    def _core_share(self, cfg: EngineConfig) -> Any:
        """A :class:`~runtime.engine.cores.CoreShare` set on generation's engines when their and the decoder's
        threads outnumber the cores (``runtime/engine/cores.py``: why), or None: sharing is off, an engine
        cannot narrow per call, or everything fits at once."""
        from .cores import CoreShare, usable_cores

        gen = self.generation
        engines = (gen.talker, gen.predictor)
        if not cfg.share_cores or not all(CORE_SHARE in capabilities(e) for e in engines):
            return None
        share = CoreShare.for_threads(cfg.threads or usable_cores(), cfg.decoder_threads)
        if share is not None:
            for engine in engines:
                engine.share_cores(share)
        return share

    def _single_lane(self, cfg: EngineConfig) -> LanePool:
        share = self._core_share(cfg)
        if share is None:
            return SingleLane(self.talker, self.predictor, self.decoder)
        return SingleLane(self.talker, self.predictor, self.decoder, decoding=share.decoding,
                          announcing=share.announcing)

    def _batched_lanes(self, cfg: EngineConfig) -> LanePool:
        from .cores import CoreTurns
        from .scheduler import BatchScheduler

        gen, decoder = self.generation, self.decoder
        for role, engine in (("talker", gen.talker), ("predictor", gen.predictor), ("decoder", decoder)):
            if SEQUENCES not in capabilities(engine):
                raise BundleError(f"max_batch {cfg.max_batch}: the {role} engine ({type(engine).__name__}) cannot "
                                  "hold several streams (no SEQUENCES capability); use max_batch 1")
        # While no engine call runs, the cores generation uses are the decoders': as many decode at once as fit.
        # A lone stream shares the cores instead of taking turns (the same share a single lane uses).
        cores = cfg.threads or os.cpu_count() or 1
        share = self._core_share(cfg)
        turns = CoreTurns(decoders=max(1, cores // cfg.decoder_threads), share=share,
                          streams=(lambda: scheduler.active) if share is not None else None)
        scheduler = BatchScheduler(gen.talker, gen.predictor, max_batch=cfg.max_batch, turns=turns,
                                   adapters=self._adapters)
        return BatchedLanes(scheduler, decoder, prefix_cache=cfg.prefix_cache, cache_bytes=cfg.voice_cache_bytes)

    @property
    def scheduler(self) -> Any:
        """The batch scheduler (None with ``max_batch`` 1)."""
        return getattr(self.lanes, "scheduler", None)

    # -- what callers ask --------------------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int | None:
        """The talker's context (None: unbounded); loads the generation engine."""
        ctx = self.talker.n_ctx
        return int(ctx) if ctx else None

    def forget(self) -> None:
        """Drop cached voice state: the talker's prompt prefixes and, where the decoder keeps them, primed states."""
        if self._talker is not None and self.config.max_batch == 1:
            self._talker.forget()  # batched: requests never use it, and resetting it would clear every sequence
        if self._lanes is not None:
            self._lanes.forget()
        if self._decoder is not None and DECODER_PRIMED_CACHE in self.decoder_capabilities:
            self._decoder.forget_primed()

    def devices(self) -> dict[str, str]:
        """Where each loaded stage actually runs (fallbacks included)."""
        parts = []
        if self._generation is not None:
            parts += [("talker", self._generation.talker), ("predictor", self._generation.predictor)]
        if self._decoder is not None:
            parts.append(("decoder", self._decoder))
        return describe_placements(parts)

    @classmethod
    def from_parts(cls, bundle: Bundle, generation: GenerationEngines, *, decoder: Any = None, name: str = "custom",
                   config: EngineConfig | None = None) -> Engines:
        """Engines made by the caller (the PyTorch reference, a fake engine): checked against the contract; the
        decoder is the bundle's unless given."""
        self = cls(bundle, config or EngineConfig())
        self.name = self.talker_precision = self.predictor_precision = name
        self._set_generation(generation)
        if decoder is not None:
            self._set_decoder(decoder)
            self.decoder_precision = name
        else:
            self._resolve_decoder()
        return self


def batches(bundle: Bundle, config: EngineConfig) -> bool:
    """Whether the generation engine ``config`` picks for ``bundle`` can run ``max_batch`` > 1 (nothing is loaded).

    Its spec row says whether the engine batches; ONNX graphs gained their batch axis in graph format 2, so an
    ONNX talker must also say so in its manifest entry (``batch_axis``; bundles exported before do not batch)."""
    engines = Engines(bundle, EngineConfig.build(config, max_batch=1))
    engines._resolve()
    spec = GENERATION_ENGINES[engines.name]
    if not spec.sequences:
        return False
    meta = bundle.manifest.component("talker", engines.talker_precision).meta or {}
    return bool(meta.get("batch_axis", spec.format != "onnx"))


def assemble(bundle: Bundle, config: EngineConfig | None = None, *, load: Iterable[str] = SPEAKING_STAGES) -> Engines:
    """The engines of ``bundle`` under ``config``; ``load``: stages to load now (the rest load on first use).

    Precisions are resolved before anything loads, so a wrong name fails at once with what the bundle has.
    """
    engines = Engines(bundle, config or EngineConfig())
    engines._resolve()
    return engines.load(*load)
