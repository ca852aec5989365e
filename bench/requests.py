"""The representative request bench and parity make of a bundle: a preset speaker or a design instruction."""

from __future__ import annotations

from typing import Any

from ..runtime.errors import Qwen3TTSEdgeError
from ..runtime.prompt import ModelIds

DEFAULT_INSTRUCT = "A calm, clear voice."


class NoRepresentativeRequest(Qwen3TTSEdgeError):
    """The bundle's model needs something a benchmark cannot supply (Base: a voice prompt)."""


def representative_request(ids: ModelIds, speaker: str | None = None) -> dict[str, Any]:
    """``speaker`` (CustomVoice; default the first preset) or ``instruct`` (VoiceDesign) for ``build_prompt``."""
    if ids.model_type == "custom_voice":
        speakers = sorted(ids.speakers)
        if speaker is not None and speaker not in speakers:
            raise NoRepresentativeRequest(f"unknown speaker {speaker!r}; this bundle has {', '.join(speakers)}")
        return {"speaker": speaker or speakers[0]}
    if ids.model_type == "voice_design":
        return {"instruct": DEFAULT_INSTRUCT}
    raise NoRepresentativeRequest("Base models speak from a voice prompt (speaker-encoder stage), which bench and "
                                  "parity cannot supply yet; use a CustomVoice or VoiceDesign bundle")
