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


def test_known_harmless_export_chatter_is_filtered_and_nothing_else(monkeypatch):
    """Every row of export/quiet.py's warning table is silenced, an unlisted warning still shows, and
    QWEN3_TTS_EDGE_EXPORT_VERBOSE=1 shows everything."""
    import re
    import warnings

    from qwen3_tts_edge.export import quiet

    samples = {r"`isinstance\(treespec, LeafSpec\)` is deprecated": "`isinstance(treespec, LeafSpec)` is deprecated",
               r"The tensor attributes .* were assigned during export":
               "The tensor attributes self.encoder.x._embed were assigned during export. Such attributes must be"}
    assert {message for _, message, _ in quiet.WARNINGS} == set(samples)
    for verbose in (False, True):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if verbose:
                monkeypatch.setenv(quiet.VERBOSE_ENV, "1")
            quiet.quiet_third_party()
            for category, message, _why in quiet.WARNINGS:
                assert re.match(message, samples[message])
                warnings.warn(samples[message], category, stacklevel=1)
            warnings.warn("a real problem", UserWarning, stacklevel=1)
        shown = [str(w.message) for w in seen]
        assert "a real problem" in shown
        assert len(shown) == (1 + len(quiet.WARNINGS) if verbose else 1), shown
