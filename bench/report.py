"""Bench report: bandwidth floor, aggregation of timed samples, fidelity per precision, tables.

Everything here is numpy + the runtime's own readers except :func:`fidelity_section`, which needs the export
extras (torch, qwen-tts) for the official reference and imports them lazily. Fidelity reuses the one
implementation of every metric: ``bench/parity_llama.parity`` (talker and code-predictor logits under teacher
forcing), ``export/decoder_onnx.parity_report`` (decoder SNR / log-mel against the fp32 stream) and
``export/decoder_onnx.fidelity_metrics`` over ``quant/metrics`` (end-to-end against the official decode).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.bundle import Bundle
from ..runtime.streaming import chunk_frames

SCHEMA = 2  # 2: stage "overhead" (a clipped residual) replaced by "host" (measured loop work)
STAGES = ("talker", "predictor", "decoder", "host")

# ----------------------------------------------------------------------------------------------------------
# the bandwidth floor


def _tensor_bytes(tables: Any, name: str, as_f32: bool = False) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    n = int(np.prod(tables.shape(name)))
    if as_f32:
        return 4 * n
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[tables.type_name(name)]]
    return n // block * size


def split_variant(variant: str) -> tuple[str, str | None]:
    """A generation variant ``P`` or ``P+H`` (talker precision P with the predictor's quantised heads H, e.g.
    ``q4_k_m+int8``) -> (P, H or None: the float32 heads)."""
    base, _, heads = variant.partition("+")
    return base, heads or None


def heads_component(bundle: Bundle, heads: str | None) -> Any:
    """The bundle's quantised predictor heads ``heads`` (None: none, the float32 heads in the tables)."""
    return None if heads is None else bundle.manifest.component("predictor_heads", heads)


def weight_bytes_per_frame(bundle: Bundle, precision: str) -> dict[str, int]:
    """Weight bytes one frame streams from memory with talker precision ``precision`` (a variant: ``P+int8``
    counts the int8 heads file instead of the float32 heads).

    talker: every tensor of the talker GGUF except ``token_embd`` (host-side row lookups only); predictor: its
    GGUF read once per llama call, 15 calls per frame (the 2-position prefill is one call); heads: the 15
    host-side heads, each applied once per frame, as the float32 arrays they are upcast to at load (plus the
    input projection where the model has one). Gathered table rows are not counted.
    """
    from ..runtime.backends.llama_cpp.gguf_tables import GGUFTables

    m = bundle.manifest
    precision, heads = split_variant(precision)
    out: dict[str, int] = {}
    with_tables = [("talker", "talker"), ("predictor", "predictor"), ("heads", "predictor_tables")]
    for key, role in with_tables:
        t = GGUFTables(bundle.path(m.component(role, precision)))
        try:
            if key == "talker":
                out[key] = sum(_tensor_bytes(t, n) for n in t.names if not n.startswith("token_embd."))
            elif key == "predictor":
                steps = int(m.audio.get("num_code_groups", 16)) - 1
                out["predictor_per_call"] = sum(_tensor_bytes(t, n) for n in t.names if not n.startswith("token_embd."))
                out[key] = steps * out["predictor_per_call"]
            else:
                names = [n for n in t.names if (n.startswith("lm_head.") and heads is None) or n == "proj.weight"]
                out[key] = sum(_tensor_bytes(t, n, as_f32=True) for n in names)
                if heads is not None:
                    out[key] += heads_component(bundle, heads).size
        finally:
            t.close()
    out["total"] = out["talker"] + out["predictor"] + out["heads"]
    return out


def decoder_calls(frames: int, schedule: Sequence[int]) -> int:
    """Decoder calls of a stream of ``frames`` frames on the chunk schedule (last size repeats; final flush)."""
    calls = done = 0
    while done < frames:
        done += chunk_frames(schedule, calls)
        calls += 1
    return calls


def floor_section(bundle: Bundle, talkers: Iterable[str], decoders: Iterable[str], bandwidth_gbs: float,
                  frames: int, schedule: Sequence[int]) -> dict[str, Any]:
    """Per talker precision: bytes per frame and bytes / bandwidth; decoder floors apart (file size per call)."""
    bw = bandwidth_gbs * 1e9
    talker = {}
    for p in talkers:
        if bundle.manifest.component("talker", split_variant(p)[0]).format != "gguf":
            # ONNX generation graphs hold the 15 steps' heads and tables beside the shared layers; without
            # splitting the initialisers per step there is no honest per-frame byte count, so no floor.
            talker[p] = {"floor_ms_per_frame": None, "note": "not computed for ONNX generation graphs"}
            continue
        b = weight_bytes_per_frame(bundle, p)
        talker[p] = {**{f"{k}_bytes": v for k, v in b.items()}, "floor_ms_per_frame": b["total"] / bw * 1e3}
    calls = decoder_calls(frames, schedule)
    decoder = {}
    for p in decoders:
        size = bundle.manifest.component("decoder", p).size
        decoder[p] = {"weight_bytes_per_call": size, "calls": calls, "frames": frames,
                      "floor_ms_per_frame": size * calls / frames / bw * 1e3}
    return {"bandwidth_gbs": bandwidth_gbs, "talker": talker, "decoder": decoder,
            "how": ("talker+predictor floor = (talker weights except token_embd + 15 x predictor weights + 15 host "
                    "heads as float32) / measured bandwidth; decoder floor = ONNX file size x decoder calls / frames "
                    "/ bandwidth (weights stream once per call; the decoder is compute-bound, so this bound is "
                    "loose)")}


# ----------------------------------------------------------------------------------------------------------
# aggregation


def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def stat(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """Median and spread of repeated measurements: min, max, (max - min) / median, count."""
    v = _finite(values)
    if not v:
        return {"median": None, "min": None, "max": None, "rel_spread": None, "n": 0}
    med = float(np.median(v))
    return {"median": med, "min": min(v), "max": max(v), "rel_spread": (max(v) - min(v)) / med if med else None,
            "n": len(v)}


def aggregate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the samples of one configuration's worker processes (rounds x texts) into medians and spreads."""
    samples = [dict(s, round=r) for r, res in enumerate(results) for s in res["samples"]]
    spread = {"ttfa_ms": stat(s["ttfa_ms"] for s in samples), "rtf": stat(s["rtf"] for s in samples),
              "cpu_ms_per_frame": stat(s["cpu_ms_per_frame"] for s in samples),
              "wall_ms_per_frame": stat(s["wall_ms_per_frame"] for s in samples)}
    per_stage = {k: stat(s["ms_per_frame"][k] for s in samples) for k in STAGES}
    spread["ms_per_frame"] = per_stage
    by_text: dict[str, Any] = {}
    for tid in dict.fromkeys(s["text"] for s in samples):
        mine = [s for s in samples if s["text"] == tid]
        by_text[tid] = {"ttfa_ms": stat(s["ttfa_ms"] for s in mine)["median"],
                        "rtf": stat(s["rtf"] for s in mine)["median"],
                        "prefill_ms": stat(s["prefill_ms"] for s in mine)["median"],
                        "frames": int(np.median([s["frames"] for s in mine]))}
    peaks = _finite(r.get("peak_rss_mb") for r in results)
    return {
        "ttfa_ms": spread["ttfa_ms"]["median"], "rtf": spread["rtf"]["median"],
        "ms_per_frame": {k: per_stage[k]["median"] for k in STAGES},
        "total_ms_per_frame": spread["wall_ms_per_frame"]["median"],
        "cpu_ms_per_frame": spread["cpu_ms_per_frame"]["median"],
        "peak_rss_mb": max(peaks) if peaks else None,
        "rss_after_load_mb": stat(r.get("rss_after_load_mb") for r in results)["median"],
        "load_s": stat(r.get("load_s") for r in results)["median"],
        "frames": int(np.median([s["frames"] for s in samples])) if samples else 0,
        "spread": spread, "by_text": by_text, "devices": results[0]["devices"] if results else {},
        "warnings": sorted({w for r in results for w in r.get("warnings", [])}),
        "samples": samples,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def vs_reference(run: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Every headline figure as run / reference (below 1 is better; None where the reference figure is 0)."""
    return {"ttfa": _ratio(run["ttfa_ms"], ref["ttfa_ms"]), "rtf": _ratio(run["rtf"], ref["rtf"]),
            "ms_per_frame": {k: _ratio(run["ms_per_frame"][k], ref["ms_per_frame"][k]) for k in STAGES},
            "total_ms_per_frame": _ratio(run["total_ms_per_frame"], ref["total_ms_per_frame"]),
            "peak_rss": _ratio(run["peak_rss_mb"], ref["peak_rss_mb"])}


def bundle_bytes(bundle: Bundle, talker: str | None, decoder: str) -> int:
    """Bytes on disk a deployment of one configuration needs: its files plus tokenizer and decoder state.

    The int8 calibration codes (shipped for re-calibration, never loaded by the runtime) are not counted.
    """
    m = bundle.manifest
    roles = {"text_tokenizer": None, "decoder_state": None, "decoder": decoder}
    extra = 0
    if talker is not None:
        talker, heads = split_variant(talker)
        extra = heads_component(bundle, heads).size if heads else 0
        tables = talker if m.find("predictor_tables", talker) else "fp32"  # ONNX graphs share the fp32 tables
        roles.update(talker=talker, predictor=talker, predictor_tables=tables, onnx_data=talker)
    total = extra
    for c in m.components:
        if c.role in roles and (roles[c.role] is None or c.precision == roles[c.role]):
            total += c.size
    return total


def refused(bundle: Bundle) -> list[dict[str, str]]:
    """Variants an export refused (a component's ``meta["rejected"]``), with the reason it recorded."""
    out = []
    for c in bundle.manifest.components:
        for precision, why in (c.meta.get("rejected") or {}).items():
            out.append({"role": c.meta.get("rejected_for", c.role), "precision": precision, "reason": str(why)})
    return out


# ----------------------------------------------------------------------------------------------------------
# fidelity


def manifest_fidelity(bundle: Bundle, talker: str, decoder: str) -> dict[str, Any]:
    """Fidelity recorded at export time (talker vs the bundle's F32 GGUF, decoder vs its fp32 / the offline decode)."""
    m = bundle.manifest
    talker, heads = split_variant(talker)
    t = next(iter(m.find("talker", talker)), None)
    d = next(iter(m.find("decoder", decoder)), None)
    tf = (t.meta.get("fidelity") if t else None) or {}
    df = (d.meta.get("fidelity") if d else None) or {}
    out: dict[str, Any] = {"source": "manifest (export-time gates, not the official reference)"}
    if t is not None and t.format == "onnx":
        out["talker"], out["predictor"] = onnx_generation_fidelity(bundle, talker)
    elif tf:
        out["talker"] = {k[len("talker_"):]: v for k, v in tf.items() if k.startswith("talker_")}
        out["predictor"] = {k[len("predictor_"):]: v for k, v in tf.items() if k.startswith("predictor_")}
        out["talker"]["vs"] = out["predictor"]["vs"] = tf.get("vs")
    if heads:
        out["predictor_heads"] = heads_component(bundle, heads).meta.get("fidelity")
    if df:
        out["decoder"] = {k: df.get(k) for k in ("snr_db", "logmel_dist", "cosine", "reference") if k in df}
    return out


def onnx_generation_fidelity(bundle: Bundle, precision: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Talker and predictor fidelity of ONNX generation graphs: their export checks against the official fp32
    modules on the same weights (logit cosine; predictor top-1 = greedy frames whose 15 codes all agree)."""
    m = bundle.manifest
    tf = m.component("talker", precision).meta.get("fidelity") or {}
    pf = m.component("predictor", precision).meta.get("fidelity") or {}
    vs = "official fp32 module (export check)"
    talker = {"logit_cos_min": tf.get("logit_cos_min"), "vs": vs}
    frames = pf.get("frames") or 0
    # fp32: greedy frames whose 15 codes all agree; int8/int4: teacher-forced per-step agreement
    top1 = pf.get("top1", pf["codes_equal"] / frames if frames and "codes_equal" in pf else None)
    predictor = {"logit_cos_min": pf.get("logit_cos_min"), "top1": top1, "vs": vs}
    return talker, predictor


def fidelity_section(checkpoint: Path, bundle: Bundle, talkers: Sequence[str], decoders: Sequence[str],
                     codes: np.ndarray | None, schedule: Sequence[int], threads: int, seed: int = 0,
                     progress=lambda msg: None) -> dict[str, Any]:
    """Per precision against the fp32 official model on the same weights (needs torch + qwen-tts).

    talker / predictor: ``parity_llama.parity`` (teacher-forced logits: cosine, KL, top-1 = code agreement);
    decoder: ``decoder_onnx.parity_report`` (each precision vs the fp32 stream; fp32 vs the official offline
    decode); e2e: one fixed code sequence (``codes``, the reference run's own first utterance, else seeded codes)
    decoded by each shipped decoder on the bench's chunk schedule vs the official offline decode of it.
    """
    from ..export import decoder_onnx as dx
    from .parity_llama import parity as llama_parity

    out: dict[str, Any] = {"talker": {}, "predictor": {}, "decoder": {}, "e2e": {}}
    bases = list(dict.fromkeys(split_variant(v)[0] for v in talkers))
    gguf = [p for p in bases if bundle.manifest.component("talker", p).format == "gguf"]
    if gguf:
        progress(f"fidelity: talker / code predictor logits under teacher forcing ({', '.join(gguf)})")
        heads = sorted({h for v in talkers if (h := split_variant(v)[1])})
        quant_heads = None
        if heads:  # one quantised heads precision exists (int8); its rows are P+int8
            from ..runtime.backends.llama_cpp import load_heads

            quant_heads = load_heads(bundle, heads[0])
        llama = llama_parity(checkpoint, bundle.root, gguf, n_threads=threads, seed=seed, heads=quant_heads)
        for p in llama:
            out["talker"][p], out["predictor"][p] = llama[p]["talker"], llama[p]["predictor"]
    for p in bases:
        if p not in gguf:
            out["talker"][p], out["predictor"][p] = onnx_generation_fidelity(bundle, p)
    if decoders:
        progress("fidelity: decoder SNR / log-mel per precision")
        out["decoder"] = dx.parity_report(checkpoint, bundle.root)["decoder"]
        decoder, config = dx.load_official_decoder(checkpoint)
        if codes is None or not len(codes):
            codes = dx.random_codes(100, seed + 4321, int(config.codebook_size), int(config.num_quantizers),
                                    stickiness=0.5)
            source = "seeded random codes (100 frames, stickiness 0.5)"
        else:
            source = f"the PyTorch reference's own codes for the first bench text ({len(codes)} frames)"
        codes = np.asarray(codes, dtype=np.int64)
        offline = dx.offline_decode(decoder, codes)
        sr = int(config.output_sample_rate)
        for p in decoders:
            pcm = dx.stream_decode(bundle.path(bundle.manifest.component("decoder", p)), codes, tuple(schedule))
            out["e2e"][p] = dx.fidelity_metrics(pcm, offline, offline, dx.OFFLINE_REFERENCE, sr)
        out["e2e_codes"] = source
    out["how"] = ("talker/predictor: bench/parity_llama.parity, teacher-forced trajectory vs the official fp32 torch "
                  "talker and code predictor (top-1 = agreement of the chosen code); decoder: "
                  "export/decoder_onnx.parity_report (fp16/int8 vs the fp32 ONNX stream, fp32 vs the official offline "
                  "decode); e2e: one fixed code sequence through each decoder on the bench chunk schedule vs the "
                  "official offline decode (with fixed codes the talker precision cannot change the audio)")
    return out


def run_fidelity(fid: dict[str, Any] | None, talker: str, decoder: str) -> dict[str, Any]:
    """The fidelity record of one configuration, picked from the per-precision sections."""
    if not fid:
        return {}
    keys = ("logit_cos", "logit_cos_min", "kl", "kl_max", "top1")
    out: dict[str, Any] = {}
    for stage in ("talker", "predictor"):
        if talker in fid.get(stage, {}):
            out[stage] = {k: fid[stage][talker][k] for k in keys if k in fid[stage][talker]}
    dkeys = ("snr_db", "logmel_dist", "cosine", "reference")
    if decoder in fid.get("decoder", {}):
        out["decoder"] = {k: fid["decoder"][decoder].get(k) for k in dkeys}
    if decoder in fid.get("e2e", {}):
        out["e2e"] = {k: fid["e2e"][decoder].get(k) for k in dkeys}
    return out


# ----------------------------------------------------------------------------------------------------------
# tables


def _f(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _x(v: float | None) -> str:
    return "" if v is None else f" ({v:.2f}x)"


def _sci(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1e}"


TABLE_NOTE = ("Medians over rounds x texts (spread in the JSON); (N.NNx) = this configuration / the PyTorch fp32 "
              "reference, below 1 is better. CPU ms/frame = process CPU time (all threads) per frame. talker KL, "
              "predictor top-1: teacher-forced logits vs the fp32 reference; dec. log-mel: decoder vs the fp32 "
              "stream (fp32: vs the official offline decode); e2e log-mel: a fixed code sequence vs the official "
              "decode; x floor: measured talker + predictor ms/frame / bandwidth floor.")


def markdown_table(report: dict[str, Any]) -> str:
    """The README table: one row per configuration (+ the reference), ratios to the reference in brackets."""
    head = ("| talker | decoder | provider | TTFA ms | RTF | ms/frame talker | predictor | decoder | host "
            "| CPU ms/frame | peak RSS MB | bundle MB | talker KL | pred. top-1 | dec. log-mel dB | e2e log-mel dB "
            "| x floor |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    ref = report.get("reference")
    rows = ([dict(ref, talker=ref["talker"], decoder=ref["decoder"], provider="torch")] if ref else [])
    rows += report["runs"]
    for r in rows:
        is_ref = r is rows[0] and ref is not None
        vs = r.get("vs_reference") or {}
        ms = r["ms_per_frame"]
        vms = vs.get("ms_per_frame") or {}
        fid = r.get("fidelity") or {}
        stages = " | ".join(f"{_f(ms[k], '.1f')}{_x(vms.get(k))}" for k in STAGES)
        lines.append(
            f"| {talker_label(r)} | {r['decoder']} | {r['provider']} | {_f(r['ttfa_ms'], '.0f')}{_x(vs.get('ttfa'))} "
            f"| {_f(r['rtf'], '.2f')}{_x(vs.get('rtf'))} | {stages} | {_f(r.get('cpu_ms_per_frame'), '.0f')} "
            f"| {_f(r['peak_rss_mb'], '.0f')}"
            f"{_x(vs.get('peak_rss'))} | {_f(r.get('bundle_mb'), '.0f')} "
            f"| {'fp32 ref' if is_ref else _sci(fid.get('talker', {}).get('kl'))} "
            f"| {'' if is_ref else _f(fid.get('predictor', {}).get('top1'), '.3f')} "
            f"| {'' if is_ref else _sci(fid.get('decoder', {}).get('logmel_dist'))} "
            f"| {'' if is_ref else _sci(fid.get('e2e', {}).get('logmel_dist'))} "
            f"| {'' if is_ref else _f(r.get('floor_ratio'), '.2f')} |")
    return "\n".join(lines)


def talker_label(run: dict[str, Any]) -> str:
    """``q4_k_m``, or ``q4_k_m + int8 heads`` for a run with the predictor's quantised heads."""
    heads = run.get("predictor_heads")
    return run["talker"] + (f" + {heads} heads" if heads and heads != "f32" else "")


def floor_table(report: dict[str, Any]) -> str:
    """Per talker precision: MB per frame, the bandwidth floor, the measured talker + predictor ms per frame."""
    floor = report["floor"]
    lines = [f"bandwidth {floor['bandwidth_gbs']:.1f} GB/s (best of the probes in this run)", "",
             "| talker | weights MB/frame (talker + 15 x predictor + heads) | floor ms/frame | measured talker + "
             "predictor ms/frame | x floor |", "|---|---|---|---|---|"]
    for p, f in floor["talker"].items():
        measured = report.get("measured_talker_predictor_ms", {}).get(p)
        if f["floor_ms_per_frame"] is None:
            lines.append(f"| {p} | {f.get('note', 'n/a')} | n/a | {_f(measured, '.1f')} | |")
            continue
        ratio = _ratio(measured, f["floor_ms_per_frame"])
        lines.append(f"| {p} | {f['total_bytes'] / 1e6:.0f} ({f['talker_bytes'] / 1e6:.0f} + "
                     f"{f['predictor_bytes'] / 1e6:.0f} + {f['heads_bytes'] / 1e6:.0f}) | "
                     f"{f['floor_ms_per_frame']:.1f} | {_f(measured, '.1f')} | {_f(ratio, '.2f')} |")
    for p, f in floor["decoder"].items():
        lines.append(f"| decoder {p} | {f['weight_bytes_per_call'] / 1e6:.0f} per call x {f['calls']} calls / "
                     f"{f['frames']} frames | {f['floor_ms_per_frame']:.1f} | "
                     f"{_f(report.get('measured_decoder_ms', {}).get(p), '.1f')} (decoder stage) | |")
    return "\n".join(lines)


def format_summary(report: dict[str, Any]) -> str:
    """Plain-text summary printed by ``bench`` (the markdown tables, which read fine in a terminal)."""
    s = report["settings"]
    frames = f"exactly {s['frames']} frames" if s["frames"] else "natural lengths"
    lines = [f"bench of {report['bundle']['path']}: {frames}, {s['repeats']} round(s) x {len(s['texts'])} texts, "
             f"{s['threads']} thread(s), seed {s['seed']}; warm-up excluded ({s['warmup']})",
             f"llama.cpp: {report.get('machine', {}).get('llama_cpp_system_info', 'n/a')}", "",
             markdown_table(report), "", TABLE_NOTE, "", floor_table(report)]
    if report.get("long_form"):
        from .long_form import markdown_table as long_table
        from .long_form import note, windows_table

        lf = report["long_form"]
        lines += ["", long_table(lf), "", note(lf), "", windows_table(lf)]
    for item in report.get("refused", []):
        lines.append(f"refused at export: {item['role']} {item['precision']}: {item['reason']}")
    for item in report.get("skipped", []):
        lines.append(f"skipped: {item}")
    return "\n".join(lines)
