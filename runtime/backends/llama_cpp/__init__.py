"""llama.cpp engines: the ``qwen3tts`` talker GGUF and the ``qwen3`` code-predictor GGUF with its host tables.

``bindings`` is the ctypes layer (backend setup, the build check, models, contexts, float-embedding batches);
``gguf_tables`` reads host-side tensors from a GGUF; ``talker`` and ``predictor`` are the engines;
``build_flags`` chooses this CPU's CMake flags for ``make setup`` (standard library only).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...bundle import Bundle
from .. import GenerationEngines


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


def load_generation(bundle: Bundle, precision: str, *, n_ctx: int = 4096, threads: int | None = None,
                    n_gpu_layers: int = 0, **engine: Any) -> GenerationEngines:
    """The talker + predictor of ``bundle`` at ``precision`` (``engine``: e.g. kv_type, flash_attn)."""
    from .predictor import CodePredictor
    from .talker import Talker

    m, path = bundle.manifest, bundle.path
    talker = Talker(path(m.component("talker", precision)), n_ctx=n_ctx, n_threads=threads,
                    n_gpu_layers=n_gpu_layers, **engine)
    predictor = CodePredictor(path(m.component("predictor", precision)),
                              path(m.component("predictor_tables", precision)), n_threads=threads,
                              n_gpu_layers=n_gpu_layers, **engine)
    return GenerationEngines(talker, predictor, EngineTables(talker, predictor))
