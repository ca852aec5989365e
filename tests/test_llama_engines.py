"""llama.cpp talker/predictor GGUF export and engines against the official PyTorch model (random tiny checkpoint).

Strict checks use the F32 GGUFs with an F32 KV cache and flash attention off; quantized files must give lower
but finite cosines. Each GGUF is exported once per session.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_export

PRECISIONS = ("f32", "q8_0", "q4_k_m")
STRICT = {"n_threads": 1, "kv_type": "f32", "flash_attn": False}  # 1 thread: robust on a busy 2-core box

pytestmark = needs_export


@pytest.fixture(scope="session")
def llama_export(tiny_checkpoint, tmp_path_factory) -> tuple[Path, list[dict]]:
    from qwen3_tts_edge.export.llama_gguf import export_llama

    out = tmp_path_factory.mktemp("llama") / "bundle"
    messages: list[str] = []
    entries = export_llama(tiny_checkpoint, out, PRECISIONS, progress=messages.append)
    assert any("F32 GGUF" in m for m in messages), messages
    return out, entries


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    from qwen3_tts_edge.bench.parity_llama import build_reference

    return build_reference(tiny_checkpoint, n_text=8, n_frames=24, n_pred_frames=6, seed=0)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# ----------------------------------------------------------------------------------------------------------
# export


def test_export_lists_every_file_with_precision(llama_export):
    from qwen3_tts_edge.runtime.backends.llama_cpp.gguf_tables import GGUFTables

    out, entries = llama_export
    roles = {(e["role"], e["precision"]) for e in entries}
    assert roles == {(r, p) for r in ("talker", "predictor", "predictor_tables") for p in PRECISIONS}
    for e in entries:
        assert e["format"] == "gguf" and (out / e["file"]).is_file()
        assert e["file"] == f"{e['role']}.{e['precision']}.gguf"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "scratch files left behind"
    talker = {e["precision"]: e for e in entries if e["role"] == "talker"}
    assert talker["f32"]["tensor_types"] == {"F32": sum(talker["f32"]["tensor_types"].values())}
    assert "Q8_0" in talker["q8_0"]["tensor_types"]
    assert talker["q8_0"]["eos_token_id"] == 151936 + 2150
    assert talker["f32"]["fidelity"] == {}
    for p in ("q8_0", "q4_k_m"):  # export-time self-check against the F32 files
        fid = talker[p]["fidelity"]
        assert 0.95 < fid["talker_logit_cos"] < 1.0 and 0.95 < fid["predictor_logit_cos"] < 1.0, fid
    assert talker["q8_0"]["fidelity"]["talker_kl"] < talker["q4_k_m"]["fidelity"]["talker_kl"]
    from qwen3_tts_edge.quant.gguf_policy import policy

    for p in PRECISIONS:  # the host-lookup table follows the policy (llama.cpp would default it to the ftype)
        want = (policy("talker", p).token_embd or "f32").upper()
        assert GGUFTables(out / f"talker.{p}.gguf").type_name("token_embd.weight") == want
    t = GGUFTables(out / "talker.q4_k_m.gguf")
    assert t.field("general.architecture") == "qwen3tts"
    p = GGUFTables(out / "predictor.f32.gguf")
    assert p.field("general.architecture") == "qwen3" and p.field("tokenizer.ggml.model") == "none"
    assert p.field("qwen3.block_count") == 2  # tiny config's num_hidden_layers, not the shipped 5


def test_exported_ggufs_load_in_llama_cpp(llama_export):
    from qwen3_tts_edge.runtime.backends.llama_cpp.bindings import LlamaModel

    out, _ = llama_export
    for p in PRECISIONS:
        with LlamaModel(out / f"talker.{p}.gguf") as m:
            assert (m.arch, m.n_embd, m.n_layer, m.pos_per_token) == ("qwen3tts", 64, 2, 4)
            assert m.placement.device == "cpu"
        with LlamaModel(out / f"predictor.{p}.gguf") as m:
            assert (m.arch, m.n_embd, m.n_layer, m.pos_per_token) == ("qwen3", 32, 2, 1)


def _mapped_resident_kb(path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    target, total, inside = str(path.resolve()), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
            inside = len(head) == 6 and head[5] == target
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page release reads /proc and calls madvise (Linux)")
def test_a_mapped_talker_releases_its_pages_and_decodes_the_same(llama_export):
    from qwen3_tts_edge.runtime.backends.llama_cpp.bindings import LlamaContext, LlamaModel

    out, _ = llama_export
    path = out / "talker.q8_0.gguf"
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    hidden = {}
    for load in ("memory", "mapped"):
        with LlamaModel(path, load=load) as m:
            assert m.load == load
            if load == "mapped":
                # llama.cpp keeps only the span of its tensors mapped (the header is unmapped after loading)
                assert 0 < m.released_bytes <= path.stat().st_size
                assert _mapped_resident_kb(path) == 0  # nothing of it is resident before a decode
            ctx = LlamaContext(m, n_ctx=32, n_batch=8, n_threads=1)
            ctx.decode(x)
            hidden[load] = ctx.hidden().copy()
            ctx.close()
    np.testing.assert_array_equal(hidden["mapped"], hidden["memory"])  # pages read again from the file
    with pytest.raises(ValueError, match="load must be"):
        LlamaModel(path, load="mmap")


def test_only_talkers_with_repacked_weights_are_mapped(llama_export):
    from qwen3_tts_edge.runtime.backends.llama_cpp.gguf_tables import GGUFTables
    from qwen3_tts_edge.runtime.backends.llama_cpp.talker import talker_load

    out, _ = llama_export
    assert {p: talker_load(GGUFTables(out / f"talker.{p}.gguf")) for p in PRECISIONS} == {
        "f32": "memory", "q8_0": "memory", "q4_k_m": "mapped"}


# Run in a fresh interpreter, as an engine's process is: after other tests in this process, the allocator may hand
# the cache memory that earlier allocations had already made resident, and locate() then rightly leaves it alone.
_KV_PAGES_CHECK = """
import ctypes, sys
import numpy as np
from qwen3_tts_edge.runtime.backends.llama_cpp import pages
from qwen3_tts_edge.runtime.backends.llama_cpp.bindings import LlamaContext, LlamaModel

rng = np.random.default_rng(1)
first, second = (rng.standard_normal((n, 64)).astype(np.float32) for n in (40, 12))

def run(ctx):
    ctx.decode(first)
    ctx.clear()
    ctx.decode(second, all_outputs=True)
    return np.stack([ctx.hidden(i) for i in range(len(second))])

with LlamaModel(sys.argv[1]) as m:
    # 64 MB of cache: above glibc's largest mmap threshold (32 MB) it gets a mapping of its own, as the real
    # talker's 235 MB does (a small one may come from the heap among other pages, and is then left alone)
    ctx = LlamaContext(m, n_ctx=262144, n_batch=64, n_threads=1, max_outputs=64)
    kv = ctx.kv_pages
    assert kv is not None, "not located"  # located: one zeroed run of exactly the cache's size
    cache_bytes = m.n_layer * 262144 * m.kv_width * 2
    assert cache_bytes - 2 * pages.PAGE <= kv.size <= cache_bytes + pages.PAGE, (kv.size, cache_bytes)
    libc = ctypes.CDLL(None)
    vec = (ctypes.c_ubyte * (kv.size // pages.PAGE))()
    assert libc.mincore(ctypes.c_void_p(kv.address), ctypes.c_size_t(kv.size), vec) == 0
    assert not any(b & 1 for b in vec), "resident"  # released at creation: nothing of it is resident yet
    ours = run(ctx)
    ctx.close()
    pages.KVPages.locate = classmethod(lambda cls, create, size: (create(), None))
    plain = LlamaContext(m, n_ctx=262144, n_batch=64, n_threads=1, max_outputs=64)
    assert plain.kv_pages is None  # llama.cpp's own clear (zeros written) from here on
    np.testing.assert_array_equal(ours, run(plain))
    plain.close()
print("kv pages ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="KV pages are located with /proc and mincore (Linux)")
def test_the_kv_cache_pages_are_released_and_a_clear_equals_llama_cpps_own(llama_export):
    import subprocess

    out, _ = llama_export
    done = subprocess.run([sys.executable, "-c", _KV_PAGES_CHECK, str(out / "talker.q8_0.gguf")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "kv pages ok" in done.stdout, done.stderr[-3000:]


def test_codec_eos_is_checked_and_repaired(llama_export, tiny_checkpoint, tmp_path):
    import json

    from qwen3_tts_edge.export.llama_gguf import GGUFExportError, _patch_scalar, check_talker_gguf
    from qwen3_tts_edge.runtime.backends.llama_cpp.gguf_tables import GGUFTables

    out, _ = llama_export
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    f = tmp_path / "t.gguf"
    shutil.copyfile(out / "talker.q8_0.gguf", f)
    _patch_scalar(f, GGUFTables(f).field_offsets["tokenizer.ggml.eos_token_id"], 151645)  # the tokenizer trap
    with pytest.raises(GGUFExportError, match="eos_token_id = 151645"):
        check_talker_gguf(f, cfg)
    info = check_talker_gguf(f, cfg, repair=True)
    assert info["eos_repaired_from"] == 151645
    assert GGUFTables(f).field("tokenizer.ggml.eos_token_id") == 151936 + 2150
    check_talker_gguf(f, cfg)


# ----------------------------------------------------------------------------------------------------------
# host lookups


def test_lookups_equal_official_modules(llama_export, reference):
    from qwen3_tts_edge.export.torch_reference import (
        official_codec_embeds,
        official_residual_embeds,
        official_text_embeds,
    )
    from qwen3_tts_edge.runtime.backends.llama_cpp.predictor import CodePredictor
    from qwen3_tts_edge.runtime.backends.llama_cpp.talker import Talker

    out, _ = llama_export
    text_ids = [0, 5, 198, 77091, 151644, 151671, 151672, 151673, 151935]
    codec_ids = [0, 1, 2047, 2148, 2149, 2150, 2861, 3071]
    with Talker(out / "talker.f32.gguf", **STRICT) as t:
        assert (t.text_vocab_size, t.codec_vocab_size, t.hidden_size, t.codec_eos_id) == (151936, 3072, 64, 2150)
        assert np.abs(t.text_embeds(text_ids) - official_text_embeds(reference.talker, text_ids)).max() <= 1e-5
        assert np.abs(t.codec_embeds(codec_ids) - official_codec_embeds(reference.talker, codec_ids)).max() <= 1e-5
        with pytest.raises(ValueError):
            t.codec_embeds([3072])
    with CodePredictor(out / "predictor.f32.gguf", out / "predictor_tables.f32.gguf", **STRICT) as p:
        for frame in reference.frames[:8]:
            want = official_residual_embeds(reference.talker, frame[1:])
            assert np.abs(p.residual_embeds(frame[1:]) - want).max() <= 1e-5
        assert np.abs(p.c0_embed(2149) - official_codec_embeds(reference.talker, [2149])[0]).max() <= 1e-5
    # Q8_0 token_embd of the K-quant talker (policy): close, not exact
    with Talker(out / "talker.q4_k_m.gguf", n_threads=1) as t:
        ref = official_text_embeds(reference.talker, text_ids)
        assert np.abs(t.text_embeds(text_ids) - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())


# ----------------------------------------------------------------------------------------------------------
# talker


def test_talker_f32_matches_official_along_trajectory(llama_export, reference):
    from qwen3_tts_edge.bench.parity_llama import run_talker

    out, _ = llama_export
    logits, hidden = run_talker(reference, out / "talker.f32.gguf", **STRICT)
    n = reference.n_prompt
    assert logits.shape == (1 + 24, 3072) and hidden.shape == (1 + 24, 64)
    cos = _cos(reference.logits[n - 1:], logits)
    assert cos.min() >= 0.99999, cos
    ref_h = reference.hidden[n - 1:]
    assert np.abs(hidden - ref_h).max() <= 2e-4 * max(1.0, np.abs(ref_h).max())


def test_talker_prefill_chunks_rewind_and_reset(llama_export, reference):
    from qwen3_tts_edge.runtime.backends.llama_cpp.talker import Talker

    out, _ = llama_export
    x, n = reference.embeds, reference.n_prompt
    with Talker(out / "talker.f32.gguf", n_batch=4, n_ctx=64, **STRICT) as t:  # prompt split into 4-chunks
        first = t.prefill(x[:n])
        assert t.n_past == n
        steps = [t.step(e) for e in x[n:n + 3]]
        t.rewind(n + 1)
        again = t.step(x[n + 1])
        np.testing.assert_allclose(again.logits, steps[1].logits, rtol=0, atol=1e-5)
        t.reset()
        assert t.n_past == 0
        np.testing.assert_allclose(t.prefill(x[:n]).logits, first.logits, rtol=0, atol=1e-5)
    cos = _cos(reference.logits[n - 1], first.logits)
    assert cos >= 0.99999


def test_talker_refuses_other_ggufs(llama_export):
    from qwen3_tts_edge.runtime.backends.llama_cpp.bindings import LlamaError
    from qwen3_tts_edge.runtime.backends.llama_cpp.talker import Talker

    out, _ = llama_export
    with pytest.raises(LlamaError, match="qwen3tts"):
        Talker(out / "predictor.f32.gguf", n_threads=1)


# ----------------------------------------------------------------------------------------------------------
# predictor


def test_predictor_f32_matches_official_for_all_steps(llama_export, reference):
    from qwen3_tts_edge.bench.parity_llama import run_predictor

    out, _ = llama_export
    got = run_predictor(reference, out / "predictor.f32.gguf", out / "predictor_tables.f32.gguf", **STRICT)
    assert got.shape == reference.pred_logits.shape == (6, 15, 2048)
    cos = _cos(reference.pred_logits, got)
    assert cos.min() >= 0.99999, cos.min()


def test_predictor_greedy_matches_official_generate(llama_export, reference):
    import torch

    from qwen3_tts_edge.runtime.backends.llama_cpp.predictor import CodePredictor
    from qwen3_tts_edge.runtime.sampler import GREEDY as greedy
    from qwen3_tts_edge.runtime.sampler import ResidualSampling

    out, _ = llama_export
    talker, n = reference.talker, reference.n_prompt
    with CodePredictor(out / "predictor.f32.gguf", out / "predictor_tables.f32.gguf", **STRICT) as p:
        for k in range(3):
            hid = reference.hidden[n - 1 + k]
            c0 = int(reference.frames[k][0])
            with torch.no_grad():
                seq = torch.stack([torch.from_numpy(hid), talker.model.codec_embedding(torch.tensor(c0))])[None]
                want = talker.code_predictor.generate(inputs_embeds=seq, max_new_tokens=15, do_sample=False)
            codes = p.predict(hid, c0, greedy)
            assert codes.dtype == np.int64 and codes.shape == (15,)
            np.testing.assert_array_equal(codes, want[0].numpy())
            np.testing.assert_array_equal(p.predict(hid, c0, greedy), codes)  # KV is reset every frame
        c = p.counters
        assert c["frames"] == 6 and c["llama_calls"] == 90 and c["decode_s"] > 0 and c["head_s"] > 0
        with pytest.raises(ValueError, match="outside"):
            p.predict(hid, c0, ResidualSampling.host(lambda j, logits: 5000))


# ----------------------------------------------------------------------------------------------------------
# quantized variants


def test_quantized_variants_are_lower_but_finite(llama_export, reference, tiny_checkpoint, capsys):
    from qwen3_tts_edge.bench.parity_llama import parity

    out, _ = llama_export
    report = parity(tiny_checkpoint, out, ["q8_0", "q4_k_m"], ref=reference, n_threads=1)
    with capsys.disabled():
        for p, r in report.items():
            print(f"\n{p}: talker cos {r['talker']['logit_cos']:.6f} kl {r['talker']['kl']:.2e} top1 "
                  f"{r['talker']['top1']:.2f} | predictor cos {r['predictor']['logit_cos']:.6f} kl "
                  f"{r['predictor']['kl']:.2e} top1 {r['predictor']['top1']:.2f}")
    for p, floor in (("q8_0", 0.999), ("q4_k_m", 0.97)):
        for part in ("talker", "predictor"):
            m = report[p][part]
            assert all(np.isfinite(v) for v in m.values())
            assert floor <= m["logit_cos"] < 1.0, (p, part, m)
    assert report["q8_0"]["talker"]["logit_cos"] > report["q4_k_m"]["talker"]["logit_cos"]


# ----------------------------------------------------------------------------------------------------------
# converter source lookup (no network)


def test_converter_source_env_var(tmp_path, monkeypatch):
    from qwen3_tts_edge.export import llama_cpp_src as src

    monkeypatch.setenv(src.ENV_VAR, str(tmp_path))
    with pytest.raises(src.LlamaCppSourceError, match="not an unpacked llama-cpp-python sdist"):
        src.converter_dir()
    root = tmp_path / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    (root / "conversion").mkdir(parents=True)
    (root / "gguf-py" / "gguf").mkdir(parents=True)
    (root / "convert_hf_to_gguf.py").write_text("")
    (root / "conversion" / "qwen3tts.py").write_text("")
    (root / "gguf-py" / "gguf" / "constants.py").write_text("QWEN3TTS = 1\n")
    monkeypatch.setenv(src.ENV_VAR, str(tmp_path / "llama_cpp_python-0.3.36"))
    assert src.converter_dir() == root
    env = src.converter_env(root)
    assert env["PYTHONPATH"].split(":")[0] == str(root / "gguf-py") and "NO_LOCAL_GGUF" not in env


def test_sdist_member_filter():
    from qwen3_tts_edge.export.llama_cpp_src import _safe_member

    pre = "llama_cpp_python-0.3.36/vendor/llama.cpp"
    assert _safe_member(f"{pre}/conversion/qwen3tts.py", pre) == "conversion/qwen3tts.py"
    assert _safe_member(f"{pre}/gguf-py/gguf/constants.py", pre) == "gguf-py/gguf/constants.py"
    assert _safe_member(f"{pre}/convert_hf_to_gguf.py", pre) == "convert_hf_to_gguf.py"
    assert _safe_member(f"{pre}/src/llama.cpp", pre) is None
    assert _safe_member(f"{pre}/../../etc/passwd", pre) is None
    assert _safe_member("/abs/conversion/x.py", pre) is None


def test_predictor_refuses_tables_of_another_format_version(llama_export, tmp_path):
    """A tables GGUF from another export version fails on load with both versions and the fix, not later."""
    from qwen3_tts_edge.export.llama_gguf import _patch_scalar
    from qwen3_tts_edge.runtime.backends.llama_cpp.bindings import LlamaError
    from qwen3_tts_edge.runtime.backends.llama_cpp.gguf_tables import GGUFTables
    from qwen3_tts_edge.runtime.backends.llama_cpp.predictor import TABLES_ARCH, TABLES_FORMAT_VERSION, CodePredictor

    out, _ = llama_export
    key = f"{TABLES_ARCH}.format_version"
    assert GGUFTables(out / "predictor_tables.f32.gguf").field(key) == TABLES_FORMAT_VERSION  # what export writes
    f = tmp_path / "predictor_tables.f32.gguf"
    shutil.copyfile(out / "predictor_tables.f32.gguf", f)
    _patch_scalar(f, GGUFTables(f).field_offsets[key], TABLES_FORMAT_VERSION + 1)
    with pytest.raises(LlamaError, match=rf"format version {TABLES_FORMAT_VERSION + 1}; this runtime reads "
                                         rf"{TABLES_FORMAT_VERSION}: re-export the bundle with `qwen3-tts-edge "
                                         r"export MODEL -o BUNDLE --force`"):
        CodePredictor(out / "predictor.f32.gguf", f, n_threads=1)
