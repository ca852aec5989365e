"""``qwen3-tts-edge voice pack``: a PEFT LoRA folder trained on the official model -> one ``.voicepack`` file.

- Talker modules (``talker.model.layers.N.{q,k,v,o,gate,up,down}_proj``) go through llama.cpp's own
  ``convert_lora_to_gguf.py`` from the same llama-cpp-python sdist as the talker GGUF, which maps them through the
  registered ``qwen3tts`` converter (so the names are the talker GGUF's by construction).
- Code-predictor modules (``talker.code_predictor.model.layers.N.*``) are written with gguf-py as a ``qwen3``
  adapter named after our predictor GGUF's tensors (read from the bundle, shapes checked).
- PEFT's per-module scaling (``lora_alpha / r``, rsLoRA, ``rank_pattern``/``alpha_pattern``) is folded into
  ``lora_B`` and the adapters say ``adapter.lora.alpha = 0``, for which llama.cpp applies the user scale as is:
  scale 1 is the trained update, exactly as PEFT merges it.
- A retrained ``talker.model.codec_embedding`` (``modules_to_save``) is kept only as the rows named with
  ``--speaker-row NAME=ROW``; any other changed row, any other module and any other PEFT feature is refused
  with the list, so a pack never silently drops part of a fine-tune.

Export side (torch, the vendored converter); the runtime reads only the pack.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.backends.llama_cpp.gguf_tables import GGUFTables
from ..runtime.bundle import Bundle, load_bundle
from ..runtime.voices.voice_pack import (
    ADAPTER_TYPES,
    BASE_WITHOUT_ROWS,
    PACK_SUFFIX,
    VoicePack,
    VoicePackError,
    check_scale,
    pack_identity,
)
from .llama_cpp_src import LORA_CONVERTER, LlamaCppSourceError, converter_env, lora_converter_dir

_LAYER_MODULES = {  # PEFT module under a decoder layer -> llama.cpp tensor (both are qwen3-style blocks)
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_SUB = "|".join(re.escape(k) for k in _LAYER_MODULES)
TALKER_MODULE = re.compile(rf"^talker\.model\.layers\.(\d+)\.({_SUB})$")
PREDICTOR_MODULE = re.compile(rf"^talker\.code_predictor\.model\.layers\.(\d+)\.({_SUB})$")
CODEC_EMBEDDING = "talker.model.codec_embedding"
_REFUSED_FLAGS = {"use_dora": "DoRA", "lora_bias": "LoRA bias", "fan_in_fan_out": "fan_in_fan_out",
                  "layer_replication": "layer replication", "target_parameters": "target_parameters",
                  "trainable_token_indices": "trainable token indices"}

Progress = Callable[[str], None]


class VoicePackExportError(VoicePackError):
    """A PEFT folder this export cannot turn into a voice pack; says what and why."""


def parse_speaker_row(text: str) -> tuple[str, int]:
    """``NAME=ROW`` -> (name, row)."""
    name, sep, row = text.partition("=")
    if not sep or not name.strip() or not row.strip().isdigit():
        raise VoicePackExportError(f"--speaker-row takes NAME=ROW (e.g. hausa_speaker=3000), got {text!r}")
    return name.strip().lower(), int(row)


def _module_name(key: str) -> tuple[str, str] | None:
    """A PEFT state-dict key -> (module path from the top model, "A" | "B"), None for a non-LoRA tensor."""
    for tag in ("A", "B"):
        for suffix in (f".lora_{tag}.weight", f".lora_embedding_{tag}"):
            if key.endswith(suffix):
                return key[: -len(suffix)], tag
    return None


def _canonical(path: str) -> str:
    """Module path as on ``Qwen3TTSForConditionalGeneration`` (PEFT may wrap the talker or the inference wrapper)."""
    path = path.removeprefix("base_model.model.")
    if path.startswith("model.talker."):
        path = path.removeprefix("model.")
    if path.startswith(("model.layers.", "model.codec_embedding", "code_predictor.", "codec_head", "text_projection")):
        path = "talker." + path
    return path


def _read_peft(peft_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    cfg_path = peft_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise VoicePackExportError(f"{peft_dir} is not a PEFT adapter folder (no adapter_config.json)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    st, binf = peft_dir / "adapter_model.safetensors", peft_dir / "adapter_model.bin"
    import torch

    if st.is_file():
        from safetensors.torch import load_file

        raw = load_file(str(st), device="cpu")
    elif binf.is_file():
        raw = torch.load(str(binf), map_location="cpu", weights_only=True)
    else:
        raise VoicePackExportError(f"{peft_dir} has no adapter_model.safetensors (or .bin)")
    return cfg, {k: v.float().numpy() for k, v in raw.items()}


def _refuse_features(cfg: dict[str, Any]) -> None:
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise VoicePackExportError(f"only LoRA adapters make voice packs; this is a {cfg.get('peft_type')} adapter")
    used = [label for key, label in _REFUSED_FLAGS.items() if cfg.get(key)]
    if used:
        raise VoicePackExportError(f"the adapter uses {', '.join(used)}, which llama.cpp adapters cannot express; "
                                   "train a plain LoRA (q/k/v/o/gate/up/down_proj)")


def _alpha_for(cfg: dict[str, Any], module: str) -> float:
    for pattern, alpha in (cfg.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return float(alpha)
    return float(cfg["lora_alpha"])


def _collect(cfg: dict[str, Any], sd: dict[str, np.ndarray], speaker_rows: dict[str, int]
             ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, tuple[np.ndarray, np.ndarray]],
                        np.ndarray | None]:
    """Talker and predictor modules (A, B with PEFT's scaling folded into B) and the codec table, or a refusal."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    codec = None
    unmappable: list[str] = []
    for key, arr in sd.items():
        found = _module_name(key)
        if found is None:
            path = _canonical(key)
            if path == CODEC_EMBEDDING + ".weight":
                codec = arr
            else:
                unmappable.append(path)
            continue
        module, tag = found
        if ".lora_embedding_" in key:
            unmappable.append(_canonical(module) + " (embedding LoRA)")
            continue
        pairs.setdefault(_canonical(module), {})[tag] = arr
    saved = [_canonical(m) for m in (cfg.get("modules_to_save") or [])]
    unmappable += [m for m in saved if not CODEC_EMBEDDING.endswith(m) and m != CODEC_EMBEDDING]
    talker, predictor = {}, {}
    for module, ab in sorted(pairs.items()):
        target = talker if TALKER_MODULE.match(module) else predictor if PREDICTOR_MODULE.match(module) else None
        if target is None or set(ab) != {"A", "B"}:
            unmappable.append(module)
            continue
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        scaling = _alpha_for(cfg, module) / (math.sqrt(r) if cfg.get("use_rslora") else r)
        target[module] = (np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b * scaling, np.float32))
    if unmappable:
        raise VoicePackExportError(f"the adapter has modules a voice pack (or a merged export) cannot carry: "
                                   f"{sorted(set(unmappable))}; they take LoRA on talker / code-predictor "
                                   "q/k/v/o/gate/up/down_proj and a retrained talker.model.codec_embedding (with "
                                   "--speaker-row)")
    if codec is not None and not speaker_rows:
        raise VoicePackExportError(f"the adapter retrains {CODEC_EMBEDDING}; name the rows it wrote with --speaker-row "
                                   "NAME=ROW (e.g. the official fine-tune's new speaker at row 3000)")
    if speaker_rows and codec is None:
        raise VoicePackExportError(f"--speaker-row needs the retrained {CODEC_EMBEDDING} in the adapter "
                                   "(PEFT modules_to_save)")
    if not talker:
        raise VoicePackExportError("the adapter has no talker modules (talker.model.layers.N.*_proj)")
    return talker, predictor, codec


def _check_shapes(modules: dict[str, tuple[np.ndarray, np.ndarray]], gguf: Path, pattern: re.Pattern) -> None:
    """Each module's A (r, in) and B (out, r) against the bundle GGUF's base tensor (out, in)."""
    tables = GGUFTables(gguf)
    try:
        bad = []
        for module, (a, b) in modules.items():
            m = pattern.match(module)
            name = f"blk.{m.group(1)}.{_LAYER_MODULES[m.group(2)]}.weight"
            if name not in tables:
                bad.append(f"{module} (no {name} in {gguf.name})")
                continue
            out, inp = tables.shape(name)
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != inp or b.shape[0] != out or a.shape[0] != b.shape[1]:
                bad.append(f"{module} (A {a.shape}, B {b.shape} vs base {(out, inp)})")
    finally:
        tables.close()
    if bad:
        raise VoicePackExportError(f"adapter modules that do not fit this bundle's base: {bad}; was it trained on "
                                   "this checkpoint?")


def _base_config(bundle: Bundle) -> dict[str, Any]:
    """The config.json the converter needs (architecture + talker hyper-parameters; no weights are read)."""
    m = bundle.manifest
    talker = {**m.model["talker"], **m.codec_ids, "codec_language_id": dict(m.languages), "spk_id": dict(m.speakers)}
    return {"architectures": ["Qwen3TTSForConditionalGeneration"], "model_type": "qwen3_tts", "talker_config": talker}


def talker_adapter_gguf(modules: dict[str, tuple[np.ndarray, np.ndarray]], bundle: Bundle, outtype: str,
                        work: Path) -> bytes:
    """The talker adapter through llama.cpp's ``convert_lora_to_gguf.py`` (qwen3tts converter), as bytes."""
    from safetensors.numpy import save_file

    peft, base = work / "talker-peft", work / "base"
    peft.mkdir()
    base.mkdir()
    tensors = {}
    for module, (a, b) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    save_file(tensors, str(peft / "adapter_model.safetensors"))
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 0}), encoding="utf-8")
    (base / "config.json").write_text(json.dumps(_base_config(bundle)), encoding="utf-8")
    folder = lora_converter_dir()
    out = work / "talker.adapter.gguf"
    cmd = [sys.executable, str(folder / LORA_CONVERTER), str(peft), "--base", str(base), "--outtype", outtype,
           "--outfile", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=converter_env(folder))
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-15:])
        raise LlamaCppSourceError(f"{LORA_CONVERTER} failed (exit {proc.returncode}):\n{tail}")
    return out.read_bytes()


def _add_tensor(w: Any, name: str, arr: np.ndarray, outtype: str) -> None:
    """One adapter tensor at ``outtype``; q8_0 rows that are not whole 32-value blocks (B at rank < 32) stay f16,
    as llama.cpp's converter does for the talker."""
    import gguf

    if outtype == "q8_0" and arr.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), q), raw_dtype=q)
    else:
        w.add_tensor(name, arr.astype(np.float32 if outtype == "f32" else np.float16))


def predictor_adapter_gguf(modules: dict[str, tuple[np.ndarray, np.ndarray]], outtype: str, work: Path) -> bytes:
    """The code-predictor adapter for our ``qwen3`` predictor GGUF, written with gguf-py, as bytes."""
    import gguf

    path = work / "predictor.adapter.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # PEFT's scaling is folded into lora_b
    w.add_name("Qwen3-TTS code predictor LoRA")
    for module, (a, b) in modules.items():
        m = PREDICTOR_MODULE.match(module)
        name = f"blk.{m.group(1)}.{_LAYER_MODULES[m.group(2)]}.weight"
        for suffix, arr in ((".lora_a", a), (".lora_b", b)):
            _add_tensor(w, name + suffix, arr, outtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _base_codec_rows(bundle: Bundle) -> tuple[np.ndarray, float]:
    """The base talker codec-embedding table and how closely it is stored (F32 tables: exactly)."""
    comps = bundle.manifest.find("predictor_tables")
    comps = sorted(comps, key=lambda c: c.precision != "f32")
    if not comps or bundle.manifest.component("predictor_tables", comps[0].precision).format != "gguf":
        raise VoicePackExportError("the bundle has no llama.cpp predictor tables (export it with a GGUF talker)")
    tables = GGUFTables(bundle.path(comps[0]))
    try:
        return tables.array("talker_codec_embd.weight"), 0.0 if comps[0].precision == "f32" else 1e-2
    finally:
        tables.close()


def changed_rows_error(changed: Sequence[int], speaker_rows: dict[str, int]) -> str | None:
    """Why a retrained codec table cannot be used: rows it changed that no ``--speaker-row`` names (or None)."""
    extra = sorted(set(changed) - set(speaker_rows.values()))
    if not extra:
        return None
    more = " ..." if len(extra) > 12 else ""
    return (f"the adapter changes codec-embedding rows {extra[:12]}{more} not named by --speaker-row; name each "
            "row the fine-tune wrote")


def _speaker_vectors(codec: np.ndarray, speaker_rows: dict[str, int], bundle: Bundle) -> np.ndarray:
    base, tol = _base_codec_rows(bundle)
    if codec.shape != base.shape:
        raise VoicePackExportError(f"the adapter's {CODEC_EMBEDDING} is {codec.shape}, the bundle's {base.shape}")
    changed = np.nonzero(np.max(np.abs(codec - base), axis=1) > tol * (1 + np.abs(base).max()))[0].tolist()
    error = changed_rows_error(changed, speaker_rows)
    if error:
        raise VoicePackExportError(error)
    return np.stack([codec[row] for _, row in sorted(speaker_rows.items())]).astype(np.float32)


def make_voice_pack(peft_dir: str | Path, bundle_dir: str | Path, output: str | Path, *, scale: float = 1.0,
                    speaker_rows: dict[str, int] | None = None, languages: Sequence[str] = (),
                    adapter_type: str = "f16", progress: Progress | None = None) -> VoicePack:
    """Write ``output`` (a ``.voicepack``) from the PEFT folder ``peft_dir`` for the base of ``bundle_dir``."""
    say = progress or (lambda _msg: None)
    peft_dir, output = Path(peft_dir), Path(output)
    if output.suffix != PACK_SUFFIX:
        raise VoicePackExportError(f"name the pack NAME{PACK_SUFFIX} (got {output.name})")
    if adapter_type not in ADAPTER_TYPES:
        raise VoicePackExportError(f"adapter type must be one of {', '.join(ADAPTER_TYPES)}, got {adapter_type!r}")
    scale = check_scale(scale)
    speaker_rows = dict(speaker_rows or {})
    bundle = load_bundle(Path(bundle_dir))
    m = bundle.manifest
    vocab, codebook = int(m.model["talker"]["vocab_size"]), int(m.model["predictor"]["vocab_size"])
    bad = {n: r for n, r in speaker_rows.items() if not codebook <= r < vocab}
    if bad:
        raise VoicePackExportError(f"speaker rows {bad} are outside the control/speaker rows [{codebook}, {vocab})")
    if m.model.get("tts_model_type") == "base" and not speaker_rows:
        raise VoicePackExportError(BASE_WITHOUT_ROWS)
    unknown = [lang for lang in languages if lang not in m.languages]
    if unknown:
        raise VoicePackExportError(f"unknown languages {unknown}; this base knows {', '.join(sorted(m.languages))}")
    cfg, sd = _read_peft(peft_dir)
    _refuse_features(cfg)
    talker, predictor, codec = _collect(cfg, sd, speaker_rows)
    gguf_talker = next((c for c in m.find("talker") if c.format == "gguf"), None)
    if gguf_talker is None:
        raise VoicePackExportError("voice packs run on the llama.cpp engine: this bundle has no GGUF talker; export "
                                   "one with `qwen3-tts-edge export MODEL -o BUNDLE --force --talker q8_0`")
    _check_shapes(talker, bundle.path(gguf_talker), TALKER_MODULE)
    if predictor:
        _check_shapes(predictor, bundle.path(m.component("predictor", gguf_talker.precision)), PREDICTOR_MODULE)
    rows = _speaker_vectors(codec, speaker_rows, bundle) if speaker_rows else None
    with tempfile.TemporaryDirectory(prefix="voicepack-") as tmp:
        say(f"talker: {len(talker)} LoRA modules through {LORA_CONVERTER} ({adapter_type})")
        talker_bytes = talker_adapter_gguf(talker, bundle, adapter_type, Path(tmp))
        predictor_bytes = None
        if predictor:
            say(f"code predictor: {len(predictor)} LoRA modules ({adapter_type})")
            predictor_bytes = predictor_adapter_gguf(predictor, adapter_type, Path(tmp))

    def summary(mods: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
        return {"modules": len(mods), "ranks": sorted({int(a.shape[0]) for a, _ in mods.values()}),
                "type": adapter_type}

    info = {"talker": summary(talker), "predictor": summary(predictor) if predictor else None,
            "source": {"peft_dir": peft_dir.name, "base_model_name_or_path": cfg.get("base_model_name_or_path"),
                       "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
                       "use_rslora": bool(cfg.get("use_rslora")), "peft_version": cfg.get("peft_version")}}
    pack = VoicePack(talker_adapter=talker_bytes, predictor_adapter=predictor_bytes, speakers=speaker_rows,
                     speaker_rows=rows, scale=scale, languages=tuple(languages), checkpoint=pack_identity(m), info=info)
    pack.check_for(m)
    pack.save(output)
    say(f"wrote {output} ({output.stat().st_size / 1e6:.2f} MB)")
    return pack
