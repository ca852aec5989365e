"""The bundle contract: manifest round-trip, verification on load, atomic export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import needs_export
from qwen3_tts_edge.runtime.bundle import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    BundleError,
    Component,
    Manifest,
    load_bundle,
    read_manifest,
    write_manifest,
)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(bundle, dest)
    return dest


def _edit_manifest(root: Path, edit) -> None:
    data = json.loads((root / MANIFEST_NAME).read_text())
    edit(data)
    (root / MANIFEST_NAME).write_text(json.dumps(data))


def test_manifest_round_trip(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text("{}")
    comp = Component.from_file(tmp_path, "tokenizer/vocab.json", "text_tokenizer", "json", "none", {"k": 1})
    manifest = Manifest(
        format_version=FORMAT_VERSION, source={"model": "x"}, model={"talker": {}, "predictor": {}},
        token_ids={"tts_pad_token_id": 151671}, codec_ids={"codec_eos_token_id": 2150}, languages={"english": 2050},
        speakers={"vivian": 3065}, speaker_dialects={}, sampling={"temperature": 0.9}, audio={"sample_rate": 24000},
        tools={"python": "3"}, components=(comp,), created="now",
    )
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    assert load_bundle(tmp_path).manifest.component("text_tokenizer").meta == {"k": 1}
    assert not list(tmp_path.glob(".manifest.*"))  # atomic write leaves no temp file


def test_manifest_gets_the_users_file_mode_not_the_temp_files(tmp_path):
    """The atomic temp file is created 0600; the manifest must end up as readable as any file the user writes."""
    import os

    old = os.umask(0o022)
    try:
        write_manifest(tmp_path, Manifest(
            format_version=FORMAT_VERSION, source={}, model={}, token_ids={}, codec_ids={}, languages={}, speakers={},
            speaker_dialects={}, sampling={}, audio={}, tools={}, components=(), created="now"))
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / MANIFEST_NAME).stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o644


@needs_export
def test_tiny_export_manifest_contents(tiny_bundle):
    m = load_bundle(tiny_bundle).manifest
    assert m.format_version == FORMAT_VERSION
    assert m.source["model"] == "random:tiny-custom_voice" and m.source["kind"] == "random"
    assert "model.safetensors" in m.source["files"] and len(m.source["files"]["model.safetensors"]) == 64
    assert m.token_ids["tts_pad_token_id"] == 151671 and m.token_ids["im_start_token_id"] == 151644
    assert m.codec_ids["codec_eos_token_id"] == 2150 and m.codec_ids["codec_bos_id"] == 2149
    assert m.speakers["vivian"] == 3065 and m.speaker_dialects == {"eric": "sichuan_dialect",
                                                                    "dylan": "beijing_dialect"}
    assert m.languages["english"] == 2050
    assert m.sampling["temperature"] == 0.9 and m.sampling["max_new_tokens"] == 8192
    assert m.audio == {"sample_rate": 24000, "samples_per_frame": 1920, "frame_rate": 12.5, "num_code_groups": 16,
                       "codebook_size": 2048, "decoder_window": 72}
    assert m.model["talker"]["num_hidden_layers"] == 2 and m.model["predictor"]["has_input_projection"]
    assert {c.file for c in m.find("text_tokenizer")} >= {"tokenizer/vocab.json", "tokenizer/merges.txt",
                                                          "tokenizer/tokenizer_config.json"}
    assert m.tools["qwen3-tts-edge"] and m.tools["torch"].startswith("2.")
    dec = m.component("decoder", "fp32")
    assert dec.file == "decoder.fp32.onnx" and dec.meta["fidelity"]["stream_vs_offline_max_abs"] <= 1e-4
    assert dec.meta["sample_rate"] == 24000 and m.find("decoder_state")


@needs_export
def test_corrupted_file_fails_checksum(tiny_bundle, tmp_path):
    root = _copy(tiny_bundle, tmp_path)
    path = root / "tokenizer" / "merges.txt"
    data = bytearray(path.read_bytes())
    data[100] ^= 1  # same size, one bit flipped
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(root)
    load_bundle(root, verify=False)  # sizes still match: only the checksum pass catches it


@needs_export
def test_truncated_and_missing_files_are_rejected(tiny_bundle, tmp_path):
    root = _copy(tiny_bundle, tmp_path)
    (root / "tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(BundleError, match="truncated or replaced"):
        load_bundle(root, verify=False)
    (root / "tokenizer" / "vocab.json").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(root, verify=False)


@needs_export
@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(format_version=FORMAT_VERSION + 1), "format version"),
    (lambda d: d.pop("format_version"), "format version"),
    (lambda d: d.pop("codec_ids"), "codec_ids"),
    (lambda d: d.update(components=[c for c in d["components"] if c["role"] != "text_tokenizer"]),
     "required components"),
    (lambda d: d["components"].append(dict(d["components"][0], role="mystery")), "unknown component roles"),
    (lambda d: d["components"].append(dict(d["components"][0])), "more than once"),
    (lambda d: d["components"][0].update(file="../outside.json"), "relative path inside the bundle"),
    (lambda d: d["components"][0].pop("sha256"), "malformed"),
])
def test_bad_manifests_are_rejected_with_a_reason(tiny_bundle, tmp_path, edit, match):
    root = _copy(tiny_bundle, tmp_path)
    _edit_manifest(root, edit)
    with pytest.raises(BundleError, match=match):
        load_bundle(root)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a bundle folder"):
        load_bundle(tmp_path / "missing")
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path)


def test_component_lookup_errors_list_what_exists():
    comps = tuple(Component(role="decoder", file=f"d.{p}.onnx", format="onnx", precision=p, sha256="0" * 64, size=1)
                  for p in ("fp32", "fp16"))
    m = Manifest(format_version=FORMAT_VERSION, source={}, model={}, token_ids={}, codec_ids={}, languages={},
                 speakers={}, speaker_dialects={}, sampling={}, audio={}, tools={}, components=comps)
    assert m.component("decoder", "fp16").file == "d.fp16.onnx"
    with pytest.raises(BundleError, match=r"no decoder in precision 'int8'; available: \['fp16', 'fp32'\]"):
        m.component("decoder", "int8")
    with pytest.raises(BundleError, match="several precisions"):
        m.component("decoder")
    with pytest.raises(BundleError, match="no talker component"):
        m.component("talker")


@needs_export
def test_failed_export_leaves_nothing_and_keeps_the_old_bundle(tiny_bundle, tmp_path, monkeypatch):
    import shutil

    from qwen3_tts_edge.export import build

    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)  # a complete exported bundle
    before = (out / MANIFEST_NAME).read_bytes()
    files_before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def exploding_exporter(folder, dest, precisions, progress, step):
        (dest / "decoder.fp32.onnx").write_bytes(b"half written")
        raise RuntimeError("simulated crash in the middle of a stage")

    monkeypatch.setattr(build, "_stage_exporter", lambda stage, precs: exploding_exporter)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build.export_bundle("random:tiny-custom_voice", out, decoder=["fp32"], force=True, progress=lambda m: None)
    assert (out / MANIFEST_NAME).read_bytes() == before  # the old bundle is untouched
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files_before  # no half-written file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no partial/backup folders left
    load_bundle(out)

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        build.export_bundle("random:tiny-custom_voice", fresh, decoder=["fp32"], progress=lambda m: None)
    assert not fresh.exists()


@needs_export
def test_export_refuses_to_clobber(tiny_bundle, tmp_path):
    from qwen3_tts_edge.export.build import ExportError, export_bundle

    with pytest.raises(ExportError, match="--force"):
        export_bundle("random:tiny-custom_voice", tiny_bundle, progress=lambda m: None)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "important.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a bundle"):
        export_bundle("random:tiny-custom_voice", other, force=True, progress=lambda m: None)
    assert (other / "important.txt").read_text() == "keep me"


@needs_export
def test_unknown_stage_precisions_fail_before_any_work(tmp_path):
    from qwen3_tts_edge.export.build import ExportError, export_bundle

    with pytest.raises(ExportError, match="unknown decoder precision"):
        export_bundle("random:tiny-custom_voice", tmp_path / "b", decoder=["int3"], progress=lambda m: None)
    with pytest.raises(ExportError, match="unknown talker precision"):
        export_bundle("random:tiny-custom_voice", tmp_path / "b", talker=["q3_k"], progress=lambda m: None)
    assert not (tmp_path / "b").exists()


@needs_export
def test_the_default_precision_is_one_the_export_was_asked_for(tiny_bundle, tmp_path):
    """``export --decoder int8`` keeps the fp32 decoder it was made from; without a precision named, the runtime
    loads the int8 one the user asked for, not fp32 because fp32 ranks first. Bundles without the mark (exported
    before it) keep the plain preference."""
    import copy

    from qwen3_tts_edge.runtime.engine.assemble import DECODER, pick_precision
    from qwen3_tts_edge.runtime.engine.specs import preference

    root = _copy(tiny_bundle, tmp_path)

    def add_int8(data):  # the fp32 graph's file under another name stands in for the int8 one
        int8 = copy.deepcopy(next(c for c in data["components"] if c["role"] == "decoder"))
        shutil.copy(root / int8["file"], root / "decoder.int8.onnx")
        int8.update(precision="int8", file="decoder.int8.onnx")
        data["components"].append(int8)

    _edit_manifest(root, add_int8)
    bundle = load_bundle(root, verify=False)
    assert preference(DECODER).index("fp32") < preference(DECODER).index("int8")
    assert pick_precision(bundle, "decoder", None, preference(DECODER)) == "fp32"  # unmarked: as before
    _edit_manifest(root, lambda d: next(c for c in d["components"] if c["role"] == "decoder"
                                        and c["precision"] == "fp32")["meta"].update(requested=False))
    bundle = load_bundle(root, verify=False)
    assert pick_precision(bundle, "decoder", None, preference(DECODER)) == "int8"
    assert pick_precision(bundle, "decoder", "fp32", preference(DECODER)) == "fp32"  # still there when named


def test_export_marks_precisions_it_kept_only_as_a_source(tiny_checkpoint, tmp_path, monkeypatch):
    """The export marks what it wrote beyond the request (the fp32 decoder behind an int8 one) ``requested: false``,
    and nothing the user asked for."""
    from qwen3_tts_edge.export import build

    calls = []

    def decoder_stage(folder, out, precisions, **_):
        calls.append(tuple(precisions))
        (out / "decoder.fp32.onnx").write_bytes(b"fp32")
        (out / "decoder.int8.onnx").write_bytes(b"int8")
        return [{"file": "decoder.fp32.onnx", "role": "decoder", "format": "onnx", "precision": "fp32"},
                {"file": "decoder.int8.onnx", "role": "decoder", "format": "onnx", "precision": "int8"}]

    monkeypatch.setattr(build, "validate_components", lambda components: None)
    manifest = build._export("random:tiny-custom_voice", tmp_path / "b", {"decoder": ("int8",)},
                             {"decoder": decoder_stage}, lambda msg: None, None)
    assert calls == [("int8",)]
    marks = {c.precision: (c.meta or {}).get("requested", True) for c in manifest.components if c.role == "decoder"}
    assert marks == {"fp32": False, "int8": True}
