"""Talker engine: the ``qwen3tts`` GGUF on llama.cpp, fed host-computed embeddings (torch-free).

Every talker input is a float vector (text-track vector + codec-track sum) built on the host; one
``llama_decode`` returns both the codec logits and the final-normed hidden state the code predictor needs.
The host lookups read the GGUF's own ``token_embd`` (upstream layout: [text rows with text_projection folded
in | codec rows]), so upstream-published GGUFs and ours are interchangeable.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ...engine.config import TALKER_CONTEXT
from ...engine.contract import KV_STATE, StepOutput, checked_ids
from .bindings import LlamaContext, LlamaError, LlamaModel, blas_single_thread
from .gguf_tables import GGUFTables


class Talker:
    """Stateful talker: ``prefill`` a prompt, then ``step`` one frame at a time.

    Parameters: ``n_ctx`` positions of KV cache (prompt + frames), ``n_threads`` llama.cpp threads, ``n_gpu_layers``
    (effective only with a GPU build of llama.cpp; :attr:`placement` reports where it actually runs), ``kv_type``
    ("f16" default, "f32" for strict parity) and ``flash_attn`` (None = llama.cpp's choice).
    """

    capabilities = frozenset({KV_STATE})  # rewind, save_state, load_state (llama.cpp sequence state)

    def __init__(self, path: Path | str, *, n_ctx: int = TALKER_CONTEXT, n_threads: int | None = None,
                 n_batch: int = 512, n_gpu_layers: int = 0, kv_type: str = "f16",
                 flash_attn: bool | None = None) -> None:
        self.path = Path(path)
        self.model = LlamaModel(self.path, n_gpu_layers=n_gpu_layers)
        if self.model.arch != "qwen3tts":
            raise LlamaError(f"{self.path.name} is a {self.model.arch!r} GGUF; the talker needs a qwen3tts GGUF")
        self.ctx = LlamaContext(self.model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, kv_type=kv_type,
                                flash_attn=flash_attn)
        self.tables = GGUFTables(self.path)
        emb = self.tables.shape("token_embd.weight")
        out = self.tables.shape("output.weight")
        self.hidden_size = int(emb[1])
        self.codec_vocab_size = int(out[0])
        self.text_vocab_size = int(emb[0]) - self.codec_vocab_size
        if self.hidden_size != self.model.n_embd or self.model.n_vocab != int(emb[0]):
            raise LlamaError(f"{self.path.name}: token_embd {emb} does not match the model "
                             f"(n_embd {self.model.n_embd}, n_vocab {self.model.n_vocab})")
        eos = self.tables.field("tokenizer.ggml.eos_token_id")
        self.codec_eos_id = None if eos is None else int(eos) - self.text_vocab_size
        self.placement = self.model.placement
        self.calls = 0
        self.decode_s = 0.0

    # -- host lookups -----------------------------------------------------------------------------------------

    def text_embeds(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Projected text-track vectors P(ids), (n, H) float32 (text_projection is folded into token_embd)."""
        return self.tables.rows("token_embd.weight", checked_ids(ids, self.text_vocab_size, "text"))

    def codec_embeds(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Talker codec_embedding rows E(ids), (n, H) float32."""
        rows = checked_ids(ids, self.codec_vocab_size, "codec") + self.text_vocab_size
        return self.tables.rows("token_embd.weight", rows)

    # -- decoding -----------------------------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        """KV positions this talker can hold (prompt + frames)."""
        return self.ctx.n_ctx

    @property
    def n_past(self) -> int:
        return self.ctx.n_past

    def reset(self) -> None:
        """Forget the sequence (KV cleared)."""
        self.ctx.clear()

    def rewind(self, n_past: int) -> None:
        """Drop every position from ``n_past`` on (e.g. to reuse a cached prompt prefix)."""
        self.ctx.truncate(n_past)

    def save_state(self) -> tuple[int, np.ndarray]:
        """The KV state of the positions so far (a voice prefix, say), restorable with ``load_state``."""
        return self.ctx.save_state()

    def load_state(self, state: tuple[int, np.ndarray]) -> None:
        self.ctx.load_state(state)

    def _out(self) -> StepOutput:
        logits = self.ctx.logits()[self.text_vocab_size:].copy()
        return StepOutput(logits=logits, hidden=self.ctx.hidden().copy())

    def prefill(self, embeds: np.ndarray) -> StepOutput:
        """Start a new sequence with the prompt ``embeds`` (n, H); outputs of its last position."""
        self.ctx.clear()
        return self.extend(embeds)

    def extend(self, embeds: np.ndarray) -> StepOutput:
        """Append several positions to the current sequence; outputs of the last one."""
        t0 = time.perf_counter()
        with blas_single_thread():
            self.ctx.decode(embeds)
        self.decode_s += time.perf_counter() - t0
        self.calls += 1
        return self._out()

    def step(self, embed: np.ndarray) -> StepOutput:
        """Append one position (the summed frame embedding + text-track vector, (H,))."""
        x = np.asarray(embed, dtype=np.float32).reshape(-1)
        if x.shape[0] != self.hidden_size:
            raise ValueError(f"expected an embedding of size {self.hidden_size}, got {x.shape}")
        t0 = time.perf_counter()
        self.ctx.decode_one(x)
        self.decode_s += time.perf_counter() - t0
        self.calls += 1
        return self._out()

    def close(self) -> None:
        self.ctx.close()
        self.model.close()
        self.tables.close()

    def __enter__(self) -> Talker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
