"""Execution providers for every ONNX Runtime engine: which of the requested ones this build has, and the
options each needs (TensorRT: fp16 engines cached on disk, so only the first run pays for the build).

TensorRT cannot be installed on the project's machines; the options here follow onnxruntime's documented
TensorRT execution provider settings and are checked as data by the tests, not run.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

CPU = "CPUExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
CACHE_ENV = "QWEN3_TTS_EDGE_TRT_CACHE"  # where TensorRT engines are kept (default ~/.cache/qwen3-tts-edge/tensorrt)


def select_providers(requested: Sequence[str] | None) -> list[str]:
    """Requested providers that this onnxruntime build offers, CPU always last as the fallback."""
    available = ort.get_available_providers()
    wanted = list(requested) if requested else [CPU]
    missing = [p for p in wanted if p not in available]
    if missing:
        warnings.warn(f"execution providers {missing} are not available in this onnxruntime build "
                      f"(available: {available}); falling back", RuntimeWarning, stacklevel=3)
    chosen = [p for p in wanted if p in available]
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


def open_inference_session(path: Path | str, *, threads: int | None = None,
                           providers: Sequence[str] | None = None) -> ort.InferenceSession:
    """A session for one of our graphs: full graph optimisation, ``threads`` intra-op threads (one inter-op),
    the requested providers this build has (CPU last) with their options, and a warning naming any provider
    that was asked for but could not be initialised (e.g. onnxruntime-gpu without its CUDA libraries)."""
    path = Path(path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    chosen = select_providers(providers)
    session = ort.InferenceSession(str(path), options, providers=provider_entries(chosen, path))
    trim_heap()
    fell_back = [p for p in chosen if p not in session.get_providers()]
    if fell_back:
        warnings.warn(f"{path.name}: providers {fell_back} could not be initialised; running on "
                      f"{session.get_providers()}", RuntimeWarning, stacklevel=3)
    return session


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    A session parses its graph's protobuf, copies the initializers out of it and frees it, and glibc keeps most
    of those freed pages: the int8 decoder's session stayed 65 MB larger than its weights (bench/README, "Where
    the memory goes").
    """
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(None).malloc_trim(0)


def tensorrt_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qwen3-tts-edge" / "tensorrt")


def provider_entries(chosen: Sequence[str], graph: Path, *, cache_dir: Path | None = None) -> list[Any]:
    """``providers=`` for an InferenceSession: names, or (name, options) where a provider needs settings.

    TensorRT builds an engine per graph and input-shape profile on first use (minutes on a Jetson); with the
    engine and timing caches on disk later sessions start in seconds. fp16 is what the GPU variants are for.
    """
    out: list[Any] = []
    for name in chosen:
        if name != TENSORRT:
            out.append(name)
            continue
        folder = Path(cache_dir) if cache_dir else tensorrt_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        if not any(folder.glob(f"*{Path(graph).stem}*")):
            print(f"qwen3-tts-edge: building TensorRT engines for {Path(graph).name} (first run only; cached in "
                  f"{folder})", file=sys.stderr)
        out.append((name, {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                           "trt_engine_cache_path": str(folder), "trt_engine_cache_prefix": Path(graph).stem,
                           "trt_timing_cache_enable": True, "trt_timing_cache_path": str(folder)}))
    return out
