"""The torch-free runtime's front door: ``from qwen3_tts_edge.runtime import TTS, SpeakOptions``.

Names are imported lazily, so light modules of this package (the build check, the bundle contract) load
without numpy, onnxruntime or llama.cpp.
"""

from __future__ import annotations

from importlib import import_module, metadata
from typing import Any

try:
    __version__ = metadata.version("qwen3-tts-edge")
except metadata.PackageNotFoundError:  # pragma: no cover - a source tree that is not installed
    __version__ = "0+unknown"

_EXPORTS = {
    "TTS": "pipeline", "SpeakOptions": "options", "AudioChunk": "options", "AudioStream": "streaming",
    "StreamStats": "options", "PromptOptions": "options", "SamplingOptions": "options", "Limits": "options",
    "VoicePrompt": "prompt", "PromptError": "prompt", "BundleError": "bundle", "load_bundle": "bundle",
    "Qwen3TTSEdgeError": "errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
