"""A small wrapper over llama.cpp's C API (llama-cpp-python's low-level bindings) for embedding-input models.

Both llama.cpp engines (the ``qwen3tts`` talker and the ``qwen3`` code predictor) are driven the same way:
every input position is a float vector computed on the host, fed through ``llama_batch.embd``, and each call
reads back logits and the final-normed hidden state (``embeddings=true``, pooling NONE) of the last position.

Memory ownership: the ``llama_batch`` handed to ``llama_decode`` is built here from numpy arrays owned by
:class:`LlamaContext` (embeddings, positions, sequence ids, output flags). ``llama_batch_init``/``free`` are never
used, so positions can be 4 per token (M-RoPE/IMROPE models read ``n_tokens × 4`` section-major positions
while ``llama_batch_init`` allocates only ``n_tokens``) without swapping pointers inside a C-allocated batch.

Host-side GGUF tensors are read by ``gguf_tables.py``; quantisation (``llama_model_quantize``) is export-only
and lives in ``export/llama_gguf.py``.

Torch-free: numpy and llama_cpp; gguf (PyPI) for type names; threadpoolctl optional, for pinning BLAS threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from ...engine.contract import Placement
from ...errors import Qwen3TTSEdgeError
from .pages import KVPages, release_mapped_pages

# ggml tensor types and llama file types by our lower-case names, from gguf-py's enums (never restated codes).
GGML_TYPES = {t.name.lower(): int(t) for t in GGMLQuantizationType}
_KV_BYTES = {"f32": 4, "f16": 2, "bf16": 2}  # bytes per KV value (block-quantized caches: not released)
FTYPES = {"f32": int(LlamaFileType.ALL_F32), **{t.name.removeprefix("MOSTLY_").lower(): int(t)
                                                   for t in LlamaFileType if t.name.startswith("MOSTLY_")}}
# llama_rope_type values whose models read several positions per embedding token (M-RoPE family).
_MULTI_POS_ROPE = {8: 4, 24: 4, 40: 4}  # MROPE, VISION, IMROPE -> 4 sections
_LOG_LEVELS = {0: "none", 1: "debug", 2: "info", 3: "warn", 4: "error"}


class LlamaError(Qwen3TTSEdgeError, RuntimeError):
    """llama.cpp refused a model, a context or a batch; the message carries its last log lines."""


# ----------------------------------------------------------------------------------------------------------
# library setup and logging


_lock = threading.Lock()
_state: dict[str, Any] = {}
_recent_log: deque[str] = deque(maxlen=40)


def _log_callback_impl(level: int, text: bytes | None, _user: Any) -> None:
    if not text:
        return
    line = text.decode("utf-8", "replace")
    if level >= 3:  # warnings and errors are kept for error messages
        _recent_log.append(line.rstrip("\n"))
    if os.environ.get("QWEN3_TTS_EDGE_LLAMA_LOG"):
        print(line, end="", flush=True, file=sys.stderr)


def api() -> Any:
    """The imported ``llama_cpp.llama_cpp`` bindings, with the backend initialised once and logging quiet.

    llama.cpp logs every load step on stderr; its warnings and errors are kept (see :func:`recent_log`) and
    everything is echoed only when ``QWEN3_TTS_EDGE_LLAMA_LOG`` is set.
    """
    with _lock:
        if "api" not in _state:
            try:
                import llama_cpp.llama_cpp as lc
            except ImportError as exc:  # pragma: no cover - a base dependency
                raise LlamaError(f"cannot import llama_cpp ({exc}); pip install llama-cpp-python==0.3.36") from exc
            check_build(lc)
            cb = lc.llama_log_callback(_log_callback_impl)
            lc.llama_log_set(cb, ctypes.c_void_p(0))
            lc.llama_backend_init()
            _state["log_cb"] = cb  # keep the C callback alive for the life of the process
            _state["api"] = lc
        return _state["api"]


def check_build(lc: Any) -> None:
    """Refuse a llama.cpp build that would crash on this CPU (AMX in the pinned release) before any decode."""
    from importlib import metadata

    from .build_flags import unsafe_build_reason

    try:
        version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:  # pragma: no cover - imported from a source tree
        version = getattr(sys.modules.get("llama_cpp"), "__version__", "unknown")
    reason = unsafe_build_reason(lc.llama_print_system_info().decode("utf-8", "replace"), version)
    if reason:
        raise LlamaError(reason)


def recent_log(n: int = 8) -> str:
    """The last ``n`` warning/error lines llama.cpp logged (for error messages)."""
    return "\n".join(list(_recent_log)[-n:])


def system_info() -> str:
    """llama.cpp's build/CPU feature line (e.g. ``AVX2 = 1 | ... | OPENMP = 1``)."""
    return api().llama_print_system_info().decode("utf-8", "replace").strip()


def backend_devices() -> list[str]:
    """Names of the ggml backend devices this llama.cpp build can use (``CPU`` only in a CPU build)."""
    lib = api()._lib
    try:
        count = lib.ggml_backend_dev_count
        get = lib.ggml_backend_dev_get
        name = lib.ggml_backend_dev_name
    except AttributeError:  # pragma: no cover - symbol layout of another build
        return ["CPU"]
    count.restype, count.argtypes = ctypes.c_size_t, []
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    name.restype, name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    return [name(get(i)).decode("utf-8", "replace") for i in range(count())]


def gpu_offload_supported() -> bool:
    return bool(api().llama_supports_gpu_offload())


# ----------------------------------------------------------------------------------------------------------
# BLAS thread pinning


@contextlib.contextmanager
def blas_single_thread() -> Iterator[None]:
    """Pin numpy's BLAS to one thread inside a frame loop (restored on exit).

    llama.cpp's own threads and a multi-threaded BLAS sgemv fight over the cores: unpinned, the 15 host-side
    head GEMVs per frame made the predictor several times slower (bench/README, "Numbers behind code
    choices"). Uses threadpoolctl when available (no-op otherwise); the controller is built once, so entering
    is cheap.
    """
    ctls = _blas_controllers()
    if not ctls:
        yield
        return
    before = [c.num_threads for c in ctls]
    for c in ctls:
        c.set_num_threads(1)
    try:
        yield
    finally:
        for c, n in zip(ctls, before, strict=True):
            c.set_num_threads(n)


def _blas_controllers() -> list[Any]:
    with _lock:
        if "blas" not in _state:
            try:
                from threadpoolctl import ThreadpoolController

                _state["blas"] = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
            except Exception:  # threadpoolctl missing or unable to introspect: leave BLAS alone
                _state["blas"] = []
        return _state["blas"]


# ----------------------------------------------------------------------------------------------------------
# models and contexts


class LlamaModel:
    """A GGUF model loaded by llama.cpp.

    ``load="memory"`` (the default) reads the file into memory: on CPUs llama.cpp repacks k-quant weights
    (q4_k_m...) into its GEMM kernels' interleaved layout, and with a plain mmap the original pages stay resident
    beside the repacked copy. ``load="mapped"`` maps the file and then releases the mapping's pages
    (:func:`release_mapped_pages`): only what llama.cpp reads from the file after loading (the tensors it does not
    repack) comes back, and a tensor it never reads costs nothing, such as the talker's ``token_embd`` (169 MB at
    q4_k_m), which the host looks up itself (bench/README, "Where the memory goes"; ``talker.talker_load`` says
    which talkers are mapped). Linux only; elsewhere ``mapped`` loads into memory.
    """

    def __init__(self, path: Path | str, *, n_gpu_layers: int = 0, load: str = "memory") -> None:
        lc = api()
        self.path = Path(path)
        if not self.path.is_file():
            raise LlamaError(f"model file {self.path} does not exist")
        if load not in ("memory", "mapped"):
            raise ValueError(f"load must be 'memory' or 'mapped', got {load!r}")
        mapped = load == "mapped" and sys.platform.startswith("linux")
        params = lc.llama_model_default_params()
        params.n_gpu_layers = int(n_gpu_layers)
        if not mapped:
            params.load_mode = lc.LLAMA_LOAD_MODE_NONE
        else:  # pages already copied into repacked buffers are given back while loading goes on, not only after
            next_release = [0.1]  # every tenth of the load

            def progress(fraction: float, _user: Any) -> bool:
                if fraction >= next_release[0]:
                    release_mapped_pages(self.path)  # on the loader's own thread, between tensors
                    next_release[0] += 0.1
                return True

            params.progress_callback = lc.llama_progress_callback(progress)  # alive until the call returns
        self._ptr = lc.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._ptr:
            raise LlamaError(f"llama.cpp could not load {self.path}:\n{recent_log()}")
        self.load = "mapped" if mapped else "memory"
        self.n_embd = int(lc.llama_model_n_embd(self._ptr))
        self.n_layer = int(lc.llama_model_n_layer(self._ptr))
        self.n_vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._ptr)))
        self.rope_type = int(lc.llama_model_rope_type(self._ptr))
        self.pos_per_token = _MULTI_POS_ROPE.get(self.rope_type, 1)
        self.arch = self.meta("general.architecture") or "?"
        self.released_bytes = release_mapped_pages(self.path) if mapped else 0
        # K and V widths per layer (grouped-query attention), for the KV cache's size
        head_kv, head = (self.meta(f"{self.arch}.attention.head_count_kv"),
                         self.meta(f"{self.arch}.attention.head_count"))
        key, value = (self.meta(f"{self.arch}.attention.key_length"),
                      self.meta(f"{self.arch}.attention.value_length"))
        n_head_kv = int(head_kv or head or 0)
        head_dim = self.n_embd // int(head) if head else 0
        self.kv_width = n_head_kv * (int(key or head_dim) + int(value or head_dim))  # K + V values per position
        devices = tuple(backend_devices())
        gpu = gpu_offload_supported() and n_gpu_layers != 0 and any(d.upper() != "CPU" for d in devices)
        note = "" if gpu or n_gpu_layers == 0 else "n_gpu_layers ignored: this llama.cpp build has no GPU backend"
        self.placement = Placement("gpu" if gpu else "cpu", note, int(n_gpu_layers), tuple(devices))

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as llama.cpp formats it, or None."""
        lc = api()
        buf = ctypes.create_string_buffer(256)
        n = lc.llama_model_meta_val_str(self._ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            lc.llama_model_meta_val_str(self._ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    @property
    def ptr(self) -> Any:
        if not self._ptr:
            raise LlamaError("model is closed")
        return self._ptr

    def close(self) -> None:
        if getattr(self, "_ptr", None):
            api().llama_model_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LlamaContext:
    """Sequences on a model: float-embedding batches, positions owned here, logits + hidden readout.

    One sequence (id 0) by default, driven by ``decode``/``decode_one``/``truncate``/``save_state``. With
    ``sequences`` > 1 the context holds that many, each with its own ``n_ctx`` positions of KV (llama.cpp's
    per-sequence streams, ``kv_unified`` off: attention reads only the sequence's own cells), driven by
    :meth:`decode_rows` and the ``seq_*`` methods; the caller (a batch scheduler) owns their positions.

    ``kv_type`` is the KV-cache precision (llama.cpp default f16; f32 for strict parity checks); ``max_outputs``
    bounds the positions per decode that can return outputs (llama.cpp reserves that many logits rows).
    ``decode(embeds)`` appends ``n`` positions after the current ``n_past`` and computes outputs (logits and
    the final-normed hidden state) for the last position only unless ``all_outputs``. Views returned by
    :meth:`logits` and :meth:`hidden` point into llama.cpp memory and are valid until the next decode; copy
    them to keep them.
    """

    def __init__(self, model: LlamaModel, *, n_ctx: int, n_batch: int, n_threads: int | None = None,
                 n_threads_batch: int | None = None, flash_attn: bool | None = None,
                 kv_type: str = "f16", max_outputs: int = 1, sequences: int = 1) -> None:
        lc = api()
        self.model = model
        threads = int(n_threads or max(1, os.cpu_count() or 1))
        params = lc.llama_context_default_params()
        self.sequences = max(1, int(sequences))
        params.n_ctx = int(n_ctx) * self.sequences
        params.n_batch = int(n_batch)
        params.n_ubatch = int(n_batch)
        params.n_seq_max = self.sequences
        params.kv_unified = False
        # llama.cpp reserves n_outputs_max x n_vocab logits (n_batch by default: 317 MB for the talker's 155k vocab)
        params.n_outputs_max = max(1, int(max_outputs))
        params.n_threads = threads
        params.n_threads_batch = int(n_threads_batch or threads)
        params.embeddings = True
        params.pooling_type = lc.LLAMA_POOLING_TYPE_NONE
        params.no_perf = True
        params.type_k = params.type_v = GGML_TYPES[kv_type]
        if flash_attn is not None:
            params.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                      else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        # The cache's pages are released and come back as positions are written (pages.KVPages: why); CPU only:
        # a GPU build's host buffers may be pinned.
        cache_bytes = model.n_layer * params.n_ctx * model.kv_width * _KV_BYTES.get(kv_type, 0)
        if model.placement.device == "cpu" and cache_bytes:
            self._ptr, self._kv_pages = KVPages.locate(lambda: lc.llama_init_from_model(model.ptr, params),
                                                       cache_bytes)
        else:
            self._ptr, self._kv_pages = lc.llama_init_from_model(model.ptr, params), None
        if not self._ptr:
            raise LlamaError(f"llama.cpp could not create a context for {model.path}:\n{recent_log()}")
        self._mem = lc.llama_get_memory(self._ptr)
        self.n_ctx = int(lc.llama_n_ctx_seq(self._ptr))  # per sequence (all of it with one sequence)
        self.n_batch = int(n_batch)
        self.max_outputs = max(1, int(max_outputs))
        self.n_embd = model.n_embd
        self.n_vocab = model.n_vocab
        self.npos = model.pos_per_token
        self.n_past = 0
        self._decode = lc.llama_decode  # the bound C function itself (argtypes set by llama_cpp)
        self._get_logits = lc.llama_get_logits_ith
        self._get_embd = lc.llama_get_embeddings_ith
        self._views: dict[tuple[str, int], np.ndarray] = {}
        self.share: Any = None  # a runtime.engine.cores.CoreShare: picks the thread count per call
        self._threads_now = threads

        # The batch and every buffer it points to are owned by this object (never llama_batch_free'd).
        cap = self.n_batch
        self._embd = np.zeros((cap, self.n_embd), dtype=np.float32)
        self._pos = np.zeros(cap * self.npos, dtype=np.int32)
        self._n_seq_id = np.ones(cap, dtype=np.int32)
        self._seq_id_vals = np.zeros(cap, dtype=np.int32)
        seq_ptr_t = ctypes.POINTER(lc.llama_seq_id)
        base = self._seq_id_vals.ctypes.data
        self._seq_ptrs = (seq_ptr_t * cap)(*[ctypes.cast(base + 4 * i, seq_ptr_t) for i in range(cap)])
        self._out = np.zeros(cap, dtype=np.int8)
        b = lc.llama_batch()
        b.n_tokens = 0
        b.token = ctypes.POINTER(lc.llama_token)()
        b.embd = self._embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        b.pos = self._pos.ctypes.data_as(ctypes.POINTER(lc.llama_pos))
        b.n_seq_id = self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(seq_ptr_t))
        b.logits = self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self._batch = b
        self._embeddings_on = True

    @property
    def ptr(self) -> Any:
        if not self._ptr:
            raise LlamaError("context is closed")
        return self._ptr

    # -- decoding -------------------------------------------------------------------------------------------

    def decode(self, embeds: np.ndarray, *, all_outputs: bool = False) -> None:
        """Append ``embeds`` (n, n_embd) at positions n_past..n_past+n-1 (split into n_batch chunks).

        With ``embeddings=true`` llama.cpp outputs every position of a batch, so positions before the last one
        are decoded with embeddings switched off (no outputs at all) when they would not fit ``max_outputs``;
        the last position then gets logits and hidden state. ``all_outputs`` keeps every position's outputs
        (the caller reads them after each chunk; needs max_outputs >= the chunk size).
        """
        x = np.asarray(embeds, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.n_embd:
            raise ValueError(f"expected embeddings of shape (n, {self.n_embd}), got {x.shape}")
        n = x.shape[0]
        if n == 0:
            raise ValueError("decode needs at least one position")
        if self.n_past + n > self.n_ctx:
            raise LlamaError(f"context full: {self.n_past} + {n} positions > n_ctx {self.n_ctx}")
        if all_outputs:
            if min(n, self.n_batch) > self.max_outputs:
                raise ValueError(f"all_outputs for {n} positions needs max_outputs >= {min(n, self.n_batch)}")
            for start in range(0, n, self.n_batch):
                self._run(x[start:start + self.n_batch], outputs=True)
            return
        if n <= min(self.max_outputs, self.n_batch):
            self._run(x, outputs=True)
            return
        body = x[:-1]
        for start in range(0, body.shape[0], self.n_batch):
            self._run(body[start:start + self.n_batch], outputs=False)
        self._run(x[-1:], outputs=True)

    def decode_one(self, embed: np.ndarray) -> None:
        """Fast path for one position (the per-step call): no chunking, output for that position."""
        if not self._embeddings_on:
            self._set_embeddings(True)
        self._embd[0] = embed
        p = self.n_past
        pos = self._pos
        if self.npos == 1:
            pos[0] = p
        else:
            pos[: self.npos - 1] = p
            pos[self.npos - 1:self.npos] = 0
        self._out[0] = 1
        self._batch.n_tokens = 1
        rc = self._call()
        if rc != 0:
            raise LlamaError(f"llama_decode failed ({rc}) at position {p}:\n{recent_log()}")
        self.n_past = p + 1

    def decode_rows(self, embeds: np.ndarray, seqs: np.ndarray, positions: np.ndarray, *, outputs: bool) -> None:
        """One ``llama_decode`` of rows of any sequences: row i is ``embeds[i]`` at ``positions[i]`` of sequence
        ``seqs[i]`` (each sequence's rows continue its cached positions, in order).

        ``outputs``: every row gets logits and hidden state (read them with ``logits(i)``/``hidden(i)``), or none
        does (prompt bodies: llama.cpp outputs every row of a batch while embeddings are on, so output rows and
        body rows go in separate calls). At most ``n_batch`` rows, and ``max_outputs`` with outputs.
        """
        n = int(embeds.shape[0])
        if not 0 < n <= self.n_batch or (outputs and n > self.max_outputs):
            raise ValueError(f"decode_rows takes 1..{self.max_outputs if outputs else self.n_batch} rows, got {n}")
        if outputs != self._embeddings_on:
            self._set_embeddings(outputs)
        self._embd[:n] = embeds
        self._set_positions(np.asarray(positions, dtype=np.int32))
        self._seq_id_vals[:n] = seqs
        self._out[:n] = 1 if outputs else 0
        self._batch.n_tokens = n
        rc = self._call()
        self._seq_id_vals[:n] = 0  # the single-sequence calls use sequence 0
        if rc != 0:
            raise LlamaError(f"llama_decode failed ({rc}) for {n} rows of sequences {sorted(set(seqs))}:\n"
                             f"{recent_log()}")

    def seq_remove(self, seq: int, p0: int = 0) -> None:
        """Forget positions >= ``p0`` of sequence ``seq`` (0: all of it, its cells free for reuse)."""
        if not api().llama_memory_seq_rm(self._mem, int(seq), int(p0), -1):
            raise LlamaError(f"llama.cpp could not remove positions >= {p0} of sequence {seq}")

    def seq_length(self, seq: int) -> int:
        """Positions cached for sequence ``seq`` (its highest position + 1; 0 when its cells are free)."""
        return int(api().llama_memory_seq_pos_max(self._mem, int(seq))) + 1

    def seq_state(self, seq: int) -> np.ndarray:
        """The KV state of sequence ``seq`` as bytes (``llama_state_seq_get_data``), for :meth:`set_seq_state`."""
        lc = api()
        size = int(lc.llama_state_seq_get_size(self._ptr, int(seq)))
        buf = np.empty(size, dtype=np.uint8)
        written = int(lc.llama_state_seq_get_data(self._ptr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                                  size, int(seq)))
        return buf[:written]

    def set_seq_state(self, seq: int, data: np.ndarray) -> None:
        """Replace sequence ``seq`` by a state from :meth:`seq_state` of any sequence (same model and settings)."""
        lc = api()
        self.seq_remove(seq)
        data = np.ascontiguousarray(data, dtype=np.uint8)
        read = int(lc.llama_state_seq_set_data(self._ptr, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                               data.size, int(seq)))
        if read == 0 and data.size:
            raise LlamaError(f"llama.cpp could not restore a state into sequence {seq}:\n{recent_log()}")

    def _call(self) -> int:
        """``llama_decode`` of the prepared batch, on the thread count the core share gives (if any)."""
        if self.share is None:
            return self._decode(self._ptr, self._batch)
        with self.share.engine_call() as n:
            if n != self._threads_now:
                api().llama_set_n_threads(self._ptr, n, n)
                self._threads_now = n
            return self._decode(self._ptr, self._batch)

    def _set_positions(self, p: np.ndarray) -> None:
        """The batch's positions for rows at ``p``: section-major ``[p..., p..., p..., 0...]`` for M-RoPE/IMROPE
        (text-like positions), plain ``p`` for RoPE."""
        n = len(p)
        for s in range(self.npos):
            self._pos[s * n:(s + 1) * n] = p if (self.npos == 1 or s < self.npos - 1) else 0

    def _set_embeddings(self, on: bool) -> None:
        api().llama_set_embeddings(self._ptr, bool(on))
        self._embeddings_on = bool(on)

    def _run(self, chunk: np.ndarray, *, outputs: bool) -> None:
        if outputs != self._embeddings_on:
            self._set_embeddings(outputs)
        n = chunk.shape[0]
        self._embd[:n] = chunk
        self._set_positions(np.arange(self.n_past, self.n_past + n, dtype=np.int32))
        self._out[:n] = 1 if outputs else 0
        self._batch.n_tokens = n
        rc = self._call()
        if rc != 0:
            raise LlamaError(f"llama_decode failed ({rc}) for {n} positions at {self.n_past}:\n{recent_log()}")
        self.n_past += n

    # -- readout --------------------------------------------------------------------------------------------

    def _view(self, kind: str, ptr: Any, size: int) -> np.ndarray:
        addr = ctypes.cast(ptr, ctypes.c_void_p).value
        if not addr:
            raise LlamaError(f"llama.cpp returned no {kind} (was the position decoded with an output?)\n"
                             f"{recent_log()}")
        key = (kind, addr)
        view = self._views.get(key)
        if view is None:
            if len(self._views) > 64:
                self._views.clear()
            view = np.ctypeslib.as_array(ctypes.cast(addr, ctypes.POINTER(ctypes.c_float)), shape=(size,))
            self._views[key] = view
        return view

    def logits(self, i: int = -1) -> np.ndarray:
        """Logits (n_vocab,) of output ``i`` of the last decode (a view; copy to keep)."""
        return self._view("logits", self._get_logits(self._ptr, i), self.n_vocab)

    def hidden(self, i: int = -1) -> np.ndarray:
        """Final-normed hidden state (n_embd,) of output ``i`` of the last decode (a view; copy to keep)."""
        return self._view("embd", self._get_embd(self._ptr, i), self.n_embd)

    # -- state ----------------------------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget every position (KV cache cleared, n_past = 0): its pages released where they were located, so a
        short request after a long one holds only what it writes."""
        if self._kv_pages is not None:
            api().llama_memory_clear(self._mem, False)
            self._kv_pages.release()  # reads as zeros, as llama.cpp's own clear writes them
        else:
            api().llama_memory_clear(self._mem, True)
        self.n_past = 0

    @property
    def kv_pages(self) -> KVPages | None:
        """The KV cache's released-on-clear pages, or None where they could not be located."""
        return self._kv_pages

    def truncate(self, n_past: int) -> None:
        """Drop positions >= ``n_past`` (rewind), keeping the earlier KV entries."""
        if not 0 <= n_past <= self.n_past:
            raise ValueError(f"cannot truncate to {n_past}; have {self.n_past} positions")
        if not api().llama_memory_seq_rm(self._mem, 0, n_past, -1):
            raise LlamaError(f"llama.cpp could not remove positions >= {n_past}")
        self.n_past = n_past

    def save_state(self) -> tuple[int, np.ndarray]:
        """(n_past, bytes) of the sequence's KV state, to ``load_state`` later (llama_state_seq_get_data)."""
        lc = api()
        size = int(lc.llama_state_seq_get_size(self._ptr, 0))
        buf = np.empty(size, dtype=np.uint8)
        written = int(lc.llama_state_seq_get_data(self._ptr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                                  size, 0))
        if written == 0 and self.n_past:
            raise LlamaError(f"llama.cpp could not save the sequence state:\n{recent_log()}")
        return self.n_past, buf[:written]

    def load_state(self, state: tuple[int, np.ndarray]) -> None:
        """Replace the sequence by a state from ``save_state`` (same model and context settings)."""
        n_past, buf = state
        lc = api()
        self.clear()
        data = np.ascontiguousarray(buf, dtype=np.uint8)
        read = int(lc.llama_state_seq_set_data(self._ptr, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                               data.size, 0))
        if read == 0 and data.size:
            raise LlamaError(f"llama.cpp could not restore a sequence state:\n{recent_log()}")
        self.n_past = int(n_past)

    def set_threads(self, n_threads: int, n_threads_batch: int | None = None) -> None:
        api().llama_set_n_threads(self._ptr, int(n_threads), int(n_threads_batch or n_threads))
        self._threads_now = int(n_threads)

    @property
    def threads(self) -> tuple[int, int]:
        lc = api()
        return int(lc.llama_n_threads(self._ptr)), int(lc.llama_n_threads_batch(self._ptr))

    def close(self) -> None:
        if getattr(self, "_ptr", None):
            api().llama_free(self._ptr)
            self._ptr = None
            self._views.clear()

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order
        with contextlib.suppress(Exception):
            self.close()
