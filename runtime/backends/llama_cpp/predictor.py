"""Code-predictor engine: the 5-layer predictor as a stock llama.cpp ``qwen3`` model + host-side tables/heads.

Per frame (as the official code predictor does): prefill 2 positions [past_hidden, E(c0)] (through
``small_to_mtp_projection`` when the predictor is narrower than the talker), read the final-normed hidden
state, apply head 0 on the host, let ``choose`` pick c1; then 14 single-position calls fed with
``table[j-1](c_j)`` (projection folded into the tables where present) and head j. The KV cache is cleared
every frame. Heads are float32 from the tables file (numpy GEMV, BLAS pinned to one thread while predicting),
or weight-only int8 ONNX graphs when the bundle has them (``heads=``, ``runtime/backends/onnxruntime/heads.py``:
a quarter of the bytes); input tables stay memory-mapped and only the rows in use are read.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ...bundle import PREDICTOR_TABLES_ARCH
from ...engine.contract import ADAPTERS, CORE_SHARE, SEQUENCES
from ...sampler import GREEDY, ResidualSampling
from .adapters import AdapterHost, LoraAdapter
from .bindings import LlamaContext, LlamaError, LlamaModel, blas_single_thread
from .gguf_tables import GGUFTables

TABLES_ARCH = PREDICTOR_TABLES_ARCH
TABLES_FORMAT_VERSION = 1  # layout of the tables GGUF that export/llama_gguf.py writes and this engine reads


class CodePredictor:
    """Predicts codebooks 1..15 of a frame from the talker's hidden state and codebook-0 code.

    ``sequences`` > 1: :meth:`predict_many` predicts that many frames (of different streams) together, one
    decode per step for all of them and the host heads as one matrix product per step.

    Flash attention is llama.cpp's choice (on): without it a frame took 25 % longer (47 vs 38 ms at q4_k_m on 2
    cores: more graph operations per step). With it, a frame predicted in a batch differs from the same frame
    alone by up to 8e-4 on a logit at f32 (the kernel rounds differently over several rows; 1e-6 without it):
    a batched stream then equals the request alone up to numerical near-ties (tests/test_batching.py).
    """

    capabilities: frozenset[str] = frozenset({SEQUENCES, ADAPTERS, CORE_SHARE})

    def __init__(self, model_path: Path | str, tables_path: Path | str, *, n_threads: int | None = None,
                 n_gpu_layers: int = 0, kv_type: str = "f16", flash_attn: bool | None = None,
                 sequences: int = 1, heads: Any = None) -> None:
        self.model = LlamaModel(model_path, n_gpu_layers=n_gpu_layers)
        if self.model.arch != "qwen3":
            raise LlamaError(f"{Path(model_path).name} is a {self.model.arch!r} GGUF; the predictor needs qwen3")
        self.tables = GGUFTables(tables_path)
        a = TABLES_ARCH
        if self.tables.field("general.architecture") != a:
            raise LlamaError(f"{Path(tables_path).name} is not a predictor-tables GGUF")
        if (version := self.tables.field(f"{a}.format_version")) != TABLES_FORMAT_VERSION:
            raise LlamaError(f"{Path(tables_path).name} has predictor-tables format version {version}; this runtime "
                             f"reads {TABLES_FORMAT_VERSION}: re-export the bundle with `qwen3-tts-edge export MODEL "
                             "-o BUNDLE --force`")
        self.num_steps = int(self.tables.field(f"{a}.num_steps"))
        self.hidden_size = int(self.tables.field(f"{a}.talker_hidden_size"))
        self.width = int(self.tables.field(f"{a}.predictor_hidden_size"))
        self.codebook_size = int(self.tables.field(f"{a}.codebook_size"))
        if self.width != self.model.n_embd:
            raise LlamaError(f"predictor width {self.model.n_embd} != tables' {self.width}; mismatched files")
        # n_ctx: llama.cpp pads small contexts up; 2 + 14 positions per frame are needed.
        self.sequences = max(1, int(sequences))
        rows = max(self.num_steps + 1, 2 * self.sequences)  # a 2-position prefill per sequence in one call
        self.ctx = LlamaContext(self.model, n_ctx=max(32, self.num_steps + 2), n_batch=rows,
                                n_threads=n_threads, kv_type=kv_type, flash_attn=flash_attn,
                                max_outputs=rows, sequences=self.sequences)  # every row outputs (vocab is 1)
        self.placement = self.model.placement
        self.adapters = AdapterHost(self.model, self.ctx, "predictor")

        # ``heads(j, hidden)`` -> logits: the bundle's quantised heads, else the tables' float32 ones (read into
        # memory only then: 126 MB at 0.6B).
        if heads is not None:
            want = (self.num_steps, self.width, self.codebook_size)
            got = (heads.steps, heads.hidden_size, heads.codebook_size)
            if got != want:
                raise LlamaError(f"the predictor heads map {got[0]} steps of {got[1]} -> {got[2]}; this predictor "
                                 f"needs {want[0]} steps of {want[1]} -> {want[2]}: mismatched files, re-export")
        self.heads_precision = getattr(heads, "precision", "f32")
        self._quant_heads = heads
        self.heads = (None if heads is not None else
                      np.stack([self.tables.array(f"lm_head.{j}.weight") for j in range(self.num_steps)]))
        self.has_projection = bool(self.tables.field(f"{a}.has_projection"))
        if self.has_projection:
            self.proj_w = self.tables.array("proj.weight")  # (width, H)
            self.proj_b = self.tables.array("proj.bias").reshape(-1)
            self._in_names = [f"codec_embd_proj.{j}.weight" for j in range(self.num_steps)]
        else:
            self.proj_w = self.proj_b = None
            self._in_names = [f"codec_embd.{j}.weight" for j in range(self.num_steps)]
        self._raw_names = [f"codec_embd.{j}.weight" for j in range(self.num_steps)]
        self._prefill = np.zeros((2, self.width), dtype=np.float32)
        self._logits = np.zeros(self.codebook_size, dtype=np.float32)
        self.reset_counters()

    # -- LoRA adapters (ADAPTERS) ---------------------------------------------------------------------------------

    def share_cores(self, share: object) -> None:
        """Decode on the thread count ``share`` (a :class:`~runtime.engine.cores.CoreShare`) gives per call."""
        self.ctx.share = share

    def load_adapter(self, data: bytes) -> LoraAdapter:
        """Load a ``qwen3`` GGUF LoRA adapter (bytes, our predictor tensor names) into this predictor's model."""
        return self.adapters.load(data)

    def set_adapters(self, adapters: list[tuple[LoraAdapter, float]]) -> None:
        """The adapters (and scales) the next frames use; [] for the base model."""
        self.adapters.set(adapters)

    # -- counters ---------------------------------------------------------------------------------------------

    def reset_counters(self) -> None:
        """Zero the timing counters (seconds summed over calls)."""
        self.frames = 0
        self.calls = 0
        self.decode_s = 0.0
        self.head_s = 0.0
        self.choose_s = 0.0
        self.total_s = 0.0

    @property
    def counters(self) -> dict[str, float]:
        f = max(self.frames, 1)
        return {"frames": self.frames, "llama_calls": self.calls, "decode_s": self.decode_s, "head_s": self.head_s,
                "choose_s": self.choose_s, "total_s": self.total_s, "ms_per_frame": 1e3 * self.total_s / f}

    # -- host lookups -----------------------------------------------------------------------------------------

    def c0_embed(self, c0: int) -> np.ndarray:
        """Talker codec_embedding row E(c0), (H,) float32 (from the tables file)."""
        return self.tables.rows("talker_codec_embd.weight", np.array([c0]))[0]

    def residual_embeds(self, codes15: np.ndarray) -> np.ndarray:
        """Σ_j raw table j (c_{j+1}) over the 15 residual codes: (H,) float32, for the next talker input."""
        codes = np.asarray(codes15, dtype=np.int64).reshape(-1)
        if codes.shape[0] != self.num_steps:
            raise ValueError(f"expected {self.num_steps} residual codes, got {codes.shape[0]}")
        acc = np.zeros(self.hidden_size, dtype=np.float32)
        for j in range(self.num_steps):
            acc += self.tables.rows(self._raw_names[j], codes[j:j + 1])[0]
        return acc

    # -- prediction -------------------------------------------------------------------------------------------

    def predict(self, past_hidden: np.ndarray, c0: int, sampling: ResidualSampling = GREEDY) -> np.ndarray:
        """Codes c1..c15 (int64, (15,)) for one frame; ``sampling.choose(step, logits)`` picks each code on the host.

        ``logits`` (codebook_size,) float32 is a buffer reused across steps: a chooser must copy it to keep it.
        """
        choose = sampling.choose
        t_start = time.perf_counter()
        codes = np.zeros(self.num_steps, dtype=np.int64)
        ctx, heads, logits, qheads = self.ctx, self.heads, self._logits, self._quant_heads
        dec = head = cho = 0.0
        with blas_single_thread():
            x = self._prefill
            if self.has_projection:
                pair = np.stack([np.asarray(past_hidden, dtype=np.float32).reshape(-1), self.c0_embed(c0)])
                np.matmul(pair, self.proj_w.T, out=x)
                x += self.proj_b
            else:
                x[0] = past_hidden
                x[1] = self.c0_embed(c0)
            ctx.clear()
            for j in range(self.num_steps):
                t0 = time.perf_counter()
                if j == 0:
                    ctx.decode(x)
                else:
                    ctx.decode_one(self.tables.rows(self._in_names[j - 1], codes[j - 1:j])[0])
                t1 = time.perf_counter()
                lg = np.matmul(heads[j], ctx.hidden(), out=logits) if qheads is None else qheads(j, ctx.hidden())
                t2 = time.perf_counter()
                c = int(choose(j, lg))
                if not 0 <= c < self.codebook_size:
                    raise ValueError(f"choose returned code {c} outside [0, {self.codebook_size})")
                codes[j] = c
                t3 = time.perf_counter()
                dec += t1 - t0
                head += t2 - t1
                cho += t3 - t2
        self.frames += 1
        self.calls += self.num_steps
        self.decode_s += dec
        self.head_s += head
        self.choose_s += cho
        self.total_s += time.perf_counter() - t_start
        return codes

    def predict_many(self, frames: list[tuple[np.ndarray, int, ResidualSampling]]) -> list[np.ndarray | Exception]:
        """:meth:`predict` for several frames ``(past_hidden, c0, sampling)`` at once, each in its own sequence.

        Each frame's codes are chosen by its own ``sampling``; a chooser that raises fails only its frame (its
        exception takes the frame's place in the result, and the others go on without it).
        """
        b = len(frames)
        if not 0 < b <= self.sequences:
            raise ValueError(f"predict_many takes 1..{self.sequences} frames, got {b}")
        t_start = time.perf_counter()
        ctx, heads = self.ctx, self.heads
        codes = np.zeros((b, self.num_steps), dtype=np.int64)
        results: list[np.ndarray | Exception | None] = [None] * b
        live = list(range(b))
        dec = head = cho = 0.0
        with blas_single_thread():
            hidden = np.stack([np.asarray(h, dtype=np.float32).reshape(-1) for h, _, _ in frames])
            c0_rows = self.tables.rows("talker_codec_embd.weight", np.array([c0 for _, c0, _ in frames]))
            pairs = np.stack([hidden, c0_rows], axis=1).reshape(2 * b, -1)  # [h_0, E(c0_0), h_1, E(c0_1), ...]
            if self.has_projection:
                pairs = pairs @ self.proj_w.T + self.proj_b
            ctx.clear()
            seqs = np.arange(b, dtype=np.int32)
            for j in range(self.num_steps):
                t0 = time.perf_counter()
                rows = np.array(live, dtype=np.int32)  # the frames still going (a failed chooser drops its frame)
                if j == 0:
                    ctx.decode_rows(pairs, np.repeat(seqs, 2), np.tile(np.array([0, 1], np.int32), b), outputs=True)
                    out_rows = [2 * i + 1 for i in range(b)]
                else:
                    x = self.tables.rows(self._in_names[j - 1], codes[rows, j - 1])
                    ctx.decode_rows(x, rows, np.full(len(rows), j + 1, np.int32), outputs=True)
                    out_rows = list(range(len(rows)))
                h = np.stack([ctx.hidden(r) for r in out_rows])
                t1 = time.perf_counter()
                # (streams, codebook): one matrix product for every stream
                logits = h @ heads[j].T if self._quant_heads is None else self._quant_heads(j, h)
                t2 = time.perf_counter()
                still = []
                for k, i in enumerate(live):
                    try:
                        c = int(frames[i][2].choose(j, logits[k]))
                        if not 0 <= c < self.codebook_size:
                            raise ValueError(f"choose returned code {c} outside [0, {self.codebook_size})")
                    except Exception as exc:  # this stream's chooser failed: it leaves, the others go on
                        results[i] = exc
                        continue
                    codes[i, j] = c
                    still.append(i)
                live = still
                dec += t1 - t0
                head += t2 - t1
                cho += time.perf_counter() - t2
                if not live:
                    break
        for i in live:
            results[i] = codes[i]
        self.frames += b
        self.calls += self.num_steps
        self.decode_s += dec
        self.head_s += head
        self.choose_s += cho
        self.total_s += time.perf_counter() - t_start
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.adapters.close()
        self.ctx.close()
        self.model.close()
        self.tables.close()

    def __enter__(self) -> CodePredictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
