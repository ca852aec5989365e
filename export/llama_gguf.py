"""Talker and code-predictor GGUF export for the llama.cpp engines (runtime/backends/llama_cpp/).

Per requested precision P this writes three bundle files:

- ``talker.P.gguf``: the upstream-format ``qwen3tts`` GGUF. The vendored llama.cpp converter
  (``convert_hf_to_gguf.py`` from the llama-cpp-python sdist, see llama_cpp_src.py) writes it once in F32
  (token_embd = [text rows with text_projection folded in | codec rows], output = codec_head, codec EOS id,
  suppress list, sampling defaults); ``llama_model_quantize`` re-types it per ``quant.gguf_policy``. The codec
  EOS id is checked against config.json (and repaired in place: the tokenizer's eos_token can overwrite it).
- ``predictor.P.gguf``: the 5-layer code predictor as a stock llama.cpp ``qwen3`` model with a ``none``
  vocabulary (one dummy row), written with gguf-py; inputs are always embeddings and the heads run on the host.
- ``predictor_tables.P.gguf``: host-side tensors (numpy memmap via GGUFReader): the 15 raw input tables
  (talker width H; also summed into the next talker input), the talker codec_embedding (c0 rows for the
  predictor prefill), the 15 heads, and small_to_mtp_projection W, b with the tables folded through it when
  the predictor is narrower than the talker.

All sizes, layer counts and ids come from the checkpoint's config.json.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..quant import metrics
from ..quant.gguf_policy import PRECISIONS, policy
from ..runtime.backends.llama_cpp import bindings as llm
from ..runtime.backends.llama_cpp.gguf_tables import GGUFTables
from ..runtime.backends.llama_cpp.predictor import TABLES_FORMAT_VERSION
from ..runtime.bundle import PREDICTOR_TABLES_ARCH
from ..runtime.errors import Qwen3TTSEdgeError
from ..runtime.sampler import ResidualSampling
from .llama_cpp_src import run_converter

Progress = Callable[[str], None]

TABLES_ARCH = PREDICTOR_TABLES_ARCH
PREDICTOR_DUMMY_VOCAB = 1  # llama.cpp needs token_embd; inputs are embeddings, so one dummy row suffices

_PRED_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


class GGUFExportError(Qwen3TTSEdgeError):
    """The checkpoint or the converter output is not what the llama.cpp engines expect."""


# ----------------------------------------------------------------------------------------------------------
# checkpoint access


def _config(checkpoint_dir: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint_dir) / "config.json").read_text(encoding="utf-8"))


def _head_dim(c: dict[str, Any]) -> int:
    return int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])


def _weight_files(checkpoint_dir: Path) -> dict[str, Path]:
    """tensor name -> safetensors file (single file or sharded index)."""
    folder = Path(checkpoint_dir)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {k: folder / v for k, v in wm.items()}
    from safetensors import safe_open

    single = folder / "model.safetensors"
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def _read_tensors(checkpoint_dir: Path, prefix: str) -> dict[str, np.ndarray]:
    """All checkpoint tensors under ``prefix`` as float32 numpy arrays (names without the prefix)."""
    from safetensors import safe_open

    files = _weight_files(checkpoint_dir)
    wanted: dict[Path, list[str]] = {}
    for name, path in files.items():
        if name.startswith(prefix):
            wanted.setdefault(path, []).append(name)
    out: dict[str, np.ndarray] = {}
    for path, names in wanted.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                out[name[len(prefix):]] = f.get_tensor(name).float().numpy()
    return out


# ----------------------------------------------------------------------------------------------------------
# gguf-py helpers


def _gguf() -> Any:
    import gguf

    return gguf


def _add_tensor(writer: Any, name: str, arr: np.ndarray, typ: str) -> None:
    gguf = _gguf()
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if typ == "f32":
        writer.add_tensor(name, arr)
    elif typ == "f16":
        writer.add_tensor(name, arr.astype(np.float16))
    elif typ in ("bf16", "q8_0"):
        qtype = gguf.GGMLQuantizationType.BF16 if typ == "bf16" else gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    else:
        raise GGUFExportError(f"gguf-py cannot write {name} as {typ}; use llama_model_quantize")


def _tensor_types(path: Path) -> dict[str, int]:
    tables = GGUFTables(path)
    try:
        return tables.type_counts()
    finally:
        tables.close()


# ----------------------------------------------------------------------------------------------------------
# talker


def convert_talker_f32(checkpoint_dir: Path, outfile: Path) -> dict[str, Any]:
    """Run the vendored converter (F32), check the result against config.json and repair the codec EOS id."""
    cfg = _config(checkpoint_dir)
    run_converter(Path(checkpoint_dir), Path(outfile), "f32")
    return check_talker_gguf(outfile, cfg, repair=True)


def check_talker_gguf(path: Path, cfg: dict[str, Any], *, repair: bool = False) -> dict[str, Any]:
    """Verify a qwen3tts GGUF against the checkpoint config; with ``repair`` fix a wrong codec EOS id in place."""
    tc = cfg["talker_config"]
    text_vocab, codec_vocab = int(tc["text_vocab_size"]), int(tc["vocab_size"])
    want_eos = text_vocab + int(tc["codec_eos_token_id"])
    reader = GGUFTables(path)
    arch = reader.field("general.architecture")
    problems = []
    if arch != "qwen3tts":
        problems.append(f"architecture {arch!r} (expected qwen3tts)")
    checks = {
        f"{arch}.block_count": int(tc["num_hidden_layers"]),
        f"{arch}.embedding_length": int(tc["hidden_size"]),
        f"{arch}.attention.head_count": int(tc["num_attention_heads"]),
        f"{arch}.attention.head_count_kv": int(tc["num_key_value_heads"]),
    }
    for key, want in checks.items():
        got = reader.field(key)
        if got != want:
            problems.append(f"{key} = {got!r} (config.json says {want})")
    shapes = {n: reader.shape(n) for n in ("token_embd.weight", "output.weight") if n in reader}
    if shapes.get("token_embd.weight") != (text_vocab + codec_vocab, int(tc["hidden_size"])):
        problems.append(f"token_embd shape {shapes.get('token_embd.weight')} (expected "
                        f"({text_vocab} + {codec_vocab}, {tc['hidden_size']}))")
    if shapes.get("output.weight") != (codec_vocab, int(tc["hidden_size"])):
        problems.append(f"output shape {shapes.get('output.weight')} (expected ({codec_vocab}, {tc['hidden_size']}))")
    eos = reader.field("tokenizer.ggml.eos_token_id")
    eos_at = reader.field_offsets.get("tokenizer.ggml.eos_token_id")
    reader.close()
    if problems:
        raise GGUFExportError(f"{path.name}: " + "; ".join(problems))
    repaired = False
    if eos != want_eos:
        if not repair or eos_at is None:
            raise GGUFExportError(f"{path.name}: tokenizer.ggml.eos_token_id = {eos}, expected {want_eos} "
                                  f"(text vocab {text_vocab} + codec_eos_token_id {tc['codec_eos_token_id']})")
        _patch_scalar(path, eos_at, want_eos)
        repaired = True
    return {"arch": "qwen3tts", "text_vocab_size": text_vocab, "codec_vocab_size": codec_vocab,
            "eos_token_id": want_eos, "eos_repaired_from": eos if repaired else None}


def _patch_scalar(path: Path, at: tuple[int, str], value: int) -> None:
    """Rewrite a scalar metadata value in place (same width, so the file layout does not change)."""
    import struct

    offset, fmt = at
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def quantize_talker(f32_path: Path, dst: Path, precision: str) -> None:
    pol = policy("talker", precision)
    if precision == "f32":
        shutil.copyfile(f32_path, dst)
        return
    quantize_gguf(f32_path, dst, pol.ftype or precision, token_embd=pol.token_embd, output=pol.output,
                 overrides=pol.overrides())


# ----------------------------------------------------------------------------------------------------------
# code predictor


def _predictor_tensors(cfg: dict[str, Any], sd: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    pc = cfg["talker_config"]["code_predictor_config"]
    n_layer, width = int(pc["num_hidden_layers"]), int(pc["hidden_size"])
    yield "token_embd.weight", np.zeros((PREDICTOR_DUMMY_VOCAB, width), dtype=np.float32)
    yield "output_norm.weight", sd["model.norm.weight"]
    for i in range(n_layer):
        for src, dst in _PRED_LAYER_MAP.items():
            key = f"model.layers.{i}.{src}"
            if key not in sd:
                raise GGUFExportError(f"checkpoint lacks talker.code_predictor.{key}")
            yield f"blk.{i}.{dst}", sd[key]


def write_predictor_gguf(cfg: dict[str, Any], sd: dict[str, np.ndarray], path: Path, precision: str) -> None:
    """Write the predictor as a stock ``qwen3`` GGUF (F32/F16/BF16/Q8_0 directly with gguf-py)."""
    gguf = _gguf()
    pc = cfg["talker_config"]["code_predictor_config"]
    pol = policy("predictor", precision)
    hd = _head_dim(pc)
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name("Qwen3-TTS code predictor")
    w.add_description("Qwen3-TTS 12Hz code predictor (MTP); embedding input, host-side per-step heads")
    w.add_block_count(int(pc["num_hidden_layers"]))
    w.add_context_length(int(pc.get("max_position_embeddings", 65536)))
    w.add_embedding_length(int(pc["hidden_size"]))
    w.add_feed_forward_length(int(pc["intermediate_size"]))
    w.add_head_count(int(pc["num_attention_heads"]))
    w.add_head_count_kv(int(pc["num_key_value_heads"]))
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(float(pc.get("rope_theta", 1e6)))
    w.add_layer_norm_rms_eps(float(pc.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(PREDICTOR_DUMMY_VOCAB)
    w.add_tokenizer_model("none")
    w.add_file_type(int(llm.FTYPES[precision]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, arr in _predictor_tensors(cfg, sd):
        _add_tensor(w, name, arr, pol.type_for(name, arr.ndim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_predictor(f32_path: Path, dst: Path, precision: str) -> None:
    pol = policy("predictor", precision)
    quantize_gguf(f32_path, dst, pol.ftype or precision, overrides=pol.overrides())


def predictor_tables(cfg: dict[str, Any], sd: dict[str, np.ndarray], codec_embedding: np.ndarray
                     ) -> dict[str, np.ndarray]:
    """The host-side predictor tensors (F32) keyed by their GGUF names."""
    tc = cfg["talker_config"]
    pc = tc["code_predictor_config"]
    n = int(pc.get("num_code_groups", tc["num_code_groups"])) - 1
    out: dict[str, np.ndarray] = {"talker_codec_embd.weight": codec_embedding}
    for j in range(n):
        out[f"codec_embd.{j}.weight"] = sd[f"model.codec_embedding.{j}.weight"]
        out[f"lm_head.{j}.weight"] = sd[f"lm_head.{j}.weight"]
    if "small_to_mtp_projection.weight" in sd:
        w, b = sd["small_to_mtp_projection.weight"], sd["small_to_mtp_projection.bias"]
        out["proj.weight"], out["proj.bias"] = w, b
        for j in range(n):  # linear, so folding it into the per-step input tables is exact (up to rounding)
            out[f"codec_embd_proj.{j}.weight"] = (sd[f"model.codec_embedding.{j}.weight"].astype(np.float64)
                                                  @ w.T.astype(np.float64) + b).astype(np.float32)
    return out


def write_tables_gguf(cfg: dict[str, Any], tables: dict[str, np.ndarray], path: Path, precision: str) -> None:
    gguf = _gguf()
    tc = cfg["talker_config"]
    pc = tc["code_predictor_config"]
    pol = policy("predictor_tables", precision)
    w = gguf.GGUFWriter(str(path), TABLES_ARCH)
    w.add_type("tables")
    w.add_name("Qwen3-TTS code predictor host tables")
    a = TABLES_ARCH
    w.add_uint32(f"{a}.format_version", TABLES_FORMAT_VERSION)
    w.add_uint32(f"{a}.num_steps", int(pc.get("num_code_groups", tc["num_code_groups"])) - 1)
    w.add_uint32(f"{a}.talker_hidden_size", int(tc["hidden_size"]))
    w.add_uint32(f"{a}.predictor_hidden_size", int(pc["hidden_size"]))
    w.add_uint32(f"{a}.codebook_size", int(pc["vocab_size"]))
    w.add_bool(f"{a}.has_projection", "proj.weight" in tables)
    w.add_string(f"{a}.precision", precision)
    for name, arr in tables.items():
        _add_tensor(w, name, arr, pol.type_for(name, arr.ndim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------------------------------------
# export-time self-check (engines only, no torch): each variant against the F32 files


def _cos_kl(ref: np.ndarray, test: np.ndarray) -> tuple[float, float, float]:
    m = metrics.logit_metrics(ref, test)
    return m["logit_cos"], m["kl"], m["top1"]


def _engine_run(talker_path: Path, pred_path: Path, tab_path: Path, prompt: np.ndarray, steps: np.ndarray,
                hiddens: np.ndarray | None, codes: np.ndarray, threads: int) -> tuple[np.ndarray, ...]:
    from ..runtime.backends.llama_cpp.predictor import CodePredictor
    from ..runtime.backends.llama_cpp.talker import Talker

    with Talker(talker_path, n_ctx=len(prompt) + len(steps) + 8, n_threads=threads) as t:
        outs = [t.prefill(prompt)] + [t.step(e) for e in steps]
    logits = np.stack([o.logits for o in outs])
    hid = np.stack([o.hidden for o in outs]) if hiddens is None else hiddens
    pred = []
    with CodePredictor(pred_path, tab_path, n_threads=threads) as p:
        for k, frame in enumerate(codes):
            got: list[np.ndarray] = []

            def choose(j: int, lg: np.ndarray, frame: np.ndarray = frame, got: list = got) -> int:
                got.append(lg.copy())
                return int(frame[j + 1])

            p.predict(hid[k], int(frame[0]), ResidualSampling.host(choose))
            pred.append(np.stack(got))
    return logits, hid, np.stack(pred)


def self_check(ref_files: tuple[Path, Path, Path], test_files: tuple[Path, Path, Path], *, n_prompt: int = 16,
               n_steps: int = 16, n_frames: int = 4, seed: int = 0, threads: int = 1) -> dict[str, Any]:
    """Talker/predictor logit cosine, KL and top-1 of a variant against the F32 files on a random trajectory.

    Inputs are built from the F32 talker's own tables (random text rows + codec rows, random frame codes); the
    predictor of both runs gets the F32 talker's hidden states, so the two parts are measured separately.
    """
    rng = np.random.default_rng(seed)
    ref_t = GGUFTables(ref_files[0])
    n_text = ref_t.shape("token_embd.weight")[0] - ref_t.shape("output.weight")[0]
    prompt = ref_t.rows("token_embd.weight", rng.integers(0, n_text, n_prompt))
    prompt[-n_prompt // 2:] += ref_t.rows("token_embd.weight", n_text + rng.integers(0, 2048, n_prompt // 2))
    steps = ref_t.rows("token_embd.weight", n_text + rng.integers(0, 2048, n_steps))
    ref_t.close()
    codes = rng.integers(0, 2048, size=(n_frames, 16))
    ref_logits, hid, ref_pred = _engine_run(*ref_files, prompt, steps, None, codes, threads)
    logits, _, pred = _engine_run(*test_files, prompt, steps, hid, codes, threads)
    tc, tk, tt = _cos_kl(ref_logits, logits)
    pc, pk, pt = _cos_kl(ref_pred.reshape(-1, ref_pred.shape[-1]), pred.reshape(-1, pred.shape[-1]))
    return {"vs": "f32 gguf (random trajectory)", "talker_logit_cos": round(tc, 7), "talker_kl": float(f"{tk:.3g}"),
            "talker_top1": round(tt, 3), "predictor_logit_cos": round(pc, 7), "predictor_kl": float(f"{pk:.3g}"),
            "predictor_top1": round(pt, 3)}


# ----------------------------------------------------------------------------------------------------------
# stage entry point


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def _precision_entries(cfg: dict[str, Any], p: str, out_dir: Path, talker_info: dict[str, Any],
                       tables: dict[str, np.ndarray], fidelity: dict[str, Any], *, talker_s: float,
                       predictor_s: float) -> list[dict[str, Any]]:
    """The manifest entries of one precision: talker, predictor and predictor tables."""
    tc, pc = cfg["talker_config"], cfg["talker_config"]["code_predictor_config"]
    talker_file, pred_file, tab_file = f"talker.{p}.gguf", f"predictor.{p}.gguf", f"predictor_tables.{p}.gguf"
    return [{
        "role": "talker", "file": talker_file, "format": "gguf", "precision": p,
        "arch": "qwen3tts", "engine": "llama.cpp", **{k: v for k, v in talker_info.items() if k != "eos_repaired_from"},
        "hidden_size": int(tc["hidden_size"]), "num_hidden_layers": int(tc["num_hidden_layers"]),
        "tensor_types": _tensor_types(out_dir / talker_file),
        "policy": policy("talker", p).table(), "fidelity": fidelity, "export_s": round(talker_s, 2),
    }, {
        "role": "predictor", "file": pred_file, "format": "gguf", "precision": p,
        "arch": "qwen3", "engine": "llama.cpp", "vocab": "none",
        "hidden_size": int(pc["hidden_size"]), "num_hidden_layers": int(pc["num_hidden_layers"]),
        "tensor_types": _tensor_types(out_dir / pred_file),
        "policy": policy("predictor", p).table(), "export_s": round(predictor_s, 2),
    }, {
        "role": "predictor_tables", "file": tab_file, "format": "gguf", "precision": p,
        "has_projection": "proj.weight" in tables, "num_steps": int(pc.get("num_code_groups", 16)) - 1,
        "tensor_types": _tensor_types(out_dir / tab_file),
        "policy": policy("predictor_tables", p).table(),
    }]


def export_llama(checkpoint_dir: Path, out_dir: Path, precisions: Sequence[str],
                 progress: Progress | None = None, *, check: bool = True,
                 step: Progress | None = None) -> list[dict[str, Any]]:
    """Stage exporter: talker + predictor GGUFs and predictor tables for each precision (see module doc).

    With ``check`` every non-F32 variant is compared with the F32 files by :func:`self_check` and the result is
    recorded as the talker entry's ``fidelity`` meta (a few seconds per variant on 0.6B).
    """
    say = progress or (lambda _msg: None)
    done = step or (lambda _label: None)  # one call per finished step, for the export progress bar
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise ValueError(f"unsupported llama.cpp precisions {bad}; choose from {', '.join(PRECISIONS)}")
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = _config(checkpoint_dir)
    entries: list[dict[str, Any]] = []
    scratch = Path(tempfile.mkdtemp(prefix=".llama-scratch-", dir=out_dir))
    try:
        t0 = time.perf_counter()
        say("talker: converting with the vendored llama.cpp converter (F32) ...")
        talker_f32 = scratch / "talker.f32.gguf"
        talker_info = convert_talker_f32(checkpoint_dir, talker_f32)
        if talker_info["eos_repaired_from"] is not None:
            say(f"talker: codec EOS id was {talker_info['eos_repaired_from']} in the converter output; "
                f"set to {talker_info['eos_token_id']} from config.json")
        t_conv = time.perf_counter() - t0
        say(f"talker: F32 GGUF {_mb(talker_f32)} in {t_conv:.1f} s")
        done("talker GGUF conversion")

        t0 = time.perf_counter()
        sd = _read_tensors(checkpoint_dir, "talker.code_predictor.")
        codec = _read_tensors(checkpoint_dir, "talker.model.codec_embedding.")["weight"]
        tables = predictor_tables(cfg, sd, codec)
        pred_f32 = scratch / "predictor.f32.gguf"
        write_predictor_gguf(cfg, sd, pred_f32, "f32")
        t_pred = time.perf_counter() - t0
        say(f"predictor: F32 GGUF {_mb(pred_f32)} in {t_pred:.1f} s")
        done("predictor GGUF")

        for p in precisions:
            t0 = time.perf_counter()
            talker_file, pred_file, tab_file = f"talker.{p}.gguf", f"predictor.{p}.gguf", f"predictor_tables.{p}.gguf"
            quantize_talker(talker_f32, out_dir / talker_file, p)
            t_talker = time.perf_counter() - t0
            t1 = time.perf_counter()
            if p in ("f32", "f16", "bf16"):
                write_predictor_gguf(cfg, sd, out_dir / pred_file, p)
            else:
                quantize_predictor(pred_f32, out_dir / pred_file, p)
            write_tables_gguf(cfg, tables, out_dir / tab_file, p)
            t_p = time.perf_counter() - t1
            say(f"{p}: talker {_mb(out_dir / talker_file)} ({t_talker:.1f} s), predictor "
                f"{_mb(out_dir / pred_file)} + tables {_mb(out_dir / tab_file)} ({t_p:.1f} s)")
            fidelity: dict[str, Any] = {}
            if check and p != "f32":
                if not (scratch / "predictor_tables.f32.gguf").exists():
                    write_tables_gguf(cfg, tables, scratch / "predictor_tables.f32.gguf", "f32")
                t2 = time.perf_counter()
                fidelity = self_check((talker_f32, pred_f32, scratch / "predictor_tables.f32.gguf"),
                                      (out_dir / talker_file, out_dir / pred_file, out_dir / tab_file))
                say(f"{p}: vs F32 talker logit cos {fidelity['talker_logit_cos']:.6f}, predictor "
                    f"{fidelity['predictor_logit_cos']:.6f} ({time.perf_counter() - t2:.1f} s)")
            done(f"talker {p}")
            entries += _precision_entries(cfg, p, out_dir, talker_info, tables, fidelity,
                                          talker_s=t_talker + (t_conv if p == precisions[0] else 0.0),
                                          predictor_s=t_p + (t_pred if p == precisions[0] else 0.0))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return entries


# ----------------------------------------------------------------------------------------------------------
# llama_model_quantize with per-tensor overrides (export-only; shares the runtime's one llama.cpp setup)


def quantize_gguf(src: Path | str, dst: Path | str, precision: str, *, token_embd: str | None = None,
             output: str | None = None, overrides: Sequence[tuple[str, str]] = (), threads: int = 0) -> None:
    """``llama_model_quantize`` ``src`` (an F32/F16 GGUF) into ``dst`` with llama ftype ``precision``.

    ``token_embd``/``output`` force those tensors' types; ``overrides`` are (regex over tensor names, type)
    pairs applied to the remaining tensors (llama.cpp honours them for quantized ftypes only).
    """
    lc = llm.api()
    if precision not in llm.FTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(llm.FTYPES)}")
    params = lc.llama_model_quantize_default_params()
    params.nthread = int(threads)
    params.ftype = llm.FTYPES[precision]
    if token_embd is not None:
        params.token_embedding_type = llm.GGML_TYPES[token_embd]
    if output is not None:
        params.output_tensor_type = llm.GGML_TYPES[output]
    keep: list[Any] = []
    if overrides:
        arr = (lc.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, typ) in enumerate(overrides):
            arr[i].pattern = pattern.encode()  # ctypes keeps the bytes alive with the array
            arr[i].type = llm.GGML_TYPES[typ]
        arr[len(overrides)].pattern = None
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(lc.llama_model_tensor_override))
        keep.append(arr)
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep
    if rc != 0:
        raise llm.LlamaError(f"llama_model_quantize {src} -> {dst} ({precision}) failed ({rc}):\n{llm.recent_log()}")
