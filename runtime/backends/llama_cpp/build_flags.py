"""Which llama.cpp CPU build is safe and fast on this machine: the setup's CMake flags and the runtime's check.

The pinned llama-cpp-python (0.3.36) vendors a llama.cpp whose AMX kernels die with SIGILL on the first
quantised matmul (``tilezero`` without per-thread tile permission; upstream ggml-org/llama.cpp PR #26954,
issue #28756). A native build (``-march=native``) turns them on whenever the CPU lists ``amx_int8``, and
``-DGGML_AMX_*=OFF`` does not help while ``GGML_NATIVE=ON`` (the compiler still defines the AMX macros). So on
an AMX CPU the setup builds with ``GGML_NATIVE=OFF`` and names every other extension the CPU has explicitly
(faster per frame than AVX2 only: bench/results/build-flags-0.6b.md); elsewhere the native build is already
the best one.

This file is standard library only: ``make setup`` runs it as a script before anything else is installed
(``python runtime/backends/llama_cpp/build_flags.py cmake-args``), and the runtime imports it.
"""

from __future__ import annotations

import hashlib
import platform
import re
import sys

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# llama-cpp-python releases whose vendored llama.cpp crashes in its AMX kernels. Remove a version from here only
# after its build with AMX on has run the talker self-check on an AMX machine.
AMX_BROKEN_VERSIONS = frozenset({"0.3.36"})

# /proc/cpuinfo flag -> ggml CMake option, for a non-native x86-64 build. Order is the order they are printed.
X86_FLAG_OPTIONS: tuple[tuple[str, str], ...] = (
    ("sse4_2", "GGML_SSE42"),
    ("avx", "GGML_AVX"),
    ("avx2", "GGML_AVX2"),
    ("fma", "GGML_FMA"),
    ("f16c", "GGML_F16C"),
    ("bmi2", "GGML_BMI2"),
    ("avx_vnni", "GGML_AVX_VNNI"),
    ("avx512f", "GGML_AVX512"),
    ("avx512vbmi", "GGML_AVX512_VBMI"),
    ("avx512_vnni", "GGML_AVX512_VNNI"),
    ("avx512_bf16", "GGML_AVX512_BF16"),
)
AMX_OPTIONS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def cpu_flags(cpuinfo_text: str | None = None) -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    if cpuinfo_text is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpuinfo_text = f.read()
        except OSError:
            return set()
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def is_x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i686", "i386")


def cmake_args(flags: set[str], machine: str | None = None) -> list[str]:
    """CMake options for a llama.cpp CPU build that uses every extension of this CPU except AMX.

    Native everywhere AMX is absent; on an AMX CPU, non-native with each extension the CPU reports.
    """
    if not (is_x86(machine) and "amx_int8" in flags):
        return ["-DGGML_NATIVE=ON"]
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-D{option}={'ON' if flag in flags else 'OFF'}" for flag, option in X86_FLAG_OPTIONS]
    args += [f"-D{option}=OFF" for option in AMX_OPTIONS]
    return args


def build_key(args: str, version: str = LLAMA_CPP_PYTHON_VERSION) -> str:
    """A short key naming one build (version + flags), so a wheel built with other flags is never reused."""
    return hashlib.sha256(f"{version}\n{' '.join(args.split())}".encode()).hexdigest()[:12]


_AMX_INT8_ON = re.compile(r"\bAMX_INT8\s*=\s*1\b")


def unsafe_build_reason(info: str, version: str) -> str | None:
    """Why this llama.cpp build would die with SIGILL here, with the fix; None when it is safe to run.

    ``info`` is ``llama_print_system_info()``; ``version`` is the installed llama-cpp-python version. The
    runtime refuses such a build with this one-line message instead of crashing on the first decode.
    """
    if _AMX_INT8_ON.search(info) and version in AMX_BROKEN_VERSIONS:
        return (
            f"this llama-cpp-python {version} was built with AMX_INT8 = 1, whose vendored llama.cpp crashes "
            "(SIGILL) on this CPU's AMX kernels (upstream ggml-org/llama.cpp #28756); rebuild without AMX: "
            "run `make setup` (it picks safe flags from /proc/cpuinfo), or "
            f"CMAKE_ARGS=\"{' '.join(cmake_args(cpu_flags()))}\" pip install --force-reinstall --no-cache-dir "
            f"--no-deps llama-cpp-python=={version}"
        )
    return None


def main(argv: list[str]) -> int:
    """``cmake-args``: print the CMake options for this machine; ``key ARGS``: print the build key of ARGS."""
    if argv[:1] == ["cmake-args"]:
        print(" ".join(cmake_args(cpu_flags())))
        return 0
    if argv[:1] == ["key"] and len(argv) == 2:
        print(build_key(argv[1]))
        return 0
    print("usage: build_flags.py cmake-args | key 'CMAKE ARGS'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
