"""Voice packs in one batch: what a frame costs when the streams of a batch run different packs.

llama.cpp sets LoRA adapters per context, so streams under different adapter sets cannot share one decode. The
batch scheduler runs them as **grouped steps** (``runtime/engine/scheduler.py``): per frame, one talker decode
and one predictor batch per adapter group, the context's set switched between groups. This script measures,
at the engine level on a bundle's llama.cpp talker and predictor (random rank-``r`` adapters written with
gguf-py; only their shapes matter for speed):

- ``single``: N streams under one pack, one group (the batching the scheduler had before packs);
- ``mixed``: the same N streams under N different sets (``N - 1`` packs + the base model): N groups a frame,
  the set switched between them (one switch fewer per frame than groups: the groups alternate direction, so a
  frame starts with the set the last one ended with);
- ``split``: the same N one-stream decodes with no switch (what one context per group would cost, which also
  takes another ``n_ctx`` x N KV cache per group: its memory is reported too).

    python -m qwen3_tts_edge.bench.pack_batching artifacts/b06base --streams 3 --frames 20

Ratios measured in one run are what to compare; absolute times move with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..runtime.backends.llama_cpp.gguf_tables import GGUFTables
from ..runtime.bundle import load_bundle
from ..runtime.sampler import GREEDY

_MODULES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def random_adapter(model_gguf: Path, arch: str, rank: int, seed: int, work: Path, *, b_std: float = 1e-2) -> bytes:
    """A random LoRA GGUF adapter (f16) on every projection of ``model_gguf``'s layers (``b_std``: the spread of
    ``lora_b``, i.e. how far the update moves the outputs)."""
    import gguf

    rng = np.random.default_rng(seed)
    tables = GGUFTables(model_gguf)
    path = work / f"{arch}-{seed}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
    try:
        layer = 0
        while f"blk.{layer}.attn_q.weight" in tables:
            for m in _MODULES:
                name = f"blk.{layer}.{m}.weight"
                out, inp = tables.shape(name)
                w.add_tensor(name + ".lora_a", (rng.standard_normal((rank, inp)) / np.sqrt(inp)).astype(np.float16))
                w.add_tensor(name + ".lora_b", (rng.standard_normal((out, rank)) * b_std).astype(np.float16))
            layer += 1
    finally:
        tables.close()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--precision", default="q8_0")
    ap.add_argument("--streams", type=int, default=3)
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=80, help="positions prefilled per stream before the frames")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="each layout measured this many times, interleaved")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from ..runtime.backends.llama_cpp.predictor import CodePredictor
    from ..runtime.backends.llama_cpp.talker import Talker

    b = load_bundle(args.bundle)
    m, n = b.manifest, args.streams
    talker_path = b.root / m.component("talker", args.precision).file
    pred_path = b.root / m.component("predictor", args.precision).file
    tables_path = b.root / m.component("predictor_tables", args.precision).file
    talker = Talker(talker_path, n_threads=args.threads, sequences=n)
    t = m.model["talker"]  # one more context (per group) holds another KV cache of this size (f16)
    kv_bytes = 2 * 2 * t["num_hidden_layers"] * t["num_key_value_heads"] * t["head_dim"] * talker.n_ctx * n
    predictor = CodePredictor(pred_path, tables_path, n_threads=args.threads, sequences=n)
    with tempfile.TemporaryDirectory() as tmp:
        t_ad = [talker.load_adapter(random_adapter(talker_path, "qwen3tts", args.rank, s, Path(tmp)))
                for s in range(n - 1)]
        p_ad = [predictor.load_adapter(random_adapter(pred_path, "qwen3", args.rank, 100 + s, Path(tmp)))
                for s in range(n - 1)]
    sets_t = [[(a, 1.0)] for a in t_ad] + [[]]  # stream i runs set i (the last one: the base model)
    sets_p = [[(a, 1.0)] for a in p_ad] + [[]]

    rng = np.random.default_rng(0)
    h = talker.hidden_size
    scale = float(np.std(talker.text_embeds(np.arange(1000, 1100))))

    def rows(k: int) -> np.ndarray:
        return (rng.standard_normal((k, h)) * scale).astype(np.float32)

    def prefill() -> list[int]:
        for s in range(n):
            talker.seq_remove(s)
        for s in range(n):
            talker.set_adapters(sets_t[s])
            talker.decode_sequences([(s, 0, rows(args.prompt))])
        return [args.prompt] * n

    def frames(layout: str) -> list[float]:
        pos = prefill()
        times, order = [], list(range(n))
        if layout == "single":
            talker.set_adapters(sets_t[0])
            predictor.set_adapters(sets_p[0])
        for _ in range(args.frames):
            x = rows(n)
            t0 = time.perf_counter()
            if layout == "single":
                outs = talker.decode_sequences([(s, pos[s], x[s:s + 1]) for s in range(n)])
                predictor.predict_many([(o.hidden, int(np.argmax(o.logits)), GREEDY) for o in outs])
            else:
                outs = {}
                for s in order:
                    if layout == "mixed":
                        talker.set_adapters(sets_t[s])
                    outs[s] = talker.decode_sequences([(s, pos[s], x[s:s + 1])])[0]
                for s in reversed(order):  # the predictor's set from the talker's last group on
                    if layout == "mixed":
                        predictor.set_adapters(sets_p[s])
                    predictor.predict_many([(outs[s].hidden, int(np.argmax(outs[s].logits)), GREEDY)])
                order.reverse()
            times.append(time.perf_counter() - t0)
            pos = [p + 1 for p in pos]
        return times

    result: dict[str, list[float]] = {"single": [], "mixed": [], "split": []}
    frames("single")  # warm-up
    for r in range(args.rounds):
        for layout in result:
            result[layout] += frames(layout)
            print(f"round {r} {layout}: {1e3 * statistics.median(result[layout]):.1f} ms/frame", file=sys.stderr)
    # the switch alone: set A then decode one row vs the same decode with the set unchanged
    switch, same = [], []
    for s in range(n):
        talker.seq_remove(s)
    for _ in range(12):
        for lst, target in ((switch, 1), (same, 0)):
            talker.set_adapters(sets_t[0])
            talker.decode_sequences([(0, 0, rows(1))])
            talker.seq_remove(0)
            t0 = time.perf_counter()
            talker.set_adapters(sets_t[target])
            talker.decode_sequences([(0, 0, rows(1))])
            lst.append(time.perf_counter() - t0)
            talker.seq_remove(0)
    ms = {k: round(1e3 * statistics.median(v), 1) for k, v in result.items()}
    report = {
        "bundle": str(args.bundle), "precision": args.precision, "streams": n, "rank": args.rank,
        "threads": args.threads, "frames_each": args.frames * args.rounds, "prompt": args.prompt,
        "ms_per_frame_median": ms,
        "mixed_over_single": round(ms["mixed"] / ms["single"], 2),
        "split_over_single": round(ms["split"] / ms["single"], 2),
        "talker_switch_ms": round(1e3 * (statistics.median(switch) - statistics.median(same)), 1),
        "talker_kv_mb_per_context": round(kv_bytes / 1e6, 1),
        "load_avg": Path("/proc/loadavg").read_text().split()[:3],
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    predictor.close()
    talker.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
