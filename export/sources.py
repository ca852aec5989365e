"""Turn a MODEL argument into one checkpoint folder in the official layout.

MODEL is a Hugging Face id (``Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice``), a local folder, or
``random:<shape>-<variant>[@seed]``. Whatever it is, exporters get a folder on disk and load it the same
way: there is exactly one loading path, so a random test checkpoint exercises the same code as a real one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..runtime.bundle import TOKENIZER_FILES, sha256_file
from ..runtime.errors import Qwen3TTSEdgeError
from . import shapes
from .random_checkpoint import cached_random_checkpoint

RANDOM_PREFIX = "random:"
_RANDOM_RE = re.compile(r"^random:(?P<shape>[^-@]+)-(?P<variant>[a-z_]+)(?:@(?P<seed>\d+))?$")
_HF_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files that make a folder an official Qwen3-TTS 12 Hz checkpoint.
REQUIRED_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES, "speech_tokenizer/config.json")


class ModelSourceError(Qwen3TTSEdgeError):
    """MODEL could not be resolved; the message says what was expected."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved MODEL: where its checkpoint folder is and how it was obtained."""

    spec: str
    kind: str  # "random" | "local" | "hf"
    path: Path
    shape: str | None = None
    variant: str | None = None
    seed: int | None = None


def parse_random_spec(spec: str) -> tuple[str, str, int]:
    """Split ``random:<shape>-<variant>[@seed]`` into its parts, with a clear error."""
    m = _RANDOM_RE.match(spec)
    if not m or m["shape"] not in shapes.SHAPES or m["variant"] not in shapes.VARIANTS:
        raise ModelSourceError(
            f"bad random model {spec!r}: expected random:<shape>-<variant>[@seed] with shape in "
            f"{{{', '.join(shapes.SHAPES)}}} and variant in {{{', '.join(shapes.VARIANTS)}}}, "
            "e.g. random:tiny-custom_voice@0"
        )
    shape, variant, seed = m["shape"], m["variant"], int(m["seed"] or 0)
    return shape, variant, seed


def check_checkpoint_folder(path: Path) -> None:
    """Raise ModelSourceError unless ``path`` holds the official checkpoint files."""
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    st_weights = (path / "speech_tokenizer" / "model.safetensors").is_file()
    if not has_weights:
        missing.append("model.safetensors")
    if not st_weights:
        missing.append("speech_tokenizer/model.safetensors")
    if missing:
        raise ModelSourceError(
            f"{path} is not a Qwen3-TTS 12 Hz checkpoint folder: missing {', '.join(missing)}"
        )


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelSourceError(
            f"downloading {repo_id} needs huggingface_hub: pip install 'qwen3-tts-edge[export]'"
        ) from exc
    hint = (
        f"to use it offline, download it on a connected machine with `huggingface-cli download {repo_id} "
        f"--local-dir DIR`, copy DIR here and pass DIR as MODEL"
    )
    try:  # a complete snapshot already in the local cache needs no network
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:
        raise ModelSourceError(
            f"cannot download {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no details'}); {hint}"
        ) from exc


def resolve_model(spec: str) -> ModelSource:
    """Resolve MODEL to a checkpoint folder (building or downloading it once when needed)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSourceError("MODEL must be a Hugging Face id, a checkpoint folder or random:<shape>-<variant>")
    spec = spec.strip()
    if spec.startswith(RANDOM_PREFIX):
        shape, variant, seed = parse_random_spec(spec)
        path = cached_random_checkpoint(shape, variant, seed)
        return ModelSource(spec=spec, kind="random", path=path, shape=shape, variant=variant, seed=seed)
    local = Path(spec).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelSourceError(f"{local} is a file; MODEL must be a checkpoint folder")
        check_checkpoint_folder(local)
        return ModelSource(spec=spec, kind="local", path=local.resolve())
    if _HF_ID_RE.match(spec) and not spec.startswith((".", "/", "~")):
        path = _download(spec)
        check_checkpoint_folder(path)
        return ModelSource(spec=spec, kind="hf", path=path)
    raise ModelSourceError(
        f"{spec!r} is neither an existing folder, a Hugging Face id (owner/name) nor random:<shape>-<variant>"
    )


def source_file_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint folder (relative name -> hex), for the manifest."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return {f.relative_to(path).as_posix(): sha256_file(f) for f in files}
