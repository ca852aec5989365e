"""The one base class of every user-facing error, so callers (and the CLI) catch exactly these.

A ``Qwen3TTSEdgeError`` means the input, the bundle or the machine is not right and the message says how to
fix it; the CLI prints it as one line. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class Qwen3TTSEdgeError(Exception):
    """Base of all user-facing errors (bad bundle, bad request or options, audio, llama.cpp, export)."""
