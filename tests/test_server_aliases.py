"""OpenAI's voice names on ``serve`` (``--voice-alias``, defaults per bundle kind), through the official ``openai``
client against a real uvicorn on 127.0.0.1; the alias table's rules on the catalogue itself."""

from __future__ import annotations

import pytest

from conftest import needs_export

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from test_server_cli import _serve_args  # noqa: E402
from test_server_openai import TEXT, Server, frames  # noqa: E402

from qwen3_tts_edge.runtime.servers.cli import voice_aliases  # noqa: E402
from qwen3_tts_edge.runtime.servers.voices import (  # noqa: E402
    OPENAI_VOICES,
    UnknownVoice,
    VoiceCatalog,
    VoiceExists,
    default_aliases,
    parse_alias,
)

PRESETS = ["aiden", "dylan", "eric", "ono_anna", "ryan", "serena", "sohee", "uncle_fu", "vivian"]


def pcm(client, voice: str) -> bytes:
    return client.audio.speech.create(model="tts-1", voice=voice, input=TEXT, response_format="pcm",
                                      extra_body={"seed": 4, **frames(4)}).content


@needs_export
def test_openai_names_speak_as_their_presets_and_are_listed(tiny_bundle):
    with Server(tiny_bundle) as s:
        s.catalog.set_aliases(voice_aliases(_serve_args("--voice-alias", "nova=ryan"), s.catalog))
        c = s.client()
        assert pcm(c, "alloy") == pcm(c, "vivian") and pcm(c, "Nova") == pcm(c, "ryan")  # the flag beats the default
        assert pcm(c, "alloy") != pcm(c, "ryan")
        listed = c.get("/audio/voices", cast_to=object)["voices"]
        assert {"id": "alloy", "name": "alloy", "type": "alias", "voice": "vivian"} in listed
        assert [v["id"] for v in listed if v["type"] == "alias"] == list(default_aliases("custom_voice", PRESETS))
        with pytest.raises(openai.BadRequestError) as e:  # neither a voice nor an alias: the 400 lists both
            pcm(c, "bogus")
        assert e.value.param == "voice" and "vivian" in e.value.message and "alloy (vivian)" in e.value.message


@needs_export
def test_base_bundle_maps_only_what_it_is_told(base_bundle, ref_wav, tmp_path):
    with Server(base_bundle, voices=tmp_path / "voices") as s:
        c = s.client()
        s.catalog.set_aliases(voice_aliases(_serve_args(), s.catalog))
        assert s.catalog.aliases == {}
        with pytest.raises(openai.BadRequestError) as e:
            pcm(c, "alloy")
        assert "--voice-alias alloy=VOICE" in e.value.message
        s.catalog.set_aliases(voice_aliases(_serve_args("--voice-alias", "alloy=me"), s.catalog))
        with pytest.raises(openai.BadRequestError) as e:  # the saved voice is not there yet
            pcm(c, "alloy")
        assert "alias of 'me', which is not saved here (yet)" in e.value.message
        assert all(v["type"] != "alias" for v in c.get("/audio/voices", cast_to=object)["voices"])
        with open(ref_wav, "rb") as f:
            c.audio.voices.create(audio_sample=f, consent="none", name="me")
        assert pcm(c, "alloy") == pcm(c, "me")
        assert {"id": "alloy", "name": "alloy", "type": "alias", "voice": "me"} in \
            c.get("/audio/voices", cast_to=object)["voices"]
        with open(ref_wav, "rb") as f, pytest.raises(openai.ConflictError) as e:  # an upload cannot hide an alias
            c.audio.voices.create(audio_sample=f, consent="none", name="alloy")
        assert "alias" in e.value.message


def test_default_tables_per_bundle_kind():
    custom = default_aliases("custom_voice", PRESETS)
    assert set(custom) == set(OPENAI_VOICES) and set(custom.values()) == {"vivian", "serena", "ryan", "aiden"}
    assert default_aliases("custom_voice", ["xiao"]) == dict.fromkeys(OPENAI_VOICES, "xiao")  # other presets
    assert default_aliases("base", []) == {}
    design = VoiceCatalog([], "voice_design")
    design.set_aliases(default_aliases("voice_design", []))
    assert design.resolve("nova").name == "default" and design.resolve("nova").speaker is None
    assert design.names() == ["default"]  # what Wyoming lists: aliases stay out of it


def test_alias_rules(tmp_path):
    presets = VoiceCatalog(PRESETS, "custom_voice")
    with pytest.raises(ValueError, match="would hide the preset"):
        presets.set_aliases({"ryan": "vivian"})
    with pytest.raises(ValueError, match=r"'nobody' is not a voice of this bundle; map it to one of aiden"):
        presets.set_aliases({"alloy": "nobody"})
    base = VoiceCatalog([], "base", tmp_path)
    with pytest.raises(ValueError, match="names another alias"):
        base.set_aliases({"alloy": "nova", "nova": "me"})
    base.set_aliases({"Alloy": "me"})
    assert base.aliases == {"alloy": "me"}
    with pytest.raises(UnknownVoice, match="not saved here"):
        base.resolve("ALLOY")
    with pytest.raises(VoiceExists, match="alias"):
        base.check_new_name("alloy")
    assert parse_alias(" Alloy = vivian ") == ("alloy", "vivian")
    for bad in ("alloy", "=vivian", "alloy="):
        with pytest.raises(ValueError, match="NAME=VOICE"):
            parse_alias(bad)
    with pytest.raises(SystemExit):
        _serve_args("--voice-alias", "alloy")
    assert voice_aliases(_serve_args("--no-default-aliases", "--voice-alias", "x=ryan"), presets) == {"x": "ryan"}
