"""Voice files: a cloned voice saved once and reused, tied to the Base checkpoint that made it.

One safetensors file (read with numpy only): tensor ``x_vector`` (float32 ``[enc_dim]``) and, for ICL voices,
``ref_codes`` (``[T, 16]``); metadata key ``qwen3_tts_edge.voice`` holds JSON with the format version, mode,
reference text, optional default language, ``enc_dim``, the identity of the Base checkpoint (model size and
a hash of its weights; x-vectors are not portable between checkpoints) and the provenance of the reference
audio. An ICL voice may also carry the codec decoder's state after its reference (tensors
``decoder_state.<id>.<name>``, keyed by the sha256 of the decoder graph that made it): its first use restores it
instead of decoding the whole reference. Written atomically; a damaged file, another checkpoint's voice or a
wrong width is refused with the fix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Manifest
from ..errors import Qwen3TTSEdgeError
from ..files import UnreadableTensors, load_tensors, save_tensors
from ..prompt import VoicePrompt

VOICE_FORMAT = 1
METADATA_KEY = "qwen3_tts_edge.voice"
MODES = ("xvec", "icl")
STATE_PREFIX = "decoder_state."


class VoiceError(Qwen3TTSEdgeError):
    """A voice that cannot be used here (damaged, from another checkpoint, wrong mode); says how to fix it."""


def _tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name]).tobytes())
    return h.hexdigest()


def checkpoint_identity(manifest: Manifest) -> dict[str, Any]:
    """Which Base checkpoint a voice belongs to: model size and one hash over its weight files."""
    files = manifest.source.get("files") or {}
    weights = sorted((name, digest) for name, digest in files.items()
                     if name.endswith(".safetensors") and not name.startswith("speech_tokenizer/"))
    digest = hashlib.sha256(json.dumps(weights).encode()).hexdigest()[:16] if weights else "unknown"
    return {"model": manifest.source.get("model"), "size": manifest.model.get("tts_model_size"),
            "weights_sha256": digest}


@dataclass(frozen=True)
class Voice:
    """A cloned voice: x-vector (and, for ICL, reference codes and text) plus where it came from."""

    x_vector: np.ndarray
    mode: str = "xvec"
    ref_codes: np.ndarray | None = None
    ref_text: str | None = None
    language: str | None = None
    checkpoint: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    # decoder graph sha256 -> the decoder's state after ref_codes (only that graph may restore it)
    decoder_states: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise VoiceError(f"voice mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "icl" and (self.ref_codes is None or not self.ref_text):
            raise VoiceError("an ICL voice needs reference codes and the reference transcript")

    @property
    def enc_dim(self) -> int:
        return int(np.asarray(self.x_vector).shape[-1])

    def prompt(self) -> VoicePrompt:
        """What the prompt builder takes: x-vector only, or x-vector + reference codes and text (ICL)."""
        if self.mode == "xvec":
            return VoicePrompt(np.asarray(self.x_vector, np.float32))
        return VoicePrompt(np.asarray(self.x_vector, np.float32), np.asarray(self.ref_codes), self.ref_text)

    def check_for(self, manifest: Manifest) -> None:
        """Refuse a voice that another checkpoint made (the x-vector would mean nothing to this talker)."""
        hidden = int(manifest.model["talker"]["hidden_size"])
        if self.enc_dim != hidden:
            raise VoiceError(f"this voice is {self.enc_dim} wide but the bundle's talker takes {hidden}: it was "
                             f"made with another model size ({self.checkpoint.get('size')}); re-create it with "
                             "`qwen3-tts-edge voice create` on this bundle")
        here = checkpoint_identity(manifest)["weights_sha256"]
        made = self.checkpoint.get("weights_sha256")
        if made and here != "unknown" and made != here:
            raise VoiceError(f"this voice was made with another Base checkpoint ({self.checkpoint.get('model')}); "
                             "re-create it with `qwen3-tts-edge voice create` on this bundle")

    def save(self, path: str | Path) -> Path:
        """Write the voice file atomically (a failed write leaves any old file as it was)."""
        tensors = {"x_vector": np.ascontiguousarray(self.x_vector, dtype=np.float32)}
        if self.ref_codes is not None:
            tensors["ref_codes"] = np.ascontiguousarray(self.ref_codes, dtype=np.int64)
        states = {}
        for i, (decoder_sha, state) in enumerate(sorted(self.decoder_states.items())):
            states[str(i)] = decoder_sha
            tensors.update({f"{STATE_PREFIX}{i}.{name}": np.ascontiguousarray(v) for name, v in state.items()})
        meta = {"format": VOICE_FORMAT, "mode": self.mode, "ref_text": self.ref_text, "language": self.language,
                "enc_dim": self.enc_dim, "checkpoint": self.checkpoint, "provenance": self.provenance,
                "decoder_states": states, "tensors_sha256": _tensors_digest(tensors)}
        return save_tensors(path, tensors, METADATA_KEY, meta)

    @classmethod
    def load(cls, path: str | Path) -> Voice:
        """Read a voice file; a damaged or foreign file is a ``VoiceError`` saying to re-create it."""
        path = Path(path)
        if not path.is_file():
            raise VoiceError(f"voice file {path} does not exist; make one with `qwen3-tts-edge voice create`")
        try:
            tensors, meta = load_tensors(path, METADATA_KEY)
        except UnreadableTensors as exc:
            raise VoiceError(f"{path} is not a readable voice file ({exc}); re-create it with "
                             "`qwen3-tts-edge voice create`") from None
        if meta.get("format") != VOICE_FORMAT:
            raise VoiceError(f"{path} has voice format {meta.get('format')}; this version reads {VOICE_FORMAT}")
        x = tensors.get("x_vector")
        if (x is None or x.ndim != 1 or x.shape[0] != meta.get("enc_dim") or not np.all(np.isfinite(x))
                or _tensors_digest(tensors) != meta.get("tensors_sha256")):
            raise VoiceError(f"{path} is damaged (its tensors do not match their checksum); re-create it with "
                             "`qwen3-tts-edge voice create`")
        states: dict[str, dict[str, np.ndarray]] = {}
        for i, decoder_sha in (meta.get("decoder_states") or {}).items():
            prefix = f"{STATE_PREFIX}{i}."
            states[decoder_sha] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        return cls(x_vector=x, mode=meta["mode"], ref_codes=tensors.get("ref_codes"), ref_text=meta.get("ref_text"),
                   language=meta.get("language"), checkpoint=meta.get("checkpoint") or {},
                   provenance=meta.get("provenance") or {}, decoder_states=states)

    def describe(self) -> dict[str, Any]:
        """The voice's metadata (``voice info``)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("x_vector", "ref_codes", "decoder_states")}
        out.update(enc_dim=self.enc_dim, ref_frames=None if self.ref_codes is None else int(len(self.ref_codes)),
                   primed_decoders=sorted(sha[:16] for sha in self.decoder_states))
        return out
