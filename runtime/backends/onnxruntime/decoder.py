"""Torch-free streaming codec decoder over onnxruntime.

The exported graph (``export/decoder_onnx.py``) is a pure function (codes, state) → (pcm, next state);
this class owns the state between calls, so any chunking of a code stream — 1 frame at a time or the
whole utterance at once — produces the same samples as one offline decode. Sizes (sample rate, samples
per frame, state layout) come from the model's own metadata, never from constants here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ...bundle import DECODER_METADATA_KEY
from ...engine.contract import DECODER_PRIMED_CACHE, SEQUENCES
from .providers import CPU, open_inference_session

METADATA_KEY = DECODER_METADATA_KEY  # the bundle contract names it
SUPPORTED_FORMAT = 1
PRIMED_VOICES = 8  # primed decoder states kept (one per recent ICL reference)


@dataclass(frozen=True)
class StateTensor:
    name: str
    input: str
    output: str
    shape: tuple[int, ...]
    dtype: np.dtype


def read_metadata(session: ort.InferenceSession) -> dict:
    """The decoder's JSON metadata record (raises ValueError for graphs not exported by us)."""
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"not a qwen3-tts-edge streaming decoder: metadata key {METADATA_KEY!r} missing")
    meta = json.loads(raw)
    if meta.get("format_version") != SUPPORTED_FORMAT:
        raise ValueError(f"decoder format {meta.get('format_version')} is not supported "
                         f"(expected {SUPPORTED_FORMAT}); re-export the bundle")
    return meta


class StreamingDecoder:
    """Stateful 12 Hz codec decoder: ``decode(codes[N, 16]) → pcm[N · samples_per_frame]``.

    Calls may use any chunk size N ≥ 1; the output of a stream equals the offline decode of the
    concatenated codes. A call that raises leaves the state exactly as it was.
    """

    # primed states of recent references (forget_primed); fork() for one state per stream on one session
    capabilities = frozenset({DECODER_PRIMED_CACHE, SEQUENCES})

    def __init__(self, model_path: Path | str, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> None:
        self._session = open_inference_session(model_path, threads=threads, providers=providers)
        self.providers: list[str] = list(self._session.get_providers())
        meta = read_metadata(self._session)
        self.metadata = meta
        self.precision: str = meta["precision"]
        self.sample_rate: int = int(meta["sample_rate"])
        self.samples_per_frame: int = int(meta["samples_per_frame"])
        self.num_quantizers: int = int(meta["num_quantizers"])
        self.codebook_size: int = int(meta["codebook_size"])
        self._codes_input: str = meta["codes_input"]
        self._pcm_output: str = meta["pcm_output"]
        self._state_layout = tuple(
            StateTensor(s["name"], s["input"], s["output"], tuple(s["shape"]), np.dtype(s["dtype"]))
            for s in meta["state"]
        )
        self._check_graph()
        self._output_names = [self._pcm_output, *(s.output for s in self._state_layout)]
        if self.precision == "fp16" and self.providers == [CPU]:
            warnings.warn("the fp16 decoder is meant for GPU providers; onnxruntime's CPU provider has "
                          "little native fp16 compute, so it runs no faster than fp32 here (int8 is the fast "
                          "CPU variant)", RuntimeWarning, stacklevel=2)
        self._state: dict[str, np.ndarray] = self.initial_state()
        self._primed: OrderedDict[bytes, dict[str, np.ndarray]] = OrderedDict()  # reference codes → primed state
        self._primed_lock = threading.Lock()  # forks share the primed states

    def fork(self) -> StreamingDecoder:
        """A decoder with a state of its own (a new stream) on the same session and primed states: concurrent
        streams decode through one loaded graph (onnxruntime sessions take concurrent ``run`` calls)."""
        other = copy.copy(self)
        other._state = other.initial_state()
        return other

    def _check_graph(self) -> None:
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        needed_in = [self._codes_input, *(s.input for s in self._state_layout)]
        needed_out = [self._pcm_output, *(s.output for s in self._state_layout)]
        missing = [n for n in needed_in if n not in inputs] + [n for n in needed_out if n not in outputs]
        if missing:
            raise ValueError(f"decoder graph does not match its metadata: missing {missing}")
        for s in self._state_layout:
            if tuple(inputs[s.input].shape) != s.shape:
                raise ValueError(f"state {s.name}: graph shape {inputs[s.input].shape} != metadata {s.shape}")

    # -- state ------------------------------------------------------------------------------------
    @property
    def state_layout(self) -> tuple[StateTensor, ...]:
        return self._state_layout

    def initial_state(self) -> dict[str, np.ndarray]:
        """The all-zero state at position 0 (valid: the graph masks cache slots before frame 0)."""
        return {s.name: np.zeros(s.shape, dtype=s.dtype) for s in self._state_layout}

    @property
    def frames_decoded(self) -> int:
        """Frames consumed since the last reset, priming included (the transformer position)."""
        return int(self._state["pos"][0])

    def reset(self) -> None:
        """Start a new stream."""
        self._state = self.initial_state()

    def snapshot(self) -> dict[str, np.ndarray]:
        """A copy of the current state, e.g. to cache a primed voice and restore it per utterance."""
        return {k: v.copy() for k, v in self._state.items()}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Load a state from ``snapshot`` (validated against the layout before anything changes)."""
        self._state = self._checked_state(state)

    def _checked_state(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        new = {}
        for s in self._state_layout:
            if s.name not in state:
                raise ValueError(f"state is missing {s.name!r}")
            value = np.asarray(state[s.name])
            if value.shape != s.shape or value.dtype != s.dtype:
                raise ValueError(f"state {s.name!r}: expected {s.shape} {s.dtype}, "
                                 f"got {value.shape} {value.dtype}")
            new[s.name] = value.copy()
        return new

    # -- decoding ---------------------------------------------------------------------------------
    def check_codes(self, codes: np.ndarray) -> np.ndarray:
        """Validate one chunk of codes and return it as contiguous int64 [N, num_quantizers]."""
        if not isinstance(codes, np.ndarray):
            raise TypeError(f"codes must be a numpy array, got {type(codes).__name__}")
        if codes.dtype == np.bool_ or not np.issubdtype(codes.dtype, np.integer):
            raise TypeError(f"codes must have an integer dtype (int64 preferred), got {codes.dtype}")
        if codes.ndim != 2 or codes.shape[1] != self.num_quantizers or codes.shape[0] < 1:
            raise ValueError(f"codes must have shape (N >= 1, {self.num_quantizers}), got {codes.shape}")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= self.codebook_size:
            bad = np.argwhere((codes < 0) | (codes >= self.codebook_size))[0]
            raise ValueError(f"codes must lie in 0..{self.codebook_size - 1}; got {int(codes[tuple(bad)])} "
                             f"at frame {bad[0]}, quantizer {bad[1]} (range of chunk {low}..{high})")
        return np.ascontiguousarray(codes, dtype=np.int64)

    def input_feed(self, codes: np.ndarray) -> dict[str, np.ndarray]:
        """The graph inputs for ``codes`` at the current state (used by calibration and benchmarks)."""
        feed = {self._codes_input: self.check_codes(codes)}
        feed.update({s.input: self._state[s.name] for s in self._state_layout})
        return feed

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Decode N frames of codes into N · samples_per_frame float32 samples in [-1, 1]."""
        feed = self.input_feed(codes)
        results = self._session.run(self._output_names, feed)
        pcm = results[0]
        expected = feed[self._codes_input].shape[0] * self.samples_per_frame
        if pcm.shape != (expected,):
            raise RuntimeError(f"decoder returned {pcm.shape} samples, expected ({expected},)")
        self._state = {s.name: r for s, r in zip(self._state_layout, results[1:], strict=True)}
        return pcm

    def prime(self, ref_codes: np.ndarray, chunk: int = 64) -> None:
        """Start a new stream whose history is ``ref_codes`` (voice clone); their audio is discarded.

        Later ``decode`` calls continue seamlessly after the reference, exactly as if the reference and
        the new codes were decoded together and the first len(ref_codes) frames cut off. Decoding a reference
        costs as much as decoding that much speech (ICL cold vs cached in bench/results/voice-clone.md), so the
        primed state of the last ``PRIMED_VOICES`` references is kept (small: bench/README) and restored when
        one comes back.
        """
        codes = self.check_codes(ref_codes)
        key = hashlib.sha256(codes.tobytes()).digest()
        with self._primed_lock:
            primed = self._primed.get(key)
            if primed is not None:
                self._primed.move_to_end(key)
        if primed is not None:
            self.restore(primed)
            return
        saved = self._state
        self.reset()
        try:
            for start in range(0, codes.shape[0], chunk):
                self.decode(codes[start : start + chunk])
        except BaseException:
            self._state = saved
            raise
        with self._primed_lock:
            self._primed[key] = self.snapshot()
            while len(self._primed) > PRIMED_VOICES:
                self._primed.popitem(last=False)

    def primed_state(self, ref_codes: np.ndarray) -> dict[str, np.ndarray]:
        """The state after priming ``ref_codes``, to keep with the voice (a voice's first use then restores it
        instead of decoding the whole reference); this decoder's stream starts over."""
        self.prime(ref_codes)
        state = self.snapshot()
        self.reset()
        return state

    def keep_primed(self, ref_codes: np.ndarray, state: dict[str, np.ndarray]) -> None:
        """Keep ``state`` (from :meth:`primed_state` on this graph) as the primed state of ``ref_codes``; a state
        that does not fit this graph's layout is a ``ValueError`` and nothing is kept."""
        key = hashlib.sha256(self.check_codes(ref_codes).tobytes()).digest()
        checked = self._checked_state(state)
        with self._primed_lock:
            self._primed[key] = checked
            self._primed.move_to_end(key)
            while len(self._primed) > PRIMED_VOICES:
                self._primed.popitem(last=False)

    def forget_primed(self) -> None:
        """Drop the kept primed states (the next ``prime`` of any reference decodes it again)."""
        with self._primed_lock:
            self._primed.clear()

    def decode_all(self, codes: np.ndarray, chunk: int = 64) -> np.ndarray:
        """Decode a whole sequence in chunks of ``chunk`` frames, continuing the current stream."""
        codes = self.check_codes(codes)
        return np.concatenate([self.decode(codes[s : s + chunk]) for s in range(0, codes.shape[0], chunk)])
