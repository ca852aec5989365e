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
