"""The ``serve`` and ``wyoming`` subcommands as a user starts them, and the servers' place in the layers."""

from __future__ import annotations

import ast
import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from conftest import REPO

EXE = str(Path(sys.executable).parent / "qwen3-tts-edge")
SERVER_ONLY = {"fastapi", "starlette", "uvicorn", "multipart", "python_multipart", "wyoming", "zeroconf", "openai"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(proc: subprocess.Popen, pattern: str, timeout: float = 60) -> re.Match:
    """Read the server's stderr until a line matches (uvicorn and our banner both go there)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    proc.kill()
    raise AssertionError(f"server never printed {pattern!r}; stderr: {''.join(seen)}")


def _stop(proc: subprocess.Popen) -> str:
    """Ctrl+C: the server shuts down (exit 130 with one line, as every interrupted command) within 20 s.

    A shutdown that had to be cut off by the server's own deadline (``exit_if_stuck``) still stops, as a user needs,
    but its stacks are reported as a warning; one that does not stop at all fails with the stacks ``kill -USR1``
    prints."""
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # the servers dump every thread's stack on SIGUSR1
        time.sleep(2)
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the server did not exit within 20 s of SIGINT; its stacks:\n{err}") from None
    assert proc.returncode in (0, 130) and "Traceback" not in err, err
    if "shutdown did not finish" in err or "Timeout (0:" in err:
        warnings.warn(f"the server's shutdown was cut off by its deadline; stacks:\n{err}", stacklevel=2)
    return err


def test_serve_from_the_command_line_with_an_api_key(tiny_bundle):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    port = _free_port()
    key_file = tiny_bundle.parent / "serve-test.key"
    key_file.write_text("k1\n")  # a key in a file, not on the command line where `ps` shows it
    proc = subprocess.Popen([EXE, "serve", "-b", str(tiny_bundle), "--port", str(port), "--api-key-file",
                             str(key_file), "--max-frames", "4", "--threads", "1", "--backend", "onnxruntime"],
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(proc, r"onnxruntime talker fp32, decoder fp32")  # the engine options reach every worker
        _wait_for(proc, r"Uvicorn running on")
        base = f"http://127.0.0.1:{port}/v1"
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=base, api_key="nope", max_retries=0).audio.speech.create(
                model="tts-1", voice="ryan", input="Hello.")
        assert "--api-key" in e.value.message
        client = openai.OpenAI(base_url=base, api_key="k1", max_retries=0, timeout=60)
        pcm = client.audio.speech.create(model="tts-1", voice="ryan", input="Hello.", response_format="pcm").content
        assert 0 < len(pcm) <= 4 * 3840 and len(pcm) % 3840 == 0  # --max-frames caps every request
    finally:
        _stop(proc)


def _serve_args(*argv: str):
    import argparse

    from qwen3_tts_edge.runtime.servers.cli import add_serve_arguments

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return p.parse_args(["-b", "unused", *argv])


def test_api_key_sources_and_their_order(tmp_path):
    from qwen3_tts_edge.runtime.servers.cli import API_KEY_ENV, ServeError, api_key

    env = {API_KEY_ENV: "from-env"}
    assert api_key(_serve_args(), env) == "from-env"
    assert api_key(_serve_args(), {}) is None
    (tmp_path / "k").write_text("  from-file\n")
    assert api_key(_serve_args("--api-key-file", str(tmp_path / "k")), env) == "from-file"
    assert api_key(_serve_args("--api-key", "flag", "--api-key-file", str(tmp_path / "k")), env) == "flag"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ServeError, match="is empty; write the key into it"):
        api_key(_serve_args("--api-key-file", str(tmp_path / "empty")), env)
    with pytest.raises(ServeError, match="No such file"):
        api_key(_serve_args("--api-key-file", str(tmp_path / "missing")), env)


def test_exposure_warnings_and_allowed_hosts():
    from qwen3_tts_edge.runtime.servers.cli import allowed_hosts, exposure_warnings

    lan = _serve_args("--host", "0.0.0.0")
    [warning] = exposure_warnings(lan, None)
    assert "without an API key" in warning and "QWEN3_TTS_EDGE_API_KEY" in warning
    assert exposure_warnings(lan, "k") == [] and exposure_warnings(_serve_args(), None) == []
    assert "`ps`" in exposure_warnings(_serve_args("--api-key", "k"), "k")[0]
    assert allowed_hosts(_serve_args()) == ["127.0.0.1", "::1", "localhost"]  # loopback bind: loopback names
    assert allowed_hosts(_serve_args("--host", "::1")) == ["127.0.0.1", "::1", "localhost"]
    assert allowed_hosts(lan) is None  # a LAN bind answers any name unless told
    assert allowed_hosts(_serve_args("--host", "0.0.0.0", "--allowed-hosts", "tts.lan, 192.168.1.5")) == \
        ["tts.lan", "192.168.1.5"]
    assert allowed_hosts(_serve_args("--allowed-hosts", "*")) is None


def test_wyoming_from_the_command_line(tiny_bundle):
    pytest.importorskip("wyoming")
    from wyoming.client import AsyncTcpClient
    from wyoming.info import Describe, Info

    port = _free_port()
    proc = subprocess.Popen([EXE, "wyoming", "-b", str(tiny_bundle), "--uri", f"tcp://127.0.0.1:{port}",
                             "--threads", "1"], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(proc, r"Wyoming TTS on")

        async def describe():
            for _ in range(100):  # the banner comes just before the socket opens
                try:
                    async with AsyncTcpClient("127.0.0.1", port) as c:
                        await c.write_event(Describe().event())
                        return Info.from_event(await c.read_event())
                except OSError:
                    await asyncio.sleep(0.1)
            raise AssertionError("wyoming server did not accept connections")

        info = asyncio.run(describe())
        assert info.tts[0].supports_synthesize_streaming and "ryan" in [v.name for v in info.tts[0].voices]
        proc.send_signal(signal.SIGUSR1)  # stacks on demand; the server keeps serving
        assert asyncio.run(describe()).tts[0].voices
    finally:
        err = _stop(proc)
    assert re.search(r"[Tt]hread 0x[0-9a-f]+ \(most recent call first\)", err), err  # what SIGUSR1 printed


@pytest.mark.parametrize("command,blocked", [("serve", "fastapi"), ("wyoming", "wyoming")])
def test_missing_server_extra_is_one_line_naming_the_install(tiny_bundle, command, blocked):
    code = (f"import sys; sys.modules[{blocked!r}] = None; from qwen3_tts_edge.runtime.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    res = subprocess.run([sys.executable, "-c", code, command, "-b", str(tiny_bundle)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and "pip install 'qwen3-tts-edge[server]'" in res.stderr
    assert res.stderr.startswith("qwen3-tts-edge: error: ")


def test_the_lean_install_has_no_server_packages():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    def names(deps: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[ ;]", d)[0].lower().replace("-", "_") for d in deps}

    assert not names(project["dependencies"]) & SERVER_ONLY
    extra = names(project["optional-dependencies"]["server"])
    assert {"fastapi", "uvicorn", "python_multipart", "wyoming"} <= extra
    assert not any("zeroconf" in d for d in project["optional-dependencies"]["server"])  # imported lazily


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
    return out


def test_runtime_core_never_imports_the_servers():
    """The servers sit on the runtime; the runtime reaches them only by module name (cli.PLUGGED)."""
    core = [p for p in (REPO / "runtime").rglob("*.py") if "servers" not in p.relative_to(REPO / "runtime").parts]
    assert core
    for path in core:
        for name in _imports(path):
            top = name.lstrip(".").split(".")[0]
            assert top not in SERVER_ONLY, f"{path.relative_to(REPO)} imports {name}"
            assert "servers" not in name.split("."), f"{path.relative_to(REPO)} imports {name}"


def test_servers_import_only_the_runtime():
    for path in (REPO / "runtime" / "servers").glob("*.py"):
        for name in _imports(path):
            assert not re.match(r"^(\.\.\.|qwen3_tts_edge\.(export|bench|quant))", name), \
                f"{path.relative_to(REPO)} imports {name}"
            assert name.split(".")[0] not in {"torch", "transformers", "qwen_tts"}, f"{path} imports {name}"


def test_a_shutdown_that_hangs_still_ends_the_process():
    """A thread that never returns (say, a stuck worker) cannot keep a stopping server alive: after the grace
    time the process prints every thread's stack and exits with 130."""
    code = ("import threading, time\n"
            "from qwen3_tts_edge.runtime.servers.cli import exit_if_stuck\n"
            "threading.Thread(target=time.sleep, args=(120,), name='stuck-worker').start()\n"
            "exit_if_stuck(0.5)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and time.monotonic() - t0 < 30
    assert "shutdown did not finish within 0.5 s" in proc.stderr
    assert "Thread 0x" in proc.stderr  # faulthandler's stacks of the threads still running


def test_a_native_call_holding_the_interpreter_cannot_stop_the_deadline():
    """The Python watchdog needs the interpreter lock; a native call that keeps it (libc ``sleep`` through ctypes'
    PyDLL, which does not release it) would silence it. faulthandler's C timer still dumps the stacks and exits."""
    code = ("import ctypes\n"
            "from qwen3_tts_edge.runtime.servers.cli import exit_if_stuck\n"
            "exit_if_stuck(0.5)\n"
            "ctypes.PyDLL(None).sleep(120)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and time.monotonic() - t0 < 30, proc.stderr
    assert "Timeout (0:00:05.5" in proc.stderr and "shutdown did not finish" not in proc.stderr, proc.stderr
