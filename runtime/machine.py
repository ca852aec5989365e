"""What machine and which builds ran: recorded by ``info --json`` and every ``bench`` report.

Speed figures mean little without the kernels behind them, so the description carries llama.cpp's own
system-info line (which SIMD paths it compiled: AVX2, AVX512, AMX, ...) and the CMake flags the setup would
choose for this CPU. Torch-free, and safe on a llama.cpp build the runtime would refuse (it only reads).
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

from .backends.llama_cpp.build_flags import cmake_args, cpu_flags

_PACKAGES = ("onnxruntime", "llama-cpp-python", "numpy")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def package_version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def llama_system_info() -> str:
    """llama.cpp's system-info line, read without initialising a backend (works on a refused build too)."""
    try:
        import llama_cpp
    except ImportError as exc:
        return f"unavailable ({exc})"
    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def describe() -> dict:
    """The machine section of ``info --json`` and of benchmark reports."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": mem_total_gb(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        **{pkg.replace("-", "_"): package_version(pkg) for pkg in _PACKAGES},
        "llama_cpp_system_info": llama_system_info(),
        "cpu_simd_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4", "bmi"))),
        "llama_cmake_args_for_this_cpu": " ".join(cmake_args(flags)),
    }
