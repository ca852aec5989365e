"""The torch-free runtime's front door: ``from qwen3_tts_edge.runtime import TTS, AsyncTTS, EngineConfig``.

What users touch: ``TTS`` / ``AsyncTTS`` (sync and async speech), ``EngineConfig`` (which engines, precisions,
threads), ``SpeakOptions`` and its groups (per request), ``Voice`` (what ``create_voice`` returns and voice
files hold), ``VoicePack`` (LoRA voice packs), ``TextPieces`` (push-style incremental text), ``AudioChunk`` /
``AudioStream`` / ``StreamStats`` (what comes back) and the errors. Names are imported lazily, so light modules
of this package (the build check, the bundle contract) load without numpy, onnxruntime or llama.cpp.
"""

from __future__ import annotations

from importlib import import_module, metadata
from typing import Any

try:
    __version__ = metadata.version("qwen3-tts-edge")
except metadata.PackageNotFoundError:  # pragma: no cover - a source tree that is not installed
    __version__ = "0+unknown"

_EXPORTS = {
    "TTS": "pipeline", "AsyncTTS": "aio", "EngineConfig": "engine.config", "SpeakOptions": "options",
    "PromptOptions": "options", "SamplingOptions": "options", "Limits": "options", "AudioChunk": "options",
    "AudioStream": "streaming", "StreamStats": "options", "Voice": "voices.voice_file", "load_bundle": "bundle",
    "Qwen3TTSEdgeError": "errors", "BundleError": "bundle", "PromptError": "prompt", "VoiceError": "voices.voice_file",
    "TextError": "text_feed", "TextPieces": "text_feed", "VoicePack": "voices.voice_pack",
    "VoicePackError": "voices.voice_pack",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
