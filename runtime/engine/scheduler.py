"""Continuous batching: many requests' frame loops on one talker and one code predictor.

Each request runs its own frame loop (``runtime/frame_loop.py``: its sampler, stop rules and guards) on its own
thread, exactly as it does alone, over a :class:`SequenceTalker` and a :class:`SequencePredictor`: views of one
sequence of the shared engines that implement the engine contract. A view does not decode; it hands its work to
the scheduler's thread and waits. That thread gathers what every active stream has handed in and runs it
together: **one** talker decode for all of them (a stream that just joined contributes its prompt), then the
code predictor's 15 steps with one decode per step for every stream that has a frame to finish. So N streams
share each pass over the weights, which is what a bandwidth-bound CPU (or a GPU) needs.

When to run: as soon as no stream is *busy* — between handing in work, a stream's thread does a little host work
(choosing code 0, building the next input), and the scheduler waits for it, up to ``gather_s``, so batches stay
whole. A stream that waits for something else (its incremental text, a slow consumer) says so
(:meth:`SequenceTalker.parked`) and is not waited for; it joins at the next frame. After a talker decode the
scheduler waits for those streams' predictor work before running the predictor, so streams that joined out of
step fall into step within a frame.

Voice packs (LoRA adapters, ``runtime/engine/adapters.py``): llama.cpp sets adapters per context, so streams
under different adapter sets cannot share a decode. Each sequence runs its request's set, and a frame's work is
run in **grouped steps**: one talker decode (and one predictor batch) per set among the streams, the context's
set switched between groups, the group whose set is already on the context first (so a frame of G groups
switches G - 1 times). Streams with the same pack (or none) batch together as before. The KV of every
sequence stays valid across switches: each sequence's cells were all computed under its own set (a request
keeps one set, the prefix cache keys saved KV on it) and attention reads only the sequence's own cells
(``kv_unified`` off), so a switch changes what the next decode computes, never what is cached.

A sequence is one stream's KV cells in the shared context (its own ``n_ctx``); when the request ends, its cells
are freed and the sequence goes back to the pool. Voice prefixes saved by one sequence restore into any other
(``KV_STATE``: the prefix cache works per sequence, with one store shared by all). The engines need the
``SEQUENCES`` capability: ``decode_sequences``, ``seq_remove``, ``seq_state``, ``set_seq_state`` on the talker,
``predict_many`` on the predictor (llama.cpp's engines and the ONNX Runtime graphs of format 2 have it). Torch-free.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..sampler import GREEDY, ResidualSampling
from .adapters import BASE, AdapterSet
from .contract import KV_STATE, StepOutput
from .cores import CoreTurns

GATHER_S = 0.01  # the longest a batch waits for a busy stream's host work (it takes ~1 ms; see bench/README)


@dataclass
class _Work:
    seq: int
    args: tuple
    aset: AdapterSet = BASE
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


@dataclass
class SchedulerStats:
    """What the scheduler did: ticks, decodes and how full they were (``rows`` summed over decodes)."""

    talker_decodes: int = 0
    talker_rows: int = 0
    talker_s: float = 0.0
    predictor_frames: int = 0
    predictor_batches: int = 0
    predictor_s: float = 0.0
    gather_waits_s: float = 0.0
    adapter_switches: int = 0  # changes of a context's adapter set (voice packs: grouped steps)
    joined: int = 0
    left: int = 0

    def record(self, stage: str, seconds: float, rows: int) -> None:
        """One engine call of ``stage`` ("talker" or "predictor") over ``rows`` streams."""
        if stage == "talker":
            self.talker_s += seconds
            self.talker_decodes += 1
            self.talker_rows += rows
        else:
            self.predictor_s += seconds
            self.predictor_batches += 1
            self.predictor_frames += rows

    def as_dict(self) -> dict[str, float]:
        return {**self.__dict__,
                "mean_talker_batch": round(self.talker_rows / max(self.talker_decodes, 1), 2),
                "mean_predictor_batch": round(self.predictor_frames / max(self.predictor_batches, 1), 2)}


class BatchScheduler:
    """Up to ``max_batch`` sequences of ``talker`` and ``predictor`` (engines with ``SEQUENCES``), one thread
    running their decodes. :meth:`open` a sequence per request (None when all are in use), ``close`` it after.
    ``adapters``: the engines' :class:`~runtime.engine.adapters.AdapterCache` (voice packs; its lock is the
    engine lock), or None where the engines take none."""

    def __init__(self, talker: Any, predictor: Any, *, max_batch: int, gather_s: float = GATHER_S,
                 turns: CoreTurns | None = None, adapters: Any = None) -> None:
        if max_batch < 1 or max_batch > min(talker.sequences, predictor.sequences):
            raise ValueError(f"max_batch {max_batch} needs engines made with that many sequences "
                             f"(talker {talker.sequences}, predictor {predictor.sequences})")
        self.talker, self.predictor = talker, predictor
        self.max_batch, self.gather_s = int(max_batch), float(gather_s)
        self.adapters = adapters
        # held around every call into the engines' contexts (and adapter loads: the same lock as the cache's)
        self.engine_lock = adapters.lock if adapters is not None else threading.RLock()
        self.turns = turns or CoreTurns(decoders=1)
        self._cv = threading.Condition()
        self._free: deque[int] = deque(range(self.max_batch))
        self._busy: dict[int, bool] = {}  # open sequences -> True while their thread is doing host work
        self._talk: dict[int, _Work] = {}
        self._predict: dict[int, _Work] = {}
        self._sets: dict[int, AdapterSet] = {}  # open sequences' adapter sets (absent: the base model)
        self._thread: threading.Thread | None = None
        self.stats = SchedulerStats()

    # -- sequences ----------------------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Sequences in use."""
        with self._cv:
            return len(self._busy)

    def open(self) -> int | None:
        """A free sequence id (its cells empty), or None when ``max_batch`` are in use."""
        with self._cv:
            if not self._free:
                return None
            seq = self._free.popleft()
            self._busy[seq] = True
            self.stats.joined += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="qwen3-tts-edge-batch", daemon=True)
                self._thread.start()
            return seq

    def use_adapters(self, seq: int, aset: AdapterSet) -> None:
        """Sequence ``seq`` runs under ``aset`` (acquired from :attr:`adapters`; released when it closes)."""
        with self._cv:
            if seq not in self._busy:
                raise ValueError(f"sequence {seq} is not open")
            old = self._sets.pop(seq, BASE)
            self._sets[seq] = aset
        self._release(old)

    def _release(self, aset: AdapterSet) -> None:
        if aset is not BASE and self.adapters is not None:
            self.adapters.release(aset)

    def close_sequence(self, seq: int) -> None:
        """Free ``seq``'s cells and give it back (after its request's thread is done with it)."""
        with self.engine_lock:
            self.talker.seq_remove(seq)
        with self._cv:
            aset = self._sets.pop(seq, BASE)
            self._busy.pop(seq, None)
            self._talk.pop(seq, None)
            self._predict.pop(seq, None)
            self._free.append(seq)
            self.stats.left += 1
            self._cv.notify_all()
        self._release(aset)

    def set_parked(self, seq: int, parked: bool) -> None:
        """A stream waits for something outside the engine (True: do not wait for it) or is back (False)."""
        with self._cv:
            if seq in self._busy:
                self._busy[seq] = not parked
                self._cv.notify_all()

    # -- handing in work (request threads) ----------------------------------------------------------------------

    def _submit(self, queue: dict[int, _Work], seq: int, *args: Any) -> Any:
        with self._cv:
            work = _Work(seq, args, self._sets.get(seq, BASE))
            queue[seq] = work
            self._busy[seq] = False
            self._cv.notify_all()
        work.done.wait()
        if work.error is not None:
            raise work.error
        return work.result

    def talk(self, seq: int, start: int, embeds: np.ndarray) -> StepOutput:
        """Append ``embeds`` to sequence ``seq`` at ``start``.. in the next talker decode; its last output."""
        return self._submit(self._talk, seq, start, embeds)

    def predict(self, seq: int, hidden: np.ndarray, c0: int, sampling: ResidualSampling) -> np.ndarray:
        """The frame's 15 residual codes, predicted in the next predictor batch."""
        return self._submit(self._predict, seq, hidden, c0, sampling)

    # -- the scheduler thread -----------------------------------------------------------------------------------

    def _gather(self) -> None:
        """Wait (up to ``gather_s``) until no open sequence is busy with host work; called holding ``_cv``."""
        t0 = time.perf_counter()
        deadline = t0 + self.gather_s
        while any(self._busy.values()):
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._cv.wait(left)
        self.stats.gather_waits_s += time.perf_counter() - t0

    def _take(self, queue: dict[int, _Work]) -> list[_Work]:
        work = list(queue.values())
        queue.clear()
        return work

    def _deliver(self, work: list[_Work], results: list[Any]) -> None:
        with self._cv:
            for w in work:
                if w.seq in self._busy:
                    self._busy[w.seq] = True  # its thread has host work to do before it hands in more
        for w, r in zip(work, results, strict=True):
            if isinstance(r, BaseException):
                w.error = r
            else:
                w.result = r
            w.done.set()

    def _fail(self, work: list[_Work], exc: BaseException) -> None:
        self._deliver(work, [exc] * len(work))

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._talk or self._predict)
                self._gather()
                talk = self._take(self._talk)
            if talk:
                self._run_talker(talk)
                with self._cv:
                    self._gather()  # the streams just answered hand in their frames' predictor work
            with self._cv:
                predict = self._take(self._predict)
            if predict:
                self._run_predictor(predict)

    def _groups(self, work: list[_Work], stage: str) -> list[list[_Work]]:
        """``work`` split by the adapter set each stream runs on ``stage``'s engine: the set already on its
        context first, the others in arrival order (one group when no stream runs a pack)."""
        if self.adapters is None:
            return [work]
        ident = (lambda w: w.aset.talker_id) if stage == "talker" else (lambda w: w.aset.predictor_id)
        groups: dict[Any, list[_Work]] = {}
        for w in work:
            groups.setdefault(ident(w), []).append(w)
        now = self.adapters.on_talker if stage == "talker" else self.adapters.on_predictor
        return sorted(groups.values(), key=lambda g: ident(g[0]) != now)  # stable: arrival order otherwise

    def _run_talker(self, work: list[_Work]) -> None:
        for group in self._groups(work, "talker"):
            self._call_engine(group, lambda g=group: self.talker.decode_sequences([(w.seq, *w.args) for w in g]),
                              "talker")

    def _run_predictor(self, work: list[_Work]) -> None:
        for group in self._groups(work, "predictor"):
            self._call_engine(group, lambda g=group: self.predictor.predict_many([w.args for w in g]), "predictor")

    def _call_engine(self, work: list[_Work], call: Any, stage: str) -> None:
        """One engine call for ``work`` (streams of one adapter set) in the engine's CPU turn, that set on the
        engine's context first; its results (or its failure) to each request."""
        try:
            with self.turns.engine(), self.engine_lock:
                if self.adapters is not None:
                    aset = work[0].aset
                    switched = (self.adapters.set_talker(aset) if stage == "talker"
                                else self.adapters.set_predictor(aset))
                    self.stats.adapter_switches += switched
                t0 = time.perf_counter()
                results = call()
        except BaseException as exc:  # an engine failure fails the call's requests, not the scheduler
            self._fail(work, exc)
            return
        self.stats.record(stage, time.perf_counter() - t0, len(work))
        self._deliver(work, results)


class SequenceTalker:
    """One sequence of a :class:`BatchScheduler` as a talker engine (with ``KV_STATE``) for one request."""

    capabilities = frozenset({KV_STATE})

    def __init__(self, scheduler: BatchScheduler, seq: int) -> None:
        self.scheduler, self.seq = scheduler, seq
        talker = scheduler.talker
        self.hidden_size = talker.hidden_size
        self.placement = talker.placement
        self._n_ctx = None if talker.n_ctx is None else int(talker.n_ctx)  # None: unbounded (ONNX Runtime)
        self._n_past = 0

    @property
    def n_ctx(self) -> int | None:
        return self._n_ctx

    @property
    def n_past(self) -> int:
        return self._n_past

    def reset(self) -> None:
        with self.scheduler.engine_lock:
            self.scheduler.talker.seq_remove(self.seq)
        self._n_past = 0

    def freed(self) -> None:
        """The scheduler freed this sequence's cells (its request ended)."""
        self._n_past = 0

    def prefill(self, embeds: np.ndarray) -> StepOutput:
        self.reset()
        return self.extend(embeds)

    def extend(self, embeds: np.ndarray) -> StepOutput:
        x = np.ascontiguousarray(embeds, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.hidden_size or not len(x):
            raise ValueError(f"expected embeddings of shape (n >= 1, {self.hidden_size}), got {x.shape}")
        if self._n_ctx is not None and self._n_past + len(x) > self._n_ctx:
            raise ValueError(f"context full: {self._n_past} + {len(x)} positions > n_ctx {self._n_ctx}")
        out = self.scheduler.talk(self.seq, self._n_past, x)
        self._n_past += len(x)
        return out

    def step(self, embed: np.ndarray) -> StepOutput:
        return self.extend(np.asarray(embed, dtype=np.float32).reshape(1, -1))

    def rewind(self, n_past: int) -> None:
        if not 0 <= n_past <= self._n_past:
            raise ValueError(f"cannot rewind to {n_past}; have {self._n_past} positions")
        with self.scheduler.engine_lock:
            self.scheduler.talker.seq_remove(self.seq, n_past)
        self._n_past = n_past

    def save_state(self) -> tuple[int, np.ndarray]:
        with self.scheduler.engine_lock:
            return self._n_past, self.scheduler.talker.seq_state(self.seq)

    def load_state(self, state: tuple[int, np.ndarray]) -> None:
        n_past, data = state
        with self.scheduler.engine_lock:
            self.scheduler.talker.set_seq_state(self.seq, data)
        self._n_past = int(n_past)

    @contextlib.contextmanager
    def parked(self) -> Iterator[None]:
        """Around a wait outside the engine (text, a slow consumer): the other streams do not wait for this one."""
        self.scheduler.set_parked(self.seq, True)
        try:
            yield
        finally:
            self.scheduler.set_parked(self.seq, False)


class SequencePredictor:
    """The code predictor for one sequence of a :class:`BatchScheduler` (a ``PredictorEngine``)."""

    capabilities: frozenset[str] = frozenset()

    def __init__(self, scheduler: BatchScheduler, seq: int) -> None:
        self.scheduler, self.seq = scheduler, seq
        self.placement = scheduler.predictor.placement

    def predict(self, past_hidden: np.ndarray, c0: int, sampling: ResidualSampling = GREEDY) -> np.ndarray:
        return self.scheduler.predict(self.seq, past_hidden, int(c0), sampling)
