"""ONNX Runtime talker and fused code predictor (torch-free), with their host-side embedding tables.

The talker graph (``export/talker_onnx.py``) takes an explicit KV cache; :class:`OnnxTalker` keeps it as
numpy arrays between ``session.run`` calls, so a rewind is a slice. The predictor graph
(``export/predictor_onnx.py``) runs all 15 dependent steps of a frame — KV cache, heads and sampling
included — in one ``session.run``: the 15 separate calls per frame of the llama.cpp predictor cost little on a
CPU (bench/README, the engines side by side) but are the point of fusing on GPU execution providers. Sampling
in the graph takes the frame's ``ResidualSampling`` (parameters and 15 numbers of the seeded residual stream,
drawn up front); a host chooser in it gets a per-step path instead (15 teacher-forced runs). Sizes come from
the graphs' metadata, never from constants here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ...bundle import GENERATION_METADATA_KEY as METADATA_KEY
from ...bundle import Bundle
from ...engine.contract import KV_STATE, GenerationEngines, Placement, StepOutput, checked_ids, split_frame_codes
from ...sampler import GREEDY, ResidualSampling
from .providers import open_inference_session

SUPPORTED_FORMAT = 1
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider",
                 "DmlExecutionProvider", "CoreMLExecutionProvider")


class OnnxEngineError(RuntimeError):
    """A generation graph or tables file that this runtime cannot use (wrong file, stale export)."""


def open_session(path: Path | str, *, threads: int | None = None, providers: Sequence[str] | None = None
                 ) -> tuple[ort.InferenceSession, dict[str, Any]]:
    """An inference session for one of our generation graphs and its metadata record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX graph at {path}")
    session = open_inference_session(path, threads=threads, providers=providers)
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise OnnxEngineError(f"{path.name} is not a qwen3-tts-edge generation graph (metadata {METADATA_KEY!r} "
                              "missing)")
    meta = json.loads(raw)
    if meta.get("format_version") != SUPPORTED_FORMAT:
        raise OnnxEngineError(f"{path.name}: graph format {meta.get('format_version')} is not supported "
                              f"(expected {SUPPORTED_FORMAT}); re-export it")
    return session, meta


def _placement(session: ort.InferenceSession) -> Placement:
    active = tuple(session.get_providers())
    gpu = next((p for p in active if p in GPU_PROVIDERS), None)
    return Placement(device="gpu" if gpu else "cpu", note=f"onnxruntime {', '.join(active)}", devices=active)


def _expect(meta: dict[str, Any], graph: str, path: Path | str) -> None:
    if meta.get("graph") != graph:
        raise OnnxEngineError(f"{Path(path).name} is a {meta.get('graph')!r} graph, expected a {graph!r} graph")


class OnnxTalker:
    """The talker graph with its KV cache held on the host: ``prefill``, ``extend``, ``step``, ``rewind``.

    ``n_ctx`` bounds the cached positions (None: unbounded, up to the model's position range).
    """

    capabilities = frozenset({KV_STATE})  # the KV cache is host arrays: a rewind is a slice

    def __init__(self, path: Path | str, *, threads: int | None = None, providers: Sequence[str] | None = None,
                 n_ctx: int | None = None) -> None:
        self.path = Path(path)
        self.session, self.metadata = open_session(path, threads=threads, providers=providers)
        _expect(self.metadata, "talker", path)
        m = self.metadata
        self.hidden_size = int(m["hidden_size"])
        self.codec_vocab_size = int(m["codec_vocab_size"])
        self.num_layers = int(m["num_layers"])
        self._sections = int(m.get("mrope_sections", 3))
        self._kv_shape = (1, int(m["num_kv_heads"]), 0, int(m["head_dim"]))
        self._past_names = [f"past_{p}_{i}" for i in range(self.num_layers) for p in ("key", "value")]
        self._outputs = ["logits", "hidden"] + [f"present_{p}_{i}" for i in range(self.num_layers)
                                                for p in ("key", "value")]
        if n_ctx is not None and n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1 or None, got {n_ctx}")
        self._n_ctx = n_ctx
        self.placement = _placement(self.session)
        self.calls = 0
        self.decode_s = 0.0
        self.reset()

    @property
    def n_past(self) -> int:
        return int(self._past[0].shape[2])

    @property
    def n_ctx(self) -> int | None:
        return self._n_ctx

    def reset(self) -> None:
        """Forget the sequence (empty KV cache)."""
        self._past = [np.zeros(self._kv_shape, dtype=np.float32) for _ in self._past_names]

    def rewind(self, n_past: int) -> None:
        """Keep only the first ``n_past`` cached positions (e.g. to reuse a cached prompt prefix)."""
        if not 0 <= n_past <= self.n_past:
            raise ValueError(f"cannot rewind to {n_past}: {self.n_past} positions are cached")
        self._past = [np.ascontiguousarray(kv[:, :, :n_past]) for kv in self._past]

    def save_state(self) -> tuple[int, np.ndarray]:
        """The KV of the positions so far as (n_past, one array), restorable with ``load_state`` (prefix cache)."""
        return self.n_past, np.stack([kv[0] for kv in self._past])

    def load_state(self, state: tuple[int, np.ndarray]) -> None:
        n_past, kv = state
        want = (len(self._past_names), self._kv_shape[1], n_past, self._kv_shape[3])
        if kv.shape != want:
            raise ValueError(f"saved talker state has shape {kv.shape}, this talker needs {want}")
        self._past = [np.ascontiguousarray(x[None], dtype=np.float32) for x in kv]

    def prefill(self, embeds: np.ndarray) -> StepOutput:
        """Start a new sequence with the prompt ``embeds`` (n, H); outputs of its last position."""
        self.reset()
        return self.extend(embeds)

    def extend(self, embeds: np.ndarray) -> StepOutput:
        """Append positions (n, H) after the cached ones; outputs of the last one."""
        x = np.ascontiguousarray(embeds, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.hidden_size or x.shape[0] == 0:
            raise ValueError(f"expected embeddings of shape (n >= 1, {self.hidden_size}), got {x.shape}")
        start, n = self.n_past, x.shape[0]
        if self._n_ctx is not None and start + n > self._n_ctx:
            raise ValueError(f"{start} cached + {n} new positions exceed n_ctx {self._n_ctx}")
        pos = np.broadcast_to(np.arange(start, start + n, dtype=np.int64), (self._sections, 1, n))
        feed = {"inputs_embeds": x[None], "position_ids": np.ascontiguousarray(pos)}
        feed.update(zip(self._past_names, self._past, strict=True))
        t0 = time.perf_counter()
        logits, hidden, *present = self.session.run(self._outputs, feed)
        self.decode_s += time.perf_counter() - t0
        self.calls += 1
        self._past = present
        return StepOutput(logits=logits[0], hidden=hidden[0])

    def step(self, embed: np.ndarray) -> StepOutput:
        """Append one position (H,)."""
        x = np.asarray(embed, dtype=np.float32).reshape(-1)
        if x.shape[0] != self.hidden_size:
            raise ValueError(f"expected an embedding of size {self.hidden_size}, got {x.shape}")
        return self.extend(x[None])


class OnnxPredictor:
    """Codebooks 1..15 of a frame from the talker's hidden state and code 0, in one graph run."""

    capabilities: frozenset[str] = frozenset()

    def __init__(self, path: Path | str, *, threads: int | None = None,
                 providers: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.session, self.metadata = open_session(path, threads=threads, providers=providers)
        _expect(self.metadata, "predictor", path)
        m = self.metadata
        self.num_steps = int(m["num_steps"])
        self.codebook_size = int(m["codebook_size"])
        self.hidden_size = int(m["hidden_size"])
        self.codec_vocab_size = int(m["codec_vocab_size"])
        self.placement = _placement(self.session)
        self._no_forced = np.zeros(self.num_steps, dtype=np.int64)
        self._zeros_u = np.zeros(self.num_steps, dtype=np.float64)
        self.reset_counters()

    def reset_counters(self) -> None:
        self.frames = 0
        self.calls = 0
        self.total_s = 0.0

    @property
    def counters(self) -> dict[str, float]:
        return {"frames": self.frames, "onnx_calls": self.calls, "total_s": self.total_s,
                "ms_per_frame": 1e3 * self.total_s / max(self.frames, 1)}

    def run(self, past_hidden: np.ndarray, c0: int, *, uniforms: np.ndarray | None = None,
            temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, do_sample: bool = False,
            forced: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """One graph run: codes (15,) int64 and the raw head logits (15, codebook) float32.

        The first ``len(forced)`` codes are taken from ``forced`` instead of being chosen (teacher forcing);
        the rest are sampled with ``uniforms`` (15 draws in [0, 1)) when ``do_sample``, else the argmax.
        """
        h = np.asarray(past_hidden, dtype=np.float32).reshape(-1)
        if h.shape[0] != self.hidden_size:
            raise ValueError(f"past_hidden must have {self.hidden_size} values, got {h.shape[0]}")
        if not 0 <= int(c0) < self.codec_vocab_size:
            raise ValueError(f"c0 must be in [0, {self.codec_vocab_size}), got {c0}")
        n_forced = len(forced)
        if n_forced > self.num_steps:
            raise ValueError(f"at most {self.num_steps} forced codes, got {n_forced}")
        fixed = self._no_forced.copy()
        fixed[:n_forced] = np.asarray(forced, dtype=np.int64)
        if n_forced and (fixed[:n_forced].min() < 0 or fixed[:n_forced].max() >= self.codebook_size):
            raise ValueError(f"forced codes must be in [0, {self.codebook_size})")
        u = self._zeros_u if uniforms is None else np.asarray(uniforms, dtype=np.float64).reshape(-1)
        if u.shape[0] != self.num_steps:
            raise ValueError(f"expected {self.num_steps} uniforms, got {u.shape[0]}")
        feed = {"past_hidden": h, "c0": np.array(int(c0), dtype=np.int64), "uniforms": u,
                "temperature": np.array(temperature, dtype=np.float32), "top_k": np.array(int(top_k), np.int64),
                "top_p": np.array(top_p, dtype=np.float64), "do_sample": np.array(bool(do_sample)),
                "forced": fixed, "n_forced": np.array(n_forced, dtype=np.int64)}
        self.calls += 1
        codes, logits = self.session.run(["codes", "logits"], feed)
        return codes, logits

    def predict(self, past_hidden: np.ndarray, c0: int, sampling: ResidualSampling = GREEDY) -> np.ndarray:
        """Codes c1..c15 (int64, (15,)) of one frame.

        Greedy or sampled: one run with the argmax or the draw in the graph (the draw takes the frame's 15
        numbers from ``sampling.uniforms``); a host ``sampling.chooser``: called per step on the graph's logits
        (15 teacher-forced runs).
        """
        t0 = time.perf_counter()
        if sampling.chooser is not None:
            codes = self._per_step(past_hidden, c0, sampling)
        elif sampling.do_sample:
            codes, _ = self.run(past_hidden, c0, uniforms=sampling.uniforms(self.num_steps),
                                temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                                do_sample=True)
        else:
            codes, _ = self.run(past_hidden, c0)
        self.frames += 1
        self.total_s += time.perf_counter() - t0
        return np.asarray(codes, dtype=np.int64)

    def _per_step(self, past_hidden: np.ndarray, c0: int, sampling: ResidualSampling) -> np.ndarray:
        codes: list[int] = []
        for j in range(self.num_steps):
            _, logits = self.run(past_hidden, c0, forced=codes)
            c = sampling.choose(j, logits[j])
            if not 0 <= c < self.codebook_size:
                raise ValueError(f"choose returned code {c} outside [0, {self.codebook_size})")
            codes.append(c)
        return np.asarray(codes, dtype=np.int64)


class OnnxTables:
    """EmbeddingTables over the exported tables matrix (memory-mapped; only the rows in use are read).

    Rows: ``text_projection(text_embedding)`` for the text vocabulary, then the talker codec rows, then the
    ``num_steps`` residual codebook tables (``export/talker_onnx.py:export_tables``).
    """

    def __init__(self, path: Path | str, *, text_vocab_size: int, codec_vocab_size: int, num_steps: int,
                 codebook_size: int) -> None:
        self.path = Path(path)
        self._m = np.load(self.path, mmap_mode="r")
        rows = text_vocab_size + codec_vocab_size + num_steps * codebook_size
        if self._m.ndim != 2 or self._m.shape[0] != rows or self._m.dtype != np.float32:
            raise OnnxEngineError(f"{self.path.name}: tables {self._m.shape} {self._m.dtype} do not match the "
                                  f"graphs ({rows} float32 rows expected); mismatched files")
        self.hidden_size = int(self._m.shape[1])
        self.text_vocab_size, self.codec_vocab_size = text_vocab_size, codec_vocab_size
        self.num_steps, self.codebook_size = num_steps, codebook_size
        self._codec0 = text_vocab_size
        self._res0 = text_vocab_size + codec_vocab_size
        self._step_offsets = self._res0 + codebook_size * np.arange(num_steps, dtype=np.int64)

    _ids = staticmethod(checked_ids)

    def text_embeds(self, ids: Any) -> np.ndarray:
        """Projected text-track vectors P(ids), (n, H) float32."""
        return np.array(self._m[self._ids(ids, self.text_vocab_size, "text")])

    def codec_embeds(self, ids: Any) -> np.ndarray:
        """Talker codec embedding rows E(ids), (n, H) float32."""
        return np.array(self._m[self._codec0 + self._ids(ids, self.codec_vocab_size, "codec")])

    def frame_embeds(self, codes: Any) -> np.ndarray:
        """E(c0) + the 15 residual rows, summed in codebook order: (T, 16) codes -> (T, H)."""
        c0, res = split_frame_codes(codes, self.num_steps, self.codebook_size)
        out = self.codec_embeds(c0)
        for j in range(self.num_steps):
            out += self._m[self._step_offsets[j] + res[:, j]]
        return out


def open_generation_onnx(talker_path: Path | str, predictor_path: Path | str, tables_path: Path | str, *,
                         threads: int | None = None, providers: Sequence[str] | None = None,
                         n_ctx: int | None = None) -> GenerationEngines:
    """The ONNX talker, predictor and tables from explicit files (sizes cross-checked between them)."""
    talker = OnnxTalker(talker_path, threads=threads, providers=providers, n_ctx=n_ctx)
    predictor = OnnxPredictor(predictor_path, threads=threads, providers=providers)
    if (predictor.hidden_size, predictor.codec_vocab_size) != (talker.hidden_size, talker.codec_vocab_size):
        raise OnnxEngineError(f"{Path(predictor_path).name} does not belong to {Path(talker_path).name} "
                              f"(hidden/codec vocab {predictor.hidden_size}/{predictor.codec_vocab_size} vs "
                              f"{talker.hidden_size}/{talker.codec_vocab_size})")
    tables = OnnxTables(tables_path, text_vocab_size=int(talker.metadata["text_vocab_size"]),
                        codec_vocab_size=talker.codec_vocab_size, num_steps=predictor.num_steps,
                        codebook_size=predictor.codebook_size)
    if tables.hidden_size != talker.hidden_size:
        raise OnnxEngineError(f"{Path(tables_path).name} rows are {tables.hidden_size} wide, the talker's "
                              f"hidden size is {talker.hidden_size}")
    return GenerationEngines(talker, predictor, tables)


def load_generation_onnx(bundle: Bundle, precision: str, *, threads: int | None = None,
                         providers: Sequence[str] | None = None, n_ctx: int | None = None,
                         predictor_precision: str | None = None, **_: Any) -> GenerationEngines:
    """The bundle's ONNX generation engines: talker and tables at ``precision``, predictor at
    ``predictor_precision`` (default: the same).

    Reads the manifest roles ``talker`` and ``predictor`` (format ``onnx``) and ``predictor_tables`` (format
    ``npy``, the fp32 file for every precision); settings meant for other engines (e.g. ``n_gpu_layers``) are
    ignored.
    """
    m = bundle.manifest
    # One fp32 tables file serves every graph precision (rows are gathered, never streamed whole).
    tables = m.find("predictor_tables", precision) or m.find("predictor_tables", "fp32")
    return open_generation_onnx(bundle.path(m.component("talker", precision)),
                                bundle.path(m.component("predictor", predictor_precision or precision)),
                                bundle.path(tables[0] if tables else m.component("predictor_tables", precision)),
                                threads=threads, providers=providers, n_ctx=n_ctx)
