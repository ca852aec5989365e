"""Where derived artifacts (random checkpoints, converted tokenizers) are cached."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$QWEN3_TTS_EDGE_CACHE`` or ``~/.cache/qwen3-tts-edge``."""
    return Path(os.environ.get("QWEN3_TTS_EDGE_CACHE") or Path.home() / ".cache" / "qwen3-tts-edge")
