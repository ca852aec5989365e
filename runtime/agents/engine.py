"""The engine a framework plugin speaks with, taken the same way by every plugin.

A plugin is given either ``engine=`` (a loaded ``AsyncTTS`` or ``TTS`` that several agents in one process share,
batched with ``max_batch``) or a bundle with an ``EngineConfig`` and/or engine settings (``threads=4``...), as
``TTS`` takes them; never both, so an agent never silently runs on settings it did not ask for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..aio import AsyncTTS
from ..bundle import Bundle
from ..engine.config import EngineConfig
from ..pipeline import TTS


def take_engine_settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the ``EngineConfig`` fields among a plugin's keyword arguments (the rest are its own)."""
    return {k: kwargs.pop(k) for k in list(kwargs) if k in EngineConfig.field_names()}


def plugin_engine(plugin: str, bundle: str | Path | Bundle | None, config: EngineConfig | None,
                  engine: AsyncTTS | TTS | None, engine_settings: dict[str, Any]) -> AsyncTTS:
    """``engine`` wrapped for asyncio, or a new engine on ``bundle``; ``plugin`` is the class name the errors show
    (``Qwen3TTSService``, ``TTS``)."""
    if engine is not None:
        if bundle is not None or config is not None or engine_settings:
            raise TypeError("give either engine= (a loaded engine to share, with its own settings) or a bundle "
                            f"with engine settings, not both (got bundle={bundle!r}, config={config!r}, "
                            f"settings {sorted(engine_settings)})")
        if isinstance(engine, TTS):
            engine = AsyncTTS(engine)
        if not isinstance(engine, AsyncTTS):
            raise TypeError(f"engine must be a qwen3_tts_edge AsyncTTS or TTS, got {type(engine).__name__}")
        return engine
    if bundle is None:
        raise TypeError(f"{plugin} needs a bundle ({plugin}('path/to/bundle', threads=4)) or a loaded engine to "
                        f"share ({plugin}(engine=AsyncTTS(TTS('path/to/bundle'))))")
    return AsyncTTS(TTS(bundle, config, **engine_settings))
