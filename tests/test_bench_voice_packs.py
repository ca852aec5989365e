"""``bench/voice_packs``: the voice-pack bench on the tiny bundle (report, packs reused from --work, fidelity).

Speed is never asserted (shared machines); only that every figure exists and is consistent, and that the fidelity
section tells a pack's adapters from their absence.
"""

from __future__ import annotations

import json

from conftest import needs_export

pytestmark = needs_export


def test_voice_pack_bench_on_the_tiny_bundle(tiny_bundle, tmp_path):
    from qwen3_tts_edge.bench.voice_packs import main

    work = tmp_path / "work"
    argv = ["-b", str(tiny_bundle), "--ranks", "4,8", "--voices", "2", "--frames", "3", "--voice-frames", "2",
            "--repeats", "1", "--threads", "1", "--fidelity", "f32,f16,q8_0", "--work", str(work),
            "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")]
    assert main(argv) == 0
    r = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    for name in ("rank4", "rank8", "voice0", "voice1"):
        assert r["packs"][name]["file_bytes"] == (work / f"{name}.voicepack").stat().st_size
    assert r["packs"]["rank8"]["talker_adapter_bytes"] > r["packs"]["rank4"]["talker_adapter_bytes"]
    for v in r["ranks"].values():
        assert v["ttfa_ms"] > 0 and v["rtf"] > 0 and len(v["triples"]) == 1 and v["adapter_load_ms"] >= 0
    mv = r["many_voices"]
    assert mv["packs"] == 2 and len(mv["rounds"]) == 3 and mv["adapters_loaded_bytes"] > 0
    vs = mv["vs_merged_bundles"]
    assert vs["bundles_disk_bytes"] == 2 * r["bundle_bytes"] and vs["packs_disk_bytes"] > r["bundle_bytes"]
    rows = r["fidelity"]["rows"]
    precision = r["fidelity"]["talker_precision"]
    absent, f32, f16 = (rows[f"{precision}{k}, vs the merged model"]
                        for k in (", no pack", " + f32 adapter", " + f16 adapter"))
    assert f32["talker"]["kl"] < absent["talker"]["kl"] / 10  # the metric sees the adapter
    assert f16["talker"]["kl"] < 2 * f32["talker"]["kl"] + 1e-6 and f16["adapter_bytes"] < f32["adapter_bytes"]
    q8 = rows[f"{precision} + q8_0 adapter, vs the merged model"]  # llama.cpp takes q8_0 adapter tensors
    assert q8["talker"]["kl"] < absent["talker"]["kl"] / 10 and q8["adapter_bytes"] < f16["adapter_bytes"]
    md = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert "| switch: the set call |" in md and "merged bundles" in md and f"| {precision} + f16 adapter" in md
    # a second run reuses the packs in --work (same settings) instead of making them again
    made = {p.name: p.stat().st_mtime_ns for p in work.glob("rank*.voicepack")}
    assert main([*argv[:argv.index("--fidelity")], "--work", str(work), "--no-timing", "--fidelity", "f16"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("rank*.voicepack")} == made
