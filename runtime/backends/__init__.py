"""Engines behind one contract: what the frame loop and ``TTS`` need from a talker, a code predictor, their
embedding tables and a decoder, and the table that says which engine loads which bundle component.

A new engine (say TensorRT) is one sub-package here that implements these Protocols, one row in
:data:`LOADERS`, and one export stage that writes its files. ``llama_cpp/`` runs the GGUF talker and
predictor; ``onnxruntime/`` runs the streaming ONNX decoder and the ONNX talker + fused predictor (CPU, CUDA
or TensorRT execution providers); the official PyTorch modules
(``export/torch_reference.py``) implement the same Protocols as the parity reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any, Protocol

import numpy as np

from ..bundle import Bundle, BundleError

# Talker context (positions) an engine reserves by default. 2048 holds a segment of ~200 text tokens with its
# frames (long text is split to fit) and a 30 s voice-clone reference; the KV cache is allocated up front, so
# 4096 cost 235 MB more resident memory on 0.6B (470 vs 235 MB of f16 KV) for no audible gain (bench/README).
TALKER_CONTEXT = 2048


def greedy(_step: int, logits: np.ndarray) -> int:
    """The argmax chooser for ``PredictorBackend.predict`` (what the sampler reduces to without sampling); an
    engine that can take the argmax itself (the fused ONNX predictor) recognises this function."""
    return int(np.argmax(logits))


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


class TalkerBackend(Protocol):
    """The talker LM with its KV cache. ``n_past`` positions are cached; ``n_ctx`` is the room (None: unbounded)."""

    hidden_size: int
    placement: Placement

    @property
    def n_past(self) -> int: ...
    @property
    def n_ctx(self) -> int | None: ...
    def reset(self) -> None: ...
    def prefill(self, embeds: np.ndarray) -> StepOutput: ...
    def extend(self, embeds: np.ndarray) -> StepOutput: ...  # more positions after the cached ones
    def step(self, embed: np.ndarray) -> StepOutput: ...
    def rewind(self, n_past: int) -> None: ...  # keep only the first n_past cached positions (prefix reuse)


class PredictorBackend(Protocol):
    """The code predictor: 15 residual codes of one frame from the talker's hidden state and code 0."""

    placement: Placement

    def predict(self, past_hidden: np.ndarray, c0: int, choose: Any) -> np.ndarray: ...


class EmbeddingTables(Protocol):
    """Host-side input embeddings the prompt builder and the frame loop sum into talker inputs."""

    hidden_size: int

    def text_embeds(self, ids: np.ndarray) -> np.ndarray:
        """Projected text-track vectors P(x), shape (n, H)."""

    def codec_embeds(self, ids: np.ndarray) -> np.ndarray:
        """Talker codec embedding rows E(c), shape (n, H)."""

    def frame_embeds(self, codes: np.ndarray) -> np.ndarray:
        """Per frame, E(c0) + sum of the 15 residual-codebook rows: (T, 16) codes -> (T, H)."""


class DecoderBackend(Protocol):
    """A stateful streaming codec decoder: codes in, the PCM they add out, equal to decoding all at once."""

    providers: list[str]

    def reset(self) -> None: ...
    def prime(self, ref_codes: np.ndarray) -> None: ...  # continue after reference audio (voice cloning)
    def decode(self, codes: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class GenerationEngines:
    """A loaded talker + predictor + their tables (what a generation loader returns)."""

    talker: TalkerBackend
    predictor: PredictorBackend
    tables: EmbeddingTables


# (stage, component format) -> "module:function" that loads it from a bundle. Imported only when used, so a
# CPU install never imports a GPU engine. Generation loaders take (bundle, precision, **settings) and return
# GenerationEngines; decoder loaders take (bundle, precision, **settings) and return a DecoderBackend.
LOADERS: dict[tuple[str, str], str] = {
    ("generation", "gguf"): "qwen3_tts_edge.runtime.backends.llama_cpp:load_generation",
    ("generation", "onnx"): "qwen3_tts_edge.runtime.backends.onnxruntime.generation:load_generation_onnx",
    ("decoder", "onnx"): "qwen3_tts_edge.runtime.backends.onnxruntime:load_decoder",
    ("speaker_encoder", "onnx"): "qwen3_tts_edge.runtime.voices.speaker:load_speaker_encoder",
    ("codec_encoder", "onnx"): "qwen3_tts_edge.runtime.voices.codec:load_codec_encoder",
}
# Which bundle role decides the engine of each stage.
STAGE_ROLE = {"generation": "talker", "decoder": "decoder", "speaker_encoder": "speaker_encoder",
              "codec_encoder": "codec_encoder"}


def load(stage: str, bundle: Bundle, precision: str, **settings: Any) -> Any:
    """Load ``stage`` of ``bundle`` at ``precision`` with the engine its component's format names."""
    component = bundle.manifest.component(STAGE_ROLE[stage], precision)
    target = LOADERS.get((stage, component.format))
    if target is None:
        engines = ", ".join(f for s, f in LOADERS if s == stage)
        raise BundleError(f"no engine for a {component.format!r} {STAGE_ROLE[stage]} ({component.file}); this "
                          f"runtime runs {engines}")
    module, func = target.split(":")
    return getattr(import_module(module), func)(bundle, precision, **settings)
