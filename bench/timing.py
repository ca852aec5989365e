"""One benchmark configuration, timed in a process of its own (``python -m qwen3_tts_edge.bench.timing``).

Peak RSS is a process-wide high-water mark, so ``bench`` starts a fresh interpreter per configuration and
round: this module loads the bundle exactly as ``speak`` does (``TTS``), runs one warm-up request (excluded),
then times ``TTS.stream`` on every bench text with a fixed seed and reports ``StreamStats`` per request plus the
process's peak RSS (with ``long_form`` in the spec: the one long request of ``bench/long_form.py`` instead).
With ``reference`` set it runs the official PyTorch modules instead (fp32, the same checkpoint) through the
same ``TTS.stream`` loop: talker, code predictor and embedding tables are the ``export/torch_reference.py``
engines behind ``TTS.from_engines``; the decoder stage is the official codec decoder in torch fp32 with its
streaming state threaded by ``export/decoder_stateful.StatefulDecoder`` (the module the ONNX graph is exported
from), so every stage of the baseline is PyTorch and it streams on the same chunk schedule.

The spec and the result are JSON files (paths on the command line), so the parent never imports what the
worker loads. Torch is imported only in reference workers.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE_NAME = "torch-fp32"
REFERENCE_HOW = ("official qwen-tts PyTorch modules (fp32, eager attention) behind TTS.from_engines, through the "
                 "same TTS.stream frame loop, sampler and chunk schedule: export/torch_reference.py TorchTalker + "
                 "TorchPredictor + TorchTables; decoder stage = the official codec decoder in torch fp32, streamed "
                 "with its state carried by export/decoder_stateful.StatefulDecoder (the module the ONNX graph is "
                 "exported from)")


def _rss_mb() -> dict[str, float]:
    """Current and peak resident set size of this process in MB (/proc when available, else getrusage)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out["rss" if line.startswith("VmRSS") else "peak"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    if "peak" not in out:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak"] = peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
    return out


class TorchStreamingDecoder:
    """The official codec decoder (torch fp32) with the runtime decoder's streaming interface."""

    def __init__(self, decoder: Any):
        from ..export.decoder_stateful import StatefulDecoder

        self.official = decoder
        self.module = StatefulDecoder(decoder).eval()
        self.providers = [REFERENCE_NAME]
        self.capabilities: frozenset[str] = frozenset()
        self.reset()

    def reset(self) -> None:
        self._state = self.module.initial_state()

    def decode(self, codes: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.module(torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int64)), *self._state)
        self._state = list(out[1:])
        return out[0].numpy().astype(np.float32, copy=False)

    def prime(self, ref_codes: np.ndarray) -> None:
        self.reset()
        self.decode(np.asarray(ref_codes))


def _reference_tts(spec: dict[str, Any]):
    """A ``TTS`` whose every stage is the official PyTorch model (see the module docstring)."""
    import torch

    from ..export import torch_reference as ref
    from ..runtime.engine.config import EngineConfig
    from ..runtime.engine.contract import GenerationEngines
    from ..runtime.pipeline import TTS

    torch.set_num_threads(int(spec["threads"]))
    model = ref.load_official(spec["reference"])
    official_decoder = model.speech_tokenizer.model.decoder.float().eval()
    # The decoder is handed in ready, so the fp32 ONNX graph is never loaded and cannot inflate the reference's RSS.
    engines = GenerationEngines(ref.TorchTalker(model), ref.TorchPredictor(model), ref.TorchTables(model))
    tts = TTS.from_engines(engines, spec["bundle"], decoder=TorchStreamingDecoder(official_decoder),
                           name=REFERENCE_NAME, config=EngineConfig(threads=spec["threads"], verify=False))
    return tts, official_decoder


def _options(spec: dict[str, Any], text: dict[str, Any], frames: int | None):
    from ..runtime.pipeline import SpeakOptions

    kw: dict[str, Any] = {"language": text["language"], "speaker": spec.get("speaker"),
                          "instruct": spec.get("instruct"), "seed": int(spec["seed"]),
                          "chunk_frames": tuple(spec["chunk_frames"])}
    if frames is not None:  # exactly ``frames`` frames: EOS held back and every other stop rule out of the way
        kw.update(min_frames=frames, max_frames=frames, frames_per_text_token=None)
    return SpeakOptions(**kw)


def _one(tts, text: dict[str, Any], options) -> tuple[dict[str, Any], np.ndarray]:
    cpu0 = time.process_time()
    codes = []
    stream = tts.stream(text["text"], options)
    for chunk in stream:
        if chunk.codes is not None and len(chunk.codes):
            codes.append(chunk.codes)
    cpu = time.process_time() - cpu0
    st = stream.stats
    n = max(st.frames, 1)
    sample = {
        "text": text["id"], "frames": st.frames, "audio_s": st.audio_s, "total_ms": st.total_s * 1e3,
        "ttfa_ms": None if st.ttfa_s is None else st.ttfa_s * 1e3, "rtf": st.rtf, "prefill_ms": st.prefill_ms,
        "ms_per_frame": st.per_frame_ms(), "wall_ms_per_frame": st.total_s * 1e3 / n, "cpu_ms_per_frame": cpu * 1e3 / n,
        "stop_reason": st.stop_reason,
    }
    return sample, (np.concatenate(codes) if codes else np.zeros((0, 16), np.int64))


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one configuration, warm it up, time every text; the result record (see bench/README.md)."""
    from ..runtime.engine.config import EngineConfig
    from ..runtime.pipeline import TTS

    caught: list[str] = []

    def keep(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001 - showwarning signature
        text = f"{category.__name__}: {message}"
        if text not in caught:
            caught.append(text)

    warnings.showwarning = keep
    t0 = time.perf_counter()
    official_decoder = None
    if spec.get("reference"):
        tts, official_decoder = _reference_tts(spec)
    else:
        # The run's EngineConfig (bench flags), with this configuration's precisions and provider.
        engine = spec.get("engine") or {"threads": spec["threads"], "decoder_threads": spec.get("decoder_threads") or 1,
                                        "n_gpu_layers": int(spec.get("n_gpu_layers", 0)), "verify": False}
        tts = TTS(spec["bundle"], EngineConfig(**engine), talker_precision=spec["talker"],
                  decoder_precision=spec["decoder"], providers=[spec["provider"]])
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    texts, frames = spec["texts"], spec.get("frames")
    warm = int(spec["warmup_frames"])
    _one(tts, texts[0], _options(spec, texts[0], warm))  # warm-up: pages weights in, plans the decoder; excluded
    if spec.get("long_form"):  # bench --long-form: this process speaks the one long request instead of the texts
        from .long_form import run as run_long

        return {"load_s": load_s, "rss_after_load_mb": rss_loaded.get("rss"), "devices": tts.devices(),
                "talker_precision": tts.talker_precision, "decoder_precision": tts.decoder_precision,
                "warmup": {"text": texts[0]["id"], "frames": warm}, **run_long(tts, spec, _rss_mb),
                "warnings": caught, "peak_rss_mb": _rss_mb()["peak"]}
    samples, first_codes = [], None
    for text in texts:
        sample, codes = _one(tts, text, _options(spec, text, frames))
        samples.append(sample)
        if first_codes is None:
            first_codes = codes
    result: dict[str, Any] = {
        "load_s": load_s, "rss_after_load_mb": rss_loaded.get("rss"), "devices": tts.devices(),
        "talker_precision": tts.talker_precision, "decoder_precision": tts.decoder_precision,
        "warmup": {"text": texts[0]["id"], "frames": warm}, "samples": samples, "warnings": caught,
    }
    if official_decoder is not None:
        from ..export.decoder_onnx import offline_decode

        # What the official (non-streaming) qwen-tts generate does after the loop: one decoder forward.
        offline_decode(official_decoder, first_codes[:2])  # warm-up
        t = time.perf_counter()
        offline_decode(official_decoder, first_codes)
        result["offline_decode_ms_per_frame"] = (time.perf_counter() - t) * 1e3 / max(len(first_codes), 1)
    if spec.get("return_codes"):
        result["codes"] = first_codes.tolist()
    result["peak_rss_mb"] = _rss_mb()["peak"]
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m qwen3_tts_edge.bench.timing SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result = run(spec)
    Path(argv[1]).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
