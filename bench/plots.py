"""Bench plots (matplotlib, imported lazily): one PNG with four panels.

(a) latency vs talker fidelity: RTF (median, min-max bars) against the talker's logit KL to the fp32 reference,
    one point per configuration, colour = talker precision, marker = decoder precision;
(b) decoder cost vs decoder fidelity: decoder ms per frame against the end-to-end log-mel distance to the
    official decode (or the decoder's own log-mel distance when no e2e figure exists);
(c) per-stage stacked bars: talker / predictor / decoder / host ms per frame, the reference included, with
    the talker + predictor bandwidth floor marked;
(d) time to first audio: every timed request of every configuration (box plot).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..runtime.errors import Qwen3TTSEdgeError
from .report import STAGES

COLOURS = {"f32": "#555555", "f16": "#1f77b4", "bf16": "#17becf", "q8_0": "#2ca02c", "q5_k_m": "#bcbd22",
           "q4_k_m": "#d62728", "torch-fp32": "#000000"}
MARKERS = {"fp32": "o", "fp16": "s", "int8": "^", "torch-fp32": "*"}
STAGE_COLOURS = {"talker": "#1f77b4", "predictor": "#ff7f0e", "decoder": "#2ca02c", "host": "#bbbbbb"}


def require_matplotlib() -> None:
    """Raise a one-line CLI error when matplotlib is missing (checked before any timing starts)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise Qwen3TTSEdgeError("--plot needs matplotlib: pip install 'qwen3-tts-edge[plot]' "
                                "(or pip install matplotlib)") from exc


def _label(r: dict[str, Any]) -> str:
    heads = r.get("predictor_heads")
    talker = r["talker"] + (f"+h{heads}" if heads and heads != "f32" else "")
    return f"{talker}/{r['decoder']}" + ("" if r.get("provider", "CPUExecutionProvider") in (
        "CPUExecutionProvider", "torch") else f" {r['provider'].replace('ExecutionProvider', '')}")


def _err(spread: dict[str, Any], median: float | None) -> list[list[float]]:
    if median is None or spread.get("min") is None:
        return [[0.0], [0.0]]
    return [[median - spread["min"]], [spread["max"] - median]]


def _fidelity_panel(ax, runs, ref, x_key: str, y_of, xlabel: str, ylabel: str, title: str) -> None:
    plotted = False
    for r in runs:
        y = y_of(r)
        x = r[x_key] if x_key != "decoder_ms" else r["ms_per_frame"]["decoder"]
        if y is None or x is None:
            continue
        spread = r["spread"]["rtf"] if x_key == "rtf" else r["spread"]["ms_per_frame"]["decoder"]
        ax.errorbar([x], [y], xerr=_err(spread, x), fmt=MARKERS.get(r["decoder"], "o"),
                    color=COLOURS.get(r["talker"], "#7f7f7f"), markersize=8, capsize=3, label=_label(r))
        plotted = True
    if ref is not None:
        x = ref[x_key] if x_key != "decoder_ms" else ref["ms_per_frame"]["decoder"]
        if x is not None:
            ax.axvline(x, color="black", linestyle="--", linewidth=1, label="PyTorch fp32 reference")
    if not plotted:
        ax.text(0.5, 0.5, "no fidelity figures\n(run with --vs-reference MODEL)", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """Write the four panels of ``report`` to ``path`` (PNG)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    runs, ref = report["runs"], report.get("reference")
    s = report["settings"]
    fig, axes = plt.subplots(2, 2, figsize=(15, 11))
    (a, b), (c, d) = axes

    def talker_kl(r):
        return (r.get("fidelity") or {}).get("talker", {}).get("kl")

    def decoder_mel(r):
        fid = r.get("fidelity") or {}
        return fid.get("e2e", {}).get("logmel_dist", fid.get("decoder", {}).get("logmel_dist"))

    _fidelity_panel(a, runs, ref, "rtf", talker_kl, "real-time factor (median, bars min-max; < 1 is faster than "
                    "real time)", "talker logit KL to fp32 reference", "(a) latency vs talker fidelity")
    _fidelity_panel(b, runs, ref, "decoder_ms", decoder_mel, "decoder ms per frame (median, bars min-max)",
                    "log-mel distance to the official decode (dB)", "(b) decoder cost vs decoder fidelity")

    rows = ([ref] if ref else []) + runs
    labels = [("reference" if r is ref else _label(r)) for r in rows]
    bottom = [0.0] * len(rows)
    for stage in STAGES:
        vals = [r["ms_per_frame"][stage] or 0.0 for r in rows]
        c.bar(range(len(rows)), vals, bottom=bottom, color=STAGE_COLOURS[stage], label=stage)
        bottom = [x + v for x, v in zip(bottom, vals, strict=True)]
    floors = report.get("floor_ms_per_frame", {})
    for i, r in enumerate(rows):
        if r is not ref and floors.get(r.get("variant", r["talker"])) is not None:
            c.plot([i - 0.4, i + 0.4], [floors[r.get("variant", r["talker"])]] * 2, color="black", linewidth=2,
                   label="talker+predictor bandwidth floor" if i == (1 if ref else 0) else None)
    frame_ms = 1000.0 / 12.5
    c.axhline(frame_ms, color="red", linestyle=":", linewidth=1, label=f"real time ({frame_ms:.0f} ms per frame)")
    c.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
    c.set_ylabel("ms per frame (median)")
    c.set_title("(c) per-stage cost per 80 ms frame (stages overlap: the decoder runs beside generation)",
                fontsize=10)
    c.legend(fontsize=7)
    c.grid(True, axis="y", alpha=0.3)

    data = [[x["ttfa_ms"] for x in r["samples"] if x["ttfa_ms"] is not None] for r in rows]
    d.boxplot(data, showfliers=True)
    d.set_xticks(range(1, len(rows) + 1), labels, rotation=45, ha="right", fontsize=8)
    d.set_ylabel("time to first audio (ms)")
    if ref and data and data[0] and max(data[0]) > 5 * max((max(x) for x in data[1:] if x), default=1):
        d.set_yscale("log")
    d.set_title(f"(d) time to first audio, every timed request ({s['repeats']} rounds x {len(s['texts'])} texts)",
                fontsize=10)
    d.grid(True, axis="y", alpha=0.3)

    frames = f"{s['frames']} forced frames" if s["frames"] else "natural lengths"
    fig.suptitle(f"qwen3-tts-edge bench: {report['bundle']['model']} - {frames}, {s['threads']} thread(s) - "
                 f"{report['machine']['cpu']}", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
