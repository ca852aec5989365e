"""Locate llama.cpp's HF -> GGUF converter (with its vendored gguf-py) from the llama-cpp-python sdist.

The converter that knows Qwen3-TTS (``conversion/qwen3tts.py``, architecture ``qwen3tts``) ships only inside
the llama-cpp-python 0.3.36 source distribution (under ``vendor/llama.cpp``); PyPI ``gguf`` 0.19.0 lacks
``MODEL_ARCH.QWEN3TTS``, so the vendored ``gguf-py`` must come first on ``sys.path`` when it runs.

Lookup order:
1. ``$QWEN3_TTS_EDGE_LLAMA_CPP_SRC``: an unpacked sdist (its root or its ``vendor/llama.cpp`` folder).
2. ``<cache_root>/llama-cpp-src/<version>``: a previous extraction.
3. ``pip download --no-binary :all: --no-deps llama-cpp-python==<version>`` once, extracting only the converter
   files into the cache (atomically: a temp folder renamed into place).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from ..runtime.errors import Qwen3TTSEdgeError
from .cache import cache_root

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
ENV_VAR = "QWEN3_TTS_EDGE_LLAMA_CPP_SRC"
# What the converters need from vendor/llama.cpp (relative paths; folders are taken whole).
LORA_CONVERTER = "convert_lora_to_gguf.py"
_NEEDED = ("convert_hf_to_gguf.py", LORA_CONVERTER, "conversion", "gguf-py", "LICENSE")
_MARKERS = ("convert_hf_to_gguf.py", "conversion/qwen3tts.py", "gguf-py/gguf/constants.py")


class LlamaCppSourceError(Qwen3TTSEdgeError):
    """The converter source could not be found or fetched; the message says how to provide it."""


def _as_converter_dir(path: Path) -> Path | None:
    for cand in (path, path / "vendor" / "llama.cpp"):
        if all((cand / m).is_file() for m in _MARKERS):
            return cand
    return None


def _check_qwen3tts(folder: Path) -> None:
    constants = (folder / "gguf-py" / "gguf" / "constants.py").read_text(encoding="utf-8", errors="replace")
    if "QWEN3TTS" not in constants:
        raise LlamaCppSourceError(
            f"{folder} has a gguf-py without MODEL_ARCH.QWEN3TTS; use the llama-cpp-python "
            f"{LLAMA_CPP_PYTHON_VERSION} sdist"
        )


def cached_source_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return cache_root() / "llama-cpp-src" / version


def converter_dir(*, download: bool = True, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Folder holding ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/`` (see module doc)."""
    env = os.environ.get(ENV_VAR)
    if env:
        found = _as_converter_dir(Path(env).expanduser())
        if found is None:
            raise LlamaCppSourceError(
                f"${ENV_VAR}={env} is not an unpacked llama-cpp-python sdist: expected "
                f"{', '.join(_MARKERS)} there or under vendor/llama.cpp"
            )
        _check_qwen3tts(found)
        return found
    cached = cached_source_dir(version)
    found = _as_converter_dir(cached)
    if found is not None:
        return found
    if not download:
        raise LlamaCppSourceError(f"no converter source at {cached} and downloading is disabled")
    return _download_and_extract(cached, version)


def _safe_member(name: str, prefix: str) -> str | None:
    """The path below ``prefix`` for a needed sdist member, or None (also rejects absolute/`..` paths)."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts:
        return None
    parts = p.parts
    pre = PurePosixPath(prefix).parts
    if len(parts) <= len(pre) or parts[:len(pre)] != pre:
        return None
    rel = parts[len(pre):]
    return str(PurePosixPath(*rel)) if rel[0] in _NEEDED else None


def _download_and_extract(dest: Path, version: str) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
               "--disable-pip-version-check", f"llama-cpp-python=={version}", "-d", str(work / "dl")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted((work / "dl").glob("llama_cpp_python-*.tar.gz")) if (work / "dl").is_dir() else []
        if proc.returncode != 0 or not sdists:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
            raise LlamaCppSourceError(
                f"could not download the llama-cpp-python {version} sdist (needed once for its GGUF converter); "
                f"are you offline? On a connected machine run `pip download --no-binary :all: --no-deps "
                f"llama-cpp-python=={version}`, unpack it and set ${ENV_VAR} to the unpacked folder.\n"
                f"pip said:\n{tail}"
            )
        out = work / "src"
        out.mkdir()
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp"
        with tarfile.open(sdists[0], "r:gz") as tar:
            for member in tar.getmembers():
                rel = _safe_member(member.name, prefix)
                if rel is None or not (member.isfile() or member.isdir()):
                    continue
                target = out / rel
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if src is None:
                    continue
                with src, open(target, "wb") as f:
                    shutil.copyfileobj(src, f)
        if _as_converter_dir(out) is None:
            raise LlamaCppSourceError(f"the llama-cpp-python {version} sdist lacks the Qwen3-TTS converter files")
        _check_qwen3tts(out)
        try:
            os.replace(out, dest)
        except OSError:
            if _as_converter_dir(dest) is None:  # not a concurrent extractor's win
                raise
        return dest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def lora_converter_dir(*, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """:func:`converter_dir`, also holding ``convert_lora_to_gguf.py`` (PEFT LoRA -> GGUF adapter).

    Caches extracted before voice packs existed lack it: the sdist is fetched again and that one file is added
    (atomically, so a converter running from the folder meanwhile is not disturbed).
    """
    folder = converter_dir(version=version)
    if (folder / LORA_CONVERTER).is_file():
        return folder
    if os.environ.get(ENV_VAR):
        raise LlamaCppSourceError(f"${ENV_VAR}={os.environ[ENV_VAR]} has no {LORA_CONVERTER}; point it at an unpacked "
                                  f"llama-cpp-python {version} sdist")
    fresh = _download_and_extract(folder.with_name(f".{folder.name}.lora-{os.getpid()}"), version)
    try:
        if not (fresh / LORA_CONVERTER).is_file():
            raise LlamaCppSourceError(f"the llama-cpp-python {version} sdist lacks {LORA_CONVERTER}")
        tmp = folder / f".{LORA_CONVERTER}.{os.getpid()}"
        shutil.copyfile(fresh / LORA_CONVERTER, tmp)
        os.replace(tmp, folder / LORA_CONVERTER)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return folder


def converter_env(folder: Path) -> dict[str, str]:
    """Environment for running the converter: vendored gguf-py first on the path, never PyPI gguf."""
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    paths = [str(folder / "gguf-py"), str(folder)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


def run_converter(checkpoint_dir: Path, outfile: Path, outtype: str = "f32", *, timeout: float | None = None,
                  extra_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run ``convert_hf_to_gguf.py`` on ``checkpoint_dir`` in a subprocess; raise with its log tail on failure."""
    folder = converter_dir()
    cmd = [sys.executable, str(folder / "convert_hf_to_gguf.py"), str(checkpoint_dir), "--outtype", outtype,
           "--outfile", str(outfile), *extra_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=converter_env(folder), timeout=timeout)
    if proc.returncode != 0 or not Path(outfile).is_file():
        tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-15:])
        raise LlamaCppSourceError(f"convert_hf_to_gguf.py failed on {checkpoint_dir} (exit {proc.returncode}):\n{tail}")
    return proc
