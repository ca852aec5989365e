"""Long text streamed to a slow consumer: every chunk is labelled with the segment its last frame came from.

The frames of one request are made on a worker thread that may run up to ``max_queued_frames`` frames ahead of
the chunk being decoded, so a chunk's ``segment`` must travel with its frames, not be read from the producer's
progress when the chunk is flushed.

The truth comes from outside the streaming code: with greedy sampling and end-of-speech held back
(``min_frames`` beyond any segment), each segment's frames are set by its own text alone, so speaking every
segment as a request of its own gives its frame count (and its codes, which must reappear in order).
"""

from __future__ import annotations

import bisect
import threading
import time

import numpy as np

from conftest import needs_export

TEXT = "The first sentence is short. Is the second a question? And a last line."
SEGMENT_TOKENS = 8  # three segments of 7, 7 and 5 tokens
FORCED = dict(greedy=True, min_frames=100_000, frames_per_text_token=0.25, max_frames=100_000)


@needs_export
def test_chunk_segments_follow_their_frames_not_the_producer(tiny_bundle):
    from qwen3_tts_edge.runtime.pipeline import TTS
    from qwen3_tts_edge.runtime.segments import split_segments

    tts = TTS(tiny_bundle, talker_precision="fp32", max_queued_frames=4096)
    segments = split_segments(TEXT, tts.tokenizer, SEGMENT_TOKENS)
    assert len(segments) >= 3, segments

    # ~41 frames each (the text ceiling's fixed allowance), so chunks of 3 straddle the boundaries.
    # Truth: each segment spoken alone (one segment per request), its frames and codes.
    solo = []
    for text in segments:
        codes = [c.codes for c in tts.stream(text, speaker="vivian", segment_tokens=10_000, **FORCED)]
        assert tts.last_stats.segments == 1
        solo.append(np.concatenate(codes))
    counts = [len(c) for c in solo]
    assert all(n >= 2 for n in counts), counts
    ends = np.cumsum(counts).tolist()  # frame index where each segment's frames end (exclusive)

    # The long request, consumed slowly: the producer finishes every segment before the second chunk is taken
    # (the threads the stream starts are waited for: its worker ends once every frame is queued).
    before = set(threading.enumerate())
    stream = tts.stream(TEXT, speaker="vivian", segment_tokens=SEGMENT_TOKENS, chunk_frames=(3,), **FORCED)
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 1:
            deadline = time.monotonic() + 30
            for worker in set(threading.enumerate()) - before:
                worker.join(timeout=max(0.0, deadline - time.monotonic()))
        else:
            time.sleep(0.002)
    stats = stream.stats
    assert stats.segments == len(segments) and stats.frames == ends[-1], (stats.segments, stats.frames, counts)
    np.testing.assert_array_equal(np.concatenate([c.codes for c in chunks]), np.concatenate(solo))

    got, want = [], []
    for chunk in chunks:
        if chunk.n_frames == 0:  # an empty final chunk has no frame to be labelled by
            continue
        last = chunk.first_frame + chunk.n_frames - 1
        got.append((chunk.first_frame, chunk.n_frames, chunk.segment))
        want.append((chunk.first_frame, chunk.n_frames, bisect.bisect_right(ends, last)))
    wrong = [(g, w[2]) for g, w in zip(got, want, strict=True) if g != w]
    assert not wrong, (f"{len(wrong)} of {len(got)} chunks carry the wrong segment (frames per segment {counts}); "
                       f"first (first_frame, n_frames, segment) vs true segment: {wrong[:3]}")

