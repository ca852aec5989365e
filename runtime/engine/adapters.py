"""Voice packs on the engines: adapters loaded once, kept in a bounded LRU, set per request or per batch group.

Built at assembly over a talker and predictor that declare ``ADAPTERS`` (the llama.cpp engines). llama.cpp sets
adapters per context, not per sequence, so a context runs one adapter set at a time:

- one request at a time (``max_batch`` 1): :meth:`AdapterCache.activate` sets the request's pack (or none) on
  both engines and returns the key its KV cache must be stored under;
- continuous batching: each request :meth:`~AdapterCache.acquire`\\ s its :class:`AdapterSet` (kept loaded until
  it is released), and the batch scheduler runs one decode per set a frame, switching the context's set
  between them (:meth:`~AdapterCache.set_talker`/:meth:`~AdapterCache.set_predictor`; grouped steps,
  ``runtime/engine/scheduler.py``).

KV computed under one adapter set or scale is never reused under another (the prefix cache keys on
:attr:`AdapterSet.key`). Parsed pack files are not kept with their adapter bytes: once a pack's adapters are
loaded only its metadata stays (:meth:`VoicePack.shell`), and the file is read (and checksummed) again if its
adapters must be loaded again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..voices.voice_pack import VoicePack, VoicePackError, pack_kv_key

DEFAULT_ADAPTER_BYTES = 1 << 30  # loaded adapters kept beyond those in use (a 0.6B rank-64 f16 pack is ~90 MB)
_PACK_FILES = 256  # pack metadata kept by path (no adapter bytes: a speaker row or two each)


@dataclass(frozen=True, eq=False)
class AdapterSet:
    """What one request runs under: the adapters (with scale) for the talker and the predictor, and ``key``, the
    KV-cache key of that set (b"": the base model). ``talker_id``/``predictor_id`` say which sets are the same
    on each engine (None: no adapter there), so requests whose sets match share a decode."""

    key: bytes = b""
    talker_id: tuple[str, float] | None = None
    predictor_id: tuple[str, float] | None = None
    talker: tuple = ()
    predictor: tuple = ()
    digest: str | None = None


BASE = AdapterSet()


@dataclass
class _Loaded:
    talker: Any
    predictor: Any
    nbytes: int
    refs: int = 0  # requests holding it (acquire/release)


class AdapterCache:
    """Packs' adapters loaded into the talker/predictor models, least recently used freed first beyond
    ``max_bytes`` (never one a request holds or a context has set).

    ``lock`` is held around every call into the engines (with continuous batching the scheduler shares it, so
    an adapter is never loaded or freed while a decode runs). ``load_s``: the last load; ``switches`` and
    ``switch_s``: changes of a context's set and the time the last one took.
    """

    def __init__(self, talker: Any, predictor: Any, *, max_bytes: int = DEFAULT_ADAPTER_BYTES) -> None:
        self.talker, self.predictor, self.max_bytes = talker, predictor, int(max_bytes)
        self.lock = threading.RLock()
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._files: OrderedDict[tuple[str, int, int], VoicePack] = OrderedDict()
        self._files_lock = threading.Lock()
        self._on_talker: tuple[str, float] | None = None
        self._on_predictor: tuple[str, float] | None = None
        self.load_s = self.switch_s = 0.0
        self.switches = 0

    # -- pack files ---------------------------------------------------------------------------------------------

    def pack(self, path: str | Path) -> VoicePack:
        """The pack at ``path``: its metadata without adapter bytes while the file is unchanged (size, mtime)
        and its adapters are loaded; else the file read and checksummed (the adapters come from it)."""
        p = Path(path).resolve()
        try:
            st = p.stat()
        except OSError:
            return VoicePack.load(p)  # says the file does not exist
        key = (str(p), st.st_size, st.st_mtime_ns)
        with self._files_lock:
            shell = self._files.get(key)
            if shell is not None:
                self._files.move_to_end(key)
        if shell is not None and shell.digest in self._loaded:  # (read without the engines' lock: a hint)
            return shell
        pack = VoicePack.load(p)
        with self._files_lock:
            self._files[key] = pack.shell(p)
            while len(self._files) > _PACK_FILES:
                self._files.popitem(last=False)
        return pack

    # -- sets -------------------------------------------------------------------------------------------------

    def acquire(self, pack: VoicePack | None, scale: float) -> AdapterSet:
        """The set for ``pack`` at ``scale`` (None or scale 0: :data:`BASE`), its adapters loaded and kept until
        :meth:`release`."""
        if pack is None or scale == 0.0:
            return BASE
        with self.lock:
            entry = self._entry(pack)
            entry.refs += 1
            return self._set_of(pack, entry, float(scale))

    def release(self, aset: AdapterSet) -> None:
        """A request is done with ``aset``; its adapters may be freed beyond the budget."""
        if aset.digest is None:
            return
        with self.lock:
            entry = self._loaded.get(aset.digest)
            if entry is not None:
                entry.refs -= 1
            self._trim()

    def set_talker(self, aset: AdapterSet) -> bool:
        """Make ``aset`` the talker context's set (nothing when it is already); True if it changed."""
        with self.lock:
            if aset.talker_id == self._on_talker:
                return False
            t0 = time.perf_counter()
            self.talker.set_adapters(list(aset.talker))
            self._on_talker = aset.talker_id
            self._switched(t0)
            return True

    def set_predictor(self, aset: AdapterSet) -> bool:
        """Make ``aset`` the predictor context's set; True if it changed."""
        with self.lock:
            if aset.predictor_id == self._on_predictor:
                return False
            t0 = time.perf_counter()
            self.predictor.set_adapters(list(aset.predictor))
            self._on_predictor = aset.predictor_id
            self._switched(t0)
            return True

    @property
    def on_talker(self) -> tuple[str, float] | None:
        """The talker context's set now (its ``talker_id``)."""
        return self._on_talker

    @property
    def on_predictor(self) -> tuple[str, float] | None:
        return self._on_predictor

    def activate(self, pack: VoicePack | None, scale: float) -> bytes:
        """One request at a time: set ``pack`` at ``scale`` on both engines for the next request (None or scale 0:
        the base model) and return the KV-cache key of that set. The set stays loaded while it is on the
        contexts."""
        with self.lock:
            aset = BASE if pack is None or scale == 0.0 else self._set_of(pack, self._entry(pack), float(scale))
            self.set_talker(aset)
            self.set_predictor(aset)
            self._trim()
            return aset.key

    # -- loading and freeing ----------------------------------------------------------------------------------

    def _set_of(self, pack: VoicePack, entry: _Loaded, scale: float) -> AdapterSet:
        ident = (pack.digest, scale)
        return AdapterSet(key=pack_kv_key(pack, scale), talker_id=ident, talker=((entry.talker, scale),),
                          predictor_id=None if entry.predictor is None else ident,
                          predictor=() if entry.predictor is None else ((entry.predictor, scale),),
                          digest=pack.digest)

    def _switched(self, t0: float) -> None:
        self.switches += 1
        self.switch_s = time.perf_counter() - t0

    def _entry(self, pack: VoicePack) -> _Loaded:
        entry = self._loaded.get(pack.digest)
        if entry is not None:
            self._loaded.move_to_end(pack.digest)
            return entry
        if not pack.has_adapters:  # metadata only (its adapters were freed since): read the file again
            want, path = pack.digest, pack.path
            pack = VoicePack.load(path)
            if pack.digest != want:
                raise VoicePackError(f"voice pack {path} changed while it was in use; send the request again")
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
        """Free least recently used adapters beyond the budget, except those held or set on a context."""
        on = {i[0] for i in (self._on_talker, self._on_predictor) if i is not None}
        for digest in list(self._loaded):
            if self.nbytes <= self.max_bytes:
                break
            entry = self._loaded[digest]
            if entry.refs > 0 or digest in on:
                continue
            del self._loaded[digest]
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
