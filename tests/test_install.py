"""The newcomer's install: llama.cpp built safely for this CPU (no AMX crash), refused when it is not, and
the build recorded where results are reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, needs_export
from qwen3_tts_edge.runtime.backends.llama_cpp import build_flags as llama_build
from qwen3_tts_edge.runtime.backends.llama_cpp.build_flags import build_key, cmake_args, cpu_flags, unsafe_build_reason

EXE = str(Path(sys.executable).parent / "qwen3-tts-edge")
XEON_AMX = ("processor : 0\nmodel name : Intel(R) Xeon(R) Processor\nflags : fpu sse sse2 ssse3 fma sse4_1 sse4_2 "
            "avx f16c bmi1 avx2 bmi2 avx512f avx512dq avx512bw avx512vl avx_vnni avx512_bf16 avx512vbmi "
            "avx512_vnni amx_bf16 avx512_fp16 amx_tile amx_int8\n")
EPYC_AVX2 = "processor : 0\nflags : fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c bmi1 avx2 bmi2\n"
JETSON = "processor : 0\nFeatures : fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp\n"
AMX_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
            "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
            "REPACK = 1 |")


def test_amx_cpu_gets_every_extension_but_amx():
    args = cmake_args(cpu_flags(XEON_AMX), "x86_64")
    assert args[0] == "-DGGML_NATIVE=OFF"  # native would define the AMX macros whatever GGML_AMX_* say
    for on in ("AVX", "AVX2", "FMA", "F16C", "BMI2", "AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI",
               "AVX512_BF16"):
        assert f"-DGGML_{on}=ON" in args
    for off in ("AMX_TILE", "AMX_INT8", "AMX_BF16"):
        assert f"-DGGML_{off}=OFF" in args
    assert not any("AMX" in a and a.endswith("=ON") for a in args)


def test_cpus_without_amx_build_native():
    assert cmake_args(cpu_flags(EPYC_AVX2), "x86_64") == ["-DGGML_NATIVE=ON"]
    assert cmake_args(cpu_flags(JETSON), "aarch64") == ["-DGGML_NATIVE=ON"]
    assert cmake_args(set(), "x86_64") == ["-DGGML_NATIVE=ON"]


def test_a_change_of_flags_is_a_new_build():
    a = build_key("-DGGML_NATIVE=ON")
    assert a == build_key("  -DGGML_NATIVE=ON ") and len(a) == 12
    assert a != build_key("-DGGML_NATIVE=OFF -DGGML_AVX2=ON")
    assert a != build_key("-DGGML_NATIVE=ON", version="0.3.37")


def test_setup_script_prints_this_machines_flags():
    script = str(REPO / "runtime/backends/llama_cpp/build_flags.py")
    res = subprocess.run([sys.executable, script, "cmake-args"], capture_output=True, text=True, check=True)
    assert res.stdout.split() == cmake_args(cpu_flags())
    bad = subprocess.run([sys.executable, script], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_amx_build_of_the_pinned_release_is_refused_with_the_fix():
    reason = unsafe_build_reason(AMX_INFO, "0.3.36")
    assert reason and "AMX_INT8 = 1" in reason and "make setup" in reason and "SIGILL" in reason
    assert "\n" not in reason
    assert unsafe_build_reason(AMX_INFO.replace("AMX_INT8 = 1", "AMX_INT8 = 0"), "0.3.36") is None
    assert unsafe_build_reason(AMX_INFO.replace("AMX_INT8 = 1 | ", ""), "0.3.36") is None
    assert unsafe_build_reason(AMX_INFO, "0.3.99") is None  # a release outside the known-broken set


def test_the_installed_build_is_safe_here():
    """The build `make setup` installed on this machine would not crash (CI walks the user's path)."""
    from importlib import metadata

    from qwen3_tts_edge.runtime.backends.llama_cpp import bindings as llama

    info = llama.system_info()
    assert unsafe_build_reason(info, metadata.version("llama-cpp-python")) is None, info


def test_runtime_refuses_a_crashing_build_in_one_line(tiny_bundle, tmp_path, monkeypatch, capsys):
    """Fake the system-info string of an AMX build: speak says why and how to fix, instead of SIGILL."""
    import llama_cpp.llama_cpp as lc

    from qwen3_tts_edge.runtime import cli
    from qwen3_tts_edge.runtime.backends.llama_cpp import bindings as llama

    monkeypatch.setattr(lc, "llama_print_system_info", lambda: AMX_INFO.encode())
    monkeypatch.setattr(llama, "_state", {})  # as in a fresh process: the check runs on first use
    out = tmp_path / "x.wav"
    assert cli.main(["speak", "Hi", "-b", str(tiny_bundle), "--speaker", "ryan", "-o", str(out)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("qwen3-tts-edge: error: this llama-cpp-python 0.3.36 was built with AMX_INT8 = 1")
    assert err.count("\n") == 1 and "make setup" in err
    assert not out.exists()
    with pytest.raises(llama.LlamaError, match="AMX"):
        llama.api()


def test_info_json_and_the_machine_section_name_the_kernels(tiny_bundle):
    res = subprocess.run([EXE, "info", str(tiny_bundle), "--json", "--no-verify"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    machine = json.loads(res.stdout)["machine"]
    from qwen3_tts_edge.runtime.backends.llama_cpp import bindings as llama

    assert machine["llama_cpp_system_info"] == llama.system_info()
    assert "AVX2 = 1" in machine["llama_cpp_system_info"] or "NEON = 1" in machine["llama_cpp_system_info"]
    assert machine["llama_cmake_args_for_this_cpu"] == " ".join(cmake_args(cpu_flags()))


def test_makefile_keys_llama_wheels_by_flags():
    """A change of CMake flags must reach a new wheel folder and stamp (pip's cache keys on the sdist only)."""
    def dry(flags: str) -> str:
        res = subprocess.run(["make", "-n", "-C", str(REPO), f"LLAMA_CMAKE_ARGS={flags}", "-p", "setup"],
                             capture_output=True, text=True)
        return next(line for line in res.stdout.splitlines() if line.startswith("LLAMA_WHEELS :="))

    a, b = dry("-DGGML_NATIVE=ON"), dry("-DGGML_NATIVE=OFF -DGGML_AVX2=ON")
    assert build_key("-DGGML_NATIVE=ON") in a and build_key("-DGGML_NATIVE=OFF -DGGML_AVX2=ON") in b


@needs_export
def test_export_in_a_lean_install_names_the_extra_and_writes_nothing(tmp_path):
    """Without the [export] extra (torch blocked here, as if not installed) export fails before any work."""
    code = ("import sys; sys.modules['torch'] = None; from qwen3_tts_edge.runtime.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "b"
    res = subprocess.run([sys.executable, "-c", code, "export", "random:tiny-custom_voice", "-o", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "qwen3-tts-edge[export]" in res.stderr and "torch" in res.stderr and res.stderr.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_llama_build_module_needs_only_the_standard_library():
    """`make setup` runs it before anything is installed."""
    src = Path(llama_build.__file__).read_text()
    imports = {line.split()[1].split(".")[0] for line in src.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= {"__future__", "hashlib", "platform", "re", "sys"}
