"""`qwen3-tts-edge parity` on the tiny bundle: the report's figures, and greedy f32 parity over 200 frames."""

from __future__ import annotations

import json

import pytest

from conftest import needs_export
from qwen3_tts_edge.runtime import cli

pytestmark = needs_export


@pytest.fixture(scope="module")
def report(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "p.json"
    assert cli.main(["parity", "-b", str(tiny_bundle), "--model", "random:tiny-custom_voice", "--json", str(out),
                     "--frames", "200"]) == 0
    return json.loads(out.read_text())


def test_report_has_every_section(report):
    for key in ("talker", "predictor", "greedy_identical_frames", "prompt_max_abs", "decoder"):
        assert key in report
    for stage in ("talker", "predictor"):
        assert set(report[stage]) == {"f32", "q8_0", "fp32"}  # both engines: llama.cpp GGUF and ONNX graphs
        assert {"logit_cos", "kl", "top1"} <= set(report[stage]["f32"])
        assert report[stage]["fp32"]["logit_cos_min"] >= 0.99999  # the ONNX graphs' export check
    assert {"stream_vs_offline_max_abs", "snr_db", "logmel_dist"} <= set(report["decoder"]["fp32"])


def test_f32_engines_match_the_official_model(report):
    for stage in ("talker", "predictor"):
        assert report[stage]["f32"]["logit_cos"] >= 0.99999
        assert report[stage]["f32"]["top1"] == 1.0
        assert report[stage]["q8_0"]["logit_cos"] < report[stage]["f32"]["logit_cos"]
        assert report[stage]["q8_0"]["logit_cos"] > 0.99
    assert report["prompt_max_abs"] <= 1e-5
    assert report["decoder"]["fp32"]["stream_vs_offline_max_abs"] <= 1e-4


def test_greedy_f32_follows_official_generate_for_200_frames_up_to_ties(report):
    """3200 greedy decisions (200 frames x 16 codebooks): every one agrees, except numerical near-ties."""
    g = report["greedy"]["f32"]
    assert g["frames"] == 200
    assert g["all_flips_are_ties"], g["flips"]
    assert len(g["flips"]) <= 3  # near-ties are rare; many flips would mean drift, not ties
    assert report["greedy_identical_frames"]["f32"] == (g["flips"][0]["frame"] if g["flips"] else 200)
    onnx = report["greedy"]["fp32"]  # the ONNX engine along the same trajectory: fp32 graphs, no looser
    assert onnx["frames"] == 200 and onnx["all_flips_are_ties"] and len(onnx["flips"]) <= len(g["flips"])


def test_parity_refuses_a_different_checkpoint(tiny_bundle, capsys):
    assert cli.main(["parity", "-b", str(tiny_bundle), "--model", "random:tiny-custom_voice@1"]) == cli.EXIT_ERROR
    assert "not the checkpoint this bundle was exported from" in capsys.readouterr().err


def test_voice_encoder_parity_of_a_base_bundle(base_bundle, ref_wav, tmp_path, capsys):
    """`parity --stages voices` on a Base bundle: our file → voice path against the official clone path."""
    out = tmp_path / "v.json"
    assert cli.main(["parity", "-b", str(base_bundle), "--model", "random:tiny-base", "--stages", "voices",
                     "--ref-audio", str(ref_wav), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"bundle", "model", "frames", "voices"}  # only the stage asked for
    v = report["voices"]
    assert [c["clip"] for c in v["clips"]] == ["ref.wav"] and v["clips"][0]["frames"] == 26
    assert v["x_vector_cos_min"] >= 0.99999 and v["code_mismatches"] == 0
    assert v["clips"][0]["wave_max_abs"] < 1e-6
    assert "voices    x-vector (64 wide)" in capsys.readouterr().out
    assert cli.main(["parity", "-b", str(base_bundle), "--model", "random:tiny-base", "--stages", "voice"]) == 1
    assert "unknown stage(s) voice; choose from talker, decoder, voices" in capsys.readouterr().err
