"""LoRA adapters on the llama.cpp engines: loaded once per model, set per context (``llama_set_adapters_lora``).

llama.cpp loads an adapter from a file path only, so a pack's GGUF bytes go through a private temporary file that
is deleted as soon as the adapter is in memory (the loader copies the tensors into its own buffers). The
adapter's architecture must be the model's (``qwen3tts`` for the talker, ``qwen3`` for our predictor), which
llama.cpp checks. An adapter belongs to its model: free it before the model (the engines' ``close`` does).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
import weakref
from collections.abc import Sequence
from typing import Any

from .bindings import LlamaContext, LlamaError, LlamaModel, api, recent_log


class LoraAdapter:
    """One GGUF LoRA adapter loaded into one llama.cpp model; ``nbytes`` is its file size (≈ its memory)."""

    def __init__(self, model: LlamaModel, data: bytes, *, what: str = "adapter") -> None:
        lc = api()
        self.model, self.nbytes, self.what = model, len(data), what
        fd, tmp = tempfile.mkstemp(prefix="qwen3-tts-edge-lora-", suffix=".gguf")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self._ptr = lc.llama_adapter_lora_init(model.ptr, tmp.encode())
        finally:
            os.unlink(tmp)
        if not self._ptr:
            raise LlamaError(f"llama.cpp could not load the {what} into {model.path.name} (a {model.arch!r} model):"
                             f"\n{recent_log()}")

    @property
    def ptr(self) -> Any:
        if not self._ptr:
            raise LlamaError(f"{self.what} is freed")
        return self._ptr

    def close(self) -> None:
        """Free the adapter (it must not be set on any context any more)."""
        if getattr(self, "_ptr", None):
            api().llama_adapter_lora_free(self._ptr)
            self._ptr = None


def set_adapters(ctx: LlamaContext, adapters: Sequence[tuple[LoraAdapter, float]]) -> None:
    """Make ``adapters`` (with their scales) the context's whole adapter set; an empty list clears it.

    llama.cpp keeps the set per context (not per sequence) and does nothing when it is unchanged; a change makes
    the next decode re-reserve its graph. The KV cache is not touched: callers key cached KV on the set.
    """
    lc = api()
    n = len(adapters)
    if n == 0:
        rc = lc.llama_set_adapters_lora(ctx.ptr, None, 0, None)
    else:
        ptrs = (lc.llama_adapter_lora_p_ctypes * n)(*[a.ptr for a, _ in adapters])
        scales = (ctypes.c_float * n)(*[float(s) for _, s in adapters])
        rc = lc.llama_set_adapters_lora(ctx.ptr, ptrs, n, scales)
    if rc != 0:
        raise LlamaError(f"llama_set_adapters_lora failed ({rc}):\n{recent_log()}")


class AdapterHost:
    """The ``ADAPTERS`` capability of one engine (a model + its context): adapters it loaded, the set in use."""

    def __init__(self, model: LlamaModel, ctx: LlamaContext, role: str) -> None:
        self.model, self.ctx, self.role = model, ctx, role
        self._loaded: weakref.WeakSet[LoraAdapter] = weakref.WeakSet()

    def load(self, data: bytes) -> LoraAdapter:
        adapter = LoraAdapter(self.model, data, what=f"{self.role} adapter")
        self._loaded.add(adapter)
        return adapter

    def set(self, adapters: Sequence[tuple[LoraAdapter, float]]) -> None:
        set_adapters(self.ctx, adapters)

    def close(self) -> None:
        """Clear the context's set and free every adapter loaded here (before the model is freed)."""
        with contextlib.suppress(Exception):
            if self.ctx._ptr:
                set_adapters(self.ctx, [])
        for a in list(self._loaded):
            a.close()
        self._loaded.clear()
