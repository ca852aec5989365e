"""LoRA voice packs at a real shape (#23): what a pack costs on disk, in memory and in time, against merged bundles.

    python -m qwen3_tts_edge.bench.voice_packs -b BUNDLE [--ranks 16,64] [--voices 10] [--frames 25]
        [--repeats 3] [--threads 2] [--adapter-type f16] [--update-size 0.1] [--fidelity] [--work DIR]
        [--json F] [--markdown F]

Random PEFT adapters are written from the bundle's shapes (LoRA on every talker and code-predictor
q/k/v/o/gate/up/down_proj; the update's elementwise size is ``--update-size`` / sqrt(fan_in), i.e. that fraction
of a fan-in-scaled weight) and packed with ``voice pack``'s exporter. The timings run in a fresh process (no torch
in its memory), one ``TTS`` over the bundle, requests of ``--frames`` forced frames with a preset speaker:
- per rank: pack size, first request with the pack (adapter load: ``AdapterCache.load_s``), resident memory the
  loaded pack added, time to first audio and RTF with the pack vs without (medians, ratios within this run);
- switching: requests alternating base / pack (the set call, ``AdapterCache.switch_s``, and time to first audio
  against requests that keep one pack);
- many voices: ``--voices`` rank-``min(ranks)`` packs round-robin over three rounds, against as many merged
  bundles (a merged bundle has the base bundle's files and sizes: disk = its bytes, memory = the resident set
  of one loaded bundle after a request, each).
``--fidelity`` (export extras; the bundle's random checkpoint) adds logit cosine / KL of the bundle's talker
precision + each adapter type against the official model with the adapter merged in fp32 (``bench/parity_llama``
metrics, one teacher-forced trajectory), beside the bundle without a pack against the base model.
Absolute times on a shared machine are inflated; the ratios come from one run and the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.bundle import load_bundle
from ..runtime.voices.voice_pack import VoicePack
from .machine import describe as describe_machine
from .report import bundle_bytes

TEXT = "The weather is lovely today, and the lights in the kitchen are on."
_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")
MB = 1e6


# ----------------------------------------------------------------------------------------------------------
# adapters and packs (export side)


def _shapes(part: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(out, in) of each adapted projection in one decoder layer."""
    h, inter, hd = int(part["hidden_size"]), int(part["intermediate_size"]), int(part["head_dim"])
    q, kv = int(part["num_attention_heads"]) * hd, int(part["num_key_value_heads"]) * hd
    return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
            "mlp.down_proj": (h, inter)}


def write_peft_adapter(model: dict[str, Any], out: Path, rank: int, seed: int, update_size: float) -> Path:
    """A random PEFT LoRA folder on every talker and code-predictor projection of ``model`` (manifest shapes)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for prefix, part in (("talker.model", model["talker"]), ("talker.code_predictor.model", model["predictor"])):
        for layer in range(int(part["num_hidden_layers"])):
            for name, (n_out, n_in) in _shapes(part).items():
                key = f"base_model.model.{prefix}.layers.{layer}.{name}"
                tensors[key + ".lora_A.weight"] = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
                b = rng.standard_normal((n_out, rank)) * (update_size / np.sqrt(rank))
                tensors[key + ".lora_B.weight"] = b.astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": [m.split(".")[1] for m in _MODULES],
           "bias": "none", "note": f"random bench adapter, update size {update_size} of a fan-in-scaled weight"}
    (out / "adapter_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return out


def _pack_is(path: Path, rank: int, adapter_type: str) -> bool:
    info = VoicePack.load(path).info
    return info.get("talker", {}).get("ranks") == [rank] and info["talker"].get("type") == adapter_type


def make_packs(bundle: Path, work: Path, ranks: list[int], voices: int, adapter_type: str,
               update_size: float) -> dict[str, Any]:
    """PEFT folders and packs: one per rank (``rank{R}``) and ``voices`` at the smallest rank (``voice{i}``)."""
    from ..export.voice_pack import make_voice_pack

    model = load_bundle(bundle, verify=False).manifest.model
    made: dict[str, Any] = {}
    jobs = [(f"rank{r}", r, 100 + r) for r in ranks] + [(f"voice{i}", min(ranks), 1000 + i) for i in range(voices)]
    for name, rank, seed in jobs:
        peft, path = work / f"{name}-peft", work / f"{name}.voicepack"
        t0 = time.perf_counter()
        if path.is_file() and json.loads((peft / "adapter_config.json").read_text())["note"].endswith(
                f"size {update_size} of a fan-in-scaled weight") and _pack_is(path, rank, adapter_type):
            pack = VoicePack.load(path)  # made by an earlier run with the same settings (--work kept)
        else:
            write_peft_adapter(model, peft, rank, seed, update_size)
            pack = make_voice_pack(peft, bundle, path, adapter_type=adapter_type)
        made[name] = {"rank": rank, "path": str(work / f"{name}.voicepack"), "peft": str(peft),
                      "file_bytes": (work / f"{name}.voicepack").stat().st_size,
                      "talker_adapter_bytes": len(pack.talker_adapter),
                      "predictor_adapter_bytes": len(pack.predictor_adapter or b""),
                      "make_s": round(time.perf_counter() - t0, 2)}
    return made


# ----------------------------------------------------------------------------------------------------------
# the timed worker (runtime only)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One TTS over the bundle: base, each rank, switching, many voices (see the module docstring)."""
    from ..runtime import TTS
    from .memory import resident

    frames, repeats = int(spec["frames"]), int(spec["repeats"])
    t0 = time.perf_counter()
    tts = TTS(spec["bundle"], threads=int(spec["threads"]))
    load_s = time.perf_counter() - t0
    speaker = tts.speakers[0]
    adapters = tts.engines.adapters

    def request(voice: str | None = None, n: int = frames, seed: int = 0) -> dict[str, float]:
        with tts.stream(TEXT, voice=voice, speaker=speaker, language="english", seed=seed, min_frames=n,
                        max_frames=n, frames_per_text_token=None) as stream:
            for _ in stream:
                pass
        st = stream.stats
        return {"ttfa_ms": st.ttfa_s * 1e3, "rtf": st.rtf, "total_ms": st.total_s * 1e3,
                "switch_ms": adapters.switch_s * 1e3}

    def med(rows: list[dict[str, float]], key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 3 if key == "rtf" else 1)

    def rss() -> float:
        return resident()["total"]

    request()  # warm-up: pages the weights in, plans the decoder
    bundle_rss = rss()
    out: dict[str, Any] = {"load_s": round(load_s, 2), "bundle_rss_mb": round(bundle_rss), "ranks": {},
                           "loadavg_start": _load()}
    for name, pack in spec["packs"].items():
        if not name.startswith("rank"):
            continue
        before = rss()
        cold = request(pack["path"])
        loaded_s = adapters.load_s
        added = rss() - before
        # Triples under the same conditions (a shared machine drifts): no pack, the pack switched in, the pack again.
        triples = [(request(seed=i), request(pack["path"], seed=i), request(pack["path"], seed=i))
                   for i in range(repeats)]
        base, switched, kept = ([t[j] for t in triples] for j in range(3))

        def ratio(key: str, a: list, b: list) -> float:
            return round(statistics.median(x[key] / y[key] for x, y in zip(a, b, strict=True)), 3)

        out["ranks"][name] = {
            "rank": pack["rank"], "adapter_load_ms": round(loaded_s * 1e3, 1), "first_request": cold,
            "rss_added_mb": round(added, 1),
            "base_ttfa_ms": med(base, "ttfa_ms"), "base_rtf": med(base, "rtf"),
            "ttfa_ms": med(kept, "ttfa_ms"), "rtf": med(kept, "rtf"),
            "ttfa_ratio": ratio("ttfa_ms", kept, base), "rtf_ratio": ratio("rtf", kept, base),
            "switch_set_ms": round(statistics.median(r["switch_ms"] for r in base + switched), 3),
            "ttfa_switched_ms": med(switched, "ttfa_ms"),
            "switch_added_ttfa_ms": round(statistics.median(s["ttfa_ms"] - k["ttfa_ms"]
                                                            for s, k in zip(switched, kept, strict=True)), 1),
            "triples": triples}
    voices = [p["path"] for name, p in spec["packs"].items() if name.startswith("voice")]
    if voices:
        before = rss()
        n = int(spec["voice_frames"])
        bases, rounds = [], []
        for _ in range(3):  # a request without a pack in each round: the merged bundles' figure, same conditions
            bases.append(request(n=n))
            rounds.append([request(v, n=n, seed=i) for i, v in enumerate(voices)])
        loaded = rss()
        later = rounds[1] + rounds[2]
        out["many_voices"] = {
            "packs": len(voices), "frames": int(spec["voice_frames"]), "rss_added_mb": round(loaded - before, 1),
            "rss_per_pack_mb": round((loaded - before) / len(voices), 1), "rss_total_mb": round(loaded),
            "adapters_loaded_bytes": adapters.nbytes,
            "first_round_ttfa_ms": med(rounds[0], "ttfa_ms"), "ttfa_ms": med(later, "ttfa_ms"),
            "base_ttfa_ms": med(bases, "ttfa_ms"), "bases": bases,
            "switch_set_ms": round(statistics.median(r["switch_ms"] for r in later), 3), "rtf": med(later, "rtf"),
            "rounds": rounds}
    out["loadavg_end"] = _load()
    return out


# ----------------------------------------------------------------------------------------------------------
# fidelity (export side: the official model with the adapter merged)


def fidelity(bundle_dir: Path, peft: Path, types: list[str], work: Path, *, scale: float = 1.0,
             n_frames: int = 24, n_pred_frames: int = 6, threads: int = 2) -> dict[str, Any]:
    """Logit cosine / KL of the bundle's GGUF talker + predictor with the adapter at each type, against the official
    model with the adapter merged (fp32); and of the bundle without a pack against the base model."""
    import torch

    from ..export.merge import lora_updates
    from ..export.torch_reference import load_official_talker
    from ..export.voice_pack import make_voice_pack
    from ..quant.metrics import logit_metrics
    from .parity_llama import build_reference, run_predictor, run_talker

    bundle = load_bundle(bundle_dir, verify=False)
    m = bundle.manifest
    checkpoint = Path(m.source["path"])
    gguf = next(c for c in m.find("talker") if c.format == "gguf")
    precision = gguf.precision
    files = (bundle.path(gguf), bundle.path(m.component("predictor", precision)),
             bundle.path(m.component("predictor_tables", precision)))
    talker, _ = load_official_talker(checkpoint)
    kw: dict[str, Any] = {"n_threads": threads, "kv_type": "f16", "flash_attn": None}  # what a user runs

    def compare(ref, talker_adapter=None, predictor_adapter=None) -> dict[str, Any]:
        logits, _ = run_talker(ref, files[0], adapter=talker_adapter, **kw)
        pred = run_predictor(ref, files[1], files[2], adapter=predictor_adapter, **kw)
        t = logit_metrics(ref.logits[ref.n_prompt - 1:], logits)
        p = logit_metrics(ref.pred_logits.reshape(-1, ref.pred_logits.shape[-1]), pred.reshape(-1, pred.shape[-1]))
        return {"talker": t, "predictor": p}

    base_ref = build_reference(checkpoint, talker=talker, n_frames=n_frames, n_pred_frames=n_pred_frames)
    rows = {f"{precision}, no pack, vs the base model": compare(base_ref)}
    updates, _ = lora_updates(peft, {})
    with torch.no_grad():
        for key, (a, b) in updates.items():
            talker.get_parameter(key.removeprefix("talker.")).add_(torch.from_numpy(np.float32(scale) * (b @ a)))
    ref = build_reference(checkpoint, talker=talker, n_frames=n_frames, n_pred_frames=n_pred_frames)
    rows[f"{precision}, no pack, vs the merged model"] = compare(ref)  # what leaving the adapter out costs
    for t in types:
        pack = make_voice_pack(peft, bundle_dir, work / f"fidelity-{t}.voicepack", adapter_type=t)
        rows[f"{precision} + {t} adapter, vs the merged model"] = dict(
            compare(ref, (pack.talker_adapter, scale), (pack.predictor_adapter, scale)),
            adapter_bytes=pack.nbytes)
    return {"scale": scale, "talker_precision": precision, "n_frames": n_frames, "n_pred_frames": n_pred_frames,
            "kv_type": "f16", "rows": rows}


# ----------------------------------------------------------------------------------------------------------
# report


def run(bundle: Path, *, ranks: list[int], voices: int, frames: int, voice_frames: int, repeats: int, threads: int,
        adapter_type: str, update_size: float, fidelity_types: list[str], work: Path,
        timing: bool = True) -> dict[str, Any]:
    loadavg = _load()
    packs = make_packs(bundle, work, ranks, voices if timing else 0, adapter_type, update_size)
    spec = {"bundle": str(bundle), "frames": frames, "voice_frames": voice_frames, "repeats": repeats,
            "threads": threads, "packs": packs}
    timed: dict[str, Any] = {}
    if timing:
        (work / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        subprocess.run([sys.executable, "-m", "qwen3_tts_edge.bench.voice_packs", "--worker",
                        str(work / "spec.json"), str(work / "result.json")], check=True)
        timed = json.loads((work / "result.json").read_text(encoding="utf-8"))
    b = load_bundle(bundle, verify=False)
    talker = next(c.precision for c in b.manifest.find("talker") if c.format == "gguf")
    decoder = b.manifest.find("decoder")[0].precision
    one = bundle_bytes(b, talker, decoder)
    report: dict[str, Any] = {
        "bundle": str(bundle), "model": b.manifest.source.get("model"), "talker": talker, "decoder": decoder,
        "adapter_type": adapter_type, "update_size": update_size, "threads": threads, "frames": frames,
        "repeats": repeats, "loadavg_before_packs": loadavg, "machine": describe_machine(threads),
        "packs": {k: {kk: vv for kk, vv in v.items() if kk not in ("path", "peft")} for k, v in packs.items()},
        "bundle_bytes": one, **timed}
    if "many_voices" in timed:
        n = timed["many_voices"]["packs"]
        pack_bytes = sum(v["file_bytes"] for k, v in packs.items() if k.startswith("voice"))
        report["many_voices"]["vs_merged_bundles"] = {
            "packs_disk_bytes": one + pack_bytes, "bundles_disk_bytes": n * one,
            "packs_rss_mb": timed["many_voices"]["rss_total_mb"], "bundles_rss_mb": n * timed["bundle_rss_mb"]}
    if fidelity_types:
        report["fidelity"] = fidelity(bundle, Path(packs[f"rank{min(ranks)}"]["peft"]), fidelity_types, work,
                                      threads=threads)
    return report


def _fidelity_markdown(r: dict[str, Any]) -> str:
    lines: list[str] = []
    fid = r.get("fidelity")
    if fid:
        lines += [f"Fidelity at scale {fid['scale']:g} ({fid['n_frames']} teacher-forced frames, predictor on "
                  f"{fid['n_pred_frames']}, F16 KV cache as the runtime runs):", "",
                  "| configuration | adapters | talker logit cos | KL | top-1 | predictor logit cos | KL |",
                  "|---|---:|---|---|---|---|---|"]
        for label, v in fid["rows"].items():
            t, p = v["talker"], v["predictor"]
            size = f"{v['adapter_bytes'] / MB:.1f} MB" if v.get("adapter_bytes") else "—"
            lines.append(f"| {label} | {size} | {t['logit_cos']:.6f} | {t['kl']:.2e} | {t['top1']:.3f} | "
                         f"{p['logit_cos']:.6f} | {p['kl']:.2e} |")
    return "\n".join(lines) + ("\n" if lines else "")


def format_markdown(r: dict[str, Any]) -> str:
    if "ranks" not in r:
        return _fidelity_markdown(r)
    lines = [f"Voice packs on `{r['model']}` (talker {r['talker']}, decoder {r['decoder']}, adapters "
             f"{r['adapter_type']}, LoRA on every talker + code-predictor projection, {r['threads']} thread(s), "
             f"{r['frames']}-frame requests; medians of {r['repeats']} triples no pack / pack switched in / pack "
             f"kept, run back to back so each ratio compares requests under the same conditions). Load average "
             f"(1/5/15 min) {r['loadavg_start']} at the start of the timed run, {r['loadavg_end']} at its end: the "
             "machine is shared, absolute times are inflated; compare the ratios.", "",
             "| | " + " | ".join(f"rank {v['rank']}" for v in r["ranks"].values()) + " |",
             "|---|" + "---:|" * len(r["ranks"])]

    def row(label: str, fn) -> None:
        lines.append(f"| {label} | " + " | ".join(fn(k, v) for k, v in r["ranks"].items()) + " |")

    row("pack file", lambda k, v: f"{r['packs'][k]['file_bytes'] / MB:.1f} MB")
    row("adapter load (first use)", lambda k, v: f"{v['adapter_load_ms']:.0f} ms")
    row("resident memory added", lambda k, v: f"{v['rss_added_mb']:.1f} MB")
    row("time to first audio, no pack / pack", lambda k, v: f"{v['base_ttfa_ms']:.0f} / {v['ttfa_ms']:.0f} ms "
        f"({v['ttfa_ratio']:.2f}x)")
    row("real-time factor, no pack / pack",
        lambda k, v: f"{v['base_rtf']:.2f} / {v['rtf']:.2f} ({v['rtf_ratio']:.2f}x)")
    row("switch: the set call", lambda k, v: f"{v['switch_set_ms']:.2f} ms")
    row("switch: added to time to first audio", lambda k, v: f"{v['switch_added_ttfa_ms']:+.0f} ms")
    mv = r.get("many_voices")
    if mv:
        vs = mv["vs_merged_bundles"]
        n = mv["packs"]
        lines += ["", f"{n} voices ({n} rank-{r['packs']['voice0']['rank']} packs, round-robin, 3 rounds of "
                  f"{mv['frames']}-frame requests) on one bundle vs {n} merged bundles:", "",
                  "| | one bundle + packs | merged bundles |", "|---|---:|---:|",
                  f"| disk | {vs['packs_disk_bytes'] / MB:.0f} MB | {vs['bundles_disk_bytes'] / MB:.0f} MB |",
                  f"| resident memory | {vs['packs_rss_mb']:.0f} MB ({mv['rss_per_pack_mb']:.1f} MB per pack) | "
                  f"{vs['bundles_rss_mb']:.0f} MB ({r['bundle_rss_mb']} MB each) |",
                  f"| time to first audio | {mv['first_round_ttfa_ms']:.0f} ms first use, {mv['ttfa_ms']:.0f} ms "
                  f"after, another pack every request (set call {mv['switch_set_ms']:.2f} ms) | "
                  f"{mv['base_ttfa_ms']:.0f} ms (a loaded bundle, no pack) |"]
    fid = _fidelity_markdown(r)
    return "\n".join(lines) + "\n" + ("\n" + fid if fid else "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        spec = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
        Path(argv[2]).write_text(json.dumps(measure(spec)), encoding="utf-8")
        return 0
    p = argparse.ArgumentParser(prog="python -m qwen3_tts_edge.bench.voice_packs", description=__doc__.split("\n")[0])
    p.add_argument("-b", "--bundle", required=True, type=Path, help="a CustomVoice bundle with a GGUF talker")
    p.add_argument("--ranks", default="16,64", help="comma-separated LoRA ranks (default 16,64)")
    p.add_argument("--voices", type=int, default=10, help="packs in the many-voices run (default 10)")
    p.add_argument("--frames", type=int, default=25, help="frames per timed request (default 25: 2 s)")
    p.add_argument("--voice-frames", type=int, default=8, help="frames per many-voices request (default 8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--adapter-type", default="f16")
    p.add_argument("--update-size", type=float, default=0.1)
    p.add_argument("--fidelity", default="", help="adapter types to measure fidelity for, e.g. f32,f16,q8_0")
    p.add_argument("--work", type=Path, help="folder for the adapters and packs, kept and reused by later runs "
                   "with the same settings (default: a temporary one)")
    p.add_argument("--no-timing", action="store_true", help="fidelity only")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="voice-packs-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = run(args.bundle, ranks=[int(x) for x in args.ranks.split(",")], voices=args.voices,
                     frames=args.frames, voice_frames=args.voice_frames, repeats=args.repeats, threads=args.threads,
                     adapter_type=args.adapter_type, update_size=args.update_size,
                     fidelity_types=[t for t in args.fidelity.split(",") if t], work=work,
                     timing=not args.no_timing)
    text = format_markdown(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
