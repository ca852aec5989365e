"""Network front ends for the runtime: an OpenAI-compatible speech API and a Wyoming server (Home Assistant).

Everything here sits on top of ``qwen3_tts_edge.runtime`` and is installed with the ``server`` extra
(``pip install 'qwen3-tts-edge[server]'``); the runtime core never imports this package. Modules, one job each:

- ``pool``: N engines (each its own ``TTS``, handed out as an ``AsyncTTS``), admission with a bounded FIFO
  queue; requests stream through ``AsyncTTS.astream`` (``runtime/aio.py``) and stop within a frame when their
  client goes away.
- ``audio_formats``: float PCM chunks to pcm / wav / flac / opus / mp3 bytes.
- ``voices``: the voice catalogue (preset speakers plus saved voice files in ``--voices DIR``).
- ``openai_api``: the HTTP app (``/v1/audio/speech`` and friends).
- ``wyoming_server``: the Wyoming event handler.
- ``cli``: the ``serve`` and ``wyoming`` subcommands (plugged into ``runtime/cli.py`` by module name).
"""

from __future__ import annotations

from importlib import import_module

from ..errors import Qwen3TTSEdgeError

INSTALL_HINT = "pip install 'qwen3-tts-edge[server]'"


class ServerExtrasMissing(Qwen3TTSEdgeError):
    """The packages of the ``server`` extra are not installed; the message names the install command."""


def require(*modules: str) -> None:
    """Import-check the server extra's packages; a missing one is one clear line, not a traceback."""
    for name in modules:
        try:
            import_module(name)
        except ImportError as exc:
            raise ServerExtrasMissing(f"the servers need the package {name.split('.')[0]!r} ({exc.name or name} is "
                                      f"not installed); install the server extra: {INSTALL_HINT}") from None
