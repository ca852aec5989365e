"""Voice packs on the engines: adapters loaded once, kept in a bounded LRU, set per request.

Built at assembly over a talker and predictor that declare ``ADAPTERS`` (the llama.cpp engines), for
``max_batch`` 1: llama.cpp sets adapters per context, so one context runs one adapter set at a time (batching
streams by adapter group is the scheduler's next step). :meth:`AdapterCache.activate` sets a request's pack (or
none) on both engines and returns the key its KV cache must be stored under, so KV computed under one adapter
set or scale is never reused under another.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..voices.voice_pack import VoicePack, pack_kv_key

DEFAULT_ADAPTER_BYTES = 1 << 30  # loaded adapters kept beyond the one in use (a 0.6B rank-64 f16 pack is ~90 MB)
# Parsed pack files kept by path (a load reads and checksums the whole file): at most this many, and this many
# bytes of adapter data (beyond the newest), so many voices do not keep every pack's bytes in memory twice.
_PACK_FILES, _PACK_FILE_BYTES = 16, 256 << 20


@dataclass
class _Loaded:
    talker: Any
    predictor: Any
    nbytes: int


class AdapterCache:
    """Packs' adapters loaded into the talker/predictor models, least recently used freed first beyond
    ``max_bytes`` (never the set in use). ``load_s``/``switch_s``: the last load and the last change of set."""

    def __init__(self, talker: Any, predictor: Any, *, max_bytes: int = DEFAULT_ADAPTER_BYTES) -> None:
        self.talker, self.predictor, self.max_bytes = talker, predictor, int(max_bytes)
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._files: OrderedDict[tuple[str, int, int], VoicePack] = OrderedDict()
        self._current: tuple[str, float] | None = None
        self._lock = threading.Lock()
        self.load_s = self.switch_s = 0.0

    def pack(self, path: str | Path) -> VoicePack:
        """The pack at ``path``, parsed once while the file is unchanged (size and mtime)."""
        p = Path(path).resolve()
        try:
            st = p.stat()
        except OSError:
            return VoicePack.load(p)  # says the file does not exist
        key = (str(p), st.st_size, st.st_mtime_ns)
        with self._lock:
            pack = self._files.get(key)
            if pack is not None:
                self._files.move_to_end(key)
                return pack
        pack = VoicePack.load(p)
        with self._lock:
            self._files[key] = pack
            while len(self._files) > 1 and (len(self._files) > _PACK_FILES or
                                            sum(p.nbytes for p in self._files.values()) > _PACK_FILE_BYTES):
                self._files.popitem(last=False)
        return pack

    def activate(self, pack: VoicePack | None, scale: float) -> bytes:
        """Set ``pack`` at ``scale`` on both engines for the next request (None or scale 0: the base model) and
        return the KV-cache key of that adapter set."""
        with self._lock:
            want = None if pack is None or scale == 0.0 else (pack.digest, float(scale))
            if want != self._current:
                t0 = time.perf_counter()
                if want is None:
                    self.talker.set_adapters([])
                    self.predictor.set_adapters([])
                else:
                    entry = self._entry(pack)
                    self.talker.set_adapters([(entry.talker, scale)])
                    self.predictor.set_adapters([] if entry.predictor is None else [(entry.predictor, scale)])
                self._current = want
                self.switch_s = time.perf_counter() - t0
                self._trim()
            return pack_kv_key(pack, scale)

    def _entry(self, pack: VoicePack) -> _Loaded:
        entry = self._loaded.get(pack.digest)
        if entry is not None:
            self._loaded.move_to_end(pack.digest)
            return entry
        t0 = time.perf_counter()
        talker = self.talker.load_adapter(pack.talker_adapter)
        try:
            predictor = None if not pack.predictor_adapter else self.predictor.load_adapter(pack.predictor_adapter)
        except BaseException:
            talker.close()
            raise
        entry = self._loaded[pack.digest] = _Loaded(talker, predictor, pack.nbytes)
        self.load_s = time.perf_counter() - t0
        return entry

    def _trim(self) -> None:
        """Free least recently used adapters beyond the budget; the set in use stays (it is on the contexts)."""
        in_use = self._current[0] if self._current else None
        for digest in list(self._loaded):
            if self.nbytes <= self.max_bytes:
                break
            if digest == in_use:
                continue
            entry = self._loaded.pop(digest)
            entry.talker.close()
            if entry.predictor is not None:
                entry.predictor.close()

    @property
    def nbytes(self) -> int:
        """Bytes of adapters loaded now."""
        return sum(e.nbytes for e in self._loaded.values())

    @property
    def packs(self) -> int:
        return len(self._loaded)
