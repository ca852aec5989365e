"""``qwen3-tts-edge export``: its arguments and its run, loaded by the runtime CLI only when asked for.

Light on purpose (argparse only at import): the lean install, which lacks the ``[export]`` extra, must still
be able to say which extra to install instead of failing on an import.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..runtime.backends.onnxruntime.heads import HEADS_PRECISIONS
from ..runtime.cli import csv_list
from ..runtime.engine.specs import DEFAULT_EXPORT, GENERATION_ENGINES, precisions
from ..runtime.errors import Qwen3TTSEdgeError

EXPORT_EXTRA_HINT = ("pip install 'qwen3-tts-edge[export]' && pip install --no-deps qwen-tts==0.1.1 "
                     "(or `make setup` in a checkout)")


class ExtraMissingError(Qwen3TTSEdgeError):
    """The export side is not installed in this environment."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="Hugging Face id, local checkpoint folder, or "
                   "random:<tiny|0.6b|1.7b>-<base|custom_voice|voice_design>[@seed]")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="BUNDLE", help="bundle folder to write")
    talker_choices = "; ".join(f"{name}: {','.join(b.precisions)}" for name, b in GENERATION_ENGINES.items())
    for stage, fmt, choices in (("talker", "GGUF or ONNX", (talker_choices,)),
                                ("decoder", "ONNX", precisions("decoder")),
                                ("speaker_encoder", "ONNX", precisions("speaker_encoder")),
                                ("codec_encoder", "ONNX", precisions("codec_encoder"))):
        default = ",".join(DEFAULT_EXPORT[stage]) + (" for Base models" if stage.endswith("_encoder") else "")
        p.add_argument(f"--{stage.replace('_', '-')}", type=csv_list, default=None, metavar="PRECISIONS",
                       help=f"{stage.replace('_', ' ')} {fmt} precisions, comma-separated ({','.join(choices)}; "
                            f"default {default})")
    p.add_argument("--predictor-heads", type=csv_list, default=None, metavar="PRECISIONS",
                   help=f"also write the llama.cpp code predictor's 15 output heads as weight-only "
                        f"{','.join(HEADS_PRECISIONS)} graphs (a quarter of the float32 heads' bytes per frame; the "
                        "runtime then uses them unless --predictor-heads f32)")
    p.add_argument("--backend", type=csv_list, default=None, metavar="ENGINES",
                   help=f"generation engine(s) to export for, comma-separated ({', '.join(GENERATION_ENGINES)}; "
                        f"default llama.cpp): sets the default --talker precisions (llama.cpp q8_0, onnxruntime fp32)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at BUNDLE")
    p.add_argument("--adapter", type=Path, metavar="PEFT_DIR", help="a PEFT LoRA folder trained on MODEL, merged "
                   "into this bundle (with --merge; for many voices on one bundle use `voice pack`)")
    p.add_argument("--merge", action="store_true", help="merge --adapter into the exported weights (one voice)")
    p.add_argument("--scale", type=float, default=None, metavar="S",
                   help="--adapter: scale to merge at, in [0, 2] (default 1: as trained)")
    p.add_argument("--speaker-row", action="append", metavar="NAME=ROW",
                   help="--adapter: a codec-embedding row the fine-tune wrote, registered as speaker NAME "
                        "(repeatable; CustomVoice)")


def run(args: argparse.Namespace) -> int:
    from .quiet import quiet_third_party

    quiet_third_party()
    try:
        from .build import export_bundle, missing_export_modules
    except ImportError as exc:
        raise ExtraMissingError(f"export needs the [export] extra ({exc}): {EXPORT_EXTRA_HINT}") from exc
    missing = missing_export_modules()
    if missing:
        raise ExtraMissingError(f"export needs the [export] extra, and this environment lacks "
                                f"{', '.join(missing)}: {EXPORT_EXTRA_HINT}")
    from .voice_pack import parse_speaker_row

    rows = dict(parse_speaker_row(r) for r in args.speaker_row or ())
    export_bundle(args.model, args.output, talker=args.talker, decoder=args.decoder,
                  speaker_encoder=args.speaker_encoder, codec_encoder=args.codec_encoder,
                  predictor_heads=args.predictor_heads, force=args.force, backends=args.backend,
                  adapter=args.adapter, merge=args.merge, adapter_scale=args.scale, speaker_rows=rows or None)
    return 0
