"""MODEL resolution: random specs, local folders, Hugging Face ids (offline), one loading path."""

from __future__ import annotations

import shutil

import pytest

from conftest import needs_export
from qwen3_tts_edge.export.sources import ModelSourceError, parse_random_spec, resolve_model


@pytest.mark.parametrize("spec,expected", [
    ("random:tiny-custom_voice", ("tiny", "custom_voice", 0)),
    ("random:0.6b-base@3", ("0.6b", "base", 3)),
    ("random:1.7b-voice_design@12", ("1.7b", "voice_design", 12)),
])
def test_parse_random_spec(spec, expected):
    assert parse_random_spec(spec) == expected


@pytest.mark.parametrize("spec", ["random:", "random:tiny", "random:huge-base", "random:tiny-clone",
                                  "random:tiny-base@x", "random:0.6b_base"])
def test_bad_random_spec_is_a_clear_error(spec):
    with pytest.raises(ModelSourceError, match="random:<shape>-<variant>"):
        resolve_model(spec)


def test_missing_local_folder_and_non_checkpoint_folder(tmp_path):
    with pytest.raises(ModelSourceError, match="neither an existing folder"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelSourceError, match="missing config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ModelSourceError, match="is a file"):
        resolve_model(str(tmp_path / "f.txt"))


def test_hub_id_offline_names_the_id_and_how_to_predownload(tmp_path, monkeypatch):
    # No hub is reachable here; make the failure immediate instead of waiting on a network timeout.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ModelSourceError) as err:
        resolve_model("Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice")
    msg = str(err.value)
    assert "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice" in msg and "huggingface-cli download" in msg


def test_hub_id_unreachable_endpoint_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(c, "ENDPOINT", "http://127.0.0.1:9", raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"), raising=False)
    with pytest.raises(ModelSourceError, match="cannot download 'Qwen/Qwen3-TTS-12Hz-1.7B-Base'"):
        resolve_model("Qwen/Qwen3-TTS-12Hz-1.7B-Base")


@needs_export
def test_random_and_local_folder_load_identically(tiny_checkpoint, tmp_path):
    """A random checkpoint copied elsewhere resolves as a plain local folder and loads the same weights."""
    import torch

    from qwen3_tts_edge.export.official import qwen_tts

    copy = tmp_path / "my-checkpoint"
    shutil.copytree(tiny_checkpoint, copy)
    (copy / "random_checkpoint.json").unlink()  # a downloaded snapshot has no such marker
    src = resolve_model(str(copy))
    assert src.kind == "local" and src.path == copy.resolve()
    rnd = resolve_model("random:tiny-custom_voice")
    assert rnd.kind == "random" and rnd.path == tiny_checkpoint

    load = qwen_tts().Qwen3TTSModel.from_pretrained
    a = load(str(rnd.path), dtype=torch.float32, attn_implementation="eager").model
    b = load(str(src.path), dtype=torch.float32, attn_implementation="eager").model
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    da, db = a.speech_tokenizer.model.state_dict(), b.speech_tokenizer.model.state_dict()
    assert all(torch.equal(da[k], db[k]) for k in da)
    assert a.generate_config == b.generate_config
