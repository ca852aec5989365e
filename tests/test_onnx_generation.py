"""ONNX Runtime talker and fused code predictor against the official PyTorch modules (random tiny checkpoint).

The graphs and the tables are exported once per module from the reference's own talker; ORT runs on one thread
so results are deterministic on a busy machine.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import needs_export

pytestmark = needs_export


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    from qwen3_tts_edge.bench.parity_llama import build_reference

    return build_reference(tiny_checkpoint, n_text=8, n_frames=24, n_pred_frames=6, seed=0)


@pytest.fixture(scope="module")
def onnx_export(reference, tmp_path_factory):
    from qwen3_tts_edge.export.predictor_onnx import PREDICTOR_FILE, export_predictor_onnx
    from qwen3_tts_edge.export.talker_onnx import TABLES_FILE, TALKER_FILE, export_tables, export_talker_onnx

    out = tmp_path_factory.mktemp("onnx_generation")
    entries = [export_talker_onnx(reference.talker, out / TALKER_FILE),
               export_predictor_onnx(reference.talker, out / PREDICTOR_FILE),
               export_tables(reference.talker, out / TABLES_FILE)]
    return out, entries


@pytest.fixture(scope="module")
def engines(onnx_export):
    from qwen3_tts_edge.export.predictor_onnx import PREDICTOR_FILE
    from qwen3_tts_edge.export.talker_onnx import TABLES_FILE, TALKER_FILE
    from qwen3_tts_edge.runtime.backends.onnxruntime.generation import open_generation_onnx

    out, _ = onnx_export
    return open_generation_onnx(out / TALKER_FILE, out / PREDICTOR_FILE, out / TABLES_FILE, threads=1)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _sampler(params, seed: int, *, fused: bool):
    """A CodeSampler; without ``fused`` it hands the engine a host chooser, so the engine takes the per-step path."""
    from dataclasses import replace

    from qwen3_tts_edge.runtime.sampler import CodeSampler, ResidualSampling

    class StepwiseSampler(CodeSampler):
        def residual_sampling(self):
            return ResidualSampling.host(self.choose_residual)

    cls = CodeSampler if fused else StepwiseSampler
    return cls(replace(params, seed=seed), vocab_size=3072, eos_id=2150, min_new_frames=10_000)


# ----------------------------------------------------------------------------------------------------------
# export


def test_export_entries_and_self_checks(onnx_export):
    out, entries = onnx_export
    assert [(e["role"], e["format"], e["precision"]) for e in entries] == [
        ("talker", "onnx", "fp32"), ("predictor", "onnx", "fp32"), ("predictor_tables", "npy", "fp32")]
    for e in entries:
        assert (out / e["file"]).is_file()
    talker, predictor, tables = entries
    assert talker["meta"]["files"] == ["talker.fp32.onnx"] and talker["fidelity"]["logit_cos_min"] >= 0.99999
    assert predictor["fidelity"]["codes_equal"] == predictor["fidelity"]["frames"] == 4
    assert predictor["meta"]["has_projection"] and predictor["meta"]["num_steps"] == 15
    assert tables["meta"]["rows"] == 151936 + 3072 + 15 * 2048
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "scratch files left behind"


def test_big_graphs_keep_their_weights_in_one_data_file(reference, tmp_path, monkeypatch):
    import onnxruntime as ort

    from qwen3_tts_edge.export import talker_onnx

    monkeypatch.setattr(talker_onnx, "EXTERNAL_DATA_BYTES", 0)
    entry = talker_onnx.export_talker_onnx(reference.talker, tmp_path / "t.onnx", check=False)
    assert entry["meta"]["files"] == ["t.onnx", "t.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.onnx", "t.onnx.data"]
    assert (tmp_path / "t.onnx").stat().st_size < (tmp_path / "t.onnx.data").stat().st_size / 4
    ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])


def test_tables_equal_official_lookups(engines, reference):
    from qwen3_tts_edge.export.torch_reference import (
        official_codec_embeds,
        official_residual_embeds,
        official_text_embeds,
    )

    tables, talker = engines.tables, reference.talker
    text_ids = [0, 5, 198, 77091, 151644, 151671, 151672, 151673, 151935]
    codec_ids = [0, 1, 2047, 2148, 2149, 2150, 2861, 3071]
    assert np.abs(tables.text_embeds(text_ids) - official_text_embeds(talker, text_ids)).max() <= 1e-6
    assert np.abs(tables.codec_embeds(codec_ids) - official_codec_embeds(talker, codec_ids)).max() == 0
    frames = reference.frames[:8]
    want = np.stack([official_codec_embeds(talker, [f[0]])[0] + official_residual_embeds(talker, f[1:])
                     for f in frames])
    assert np.abs(tables.frame_embeds(frames) - want).max() <= 1e-6
    with pytest.raises(ValueError, match="codec ids"):
        tables.codec_embeds([3072])


# ----------------------------------------------------------------------------------------------------------
# talker


def test_talker_matches_official_along_trajectory(engines, reference, capsys):
    t, n = engines.talker, reference.n_prompt
    x = reference.embeds
    outs = [t.prefill(x[:n])] + [t.step(e) for e in x[n:]]
    assert t.n_past == x.shape[0] and t.n_ctx is None and t.placement.device == "cpu"
    logits, hidden = np.stack([o.logits for o in outs]), np.stack([o.hidden for o in outs])
    cos = _cos(reference.logits[n - 1:], logits)
    dh = np.abs(hidden - reference.hidden[n - 1:]).max()
    with capsys.disabled():
        print(f"\nonnx talker: {len(outs)} positions, logit cos min {cos.min():.8f}, hidden max |Δ| {dh:.2e} "
              f"(|h| max {np.abs(reference.hidden).max():.2f})")
    assert cos.min() >= 0.99999, cos
    assert dh <= 1e-5 * max(1.0, np.abs(reference.hidden).max())


def test_talker_extend_rewind_and_reset(engines, reference):
    t, n, x = engines.talker, reference.n_prompt, reference.embeds
    first = t.prefill(x[:n])
    steps = [t.step(e) for e in x[n:n + 3]]
    t.rewind(n + 1)
    assert t.n_past == n + 1
    again = t.step(x[n + 1])
    np.testing.assert_allclose(again.logits, steps[1].logits, rtol=0, atol=1e-5)
    t.prefill(x[:4])
    ext = t.extend(x[4:n + 2])  # prompt in two chunks, then two frames in one call
    np.testing.assert_allclose(ext.logits, steps[1].logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ext.hidden, reference.hidden[n + 1], rtol=0, atol=1e-5)
    state = t.save_state()
    assert state[0] == n + 2
    t.reset()
    assert t.n_past == 0
    np.testing.assert_allclose(t.prefill(x[:n]).logits, first.logits, rtol=0, atol=1e-5)
    t.load_state(state)  # what the prefix cache does for a returning voice
    np.testing.assert_allclose(t.step(x[n + 2]).logits, steps[2].logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="rewind"):
        t.rewind(t.n_past + 1)
    with pytest.raises(ValueError, match="embedding of size"):
        t.step(np.zeros(3, dtype=np.float32))


def test_engines_refuse_wrong_files_and_fall_back_to_cpu(onnx_export):
    import onnxruntime as ort

    from qwen3_tts_edge.runtime.backends.onnxruntime.generation import (
        OnnxEngineError,
        OnnxPredictor,
        OnnxTalker,
        open_generation_onnx,
    )

    out, _ = onnx_export
    with pytest.raises(OnnxEngineError, match="expected a 'talker' graph"):
        OnnxTalker(out / "predictor.fp32.onnx", threads=1)
    with pytest.raises(FileNotFoundError):
        open_generation_onnx(out / "missing.onnx", out / "predictor.fp32.onnx", out / "predictor_tables.fp32.npy")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.warns(RuntimeWarning, match="not available"):
            p = OnnxPredictor(out / "predictor.fp32.onnx", threads=1, providers=["CUDAExecutionProvider"])
        assert p.placement.device == "cpu" and p.placement.devices == ("CPUExecutionProvider",)


def test_loader_reads_the_manifest_roles(onnx_export):
    from types import SimpleNamespace

    from qwen3_tts_edge.runtime.backends.onnxruntime.generation import load_generation_onnx

    out, entries = onnx_export
    asked = []

    def component(role, precision):
        asked.append((role, precision))
        return next(SimpleNamespace(**e) for e in entries if e["role"] == role)

    def find(role, precision=None):
        asked.append((role, precision))
        return [SimpleNamespace(**e) for e in entries if e["role"] == role and precision in (None, e["precision"])]

    bundle = SimpleNamespace(manifest=SimpleNamespace(component=component, find=find), path=lambda c: out / c.file)
    eng = load_generation_onnx(bundle, "fp32", threads=1, n_ctx=64, n_gpu_layers=3)
    assert asked == [("predictor_tables", "fp32"), ("talker", "fp32"), ("predictor", "fp32")]
    assert eng.talker.n_ctx == 64 and eng.tables.hidden_size == eng.talker.hidden_size == 64


def test_talker_n_ctx_is_enforced(onnx_export, reference):
    from qwen3_tts_edge.runtime.backends.onnxruntime.generation import OnnxTalker

    out, _ = onnx_export
    t = OnnxTalker(out / "talker.fp32.onnx", threads=1, n_ctx=reference.n_prompt)
    t.prefill(reference.embeds[:reference.n_prompt])
    with pytest.raises(ValueError, match="exceed n_ctx"):
        t.step(reference.embeds[reference.n_prompt])


# ----------------------------------------------------------------------------------------------------------
# predictor


def test_predictor_greedy_matches_official_generate(engines, reference):
    import torch

    from qwen3_tts_edge.runtime.sampler import GREEDY as greedy
    from qwen3_tts_edge.runtime.sampler import ResidualSampling

    p, talker, n = engines.predictor, reference.talker, reference.n_prompt
    for k in range(4):
        hid, c0 = reference.hidden[n - 1 + k], int(reference.frames[k][0])
        with torch.no_grad():
            seq = torch.stack([torch.from_numpy(hid), talker.model.codec_embedding(torch.tensor(c0))])[None]
            want = talker.code_predictor.generate(inputs_embeds=seq, max_new_tokens=15, do_sample=False)
        codes = p.predict(hid, c0, greedy)
        assert codes.dtype == np.int64 and codes.shape == (15,)
        np.testing.assert_array_equal(codes, want[0].numpy())
        per_step = ResidualSampling.host(lambda j, lg: int(np.argmax(lg)))
        np.testing.assert_array_equal(p.predict(hid, c0, per_step), codes)  # per-step path
    with pytest.raises(ValueError, match="outside"):
        p.predict(hid, c0, ResidualSampling.host(lambda j, logits: 5000))
    with pytest.raises(ValueError, match="c0 must be"):
        p.predict(hid, 3072, greedy)


def test_predictor_teacher_forced_logits_match_official(engines, reference, capsys):
    p, n = engines.predictor, reference.n_prompt
    got = np.stack([p.run(reference.hidden[n - 1 + k], int(f[0]), forced=f[1:])[1]
                    for k, f in enumerate(reference.frames[:reference.pred_logits.shape[0]])])
    assert got.shape == reference.pred_logits.shape == (6, 15, 2048)
    cos = _cos(reference.pred_logits, got)
    with capsys.disabled():
        print(f"\nonnx predictor: 6 frames x 15 steps, logit cos min {cos.min():.8f}, max |Δ| "
              f"{np.abs(got - reference.pred_logits).max():.2e}")
    assert cos.min() >= 0.99999, cos.min()


@pytest.mark.parametrize("options", [
    {},  # the shipped defaults: temperature 0.9, top-k 50, top-p 1.0
    {"subtalker_top_k": 0, "subtalker_top_p": 0.8},
    {"subtalker_temperature": 1.7, "subtalker_top_k": 7, "subtalker_top_p": 0.9},
    {"subtalker_temperature": 0.3, "subtalker_top_k": 4000},
    {"subtalker_dosample": False},
])
def test_fused_sampling_equals_the_sampler(engines, reference, options):
    """One fused run per frame draws the codes ``CodeSampler.choose_residual`` draws on the host from one stream."""
    from qwen3_tts_edge.runtime.sampler import SamplingParams

    p, n = engines.predictor, reference.n_prompt
    params = SamplingParams(**options)
    fused, stepwise = _sampler(params, 7, fused=True), _sampler(params, 7, fused=False)
    calls = p.calls
    rng = np.random.default_rng(3)
    for k in range(8):
        hid = reference.hidden[n - 1 + k % 6] + rng.standard_normal(64).astype(np.float32) * 0.5
        c0 = int(reference.frames[k % 6][0])
        want = p.predict(hid, c0, stepwise.residual_sampling())  # 15 runs, the sampler's own draw per step
        got = p.predict(hid, c0, fused.residual_sampling())  # 1 run, the draw in the graph
        np.testing.assert_array_equal(got, want, err_msg=f"frame {k}")
    assert p.calls - calls == 8 * 16
    assert fused._rng_res.random() == stepwise._rng_res.random()  # both streams advanced by 15 per frame


# ----------------------------------------------------------------------------------------------------------
# frame loop


def _prompt(reference):
    from qwen3_tts_edge.export.torch_reference import official_text_embeds
    from qwen3_tts_edge.runtime.prompt import Prompt

    pad = official_text_embeds(reference.talker, [reference.config["tts_pad_token_id"]])[0]
    return Prompt(embeds=reference.embeds[:reference.n_prompt], trailing=np.zeros((0, pad.shape[0]), np.float32),
                  tts_pad=pad, n_text_tokens=8)


def test_frame_loop_greedy_equals_official_for_200_frames(engines, reference):
    """200 greedy frames of the real frame loop; every one of the 3200 decisions is the official argmax.

    The official modules then replay the whole trajectory in two batched forwards (talker over all positions,
    predictor ``forward_finetune`` over all frames): if each of our choices is the official greedy choice given
    the same history, the official greedy generation produces these same frames. (Step-by-step official
    engines would take minutes on 2 cores.)
    """
    import torch

    from qwen3_tts_edge.export.torch_reference import TorchTables
    from qwen3_tts_edge.runtime.engine.contract import FreshPromptTalker
    from qwen3_tts_edge.runtime.frame_loop import FrameLoop
    from qwen3_tts_edge.runtime.options import Limits
    from qwen3_tts_edge.runtime.sampler import SamplingParams

    class Model:
        talker = reference.talker

    frames = 200
    greedy = SamplingParams().greedy()
    prompt = _prompt(reference)
    loop = FrameLoop(FreshPromptTalker(engines.talker), engines.predictor, engines.tables, prompt,
                     _sampler(greedy, 0, fused=True),
                     Limits(max_frames=frames, frames_per_text_token=None, repeat_frames=None))
    codes = np.stack([f.codes for f in loop])
    assert codes.shape == (frames, 16) and len(np.unique(codes[:, 0])) > 20  # a varied trajectory

    talker, n = reference.talker, reference.n_prompt
    steps = TorchTables(Model).frame_embeds(codes[:-1]) + prompt.tts_pad
    with torch.no_grad():
        h = talker.model(inputs_embeds=torch.from_numpy(np.concatenate([prompt.embeds, steps]))[None])
        h = h.last_hidden_state[0, n - 1:]
        c0_logits = talker.codec_head(h).numpy()
        c = torch.from_numpy(codes)
        tabs = talker.code_predictor.get_input_embeddings()
        seq = [h, talker.model.codec_embedding(c[:, 0])] + [tabs[j](c[:, j + 1]) for j in range(14)]
        pred_logits = talker.code_predictor.forward_finetune(inputs_embeds=torch.stack(seq, 1)).logits.numpy()
    replay = _sampler(greedy, 0, fused=False)
    want_c0 = []
    for k in range(frames):
        want_c0.append(int(np.argmax(replay.process_c0(c0_logits[k], k))))
        replay.generated.append(want_c0[-1])
    np.testing.assert_array_equal(codes[:, 0], want_c0)
    np.testing.assert_array_equal(codes[:, 1:], pred_logits.argmax(-1))


def test_frame_loop_sampled_fused_equals_per_step(engines, reference):
    from qwen3_tts_edge.runtime.engine.contract import FreshPromptTalker
    from qwen3_tts_edge.runtime.frame_loop import FrameLoop
    from qwen3_tts_edge.runtime.options import Limits
    from qwen3_tts_edge.runtime.sampler import SamplingParams

    limits = Limits(max_frames=20, frames_per_text_token=None, repeat_frames=None)
    runs = []
    for fused in (True, False):
        loop = FrameLoop(FreshPromptTalker(engines.talker), engines.predictor, engines.tables, _prompt(reference),
                         _sampler(SamplingParams(), 11, fused=fused), limits)
        runs.append(np.stack([f.codes for f in loop]))
    assert runs[0].shape == (20, 16)
    np.testing.assert_array_equal(runs[0], runs[1])


# ----------------------------------------------------------------------------------------------------------
# the engine inside TTS, from a bundle


@pytest.mark.parametrize("greedy", [True, False])
def test_tts_onnx_backend_equals_official_modules(tiny_bundle, tiny_checkpoint, greedy):
    """`TTS(backend="onnxruntime")` against the official modules through the same TTS loop, prompt and seed:
    identical codes for 60 frames, greedy and sampled (the sampled run draws its residual codes in the graph
    from the sampler's own random stream)."""
    from qwen3_tts_edge.export.torch_reference import TorchPredictor, TorchTables, TorchTalker, load_official
    from qwen3_tts_edge.runtime.engine import GenerationEngines
    from qwen3_tts_edge.runtime.pipeline import TTS

    model = load_official(tiny_checkpoint)
    text = "Hello there, this is a test of two engines."
    opts = dict(speaker="vivian", seed=3, greedy=greedy, max_frames=60, min_frames=60, frames_per_text_token=None)
    tts = TTS(tiny_bundle, backend="onnxruntime", threads=1)
    assert (tts.backend, tts.talker_precision, tts.predictor_precision) == ("onnxruntime", "fp32", "fp32")
    codes = np.concatenate([c.codes for c in tts.stream(text, **opts)])
    official = TTS.from_engines(GenerationEngines(TorchTalker(model), TorchPredictor(model), TorchTables(model)),
                                tiny_bundle)
    want = np.concatenate([c.codes for c in official.stream(text, **opts)])
    assert codes.shape == (60, 16)
    np.testing.assert_array_equal(codes, want)


def test_speak_and_export_choose_the_engine(tiny_bundle, tmp_path):
    """From the outside: `speak --backend onnxruntime` says which engine ran; bad pairings fail in one line."""
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "qwen3-tts-edge")

    def run(*args):
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)

    out = tmp_path / "ort.wav"
    res = run("speak", "Hello.", "-b", str(tiny_bundle), "--speaker", "vivian", "--max-frames", "8",
              "--backend", "onnxruntime", "--stats", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "precisions: talker fp32 (onnxruntime), predictor fp32" in res.stderr
    assert "talker=cpu (onnxruntime CPUExecutionProvider)" in res.stderr and out.stat().st_size > 8 * 1920 * 2
    for args, needle in ((["speak", "Hi.", "-b", str(tiny_bundle), "--speaker", "vivian", "--backend", "onnxruntime",
                           "--talker-precision", "q8_0", "-o", str(tmp_path / "x.wav")],
                          "no talker in precision 'q8_0' for the onnxruntime backend; available: ['fp32']"),
                         (["speak", "Hi.", "-b", str(tiny_bundle), "--speaker", "vivian", "--backend", "onnxruntime",
                           "--predictor-precision", "q8_0", "-o", str(tmp_path / "x.wav")],
                          "no predictor in precision 'q8_0' for the onnxruntime backend"),
                         (["export", "random:tiny-custom_voice", "-o", str(tmp_path / "b"), "--backend", "llama.cpp",
                           "--talker", "fp32"], "talker precision(s) ['fp32'] belong to onnxruntime"),
                         (["export", "random:tiny-custom_voice", "-o", str(tmp_path / "b"), "--talker", "q9"],
                          "unknown talker precision(s) ['q9']; choose from llama.cpp:")):
        res = run(*args)
        assert res.returncode != 0 and res.stderr.count("\n") == 1 and needle in res.stderr, res.stderr
    assert not (tmp_path / "b").exists() and not (tmp_path / "x.wav").exists()


def test_tensorrt_options_cache_engines_and_say_so_once(tmp_path, capsys):
    """TensorRT cannot be installed here, so its session options are checked as data: fp16 engines and timing
    caches in one folder, and the "building" notice only while that folder has no engine for the graph."""
    from qwen3_tts_edge.runtime.backends.onnxruntime.providers import provider_entries

    graph = tmp_path / "talker.fp32.onnx"
    entries = provider_entries(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                               graph, cache_dir=tmp_path / "trt")
    (name, opts), cuda, cpu = entries
    assert (name, cuda, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert opts["trt_fp16_enable"] and opts["trt_engine_cache_enable"]
    assert opts["trt_engine_cache_path"] == str(tmp_path / "trt") and opts["trt_engine_cache_prefix"] == "talker.fp32"
    assert "building TensorRT engines for talker.fp32.onnx" in capsys.readouterr().err
    (tmp_path / "trt" / "talker.fp32_0_1.engine").write_bytes(b"x")  # what a finished build leaves behind
    provider_entries(["TensorrtExecutionProvider"], graph, cache_dir=tmp_path / "trt")
    assert "building" not in capsys.readouterr().err
    assert provider_entries(["CPUExecutionProvider"], graph) == ["CPUExecutionProvider"]
