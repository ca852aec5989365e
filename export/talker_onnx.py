"""Talker → ONNX fp32 with an explicit KV cache, plus the host-side embedding tables of the ONNX engines.

The graph is built from the official modules (``load_official_talker``): the talker's own decoder layers,
multi-section rotary embedding, final norm and codec head. Only the glue of ``Qwen3TTSTalkerModel.forward``
is rewritten, because HF's ``DynamicCache`` and mask factory do not trace into a graph: the cache becomes
explicit ``past_*`` inputs / ``present_*`` outputs (a duck-typed cache object the official attention
updates) and the causal mask is built from the two lengths. One graph serves prefill (past length 0),
extends and single steps; the engine keeps the cache as numpy arrays between runs
(``runtime/backends/onnxruntime/generation.py``).

Graph I/O (format 2; B rows, each its own sequence): ``inputs_embeds`` (B, T, H) f32; ``position_ids``
(3, B, T) int64 — one row per MRoPE section; for a text-like sequence all three are ``n_past .. n_past+T-1``
(the official ``get_rope_index`` does the same); ``attention_mask`` (B, P+T) int64, 1 where a key position holds
the row's own past or input, 0 for padding; ``past_key_i`` / ``past_value_i`` (B, kv_heads, P, head_dim) f32 per
layer. Outputs: ``logits`` (B, vocab) and ``hidden`` (B, H), both of the last position (``hidden`` is
final-normed, what the code predictor takes), and ``present_key_i`` / ``present_value_i`` (B, kv_heads, P+T,
head_dim). Rows of different lengths are left-padded (past and input) so every row's last input is the last
column; padded keys are masked, so a row computes what it computes alone (up to the rounding of a longer sum:
the batching tests' near-tie rule). Format 1 graphs (B = 1, no ``attention_mask``) still load, unbatched.

The tables file (``predictor_tables.fp32.npy``) is one (rows, H) float32 matrix, memory-mappable:
text rows with ``text_projection`` applied, then the talker codec rows, then the 15 residual codebook tables
(the same [text | codec] order as the upstream talker GGUF's ``token_embd``). Sizes come from the graphs'
metadata, so the runtime needs no config.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..quant import gates
from ..runtime.bundle import GENERATION_METADATA_KEY
from .torch_reference import load_official_talker

OPSET = 18
TALKER_FILE = "talker.fp32.onnx"
TABLES_FILE = "predictor_tables.fp32.npy"
METADATA_KEY = GENERATION_METADATA_KEY  # JSON record in the graph's metadata_props (sizes the runtime needs)
FORMAT_VERSION = 2  # 2: a batch axis (talker attention_mask, predictor rows); the runtime reads 1 and 2
TRACE_B, TRACE_T, TRACE_PAST = 2, 3, 2  # none 0 or 1, so the tracer cannot specialise a size
TEXT_ROWS_PER_CHUNK = 8192


class ExplicitCache:
    """Stands in for a transformers ``Cache`` inside the official attention: ``update`` appends to a given past.

    ``past`` holds key, value per layer (None = empty); after a forward ``present`` holds the concatenations.
    ``advance`` makes them the next call's past (the code predictor's in-graph loop).
    """

    def __init__(self, past: Sequence[Any]) -> None:
        self.past = list(past)
        self.present: list[Any] = [None] * len(self.past)

    def update(self, key: Any, value: Any, layer_idx: int, cache_kwargs: Any = None) -> tuple[Any, Any]:
        import torch

        pk, pv = self.past[2 * layer_idx], self.past[2 * layer_idx + 1]
        k = key if pk is None else torch.cat([pk, key], dim=2)
        v = value if pv is None else torch.cat([pv, value], dim=2)
        self.present[2 * layer_idx], self.present[2 * layer_idx + 1] = k, v
        return k, v

    def advance(self) -> None:
        self.past, self.present = self.present, [None] * len(self.present)


def causal_mask(q_len: Any, past_len: Any, dtype: Any) -> Any:
    """Additive (1, 1, T, P+T) mask: query i sees keys 0..P+i (the value HF's eager mask uses, not -inf)."""
    import torch

    q = torch.arange(q_len) + past_len
    k = torch.arange(past_len + q_len)
    blocked = k[None, :] > q[:, None]
    return torch.where(blocked, torch.finfo(dtype).min, 0.0).to(dtype)[None, None]


def padded_causal_mask(valid: Any, q_len: Any, dtype: Any) -> Any:
    """Additive (B, 1, T, P+T) mask: causal as :func:`causal_mask`, and no row sees its padded keys (``valid`` 0)."""
    import torch

    total = valid.shape[1]
    q = torch.arange(q_len) + (total - q_len)
    k = torch.arange(total)
    blocked = (k[None, :] > q[:, None])[None] | (valid[:, None, :] == 0)
    return torch.where(blocked, torch.finfo(dtype).min, 0.0).to(dtype)[:, None]


@contextlib.contextmanager
def eager_attention(*configs: Any) -> Iterator[None]:
    """Run the official attention in its eager form (plain matmul + softmax) while tracing, then restore."""
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = "eager"
        yield
    finally:
        for c, v in zip(configs, saved, strict=True):
            c._attn_implementation = v


def _talker_graph(talker: Any) -> Any:
    import torch

    class TalkerGraph(torch.nn.Module):
        """The official talker backbone + codec head over an explicit KV cache (see the module docstring)."""

        def __init__(self) -> None:
            super().__init__()
            self.layers = talker.model.layers
            self.rotary = talker.model.rotary_emb
            self.norm = talker.model.norm
            self.head = talker.codec_head

        def forward(self, inputs_embeds, position_ids, attention_mask, *past):
            cache = ExplicitCache(past)
            mask = padded_causal_mask(attention_mask, inputs_embeds.shape[1], inputs_embeds.dtype)
            rope = self.rotary(inputs_embeds, position_ids)
            h = inputs_embeds
            for layer in self.layers:
                h = layer(h, attention_mask=mask, position_ids=position_ids[0], past_key_values=cache,
                          use_cache=True, position_embeddings=rope)[0]
            hidden = self.norm(h[:, -1])
            return (self.head(hidden), hidden, *cache.present)

    return TalkerGraph().eval()


def kv_names(n_layers: int, kind: str) -> list[str]:
    """``past``/``present`` tensor names in graph order: key_0, value_0, key_1, ..."""
    return [f"{kind}_{part}_{i}" for i in range(n_layers) for part in ("key", "value")]


EXTERNAL_DATA_BYTES = 1_500_000_000  # above this the weights go to one "<file>.data" beside the graph (2 GB cap)


def export_graph(module: Any, args: tuple[Any, ...], out_path: Path, meta: dict[str, Any], doc: str,
                 **export_kwargs: Any) -> list[str]:
    """TorchScript-export ``module`` and store ``meta`` (plus the format version) in the graph; return its files.

    The exporter writes large models as one external file per tensor; the graph is re-saved here with the
    metadata and, when big, with all weights in one ``<name>.data`` file, so a bundle lists at most two files.
    """
    import tempfile

    import onnx
    import torch

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".onnx-export-") as tmp:
        raw = Path(tmp) / out_path.name
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic, expected here
            torch.onnx.export(module, args, str(raw), dynamo=False, **export_kwargs)
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
        model = onnx.load(str(raw))
        del model.metadata_props[:]
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(dict(meta, format_version=FORMAT_VERSION),
                                                          sort_keys=True)
        model.doc_string = doc
        data = out_path.with_name(out_path.name + ".data")
        data.unlink(missing_ok=True)
        if size > EXTERNAL_DATA_BYTES:
            onnx.save(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=data.name, size_threshold=1024)
            return [out_path.name, data.name]
        onnx.save(model, str(out_path))
        return [out_path.name]


def official_talker(model_or_checkpoint_dir: Any) -> Any:
    """The official talker from a checkpoint folder, or an already loaded model / talker (made fp32 + eval in place)."""
    if isinstance(model_or_checkpoint_dir, str | Path):
        return load_official_talker(Path(model_or_checkpoint_dir))[0]
    talker = getattr(model_or_checkpoint_dir, "talker", model_or_checkpoint_dir)
    if not hasattr(talker, "codec_head"):
        raise TypeError(f"expected a checkpoint folder, an official Qwen3-TTS model or its talker, got "
                        f"{type(model_or_checkpoint_dir).__name__}")
    return talker.float().eval()


def talker_meta(talker: Any) -> dict[str, Any]:
    c = talker.config
    return {"graph": "talker", "hidden_size": int(c.hidden_size), "num_layers": int(c.num_hidden_layers),
            "num_kv_heads": int(c.num_key_value_heads), "head_dim": int(c.head_dim),
            "codec_vocab_size": int(c.vocab_size), "text_vocab_size": int(c.text_vocab_size),
            "mrope_sections": 3,  # the official rotary embedding always takes (3, B, T) positions
            "batch_axis": True}  # graph format 2: rows of several sequences (runtime/engine/assemble.batches)


def export_talker_onnx(model_or_checkpoint_dir: Any, out_path: Path | str, *, opset: int = OPSET,
                       check: bool = True, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the talker graph to ``out_path``; return its manifest entry (role ``talker``, format ``onnx``).

    With ``check`` the graph is run in onnxruntime along a prompt + steps with a rewind and compared with the
    official module (``fidelity``); a miss of its ``quant.gates`` row is an export bug and raises RuntimeError.
    """
    import torch

    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    talker = official_talker(model_or_checkpoint_dir)
    meta = talker_meta(talker)
    n_layers, kvh, hd, hid = meta["num_layers"], meta["num_kv_heads"], meta["head_dim"], meta["hidden_size"]
    out_path = Path(out_path)
    say(f"talker: exporting the fp32 ONNX graph ({n_layers} layers, H {hid})")
    x = torch.zeros(TRACE_B, TRACE_T, hid)
    pos = torch.arange(TRACE_PAST, TRACE_PAST + TRACE_T).view(1, 1, -1).expand(3, TRACE_B, -1).contiguous()
    valid = torch.ones(TRACE_B, TRACE_PAST + TRACE_T, dtype=torch.int64)
    past = [torch.zeros(TRACE_B, kvh, TRACE_PAST, hd) for _ in range(2 * n_layers)]
    past_names, present_names = kv_names(n_layers, "past"), kv_names(n_layers, "present")
    axes: dict[str, dict[int, str]] = {"inputs_embeds": {0: "B", 1: "T"}, "position_ids": {1: "B", 2: "T"},
                                       "attention_mask": {0: "B", 1: "total"}, "logits": {0: "B"},
                                       "hidden": {0: "B"}}
    axes.update({n: {0: "B", 2: "past"} for n in past_names})
    axes.update({n: {0: "B", 2: "total"} for n in present_names})
    with torch.no_grad(), eager_attention(talker.config):
        files = export_graph(_talker_graph(talker), (x, pos, valid, *past), out_path, meta,
                             "Qwen3-TTS talker (codec head, final-normed hidden) with explicit KV cache, fp32",
                             opset_version=opset,
                             input_names=["inputs_embeds", "position_ids", "attention_mask", *past_names],
                             output_names=["logits", "hidden", *present_names], dynamic_axes=axes)
    entry: dict[str, Any] = {"role": "talker", "file": out_path.name, "format": "onnx", "precision": "fp32",
                             "meta": dict(meta, files=files), "fidelity": {}}
    if check:
        entry["fidelity"] = check_talker(out_path, talker)
        f = entry["fidelity"]
        failures = gates.gate("talker", "fp32").failures(f, speed=False)
        if failures:
            raise RuntimeError(f"talker ONNX does not match the official module: {'; '.join(failures)} ({f})")
        say(f"talker: fp32 ok, logit cosine {f['logit_cos_min']:.7f}, hidden max |Δ| {f['hidden_max_abs']:.1e}")
    say(f"talker: done ({time.perf_counter() - t0:.0f} s)")
    return entry


def check_talker(path: Path, talker: Any, *, n_prompt: int = 9, n_steps: int = 4, seed: int = 0) -> dict[str, Any]:
    """ORT engine vs one official forward over the whole sequence: prefill, extend, steps, a rewind."""
    import torch

    from ..runtime.backends.onnxruntime.generation import OnnxTalker

    rng = np.random.default_rng(seed)
    hid = talker.config.hidden_size
    seq = rng.standard_normal((n_prompt + 2 + n_steps, hid)).astype(np.float32)
    with torch.no_grad(), eager_attention(talker.config):
        h = talker.model(inputs_embeds=torch.from_numpy(seq)[None]).last_hidden_state[0]
        ref_logits, ref_hidden = talker.codec_head(h).numpy(), h.numpy()
    eng = OnnxTalker(path, threads=1)
    outs = {n_prompt - 1: eng.prefill(seq[:n_prompt]), n_prompt + 1: eng.extend(seq[n_prompt:n_prompt + 2])}
    eng.step(seq[n_prompt + 2])
    eng.rewind(n_prompt + 2)  # drop that step and redo it
    for i in range(n_prompt + 2, seq.shape[0]):
        outs[i] = eng.step(seq[i])
    idx = sorted(outs)
    got_l = np.stack([outs[i].logits for i in idx])
    got_h = np.stack([outs[i].hidden for i in idx])
    ref_l = ref_logits[idx]
    cos = np.sum(got_l * ref_l, -1) / (np.linalg.norm(got_l, axis=-1) * np.linalg.norm(ref_l, axis=-1))
    dh = float(np.abs(got_h - ref_hidden[idx]).max())
    return {"logit_cos_min": float(cos.min()), "hidden_max_abs": dh,
            "hidden_rel_max_abs": dh / max(1.0, float(np.abs(ref_hidden).max())), "positions": len(idx),
            "reference": "official talker.model + codec_head (torch fp32), one forward"}


# ----------------------------------------------------------------------------------------------------------
# host tables


def table_layout(text_vocab: int, codec_vocab: int, num_steps: int, codebook: int) -> dict[str, int]:
    """Row offsets of the three blocks in the tables matrix (the runtime derives the same from graph metadata)."""
    return {"text": 0, "codec": text_vocab, "residual": text_vocab + codec_vocab,
            "rows": text_vocab + codec_vocab + num_steps * codebook}


def export_tables(model_or_checkpoint_dir: Any, out_path: Path | str, *,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the (rows, H) float32 tables matrix (see the module docstring); return its manifest entry.

    P(x) = text_projection(text_embedding(x)) is precomputed for the whole text vocabulary (in chunks, so the
    export's memory stays bounded); the file is written through a memory map for the same reason.
    """
    import torch

    say = progress or (lambda _msg: None)
    talker = official_talker(model_or_checkpoint_dir)
    c = talker.config
    hid, tv, cv = int(c.hidden_size), int(c.text_vocab_size), int(c.vocab_size)
    res = talker.code_predictor.get_input_embeddings()
    steps, cb = len(res), int(res[0].weight.shape[0])
    lay = table_layout(tv, cv, steps, cb)
    out_path = Path(out_path)
    say(f"tables: {lay['rows']} x {hid} float32 ({lay['rows'] * hid * 4 / 2**20:.0f} MiB)")
    out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=(lay["rows"], hid))
    text = talker.get_text_embeddings().weight
    with torch.no_grad():
        for a in range(0, tv, TEXT_ROWS_PER_CHUNK):
            b = min(tv, a + TEXT_ROWS_PER_CHUNK)
            out[a:b] = talker.text_projection(text[a:b].float()).numpy()
        out[lay["codec"]:lay["residual"]] = talker.get_input_embeddings().weight.float().numpy()
        for j, table in enumerate(res):
            start = lay["residual"] + j * cb
            out[start:start + cb] = table.weight.float().numpy()
    out.flush()
    del out
    meta = {"layout": "[text_projection(text) | talker codec | residual tables 1..15] rows", **lay,
            "hidden_size": hid, "text_vocab_size": tv, "codec_vocab_size": cv, "num_steps": steps,
            "codebook_size": cb}
    return {"role": "predictor_tables", "file": out_path.name, "format": "npy", "precision": "fp32", "meta": meta}
