"""``export MODEL --adapter PEFT_DIR --merge``: one bundle with the LoRA merged, against the base bundle + the same
adapter as a voice pack and against the official PyTorch model with the adapter merged by PEFT (tiny, f32).

Helpers (random PEFT adapters, the lock-step greedy comparison) are those of ``test_voice_pack.py``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from test_voice_pack import MODULES, NEW_ROW, _codes, _lockstep, _merged, _peft_adapter

from conftest import needs_export

pytestmark = needs_export

SCALE = 0.5
FRAMES = 24


@pytest.fixture(scope="module")
def official(tiny_checkpoint):
    import torch

    from qwen3_tts_edge.export.torch_reference import load_official

    torch.set_num_threads(1)
    return lambda: load_official(tiny_checkpoint)


@pytest.fixture(scope="module")
def merged(official, tiny_bundle, tmp_path_factory):
    """(merged bundle, pack for the base bundle, PEFT folder, official model merged by PEFT) at ``SCALE``."""
    from qwen3_tts_edge.export.build import export_bundle
    from qwen3_tts_edge.export.voice_pack import make_voice_pack

    tmp = tmp_path_factory.mktemp("merge")
    pm = _peft_adapter(official, tmp / "peft", MODULES, 7, speaker_row=True)
    rows = {"newspk": NEW_ROW}
    bundle = tmp / "merged"
    export_bundle("random:tiny-custom_voice", bundle, talker=["f32"], decoder=["fp32"], adapter=tmp / "peft",
                  merge=True, adapter_scale=SCALE, speaker_rows=rows, progress=lambda msg: None)
    pack = tmp / "newspk.voicepack"
    make_voice_pack(tmp / "peft", tiny_bundle, pack, scale=SCALE, speaker_rows=rows, adapter_type="f32")
    assert not list(tmp.glob(".merged.*"))  # the merged checkpoint and the partial bundle are gone
    return bundle, pack, tmp / "peft", _merged(pm, SCALE)


def _strict_tts(path):
    from qwen3_tts_edge.bench.parity import _engines
    from qwen3_tts_edge.runtime.bundle import load_bundle
    from qwen3_tts_edge.runtime.engine.contract import GenerationEngines
    from qwen3_tts_edge.runtime.pipeline import TTS

    talker, predictor, tables = _engines(load_bundle(path), "f32", strict=True)
    return TTS.from_engines(GenerationEngines(talker, predictor, tables), path)


def test_merged_bundle_records_the_adapter_and_lists_its_speaker(merged, tiny_bundle):
    from qwen3_tts_edge.runtime.bundle import load_bundle
    from qwen3_tts_edge.runtime.voices.voice_pack import VoicePack, VoicePackError

    bundle, pack, peft, _ = merged
    m = load_bundle(bundle).manifest
    assert m.speakers["newspk"] == NEW_ROW and "ryan" in m.speakers
    adapter = m.source["adapter"]
    digest = hashlib.sha256((peft / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert adapter["scale"] == SCALE and adapter["speaker_rows"] == {"newspk": NEW_ROW}
    assert adapter["files"]["adapter_model.safetensors"] == digest
    base = load_bundle(tiny_bundle).manifest
    assert m.source["model"] == base.source["model"]
    # the merged weights are another base: the pack (a delta on the base weights) is refused on it
    assert m.source["files"]["model.safetensors"] != base.source["files"]["model.safetensors"]
    with pytest.raises(VoicePackError, match="made for base"):
        VoicePack.load(pack).check_for(m)


def test_merged_bundle_speaks_like_base_plus_pack_and_the_merged_official_model(merged, tiny_bundle):
    bundle, pack, _, reference = merged
    ours = _strict_tts(bundle)
    flips, ref_codes = _lockstep(ours, reference, None, "newspk", FRAMES)
    base = _strict_tts(tiny_bundle)
    pack_flips, pack_ref = _lockstep(base, reference, pack, "newspk", FRAMES)
    assert np.array_equal(pack_ref, ref_codes)  # one reference trajectory
    assert len(flips) <= 3 and len(pack_flips) <= 3, (flips, pack_flips)
    n = min([f["frame"] for f in flips + pack_flips] + [FRAMES])
    assert n >= FRAMES // 2, (flips, pack_flips)
    merged_codes = _codes(ours, frames=n, speaker="newspk")
    pack_codes = _codes(base, frames=n, voice=str(pack), speaker="newspk")
    assert np.array_equal(merged_codes, ref_codes[:n])
    assert np.array_equal(pack_codes, merged_codes)
    assert not np.array_equal(_codes(base, frames=n, speaker="ryan"), _codes(ours, frames=n, speaker="ryan"))


def test_adapter_without_merge_points_at_voice_pack(tmp_path, capsys):
    from qwen3_tts_edge.export.build import export_bundle
    from qwen3_tts_edge.export.merge import MergeError
    from qwen3_tts_edge.runtime import cli
    from qwen3_tts_edge.runtime.voices.voice_pack import VoicePackError

    (tmp_path / "peft").mkdir()
    assert cli.main(["export", "random:tiny-custom_voice", "-o", str(tmp_path / "b"), "--adapter",
                     str(tmp_path / "peft")]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "add --merge" in err and "qwen3-tts-edge voice pack PEFT_DIR" in err
    with pytest.raises(MergeError, match="not a PEFT adapter folder"):
        export_bundle("random:tiny-custom_voice", tmp_path / "b", adapter=tmp_path / "peft", merge=True)
    with pytest.raises(MergeError, match="go with --adapter"):
        export_bundle("random:tiny-custom_voice", tmp_path / "b", merge=True)
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(VoicePackError, match=r"voice scale must be in \[0, 2\]"):
        export_bundle("random:tiny-custom_voice", tmp_path / "b", adapter=tmp_path / "peft", merge=True,
                      adapter_scale=3.0)
    assert not (tmp_path / "b").exists()


def test_merge_refuses_taken_speaker_names(official, tmp_path):
    from qwen3_tts_edge.export.build import export_bundle
    from qwen3_tts_edge.export.merge import MergeError

    _peft_adapter(official, tmp_path / "peft", MODULES, 8, speaker_row=True)
    with pytest.raises(MergeError, match="preset speakers"):
        export_bundle("random:tiny-custom_voice", tmp_path / "b", talker=["f32"], decoder=["fp32"],
                      adapter=tmp_path / "peft", merge=True, speaker_rows={"ryan": NEW_ROW}, progress=lambda msg: None)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


# ----------------------------------------------------------------------------------------------------------
# a Base fine-tune (what the official fine-tune script trains): its speaker row makes it speak as CustomVoice


@pytest.fixture(scope="module")
def base_fine_tune(tmp_path_factory):
    """(Base bundle, pack with a speaker row, merged bundle, official Base model merged by PEFT) at ``SCALE``."""
    import torch

    from qwen3_tts_edge.export.build import export_bundle
    from qwen3_tts_edge.export.random_checkpoint import cached_random_checkpoint
    from qwen3_tts_edge.export.torch_reference import load_official
    from qwen3_tts_edge.export.voice_pack import make_voice_pack

    torch.set_num_threads(1)
    ckpt = cached_random_checkpoint("tiny", "base")
    tmp = tmp_path_factory.mktemp("base-ft")
    quiet = {"progress": lambda msg: None, "talker": ["f32"], "decoder": ["fp32"], "speaker_encoder": [],
             "codec_encoder": []}
    export_bundle("random:tiny-base", tmp / "base", **quiet)
    pm = _peft_adapter(lambda: load_official(ckpt), tmp / "peft", MODULES, 9, speaker_row=True)
    rows = {"newspk": NEW_ROW}
    export_bundle("random:tiny-base", tmp / "merged", adapter=tmp / "peft", merge=True, adapter_scale=SCALE,
                  speaker_rows=rows, **quiet)
    make_voice_pack(tmp / "peft", tmp / "base", tmp / "newspk.voicepack", scale=SCALE, speaker_rows=rows,
                    adapter_type="f32")
    _peft_adapter(lambda: load_official(ckpt), tmp / "peft-norows", MODULES, 10)
    return tmp, _merged(pm, SCALE)


def test_base_fine_tune_as_pack_and_merged_speaks_like_the_official_merge(base_fine_tune):
    from qwen3_tts_edge.runtime.bundle import load_bundle

    tmp, reference = base_fine_tune
    m = load_bundle(tmp / "merged").manifest
    assert m.model["tts_model_type"] == "custom_voice" and m.speakers == {"newspk": NEW_ROW}
    merged, base = _strict_tts(tmp / "merged"), _strict_tts(tmp / "base")
    pack = tmp / "newspk.voicepack"
    flips, ref_codes = _lockstep(merged, reference, None, "newspk", FRAMES)
    pack_flips, pack_ref = _lockstep(base, reference, pack, "newspk", FRAMES)
    assert np.array_equal(pack_ref, ref_codes) and len(flips) <= 3 and len(pack_flips) <= 3, (flips, pack_flips)
    n = min([f["frame"] for f in flips + pack_flips] + [FRAMES])
    assert n >= FRAMES // 2, (flips, pack_flips)
    assert np.array_equal(_codes(merged, frames=n, speaker="newspk"), ref_codes[:n])
    assert np.array_equal(_codes(base, frames=n, voice=str(pack), speaker=None), ref_codes[:n])  # the pack's speaker


def test_a_pack_without_speaker_rows_on_a_base_bundle_says_what_it_needs(base_fine_tune):
    from qwen3_tts_edge.export.voice_pack import make_voice_pack
    from qwen3_tts_edge.runtime.voices.voice_pack import VoicePack, VoicePackError

    tmp, _ = base_fine_tune
    need = r"no speaker rows, and a Base bundle has no preset speakers .* --speaker-row NAME=ROW"
    with pytest.raises(VoicePackError, match=need):
        make_voice_pack(tmp / "peft-norows", tmp / "base", tmp / "norows.voicepack")
    assert not (tmp / "norows.voicepack").exists()
    # a pack written without rows (e.g. by an older version) is refused the same way at request time
    with_rows = VoicePack.load(tmp / "newspk.voicepack")
    bare = VoicePack(with_rows.talker_adapter, with_rows.predictor_adapter, checkpoint=with_rows.checkpoint)
    bare.save(tmp / "bare.voicepack")
    base = _strict_tts(tmp / "base")
    with pytest.raises(VoicePackError, match=need):
        base.stream("Hello.", voice=str(tmp / "bare.voicepack"))
