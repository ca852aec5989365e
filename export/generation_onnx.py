"""Stage exporter for the ONNX Runtime generation engine: talker graph, fused predictor graph, tables.

``export --backend onnxruntime`` (or an ONNX precision in ``--talker``: ``fp32``, ``int8``, ``int4``) runs this
stage beside or instead of the GGUF one (``llama_gguf.export_llama``); a bundle can hold both engines, told
apart by the component format. The official talker is loaded once; the fp32 graphs are traced from it and
checked against it (``talker_onnx``, ``predictor_onnx``); int8 / int4 are weight-only MatMulNBits variants of
those graphs (``generation_quant``), checked against the same official modules and refused, not shipped, below
their gate (``quant.gates``). One tables file (fp32 rows, memory-mapped) serves every precision. Graphs over
1.5 GB keep their weights in one ``<graph>.data`` file, listed as an ``onnx_data`` component so the checksums
cover it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..quant import gates
from ..runtime.engine.specs import GENERATION_ENGINES

Progress = Callable[[str], None]


def check_predictor_forced(path: Path, talker: Any, *, frames: int = 4, seed: int = 0) -> dict[str, Any]:
    """A (quantised) predictor graph teacher-forced on the official greedy codes: logit cosine and top-1.

    Free-running codes of a quantised graph part ways with the official ones at the first flipped step, after
    which the logits answer different inputs; forcing the official codes compares like with like."""
    from ..runtime.backends.onnxruntime.generation import OnnxPredictor
    from .predictor_onnx import official_greedy_frame

    rng = np.random.default_rng(seed)
    eng = OnnxPredictor(path, threads=1)
    cos_min, agree, steps = 1.0, 0, 0
    for _ in range(frames):
        hidden = rng.standard_normal(talker.config.hidden_size).astype(np.float32)
        c0 = int(rng.integers(0, talker.code_predictor.config.vocab_size))
        want_codes, want_logits = official_greedy_frame(talker, hidden, c0)
        _, logits = eng.run(hidden, c0, forced=want_codes)
        cos = np.sum(logits * want_logits, -1) / (np.linalg.norm(logits, axis=-1) *
                                                  np.linalg.norm(want_logits, axis=-1))
        cos_min = min(cos_min, float(cos.min()))
        agree += int((logits.argmax(-1) == want_codes).sum())
        steps += len(want_codes)
    return {"frames": frames, "logit_cos_min": cos_min, "top1": agree / steps,
            "reference": "official code predictor (torch fp32), teacher-forced on its greedy codes"}


def export_onnx_generation(checkpoint_dir: Path, out_dir: Path, precisions: Sequence[str],
                           progress: Progress | None = None, *, step: Progress | None = None
                           ) -> list[dict[str, Any]]:
    """Write ``talker.P.onnx`` and ``predictor.P.onnx`` per precision and ``predictor_tables.fp32.npy``."""
    from .generation_quant import quantize_generation_graph, quantized_file_name
    from .predictor_onnx import export_predictor_onnx
    from .talker_onnx import check_talker, export_tables, export_talker_onnx, official_talker

    say = progress or (lambda _msg: None)
    done = step or (lambda _label: None)
    supported = GENERATION_ENGINES["onnxruntime"].precisions
    bad = [p for p in precisions if p not in supported]
    if bad:
        raise ValueError(f"unsupported ONNX generation precisions {bad}; choose from {', '.join(supported)}")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    talker = official_talker(Path(checkpoint_dir))
    say(f"onnx generation: official talker loaded in {time.perf_counter() - t0:.1f} s")
    # The fp32 graphs are the source of the quantised ones; shipped only when asked for.
    src = out_dir if "fp32" in precisions else Path(tempfile.mkdtemp(prefix=".onnx-fp32-", dir=out_dir))
    entries: list[dict[str, Any]] = []
    rejected: dict[str, str] = {}
    try:
        fp32 = [export_talker_onnx(talker, src / "talker.fp32.onnx", progress=say),
                export_predictor_onnx(talker, src / "predictor.fp32.onnx", progress=say)]
        if "fp32" in precisions:
            entries += _with_data_files(fp32, "fp32")
        done("onnx generation fp32")
        for p in (p for p in precisions if p != "fp32"):
            graphs = []
            for entry in fp32:
                name = quantized_file_name(entry["file"], p)
                say(f"{entry['role']}: weight-only {p} (MatMulNBits)")
                qmeta = quantize_generation_graph(src / entry["file"], out_dir / name, p)
                fid = (check_talker(out_dir / name, talker) if entry["role"] == "talker"
                       else check_predictor_forced(out_dir / name, talker))
                graphs.append({"role": entry["role"], "file": name, "format": "onnx", "precision": p,
                               "meta": {**{k: v for k, v in entry["meta"].items() if k != "files"},
                                        "files": qmeta["files"], "quantization": qmeta}, "fidelity": fid})
            misses = [f"{g['role']} {why}" for g in graphs
                      for why in gates.gate(g["role"], p).failures(g["fidelity"], speed=False)]
            if misses:
                rejected[p] = "; ".join(misses)
                say(f"onnx generation: {p} REFUSED, {rejected[p]}")
                for g in graphs:
                    for f in g["meta"]["files"]:
                        (out_dir / f).unlink(missing_ok=True)
            else:
                say(f"onnx generation: {p} passes its gate (" + ", ".join(
                    f"{g['role']} cos {g['fidelity']['logit_cos_min']:.5f}" for g in graphs) + ")")
                entries += _with_data_files(graphs, p)
            done(f"onnx generation {p}")
        tables = export_tables(talker, out_dir / "predictor_tables.fp32.npy", progress=say)
        tables["meta"].update(rejected=rejected, rejected_for="talker")  # graphs refused by their gate
        entries.append(tables)
    finally:
        if src != out_dir:
            shutil.rmtree(src, ignore_errors=True)
    return entries


def _with_data_files(graphs: list[dict[str, Any]], precision: str) -> list[dict[str, Any]]:
    """The graph entries plus an ``onnx_data`` entry for each external-weights file they use."""
    out = []
    for entry in graphs:
        out.append(entry)
        out += [{"role": "onnx_data", "file": f, "format": "onnx-data", "precision": precision,
                 "meta": {"graph": entry["file"]}} for f in entry["meta"].get("files", []) if f != entry["file"]]
    return out
