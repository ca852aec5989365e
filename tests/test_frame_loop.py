"""Frame loop parity: prompt + sampler + loop equal the official greedy ``generate`` code for code.

The engines here are the official PyTorch modules behind the engine contract (export/torch_reference.py),
so this checks the loop itself; the llama.cpp engines are checked against the same modules separately.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import needs_export
from qwen3_tts_edge.runtime.bundle import load_bundle
from qwen3_tts_edge.runtime.engine.contract import FreshPromptTalker
from qwen3_tts_edge.runtime.frame_loop import STOP_MAX_FRAMES, STOP_REPEAT, STOP_TEXT_CEILING, FrameLoop
from qwen3_tts_edge.runtime.options import Limits
from qwen3_tts_edge.runtime.prompt import ModelIds, build_prompt
from qwen3_tts_edge.runtime.sampler import CodeSampler, SamplingParams
from qwen3_tts_edge.runtime.text import TextTokenizer

pytestmark = needs_export
TEXT = "The quick brown fox jumps over the lazy dog, again and again."


@pytest.fixture(scope="module")
def ref(tiny_checkpoint, tiny_bundle):
    import torch

    from qwen3_tts_edge.export.torch_reference import TorchPredictor, TorchTables, TorchTalker, load_official

    torch.set_num_threads(1)  # tiny matrices: thread hand-offs cost more than the maths
    model = load_official(tiny_checkpoint)
    manifest = load_bundle(tiny_bundle).manifest
    return dict(model=model, ids=ModelIds.from_manifest(manifest), manifest=manifest,
                tok=TextTokenizer.from_folder(tiny_bundle / "tokenizer"), tables=TorchTables(model),
                talker=FreshPromptTalker(TorchTalker(model)), predictor=TorchPredictor(model))


def _loop(ref, params, limits, streaming=True):
    prompt = build_prompt(ref["ids"], ref["tok"], ref["tables"], TEXT, language="english", speaker="ryan",
                          streaming_text=streaming)
    sampler = CodeSampler(params, vocab_size=ref["manifest"].model["talker"]["vocab_size"],
                          eos_id=ref["manifest"].codec_ids["codec_eos_token_id"])
    return FrameLoop(ref["talker"], ref["predictor"], ref["tables"], prompt, sampler, limits)


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming_text", "full_text"])
def test_greedy_loop_equals_official_generate(ref, streaming):
    import torch

    frames = 200
    loop = _loop(ref, SamplingParams().greedy(), Limits(max_frames=frames, frames_per_text_token=None), streaming)
    ours = np.stack([f.codes for f in loop])
    ids = torch.tensor([ref["tok"].encode(f"<|im_start|>assistant\n{TEXT}<|im_end|>\n<|im_start|>assistant\n")])
    with torch.no_grad():
        codes, _ = ref["model"].generate(input_ids=[ids], languages=["english"], speakers=["ryan"],
                                         non_streaming_mode=not streaming, do_sample=False, subtalker_dosample=False,
                                         max_new_tokens=frames + 1)
    official = codes[0].numpy()
    assert len(official) == frames, "random weights emitted EOS early; pick another text"
    assert ours.shape == official.shape == (frames, 16)
    assert np.array_equal(ours, official)
    assert loop.stop_reason == STOP_MAX_FRAMES


def test_seeded_sampling_replays_and_seeds_differ(ref):
    def run(seed):
        return np.stack([f.codes for f in _loop(ref, SamplingParams(seed=seed), Limits(max_frames=12))])

    a, b, c = run(11), run(11), run(12)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a[:, 0].max() < 2048 and a[:, 1:].max() < 2048


def test_text_ceiling_stops_runaway_and_reports_it(ref):
    loop = _loop(ref, SamplingParams(seed=1), Limits(max_frames=500, frames_per_text_token=0.5, text_ceiling_slack=3))
    frames = list(loop)
    assert loop.stop_reason == STOP_TEXT_CEILING
    assert len(frames) == int(0.5 * loop.prompt.n_text_tokens) + 3


@pytest.mark.parametrize("bad", [dict(max_frames=0), dict(max_frames=2.5), dict(frames_per_text_token=0),
                                 dict(repeat_frames=1)])
def test_bad_limits(bad):
    with pytest.raises(ValueError):
        Limits(**bad)


class _StuckTalker:
    """Test double around the real talker that makes codebook 0 stick to one code (a runaway loop)."""

    def __init__(self, inner):
        self.inner = inner

    @property
    def last_prefill(self):
        return self.inner.last_prefill

    def _stuck(self, out):
        logits = np.full_like(out.logits, -10.0)
        logits[7] = 10.0
        return type(out)(logits=logits, hidden=out.hidden)

    def prefill(self, prompt):
        return self._stuck(self.inner.prefill(prompt))

    def step(self, embed):
        return self._stuck(self.inner.step(embed))


def test_repeated_frames_detector_stops_a_stuck_loop(ref):
    prompt = build_prompt(ref["ids"], ref["tok"], ref["tables"], TEXT, language="english", speaker="ryan")
    sampler = CodeSampler(SamplingParams().greedy(), vocab_size=3072, eos_id=2150)
    loop = FrameLoop(_StuckTalker(ref["talker"]), ref["predictor"], ref["tables"], prompt, sampler,
                     Limits(max_frames=500, repeat_frames=30))
    frames = list(loop)
    assert loop.stop_reason == STOP_REPEAT and len(frames) == 30
    assert all(f.codes[0] == 7 for f in frames)
