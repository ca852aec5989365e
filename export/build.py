"""Orchestrate an export: MODEL -> checkpoint folder -> stage exporters -> bundle, written atomically.

The bundle is assembled in a hidden sibling folder and renamed into place only after every stage and
the manifest succeeded, so an interrupted or failed export never leaves half a bundle (and never
damages the bundle it was asked to replace).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.util
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..runtime.backends.onnxruntime.heads import HEADS_PRECISIONS
from ..runtime.bundle import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    OPTIONAL_TOKENIZER_FILES,
    TOKENIZER_FILES,
    VOICE_STAGES,
    Component,
    Manifest,
    validate_components,
    write_manifest,
)
from ..runtime.engine.specs import DEFAULT_EXPORT, GENERATION_ENGINES, exporter_precisions
from ..runtime.errors import Qwen3TTSEdgeError
from ..runtime.machine import package_version
from .progress import ExportProgress, null_step
from .sources import ModelSource, resolve_model, source_file_hashes

Progress = Callable[[str], None]

DEFAULT_TALKER = DEFAULT_EXPORT["talker"]
DEFAULT_DECODER = DEFAULT_EXPORT["decoder"]
# Modules the export side imports (the [export] extra plus qwen-tts installed with --no-deps).
EXPORT_MODULES = ("torch", "transformers", "qwen_tts", "onnx", "onnxscript", "safetensors", "sentencepiece",
                  "tqdm")

TOOL_PACKAGES = ("qwen3-tts-edge", "qwen-tts", "torch", "transformers", "onnx", "onnxruntime",
                 "llama-cpp-python", "gguf")

# Stage exporters: stage -> (module, function, precisions it can produce), imported only when asked for. The
# stage names and precisions are the engine table's (runtime/engine/specs.py ``exporter``).
_PRECISIONS = exporter_precisions()
STAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # One stage writes talker, predictor and predictor_tables GGUFs for each precision.
    "talker": ("qwen3_tts_edge.export.llama_gguf", "export_llama", _PRECISIONS["talker"]),
    # The ONNX Runtime engine's talker + fused predictor graphs + tables (ONNX precision names in --talker).
    "talker_onnx": ("qwen3_tts_edge.export.generation_onnx", "export_onnx_generation", _PRECISIONS["talker_onnx"]),
    # The llama.cpp predictor's heads as int8 ONNX graphs (one file for every GGUF precision); asked for only.
    "predictor_heads": ("qwen3_tts_edge.export.predictor_heads", "export_predictor_heads", HEADS_PRECISIONS),
    "decoder": ("qwen3_tts_edge.export.decoder_onnx", "export_decoder", _PRECISIONS["decoder"]),
    # Base models only (the other checkpoints have no speaker encoder).
    "speaker_encoder": ("qwen3_tts_edge.export.speaker_encoder_onnx", "export_speaker_encoder",
                        _PRECISIONS["speaker_encoder"]),
    "codec_encoder": ("qwen3_tts_edge.export.codec_encoder_onnx", "export_codec_encoder",
                      _PRECISIONS["codec_encoder"]),
}


class ExportError(Qwen3TTSEdgeError):
    """The export cannot proceed; nothing was written."""


def missing_export_modules() -> list[str]:
    """The export-side modules this environment lacks (empty when ``export`` can run)."""
    missing = []
    for name in EXPORT_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a blocked or half-installed package
            found = False
        if not found:
            missing.append(name)
    return missing


def _talker_request(talker: Sequence[str] | None, backends: Sequence[str] | None) -> tuple[str, ...]:
    """The talker precisions to write, each engine's default where only ``backends`` is given."""
    bad = [b for b in backends or () if b not in GENERATION_ENGINES]
    if bad:
        raise ExportError(f"unknown backend(s) {bad}; choose from {', '.join(GENERATION_ENGINES)}")
    if talker is None:
        return tuple(p for b in (backends or ("llama.cpp",)) for p in GENERATION_ENGINES[b].default)
    known = {p: name for name, b in GENERATION_ENGINES.items() for p in b.precisions}
    unknown = [p for p in talker if p not in known]
    if unknown:
        choices = "; ".join(f"{name}: {', '.join(b.precisions)}" for name, b in GENERATION_ENGINES.items())
        raise ExportError(f"unknown talker precision(s) {unknown}; choose from {choices}")
    off = [p for p in talker if backends and known[p] not in backends]
    if off:
        raise ExportError(f"talker precision(s) {off} belong to {', '.join(sorted({known[p] for p in off}))}, "
                          f"not to --backend {','.join(backends)}; name the backend too or leave --backend out")
    return tuple(talker)


def _speakable(requested: dict[str, tuple[str, ...]]) -> None:
    """Refuse, before any work, a request for a bundle that `speak` could not use."""
    for stage, flag, default in (("talker", "--talker", DEFAULT_TALKER), ("decoder", "--decoder", DEFAULT_DECODER)):
        if not requested[stage] and not (stage == "talker" and requested.get("talker_onnx")):
            raise ExportError(f"a bundle without a {stage} cannot speak; name at least one {stage} precision "
                              f"({flag} {','.join(default)}, or leave {flag} out for that default)")


def _tool_versions() -> dict[str, str]:
    return {"python": platform.python_version(), **{pkg: package_version(pkg) for pkg in TOOL_PACKAGES}}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from exc


def _as_id(value: Any, what: str) -> int:
    """Speaker ids appear as scalars or 1-element lists in config.json copies; accept both."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ExportError(f"config.json: {what} must be an integer codec id, got {value!r}")
    return value


def checkpoint_facts(folder: Path) -> dict[str, Any]:
    """The manifest sections derived from a checkpoint's own config files (never from constants)."""
    cfg = _read_json(folder / "config.json")
    gen = _read_json(folder / "generation_config.json")
    st = _read_json(folder / "speech_tokenizer" / "config.json")
    try:
        talker = cfg["talker_config"]
        pred = talker["code_predictor_config"]
        dec = st["decoder_config"]
        token_ids = {k: int(cfg[k]) for k in ("im_start_token_id", "im_end_token_id", "tts_pad_token_id",
                                               "tts_bos_token_id", "tts_eos_token_id")}
        if "assistant_token_id" in cfg:
            token_ids["assistant_token_id"] = int(cfg["assistant_token_id"])
        codec_ids = {k: int(talker[k]) for k in ("codec_pad_id", "codec_bos_id", "codec_eos_token_id",
                                                 "codec_think_id", "codec_nothink_id", "codec_think_bos_id",
                                                 "codec_think_eos_id")}
        speakers = {name.lower(): _as_id(v, f"spk_id[{name}]") for name, v in (talker.get("spk_id") or {}).items()}
        dialects = {name.lower(): str(v) for name, v in (talker.get("spk_is_dialect") or {}).items() if v}
        languages = {name.lower(): _as_id(v, f"codec_language_id[{name}]")
                     for name, v in (talker.get("codec_language_id") or {}).items()}
        sample_rate = int(st.get("output_sample_rate", 24000))
        spf = int(st.get("decode_upsample_rate", 1920))
        model = {
            "tts_model_type": cfg["tts_model_type"],
            "tts_model_size": cfg.get("tts_model_size"),
            "tokenizer_type": cfg.get("tokenizer_type"),
            "talker": {k: talker[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "vocab_size",
                                              "text_hidden_size", "text_vocab_size", "num_code_groups",
                                              "rope_theta", "rms_norm_eps") if k in talker},
            "predictor": {k: pred[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "vocab_size",
                                              "num_code_groups", "rope_theta", "rms_norm_eps") if k in pred},
        }
        model["talker"]["head_dim"] = talker.get("head_dim", talker["hidden_size"] // talker["num_attention_heads"])
        model["predictor"]["head_dim"] = pred.get("head_dim", pred["hidden_size"] // pred["num_attention_heads"])
        model["predictor"]["has_input_projection"] = pred["hidden_size"] != talker["hidden_size"]
        if cfg["tts_model_type"] == "base":
            model["speaker_encoder"] = {"enc_dim": cfg["speaker_encoder_config"]["enc_dim"],
                                        "sample_rate": cfg["speaker_encoder_config"].get("sample_rate", 24000)}
        audio = {
            "sample_rate": sample_rate,
            "samples_per_frame": spf,
            "frame_rate": sample_rate / spf,
            "num_code_groups": int(dec.get("num_quantizers", talker["num_code_groups"])),
            "codebook_size": int(dec["codebook_size"]),
            "decoder_window": int(dec["sliding_window"]),
        }
    except KeyError as exc:
        raise ExportError(f"checkpoint config lacks {exc}; is {folder} a Qwen3-TTS 12 Hz checkpoint?") from exc
    return {"token_ids": token_ids, "codec_ids": codec_ids, "speakers": speakers, "speaker_dialects": dialects,
            "languages": languages, "sampling": dict(gen), "audio": audio, "model": model}


def _copy_tokenizer(folder: Path, bundle: Path) -> list[Component]:
    dest = bundle / "tokenizer"
    dest.mkdir()
    comps = []
    for name in TOKENIZER_FILES + OPTIONAL_TOKENIZER_FILES:
        src = folder / name
        if not src.is_file():
            if name in TOKENIZER_FILES:
                raise ExportError(f"{folder} lacks the text tokenizer file {name}")
            continue
        shutil.copyfile(src, dest / name)
        fmt = "txt" if name.endswith(".txt") else "json"
        comps.append(Component.from_file(bundle, f"tokenizer/{name}", "text_tokenizer", fmt, "none"))
    return comps


def _stage_exporter(stage: str, precisions: Sequence[str]) -> Callable[..., list[dict[str, Any]]]:
    module, func, allowed = STAGES[stage]
    bad = [p for p in precisions if p not in allowed]
    if bad:
        raise ExportError(f"unknown {stage} precision(s) {bad}; choose from {', '.join(allowed)}")
    return getattr(importlib.import_module(module), func)


def _prepare_target(out: Path, force: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"{out} exists and is not a folder")
        if any(out.iterdir()):
            if not (out / MANIFEST_NAME).is_file():
                raise ExportError(f"{out} exists and is not a bundle; refusing to replace it")
            if not force:
                raise ExportError(f"{out} already holds a bundle; pass --force to replace it")


def _install(tmp: Path, out: Path) -> None:
    """Move the finished bundle into place; an old bundle is removed only after the new one is in."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{int(time.time() * 1000)}"
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _voice_stages(model_type: str, requested: dict[str, tuple[str, ...]],
                  exporters: dict[str, Callable[..., list[dict[str, Any]]]], progress: Progress) -> None:
    """Base models get both voice encoders by default; the others have none to export (a request is refused)."""
    for stage in VOICE_STAGES:
        flag = "--" + stage.replace("_", "-")
        if model_type != "base":
            if requested.get(stage):
                raise ExportError(f"a {model_type} checkpoint has no {stage.replace('_', ' ')} for cloning (only "
                                  f"Base models clone voices); leave {flag} out")
            continue
        if stage not in requested:
            requested[stage] = DEFAULT_EXPORT[stage]
            exporters[stage] = _stage_exporter(stage, requested[stage])
            if hasattr(progress, "add_steps"):
                progress.add_steps(len(requested[stage]))


def _planned_steps(requested: dict[str, tuple[str, ...]]) -> int:
    """Progress steps: the checkpoint, then per stage its shared work and one step per precision."""
    talker, decoder = requested["talker"], requested["decoder"]
    return (1 + (2 + len(talker) if talker else 0) + (1 + len([p for p in decoder if p != "fp32"]) if decoder else 0)
            + len(requested.get("talker_onnx") or ()) + len(requested.get("predictor_heads") or ())
            + sum(len(requested.get(stage) or ()) for stage in VOICE_STAGES))


def export_bundle(model: str, out: Path, *, talker: Sequence[str] | None = None,
                  decoder: Sequence[str] | None = None, speaker_encoder: Sequence[str] | None = None,
                  codec_encoder: Sequence[str] | None = None, predictor_heads: Sequence[str] | None = None,
                  force: bool = False,
                  backends: Sequence[str] | None = None, progress: Progress | None = None,
                  adapter: str | Path | None = None, merge: bool = False, adapter_scale: float | None = None,
                  speaker_rows: dict[str, int] | None = None) -> Manifest:
    """Export MODEL into the bundle folder ``out`` and return its manifest.

    ``talker`` / ``decoder`` / ``speaker_encoder`` / ``codec_encoder`` name the precisions to write; None
    means the defaults (``DEFAULT_EXPORT``: talker q8_0, decoder fp32, and for Base models both voice encoders
    in fp32), so a plain export can speak. ``predictor_heads`` (``int8``) adds the llama.cpp predictor's heads
    as weight-only int8 graphs (``export/predictor_heads.py``; the runtime then uses them by default). Talker
    precisions name their engine (GGUF ``q8_0`` for llama.cpp, ONNX ``fp32`` for ONNX Runtime); ``backends``
    (``GENERATION_ENGINES`` names) replaces the default talker precisions with each engine's default when
    ``talker`` is None. ``progress`` receives messages; without
    one, a progress bar (plain lines off a terminal) goes to stderr. ``adapter`` (a PEFT folder) with ``merge``
    exports MODEL with that LoRA merged at ``adapter_scale`` and ``speaker_rows`` registered (``export/merge.py``).
    """
    from .merge import check_request

    out = Path(out)
    merging = None
    scale = check_request(adapter, merge, adapter_scale, speaker_rows)
    if adapter is not None:
        merging = (Path(adapter), scale, dict(speaker_rows or {}))
    talkers = _talker_request(talker, backends)
    requested = {"talker": tuple(p for p in talkers if p in _PRECISIONS["talker"]),
                 "talker_onnx": tuple(p for p in talkers if p in _PRECISIONS["talker_onnx"]),
                 "decoder": DEFAULT_DECODER if decoder is None else tuple(decoder)}
    exporters = {stage: _stage_exporter(stage, precs) for stage, precs in requested.items() if precs}
    _speakable(requested)
    if predictor_heads:
        if not requested["talker"]:
            raise ExportError("--predictor-heads is for the llama.cpp code predictor: export a GGUF talker precision "
                              "too (e.g. --talker q4_k_m)")
        requested["predictor_heads"] = tuple(predictor_heads)
        exporters["predictor_heads"] = _stage_exporter("predictor_heads", requested["predictor_heads"])
    for stage, precs in (("speaker_encoder", speaker_encoder), ("codec_encoder", codec_encoder)):
        if precs is not None:
            requested[stage] = tuple(precs)
            if requested[stage]:
                exporters[stage] = _stage_exporter(stage, requested[stage])
    _prepare_target(out, force)
    bar = ExportProgress(_planned_steps(requested), desc=f"export {out.name}") if progress is None else None
    try:
        return _export(model, out, requested, exporters, bar or progress, getattr(bar or progress, "step", None),
                       merging)
    finally:
        if bar is not None:
            bar.close()


def _export(model: str, out: Path, requested: dict[str, tuple[str, ...]],
            exporters: dict[str, Callable[..., list[dict[str, Any]]]], progress: Progress,
            step: Callable[[str], None] | None, merging: tuple[Path, float, dict[str, int]] | None = None
            ) -> Manifest:
    step = step or null_step
    t0 = time.perf_counter()
    progress(f"resolving {model} ...")
    source: ModelSource = resolve_model(model)
    folder = source.path
    out.parent.mkdir(parents=True, exist_ok=True)
    work = None
    if merging is not None:
        from .merge import adapter_identity, merged_checkpoint

        peft_dir, scale, rows = merging
        progress(f"merging the LoRA adapter {peft_dir} at scale {scale:g} ...")
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-", dir=out.parent))
        try:
            folder = merged_checkpoint(source.path, peft_dir, work, scale=scale, speaker_rows=rows)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    try:
        return _export_folder(source, folder, out, requested, exporters, progress, step, t0,
                              None if merging is None else adapter_identity(*merging))
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def _export_folder(source: ModelSource, folder: Path, out: Path, requested: dict[str, tuple[str, ...]],
                   exporters: dict[str, Callable[..., list[dict[str, Any]]]], progress: Progress,
                   step: Callable[[str], None], t0: float, adapter: dict[str, Any] | None) -> Manifest:
    facts = checkpoint_facts(folder)
    progress(f"checkpoint {folder} ({facts['model']['tts_model_type']}, {facts['model']['tts_model_size']}) "
             f"in {time.perf_counter() - t0:.1f} s; hashing source files ...")
    # A merged checkpoint's files (the merged weights) are its identity: packs for the base are refused on it.
    source_info = {"model": source.spec, "kind": source.kind, "path": str(source.path), "variant": source.variant,
                   "shape": source.shape, "seed": source.seed, "files": source_file_hashes(folder)}
    if adapter is not None:
        source_info["adapter"] = adapter
    step("checkpoint")
    _voice_stages(facts["model"]["tts_model_type"], requested, exporters, progress)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        components = _copy_tokenizer(folder, tmp)
        for stage, fn in exporters.items():
            ts = time.perf_counter()
            progress(f"exporting {stage} ({', '.join(requested[stage])}) ...")
            for entry in fn(folder, tmp, requested[stage], progress=progress, step=step):
                # An exporter's "meta" dict and any other extra keys (e.g. "fidelity") become component meta.
                meta = dict(entry.get("meta") or {})
                skip = ("file", "role", "format", "precision", "meta")
                meta.update({k: v for k, v in entry.items() if k not in skip})
                if entry["precision"] not in requested[stage]:
                    meta["requested"] = False  # kept as another precision's source; the runtime prefers the asked
                components.append(Component.from_file(tmp, entry["file"], entry["role"], entry["format"],
                                                      entry["precision"], meta=meta))
            progress(f"{stage} done in {time.perf_counter() - ts:.1f} s")
        validate_components(components)
        manifest = Manifest(
            format_version=FORMAT_VERSION, source=source_info, tools=_tool_versions(),
            components=tuple(components), created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **facts,
        )
        write_manifest(tmp, manifest)
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(c.size for c in manifest.components)
    progress(f"bundle {out} written: {len(manifest.components)} files, {total / 1e6:.1f} MB, "
             f"{time.perf_counter() - t0:.1f} s")
    return manifest
