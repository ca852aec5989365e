"""One row per engine: which bundle components it runs, in which precisions, how it is loaded and exported.

The bundle contract (``runtime/bundle.py``) names roles and files; this table says which engine turns which
component format into a running stage. The runtime's loaders (:func:`runtime.engine.assemble`), the export
(``export/build.py`` reads ``exporter`` and ``precisions``), the CLI's help and the bench all read it, so a
new engine or precision is one row here (plus its policy row and gate in ``quant/``). Pure data: importing it
loads no engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...quant.gguf_policy import PRECISIONS as GGUF_PRECISIONS

# Which bundle role decides the engine of each stage.
STAGE_ROLE = {"generation": "talker", "decoder": "decoder", "speaker_encoder": "speaker_encoder",
              "codec_encoder": "codec_encoder"}


@dataclass(frozen=True)
class EngineSpec:
    """An engine for one stage: ``stage`` + ``name`` is the key; ``format`` is its components' format."""

    stage: str  # generation (talker + predictor + tables), decoder, speaker_encoder, codec_encoder
    name: str  # what --backend names (generation); the runtime that runs it
    format: str  # component format in the manifest
    precisions: tuple[str, ...]  # what export can write, in display order
    default: tuple[str, ...]  # what export writes when no precision is named
    preference: tuple[str, ...]  # what the runtime loads when the caller names none, best first
    loader: str  # "module:function" taking (bundle, precision, **settings); imported only when used
    exporter: str  # the export stage (export/build.py STAGES) that writes its components
    sequences: bool = False  # generation: its loader takes ``sequences=`` (continuous batching, max_batch > 1)

    def __post_init__(self) -> None:
        if self.stage not in STAGE_ROLE:
            raise ValueError(f"unknown stage {self.stage!r}")
        stray = set(self.default) - set(self.precisions)
        if stray:
            raise ValueError(f"{self.name}: default precisions {sorted(stray)} are not among its precisions")


ENGINE_SPECS: tuple[EngineSpec, ...] = (
    # llama.cpp first: the CPU default (bench/README: it beats the ONNX generation graphs on CPUs at matched
    # fidelity). Its precisions are the per-tensor policies of quant/gguf_policy.py.
    EngineSpec("generation", "llama.cpp", "gguf", GGUF_PRECISIONS, ("q8_0",),
               ("q8_0", "f16", "bf16", "q5_k_m", "q4_k_m", "f32"),
               "qwen3_tts_edge.runtime.backends.llama_cpp:load_generation", "talker", sequences=True),
    # ONNX Runtime talker + fused 15-step predictor (CPU, CUDA or TensorRT providers); int8/int4 are weight-only
    # MatMulNBits (quant/onnx_policy.py). Names differ from the GGUF ones (fp32 vs f32), so one --talker list
    # can name precisions of both engines and a bundle can hold both.
    EngineSpec("generation", "onnxruntime", "onnx", ("fp32", "int8", "int4"), ("fp32",), ("fp32", "int8", "int4"),
               "qwen3_tts_edge.runtime.backends.onnxruntime.generation:load_generation_onnx", "talker_onnx",
               sequences=True),
    # The stateful streaming decoder; the fp32 graph is the reference the others are gated on.
    EngineSpec("decoder", "onnxruntime", "onnx", ("fp32", "fp16", "int8"), ("fp32",), ("fp32", "int8", "fp16"),
               "qwen3_tts_edge.runtime.backends.onnxruntime:load_decoder", "decoder"),
    # Voice encoders (Base models only) stay fp32: reduced precision drifts the timbre.
    EngineSpec("speaker_encoder", "onnxruntime", "onnx", ("fp32",), ("fp32",), ("fp32",),
               "qwen3_tts_edge.runtime.voices.speaker:load_speaker_encoder", "speaker_encoder"),
    EngineSpec("codec_encoder", "onnxruntime", "onnx", ("fp32",), ("fp32",), ("fp32",),
               "qwen3_tts_edge.runtime.voices.codec:load_codec_encoder", "codec_encoder"),
)

# The generation engines by name (what `export --backend` and `speak --backend` take).
GENERATION_ENGINES: dict[str, EngineSpec] = {s.name: s for s in ENGINE_SPECS if s.stage == "generation"}


def specs_for(stage: str) -> tuple[EngineSpec, ...]:
    """Every engine of ``stage``, in preference order."""
    return tuple(s for s in ENGINE_SPECS if s.stage == stage)


def spec_for_format(stage: str, fmt: str) -> EngineSpec | None:
    """The engine that runs a ``fmt`` component of ``stage`` (None: no engine here does)."""
    return next((s for s in ENGINE_SPECS if s.stage == stage and s.format == fmt), None)


def precisions(stage: str) -> tuple[str, ...]:
    """Every precision some engine of ``stage`` can be exported in, in table order."""
    return tuple(dict.fromkeys(p for s in specs_for(stage) for p in s.precisions))


def preference(stage: str) -> tuple[str, ...]:
    """Runtime preference over all engines of ``stage`` (earlier engines first)."""
    return tuple(dict.fromkeys(p for s in specs_for(stage) for p in s.preference))


def exporter_precisions() -> dict[str, tuple[str, ...]]:
    """Export stage -> the precisions it can write (``export/build.py`` STAGES)."""
    return {s.exporter: s.precisions for s in ENGINE_SPECS}


# What a plain `export` writes, per bundle role: a bundle that speaks on any CPU, plus the voice encoders for
# Base models.
DEFAULT_EXPORT: dict[str, tuple[str, ...]] = {
    "talker": GENERATION_ENGINES["llama.cpp"].default,
    **{stage: specs_for(stage)[0].default for stage in ("decoder", "speaker_encoder", "codec_encoder")},
}
