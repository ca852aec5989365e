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
from ...engine.contract import ADAPTERS, CORE_SHARE, KV_STATE, SEQUENCES, StepOutput, checked_ids
from .adapters import AdapterHost, LoraAdapter
from .bindings import FTYPES, LlamaContext, LlamaError, LlamaModel, blas_single_thread
from .gguf_tables import GGUFTables

# GGUF file types whose layer weights llama.cpp repacks into its own buffers on CPUs: mapping the file and releasing
# its pages then leaves only the host-lookup token_embd (169 MB at q4_k_m, never read by llama.cpp) unloaded. The
# others' weights are read from the mapping itself, and at q8_0 that made the talker ~10 % slower than from
# memory (bench/README, "Where the memory goes").
MAPPED_FILE_TYPES = frozenset({FTYPES["q4_k_m"], FTYPES["q4_k_s"]})


def talker_load(tables: GGUFTables) -> str:
    """How :class:`LlamaModel` should load this talker GGUF: ``mapped`` where its weights are repacked."""
    file_type = tables.field("general.file_type")
    return "mapped" if file_type is not None and int(file_type) in MAPPED_FILE_TYPES else "memory"


class Talker:
    """Stateful talker: ``prefill`` a prompt, then ``step`` one frame at a time.

    Parameters: ``n_ctx`` positions of KV cache (prompt + frames), ``n_threads`` llama.cpp threads, ``n_gpu_layers``
    (effective only with a GPU build of llama.cpp; :attr:`placement` reports where it actually runs), ``kv_type``
    ("f16" default, "f32" for strict parity) and ``flash_attn`` (off by default; None = llama.cpp's choice, which
    is on: on CPUs it made a decode at 1500 positions 1.8x slower, 2.4x with four sequences, for about the same
    speed at 100, and it rounds a row differently when the decode holds several rows, 1e-3 on a logit instead
    of 1.5e-5; bench/README, "Many streams, one engine"). ``sequences`` > 1
    makes room for that many sequences of ``n_ctx`` positions each, decoded together by
    :meth:`decode_sequences` (the batch scheduler's engine, ``runtime/engine/scheduler.py``); the single-sequence
    methods below drive sequence 0.
    """

    # rewind, save_state, load_state (llama.cpp sequence state); several sequences decoded together; LoRA adapters
    capabilities = frozenset({KV_STATE, SEQUENCES, ADAPTERS, CORE_SHARE})

    def __init__(self, path: Path | str, *, n_ctx: int = TALKER_CONTEXT, n_threads: int | None = None,
                 n_batch: int = 512, n_gpu_layers: int = 0, kv_type: str = "f16",
                 flash_attn: bool | None = False, sequences: int = 1) -> None:
        self.path = Path(path)
        self.tables = GGUFTables(self.path)
        self.model = LlamaModel(self.path, n_gpu_layers=n_gpu_layers, load=talker_load(self.tables))
        if self.model.arch != "qwen3tts":
            raise LlamaError(f"{self.path.name} is a {self.model.arch!r} GGUF; the talker needs a qwen3tts GGUF")
        self.ctx = LlamaContext(self.model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, kv_type=kv_type,
                                flash_attn=flash_attn, sequences=sequences, max_outputs=sequences)
        self.sequences = self.ctx.sequences
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
        self.adapters = AdapterHost(self.model, self.ctx, "talker")
        self.calls = 0
        self.decode_s = 0.0

    # -- LoRA adapters (ADAPTERS) ---------------------------------------------------------------------------------

    def share_cores(self, share: object) -> None:
        """Decode on the thread count ``share`` (a :class:`~runtime.engine.cores.CoreShare`) gives per call."""
        self.ctx.share = share

    def load_adapter(self, data: bytes) -> LoraAdapter:
        """Load a ``qwen3tts`` GGUF LoRA adapter (bytes) into this talker's model, once (see ``set_adapters``)."""
        return self.adapters.load(data)

    def set_adapters(self, adapters: list[tuple[LoraAdapter, float]]) -> None:
        """The adapters (and scales) the next decodes use; [] for the base model. KV already cached is kept."""
        self.adapters.set(adapters)

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

    def _out(self, i: int = -1) -> StepOutput:
        """Output ``i`` of the last decode: codec logits and hidden state, copied."""
        logits = self.ctx.logits(i)[self.text_vocab_size:].copy()
        return StepOutput(logits=logits, hidden=self.ctx.hidden(i).copy())

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

    # -- several sequences --------------------------------------------------------------------------------------

    def decode_sequences(self, work: list[tuple[int, int, np.ndarray]]) -> list[StepOutput]:
        """Append ``embeds`` (n, H) to each sequence ``seq`` at positions ``start``.. for every ``(seq, start,
        embeds)`` of ``work`` (one entry per sequence); the outputs of each one's last position, in order.

        Prompt bodies (all but a prompt's last position) go first, in ``n_batch``-row calls without outputs; then
        one call holds every sequence's last row — a frame of every stream in one pass over the weights.
        """
        if len({seq for seq, _, _ in work}) != len(work) or len(work) > self.sequences:
            raise ValueError(f"decode_sequences takes one entry per sequence, at most {self.sequences}")
        t0 = time.perf_counter()
        ctx, h = self.ctx, self.hidden_size
        body = [(seq, start, e[:-1]) for seq, start, e in work if len(e) > 1]
        if body:
            rows = np.concatenate([e for _, _, e in body])
            seqs = np.concatenate([np.full(len(e), seq, np.int32) for seq, _, e in body])
            pos = np.concatenate([np.arange(start, start + len(e), dtype=np.int32) for _, start, e in body])
            with blas_single_thread():
                for i in range(0, len(rows), ctx.n_batch):
                    ctx.decode_rows(rows[i:i + ctx.n_batch], seqs[i:i + ctx.n_batch], pos[i:i + ctx.n_batch],
                                    outputs=False)
        last = np.stack([np.asarray(e[-1], np.float32).reshape(h) for _, _, e in work])
        ctx.decode_rows(last, np.array([seq for seq, _, _ in work], np.int32),
                        np.array([start + len(e) - 1 for _, start, e in work], np.int32), outputs=True)
        out = [self._out(i) for i in range(len(work))]
        self.decode_s += time.perf_counter() - t0
        self.calls += 1
        return out

    def seq_remove(self, seq: int, p0: int = 0) -> None:
        self.ctx.seq_remove(seq, p0)

    def seq_length(self, seq: int) -> int:
        return self.ctx.seq_length(seq)

    def seq_state(self, seq: int) -> np.ndarray:
        return self.ctx.seq_state(seq)

    def set_seq_state(self, seq: int, data: np.ndarray) -> None:
        self.ctx.set_seq_state(seq, data)

    def close(self) -> None:
        self.adapters.close()
        self.ctx.close()
        self.model.close()
        self.tables.close()

    def __enter__(self) -> Talker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
