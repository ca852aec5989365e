"""Generation and the decoder sharing the cores: the policies alone, and a stream on real engines."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from qwen3_tts_edge.runtime.engine.cores import CoreShare, CoreTurns, usable_cores


def test_share_is_only_made_when_the_threads_outnumber_the_cores():
    assert CoreShare.for_threads(2, 1, cores=4) is None  # both fit at once
    assert CoreShare.for_threads(1, 1, cores=1) is None  # one llama.cpp thread cannot narrow
    share = CoreShare.for_threads(2, 1, cores=2)
    assert (share.wide, share.narrow) == (2, 1)
    share = CoreShare.for_threads(8, 2, cores=8)
    assert (share.wide, share.narrow) == (8, 6)
    assert CoreShare.for_threads(4, 4, cores=4).narrow == 1  # never zero threads
    with pytest.raises(ValueError, match="narrow"):
        CoreShare(wide=1, narrow=2)


def test_engine_calls_narrow_while_the_decoder_decodes():
    share = CoreShare(wide=2, narrow=1)
    with share.engine_call() as n:
        assert n == 2
    with share.decoding(), share.engine_call() as n:
        assert n == 1
    with share.engine_call() as n:
        assert n == 2
    assert share.calls == {"wide": 2, "narrow": 1}


def test_the_decoder_waits_for_a_wide_call_in_flight_and_later_calls_narrow():
    share = CoreShare(wide=2, narrow=1)
    events: list[str] = []
    in_call, release = threading.Event(), threading.Event()

    def engine() -> None:
        with share.engine_call() as n:
            events.append(f"engine {n} start")
            in_call.set()
            release.wait(5)
            events.append("engine end")

    def decoder() -> None:
        with share.decoding():
            events.append("decode start")
            with share.engine_call() as n:  # generation goes on beside the decoder, on the cores it leaves
                events.append(f"engine {n} beside the decoder")

    t1 = threading.Thread(target=engine)
    t1.start()
    assert in_call.wait(5)
    t2 = threading.Thread(target=decoder)
    t2.start()
    time.sleep(0.1)
    assert events == ["engine 2 start"]  # the decoder has not started over the wide call
    release.set()
    t1.join(5)
    t2.join(5)
    assert events == ["engine 2 start", "engine end", "decode start", "engine 1 beside the decoder"]


def _engine_call_during_a_decode(turns: CoreTurns, engine_call, beside=lambda: None) -> list[str]:
    """Inside one decode (after ``beside()``), ``engine_call()`` starts on another thread; what happened, in order."""
    events: list[str] = []
    with turns.decoding():
        beside()
        started = threading.Event()

        def engine() -> None:
            started.set()
            events.append(engine_call())

        t = threading.Thread(target=engine)
        t.start()
        started.wait(5)
        time.sleep(0.05)
        events.append("decode done")
    t.join(5)
    return events


def test_turns_let_decoders_go_first_and_never_beside_an_engine_call():
    turns = CoreTurns(decoders=2)

    def engine_call() -> str:
        with turns.engine():
            return "engine"

    assert _engine_call_during_a_decode(turns, engine_call) == ["decode done", "engine"]


@pytest.fixture(scope="module")
def engines_pair(tiny_bundle):
    from qwen3_tts_edge.runtime import TTS

    threads = max(2, usable_cores())  # llama.cpp on every core: with the decoder's thread they outnumber them
    shared = TTS(tiny_bundle, threads=threads, decoder_threads=1)
    plain = TTS(tiny_bundle, threads=threads, decoder_threads=1, share_cores=False)
    return shared, plain


def test_a_shared_stream_gives_the_codes_and_audio_of_an_unshared_one(engines_pair):
    shared, plain = engines_pair
    text = "Sharing two cores must not change a single code."
    opts = dict(language="english", max_frames=40, min_frames=40, seed=3)
    a = [c for c in shared.stream(text, **opts)]
    b = [c for c in plain.stream(text, **opts)]
    codes_a = np.concatenate([c.codes for c in a])
    codes_b = np.concatenate([c.codes for c in b])
    assert codes_a.shape == (40, 16)
    np.testing.assert_array_equal(codes_a, codes_b)
    np.testing.assert_allclose(np.concatenate([c.pcm for c in a]), np.concatenate([c.pcm for c in b]), atol=1e-6)

    share = shared.engines.generation.talker.ctx.share
    assert share is shared.engines.generation.predictor.ctx.share
    assert share.calls["wide"] > 0 and share.calls["narrow"] > 0  # it narrowed while decoding, widened after
    assert plain.engines.generation.talker.ctx.share is None


def test_turns_give_way_to_the_share_while_one_stream_is_open():
    share = CoreShare(wide=2, narrow=1)
    open_streams = [1]
    turns = CoreTurns(decoders=1, share=share, streams=lambda: open_streams[0])
    # one stream: no turn, the decoder registers with the share, and generation goes on beside it, narrowed
    with turns.decoding(), turns.engine(), share.engine_call() as n:
        assert n == 1
    assert turns.solo_calls == 1

    open_streams[0] = 2  # a second stream: turns again, and the engine waits for the decoder

    def narrowed_beside() -> None:
        with share.engine_call() as n:
            assert n == 1  # a solo-mode engine call beside a turns-mode decoder is narrowed too

    def engine_call() -> str:
        with turns.engine(), share.engine_call() as m:
            return f"engine {m}"

    events = _engine_call_during_a_decode(turns, engine_call, beside=narrowed_beside)
    assert events == ["decode done", "engine 2"]  # after the decoder, on all the cores
    assert turns.solo_calls == 1
    with pytest.raises(ValueError, match="together"):
        CoreTurns(decoders=1, share=share)


def test_a_lone_stream_of_a_batched_engine_shares_the_cores_and_keeps_its_codes(tiny_bundle, engines_pair):
    from qwen3_tts_edge.runtime import TTS

    _, plain = engines_pair
    threads = max(2, usable_cores())
    batched = TTS(tiny_bundle, threads=threads, decoder_threads=1, max_batch=2)
    text = "A lone request on a server batches with nobody."
    opts = dict(language="english", max_frames=30, min_frames=30, seed=5)
    a = list(batched.stream(text, **opts))
    b = list(plain.stream(text, **opts))
    np.testing.assert_array_equal(np.concatenate([c.codes for c in a]), np.concatenate([c.codes for c in b]))
    np.testing.assert_allclose(np.concatenate([c.pcm for c in a]), np.concatenate([c.pcm for c in b]), atol=1e-6)

    turns = batched.engines.scheduler.turns
    share = turns.share
    assert share is batched.engines.generation.talker.ctx.share
    assert turns.solo_calls > 0  # its engine calls took no turn
    assert share.calls["narrow"] > 0  # and narrowed while its decoder decoded


def test_an_announced_decode_narrows_the_next_engine_call_and_starts_without_waiting():
    share = CoreShare(wide=2, narrow=1)
    with share.announcing() as announce:
        announce()  # the producer hands over a chunk's last frame
        with share.engine_call() as n:  # its next engine call, before the consumer has begun to decode
            assert n == 1
        with share.decoding():
            pass
        with share.engine_call() as n:  # decoded: wide again
            assert n == 2
        announce()  # announced, then the stream stops before the consumer decodes
    with share.engine_call() as n:
        assert n == 2  # the leftover announcement was dropped with the stream
    assert share.decoder_calls == {"announced": 1, "waited": 0, "all": 1}


def test_the_announcer_counts_frames_on_the_consumers_schedule_and_only_while_it_waits():
    from qwen3_tts_edge.runtime.streaming import ChunkAnnouncer

    announced: list[int] = []
    frame = [0]
    announcer = ChunkAnnouncer((1, 2, 4), lambda: announced.append(frame[0]))
    announcer.consumer_waiting.set()
    for frame[0] in range(1, 16):  # chunks end after frames 1, 3, 7, 11, 15
        if frame[0] == 11:
            announcer.consumer_waiting.clear()  # a consumer busy elsewhere is not announced
        announcer()
        announcer.consumer_waiting.set()
    assert announced == [1, 3, 7, 15]


def test_a_single_lane_stream_announces_its_chunks(engines_pair):
    shared, _ = engines_pair
    share = shared.engines.generation.talker.ctx.share
    before = dict(share.decoder_calls)
    chunks = list(shared.stream("Announce every chunk.", language="english", max_frames=15, min_frames=15, seed=2))
    assert [c.n_frames for c in chunks] == [1, 2, 4, 8, 0]
    calls = {k: share.decoder_calls[k] - before[k] for k in before}
    assert calls["all"] == 4
    # the consumer waits for every chunk here (nothing slows it), so each one but the last flush is announced
    assert calls["announced"] >= 1
    assert share._expected == 0 and share._decoding == 0
