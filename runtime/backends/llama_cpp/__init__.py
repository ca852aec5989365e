"""llama.cpp engines: the ``qwen3tts`` talker GGUF and the ``qwen3`` code-predictor GGUF with its host tables.

``bindings`` is the ctypes layer (backend setup, the build check, models, contexts, float-embedding batches);
``gguf_tables`` reads host-side tensors from a GGUF; ``talker`` and ``predictor`` are the engines;
``build_flags`` chooses this CPU's CMake flags for ``make setup`` (standard library only).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...bundle import Bundle
from ...engine.config import TALKER_CONTEXT
from ...engine.contract import GenerationEngines


class EngineTables:
    """EmbeddingTables over the engines' own tables (talker token_embd, predictor residual tables)."""

    def __init__(self, talker: Any, predictor: Any) -> None:
        self.talker, self.predictor = talker, predictor
        self.hidden_size = talker.hidden_size

    def text_embeds(self, ids) -> np.ndarray:
        return self.talker.text_embeds(ids)

    def codec_embeds(self, ids) -> np.ndarray:
        return self.talker.codec_embeds(ids)

    def frame_embeds(self, codes) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64)
        out = self.talker.codec_embeds(codes[:, 0])
        for i, row in enumerate(codes):
            out[i] += self.predictor.residual_embeds(row[1:])
        return out


def load_generation(bundle: Bundle, precision: str, *, n_ctx: int = TALKER_CONTEXT, threads: int | None = None,
                    n_gpu_layers: int = 0, predictor_precision: str | None = None, providers: Any = None,
                    sequences: int = 1, predictor_heads: str | None = None, **engine: Any) -> GenerationEngines:
    """The talker of ``bundle`` at ``precision`` and its code predictor at ``predictor_precision`` (default: the
    same; a bundle exported with several talker precisions holds a predictor for each, so they can be mixed,
    e.g. a q4_k_m talker with the q8_0 predictor). ``engine``: e.g. kv_type, flash_attn. ``providers`` (ONNX
    Runtime's execution providers) do not apply: llama.cpp's device is its build and ``n_gpu_layers``.
    ``sequences``: streams the engines hold for continuous batching (``n_ctx`` positions each).
    ``predictor_heads``: ``int8`` (the bundle's quantised heads; the default when the export was asked for them)
    or ``f32`` (the tables' own)."""
    from .predictor import CodePredictor
    from .talker import Talker

    m, path = bundle.manifest, bundle.path
    pp = predictor_precision or precision
    talker = Talker(path(m.component("talker", precision)), n_ctx=n_ctx, n_threads=threads,
                    n_gpu_layers=n_gpu_layers, sequences=sequences, **engine)
    heads = load_heads(bundle, predictor_heads)
    predictor = CodePredictor(path(m.component("predictor", pp)), path(m.component("predictor_tables", pp)),
                              n_threads=threads, n_gpu_layers=n_gpu_layers, sequences=sequences, heads=heads,
                              **engine)
    return GenerationEngines(talker, predictor, EngineTables(talker, predictor))


def load_heads(bundle: Bundle, wanted: str | None) -> Any:
    """The bundle's quantised predictor heads (``wanted`` None: those the export was asked for, if any), or None
    for the float32 heads in the predictor tables (``wanted`` "f32"); the predictor checks their shapes."""
    from ...bundle import BundleError

    if wanted == "f32":
        return None
    found = [c for c in bundle.manifest.find("predictor_heads", wanted)
             if wanted is not None or (c.meta or {}).get("requested", True)]
    if not found:
        if wanted is None:
            return None
        have = sorted(c.precision for c in bundle.manifest.find("predictor_heads")) or ["none"]
        raise BundleError(f"this bundle has no {wanted} predictor heads (it has: {', '.join(have)}); re-export it with "
                          f"`qwen3-tts-edge export MODEL -o BUNDLE --predictor-heads {wanted}` or use f32")
    from ..onnxruntime.heads import QuantizedHeads

    return QuantizedHeads(bundle.path(found[0]))
