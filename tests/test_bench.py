"""``bench``: the report on the tiny bundle (schema, ratios, floor, fidelity, plots) and its error paths.

Speed is never asserted here (shared CI machines); only that every figure exists, is consistent and positive.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from conftest import needs_export
from qwen3_tts_edge.bench import report as rep
from qwen3_tts_edge.bench.run import TEXTS, main
from qwen3_tts_edge.runtime.bundle import load_bundle

STAGES = ("talker", "predictor", "decoder", "host")


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def bench_run(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["-b", str(tiny_bundle), "--vs-reference", "random:tiny-custom_voice", "--frames", "8", "--repeats", "1",
            "--threads", "1", "--json", str(out / "out.json"), "--markdown", str(out / "out.md")]
    if _has_matplotlib():
        argv += ["--plot", str(out / "out.png")]
    rc = main(argv)
    assert rc == 0
    return out, json.loads((out / "out.json").read_text(encoding="utf-8"))


def _positive(x) -> bool:
    return isinstance(x, int | float) and x > 0


@needs_export
def test_report_schema(bench_run):
    _, r = bench_run
    assert r["schema"] == rep.SCHEMA == 2
    assert r["machine"]["cpu"] and _positive(r["machine"]["bandwidth_gbs"])
    assert r["settings"]["frames"] == 8 and r["settings"]["repeats"] == 1 and r["settings"]["threads"] == 1
    assert r["settings"]["decoder_threads"] == 1 and r["machine"]["decoder_threads_used"] == 1
    assert "CPU :" in r["machine"]["llama_cpp_system_info"]  # which kernels ran
    assert "not timed" in r["settings"]["warmup"]
    assert {(x["talker"], x["decoder"], x["provider"]) for x in r["runs"]} == {  # both engines: GGUF and ONNX
        ("f32", "fp32", "CPUExecutionProvider"), ("q8_0", "fp32", "CPUExecutionProvider"),
        ("fp32", "fp32", "CPUExecutionProvider")}
    assert r["refused"] == [] and r["skipped"] == []
    for run in r["runs"] + [r["reference"]]:
        assert _positive(run["ttfa_ms"]) and _positive(run["rtf"]) and _positive(run["peak_rss_mb"])
        assert set(run["ms_per_frame"]) == set(STAGES)
        assert all(run["ms_per_frame"][k] >= 0 for k in STAGES)
        assert len(run["samples"]) == len(TEXTS)
        assert all(s["frames"] == 8 and s["stop_reason"] == "max_frames" for s in run["samples"])
        assert run["spread"]["rtf"]["min"] <= run["rtf"] <= run["spread"]["rtf"]["max"]
    for run in r["runs"]:
        assert run["predictor"] == run["talker"] and _positive(run["bundle_mb"])
        assert run["devices"]["decoder"] == "CPUExecutionProvider"


@needs_export
def test_reference_ratios_and_floor(bench_run):
    _, r = bench_run
    ref = r["reference"]
    assert ref["talker"] == "torch-fp32" and ref["model"] == "random:tiny-custom_voice" and "TTS.stream" in ref["how"]
    assert _positive(ref["offline_decode_ms_per_frame"])
    for run in r["runs"]:
        vs = run["vs_reference"]
        assert vs["ttfa"] == pytest.approx(run["ttfa_ms"] / ref["ttfa_ms"])
        assert vs["rtf"] == pytest.approx(run["rtf"] / ref["rtf"])
        for k in ("talker", "predictor", "decoder"):
            assert vs["ms_per_frame"][k] == pytest.approx(run["ms_per_frame"][k] / ref["ms_per_frame"][k])
        assert vs["peak_rss"] == pytest.approx(run["peak_rss_mb"] / ref["peak_rss_mb"])
        floor = r["floor_ms_per_frame"][run["talker"]]
        measured = run["ms_per_frame"]["talker"] + run["ms_per_frame"]["predictor"]
        if run["talker"] == "fp32":  # ONNX graphs: no per-frame byte count, so no floor (said in the report)
            assert floor is None and run["floor_ratio"] is None
            continue
        assert run["floor_ratio"] == pytest.approx(measured / floor)
    assert set(r["floor_ms_per_frame"]) == {"f32", "q8_0", "fp32"}
    assert "not computed for ONNX generation graphs" in rep.floor_table(r)
    f32, q8 = r["floor"]["talker"]["f32"], r["floor"]["talker"]["q8_0"]
    assert q8["talker_bytes"] < f32["talker_bytes"]  # q8_0 streams fewer bytes per frame than f32
    assert f32["predictor_bytes"] == 15 * f32["predictor_per_call_bytes"]
    assert r["floor"]["decoder"]["fp32"]["calls"] == rep.decoder_calls(8, r["settings"]["chunk_frames"])


@needs_export
def test_fidelity_per_precision(bench_run):
    _, r = bench_run
    by = {x["talker"]: x["fidelity"] for x in r["runs"]}
    for p in ("f32", "q8_0"):
        for stage in ("talker", "predictor"):
            assert 0.9 < by[p][stage]["logit_cos"] <= 1.0 + 1e-9 and 0.0 <= by[p][stage]["top1"] <= 1.0
        assert by[p]["e2e"]["logmel_dist"] >= 0.0 and by[p]["decoder"]["logmel_dist"] >= 0.0
    assert by["f32"]["talker"]["kl"] < by["q8_0"]["talker"]["kl"]
    # the ONNX engine's row: its export check against the official modules
    assert by["fp32"]["talker"]["logit_cos_min"] >= 0.99999 and by["fp32"]["predictor"]["top1"] == 1.0
    assert "reference's own codes" in r["fidelity"]["e2e_codes"]


@needs_export
def test_tables_and_plot(bench_run):
    out, r = bench_run
    md = (out / "out.md").read_text(encoding="utf-8")
    assert "| torch-fp32 | torch-fp32 |" in md and "| q8_0 | fp32 | CPUExecutionProvider |" in md
    assert "floor ms/frame" in md
    if not _has_matplotlib():
        pytest.skip("matplotlib not installed")
    png = (out / "out.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@needs_export
def test_without_reference_uses_manifest_fidelity(tiny_bundle, tmp_path, capsys):
    rc = main(["-b", str(tiny_bundle), "--frames", "4", "--repeats", "1", "--threads", "1", "--talker", "q8_0",
               "--texts", "en-short", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert r["reference"] is None and r["fidelity"] is None
    (run,) = r["runs"]
    assert run["vs_reference"] is None and run["fidelity"]["source"].startswith("manifest")
    assert "kl" in run["fidelity"]["talker"]
    assert "q8_0" in capsys.readouterr().out


@needs_export
def test_long_form(tiny_bundle, tmp_path, capsys):
    """`--long-form`: one long request of several segments, its windows adding up to the whole stream."""
    from qwen3_tts_edge.bench import long_form
    from qwen3_tts_edge.runtime.frame_loop import STOP_TEXT_CEILING
    from qwen3_tts_edge.runtime.options import SpeakOptions
    from qwen3_tts_edge.runtime.plan import segment_budget

    seconds, window = 6.0, 2.0
    # n_ctx 256: the runtime's default segment budget is then 19 text tokens, so 6 s of audio span several segments
    rc = main(["-b", str(tiny_bundle), "--frames", "4", "--repeats", "1", "--threads", "1", "--talker", "q8_0",
               "--texts", "en-short", "--n-ctx", "256", "--long-form", str(seconds), "--long-form-window",
               str(window), "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")])
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert len(r["runs"]) == 1 and len(r["runs"][0]["samples"]) == 1  # the timed rounds are as before
    lf = r["long_form"]
    assert lf["seconds"] == seconds and lf["window_s"] == window
    assert lf["frames_per_text_token"] == long_form.FRAMES_PER_TEXT_TOKEN
    audio = load_bundle(Path(tiny_bundle), verify=False).manifest.audio
    frame_s = audio["samples_per_frame"] / audio["sample_rate"]
    assert lf["text"]["language"] == "german"
    assert lf["text"]["tokens"] >= seconds / frame_s / lf["frames_per_text_token"]  # enough text for the audio
    (run,) = lf["runs"]
    assert (run["talker"], run["decoder"]) == ("q8_0", "fp32")
    # the request: exactly `seconds` of audio, over several segments that each ended at their text's frames
    assert run["frames"] == round(seconds / frame_s) and run["stop_reason"] == "max_frames"
    assert run["audio_s"] == pytest.approx(run["frames"] * frame_s)
    assert run["rtf"] == pytest.approx(run["wall_s"] / run["audio_s"])
    assert 0 < run["ttfa_ms"] < run["wall_s"] * 1e3
    assert run["n_ctx"] == 256 and run["segment_tokens"] == segment_budget(SpeakOptions(), 256) == 19
    assert run["segments"] >= 3
    assert len(run["segment_frames"]) == len(run["segment_stops"]) == run["segments"]
    assert sum(run["segment_frames"]) == run["frames"]
    assert run["segment_stops"][:-1] == [STOP_TEXT_CEILING] * (run["segments"] - 1)  # each at its text's frames
    assert all(0 < f <= 3 * run["segment_tokens"] for f in run["segment_frames"])
    # the windows: contiguous along the audio, adding up to the stream
    wins = run["windows"]
    assert [w["index"] for w in wins] == list(range(len(wins))) and len(wins) == math.ceil(seconds / window)
    assert [w["start_s"] for w in wins] == [i * window for i in range(len(wins))]
    assert sum(w["audio_s"] for w in wins) == pytest.approx(run["audio_s"])
    assert sum(w["wall_s"] for w in wins) == pytest.approx(run["wall_s"])
    assert sum(w["frames"] for w in wins) == run["frames"]
    assert [w["first_frame"] for w in wins] == [sum(x["frames"] for x in wins[:i]) for i in range(len(wins))]
    for w in wins:
        assert w["wall_s"] > 0 and w["rtf"] == pytest.approx(w["wall_s"] / w["audio_s"])
        assert w["audio_s"] <= window + 8 * frame_s + 1e-6  # a chunk (at most 8 frames) may cross the boundary
        assert w["segments"][0] <= w["segments"][1] < run["segments"]
    assert wins[0]["segments"][0] == 0 and wins[-1]["segments"][1] == run["segments"] - 1
    for k in STAGES:  # per-window stage costs are the stream's, split by frames
        total = sum(w["ms_per_frame"][k] * w["frames"] for w in wins)
        assert total == pytest.approx(run["ms_per_frame"][k] * run["frames"], rel=1e-6, abs=1e-6)
    assert run["rtf_first_window"] == wins[0]["rtf"] and run["rtf_last_window"] == wins[-1]["rtf"]
    rss = run["rss_mb"]
    assert 0 < rss["start"] <= rss["peak"] <= rss["process_peak"] and rss["end"] <= rss["peak"]
    assert all(0 < w["rss_mb"] <= rss["peak"] for w in wins)
    md = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert "| q8_0 + fp32 (CPU) |" in md and f"RTF first {window:g} s" in md
    row = next(line for line in md.splitlines() if line.startswith("| q8_0 + fp32 (CPU) | 6.0 |"))
    assert f"| {run['rtf']:.2f} |" in row
    assert "RTF last window" in capsys.readouterr().out


def test_long_text():
    from qwen3_tts_edge.bench.long_form import long_text

    text = long_text(["One.", "Two!", "Three?"], lambda s: len(s.split()), 7)
    assert text == "One. Two! Three? Two! Three? One. Three? One. Two!"  # each pass starts one sentence later
    assert long_text(["A b."], lambda s: len(s.split()), 5) == "A b. A b. A b."
    with pytest.raises(ValueError):
        long_text([" "], len, 3)


def test_missing_bundle(tmp_path, capsys):
    assert main(["-b", str(tmp_path / "nope"), "--frames", "8"]) == 1
    err = capsys.readouterr().err
    assert "error" in err and "nope" in err


@pytest.mark.parametrize("frames", ["0", "-3"])
def test_bad_frames(tmp_path, capsys, frames):
    assert main(["-b", str(tmp_path), "--frames", frames]) == 1
    assert "--frames must be at least 1" in capsys.readouterr().err


def test_bad_repeats_and_texts(tmp_path, capsys):
    assert main(["-b", str(tmp_path), "--repeats", "0"]) == 1
    assert "--repeats" in capsys.readouterr().err
    assert main(["-b", str(tmp_path), "--long-form", "0"]) == 1
    assert "--long-form must be a positive" in capsys.readouterr().err
    assert main(["-b", str(tmp_path), "--long-form", "60", "--long-form-window", "-1"]) == 1
    assert "--long-form-window must be a positive" in capsys.readouterr().err
    assert main(["-b", str(tmp_path), "--texts", "xx-none"]) == 1
    assert "unknown bench texts" in capsys.readouterr().err


@needs_export
def test_unknown_precision(tiny_bundle, capsys):
    assert main(["-b", str(tiny_bundle), "--talker", "q4_k_m"]) == 1
    assert "no talker in precision q4_k_m" in capsys.readouterr().err


def test_plot_needs_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["-b", str(tmp_path), "--plot", str(tmp_path / "x.png")]) == 1
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_pure_helpers():
    assert rep.decoder_calls(50, (1, 2, 4, 8)) == 9  # 1+2+4+8, then 5 chunks of 8 (the last one partial)
    assert rep.decoder_calls(1, (1, 2, 4, 8)) == 1
    s = rep.stat([3.0, 1.0, 2.0, None, float("nan")])
    assert s == {"median": 2.0, "min": 1.0, "max": 3.0, "rel_spread": 1.0, "n": 3}
    assert rep.stat([])["median"] is None


@needs_export
def test_weight_bytes(tiny_bundle):
    b = load_bundle(Path(tiny_bundle), verify=False)
    f32 = rep.weight_bytes_per_frame(b, "f32")
    talker_file = b.manifest.component("talker", "f32").size
    assert 0 < f32["talker"] < talker_file  # token_embd (host lookups only) is not streamed
    assert f32["total"] == f32["talker"] + f32["predictor"] + f32["heads"]


@needs_export
def test_voice_clone_bench(base_bundle, ref_wav, tmp_path, capsys):
    """The voice bench's figures on the tiny Base bundle: creation per second of audio, and what each kind of
    voice prefills (speed itself is not asserted)."""
    from qwen3_tts_edge.bench import voice_clone

    out = tmp_path / "v.json"
    assert voice_clone.main(["-b", str(base_bundle), "--clip", str(ref_wav), "--text", "What the clip says.",
                             "--repeats", "1", "--threads", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    c = r["creation"][0]
    assert c["ref_frames"] == 26 and c["speaker_ms_per_s"] > 0 and c["codec_ms_per_s"] > 0
    t = r["ttfa"][0]
    assert all(t[k]["ttfa_ms"] > 0 for k in ("x-vector", "icl cold", "icl first use", "icl cached"))
    assert t["x-vector"]["reused"] == 0
    assert t["icl first use"]["prefilled"] == t["icl cold"]["prefilled"]  # only the decoder's state was saved
    # The cached voice restores its prefix (role, tags, x-vector, transcript) and prefills only the rest.
    assert t["icl cached"]["reused"] > t["icl cold"]["reused"]
    assert t["icl cached"]["prefilled"] < t["icl cold"]["prefilled"]
    assert r["voice_cache_bytes_per_position"] > 0
    assert "| ICL cached |" in capsys.readouterr().out
    assert voice_clone.main(["-b", str(base_bundle), "--clip", str(ref_wav), "--clip", str(ref_wav), "--text",
                             "One transcript."]) == 1
    assert "give one --text per --clip" in capsys.readouterr().err


@needs_export
def test_memory_breakdown(tiny_bundle, tmp_path, capsys):
    """`bench.memory` on the tiny bundle: every step is there, memory only grows, the peak covers it."""
    from qwen3_tts_edge.bench import memory

    out = tmp_path / "m.json"
    assert memory.main(["-b", str(tiny_bundle), "--talker", "q8_0", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [s["step"].split()[0] for s in r["steps"]] == ["python", "talker", "decoder", "after"]
    totals = [s["resident_mb"] for s in r["steps"]]
    assert totals[1] > totals[0] and r["peak_mb"] >= max(totals) - 1
    assert "| talker q8_0 + predictor + tables + f32 heads (n_ctx 2048) |" in capsys.readouterr().out
