"""``export MODEL --adapter PEFT_DIR --merge``: a PEFT LoRA merged into the checkpoint, for a one-voice bundle.

For a device that speaks one fine-tuned voice, one merged bundle costs no adapter at run time. The adapter is
read exactly as ``voice pack`` reads it (``export/voice_pack``: the same module mapping, PEFT's scaling folded
into B, the same refusals and ``--speaker-row`` rules), so a merged bundle and the base bundle + that pack apply
the same update: ``W + scale * B @ A`` in float32 on every adapted weight, the named codec-embedding rows written
and their speaker names registered in ``config.json`` (``spk_id``; presets list them). A Base checkpoint with
speaker rows becomes a CustomVoice one, as the official Base fine-tune writes it (``tts_model_type``, ``spk_id``,
``spk_is_dialect``, no speaker encoder). The merged checkpoint is a folder beside the output (changed weight
files written, the rest linked) that the usual stage exporters read; the manifest's ``source.adapter`` records
the adapter's identity (file hashes, scale, rows).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.bundle import sha256_file
from ..runtime.voices.voice_pack import check_scale
from .torch_reference import checkpoint_files
from .voice_pack import (
    CODEC_EMBEDDING,
    VoicePackExportError,
    _collect,
    _read_peft,
    _refuse_features,
    changed_rows_error,
)

PACK_INSTEAD = ("to keep one bundle for many voices, make a voice pack instead: qwen3-tts-edge voice pack PEFT_DIR "
                "-b BUNDLE -o NAME.voicepack")


class MergeError(VoicePackExportError):
    """An adapter this export cannot merge into this checkpoint; says what and why."""


def check_request(peft_dir: str | Path | None, merge: bool, scale: float | None,
                  speaker_rows: dict[str, int] | None) -> float:
    """Refuse a merge request that cannot work before any checkpoint is read; the scale to merge at."""
    if peft_dir is None:
        if merge or scale is not None or speaker_rows:
            raise MergeError("--merge, --scale and --speaker-row go with --adapter PEFT_DIR")
        return 1.0
    if not merge:
        raise MergeError(f"--adapter {peft_dir}: add --merge to bake the adapter into this bundle (one voice per "
                         f"bundle); {PACK_INSTEAD}")
    if not (Path(peft_dir) / "adapter_config.json").is_file():
        raise MergeError(f"{peft_dir} is not a PEFT adapter folder (no adapter_config.json)")
    return check_scale(1.0 if scale is None else scale)


def adapter_identity(peft_dir: Path, scale: float, speaker_rows: dict[str, int]) -> dict[str, Any]:
    """What the manifest records about a merged adapter: its files' sha256, the scale, the speaker rows."""
    files = {p.name: sha256_file(p) for p in sorted(peft_dir.iterdir())
             if p.is_file() and p.name.startswith(("adapter_config", "adapter_model"))}
    cfg = json.loads((peft_dir / "adapter_config.json").read_text(encoding="utf-8"))
    return {"peft_dir": peft_dir.name, "files": files, "scale": scale, "speaker_rows": dict(speaker_rows),
            "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"), "use_rslora": bool(cfg.get("use_rslora")),
            "peft_version": cfg.get("peft_version")}


def _merged_config(folder: Path, speaker_rows: dict[str, int]) -> dict[str, Any]:
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    talker = cfg["talker_config"]
    vocab, codebook = int(talker["vocab_size"]), int(talker["code_predictor_config"]["vocab_size"])
    bad = {n: r for n, r in speaker_rows.items() if not codebook <= r < vocab}
    if bad:
        raise MergeError(f"speaker rows {bad} are outside the control/speaker rows [{codebook}, {vocab})")
    kind = cfg.get("tts_model_type")
    if speaker_rows and kind not in ("custom_voice", "base"):
        raise MergeError(f"speaker rows need a CustomVoice or Base checkpoint (a {kind} prompt has no speaker row)")
    if speaker_rows and kind == "base":  # what the official Base fine-tune writes: a CustomVoice model
        cfg["tts_model_type"] = "custom_voice"
        talker["spk_is_dialect"] = {**(talker.get("spk_is_dialect") or {}), **dict.fromkeys(speaker_rows, False)}
    taken = {n: r for n, r in speaker_rows.items() if n in {k.lower() for k in talker.get("spk_id") or {}}}
    if taken:
        raise MergeError(f"speaker names {sorted(taken)} are preset speakers of this checkpoint; choose new names")
    talker["spk_id"] = {**(talker.get("spk_id") or {}), **speaker_rows}
    return cfg


def lora_updates(peft_dir: Path, speaker_rows: dict[str, int]
                 ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray | None]:
    """Checkpoint weight name -> (A, B with PEFT's scaling folded in), and the retrained codec table (or None),
    read and refused exactly as ``voice pack`` does."""
    peft_cfg, sd = _read_peft(peft_dir)
    _refuse_features(peft_cfg)
    talker, predictor, codec = _collect(peft_cfg, sd, speaker_rows)
    return {f"{module}.weight": ab for module, ab in {**talker, **predictor}.items()}, codec


def merged_checkpoint(folder: Path, peft_dir: Path, work: Path, *, scale: float,
                      speaker_rows: dict[str, int] | None = None) -> Path:
    """Write ``work/checkpoint``: ``folder`` with the adapter at ``peft_dir`` merged at ``scale``; its path."""
    import torch
    from safetensors.torch import load_file, save_file

    speaker_rows = {k.lower(): int(v) for k, v in (speaker_rows or {}).items()}
    cfg = _merged_config(folder, speaker_rows)
    updates, codec = lora_updates(peft_dir, speaker_rows)
    drop = "speaker_encoder." if cfg["tts_model_type"] == "custom_voice" else None  # a Base turned CustomVoice
    out = work / "checkpoint"  # a plain identifier: transformers derives module names from the folder
    out.mkdir(parents=True)
    weight_files = checkpoint_files(folder)
    for path in weight_files:
        tensors = load_file(str(path))
        dropped = [k for k in tensors if drop and k.startswith(drop)]
        for k in dropped:
            del tensors[k]
        touched = bool(dropped)
        for key in [k for k in tensors if k in updates]:
            a, b = updates.pop(key)
            w = tensors[key].float().numpy()
            if w.shape != (b.shape[0], a.shape[1]) or a.shape[0] != b.shape[1]:
                raise MergeError(f"{key}: adapter A {a.shape}, B {b.shape} do not fit the weight {w.shape}; was "
                                 "it trained on this checkpoint?")
            tensors[key] = torch.from_numpy(w + np.float32(scale) * (b @ a))
            touched = True
        key = CODEC_EMBEDDING + ".weight"
        if codec is not None and key in tensors:
            base = tensors[key].float().numpy()
            if codec.shape != base.shape:
                raise MergeError(f"the adapter's {CODEC_EMBEDDING} is {codec.shape}, the checkpoint's {base.shape}")
            changed = np.nonzero(np.max(np.abs(codec - base), axis=1) > 0)[0].tolist()
            error = changed_rows_error(changed, speaker_rows)
            if error:
                raise MergeError(error)
            table = base.copy()
            for row in speaker_rows.values():
                table[row] = codec[row]
            tensors[key] = torch.from_numpy(table)
            codec, touched = None, True
        if touched:
            save_file(tensors, str(out / path.name), metadata={"format": "pt"})
        else:
            os.symlink(path.resolve(), out / path.name)
        del tensors
    if updates or codec is not None:
        missing = sorted(updates) + ([CODEC_EMBEDDING + ".weight"] if codec is not None else [])
        raise MergeError(f"the checkpoint has no weights {missing[:8]} for the adapter's modules; was it trained on "
                         "this checkpoint?")
    skip = {p.resolve() for p in weight_files} | {(folder / "config.json").resolve()}
    for src in folder.rglob("*"):
        dest = out / src.relative_to(folder)
        if src.is_dir():
            dest.mkdir(exist_ok=True)
        elif src.resolve() not in skip and not src.name.startswith("."):
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src.resolve(), dest)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def remove(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
