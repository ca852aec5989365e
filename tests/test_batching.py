"""Continuous batching (``max_batch``): a request's codes are the same alone or batched with others, neighbours that
are cancelled or fail change nothing for the rest, and sequences, cells and threads are all given back.

"The same" means code for code, or differing first at a numerical near-tie: llama.cpp computes a row of a
batched decode almost as it computes it alone, but a product over four rows rounds differently from one over a
single row (the code predictor's flash attention by up to 8e-4 on a logit at f32), and along a 32-frame stream
the tiny f32 model's logits differ by up to ~2e-3. Every decision is recorded (:class:`Decisions`),
so the first difference, if any, is checked: the alone run's scores for the two codes within ``TIE``
(greedy), or its uniform number within ``TIE`` of a boundary of its cumulative distribution (sampled).
"""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
import threading
import time
from collections import defaultdict

import numpy as np
import pytest

from conftest import needs_export
from qwen3_tts_edge.runtime import TTS, AsyncTTS, TextPieces
from qwen3_tts_edge.runtime import sampler as sampler_module
from qwen3_tts_edge.runtime.bundle import BundleError

pytestmark = needs_export

# Different lengths, voices, languages and seeds; the third is short so it leaves while the others run.
REQUESTS = [
    dict(text="Hello there, this is the first of four requests.", speaker="vivian", language="english", seed=1),
    dict(text="Ein zweiter Satz, etwas länger als der erste, damit er länger dauert.", speaker="ryan",
         language="german", seed=2),
    dict(text="Short.", speaker="serena", language="english", seed=3, max_frames=9),
    dict(text="The fourth request speaks of other things entirely, for a while.", speaker="aiden",
         language="auto", seed=4),
]
FRAMES = 32
TIE = 1e-2


class Decisions:
    """Records every code choice by request seed: (scores, uniform number or None, code). Wraps the sampler's own
    functions (nothing is replaced: each wrapper calls the original and keeps what it saw)."""

    def __init__(self, monkeypatch) -> None:
        self.by_seed: dict[int, list[tuple[np.ndarray, float | None, int]]] = defaultdict(list)
        self._seed_of: dict[int, int] = {}
        self._local = threading.local()
        S, me = sampler_module, self
        init, choose_c0, draw = S.CodeSampler.__init__, S.CodeSampler.choose_c0, S.draw
        choose = S.ResidualSampling.choose

        def wrapped_init(sampler, params, **kw):
            init(sampler, params, **kw)
            me._seed_of[id(sampler._residual)] = params.seed

        def wrapped_draw(uniform, scores):
            me._local.uniform = uniform
            return draw(uniform, scores)

        def record(seed, scores, run):
            me._local.uniform = None
            code = run()
            me.by_seed[seed].append((np.array(scores, dtype=np.float64), me._local.uniform, code))
            return code

        def wrapped_c0(sampler, logits, frame):
            scores = sampler.process_c0(logits, frame)
            return record(sampler.params.seed, scores, lambda: choose_c0(sampler, logits, frame))

        def wrapped_choose(sampling, step, logits):
            seed = me._seed_of.get(id(sampling))
            return record(seed, sampling.scores(logits), lambda: choose(sampling, step, logits))

        monkeypatch.setattr(S.CodeSampler, "__init__", wrapped_init)
        monkeypatch.setattr(S.CodeSampler, "choose_c0", wrapped_c0)
        monkeypatch.setattr(S.ResidualSampling, "choose", wrapped_choose)
        monkeypatch.setattr(S, "draw", wrapped_draw)

    def take(self) -> dict[int, list]:
        out, self.by_seed = dict(self.by_seed), defaultdict(list)
        return out


def assert_same_up_to_a_near_tie(alone: list, batched: list, what: str) -> None:
    """The two decision sequences agree, or their first difference is a numerical near-tie of the alone run."""
    for k, ((scores, uniform, code), (_, _, other)) in enumerate(zip(alone, batched, strict=False)):
        if code == other:
            continue
        if uniform is None:  # greedy: the two codes scored (almost) the same
            gap = scores[code] - scores[other]
            assert gap < TIE, f"{what}: decision {k} differs ({code} vs {other}) with a score gap of {gap}"
        else:  # sampled: the draw fell next to a boundary of the distribution
            keep = np.flatnonzero(scores > -np.inf)
            cdf = np.cumsum(np.exp(scores[keep] - scores[keep].max()))
            distance = float(np.min(np.abs(cdf / cdf[-1] - uniform)))
            assert distance < TIE, (f"{what}: decision {k} differs ({code} vs {other}), its uniform number "
                                    f"{distance} from a boundary")
        return
    assert len(alone) == len(batched), f"{what}: {len(alone)} decisions alone, {len(batched)} batched"


def _codes(chunks) -> np.ndarray:
    return np.concatenate([c.codes for c in chunks])


def _options(request: dict, greedy: bool) -> dict:
    return {"max_frames": FRAMES, **request, "greedy": greedy, "chunk_frames": (1,)}


# Both engines batch: llama.cpp (GGUF f32) and ONNX Runtime (the fp32 graphs, format 2 with a batch axis).
ENGINES = {"llama.cpp": "f32", "onnxruntime": "fp32"}
# Decisions recorded per frame: code 0 and the 15 residual codes on the host (llama.cpp); the ONNX predictor
# draws its residual codes in the graph, so only code 0 is seen there (its codes are compared whole).
DECISIONS_PER_FRAME = {"f32": 16, "fp32": 1}


@pytest.fixture(scope="module", params=list(ENGINES))
def precision(request) -> str:
    return ENGINES[request.param]


@pytest.fixture(scope="module")
def alone(tiny_bundle, precision):
    return TTS(tiny_bundle, talker_precision=precision)


@pytest.fixture(scope="module")
def batched(tiny_bundle, precision):
    return TTS(tiny_bundle, talker_precision=precision, max_batch=4)


def _run_together(tts: TTS, requests: list[dict], greedy: bool, *, join_after: int = 3,
                  hooks: dict[int, object] | None = None) -> list[object]:
    """Each request on its own thread; request i starts once request i-1 has made ``join_after`` frames, so they
    join the batch at different frames. ``hooks[i](stream, chunk_index)`` may act on request i as it runs."""
    hooks = hooks or {}
    results: list[object] = [None] * len(requests)
    started = [threading.Event() for _ in requests]

    def run(i: int) -> None:
        if i:
            started[i - 1].wait(30)
        try:
            stream = tts.stream(**_options(requests[i], greedy))
            chunks = []
            for k, chunk in enumerate(stream):
                chunks.append(chunk)
                if k + 1 == join_after:
                    started[i].set()
                if i in hooks:
                    hooks[i](stream, k)
            results[i] = chunks
        except Exception as exc:  # a neighbour's failure is part of some tests
            results[i] = exc
        finally:
            started[i].set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    return results


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_batched_requests_equal_the_same_requests_alone(alone, batched, precision, greedy, monkeypatch):
    decisions = Decisions(monkeypatch)
    expected = [_codes(alone.stream(**_options(r, greedy))) for r in REQUESTS]
    assert len({len(c) for c in expected}) > 1  # the lengths differ: streams leave at different frames
    alone_decisions = decisions.take()
    got = _run_together(batched, REQUESTS, greedy)
    batched_decisions = decisions.take()
    for i, request in enumerate(REQUESTS):
        seed = request["seed"]
        ended_by_eos = len(expected[i]) < request.get("max_frames", FRAMES)
        per_frame = DECISIONS_PER_FRAME[precision]
        assert len(alone_decisions[seed]) == per_frame * len(expected[i]) + ended_by_eos  # every decision seen
        assert_same_up_to_a_near_tie(alone_decisions[seed], batched_decisions[seed], f"request {i}")
        if all(a[2] == b[2] for a, b in zip(alone_decisions[seed], batched_decisions[seed], strict=True)):
            np.testing.assert_array_equal(_codes(got[i]), expected[i], err_msg=f"request {i}")
    stats = batched.engines.scheduler.stats
    assert stats.talker_rows > stats.talker_decodes  # they really shared decodes


def test_a_cancelled_and_a_failing_neighbour_leave_the_others_unchanged(alone, batched, monkeypatch):
    decisions = Decisions(monkeypatch)
    expected = [_codes(alone.stream(**_options(r, True))) for r in REQUESTS[:2]]
    alone_decisions = decisions.take()

    def broken_text():  # incremental text whose source fails mid-utterance
        yield "This text source "
        time.sleep(0.2)
        yield "breaks "
        raise ConnectionError("the language model went away")

    def cancel_after_four(stream, k):
        if k == 3:
            stream.cancel()

    requests = [REQUESTS[0], dict(REQUESTS[2], text="A neighbour that is cancelled early on.", max_frames=FRAMES),
                dict(text=broken_text(), speaker="ryan", language="english", seed=9), REQUESTS[1]]
    got = _run_together(batched, requests, True, join_after=2, hooks={1: cancel_after_four})
    batched_decisions = decisions.take()
    for i, request in ((0, REQUESTS[0]), (3, REQUESTS[1])):
        assert_same_up_to_a_near_tie(alone_decisions[request["seed"]], batched_decisions[request["seed"]],
                                     f"request {i}")
        assert len(_codes(got[i])) == len(expected[i // 3])
    assert sum(c.n_frames for c in got[1]) <= 5  # cancelled within a frame of asking
    assert isinstance(got[2], RuntimeError) and "the language model went away" in str(got[2])


@pytest.mark.parametrize("engine", list(ENGINES))
def test_fifty_requests_through_a_batch_of_four_leave_nothing_behind(tiny_bundle, engine):
    tts = TTS(tiny_bundle, talker_precision=ENGINES[engine], max_batch=4)
    scheduler, talker = tts.engines.scheduler, tts.engines.generation.talker
    list(tts.stream("warm up", speaker="vivian", max_frames=2))
    before = threading.active_count()
    work: queue.Queue = queue.Queue()
    for i in range(50):
        work.put(i)
    done, most = [], [0]

    def client() -> None:
        while True:
            try:
                i = work.get_nowait()
            except queue.Empty:
                return
            chunks = list(tts.stream(f"Request {i}.", speaker="vivian", seed=i, max_frames=3 + i % 5))
            most[0] = max(most[0], scheduler.active)
            done.append(sum(c.n_frames for c in chunks))

    clients = [threading.Thread(target=client) for _ in range(6)]  # more clients than sequences: some wait
    for c in clients:
        c.start()
    for c in clients:
        c.join(300)
    assert len(done) == 50 and all(n > 0 for n in done)
    assert most[0] <= 4
    assert scheduler.active == 0 and tts.engines.lanes.in_use == 0 and tts.engines.lanes.waiting == 0
    assert [talker.seq_length(s) for s in range(4)] == [0, 0, 0, 0]  # every sequence's cells are free
    assert scheduler.stats.joined == scheduler.stats.left == 51
    deadline = time.monotonic() + 5
    while threading.active_count() > before + 1 and time.monotonic() < deadline:  # + the scheduler's own thread
        time.sleep(0.05)
    assert threading.active_count() <= before + 1


def test_a_voice_prefix_saved_by_one_sequence_serves_another(tiny_bundle, alone, precision):
    tts = TTS(tiny_bundle, talker_precision=precision, max_batch=2)
    request = dict(text="The same voice on another sequence.", speaker="uncle_fu", language="english", seed=5,
                   max_frames=12, greedy=True)
    expected = _codes(alone.stream(**request))
    first = tts.stream(**request)
    list(first)  # on sequence 0: prefills and saves the voice prefix
    assert first.stats.prompt_positions_reused == 0
    held = TextPieces()
    held.push("Holding sequence zero ")
    holder = tts.stream(held, speaker="vivian", language="english", seed=1, max_frames=400)
    it = iter(holder)
    next(it)  # the holder now runs on sequence 0 (the first free one), waiting for more text
    try:
        second = tts.stream(**request)
        codes = _codes(second)
    finally:
        holder.cancel()
        held.close()
        list(it)
    assert second.stats.prompt_positions_reused > 0  # the voice prefix came from sequence 0's saved state
    np.testing.assert_array_equal(codes, expected)


def test_forgetting_voices_keeps_running_streams(tiny_bundle):
    """``forget_voices`` while a batched request runs drops the saved voice prefixes, not that request's cells."""
    tts = TTS(tiny_bundle, talker_precision="f32", max_batch=2)
    list(tts.stream("Save this voice first.", speaker="vivian", max_frames=3))
    assert tts.engines.lanes.saved.voices == 1
    text = TextPieces()
    text.push("A request that keeps running ")
    stream = tts.stream(text, speaker="ryan", seed=1, max_frames=100)
    it = iter(stream)
    next(it)
    talker = tts.engines.generation.talker
    before: list[int] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # until it has used up its text and waits for more (nothing moves)
        now = [talker.seq_length(seq) for seq in range(2)]
        if now == before:
            break
        before = now
        time.sleep(0.3)
    tts.forget_voices()
    assert [talker.seq_length(seq) for seq in range(2)] == before and max(before) > 0  # its cells are kept
    assert tts.engines.lanes.saved.voices == 0
    text.push("and ends.")
    text.close()
    assert sum(c.n_frames for c in it) > 0


def test_requests_beyond_max_batch_wait_for_a_lane(tiny_bundle):
    tts = TTS(tiny_bundle, talker_precision="f32", max_batch=2)
    texts = [TextPieces() for _ in range(2)]
    for t in texts:
        t.push("Waiting for more text ")
    holders = [iter(tts.stream(t, speaker="vivian", seed=i, max_frames=200)) for i, t in enumerate(texts)]
    for h in holders:
        next(h)
    third = tts.stream("The third request.", speaker="vivian", seed=3, max_frames=6)
    got: list = []
    runner = threading.Thread(target=lambda: got.extend(third))
    runner.start()
    deadline = time.monotonic() + 20
    while tts.engines.lanes.waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    assert not got and tts.engines.lanes.waiting == 1  # both lanes are taken: it waits, making nothing yet
    texts[0].close()  # the first holder's text ends: it finishes and frees its lane
    list(holders[0])
    runner.join(30)
    assert sum(c.n_frames for c in got) == 6
    texts[1].close()
    list(holders[1])


def test_async_streams_run_together_on_one_engine(tiny_bundle):
    atts = AsyncTTS(TTS(tiny_bundle, talker_precision="f32", max_batch=2))

    async def main() -> list[list[float]]:
        times: list[list[float]] = [[], []]

        async def one(i: int) -> None:
            async for chunk in atts.astream(f"Request {i} runs beside the other.", speaker="vivian", seed=i,
                                             max_frames=20, min_frames=20, frames_per_text_token=None,
                                             chunk_frames=(1,)):
                times[i] += [time.perf_counter()] * chunk.n_frames

        await asyncio.gather(one(0), one(1))
        return times

    times = asyncio.run(main())
    assert all(len(t) == 20 for t in times)
    assert times[1][0] < times[0][-1] and times[0][0] < times[1][-1]  # overlapping, not one after the other


def test_max_batch_needs_engines_that_hold_several_streams(tiny_bundle):
    """Engines without ``SEQUENCES`` (here the tests' numpy fake) are refused at the first request, by name."""
    from fake_engine import FakeDecoder, FakeDims, fake_generation

    from qwen3_tts_edge.runtime import EngineConfig
    from qwen3_tts_edge.runtime.bundle import load_bundle

    dims = FakeDims.from_manifest(load_bundle(tiny_bundle).manifest)
    tts = TTS.from_engines(fake_generation(dims), bundle=tiny_bundle, decoder=FakeDecoder(dims), name="fake",
                           config=EngineConfig(max_batch=2))
    with pytest.raises(BundleError, match="max_batch 2: the talker engine .FakeTalker. cannot hold several"):
        list(tts.stream("Two at once?", speaker="vivian", max_frames=2))
    with pytest.raises(ValueError, match="max_batch"):
        TTS(tiny_bundle, talker_precision="f32", max_batch=0)


def test_a_chooser_that_fails_costs_only_its_own_frame(tiny_bundle):
    """In one predictor batch, a stream whose chooser raises gets its exception back; the other frames are the
    frames predicted alone (flash attention off on both sides here, so the comparison is exact)."""
    from qwen3_tts_edge.runtime.backends.llama_cpp import load_generation
    from qwen3_tts_edge.runtime.bundle import load_bundle
    from qwen3_tts_edge.runtime.sampler import GREEDY, ResidualSampling

    bundle = load_bundle(tiny_bundle)
    alone = load_generation(bundle, "f32", flash_attn=False).predictor
    batch = load_generation(bundle, "f32", flash_attn=False, sequences=3).predictor
    rng = np.random.default_rng(7)
    hidden = [rng.standard_normal(batch.hidden_size).astype(np.float32) for _ in range(3)]
    c0 = [5, 9, 3]

    def breaks_at_step_4(step: int, logits: np.ndarray) -> int:
        if step == 4:
            raise RuntimeError("this chooser broke")
        return int(np.argmax(logits))

    out = batch.predict_many([(hidden[0], c0[0], GREEDY), (hidden[1], c0[1], ResidualSampling.host(breaks_at_step_4)),
                              (hidden[2], c0[2], GREEDY)])
    assert isinstance(out[1], RuntimeError) and "broke" in str(out[1])
    for i in (0, 2):
        np.testing.assert_array_equal(out[i], alone.predict(hidden[i], c0[i]))


def test_servers_batch_by_default_where_the_bundle_can(tiny_bundle, tmp_path):
    """``serve``/``wyoming`` default to SERVER_MAX_BATCH on llama.cpp and on ONNX graphs with a batch axis; an ONNX
    bundle exported before the axis existed (no ``batch_axis`` in its talker entry) still serves, one at a time."""
    from qwen3_tts_edge.runtime import EngineConfig
    from qwen3_tts_edge.runtime.servers.cli import SERVER_MAX_BATCH, server_max_batch

    assert server_max_batch(tiny_bundle, EngineConfig(talker_precision="f32")) == SERVER_MAX_BATCH
    assert server_max_batch(tiny_bundle, EngineConfig(talker_precision="fp32")) == SERVER_MAX_BATCH
    old = tmp_path / "format-1"
    shutil.copytree(tiny_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for c in manifest["components"]:
        if c["role"] in ("talker", "predictor") and c["format"] == "onnx":
            assert c["meta"].pop("batch_axis") is True
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert server_max_batch(old, EngineConfig(talker_precision="fp32")) == 1
    assert server_max_batch(old, EngineConfig(talker_precision="f32")) == SERVER_MAX_BATCH
