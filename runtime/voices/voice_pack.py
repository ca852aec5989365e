"""Voice packs: a fine-tuned voice as LoRA adapters for one loaded base model, swapped per request.

One safetensors file (read with numpy only): ``talker_adapter`` (uint8: a llama.cpp GGUF LoRA adapter for the
``qwen3tts`` talker), optionally ``predictor_adapter`` (a GGUF adapter for our ``qwen3`` code-predictor GGUF) and
``speaker_rows`` (float32 ``[k, H]``: talker codec-embedding rows a fine-tune wrote, e.g. a new speaker at row
3000); metadata key ``qwen3_tts_edge.voicepack`` holds JSON with the format version, the row of each named
speaker, the default scale, languages, the base checkpoint's identity (adapters are deltas on those exact
weights) and a checksum over every tensor. Written atomically; a damaged file, another base's pack or a scale
outside [0, 2] is refused with the fix. ``export/voice_pack.py`` writes packs; the llama.cpp engine applies them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Manifest
from ..files import UnreadableTensors, load_tensors, save_tensors
from .voice_file import VoiceError, _tensors_digest, checkpoint_identity

PACK_FORMAT = 1
METADATA_KEY = "qwen3_tts_edge.voicepack"
PACK_SUFFIX = ".voicepack"
MAX_SCALE = 2.0
ADAPTER_TYPES = ("f32", "f16", "q8_0")  # adapter tensor types `voice pack` writes (fidelity: README, precisions)
MAKE_HINT = "make it again with `qwen3-tts-edge voice pack PEFT_DIR -b BUNDLE -o NAME.voicepack`"


BASE_WITHOUT_ROWS = (
    "this voice pack has no speaker rows, and a Base bundle has no preset speakers (a Base model speaks a cloned "
    "voice, which a pack cannot be combined with): make the pack with --speaker-row NAME=ROW naming the row the "
    "fine-tune wrote (the official Base fine-tune writes its speaker at row 3000), or use a CustomVoice bundle "
    "with packs trained on that CustomVoice model")


class VoicePackError(VoiceError):
    """A voice pack that cannot be used here (damaged, for another base, bad scale, wrong engine); says the fix."""


def check_scale(scale: Any) -> float:
    """``scale`` as a float in [0, 2] (0: the base model; public recipes use 0.3-0.35 and 1 is the trained update)."""
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise VoicePackError(f"voice scale must be a number in [0, {MAX_SCALE:g}], got {scale!r}") from None
    if not (math.isfinite(s) and 0.0 <= s <= MAX_SCALE):
        raise VoicePackError(f"voice scale must be in [0, {MAX_SCALE:g}], got {scale!r}")
    return s


def pack_identity(manifest: Manifest) -> dict[str, Any]:
    """Which base a pack belongs to: the voice-file checkpoint identity plus the variant (CustomVoice, Base...)."""
    return {**checkpoint_identity(manifest), "variant": manifest.model.get("tts_model_type")}


def is_pack_path(voice: Any) -> bool:
    """Whether a voice given as a path names a voice pack (by its suffix)."""
    return isinstance(voice, str | Path) and Path(voice).suffix == PACK_SUFFIX


@dataclass(frozen=True, eq=False)
class VoicePack:
    """LoRA adapters (GGUF bytes) + codec-row overrides + defaults, tied to the base checkpoint they were trained on."""

    talker_adapter: bytes
    predictor_adapter: bytes | None = None
    speakers: dict[str, int] = field(default_factory=dict)  # speaker name -> codec-embedding row
    speaker_rows: np.ndarray | None = None  # (len(speakers), H) float32, in sorted-name order
    scale: float = 1.0
    languages: tuple[str, ...] = ()
    checkpoint: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # adapters' ranks, modules and provenance (`voice info`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_scale(self.scale))
        object.__setattr__(self, "speakers", {str(k).lower(): int(v) for k, v in self.speakers.items()})
        object.__setattr__(self, "languages", tuple(self.languages))
        if not self.talker_adapter:
            raise VoicePackError("a voice pack needs a talker adapter")
        rows = self.speaker_rows
        if self.speakers and (rows is None or rows.ndim != 2 or rows.shape[0] != len(self.speakers)):
            raise VoicePackError(f"{len(self.speakers)} speaker rows named but "
                                 f"{None if rows is None else rows.shape} row vectors given")
        object.__setattr__(self, "_digest", _tensors_digest(self._tensors()))
        object.__setattr__(self, "_nbytes", len(self.talker_adapter) + len(self.predictor_adapter or b""))
        object.__setattr__(self, "_path", None)

    def shell(self, path: str | Path) -> VoicePack:
        """This pack without its adapter bytes, read from ``path``: what a cache keeps once the adapters are
        loaded (metadata, speaker rows, digest, size); :attr:`path` says where to read them again."""
        if not self.has_adapters:
            return self
        shell = object.__new__(VoicePack)
        for name, value in self.__dict__.items():
            object.__setattr__(shell, name, value)
        object.__setattr__(shell, "talker_adapter", b"")
        object.__setattr__(shell, "predictor_adapter", None)
        object.__setattr__(shell, "_path", Path(path))
        return shell

    @property
    def has_adapters(self) -> bool:
        """False for a :meth:`shell` (its adapters must be read from :attr:`path`)."""
        return bool(self.talker_adapter)

    @property
    def path(self) -> Path | None:
        """The file a :meth:`shell` came from (None for a full pack)."""
        return self._path  # type: ignore[attr-defined]

    def _tensors(self) -> dict[str, np.ndarray]:
        out = {"talker_adapter": np.frombuffer(self.talker_adapter, dtype=np.uint8)}
        if self.predictor_adapter:
            out["predictor_adapter"] = np.frombuffer(self.predictor_adapter, dtype=np.uint8)
        if self.speakers:
            out["speaker_rows"] = np.ascontiguousarray(self.speaker_rows, dtype=np.float32)
        return out

    @property
    def digest(self) -> str:
        """sha256 over every tensor: the pack's identity (adapter cache and KV-cache keys)."""
        return self._digest  # type: ignore[attr-defined]

    @property
    def nbytes(self) -> int:
        """Bytes of adapter weights (what loading it adds to the engines' memory; a shell's too)."""
        return self._nbytes  # type: ignore[attr-defined]

    def rows(self) -> dict[int, np.ndarray]:
        """Codec-embedding row id -> its vector (float32 (H,))."""
        return {row: np.asarray(self.speaker_rows[i], np.float32) for i, (_, row) in
                enumerate(sorted(self.speakers.items()))}

    def check_for(self, manifest: Manifest) -> None:
        """Refuse a pack trained on another base (adapters are deltas on its exact weights) or that does not fit."""
        need, here = self.checkpoint, pack_identity(manifest)
        wrong = [k for k in ("variant", "size", "weights_sha256")
                 if need.get(k) and here.get(k) not in (None, "unknown") and need[k] != here[k]]
        if wrong:
            raise VoicePackError(f"this voice pack was made for base {need.get('model')} ({need.get('size')} "
                                 f"{need.get('variant')}, weights {need.get('weights_sha256')}), but this bundle is "
                                 f"{here.get('model')} ({here.get('size')} {here.get('variant')}, weights "
                                 f"{here.get('weights_sha256')}); use a bundle exported from that checkpoint, or "
                                 f"{MAKE_HINT} on this bundle")
        hidden = int(manifest.model["talker"]["hidden_size"])
        vocab = int(manifest.model["talker"]["vocab_size"])
        codebook = int(manifest.model["predictor"]["vocab_size"])
        if self.speakers:
            if self.speaker_rows.shape[1] != hidden:
                raise VoicePackError(f"the pack's speaker rows are {self.speaker_rows.shape[1]} wide but the talker "
                                     f"takes {hidden}; {MAKE_HINT}")
            bad = {n: r for n, r in self.speakers.items() if not codebook <= r < vocab}
            if bad:
                raise VoicePackError(f"speaker rows {bad} are outside the control/speaker rows [{codebook}, {vocab})")
        kind = manifest.model.get("tts_model_type")
        if self.speakers and kind not in ("custom_voice", "base"):
            raise VoicePackError(f"speaker rows need a CustomVoice or Base bundle (a {kind} prompt has no speaker row)")
        if kind == "base" and not self.speakers:
            raise VoicePackError(BASE_WITHOUT_ROWS)

    def save(self, path: str | Path) -> Path:
        """Write the pack atomically (a failed write leaves any old file as it was)."""
        if not self.has_adapters:
            raise VoicePackError("this is a voice pack's metadata without its adapters (a cache's shell); save the "
                                 f"pack read from {self.path} instead")
        tensors = self._tensors()
        meta = {"format": PACK_FORMAT, "speakers": self.speakers, "scale": self.scale,
                "languages": list(self.languages), "checkpoint": self.checkpoint, "info": self.info,
                "tensors_sha256": self.digest}
        return save_tensors(path, tensors, METADATA_KEY, meta)

    @classmethod
    def load(cls, path: str | Path) -> VoicePack:
        """Read a pack; a truncated, tampered or foreign file is a ``VoicePackError`` saying to re-make it."""
        path = Path(path)
        if not path.is_file():
            raise VoicePackError(f"voice pack {path} does not exist; {MAKE_HINT}")
        try:
            tensors, meta = load_tensors(path, METADATA_KEY)
        except UnreadableTensors as exc:
            raise VoicePackError(f"{path} is not a readable voice pack ({exc}); {MAKE_HINT}") from None
        if meta.get("format") != PACK_FORMAT:
            raise VoicePackError(f"{path} has voice-pack format {meta.get('format')}; this version reads "
                                 f"{PACK_FORMAT}")
        if "talker_adapter" not in tensors or _tensors_digest(tensors) != meta.get("tensors_sha256"):
            raise VoicePackError(f"{path} is damaged (its tensors do not match their checksum); {MAKE_HINT}")
        rows = tensors.get("speaker_rows")
        if rows is not None and not np.all(np.isfinite(rows)):
            raise VoicePackError(f"{path} has non-finite speaker rows; {MAKE_HINT}")
        pred = tensors.get("predictor_adapter")
        return cls(talker_adapter=tensors["talker_adapter"].tobytes(),
                   predictor_adapter=None if pred is None else pred.tobytes(), speakers=meta.get("speakers") or {},
                   speaker_rows=rows, scale=meta.get("scale", 1.0), languages=tuple(meta.get("languages") or ()),
                   checkpoint=meta.get("checkpoint") or {}, info=meta.get("info") or {})

    def describe(self) -> dict[str, Any]:
        """The pack's metadata (``voice info``)."""
        return {"kind": "voice pack", "scale": self.scale, "languages": list(self.languages),
                "speakers": self.speakers, "checkpoint": self.checkpoint, "talker_adapter_bytes":
                len(self.talker_adapter), "predictor_adapter_bytes": len(self.predictor_adapter or b""),
                "sha256": self.digest, **self.info}


class PackTables:
    """A request's embedding tables: the engine's, with the pack's codec-embedding rows in place of the base's.

    Only rows at or above the codebook size can be overridden (``check_for``), so the frame sums and the
    predictor's codebook-0 rows are the base's; nothing shared is modified (other requests see the base rows).
    """

    def __init__(self, base: Any, rows: dict[int, np.ndarray]) -> None:
        self.base, self._rows = base, rows
        self.hidden_size = base.hidden_size

    def text_embeds(self, ids) -> np.ndarray:
        return self.base.text_embeds(ids)

    def codec_embeds(self, ids) -> np.ndarray:
        out = np.array(self.base.codec_embeds(ids), dtype=np.float32, copy=True)
        for i, row in enumerate(np.asarray(ids, dtype=np.int64).reshape(-1)):
            vec = self._rows.get(int(row))
            if vec is not None:
                out[i] = vec
        return out

    def frame_embeds(self, codes) -> np.ndarray:
        return self.base.frame_embeds(codes)


def pack_kv_key(pack: VoicePack | None, scale: float) -> bytes:
    """What a talker KV state computed under ``pack`` at ``scale`` is keyed by (empty: the base model)."""
    if pack is None or scale == 0.0:
        return b""
    return hashlib.sha256(f"{pack.digest}:{scale!r}".encode()).digest()
