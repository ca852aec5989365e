"""Describe the machine a benchmark ran on and measure its memory bandwidth.

Autoregressive decoding at batch 1 is bound by how fast weights stream from memory, so every speed figure
is reported next to its bandwidth floor: bytes of weights read per frame / measured bandwidth.
"""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata

import numpy as np


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def memory_bandwidth_gbs(size_mb: int = 512, repeats: int = 5) -> float:
    """Sustained read bandwidth in GB/s: best of ``repeats`` full reductions over a buffer larger than cache.

    A sum reads every byte once (what a GEMV does with weights); the best run is the least disturbed one.
    """
    n = size_mb * 2**20 // 8
    buf = np.ones(n, dtype=np.float64)
    buf.sum()  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.nbytes / best / 1e9


def describe(threads: int | None = None) -> dict:
    """The machine fields of a benchmark report."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads_used": threads,
        "memory_gb": _mem_total_gb(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": _version("onnxruntime"),
        "llama_cpp_python": _version("llama-cpp-python"),
        "numpy": _version("numpy"),
    }
