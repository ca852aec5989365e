"""Atomic file writes that keep the user's usual file mode.

Every file we write (bundle manifests, voice files, WAVs) goes to a temp file beside its destination and is
renamed over it, so a reader never sees half a file. ``tempfile.mkstemp`` creates that temp file with mode
0600, which the rename would keep: a bundle copied to another user or mounted into a container could then not
read its own manifest. :func:`atomic_temp` gives the temp file the mode ``open()`` would have (0666 less the
umask).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only swap it, racing other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc (macOS, Windows): swap and restore
    os.umask(mask)
    return mask


def atomic_temp(dest: Path, *, suffix: str = "") -> tuple[int, str]:
    """``mkstemp`` beside ``dest`` (an open descriptor and its path), with the mode a plain ``open`` would give."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent if str(dest.parent) else ".")
    with contextlib.suppress(AttributeError, OSError):  # no fchmod (Windows): the platform default stays
        os.fchmod(fd, 0o666 & ~current_umask())
    return fd, tmp


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file renamed over it (a failed write leaves any old file as it was)."""
    path = Path(path)
    fd, tmp = atomic_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class UnreadableTensors(ValueError):
    """A file that is not a safetensors container with our metadata key; its callers say what to re-make."""


def save_tensors(path: str | Path, tensors: dict, key: str, meta: dict) -> Path:
    """A safetensors file (numpy only) with ``meta`` as JSON under metadata ``key``, written atomically: the one
    container of voice files and voice packs."""
    import json

    from safetensors.numpy import save

    return write_atomic(path, save(tensors, metadata={key: json.dumps(meta, sort_keys=True)}))


def load_tensors(path: Path, key: str) -> tuple[dict, dict]:
    """The tensors and the JSON metadata under ``key`` of a file :func:`save_tensors` wrote; anything else (damaged,
    truncated, another format) is :class:`UnreadableTensors` naming the exception's kind."""
    import json

    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        raw = Path(path).read_bytes()
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        meta = json.loads(json.loads(raw[8:8 + header_len])["__metadata__"][key])
    except (SafetensorError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UnreadableTensors(type(exc).__name__) from None
    return tensors, meta
