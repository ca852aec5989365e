"""The engine layer: what a ``TTS`` runs on.

- ``config.py``: :class:`EngineConfig`, every engine setting in one record, and the CLI flags made from it;
- ``specs.py``: the :data:`ENGINE_SPECS` table, one row per engine (format, precisions, preference, loader,
  exporter);
- ``contract.py``: the Protocols engines implement, their capabilities, and the check run once at assembly;
- ``assemble.py``: :func:`assemble` (bundle + config -> :class:`Engines`, stages loaded on first use).

Where things go: a new engine (TensorRT, say) is a sub-package of ``runtime/backends/`` implementing the
contract, one row in ``specs.py`` and one export stage; a batched scheduler is an engine that implements the
same contract over many sequences; a LoRA adapter is an engine capability and part of the prefix-cache key.
Light: importing this package loads no engine.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "EngineConfig": "config", "add_engine_arguments": "config", "TALKER_CONTEXT": "config",
    "EngineSpec": "specs", "ENGINE_SPECS": "specs", "GENERATION_ENGINES": "specs",
    "Engines": "assemble", "assemble": "assemble",
    "KV_STATE": "contract", "DECODER_PRIMED_CACHE": "contract", "check_engine": "contract",
    "EngineContractError": "contract", "GenerationEngines": "contract", "StepOutput": "contract",
    "Placement": "contract", "ResidualSampling": "contract",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
