"""Memory pages llama.cpp holds that the process need not keep resident (Linux; elsewhere nothing is released).

Two kinds (bench/README, "Where the memory goes"):

- **A mapped GGUF's pages** (:func:`release_mapped_pages`): what llama.cpp read once at load (the sources of the
  weights it repacks) or never reads (the talker's host-lookup ``token_embd``).
- **The KV cache's pages** (:class:`KVPages`): llama.cpp allocates the whole cache for ``n_ctx`` positions and
  writes zeros over it, so all of it is resident from the start (235 MB for the 0.6B talker at 2048 positions)
  though a request uses a few hundred positions. Released pages read as zeros, which is what the cleared cache
  holds, and come back one page at a time as positions are written.

llama.cpp has no call that returns the cache's address, so :meth:`KVPages.locate` finds it: the pages that
became resident while the context was made, in one run as long as the cache, all zero. Anything else (another
length, a non-zero byte, no ``mincore``) leaves the cache as it is.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_MADV_DONTNEED = 4  # <sys/mman.h> on Linux
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@functools.cache
def _libc() -> Any | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None


def _maps() -> list[list[str]]:
    try:
        return [line.split(maxsplit=5) for line in Path("/proc/self/maps").read_text().splitlines()]
    except OSError:
        return []


def release_mapped_pages(path: Path | str) -> int:
    """Drop this process's resident pages of every mapping of the file ``path``; the bytes released.

    The data stays in the file (and the kernel's page cache): a page read again later is simply mapped in again.
    """
    libc, target = _libc(), str(Path(path).resolve())
    if libc is None:
        return 0
    released = 0
    for fields in _maps():
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if libc.madvise(start, end - start, _MADV_DONTNEED) == 0:
                released += end - start
    return released


def _anonymous_regions() -> list[tuple[int, int]]:
    return [tuple(int(x, 16) for x in f[0].split("-")) for f in _maps()
            if len(f) == 5 or (len(f) == 6 and f[5].startswith("[anon"))]


def _resident(libc: Any, start: int, end: int) -> np.ndarray:
    vec = (ctypes.c_ubyte * ((end - start) // PAGE))()
    if libc.mincore(start, end - start, vec) != 0:
        return np.zeros(len(vec), bool)
    return (np.frombuffer(vec, np.uint8) & 1).astype(bool)


def _zero(address: int, size: int) -> bool:
    return not np.frombuffer((ctypes.c_ubyte * size).from_address(address), np.uint8).any()


class KVPages:
    """The page-aligned span of a context's KV cache, released on :meth:`release` (its contents read as zeros)."""

    def __init__(self, address: int, size: int) -> None:
        self.address, self.size = address, size
        self._libc = _libc()

    @classmethod
    def locate(cls, create: Callable[[], Any], cache_bytes: int) -> tuple[Any, KVPages | None]:
        """``create()`` (makes the context), and the pages of its ``cache_bytes`` KV cache if they can be told
        apart for certain (see the module doc), else None."""
        libc = _libc()
        if libc is None or cache_bytes < 64 * PAGE:
            return create(), None
        before = [(a, b, _resident(libc, a, b)) for a, b in _anonymous_regions()]
        made = create()
        best = (0, 0)  # (address, pages) of the longest run of newly resident pages
        for a, b in _anonymous_regions():
            new = _resident(libc, a, b)
            for c, d, old in before:
                lo, hi = max(a, c), min(b, d)
                if lo < hi:
                    new[(lo - a) // PAGE:(hi - a) // PAGE] &= ~old[(lo - c) // PAGE:(hi - c) // PAGE]
            padded = np.concatenate(([False], new, [False]))
            edges = np.flatnonzero(padded[1:] != padded[:-1])
            for s, e in zip(edges[::2], edges[1::2], strict=True):
                if e - s > best[1]:
                    best = (a + int(s) * PAGE, int(e - s))
        address, pages = best
        while pages and not _zero(address, PAGE):  # the allocator's header shares the first page
            address, pages = address + PAGE, pages - 1
        while pages and not _zero(address + (pages - 1) * PAGE, PAGE):
            pages -= 1
        size = pages * PAGE
        if not cache_bytes - 2 * PAGE <= size <= cache_bytes + PAGE or not _zero(address, size):
            return made, None
        kv = cls(address, size)
        kv.release()
        return made, kv

    def release(self) -> None:
        """Give the pages back; the next read of any of them sees zeros (the cache's cleared state)."""
        self._libc.madvise(self.address, self.size, _MADV_DONTNEED)
