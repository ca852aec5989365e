"""SpeakOptions: three groups (prompt, sampling, limits) + the decode schedule; flat keywords keep working."""

from __future__ import annotations

import pytest

from qwen3_tts_edge.runtime import Limits, PromptOptions, SamplingOptions, SpeakOptions


def test_flat_keywords_and_groups_build_the_same_options():
    flat = SpeakOptions(speaker="ryan", language="english", seed=3, greedy=True, max_frames=40, chunk_frames=(2,))
    grouped = SpeakOptions(prompt=PromptOptions(speaker="ryan", language="english"),
                           sampling=SamplingOptions(seed=3, greedy=True), limits=Limits(max_frames=40),
                           chunk_frames=(2,))
    assert flat == grouped
    assert (flat.speaker, flat.seed, flat.max_frames) == ("ryan", 3, 40)  # flat reads reach into the groups
    assert flat.prompt.speaker == "ryan" and flat.sampling.greedy and flat.limits.max_frames == 40


def test_replace_changes_only_what_is_named():
    base = SpeakOptions(speaker="ryan", seed=3)
    other = base.replace(seed=4, max_frames=12, chunk_frames=(1, 4))
    assert (other.speaker, other.seed, other.max_frames, other.chunk_frames) == ("ryan", 4, 12, (1, 4))
    assert (base.seed, base.max_frames, base.chunk_frames) == (3, None, (1, 2, 4, 8))
    assert base.replace(limits=Limits(min_frames=5)).min_frames == 5


@pytest.mark.parametrize("kw,error,match", [
    ({"chunk_frames": (0,)}, ValueError, "chunk_frames must be positive integers"),
    ({"chunk_frames": ()}, ValueError, "chunk_frames"),
    ({"max_frames": 0}, ValueError, "max_frames must be a positive integer or None"),
    ({"min_frames": True}, ValueError, "min_frames must be a non-negative integer"),
    ({"segment_tokens": 2.5}, ValueError, "segment_tokens"),
    ({"text_timeout_s": 0}, ValueError, "text_timeout_s"),
    ({"speeker": "ryan"}, TypeError, r"unknown speak options \['speeker'\]; choose from .*speaker"),
])
def test_bad_options_say_what_is_wrong(kw, error, match):
    with pytest.raises(error, match=match):
        SpeakOptions(**kw)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no option 'volume'"):
        _ = SpeakOptions().volume
