"""The bundle contract: ``manifest.json`` and the files it lists.

An exported bundle is the only thing the runtime and the exporters share. This module defines the
manifest schema, writes it, and loads + verifies a bundle (format version, component set, sizes and
sha256 checksums) so that a stale, truncated or hand-edited bundle fails with a message saying what
to do instead of producing garbage audio. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import Qwen3TTSEdgeError
from .files import atomic_temp

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Components every bundle must hold; stage components (talker, predictor, decoder) are checked by the
# stage that loads them, so a bundle exported with a subset of stages is still valid.
REQUIRED_ROLES = frozenset({"text_tokenizer"})
KNOWN_ROLES = frozenset(
    {"text_tokenizer", "talker", "predictor", "predictor_tables", "predictor_heads", "decoder", "decoder_state",
     "speaker_encoder", "speaker_mel", "codec_encoder", "calibration", "onnx_data"}
)
_HASH_CHUNK = 1 << 22

# Text tokenizer files copied from the checkpoint (the optional one is copied when present).
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
OPTIONAL_TOKENIZER_FILES = ("tokenizer.json",)

# The two voice encoders are exported for Base models only (the other checkpoints have none). Which engine
# runs which component format, and in which precisions, is the engine table: runtime/engine/specs.py.
VOICE_STAGES = ("speaker_encoder", "codec_encoder")

# Metadata keys inside component files.
PREDICTOR_TABLES_ARCH = "qwen3tts_predictor_tables"  # general.architecture of the predictor's host tables GGUF
DECODER_METADATA_KEY = "qwen3_tts_edge.decoder"  # ONNX custom metadata: the streaming decoder's JSON description
GENERATION_METADATA_KEY = "qwen3_tts_edge.generation"  # ONNX custom metadata of the talker / predictor graphs


class BundleError(Qwen3TTSEdgeError):
    """A bundle is missing, malformed, stale or corrupted; the message says how to fix it."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed so multi-GB weights need no extra memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Component:
    """One file of a bundle: what it is for, how it is stored, and how to verify it."""

    role: str
    file: str
    format: str
    precision: str
    sha256: str
    size: int
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, root: Path, file: str, role: str, format: str, precision: str,
                  meta: Mapping[str, Any] | None = None) -> Component:
        """Describe a file already written under ``root``, hashing it."""
        path = Path(root) / file
        return cls(role=role, file=file, format=format, precision=precision, sha256=sha256_file(path),
                   size=path.stat().st_size, meta=dict(meta or {}))


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about a bundle without opening a model file."""

    format_version: int
    source: dict[str, Any]
    model: dict[str, Any]
    token_ids: dict[str, int]
    codec_ids: dict[str, int]
    languages: dict[str, int]
    speakers: dict[str, int]
    speaker_dialects: dict[str, str]
    sampling: dict[str, Any]
    audio: dict[str, Any]
    tools: dict[str, str]
    components: tuple[Component, ...]
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["components"] = [asdict(c) for c in self.components]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Parse a manifest dict, with a clear error for every missing or mistyped field."""
        if not isinstance(data, Mapping):
            raise BundleError("manifest.json must hold a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version!r} is not supported by this qwen3-tts-edge "
                f"(expects {FORMAT_VERSION}); re-export it with `qwen3-tts-edge export MODEL -o BUNDLE`"
            )
        kwargs: dict[str, Any] = {}
        for name, typ in (("source", dict), ("model", dict), ("token_ids", dict), ("codec_ids", dict),
                          ("languages", dict), ("speakers", dict), ("speaker_dialects", dict),
                          ("sampling", dict), ("audio", dict), ("tools", dict), ("components", list)):
            value = data.get(name)
            if not isinstance(value, typ):
                raise BundleError(f"manifest.json: field {name!r} is missing or not a {typ.__name__}")
            kwargs[name] = value
        comps = []
        for i, entry in enumerate(kwargs.pop("components")):
            try:
                comps.append(Component(**entry))
            except TypeError as exc:
                raise BundleError(f"manifest.json: component #{i} is malformed ({exc})") from exc
        return cls(format_version=version, components=tuple(comps), created=str(data.get("created", "")),
                   **kwargs)

    def find(self, role: str, precision: str | None = None) -> list[Component]:
        """Components with ``role`` (and ``precision``, when given)."""
        return [c for c in self.components
                if c.role == role and (precision is None or c.precision == precision)]

    def component(self, role: str, precision: str | None = None) -> Component:
        """The single component for ``role``/``precision``, or a BundleError listing what exists."""
        found = self.find(role, precision)
        if len(found) == 1:
            return found[0]
        have = sorted(c.precision for c in self.find(role))
        if not have:
            raise BundleError(f"this bundle has no {role} component; re-export it with that stage")
        if precision is None:
            raise BundleError(f"this bundle has {role} in several precisions {have}; choose one")
        raise BundleError(f"this bundle has no {role} in precision {precision!r}; available: {have}")


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (temp file + rename) so readers never see half a file, with the
    user's usual file mode (``runtime/files.py``)."""
    root = Path(root)
    fd, tmp = atomic_temp(root / MANIFEST_NAME, suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest.to_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, root / MANIFEST_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return root / MANIFEST_NAME


def validate_components(components: Iterable[Component]) -> None:
    """Reject unknown roles, duplicate files and a missing required role."""
    comps = list(components)
    roles = {c.role for c in comps}
    unknown = roles - KNOWN_ROLES
    if unknown:
        raise BundleError(f"unknown component roles {sorted(unknown)}; known: {sorted(KNOWN_ROLES)}")
    missing = REQUIRED_ROLES - roles
    if missing:
        raise BundleError(f"bundle lacks required components {sorted(missing)}; re-export it")
    files = [c.file for c in comps]
    dupes = {f for f in files if files.count(f) > 1}
    if dupes:
        raise BundleError(f"manifest lists files more than once: {sorted(dupes)}")
    for c in comps:
        if Path(c.file).is_absolute() or ".." in Path(c.file).parts:
            raise BundleError(f"component file {c.file!r} must be a relative path inside the bundle")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    root: Path
    manifest: Manifest

    def path(self, component: Component) -> Path:
        return self.root / component.file


def read_manifest(root: Path) -> Manifest:
    """Parse ``root/manifest.json`` without checking the files it lists."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(f"{root} is not a bundle folder; create one with `qwen3-tts-edge export MODEL -o {root}`")
    if not path.is_file():
        raise BundleError(f"{root} has no {MANIFEST_NAME}: not a qwen3-tts-edge bundle (or an interrupted export)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); re-export the bundle") from exc
    return Manifest.from_dict(data)


def load_bundle(root: Path, verify: bool = True) -> Bundle:
    """Load a bundle, checking format version, component set, sizes and (with ``verify``) checksums.

    ``verify=False`` skips only the sha256 pass (for trusted read-only storage on slow devices); the
    version, component-set and size checks always run.
    """
    root = Path(root)
    manifest = read_manifest(root)
    validate_components(manifest.components)
    for c in manifest.components:
        path = root / c.file
        if not path.is_file():
            raise BundleError(f"bundle file {c.file} ({c.role}) is missing; re-export the bundle")
        size = path.stat().st_size
        if size != c.size:
            raise BundleError(
                f"bundle file {c.file} has {size} bytes, manifest says {c.size}: truncated or replaced; "
                "re-export the bundle"
            )
        if verify and sha256_file(path) != c.sha256:
            raise BundleError(f"bundle file {c.file} fails its sha256 check: corrupted or edited; re-export it")
    return Bundle(root=root, manifest=manifest)
