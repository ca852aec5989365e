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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ...bundle import GENERATION_METADATA_KEY as METADATA_KEY
from ...bundle import Bundle
from ...engine.contract import (
    KV_STATE,
    SEQUENCES,
    GenerationEngines,
    Placement,
    StepOutput,
    checked_ids,
    split_frame_codes,
)
from ...sampler import GREEDY, ResidualSampling
from .providers import open_inference_session

SUPPORTED_FORMATS = (1, 2)  # 2 adds the batch axis (export/talker_onnx.py FORMAT_VERSION)
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
    if meta.get("format_version") not in SUPPORTED_FORMATS:
        raise OnnxEngineError(f"{path.name}: graph format {meta.get('format_version')} is not supported "
                              f"(this runtime reads {', '.join(map(str, SUPPORTED_FORMATS))}); re-export it")
    return session, meta


def _placement(session: ort.InferenceSession) -> Placement:
    active = tuple(session.get_providers())
    gpu = next((p for p in active if p in GPU_PROVIDERS), None)
    return Placement(device="gpu" if gpu else "cpu", note=f"onnxruntime {', '.join(active)}", devices=active)


def _expect(meta: dict[str, Any], graph: str, path: Path | str) -> None:
    if meta.get("graph") != graph:
        raise OnnxEngineError(f"{Path(path).name} is a {meta.get('graph')!r} graph, expected a {graph!r} graph")


@dataclass
class _Rows:
    """The last batched talker call's present KV, kept as the next call's past while the same sequences step
    together (no copy per frame); ``valid`` marks each row's own positions among the padded columns."""

    seqs: tuple[int, ...]
    kv: list[np.ndarray]  # (B, kv_heads, S, head_dim) per past tensor
    valid: np.ndarray  # (B, S) int64

    def row(self, b: int) -> list[np.ndarray]:
        keep = self.valid[b].astype(bool)
        return [np.ascontiguousarray(kv[b:b + 1][:, :, keep]) for kv in self.kv]


class OnnxTalker:
    """The talker graph with its KV cache held on the host: ``prefill``, ``extend``, ``step``, ``rewind``.

    ``n_ctx`` bounds the cached positions of each sequence (None: unbounded, up to the model's position range).
    ``sequences`` > 1 holds that many sequences, decoded together by :meth:`decode_sequences` (the batch
    scheduler's engine): rows of different lengths are left-padded and masked (``export/talker_onnx.py``). While
    the same sequences step together, one call's present KV is the next call's past as it is; any other call
    first gives each row its own arrays back. The single-sequence methods drive sequence 0. Graphs of format 1
    have no batch axis: they run one sequence (no ``SEQUENCES``).
    """

    capabilities = frozenset({KV_STATE, SEQUENCES})  # the KV cache is host arrays: a rewind is a slice

    def __init__(self, path: Path | str, *, threads: int | None = None, providers: Sequence[str] | None = None,
                 n_ctx: int | None = None, sequences: int = 1) -> None:
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
        self._masked = "attention_mask" in {i.name for i in self.session.get_inputs()}  # format 2: batch axis
        if not self._masked:
            self.capabilities = frozenset({KV_STATE})
        _check_sequences(sequences, self._masked, self.path)
        if n_ctx is not None and n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1 or None, got {n_ctx}")
        self._n_ctx = n_ctx
        self.sequences = int(sequences)
        self.placement = _placement(self.session)
        self.calls = 0
        self.decode_s = 0.0
        self._kv: list[list[np.ndarray] | None] = [self._empty() for _ in range(self.sequences)]
        self._rows: _Rows | None = None

    def _empty(self) -> list[np.ndarray]:
        return [np.zeros(self._kv_shape, dtype=np.float32) for _ in self._past_names]

    def _own(self, seq: int) -> list[np.ndarray]:
        """Sequence ``seq``'s KV arrays (taking every row back out of the last batched call if ``seq`` was in it)."""
        if not 0 <= seq < self.sequences:
            raise ValueError(f"sequence {seq} is not one of this talker's {self.sequences}")
        if self._kv[seq] is None:
            self._dissolve()
        return self._kv[seq]

    def _dissolve(self) -> None:
        """Give every row of the last batched call its own arrays again."""
        rows, self._rows = self._rows, None
        if rows is not None:
            for b, seq in enumerate(rows.seqs):
                self._kv[seq] = rows.row(b)

    @property
    def n_past(self) -> int:
        return self.seq_length(0)

    @property
    def n_ctx(self) -> int | None:
        return self._n_ctx

    def reset(self) -> None:
        """Forget the sequence (empty KV cache)."""
        self.seq_remove(0)

    def rewind(self, n_past: int) -> None:
        """Keep only the first ``n_past`` cached positions (e.g. to reuse a cached prompt prefix)."""
        if not 0 <= n_past <= self.n_past:
            raise ValueError(f"cannot rewind to {n_past}: {self.n_past} positions are cached")
        self.seq_remove(0, n_past)

    def save_state(self) -> tuple[int, np.ndarray]:
        """The KV of the positions so far as (n_past, one array), restorable with ``load_state`` (prefix cache)."""
        return self.n_past, self.seq_state(0)

    def load_state(self, state: tuple[int, np.ndarray]) -> None:
        n_past, kv = state
        if kv.shape[2] != n_past:
            raise ValueError(f"saved talker state holds {kv.shape[2]} positions, not {n_past}")
        self.set_seq_state(0, kv)

    def prefill(self, embeds: np.ndarray) -> StepOutput:
        """Start a new sequence with the prompt ``embeds`` (n, H); outputs of its last position."""
        self.reset()
        return self.extend(embeds)

    def extend(self, embeds: np.ndarray) -> StepOutput:
        """Append positions (n, H) after the cached ones; outputs of the last one."""
        x = self._checked(0, self.n_past, embeds)
        past = self._own(0)
        start, n = self.n_past, x.shape[0]
        pos = np.broadcast_to(np.arange(start, start + n, dtype=np.int64), (self._sections, 1, n))
        feed = {"inputs_embeds": x[None], "position_ids": np.ascontiguousarray(pos)}
        if self._masked:
            feed["attention_mask"] = np.ones((1, start + n), dtype=np.int64)
        feed.update(zip(self._past_names, past, strict=True))
        logits, hidden, present = self._run(feed)
        self._kv[0] = present
        return StepOutput(logits=logits[0], hidden=hidden[0])

    def step(self, embed: np.ndarray) -> StepOutput:
        """Append one position (H,)."""
        x = np.asarray(embed, dtype=np.float32).reshape(-1)
        if x.shape[0] != self.hidden_size:
            raise ValueError(f"expected an embedding of size {self.hidden_size}, got {x.shape}")
        return self.extend(x[None])

    def _checked(self, seq: int, start: int, embeds: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(embeds, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.hidden_size or x.shape[0] == 0:
            raise ValueError(f"expected embeddings of shape (n >= 1, {self.hidden_size}), got {x.shape}")
        if start != self.seq_length(seq):
            raise ValueError(f"sequence {seq} holds {self.seq_length(seq)} positions; cannot append at {start}")
        if self._n_ctx is not None and start + x.shape[0] > self._n_ctx:
            raise ValueError(f"{start} cached + {x.shape[0]} new positions exceed n_ctx {self._n_ctx}")
        return x

    def _run(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        t0 = time.perf_counter()
        logits, hidden, *present = self.session.run(self._outputs, feed)
        self.decode_s += time.perf_counter() - t0
        self.calls += 1
        return logits, hidden, present

    # -- several sequences --------------------------------------------------------------------------------------

    def decode_sequences(self, work: list[tuple[int, int, np.ndarray]]) -> list[StepOutput]:
        """Append ``embeds`` (n, H) to each sequence ``seq`` at positions ``start``.. for every ``(seq, start,
        embeds)`` of ``work`` (one entry per sequence), all in one graph run; the outputs of each one's last
        position, in order."""
        if not work or len({seq for seq, _, _ in work}) != len(work) or len(work) > self.sequences:
            raise ValueError(f"decode_sequences takes one entry per sequence, 1..{self.sequences}")
        order = sorted(range(len(work)), key=lambda i: work[i][0])  # rows by sequence id, whatever came first
        work = [work[i] for i in order]
        seqs = tuple(seq for seq, _, _ in work)
        xs = [self._checked(seq, start, e) for seq, start, e in work]
        b, h = len(work), self.hidden_size
        rows = self._rows
        if rows is not None and rows.seqs == seqs and all(len(x) == 1 for x in xs):
            past, valid = rows.kv, np.concatenate([rows.valid, np.ones((b, 1), np.int64)], axis=1)
            x = np.stack(xs)
            pos = np.array([start for _, start, _ in work], dtype=np.int64)[:, None]
        else:  # new rows: left-pad every row's past and input to the longest
            self._dissolve()
            olds = [self._kv[seq] for seq in seqs]
            lengths = [int(kv[0].shape[2]) for kv in olds]
            p, t = max(lengths), max(len(x) for x in xs)
            past = [np.zeros((b, *self._kv_shape[1:2], p, self._kv_shape[3]), np.float32) for _ in olds[0]]
            for i, kv in enumerate(olds):
                for full, own in zip(past, kv, strict=True):
                    full[i, :, p - lengths[i]:] = own[0]
            x = np.zeros((b, t, h), np.float32)
            valid = np.zeros((b, p + t), np.int64)
            pos = np.zeros((b, t), np.int64)
            for i, xi in enumerate(xs):
                x[i, t - len(xi):] = xi
                valid[i, p - lengths[i]:p] = 1
                valid[i, p + t - len(xi):] = 1
                pos[i, t - len(xi):] = np.arange(lengths[i], lengths[i] + len(xi))
        feed = {"inputs_embeds": x, "attention_mask": valid,
                "position_ids": np.ascontiguousarray(np.broadcast_to(pos, (self._sections, *pos.shape)))}
        feed.update(zip(self._past_names, past, strict=True))
        logits, hidden, present = self._run(feed)
        for seq in seqs:
            self._kv[seq] = None
        self._rows = _Rows(seqs, present, valid)
        out: list[StepOutput] = [None] * b  # type: ignore[list-item]
        for row, i in enumerate(order):
            out[i] = StepOutput(logits=logits[row], hidden=hidden[row])
        return out

    def seq_length(self, seq: int) -> int:
        if self._kv[seq] is None:
            return int(self._rows.valid[self._rows.seqs.index(seq)].sum())
        return int(self._kv[seq][0].shape[2])

    def seq_remove(self, seq: int, p0: int = 0) -> None:
        """Drop sequence ``seq``'s positions from ``p0`` on (all of them by default)."""
        kv = self._own(seq)
        self._kv[seq] = self._empty() if p0 == 0 else [np.ascontiguousarray(a[:, :, :p0]) for a in kv]

    def seq_state(self, seq: int) -> np.ndarray:
        """Sequence ``seq``'s KV as one (2 x layers, kv_heads, n, head_dim) array (a copy)."""
        return np.stack([kv[0] for kv in self._own(seq)])

    def set_seq_state(self, seq: int, data: np.ndarray) -> None:
        want = (len(self._past_names), self._kv_shape[1], self._kv_shape[3])
        if data.ndim != 4 or (data.shape[0], data.shape[1], data.shape[3]) != want:
            raise ValueError(f"saved talker state has shape {data.shape}, this talker needs {want} around n")
        self._own(seq)
        self._kv[seq] = [np.ascontiguousarray(x[None], dtype=np.float32) for x in data]


def _check_sequences(sequences: int, batched: bool, path: Path) -> None:
    if sequences < 1:
        raise ValueError(f"sequences must be >= 1, got {sequences}")
    if sequences > 1 and not batched:
        raise OnnxEngineError(f"{path.name} is a format-1 graph without a batch axis, so it runs one request at a "
                              "time: re-export the bundle (`qwen3-tts-edge export MODEL -o DIR --talker fp32`) "
                              "to batch requests, or use max_batch 1")


@dataclass(frozen=True)
class _Frame:
    """One frame's graph inputs (see ``export/predictor_onnx.py``)."""

    hidden: np.ndarray
    c0: int
    uniforms: np.ndarray
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = False
    forced: np.ndarray | None = None
    n_forced: int = 0


class OnnxPredictor:
    """Codebooks 1..15 of a frame from the talker's hidden state and code 0, in one graph run; with
    ``sequences`` > 1, the frames of that many streams in one run (:meth:`predict_many`)."""

    capabilities: frozenset[str] = frozenset({SEQUENCES})

    def __init__(self, path: Path | str, *, threads: int | None = None,
                 providers: Sequence[str] | None = None, sequences: int = 1) -> None:
        self.path = Path(path)
        self.session, self.metadata = open_session(path, threads=threads, providers=providers)
        _expect(self.metadata, "predictor", path)
        m = self.metadata
        self.num_steps = int(m["num_steps"])
        self.codebook_size = int(m["codebook_size"])
        self.hidden_size = int(m["hidden_size"])
        self.codec_vocab_size = int(m["codec_vocab_size"])
        self.placement = _placement(self.session)
        shape = next(i.shape for i in self.session.get_inputs() if i.name == "past_hidden")
        self._rows = len(shape) == 2  # format 2: a row per frame
        if not self._rows:
            self.capabilities = frozenset()
        _check_sequences(sequences, self._rows, self.path)
        self.sequences = int(sequences)
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

    def _frame(self, past_hidden: np.ndarray, c0: int, *, uniforms: np.ndarray | None = None,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, do_sample: bool = False,
               forced: Sequence[int] = ()) -> _Frame:
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
        return _Frame(h, int(c0), u, float(temperature), int(top_k), float(top_p), bool(do_sample), fixed, n_forced)

    def _run_frames(self, frames: Sequence[_Frame]) -> tuple[np.ndarray, np.ndarray]:
        """One graph run over ``frames``: codes (B, 15) int64 and raw head logits (B, 15, codebook) float32."""
        if self._rows:
            feed = {"past_hidden": np.stack([f.hidden for f in frames]),
                    "c0": np.array([f.c0 for f in frames], np.int64),
                    "uniforms": np.stack([f.uniforms for f in frames]),
                    "temperature": np.array([f.temperature for f in frames], np.float32),
                    "top_k": np.array([f.top_k for f in frames], np.int64),
                    "top_p": np.array([f.top_p for f in frames], np.float64),
                    "do_sample": np.array([f.do_sample for f in frames], np.bool_),
                    "forced": np.stack([f.forced for f in frames]),
                    "n_forced": np.array([f.n_forced for f in frames], np.int64)}
            self.calls += 1
            return tuple(self.session.run(["codes", "logits"], feed))  # type: ignore[return-value]
        out = []
        for f in frames:  # format 1: one frame per run, scalars
            feed = {"past_hidden": f.hidden, "c0": np.array(f.c0, np.int64), "uniforms": f.uniforms,
                    "temperature": np.array(f.temperature, np.float32), "top_k": np.array(f.top_k, np.int64),
                    "top_p": np.array(f.top_p, np.float64), "do_sample": np.array(f.do_sample),
                    "forced": f.forced, "n_forced": np.array(f.n_forced, np.int64)}
            self.calls += 1
            out.append(self.session.run(["codes", "logits"], feed))
        return np.stack([c for c, _ in out]), np.stack([lg for _, lg in out])

    def run(self, past_hidden: np.ndarray, c0: int, *, uniforms: np.ndarray | None = None,
            temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, do_sample: bool = False,
            forced: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """One graph run: codes (15,) int64 and the raw head logits (15, codebook) float32.

        The first ``len(forced)`` codes are taken from ``forced`` instead of being chosen (teacher forcing);
        the rest are sampled with ``uniforms`` (15 draws in [0, 1)) when ``do_sample``, else the argmax.
        """
        frame = self._frame(past_hidden, c0, uniforms=uniforms, temperature=temperature, top_k=top_k,
                            top_p=top_p, do_sample=do_sample, forced=forced)
        codes, logits = self._run_frames([frame])
        return codes[0], logits[0]

    def _graph_frame(self, past_hidden: np.ndarray, c0: int, sampling: ResidualSampling) -> _Frame:
        if sampling.do_sample:
            return self._frame(past_hidden, c0, uniforms=sampling.uniforms(self.num_steps),
                               temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                               do_sample=True)
        return self._frame(past_hidden, c0)

    def predict(self, past_hidden: np.ndarray, c0: int, sampling: ResidualSampling = GREEDY) -> np.ndarray:
        """Codes c1..c15 (int64, (15,)) of one frame.

        Greedy or sampled: one run with the argmax or the draw in the graph (the draw takes the frame's 15
        numbers from ``sampling.uniforms``); a host ``sampling.chooser``: called per step on the graph's logits
        (15 teacher-forced runs).
        """
        t0 = time.perf_counter()
        if sampling.chooser is not None:
            codes = self._per_step(past_hidden, c0, sampling)
        else:
            codes = self._run_frames([self._graph_frame(past_hidden, c0, sampling)])[0][0]
        self.frames += 1
        self.total_s += time.perf_counter() - t0
        return np.asarray(codes, dtype=np.int64)

    def predict_many(self, frames: list[tuple[np.ndarray, int, ResidualSampling]]) -> list[np.ndarray | Exception]:
        """:meth:`predict` for several frames ``(past_hidden, c0, sampling)``: the greedy and sampled ones in one
        graph run (a row each), host choosers each on its own; a frame whose inputs or chooser fail gets its
        exception in its place, and the others go on."""
        b = len(frames)
        if not 0 < b <= self.sequences:
            raise ValueError(f"predict_many takes 1..{self.sequences} frames, got {b}")
        t0 = time.perf_counter()
        results: list[np.ndarray | Exception | None] = [None] * b
        rows: list[tuple[int, _Frame]] = []
        for i, (hidden, c0, sampling) in enumerate(frames):
            try:
                if sampling.chooser is not None:
                    results[i] = self._per_step(hidden, c0, sampling)
                else:
                    rows.append((i, self._graph_frame(hidden, c0, sampling)))
            except Exception as exc:  # this stream's frame failed: the others go on without it
                results[i] = exc
        if rows:
            codes, _ = self._run_frames([f for _, f in rows])
            for k, (i, _) in enumerate(rows):
                results[i] = np.asarray(codes[k], dtype=np.int64)
        self.frames += b
        self.total_s += time.perf_counter() - t0
        return results  # type: ignore[return-value]

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
                         n_ctx: int | None = None, sequences: int = 1) -> GenerationEngines:
    """The ONNX talker, predictor and tables from explicit files (sizes cross-checked between them);
    ``sequences``: streams they hold for continuous batching."""
    talker = OnnxTalker(talker_path, threads=threads, providers=providers, n_ctx=n_ctx, sequences=sequences)
    predictor = OnnxPredictor(predictor_path, threads=threads, providers=providers, sequences=sequences)
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
                         predictor_precision: str | None = None, sequences: int = 1, **_: Any
                         ) -> GenerationEngines:
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
                                threads=threads, providers=providers, n_ctx=n_ctx, sequences=sequences)
