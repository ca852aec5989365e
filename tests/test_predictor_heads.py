"""Weight-only int8 predictor heads (--predictor-heads int8): export, gate, runtime choice, logits and batching."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from qwen3_tts_edge.quant.gates import gate
from qwen3_tts_edge.runtime.bundle import BundleError, Component, read_manifest, write_manifest


@pytest.fixture(scope="module")
def heads_bundle(tmp_path_factory):
    """random:tiny-custom_voice with a q8_0 talker and the int8 heads, exported as a user would."""
    from qwen3_tts_edge.export.build import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-heads"
    export_bundle("random:tiny-custom_voice", out, talker=["q8_0"], decoder=["fp32"], predictor_heads=["int8"],
                  progress=lambda msg: None)
    return out


def _engines(bundle, heads=None):
    from qwen3_tts_edge.runtime import TTS

    return TTS(bundle, predictor_heads=heads, decoder_threads=1).engines.generation.predictor


def test_export_writes_one_gated_file_of_per_step_int8_graphs(heads_bundle):
    import onnx
    from safetensors import safe_open

    comp = read_manifest(heads_bundle).component("predictor_heads", "int8")
    assert comp.format == "onnx-steps" and comp.file == "predictor_heads.int8.safetensors"
    fidelity = comp.meta["fidelity"]
    assert not gate("predictor_heads", "int8").failures(fidelity, speed=False)
    assert fidelity["logit_cos_min"] < 1.0  # quantised, so not bit-equal: the gate measured something
    n = comp.meta["num_steps"]
    with safe_open(str(heads_bundle / comp.file), framework="numpy") as f:
        assert sorted(f.keys()) == [f"step_{j:02d}" for j in range(n)]
        model = onnx.load_from_string(f.get_tensor("step_03").tobytes())
    (node,) = model.graph.node
    assert node.op_type == "MatMulNBits"
    assert {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}["bits"] == 8
    k = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    v = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    assert comp.size < 0.35 * (4 * n * k * v)  # a quarter of the float32 heads' bytes, plus the scales


def test_the_runtime_speaks_with_the_exported_heads_unless_told_f32(heads_bundle):
    int8 = _engines(heads_bundle)
    assert int8.heads_precision == "int8" and int8.heads is None  # no float32 copy held beside them
    f32 = _engines(heads_bundle, "f32")
    assert f32.heads_precision == "f32" and f32.heads is not None


def test_asking_for_heads_a_bundle_lacks_says_how_to_export_them(tiny_bundle):
    with pytest.raises(BundleError, match="--predictor-heads int8"):
        _engines(tiny_bundle, "int8")
    assert _engines(tiny_bundle).heads_precision == "f32"  # nothing exported, nothing asked: float32


def test_heads_without_a_gguf_talker_are_refused_before_any_work(tmp_path):
    from qwen3_tts_edge.export.build import ExportError, export_bundle

    with pytest.raises(ExportError, match="GGUF talker"):
        export_bundle("random:tiny-custom_voice", tmp_path / "b", talker=["fp32"], predictor_heads=["int8"],
                      progress=lambda msg: None)
    assert not (tmp_path / "b").exists()


def _teacher_forced_logits(predictor, hidden, c0, codes):
    """Each step's logits with the earlier steps' codes forced to ``codes`` (both head kinds see the same inputs)."""
    from qwen3_tts_edge.runtime.sampler import ResidualSampling

    seen = []

    def choose(step, logits):
        seen.append(np.array(logits, copy=True))
        return int(codes[step])

    predictor.predict(hidden, c0, ResidualSampling.host(choose))
    return np.stack(seen)


def test_int8_heads_track_the_float32_heads_on_the_predictors_own_hidden_states(heads_bundle):
    int8, f32 = _engines(heads_bundle), _engines(heads_bundle, "f32")
    rng = np.random.default_rng(1)
    worst = 1.0
    for _ in range(4):
        hidden = rng.standard_normal(int8.hidden_size).astype(np.float32)
        c0 = int(rng.integers(0, int8.codebook_size))
        codes = f32.predict(hidden, c0)  # the float32 path's greedy codes, forced on both
        a = _teacher_forced_logits(int8, hidden, c0, codes)
        b = _teacher_forced_logits(f32, hidden, c0, codes)
        cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        worst = min(worst, float(cos.min()))
        assert not np.array_equal(a, b)
    assert worst >= gate("predictor_heads", "int8").min_logit_cos


def test_a_batched_frame_with_int8_heads_equals_the_frame_alone(heads_bundle):
    from qwen3_tts_edge.runtime import TTS

    pred = TTS(heads_bundle, max_batch=3).engines.generation.predictor
    assert pred.heads_precision == "int8"
    rng = np.random.default_rng(2)
    frames = [(rng.standard_normal(pred.hidden_size).astype(np.float32), int(rng.integers(0, 50)))
              for _ in range(3)]
    from qwen3_tts_edge.runtime.sampler import GREEDY

    together = pred.predict_many([(h, c0, GREEDY) for h, c0 in frames])
    alone = [pred.predict(h, c0) for h, c0 in frames]
    for t, a in zip(together, alone, strict=True):
        np.testing.assert_array_equal(t, a)


def test_a_heads_file_of_another_kind_is_refused_with_a_fix(heads_bundle, tmp_path):
    from safetensors.numpy import save_file

    from qwen3_tts_edge.runtime import TTS

    bundle = tmp_path / "b"
    shutil.copytree(heads_bundle, bundle)
    comp = read_manifest(bundle).component("predictor_heads", "int8")
    save_file({"step_00": np.zeros(4, np.uint8)}, str(bundle / comp.file), metadata={"format": "something-else"})
    manifest = read_manifest(bundle)  # re-record the checksum so the file itself is what gets refused
    comps = [c if c.role != "predictor_heads" else Component.from_file(bundle, c.file, c.role, c.format, c.precision,
                                                                       meta=c.meta) for c in manifest.components]
    import dataclasses

    write_manifest(bundle, dataclasses.replace(manifest, components=tuple(comps)))
    with pytest.raises(BundleError, match="not a predictor-heads file"):
        TTS(bundle).engines.generation  # noqa: B018
    json.loads((bundle / "manifest.json").read_text())  # the bundle itself is left as it was


def test_the_bench_runs_a_row_per_heads_precision(heads_bundle):
    from qwen3_tts_edge.bench import run as bench

    p = __import__("argparse").ArgumentParser()
    bench.add_bench_arguments(p)
    args = p.parse_args(["-b", str(heads_bundle), "--frames", "4", "--repeats", "1", "--texts", "en-short",
                         "--threads", "1", "--predictor-heads", "f32,int8"])
    r = bench.run_bench(args)
    runs = {x["variant"]: x for x in r["runs"]}
    assert set(runs) == {"q8_0", "q8_0+int8"}
    assert (runs["q8_0"]["predictor_heads"], runs["q8_0+int8"]["predictor_heads"]) == ("f32", "int8")
    heads = read_manifest(heads_bundle).component("predictor_heads", "int8")
    f32, int8 = r["floor"]["talker"]["q8_0"], r["floor"]["talker"]["q8_0+int8"]
    assert heads.size <= int8["heads_bytes"] < f32["heads_bytes"] / 3  # the int8 file (+ the input projection)
    assert int8["talker_bytes"] == f32["talker_bytes"] and int8["predictor_bytes"] == f32["predictor_bytes"]
    assert runs["q8_0+int8"]["bundle_mb"] == pytest.approx(runs["q8_0"]["bundle_mb"] + heads.size / 1e6)
    assert runs["q8_0+int8"]["fidelity"]["predictor_heads"] == heads.meta["fidelity"]

    args.predictor_heads = ["int4"]
    with pytest.raises(bench.BenchError, match="no int4 predictor heads"):
        bench.run_bench(args)


def test_heads_of_another_shape_are_refused_by_the_predictor(heads_bundle):
    from types import SimpleNamespace

    from qwen3_tts_edge.runtime.backends.llama_cpp.bindings import LlamaError
    from qwen3_tts_edge.runtime.backends.llama_cpp.predictor import CodePredictor

    m = read_manifest(heads_bundle)
    pred, tables = (heads_bundle / m.component(role, "q8_0").file for role in ("predictor", "predictor_tables"))
    ok = _engines(heads_bundle)._quant_heads
    wrong = SimpleNamespace(steps=ok.steps, hidden_size=ok.hidden_size + 1, codebook_size=ok.codebook_size)
    with pytest.raises(LlamaError, match="mismatched files, re-export"):
        CodePredictor(pred, tables, heads=wrong)
