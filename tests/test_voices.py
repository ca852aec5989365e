"""Voice files on a Base bundle: create (x-vector), save/load, speak with it; refusals that say what to do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_export

pytestmark = needs_export
EXE = str(Path(sys.executable).parent / "qwen3-tts-edge")


def _run(*args, **kw):
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=300, **kw)


def test_voice_create_then_speak_with_it(base_bundle, ref_wav, tmp_path):
    import soundfile as sf

    from qwen3_tts_edge.runtime import TTS
    from qwen3_tts_edge.runtime.voices.voice_file import Voice

    voice_path = tmp_path / "ref.voice"
    res = _run("voice", "create", ref_wav, "-b", base_bundle, "-o", voice_path, "--language", "english",
               "--x-vector-only")
    assert res.returncode == 0, res.stderr
    assert "xvec" in res.stderr and voice_path.is_file()
    info = json.loads(_run("voice", "info", voice_path).stdout)
    assert info["mode"] == "xvec" and info["provenance"]["rate"] == 44100 and info["provenance"]["channels"] == 2
    # The file holds exactly the x-vector the API computes from the same audio.
    tts = TTS(base_bundle)
    api_voice = tts.create_voice(ref_wav, language="english", x_vector_only=True)
    assert np.array_equal(Voice.load(voice_path).x_vector, api_voice.x_vector)
    out = tmp_path / "x.wav"
    res = _run("speak", "A new line in the cloned voice.", "-b", base_bundle, "--voice", voice_path, "-o", out,
               "--max-frames", "10", "--seed", "1", "--stats")
    assert res.returncode == 0, res.stderr
    pcm, sr = sf.read(out)
    assert sr == 24000 and len(pcm) == 10 * 1920
    # The same request through the API with the Voice object gives the same audio.
    same, _ = tts.synthesize("A new line in the cloned voice.", voice=api_voice, max_frames=10, seed=1)
    assert np.allclose(same, pcm, atol=1 / 32768 * 1.01)


def test_the_voice_prompt_is_the_x_vector_prompt(base_bundle, ref_wav):
    """A Voice feeds build_prompt exactly the x-vector prompt whose layout test_prompt checks against official."""
    from qwen3_tts_edge.runtime import TTS
    from qwen3_tts_edge.runtime.prompt import VoicePrompt

    tts = TTS(base_bundle)
    voice = tts.create_voice(ref_wav)
    a = tts.stream("Hello.", voice=voice, seed=1, max_frames=3)
    b = tts.stream("Hello.", voice=VoicePrompt(voice.x_vector), seed=1, max_frames=3)
    assert np.array_equal(np.concatenate([c.codes for c in a]), np.concatenate([c.codes for c in b]))


def test_refusals(base_bundle, tiny_bundle, ref_wav, tmp_path):
    from qwen3_tts_edge.runtime import TTS
    from qwen3_tts_edge.runtime.voices.voice_file import Voice, VoiceError

    tts = TTS(base_bundle)
    voice = tts.create_voice(ref_wav)
    path = voice.save(tmp_path / "v.voice")
    res = _run("voice", "create", ref_wav, "-b", base_bundle, "-o", tmp_path / "no-text.voice")
    assert res.returncode == 1 and "--text" in res.stderr and "--x-vector-only" in res.stderr
    with pytest.raises(VoiceError, match="only Base models clone voices"):
        TTS(tiny_bundle).create_voice(ref_wav, x_vector_only=True)
    with pytest.raises(VoiceError, match="voices are for Base models"):
        TTS(tiny_bundle).stream("Hi.", voice=path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the x-vector
    bad = tmp_path / "tampered.voice"
    bad.write_bytes(bytes(raw))
    with pytest.raises(VoiceError, match="damaged"):
        Voice.load(bad)
    (tmp_path / "junk.voice").write_bytes(b"not a voice")
    with pytest.raises(VoiceError, match="not a readable voice file"):
        Voice.load(tmp_path / "junk.voice")
    other = Voice(x_vector=np.zeros(voice.enc_dim * 2, np.float32), checkpoint={"size": "1b7"})
    with pytest.raises(VoiceError, match="made with another model size"):
        tts.stream("Hi.", voice=other)
    foreign = Voice(x_vector=voice.x_vector, checkpoint={**voice.checkpoint, "weights_sha256": "0" * 16})
    with pytest.raises(VoiceError, match="another Base checkpoint"):
        tts.stream("Hi.", voice=foreign)
    res = _run("voice", "create", tmp_path / "junk.voice", "-b", base_bundle, "-o", tmp_path / "out.voice",
               "--x-vector-only")
    assert res.returncode == 1 and "cannot read" in res.stderr and res.stderr.count("\n") == 1
    assert not (tmp_path / "out.voice").exists()


def test_reference_longer_than_the_context_allows(base_bundle, ref_wav):
    """An ICL reference's frames go into every prompt: past half the talker context it is refused, with the limit."""
    from qwen3_tts_edge.runtime import TTS
    from qwen3_tts_edge.runtime.voices.voice_file import VoiceError

    tts = TTS(base_bundle, n_ctx=256)  # llama.cpp's smallest context: room for 127 reference frames = 10.16 s
    t = np.arange(11 * 24000) / 24000
    long_clip = (0.3 * np.sin(2 * np.pi * 150 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2).astype(np.float32)
    with pytest.raises(VoiceError, match=r"reference audio is 11\.0 s; an in-context voice can use at most 10\.2 s "
                                         r".*n_ctx 256.*--x-vector-only"):
        tts.create_voice((long_clip, 24000), "Some words.")
    assert tts.create_voice((long_clip, 24000), x_vector_only=True).mode == "xvec"  # the x-vector has no such limit
    assert tts.create_voice(ref_wav, "Some words.").ref_codes.shape == (26, 16)


@pytest.mark.parametrize("args,message", [
    (["--ref-audio", "REF"], "--ref-text or --ref-text-file) for in-context cloning, or --x-vector-only"),
    (["--ref-audio", "REF", "--voice", "v.voice", "--x-vector-only"], "either --voice or --ref-audio"),
    (["--ref-text", "Hello."], "go with --ref-audio"),
    (["--ref-audio", "REF", "--ref-text", "a", "--ref-text-file", "t.txt"], "--ref-text or --ref-text-file, not both"),
    (["--ref-audio", "REF", "--ref-text-file", "missing.txt"], "cannot read transcript file missing.txt"),
])
def test_one_shot_clone_arguments(base_bundle, ref_wav, tmp_path, args, message):
    args = [str(ref_wav) if a == "REF" else a for a in args]
    res = _run("speak", "Hi.", "-b", base_bundle, "-o", tmp_path / "x.wav", *args, cwd=tmp_path)
    assert res.returncode == 1 and message in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "x.wav").exists()


def test_icl_voice_holds_the_official_reference_codes(base_bundle, ref_wav, tmp_path):
    """ICL: the codec encoder's codes equal the official encode of the same 24 kHz clip; speak continues it."""
    import soundfile as sf

    from qwen3_tts_edge.export.codec_encoder_onnx import official_codes
    from qwen3_tts_edge.export.decoder_onnx import load_official_tokenizer
    from qwen3_tts_edge.export.sources import resolve_model
    from qwen3_tts_edge.runtime import TTS
    from qwen3_tts_edge.runtime.bundle import load_bundle
    from qwen3_tts_edge.runtime.voices.audio_in import load_reference
    from qwen3_tts_edge.runtime.voices.voice_file import Voice

    m = load_bundle(base_bundle).manifest
    assert m.component("codec_encoder", "fp32").meta["fidelity"]["code_mismatches"] == 0
    text = "This is what the reference clip says."
    path = tmp_path / "icl.voice"
    res = _run("voice", "create", ref_wav, "-b", base_bundle, "-o", path, "--text", text)
    assert res.returncode == 0, res.stderr
    voice = Voice.load(path)
    wave = load_reference(ref_wav)
    ref = official_codes(load_official_tokenizer(resolve_model("random:tiny-base").path), wave)
    assert voice.mode == "icl" and voice.ref_text == text
    assert voice.ref_codes.shape == ref.shape == (-(-len(wave) // 1920), 16) and np.array_equal(voice.ref_codes, ref)
    out = tmp_path / "icl.wav"
    res = _run("speak", "A new sentence.", "-b", base_bundle, "--voice", path, "-o", out, "--max-frames", "6")
    assert res.returncode == 0, res.stderr
    assert len(sf.read(out)[0]) == 6 * 1920  # only the new frames: the reference audio itself is not emitted
    same = TTS(base_bundle).synthesize("A new sentence.", voice=voice, max_frames=6, greedy=True)[0]
    assert len(same) == 6 * 1920


@pytest.mark.parametrize("mode", ["xvec", "icl"])
@pytest.mark.parametrize("streaming", [True, False], ids=["streaming_text", "full_text"])
def test_greedy_clone_equals_official_generate(base_bundle, ref_wav, mode, streaming):
    """A created voice through our prompt + frame loop gives the official voice-clone generate's codes."""
    import torch

    from qwen3_tts_edge.export.sources import resolve_model
    from qwen3_tts_edge.export.torch_reference import TorchPredictor, TorchTables, TorchTalker, load_official
    from qwen3_tts_edge.runtime import TTS
    from qwen3_tts_edge.runtime.bundle import load_bundle
    from qwen3_tts_edge.runtime.engine.contract import FreshPromptTalker
    from qwen3_tts_edge.runtime.frame_loop import FrameLoop
    from qwen3_tts_edge.runtime.options import Limits
    from qwen3_tts_edge.runtime.prompt import ModelIds, build_prompt
    from qwen3_tts_edge.runtime.sampler import CodeSampler, SamplingParams
    from qwen3_tts_edge.runtime.text import TextTokenizer

    torch.set_num_threads(1)
    ref_text = "This is what the reference clip says."
    voice = TTS(base_bundle).create_voice(ref_wav, ref_text if mode == "icl" else None, x_vector_only=mode == "xvec")
    model = load_official(resolve_model("random:tiny-base").path)
    manifest = load_bundle(base_bundle).manifest
    tok = TextTokenizer.from_folder(base_bundle / "tokenizer")
    text = ("A brand new sentence in the cloned voice, spoken slowly and clearly, with a few more words so that "
            "the random model keeps talking for a while.")
    frames = 200
    tables = TorchTables(model)
    prompt = build_prompt(ModelIds.from_manifest(manifest), tok, tables, text, language="english",
                          voice=voice.prompt(), streaming_text=streaming)
    sampler = CodeSampler(SamplingParams().greedy(), vocab_size=manifest.model["talker"]["vocab_size"],
                          eos_id=manifest.codec_ids["codec_eos_token_id"])
    loop = FrameLoop(FreshPromptTalker(TorchTalker(model)), TorchPredictor(model), tables, prompt, sampler,
                     Limits(max_frames=frames, frames_per_text_token=None))
    ours = np.stack([f.codes for f in loop])
    icl = mode == "icl"
    clone = {"ref_spk_embedding": [torch.from_numpy(voice.x_vector)], "x_vector_only_mode": [not icl],
             "icl_mode": [icl], "ref_code": [torch.from_numpy(voice.ref_codes)] if icl else None}
    ids = torch.tensor([tok.encode(f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n")])
    ref_ids = [torch.tensor([tok.encode(f"<|im_start|>assistant\n{ref_text}<|im_end|>\n")])] if icl else [None]
    with torch.no_grad():
        codes, _ = model.generate(input_ids=[ids], ref_ids=ref_ids, voice_clone_prompt=clone, languages=["english"],
                                  non_streaming_mode=not streaming, do_sample=False, subtalker_dosample=False,
                                  max_new_tokens=frames + 1)
    official = codes[0].numpy()
    assert len(official) == frames, "random weights emitted EOS early; pick another text"
    assert np.array_equal(ours, official)

    # The waveform: the official decodes reference + new codes in one forward and cuts the reference part
    # off proportionally; ours primes the streaming decoder with the reference codes and emits the new frames.
    from qwen3_tts_edge.export.decoder_onnx import load_official_decoder, offline_decode

    decoder = TTS(base_bundle).decoder
    if icl:
        decoder.prime(voice.ref_codes)
    else:
        decoder.reset()
    pcm = np.concatenate([decoder.decode(ours[i:i + 8]) for i in range(0, frames, 8)])
    full = offline_decode(load_official_decoder(resolve_model("random:tiny-base").path)[0],
                          np.concatenate([voice.ref_codes, official]) if icl else official)
    ref_len = len(voice.ref_codes) if icl else 0
    cut = int(ref_len / (ref_len + frames) * len(full))  # the official cut formula (generate_voice_clone)
    want = full[cut:]
    assert len(pcm) == frames * 1920 and len(want) - len(pcm) in (0, 1)  # the cut may keep one extra sample
    want = want[len(want) - len(pcm):]
    assert np.max(np.abs(pcm - want)) < 1e-4


def test_voices_alternating_reuse_their_saved_prefix(base_bundle, ref_wav):
    """ICL voice, x-vector voice, the ICL voice again: the third request restores the ICL voice's prefix (role,
    tags, x-vector, reference transcript) and prefills the rest; the codes equal an engine without any cache."""
    from qwen3_tts_edge.runtime import TTS
    from qwen3_tts_edge.runtime.prompt import build_prompt

    tts = TTS(base_bundle, talker_precision="f32")
    plain = TTS(base_bundle, talker_precision="f32", prefix_cache=False)
    icl = tts.create_voice(ref_wav, "This is what the reference clip says.")
    xvec = tts.create_voice(ref_wav, x_vector_only=True)
    opts = dict(greedy=True, max_frames=8, frames_per_text_token=None)
    for voice, text in [(icl, "First line."), (xvec, "Second line."), (icl, "A third, longer line.")]:
        with tts.stream(text, voice=voice, **opts) as ours, plain.stream(text, voice=voice, **opts) as ref:
            assert np.array_equal(np.concatenate([c.codes for c in ours]), np.concatenate([c.codes for c in ref]))
        stats = ours.stats
    prompt = build_prompt(tts.ids, tts.tokenizer, tts.tables, "A third, longer line.", voice=icl.prompt())
    ref_tokens = len(tts.tokenizer.encode(icl.ref_text))
    assert prompt.voice_positions == 3 + 5 + ref_tokens  # role, codec tags + x-vector + pad, the transcript
    assert stats.prompt_positions_reused == prompt.voice_positions
    assert stats.prompt_positions_prefilled == len(prompt.embeds) - prompt.voice_positions
    # Both voices come from one clip, so the x-vector voice's whole voice part was already live (no save).
    assert tts.talker.saved_voices == 1


def test_voice_design_then_clone(base_bundle, tmp_path):
    """The official workflow, from the outside: design a voice with an instruction on a VoiceDesign bundle, make
    a voice from that clip on a Base bundle, speak new lines with it (README: "Voice Design, then clone")."""
    import soundfile as sf

    from qwen3_tts_edge.export.build import export_bundle

    design = tmp_path / "voice-design"
    export_bundle("random:tiny-voice_design", design, talker=["q8_0"], decoder=["fp32"], progress=lambda m: None)
    line = "Hello, I am the narrator of this story."
    res = _run("speak", line, "-b", design, "--instruct", "A calm, deep male voice, speaking slowly.", "--language",
               "english", "--seed", "1", "--max-frames", "30", "-o", tmp_path / "designed.wav")
    assert res.returncode == 0, res.stderr
    res = _run("voice", "create", tmp_path / "designed.wav", "-b", base_bundle, "--text", line, "--language",
               "english", "-o", tmp_path / "narrator.voice")
    assert res.returncode == 0, res.stderr
    info = json.loads(_run("voice", "info", tmp_path / "narrator.voice").stdout)
    designed = sf.read(tmp_path / "designed.wav")[0]
    assert info["mode"] == "icl" and info["ref_text"] == line and info["language"] == "english"
    assert info["ref_frames"] == len(designed) // 1920
    for i, text in enumerate(["A new line in the designed voice.", "And another one."]):
        out = tmp_path / f"line{i}.wav"
        res = _run("speak", text, "-b", base_bundle, "--voice", tmp_path / "narrator.voice", "--max-frames", "6",
                   "--seed", str(i), "-o", out)
        assert res.returncode == 0, res.stderr
        assert len(sf.read(out)[0]) == 6 * 1920


@needs_export
def test_voice_create_never_loads_the_generation_engine(base_bundle, ref_wav, tmp_path):
    """``TTS(bundle, load=())`` + ``create_voice`` (what `voice create` does) runs the encoders it needs, and for an
    ICL voice the decoder (to keep its state after the reference), never the generation engine; speaking later
    loads it."""
    from qwen3_tts_edge.runtime import TTS

    tts = TTS(base_bundle, load=())
    assert tts.engines.loaded == ()
    assert tts.create_voice(ref_wav, x_vector_only=True).mode == "xvec"
    assert sorted(tts.engines.loaded) == ["speaker_encoder"]
    voice = tts.create_voice(ref_wav, "A short reference transcript.")
    assert voice.mode == "icl" and len(voice.decoder_states) == 1
    assert sorted(tts.engines.loaded) == ["codec_encoder", "decoder", "speaker_encoder"]
    chunks = list(tts.stream("Hello there.", voice=voice, max_frames=4, min_frames=4))
    assert sum(c.n_frames for c in chunks) == 4
    assert {"generation", "decoder"} <= set(tts.engines.loaded)


@needs_export
def test_an_icl_voice_keeps_the_decoder_state_after_its_reference(base_bundle, ref_wav, tmp_path):
    """The first use of a saved ICL voice restores the decoder's state after the reference instead of decoding the
    whole reference (it cost seconds at 1.7B), with the same audio; a state made by another decoder graph is
    ignored (the reference is decoded), a state that does not fit is refused, and a tampered file is refused."""
    import dataclasses

    from qwen3_tts_edge.runtime import TTS
    from qwen3_tts_edge.runtime.voices.voice_file import Voice, VoiceError

    tts = TTS(base_bundle, talker_precision="f32")
    saved = tts.create_voice(ref_wav, "A short reference transcript.").save(tmp_path / "v.voice")
    voice = Voice.load(saved)
    (identity, state), = voice.decoder_states.items()
    assert identity == next(c.sha256 for c in tts.bundle.manifest.find("decoder", tts.engines.decoder_precision))
    decoder = tts.engines.decoder
    decoded = []
    real_decode = decoder.decode

    def counting(codes):
        decoded.append(len(codes))
        return real_decode(codes)

    decoder.decode = counting
    ref_frames = len(voice.ref_codes)

    def speak(v) -> tuple[np.ndarray, int]:
        tts.forget_voices()  # a cold start, as in a fresh process
        decoded.clear()
        pcm = np.concatenate([c.pcm for c in tts.stream("Hello there.", voice=v, seed=3, max_frames=6,
                                                        min_frames=6)])
        return pcm, sum(decoded)

    with_state, frames_with = speak(voice)
    without, frames_without = speak(dataclasses.replace(voice, decoder_states={}))
    assert frames_with == 6 and frames_without == 6 + ref_frames  # the reference was not decoded again
    np.testing.assert_array_equal(with_state, without)
    other, frames_other = speak(dataclasses.replace(voice, decoder_states={"0" * 64: state}))
    assert frames_other == 6 + ref_frames
    np.testing.assert_array_equal(other, without)
    bad = {k: v[..., :1] if v.ndim else v for k, v in state.items()}
    with pytest.raises(VoiceError, match="saved decoder state does not fit"):
        list(tts.stream("Hello.", voice=dataclasses.replace(voice, decoder_states={identity: bad}), max_frames=2))
    raw = bytearray(saved.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    start, _ = next(v["data_offsets"] for k, v in header.items() if k.startswith("decoder_state."))
    raw[8 + header_len + start] ^= 0xFF  # one byte of a saved decoder state
    (tmp_path / "t.voice").write_bytes(bytes(raw))
    with pytest.raises(VoiceError, match="damaged"):
        Voice.load(tmp_path / "t.voice")
