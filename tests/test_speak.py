"""`speak` end to end on the tiny bundle, and its bad input: a clear one-line error, nothing written half."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_export

pytestmark = needs_export
EXE = str(Path(sys.executable).parent / "qwen3-tts-edge")
BASE = ["--speaker", "vivian", "--max-frames", "12", "--seed", "1", "--talker-precision", "q8_0"]


def _speak(bundle, *args, stdin=None, timeout=300):
    return subprocess.run([EXE, "speak", *args[:1], "-b", str(bundle), *args[1:]], input=stdin,
                          capture_output=True, timeout=timeout)


def _one_line_error(res, needle):
    err = res.stderr.decode()
    assert res.returncode != 0
    assert err.startswith("qwen3-tts-edge: error:") and err.count("\n") == 1, err
    assert needle in err, err
    assert "Traceback" not in err


def test_speak_to_file_with_stats(tiny_bundle, tmp_path):
    import soundfile as sf

    out = tmp_path / "hello.wav"
    res = _speak(tiny_bundle, "Hello there.", "-o", str(out), "--stats", *BASE)
    assert res.returncode == 0, res.stderr
    assert res.stdout == b""
    err = res.stderr.decode()
    assert "time to first audio" in err and "real-time factor" in err and "ms/frame" in err and "devices" in err
    assert "precisions: talker q8_0 (llama.cpp), predictor q8_0 (f32 heads), decoder fp32;" in err
    pcm, sr = sf.read(out)
    assert sr == 24000 and len(pcm) == 12 * 1920
    assert [p.name for p in tmp_path.iterdir()] == ["hello.wav"]  # no temp file left


def test_predictor_precision_pairs_with_another_talker(tiny_bundle, tmp_path):
    """A q8_0 talker with the f32 predictor of the same bundle: both load, and --stats says which ran."""
    out = tmp_path / "mixed.wav"
    res = _speak(tiny_bundle, "Hello there.", "-o", str(out), "--stats", "--predictor-precision", "f32", *BASE)
    assert res.returncode == 0, res.stderr
    assert "precisions: talker q8_0 (llama.cpp), predictor f32 (f32 heads), decoder fp32;" in res.stderr.decode()
    assert out.stat().st_size > 12 * 1920 * 2


def test_raw_stdin_lines_go_to_stdout_only(tiny_bundle):
    res = _speak(tiny_bundle, "-", "--raw", "--lines", *BASE, stdin=b"Hello\n\nSecond line.\n")
    assert res.returncode == 0, res.stderr
    pcm = np.frombuffer(res.stdout, dtype="<i2")
    assert len(pcm) == 2 * 12 * 1920  # two utterances, nothing else on stdout
    assert res.stderr.decode().count("error") == 0


@pytest.mark.parametrize("text,needle", [("   \n\t ", "non-empty"), ("", "non-empty")])
def test_empty_text(tiny_bundle, tmp_path, text, needle):
    out = tmp_path / "x.wav"
    _one_line_error(_speak(tiny_bundle, text, "-o", str(out), *BASE), needle)
    assert not list(tmp_path.iterdir())


def test_control_characters_emoji_and_mixed_scripts_speak(tiny_bundle, tmp_path):
    out = tmp_path / "x.flac"
    res = _speak(tiny_bundle, "Bell\x07 tab\t nul-free \x1b[31m 🎉 中文 日本語 한국어 العربية", "-o", str(out), *BASE)
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 0


def test_hundred_thousand_characters_stream_in_bounded_memory(tiny_bundle, tmp_path):
    text = ("A long sentence that keeps going, again and again. " * 2000)[:100_000]
    out = tmp_path / "long.wav"
    res = _speak(tiny_bundle, "-", "-o", str(out), *BASE[:2], "--max-frames", "40", "--stats",
                 stdin=text.encode())
    assert res.returncode == 0, res.stderr
    assert "max_frames" in res.stderr.decode()


@pytest.mark.parametrize("args,needle", [
    (["--language", "klingon"], "unsupported language 'klingon'"),
    (["--speaker", "nobody"], "unknown speaker 'nobody'"),
    (["--talker-precision", "q2_k"], "no talker in precision 'q2_k'"),
    (["--predictor-precision", "q4_k_m"], "no predictor in precision 'q4_k_m'"),
    (["--temperature", "0"], "temperature must be a positive number"),
    (["--chunk-frames", "0"], "chunk_frames"),
])
def test_bad_options(tiny_bundle, tmp_path, args, needle):
    out = tmp_path / "x.wav"
    base = [a for a in BASE if a not in ("--speaker", "vivian")] if "--speaker" in args else BASE
    _one_line_error(_speak(tiny_bundle, "Hello.", "-o", str(out), *base, *args), needle)
    assert not list(tmp_path.iterdir())


def test_unwritable_output(tiny_bundle, tmp_path):
    _one_line_error(_speak(tiny_bundle, "Hello.", "-o", str(tmp_path / "no" / "x.wav"), *BASE), "does not exist")
    _one_line_error(_speak(tiny_bundle, "Hello.", "-o", str(tmp_path / "x.mp4"), *BASE), "use one of")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root); permission errors cannot be provoked")
        _one_line_error(_speak(tiny_bundle, "Hello.", "-o", str(locked / "x.wav"), *BASE), "ermission")
    finally:
        locked.chmod(0o700)


def _copy(bundle, tmp_path):
    dest = tmp_path / "bundle"
    shutil.copytree(bundle, dest)
    return dest


def test_broken_bundles(tiny_bundle, tmp_path):
    out = tmp_path / "x.wav"
    _one_line_error(_speak(tmp_path / "missing", "Hello.", "-o", str(out), *BASE), "not a bundle folder")
    b = _copy(tiny_bundle, tmp_path)
    manifest = json.loads((b / "manifest.json").read_text())
    talker = next(c for c in manifest["components"] if c["role"] == "talker" and c["precision"] == "q8_0")
    original = (b / talker["file"]).read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    (b / talker["file"]).write_bytes(bytes(data))
    _one_line_error(_speak(b, "Hello.", "-o", str(out), *BASE), "sha256")
    (b / talker["file"]).write_bytes(original)
    manifest["format_version"] = 99
    (b / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error(_speak(b, "Hello.", "-o", str(out), *BASE), "format version 99")
    manifest["format_version"] = 1
    manifest["components"] = [c for c in manifest["components"] if c["role"] != "decoder"]
    (b / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error(_speak(b, "Hello.", "-o", str(out), *BASE), "has no decoder")
    assert not out.exists()


def test_play_without_a_device(tiny_bundle, tmp_path):
    """No sound card here (and no ALSA config): --play must explain, not crash."""
    env = dict(os.environ, HOME=str(tmp_path))
    res = subprocess.run([EXE, "speak", "Hello.", "-b", str(tiny_bundle), "--play", *BASE], capture_output=True,
                         timeout=300, env=env)
    _one_line_error(res, "--play" if b"PortAudio" in res.stderr else "no audio output device")


def test_play_through_the_alsa_null_device(tiny_bundle, tmp_path):
    """ALSA's null device stands in for a sound card (it is not paced in real time: this checks wiring only)."""
    sd = pytest.importorskip("sounddevice")
    del sd
    (tmp_path / ".asoundrc").write_text("pcm.!default { type null }\n")
    env = dict(os.environ, HOME=str(tmp_path))
    res = subprocess.run([EXE, "speak", "Hello.", "-b", str(tiny_bundle), "--play", *BASE], capture_output=True,
                         timeout=300, env=env)
    if b"PortAudio library" in res.stderr:
        pytest.skip("PortAudio is not installed (libportaudio2)")
    assert res.returncode == 0, res.stderr


def test_reader_that_stops_reading(tiny_bundle):
    """`speak --raw | head -c 1000`: the closed pipe stops generation with one line, no traceback."""
    proc = subprocess.Popen([EXE, "speak", "Hello there.", "-b", str(tiny_bundle), "--raw", "--speaker", "vivian",
                             "--max-frames", "400", "--seed", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1000)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) != 0
    assert "output pipe closed" in err and "Traceback" not in err


def test_invalid_utf8_on_stdin_is_one_line_with_the_offset(tiny_bundle, tmp_path):
    out = tmp_path / "x.wav"
    _one_line_error(_speak(tiny_bundle, "-", "-o", str(out), *BASE, stdin=b"Hello \xff world"), "offset 6")
    assert not list(tmp_path.iterdir())


def test_invalid_utf8_in_argv_is_one_line(tiny_bundle, tmp_path):
    out = tmp_path / "x.wav"
    res = subprocess.run([EXE.encode(), b"speak", b"caf\xe9", b"-b", str(tiny_bundle).encode(), b"-o",
                          str(out).encode(), *(a.encode() for a in BASE)], capture_output=True, timeout=300)
    _one_line_error(res, "not valid Unicode")
    assert not list(tmp_path.iterdir())
