"""Stateful streaming codec decoder: export, exactness vs the official offline decode, variants, runtime.

The tiny export runs once per session (~20 s); every streaming comparison is against one official
full-sequence ``decoder(codes)`` forward on the same weights (never ``chunked_decode``, which is only
approximate beyond 300 frames).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_export
from qwen3_tts_edge.quant import gates
from qwen3_tts_edge.quant import metrics as fidelity
from qwen3_tts_edge.quant import onnx_policy as policies

pytestmark = needs_export

FP32_TOL = gates.gate("decoder", "fp32").max_abs
LONG = 320  # > 72-frame window and > 300-frame official chunk


@pytest.fixture(scope="session")
def exported(tiny_checkpoint, tmp_path_factory):
    from qwen3_tts_edge.export.decoder_onnx import export_decoder

    out = tmp_path_factory.mktemp("decoder")
    entries = export_decoder(tiny_checkpoint, out)
    return out, entries


@pytest.fixture(scope="session")
def official(tiny_checkpoint):
    from qwen3_tts_edge.export.decoder_onnx import load_official_decoder

    return load_official_decoder(tiny_checkpoint)[0]


@pytest.fixture(scope="session")
def long_codes():
    from qwen3_tts_edge.export.decoder_onnx import random_codes

    return random_codes(LONG, seed=11)


@pytest.fixture(scope="session")
def long_offline(official, long_codes):
    from qwen3_tts_edge.export.decoder_onnx import offline_decode

    return offline_decode(official, long_codes)


@pytest.fixture()
def fp32_decoder(exported):
    from qwen3_tts_edge.runtime.backends.onnxruntime.decoder import StreamingDecoder

    return StreamingDecoder(exported[0] / "decoder.fp32.onnx", threads=2)


def _stream(dec, codes, chunk):
    return np.concatenate([dec.decode(codes[s : s + chunk]) for s in range(0, codes.shape[0], chunk)])


# --- exactness -------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 2, 4, 7, 25])
def test_fp32_stream_equals_official_offline_decode(fp32_decoder, long_codes, long_offline, chunk):
    pcm = _stream(fp32_decoder, long_codes, chunk)
    assert pcm.dtype == np.float32 and pcm.shape == (LONG * 1920,)
    assert fidelity.max_abs(long_offline, pcm) <= FP32_TOL
    assert np.abs(long_offline).mean() > 1e-3  # the random codec is not silent
    assert fp32_decoder.frames_decoded == LONG


def test_official_chunked_decode_is_only_approximate(official, long_codes, long_offline):
    """Why the reference is one full forward: the official 300/25 chunking differs beyond 300 frames."""
    import torch

    with torch.no_grad():
        chunked = official.chunked_decode(torch.from_numpy(long_codes.T.copy())[None]).reshape(-1).numpy()
    assert fidelity.max_abs(long_offline[: 300 * 1920], chunked[: 300 * 1920]) <= FP32_TOL
    assert fidelity.max_abs(long_offline, chunked) > 10 * FP32_TOL


def test_one_graph_serves_every_chunk_size(exported):
    import onnx

    model = onnx.load(str(exported[0] / "decoder.fp32.onnx"), load_external_data=False)
    codes = model.graph.input[0]
    assert codes.name == "codes"
    dims = codes.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value and dims[1].dim_value == 16
    for inp in model.graph.input[1:]:  # every state tensor has a fixed shape
        assert all(d.dim_value > 0 for d in inp.type.tensor_type.shape.dim), inp.name
    assert not any(n.op_type in ("If", "Loop", "Scan") for n in model.graph.node)
    assert any(o.domain in ("", "ai.onnx") and o.version == 18 for o in model.opset_import)


# --- export contract and variants ---------------------------------------------------------------------


def test_export_entries_follow_the_manifest_contract(exported):
    out, entries = exported
    for e in entries:
        assert set(e) == {"role", "file", "format", "precision", "fidelity", "meta"}
        assert (out / e["file"]).is_file()
        json.dumps(e, allow_nan=False)  # manifest-safe
    decoders = {e["precision"]: e for e in entries if e["role"] == "decoder"}
    fp32 = decoders["fp32"]
    assert entries[0] is fp32
    assert fp32["meta"]["sample_rate"] == 24000 and fp32["meta"]["samples_per_frame"] == 1920
    assert fp32["fidelity"]["stream_vs_offline_max_abs"] <= FP32_TOL
    for precision in ("fp16", "int8"):
        if precision in decoders:  # shipped: inside its gate, precision-specific metadata
            entry = decoders[precision]
            assert gates.gate("decoder", precision).failures(entry["fidelity"]) == []
            intended = list(policies.policy("decoder", precision).providers)
            assert entry["meta"]["intended_providers"] == intended
        else:  # refused: the reason and the measurement are recorded, the file is gone
            assert fp32["meta"]["rejected"][precision]
            assert "snr_db" in fp32["meta"]["rejected_fidelity"][precision]
            assert not (out / f"decoder.{precision}.onnx").exists()
    state = [e for e in entries if e["role"] == "decoder_state"]
    assert len(state) == 1
    with np.load(out / state[0]["file"]) as npz:
        assert {s["name"]: tuple(s["shape"]) for s in state[0]["meta"]["state"]} == {
            k: npz[k].shape for k in npz.files}
        assert all(not npz[k].any() for k in npz.files)
    calibration = [e for e in entries if e["role"] == "calibration"]
    assert bool(calibration) == ("int8" in decoders)


def test_fp16_keeps_the_policy_islands_in_fp32(exported):
    import onnx
    from onnx import TensorProto

    from qwen3_tts_edge.export.decoder_quant import node_scope

    path = exported[0] / "decoder.fp16.onnx"
    if not path.exists():
        pytest.skip(f"fp16 refused: {exported[1][0]['meta']['rejected'].get('fp16')}")
    model = onnx.load(str(path))
    pol = policies.policy("decoder", "fp16")
    inits = {t.name: t.data_type for t in model.graph.initializer}
    seen = {"fp32": 0, "fp16": 0}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gather"):
            continue
        weights = [inits[i] for i in node.input if inits.get(i) in (TensorProto.FLOAT, TensorProto.FLOAT16)]
        if not weights:
            continue
        want = pol.precision_for(node_scope(node), node.op_type)
        assert weights[0] == (TensorProto.FLOAT if want == "fp32" else TensorProto.FLOAT16), node.name
        seen[want] += 1
    assert seen["fp32"] and seen["fp16"]
    # graph I/O stays fp32 so every precision shares one state layout
    assert all(i.type.tensor_type.elem_type != TensorProto.FLOAT16 for i in model.graph.input)


def test_gates_decide_what_ships(tiny_checkpoint, tmp_path, monkeypatch):
    """An impossible fp16 gate refuses fp16 (file deleted, reason recorded); an int8 gate without the speed
    clause ships int8 with its calibration codes (tiny int8 is slower than fp32, so normally refused)."""
    from qwen3_tts_edge.export import decoder_onnx

    impossible = gates.Gate("decoder", "fp16", "test", min_snr_db=1000.0)
    no_speed_clause = gates.Gate("decoder", "int8", "test", min_snr_db=20.0)
    monkeypatch.setitem(gates.GATES, ("decoder", "fp16"), impossible)
    monkeypatch.setitem(gates.GATES, ("decoder", "int8"), no_speed_clause)
    entries = decoder_onnx.export_decoder(tiny_checkpoint, tmp_path, validation_frames=80)
    assert [e["precision"] for e in entries if e["role"] == "decoder"] == ["fp32", "int8"]
    assert "snr_db" in entries[0]["meta"]["rejected"]["fp16"]
    assert not (tmp_path / "decoder.fp16.onnx").exists()
    int8 = next(e for e in entries if e["precision"] == "int8" and e["role"] == "decoder")
    assert int8["fidelity"]["snr_db"] >= 20.0 and "cpu_speedup" in int8["fidelity"]
    calib = next(e for e in entries if e["role"] == "calibration")
    with np.load(tmp_path / calib["file"]) as npz:
        assert all(npz[k].shape[1] == 16 and npz[k].dtype == np.int64 for k in npz.files)
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / int8["file"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_parity_report_uses_the_shared_metrics(tiny_checkpoint, exported):
    from qwen3_tts_edge.export.decoder_onnx import parity_report

    report = parity_report(tiny_checkpoint, exported[0], frames=80)
    assert set(report) == {"decoder"}
    shipped = {e["precision"] for e in exported[1] if e["role"] == "decoder"}
    assert set(report["decoder"]) == shipped
    for precision, rec in report["decoder"].items():
        assert {"stream_vs_offline_max_abs", "snr_db", "logmel_dist"} <= set(rec)
        if precision == "fp32":
            assert rec["stream_vs_offline_max_abs"] <= FP32_TOL
        else:
            assert gates.gate("decoder", precision).failures(rec, speed=False) == []


# --- runtime ---------------------------------------------------------------------------------------------


def test_runtime_reads_sizes_from_metadata(fp32_decoder, exported):
    assert fp32_decoder.sample_rate == 24000
    assert fp32_decoder.samples_per_frame == 1920
    assert fp32_decoder.num_quantizers == 16 and fp32_decoder.codebook_size == 2048
    assert fp32_decoder.providers == ["CPUExecutionProvider"]
    assert fp32_decoder.precision == "fp32"
    with np.load(exported[0] / "decoder.state.npz") as npz:
        assert {s.name: s.shape for s in fp32_decoder.state_layout} == {k: npz[k].shape for k in npz.files}


@pytest.mark.parametrize(
    ("codes", "error"),
    [
        (np.zeros((2, 15), np.int64), ValueError),
        (np.zeros((16,), np.int64), ValueError),
        (np.zeros((0, 16), np.int64), ValueError),
        (np.full((2, 16), 2048, np.int64), ValueError),
        (np.full((2, 16), -1, np.int64), ValueError),
        (np.zeros((2, 16), np.float32), TypeError),
        (np.zeros((2, 16), bool), TypeError),
        ([[0] * 16], TypeError),
    ],
)
def test_bad_input_is_rejected_without_touching_state(fp32_decoder, long_codes, codes, error):
    fp32_decoder.decode(long_codes[:3])
    before = fp32_decoder.snapshot()
    with pytest.raises(error):
        fp32_decoder.decode(codes)
    after = fp32_decoder.snapshot()
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert fp32_decoder.frames_decoded == 3


def test_other_integer_dtypes_are_accepted(fp32_decoder, long_codes):
    a = fp32_decoder.decode(long_codes[:2].astype(np.int32))
    fp32_decoder.reset()
    assert np.array_equal(a, fp32_decoder.decode(long_codes[:2]))


def test_reset_and_snapshot_restore(fp32_decoder, long_codes):
    first = fp32_decoder.decode(long_codes[:5])
    saved = fp32_decoder.snapshot()
    nxt = fp32_decoder.decode(long_codes[5:9])
    fp32_decoder.reset()
    assert fp32_decoder.frames_decoded == 0
    assert np.array_equal(first, fp32_decoder.decode(long_codes[:5]))
    fp32_decoder.restore(saved)
    assert np.array_equal(nxt, fp32_decoder.decode(long_codes[5:9]))
    with pytest.raises(ValueError):
        fp32_decoder.restore({k: v for k, v in saved.items() if k != "kv"})


def test_prime_continues_after_the_reference(fp32_decoder, long_codes, long_offline):
    ref, n = long_codes[:90], 90  # reference longer than the window
    fp32_decoder.decode(long_codes[200:210])  # priming starts a new stream regardless
    fp32_decoder.prime(ref, chunk=32)
    assert fp32_decoder.frames_decoded == n
    out = _stream(fp32_decoder, long_codes[n:130], 4)
    assert fidelity.max_abs(long_offline[n * 1920 : 130 * 1920], out) <= FP32_TOL
    # The same reference again (a cached voice): its primed state is restored, not decoded again.
    calls = []
    run = fp32_decoder._session.run
    fp32_decoder._session.run = lambda *a, **k: calls.append(1) or run(*a, **k)
    try:
        fp32_decoder.prime(long_codes[100:110], chunk=32)  # another voice in between
        fp32_decoder.prime(ref, chunk=32)
        assert len(calls) == 1 and fp32_decoder.frames_decoded == n
        assert np.array_equal(_stream(fp32_decoder, long_codes[n:130], 4), out)
    finally:
        fp32_decoder._session.run = run


def test_unavailable_provider_warns_and_falls_back(exported):
    from qwen3_tts_edge.runtime.backends.onnxruntime.decoder import StreamingDecoder

    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider"):
        dec = StreamingDecoder(exported[0] / "decoder.fp32.onnx", providers=["CUDAExecutionProvider"])
    assert dec.providers == ["CPUExecutionProvider"]


def test_fp16_on_cpu_warns_but_decodes(exported, long_codes):
    from qwen3_tts_edge.runtime.backends.onnxruntime.decoder import StreamingDecoder

    path = exported[0] / "decoder.fp16.onnx"
    if not path.exists():
        pytest.skip("fp16 variant refused")
    with pytest.warns(RuntimeWarning, match="GPU"):
        dec = StreamingDecoder(path)
    assert dec.decode(long_codes[:2]).dtype == np.float32


def test_runtime_module_is_torch_free():
    code = ("import sys, qwen3_tts_edge.runtime.backends.onnxruntime.decoder; "
            "bad = [m for m in ('torch', 'transformers', 'qwen_tts', 'onnx') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- metrics and data tables ---------------------------------------------------------------------------


def test_fidelity_metrics():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(48000).astype(np.float32) * 0.1
    noise = rng.standard_normal(48000).astype(np.float32) * 0.001
    assert fidelity.snr_db(x, x) == float("inf")
    assert abs(fidelity.snr_db(x, x + noise) - 40.0) < 0.5
    assert fidelity.max_abs(x, x + 0.5) == pytest.approx(0.5)
    assert fidelity.cosine(x, 3 * x) == pytest.approx(1.0)
    assert fidelity.logmel_distance(x, x) == 0.0
    assert abs(fidelity.logmel_distance(x, 2 * x) - 20 * np.log10(2)) < 1e-6  # power ×4 = 6.02 dB
    assert fidelity.logmel_distance(x, x + noise) < 0.1
    with pytest.raises(ValueError):
        fidelity.snr_db(x, x[:-1])


def test_policy_and_gate_tables():
    fp16 = policies.policy("decoder", "fp16")
    assert fp16.precision_for("dequant.quantizer.rvq_first.output_proj", "Conv") == "fp32"
    assert fp16.precision_for("transformer.layers.3.mlp.down_proj", "MatMul") == "fp32"
    assert fp16.precision_for("upsample.0.1.norm", "LayerNormalization") == "fp32"
    assert fp16.precision_for("head_conv.conv", "Conv") == "fp32"
    assert fp16.precision_for("blocks.2.res.1.conv1.conv", "Conv") == "fp16"
    int8 = policies.policy("decoder", "int8")
    assert int8.precision_for("blocks.0.res.0.conv1.conv", "Conv") == "int8"
    assert int8.precision_for("blocks.0.res.0.act1", "Sin") == "fp32"
    assert int8.precision_for("dequant", "Gather") == "fp32"
    assert fp16.table()[-1]["scope"] == "*"
    g = gates.gate("decoder", "int8")
    assert g.failures({"snr_db": 30.0, "logmel_dist": 0.1, "cpu_speedup": 2.0}) == []
    assert len(g.failures({"snr_db": 12.3, "logmel_dist": 0.1})) == 2  # low SNR, speed not measured
    with pytest.raises(KeyError):
        policies.policy("decoder", "q4_k")


# --- real shape (opt-in: several minutes) ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("QWEN3_TTS_EDGE_REAL_DECODER"),
                    reason="set QWEN3_TTS_EDGE_REAL_DECODER=1 to export and measure the 0.6b-shape decoder")
def test_real_shape_decoder_report(tmp_path):
    """Export the shipped-shape decoder (random weights), gate it, write the measurements to artifacts/."""
    from qwen3_tts_edge.export.decoder_onnx import export_decoder, ms_per_frame, parity_report
    from qwen3_tts_edge.export.sources import resolve_model

    checkpoint = resolve_model("random:0.6b-custom_voice").path
    log: list[str] = []
    entries = export_decoder(checkpoint, tmp_path, progress=log.append)
    report = parity_report(checkpoint, tmp_path, frames=100)
    timings = {}
    for e in entries:
        if e["role"] == "decoder":
            path = tmp_path / e["file"]
            timings[e["precision"]] = {
                f"chunk{c}": {"wall_ms_2_threads_best": round(ms_per_frame(path, c, 2, clock="wall"), 1),
                              "cpu_ms_1_thread": round(ms_per_frame(path, c), 1)}
                for c in (1, 4, 12)}
    result = {"entries": entries, "parity": report, "ms_per_frame": timings, "log": log}
    out = Path(__file__).resolve().parents[1] / "artifacts" / "decoder-real-shape.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1, allow_nan=False))
    assert report["decoder"]["fp32"]["stream_vs_offline_max_abs"] <= FP32_TOL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert entries[0]["fidelity"]["stream_vs_offline_max_abs"] <= FP32_TOL
