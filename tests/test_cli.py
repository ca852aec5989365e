"""The console script: help for every subcommand, one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import needs_export
from qwen3_tts_edge.runtime import cli

SUBCOMMANDS = ("export", "speak", "voice", "info", "parity", "bench")


def _run(*args: str, **kw) -> subprocess.CompletedProcess:
    exe = shutil.which("qwen3-tts-edge") or shutil.which("qwen3-tts-edge", path=str(__import__("pathlib").Path(
        sys.executable).parent))
    assert exe, "the qwen3-tts-edge console script is not installed"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300, **kw)


def test_console_script_help_lists_every_subcommand():
    res = _run("--help")
    assert res.returncode == 0
    for name in SUBCOMMANDS:
        assert name in res.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    assert "usage: qwen3-tts-edge " + name in capsys.readouterr().out


def test_speak_with_a_missing_voice_file_is_one_line(tiny_bundle, tmp_path, capsys):
    assert cli.main(["speak", "hi", "-b", str(tiny_bundle), "-o", str(tmp_path / "x.wav"), "--voice",
                     str(tmp_path / "v.voice")]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "does not exist; make one with `qwen3-tts-edge voice create`" in err and err.count("\n") == 1
    assert not (tmp_path / "x.wav").exists()


def test_info_on_a_missing_bundle_is_one_line(tmp_path):
    res = _run("info", str(tmp_path / "nope"))
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("qwen3-tts-edge: error:")
    assert "Traceback" not in res.stderr


def test_export_bad_model_is_one_line(tmp_path):
    res = _run("export", "random:tiny-nonsense", "-o", str(tmp_path / "b"))
    assert res.returncode == 1 and "random:<shape>-<variant>" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "b").exists()


@needs_export
def test_export_then_info_through_the_console_script(tmp_path):
    out = tmp_path / "t"
    # q8_0 is the default talker; int8 adds the ONNX generation graphs, whose quantizer turns on INFO logging
    res = _run("export", "random:tiny-custom_voice", "-o", str(out), "--talker", "q8_0,int8")
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""  # progress goes to stderr only
    assert "bundle" in res.stderr and "written" in res.stderr
    for chatter in ("[INFO]", "torchvision is not installed", "flash-attn", "FutureWarning", "********"):
        assert chatter not in res.stderr, f"export printed third-party chatter {chatter!r}:\n{res.stderr}"
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert len(set(modes.values())) == 1, modes  # manifest.json is as readable as every other bundle file
    info = _run("info", str(out))
    assert info.returncode == 0, info.stderr
    for text in ("format version  1", "random:tiny-custom_voice", "custom_voice", "24000 Hz", "vivian",
                 "text_tokenizer", "tokenizer/vocab.json"):
        assert text in info.stdout
    raw = _run("info", str(out), "--json")
    assert '"format_version": 1' in raw.stdout
    # The default export speaks at once: talker q8_0 + decoder fp32.
    for text in ("talker           q8_0", "predictor        q8_0", "decoder          fp32"):
        assert text in info.stdout
    assert "[1/" in res.stderr and "checkpoint" in res.stderr  # progress as plain lines off a terminal
    wav = tmp_path / "x.wav"
    spoke = _run("speak", "Hi", "-b", str(out), "--speaker", "ryan", "-o", str(wav), "--max-frames", "8")
    assert spoke.returncode == 0, spoke.stderr
    assert wav.stat().st_size > 44


@needs_export
@pytest.mark.parametrize("flags,missing", [(["--decoder", ""], "decoder"), (["--talker", ""], "talker")])
def test_export_refuses_a_bundle_that_cannot_speak(tmp_path, flags, missing):
    out = tmp_path / "b"
    res = _run("export", "random:tiny-custom_voice", "-o", str(out), *flags)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"a bundle without a {missing} cannot speak" in res.stderr
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["speak", "hi", "-b", "nowhere"], "choose where the audio goes"),
    (["speak", "hi", "-b", "nowhere", "-o", "out.wav"], "not a bundle folder"),
    (["speak", "hi", "-b", "nowhere", "--raw", "--lines"], "--lines needs TEXT to be -"),
])
def test_speak_bad_input_is_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())  # nothing written
