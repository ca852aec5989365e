"""Export progress: a tqdm bar on a terminal, plain numbered lines anywhere else."""

from __future__ import annotations

import io

from qwen3_tts_edge.export.progress import ExportProgress


def test_plain_lines_off_a_terminal():
    buf = io.StringIO()
    p = ExportProgress(3, file=buf)  # StringIO is not a TTY
    p("converting ...")
    p.step("checkpoint")
    p.step("talker q8_0")
    p.close()
    assert buf.getvalue().splitlines() == ["converting ...", "[1/3] checkpoint", "[2/3] talker q8_0"]
    assert "\r" not in buf.getvalue()


def test_a_bar_on_a_terminal():
    buf = io.StringIO()
    p = ExportProgress(2, desc="export demo", file=buf, tty=True)
    p("a message above the bar")
    p.step("checkpoint")
    p.step("decoder fp32")
    p.close()
    out = buf.getvalue()
    assert "a message above the bar" in out and "export demo: 2/2" in out and "decoder fp32" in out
    assert p.done == 2
