"""``qwen3-tts-edge`` command line: speak, voice, info here; export, parity, bench plugged in by module name.

Subcommands that need the export extras import them lazily, so ``speak``, ``voice`` and ``info`` work in the
lean runtime install. Every user-facing error (``Qwen3TTSEdgeError``) prints one line
(``qwen3-tts-edge: error: ...``) and exits 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from importlib import import_module
from pathlib import Path

from .bundle import BundleError, Manifest, load_bundle
from .engine.config import EngineConfig, add_engine_arguments
from .errors import Qwen3TTSEdgeError

PROG = "qwen3-tts-edge"
EXIT_ERROR = 1


class CliError(Qwen3TTSEdgeError):
    """A user-facing error: printed as one line, exit status 1."""


def csv_list(value: str) -> list[str]:
    """A comma-separated command-line list (blank items dropped; a list of only commas is an error)."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items and value.strip():
        raise argparse.ArgumentTypeError(f"empty list {value!r}")
    return items


def _format_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _cloning_line(m: Manifest) -> str:
    """Whether the bundle can turn reference audio into a voice (Base bundles with the speaker encoder)."""
    kind = m.model.get("tts_model_type")
    if kind != "base":
        return f"not available: {kind} checkpoints have no speaker encoder (only Base models clone voices)"
    enc = m.find("speaker_encoder")
    if not enc:
        return "Base model, but this bundle has no speaker encoder; re-export without --speaker-encoder ''"
    return f"speaker encoder {enc[0].precision} (x-vector width {enc[0].meta.get('enc_dim')})"


def format_manifest(m: Manifest) -> str:
    """Human-readable summary of a manifest (the ``info`` output)."""
    src, model, audio = m.source, m.model, m.audio
    lines = [
        f"format version  {m.format_version}   created {m.created}",
        f"source          {src.get('model')} ({src.get('kind')})",
        f"model           {model.get('tts_model_type')} {model.get('tts_model_size')}; talker "
        f"{model['talker'].get('num_hidden_layers')} layers x {model['talker'].get('hidden_size')}, predictor "
        f"{model['predictor'].get('num_hidden_layers')} layers x {model['predictor'].get('hidden_size')}",
        f"audio           {audio.get('sample_rate')} Hz, {audio.get('samples_per_frame')} samples/frame "
        f"({audio.get('frame_rate')} Hz), {audio.get('num_code_groups')} codebooks x {audio.get('codebook_size')}",
        f"speakers        {', '.join(sorted(m.speakers)) or '(none: voice comes from instruct or a voice prompt)'}",
        f"languages       auto, {', '.join(sorted(m.languages))}",
        "sampling        " + ", ".join(f"{k}={v}" for k, v in sorted(m.sampling.items())),
        "components",
    ]
    for c in m.components:
        extra = ""
        fid = c.meta.get("fidelity")
        if isinstance(fid, dict) and fid:
            nums = {k: v for k, v in fid.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            extra = "  " + ", ".join(f"{k}={v:.4g}" for k, v in nums.items())
        lines.append(f"  {c.role:<16} {c.precision:<7} {c.format:<5} {_format_size(c.size):>9}  {c.file}"
                     f"  sha256:{c.sha256[:12]}{extra}")
        for precision, why in (c.meta.get("rejected") or {}).items():
            lines.append(f"  {c.meta.get('rejected_for', c.role):<16} {precision:<7} not shipped: {why}")
    lines.append("voice cloning   " + _cloning_line(m))
    lines.append("tools           " + ", ".join(f"{k} {v}" for k, v in m.tools.items()))
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    try:
        bundle = load_bundle(args.bundle, verify=not args.no_verify)
    except BundleError as exc:
        raise CliError(str(exc)) from exc
    if args.json:
        from .machine import describe

        # The manifest, plus the machine reading it: which llama.cpp kernels would run this bundle here.
        print(json.dumps({**bundle.manifest.to_dict(), "machine": describe()}, indent=2, ensure_ascii=False))
    else:
        print(format_manifest(bundle.manifest))
    return 0


def _read_stdin_utf8() -> str:
    """Standard input as UTF-8. Invalid bytes are an error naming their offset, never replaced silently:
    speaking U+FFFD where a word was would hide the mistake."""
    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"stdin is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); convert it "
                       "first, e.g. `iconv -f latin1 -t utf-8`") from None


def _texts(args: argparse.Namespace) -> list[str]:
    if args.text != "-":
        if args.lines:
            raise CliError("--lines needs TEXT to be - (stdin)")
        return [args.text]
    data = _read_stdin_utf8()
    texts = [line.strip() for line in data.splitlines() if line.strip()] if args.lines else [data.strip()]
    if not texts or not texts[0]:
        raise CliError("no text on stdin")
    return texts


def _read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file's stripped content (a transcript); empty or unreadable files are errors."""
    try:
        text = path.read_bytes().decode("utf-8").strip()
    except OSError as exc:
        raise CliError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CliError(f"{what} {path} is not valid UTF-8 (offset {exc.start}); convert it first") from None
    if not text:
        raise CliError(f"{what} {path} is empty")
    return text


def _transcript(text: str | None, text_file: Path | None, x_vector_only: bool, flag: str) -> str | None:
    """The reference transcript from ``--…text`` or ``--…text-file``; ICL needs one unless --x-vector-only."""
    if text is not None and text_file is not None:
        raise CliError(f"give the transcript once: {flag} or {flag}-file, not both")
    if text_file is not None:
        text = _read_text_file(text_file, "transcript file")
    if not (text and text.strip()) and not x_vector_only:
        raise CliError(f"give the reference transcript ({flag} or {flag}-file) for in-context cloning, or "
                       "--x-vector-only to clone from the speaker x-vector alone")
    return text


# `voice create` runs the voice encoders only: of the engine flags, just --threads applies.
_GENERATION_ONLY = tuple(n for n in EngineConfig.field_names() if n != "threads")


def _cmd_voice_create(args: argparse.Namespace) -> int:
    from .pipeline import TTS

    ref_text = _transcript(args.text, args.text_file, args.x_vector_only, "--text")
    if args.output.exists() and args.output.is_dir():
        raise CliError(f"{args.output} is a folder; name the voice file, e.g. -o {args.output / 'name.voice'}")
    # Only the two voice encoders run: the generation engine and the decoder are not loaded.
    tts = TTS(args.bundle, EngineConfig.from_args(args), load=())
    t0 = time.perf_counter()
    voice = tts.create_voice(args.audio, ref_text, x_vector_only=args.x_vector_only, language=args.language)
    voice.save(args.output)
    seconds = voice.provenance.get("seconds") or 0
    print(f"{PROG}: wrote {args.output} ({voice.mode}, x-vector {voice.enc_dim} wide, from {seconds:.2f} s of "
          f"audio in {time.perf_counter() - t0:.2f} s)", file=sys.stderr)
    return 0


def _cmd_voice_info(args: argparse.Namespace) -> int:
    from .voices.voice_file import Voice
    from .voices.voice_pack import VoicePack, is_pack_path

    voice = VoicePack.load(args.voice) if is_pack_path(args.voice) else Voice.load(args.voice)
    print(json.dumps(voice.describe(), indent=2, ensure_ascii=False))
    return 0


def _cmd_voice_pack(args: argparse.Namespace) -> int:
    """`voice pack`: the export side (torch, peft, the vendored converter), imported only here."""
    try:  # by module name: the runtime never imports export/ (imports point down)
        vp = import_module("qwen3_tts_edge.export.voice_pack")
    except ImportError as exc:
        raise CliError(f"voice pack needs the [export] extra ({exc}): pip install 'qwen3-tts-edge[export]'") from exc
    rows = dict(vp.parse_speaker_row(r) for r in args.speaker_row or ())
    t0 = time.perf_counter()
    pack = vp.make_voice_pack(args.peft_dir, args.bundle, args.output, scale=args.scale, speaker_rows=rows,
                           languages=args.language or (), adapter_type=args.adapter_type,
                           progress=lambda msg: print(f"{PROG}: {msg}", file=sys.stderr))
    print(f"{PROG}: voice pack {args.output}: {pack.nbytes / 1e6:.2f} MB of adapters, default scale {pack.scale:g}"
          f"{', speakers ' + ', '.join(pack.speakers) if pack.speakers else ''} ({time.perf_counter() - t0:.1f} s)",
          file=sys.stderr)
    return 0


def _format_stats(stats, tts) -> str:
    per = stats.per_frame_ms()
    ttfa = f"{stats.ttfa_s * 1e3:.0f} ms" if stats.ttfa_s is not None else "n/a"
    rtf = f"{stats.rtf:.3f}" if stats.rtf is not None else "n/a"
    stages = ", ".join(f"{k} {v:.1f}" for k, v in per.items())
    devices = ", ".join(f"{k}={v}" for k, v in stats.devices.items())
    heads = getattr(tts.engines.generation.predictor, "heads_precision", None)  # the llama.cpp predictor's heads
    return (f"time to first audio {ttfa}; real-time factor {rtf}; {stats.frames} frames = {stats.audio_s:.2f} s "
            f"of audio in {stats.total_s:.2f} s (stop: {stats.stop_reason}); prefill {stats.prefill_ms:.0f} ms "
            f"({stats.prompt_positions_prefilled} positions, {stats.prompt_positions_reused} reused); "
            f"ms/frame: {stages}; precisions: talker {tts.talker_precision} ({tts.backend}), predictor "
            f"{tts.predictor_precision}{f' ({heads} heads)' if heads else ''}, decoder {tts.decoder_precision}; "
            f"devices: {devices}")


def _cmd_speak(args: argparse.Namespace) -> int:
    from .audio import AudioError, FileSink, PlaybackSink, RawSink
    from .pipeline import TTS, PromptError, SpeakOptions

    if not (args.output or args.play or args.raw):
        raise CliError("choose where the audio goes: -o FILE, --play or --raw")
    texts = _texts(args)
    if args.ref_audio is not None and args.voice is not None:
        raise CliError("give either --voice or --ref-audio, not both")
    if args.ref_audio is None and (args.ref_text or args.ref_text_file or args.x_vector_only):
        raise CliError("--ref-text, --ref-text-file and --x-vector-only go with --ref-audio")
    ref_text = None if args.ref_audio is None else _transcript(args.ref_text, args.ref_text_file,
                                                               args.x_vector_only, "--ref-text")
    try:
        schedule = tuple(int(v) for v in csv_list(args.chunk_frames))
        options = SpeakOptions(language=args.language, speaker=args.speaker, instruct=args.instruct,
                               streaming_text=not args.full_text, seed=args.seed, greedy=args.greedy,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               repetition_penalty=args.repetition_penalty, chunk_frames=schedule,
                               max_frames=args.max_frames, voice=args.voice, voice_scale=args.voice_scale)
        tts = TTS(args.bundle, EngineConfig.from_args(args))
        if args.ref_audio is not None:
            options = options.replace(voice=tts.create_voice(args.ref_audio, ref_text,
                                                             x_vector_only=args.x_vector_only))
        streams = [tts.stream(text, options) for text in texts]  # validates every request before any audio
        if args.output:
            sink = FileSink(args.output, tts.sample_rate)
        elif args.raw:
            sink = RawSink()
        else:
            sink = PlaybackSink(tts.sample_rate)
    except (BundleError, PromptError, AudioError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    try:
        for stream in streams:
            for chunk in stream:
                sink.write(chunk.pcm)
            if args.stats:
                print(f"{PROG}: {_format_stats(stream.stats, tts)}", file=sys.stderr)
        sink.close()
    except BrokenPipeError as exc:  # the reader of --raw went away: stop generating, say so once
        sink.abort()
        sys.stdout = None  # the interpreter must not try to flush the dead pipe again at exit
        raise CliError("output pipe closed by the reader; stopped") from exc
    except BaseException as exc:
        sink.abort()
        if isinstance(exc, AudioError | ValueError | OSError):
            raise CliError(str(exc)) from exc
        raise
    finally:
        for stream in streams:
            stream.close()  # stops generation threads promptly on errors and interrupts
    if args.output:
        print(f"{PROG}: wrote {args.output}", file=sys.stderr)
    return 0


# Subcommands that live in the layers above the runtime (export/, bench/) or behind an extra (runtime/servers,
# the [server] extra): module, argument adder, runner, help. Named by string and imported only when chosen, so
# the runtime never imports upward and `speak` stays light.
PLUGGED: dict[str, tuple[str, str, str, str]] = {
    "export": ("qwen3_tts_edge.export.cli", "add_arguments", "run", "export a checkpoint into an artifact bundle"),
    "parity": ("qwen3_tts_edge.bench.parity", "add_parity_arguments", "cmd_parity",
               "compare a bundle's stages with the official PyTorch model"),
    "bench": ("qwen3_tts_edge.bench.run", "add_bench_arguments", "cmd_bench",
              "time to first audio, real-time factor, memory, fidelity per precision"),
    "serve": ("qwen3_tts_edge.runtime.servers.cli", "add_serve_arguments", "cmd_serve",
              "OpenAI-compatible speech API (/v1/audio/speech) over HTTP"),
    "wyoming": ("qwen3_tts_edge.runtime.servers.cli", "add_wyoming_arguments", "cmd_wyoming",
                "Wyoming TTS server for Home Assistant"),
}


def _plugged(name: str):
    module, _add, run, _help = PLUGGED[name]
    return lambda args: getattr(import_module(module), run)(args)


def build_parser(wanted: str | None = None) -> argparse.ArgumentParser:
    """The parser; of the plugged subcommands only ``wanted`` gets (and imports) its arguments."""
    from .voices.voice_pack import ADAPTER_TYPES  # numpy: not at the module's import

    parser = argparse.ArgumentParser(prog=PROG, description="Qwen3-TTS 12 Hz on edge hardware: export, speak, "
                                     "inspect and benchmark artifact bundles.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("speak", help="synthesize speech from text with a bundle")
    p.add_argument("text", metavar="TEXT", help="text to speak, or - to read stdin")
    p.add_argument("-b", "--bundle", required=True, type=Path)
    out = p.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", type=Path, metavar="FILE", help="write .wav/.flac/.ogg")
    out.add_argument("--play", action="store_true", help="play through the sound card")
    out.add_argument("--raw", action="store_true", help="s16le mono PCM on stdout (sample rate: see info)")
    p.add_argument("--lines", action="store_true", help="with -: one utterance per non-empty stdin line")
    p.add_argument("--speaker", help="preset speaker (CustomVoice models)")
    p.add_argument("--instruct", help="voice/style instruction (VoiceDesign; CustomVoice 1.7B)")
    p.add_argument("--language", default="auto")
    p.add_argument("--voice", type=Path, help="voice file for Base models (make one with `voice create`), or a "
                   "LoRA voice pack NAME.voicepack (`voice pack`; llama.cpp engine)")
    p.add_argument("--voice-scale", type=float, metavar="S", help="voice pack: adapter scale in [0, 2] "
                   "(default: the pack's)")
    p.add_argument("--ref-audio", type=Path, metavar="REF",
                   help="one-shot clone on a Base bundle: reference audio (saves nothing; see `voice create`)")
    p.add_argument("--ref-text", help="transcript of --ref-audio (in-context cloning)")
    p.add_argument("--ref-text-file", type=Path, metavar="FILE", help="read the --ref-audio transcript from a file")
    p.add_argument("--x-vector-only", action="store_true", help="with --ref-audio: clone from the x-vector only")
    p.add_argument("--full-text", action="store_true", help="put the whole text in the prompt (non-streaming layout)")
    p.add_argument("--seed", type=int)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (no sampling)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--max-frames", type=int, help="hard cap on 80 ms frames")
    p.add_argument("--chunk-frames", default="1,2,4,8", help="decode schedule: frames per chunk, last repeats")
    add_engine_arguments(p.add_argument_group("engine"))
    p.add_argument("--stats", action="store_true", help="print time to first audio, RTF, per-stage ms to stderr")
    p.set_defaults(func=_cmd_speak)

    p = sub.add_parser("voice", help="clone a voice from reference audio (Base bundles) / show a voice file")
    vsub = p.add_subparsers(dest="voice_command", required=True, metavar="ACTION")
    v = vsub.add_parser("create", help="make a voice file from reference audio")
    v.add_argument("audio", metavar="REF_AUDIO", type=Path, help="wav/flac/ogg/mp3, any rate, mono or multichannel")
    v.add_argument("-b", "--bundle", required=True, type=Path, help="a Base-model bundle")
    v.add_argument("-o", "--output", required=True, type=Path, metavar="NAME.voice")
    v.add_argument("--text", help="transcript of the reference: in-context cloning (the official default)")
    v.add_argument("--text-file", type=Path, metavar="FILE", help="read the transcript from a UTF-8 file")
    v.add_argument("--x-vector-only", action="store_true", help="clone from the speaker x-vector only")
    v.add_argument("--language", help="default language for this voice")
    add_engine_arguments(v.add_argument_group("engine"), skip=_GENERATION_ONLY)
    v.set_defaults(func=_cmd_voice_create)
    v = vsub.add_parser("info", help="print a voice file's or voice pack's metadata")
    v.add_argument("voice", metavar="NAME.voice|NAME.voicepack", type=Path)
    v.set_defaults(func=_cmd_voice_info)
    v = vsub.add_parser("pack", help="make a LoRA voice pack from a PEFT adapter folder (needs the [export] extra)")
    v.add_argument("peft_dir", metavar="PEFT_DIR", type=Path, help="adapter_config.json + adapter_model.safetensors")
    v.add_argument("-b", "--bundle", required=True, type=Path, help="a bundle of the base the adapter was trained on")
    v.add_argument("-o", "--output", required=True, type=Path, metavar="NAME.voicepack")
    v.add_argument("--scale", type=float, default=1.0, help="default adapter scale in [0, 2] (default 1: as trained)")
    v.add_argument("--speaker-row", action="append", metavar="NAME=ROW",
                   help="a codec-embedding row the fine-tune wrote, as a speaker name (repeatable)")
    v.add_argument("--language", action="append", help="a language the voice speaks (repeatable)")
    v.add_argument("--adapter-type", choices=ADAPTER_TYPES, default="f16",
                   help="adapter precision (default f16; q8_0 keeps rank < 32 B matrices in f16)")
    v.set_defaults(func=_cmd_voice_pack)

    p = sub.add_parser("info", help="print a bundle's manifest readably")
    p.add_argument("bundle", metavar="BUNDLE", type=Path)
    p.add_argument("--json", action="store_true", help="print the raw manifest JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 pass (sizes are still checked)")
    p.set_defaults(func=_cmd_info)

    for name, (module, add, _run, help_) in PLUGGED.items():
        p = sub.add_parser(name, help=help_)
        if name == wanted:
            getattr(import_module(module), add)(p)
            p.set_defaults(func=_plugged(name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(wanted if wanted in PLUGGED else None)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Qwen3TTSEdgeError as exc:  # every user-facing error; anything else is a bug and keeps its traceback
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
