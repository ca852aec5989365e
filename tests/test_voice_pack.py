"""LoRA voice packs on the tiny CustomVoice model: export from random PEFT adapters, parity with the official model
with the adapter merged (fp32), per-request switching without stale KV, and every refusal.

The PEFT adapters are made here with ``peft`` (``init_lora_weights=False``: a non-zero update) on copies of the
official tiny model; the reference is the same adapter merged at the same scale. Our side is the bundle's f32
talker GGUF + f32 adapters with an f32 KV cache (the strict settings of the other parity tests).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import needs_export

pytestmark = needs_export

TEXT = "The quick brown fox jumps over the lazy dog, again and again, until the sun goes down."
FRAMES = 24  # per case in the default run (~25 s each on 2 busy cores); see PARITY_RUNS for the 200-frame runs
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TALKER_ONLY = r"talker\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"
NEW_ROW = 3000
# name -> (target modules, seed, pack default scale, speaker row override)
CASES = {"talker": (TALKER_ONLY, 1, 1.0, False), "talker+predictor": (MODULES, 2, 0.5, False),
         "speaker_row": (MODULES, 3, 1.0, True)}


def _peft_adapter(official, out, targets, seed, *, speaker_row=False, extra_targets=()):
    """A random PEFT LoRA on a fresh official model (``official()``) saved to ``out``; returns the PeftModel."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    targets = targets if isinstance(targets, str) else [*targets, *extra_targets]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                     modules_to_save=["talker.model.codec_embedding"] if speaker_row else None)
    pm = get_peft_model(official(), cfg)
    if speaker_row:
        table = pm.base_model.model.talker.model.codec_embedding.modules_to_save["default"].weight
        with torch.no_grad():
            table[NEW_ROW] = torch.randn(table.shape[1]) * table.std()
    pm.save_pretrained(str(out))
    return pm


def _merged(pm, scale):
    """The official model with the adapter merged at ``scale`` (PEFT's own merge)."""
    from peft.tuners.lora import LoraLayer

    for module in pm.modules():
        if isinstance(module, LoraLayer):
            module.scale_layer(scale)
    return pm.merge_and_unload().eval()


@pytest.fixture(scope="module")
def official(tiny_checkpoint):
    """Loads a fresh official tiny model per call (PEFT changes the model it wraps; deepcopy cannot copy it)."""
    import torch

    from qwen3_tts_edge.export.torch_reference import load_official

    torch.set_num_threads(1)  # tiny matrices: thread hand-offs cost more than the maths

    return lambda: load_official(tiny_checkpoint)


@pytest.fixture(scope="module")
def packs(official, tiny_bundle, tmp_path_factory):
    """name -> (pack path, merged reference at the pack's scale, speaker name or None)."""
    from qwen3_tts_edge.export.voice_pack import make_voice_pack

    tmp = tmp_path_factory.mktemp("packs")
    out = {}
    for name, (targets, seed, scale, row) in CASES.items():
        folder = tmp / name.replace("+", "_")
        pm = _peft_adapter(official, folder, targets, seed, speaker_row=row)
        path = tmp / f"{folder.name}.voicepack"
        make_voice_pack(folder, tiny_bundle, path, scale=scale, speaker_rows={"newspk": NEW_ROW} if row else None,
                        adapter_type="f32", languages=["english"])
        out[name] = (path, _merged(pm, scale), "newspk" if row else None)
    return out


@pytest.fixture(scope="module")
def tts(tiny_bundle):
    """A TTS over the bundle's f32 engines with the strict settings (f32 KV cache, flash attention off)."""
    from qwen3_tts_edge.bench.parity import _engines
    from qwen3_tts_edge.runtime.engine.contract import GenerationEngines
    from qwen3_tts_edge.runtime.pipeline import TTS

    talker, predictor, tables = _engines(_bundle(tiny_bundle), "f32", strict=True)
    return TTS.from_engines(GenerationEngines(talker, predictor, tables), tiny_bundle)


def _bundle(path):
    from qwen3_tts_edge.runtime.bundle import load_bundle

    return load_bundle(path)


def _codes(tts, frames=30, **kw):
    kw.setdefault("speaker", "ryan")
    chunks = tts.stream(TEXT, language="english", greedy=True, max_frames=frames, frames_per_text_token=None,
                        repeat_frames=None, **kw)
    return np.concatenate([c.codes for c in chunks])


def _lockstep(tts, reference, pack, speaker, frames):
    """Greedy decisions of our engines (pack set, or none) against the merged official model along its own
    trajectory (bench/parity.py ``greedy_agreement``, with the request's tables and adapters): flips, reference
    codes."""
    from qwen3_tts_edge.bench.parity import TIE_GAP, _logits_of
    from qwen3_tts_edge.export.torch_reference import TorchPredictor, TorchTables, TorchTalker
    from qwen3_tts_edge.runtime.prompt import build_prompt
    from qwen3_tts_edge.runtime.sampler import CodeSampler, SamplingParams

    speaker = speaker or "ryan"
    plan = tts.plan(TEXT, language="english", voice=None if pack is None else str(pack), speaker=speaker)
    extra = plan.adapter[0].speakers if plan.adapter else {}
    ids = dataclasses.replace(tts.ids, speakers={**tts.ids.speakers, **extra})
    if extra and ids.model_type == "base":  # as TTS._plan_with_pack: a Base fine-tune speaks as CustomVoice
        ids = dataclasses.replace(ids, model_type="custom_voice")
    ref_talker, ref_pred, ref_tables = TorchTalker(reference), TorchPredictor(reference), TorchTables(reference)
    prompt = build_prompt(ids, tts.tokenizer, ref_tables, TEXT, language="english", speaker=speaker)
    ours_prompt = plan.first_prompt
    assert np.max(np.abs(prompt.embeds - ours_prompt.embeds)) <= 1e-5  # our tables (with the pack's rows) agree
    tts.engines.use_pack(*(plan.adapter or (None, 0.0)))
    gen = tts.engines.generation
    talker, predictor = gen.talker, gen.predictor
    m = tts.bundle.manifest
    sampler = CodeSampler(SamplingParams().greedy(), vocab_size=int(m.model["talker"]["vocab_size"]),
                          eos_id=int(m.codec_ids["codec_eos_token_id"]))
    flips, codes = [], []

    def note(frame, book, ref_scores, our_scores):
        choice, ours = int(np.argmax(ref_scores)), int(np.argmax(our_scores))
        if ours != choice:
            flips.append({"frame": frame, "codebook": book, "ref_gap": float(ref_scores[choice] - ref_scores[ours])})
        return choice

    try:
        ours_out, ref_out = talker.prefill(prompt.embeds), ref_talker.prefill(prompt.embeds)
        for k in range(frames):
            c0 = note(k, 0, sampler.process_c0(ref_out.logits, k), sampler.process_c0(ours_out.logits, k))
            sampler.generated.append(c0)
            if c0 == sampler.eos_id:
                break
            ref_logits = _logits_of(ref_pred, ref_out.hidden, c0)
            residual = np.array([int(np.argmax(lg)) for lg in ref_logits], dtype=np.int64)
            our_logits = _logits_of(predictor, ours_out.hidden, c0, forced=residual)
            for j in range(len(residual)):
                note(k, j + 1, ref_logits[j], our_logits[j])
            frame = np.concatenate([[c0], residual])
            codes.append(frame)
            embed = (ref_tables.frame_embeds(frame[None])[0] + prompt.text_track(k)).astype(np.float32)
            ours_out, ref_out = talker.step(embed), ref_talker.step(embed)
    finally:
        tts.engines.forget()  # the raw engines were driven outside the prefix cache: drop what it knew
    assert all(f["ref_gap"] < TIE_GAP for f in flips), flips
    return flips, np.array(codes)


# ----------------------------------------------------------------------------------------------------------
# parity with the merged official model


# The 200 frames in the default run for the fullest case (talker + predictor adapters and a speaker row);
# the other two cases at FRAMES, and at 200 under `pytest -m long`.
PARITY_RUNS = [("talker", FRAMES), ("talker+predictor", FRAMES), ("speaker_row", 200),
               *(pytest.param(case, 200, marks=pytest.mark.long) for case in ("talker", "talker+predictor"))]


@pytest.mark.parametrize("case,frames", PARITY_RUNS)
def test_pack_follows_the_merged_official_model_up_to_near_ties(tts, packs, case, frames):
    path, reference, speaker = packs[case]
    flips, ref_codes = _lockstep(tts, reference, path, speaker, frames)
    assert len(ref_codes) == frames
    assert len(flips) <= 3, flips  # near-ties are rare; many flips would mean drift
    identical = flips[0]["frame"] if flips else frames
    # The runtime path (TTS.stream with the pack, prefix cache, frame loop) free-runs the same codes.
    ours = _codes(tts, frames=identical, voice=str(path), speaker=speaker or "ryan")
    assert np.array_equal(ours, ref_codes[:identical])


def test_scale_zero_is_the_base_model_bit_for_bit(tts, packs):
    path = packs["talker+predictor"][0]
    base = _codes(tts)
    assert np.array_equal(_codes(tts, voice=str(path), voice_scale=0.0), base)
    assert not np.array_equal(_codes(tts, voice=str(path)), base)
    # and in the engine: the adapter set at scale 0 gives the base logits exactly
    tts.engines.use_pack(None, 0.0)  # the last request left the pack set
    gen = tts.engines.generation
    from qwen3_tts_edge.runtime.voices.voice_pack import VoicePack

    adapter = gen.talker.load_adapter(VoicePack.load(path).talker_adapter)
    x = gen.tables.text_embeds(np.arange(8))
    want = gen.talker.prefill(x).logits
    gen.talker.set_adapters([(adapter, 0.0)])
    got = gen.talker.prefill(x).logits
    gen.talker.set_adapters([])
    adapter.close()
    tts.engines.forget()
    assert np.array_equal(got, want)


def test_alternating_packs_never_serve_stale_kv(tts, packs):
    a, b = str(packs["talker"][0]), str(packs["talker+predictor"][0])
    runs = {"a": dict(voice=a), "b": dict(voice=b), "b_half": dict(voice=b, voice_scale=0.25), "base": {}}
    first = {name: _codes(tts, frames=12, **kw) for name, kw in runs.items()}
    assert len({v.tobytes() for v in first.values()}) == len(first)  # four different voices
    for _ in range(4):  # 20 requests in all, the voice changing every request
        for name, kw in runs.items():
            assert np.array_equal(_codes(tts, frames=12, **kw), first[name]), name
            assert tts.last_stats is not None
    adapters = tts.engines.adapters
    assert adapters.packs >= 2 and adapters.nbytes > 0


# ----------------------------------------------------------------------------------------------------------
# the file and its refusals


def test_pack_file_round_trip_and_info(packs, tiny_bundle, capsys):
    from qwen3_tts_edge.runtime import cli
    from qwen3_tts_edge.runtime.voices.voice_pack import VoicePack

    path = packs["speaker_row"][0]
    pack = VoicePack.load(path)
    assert pack.speakers == {"newspk": NEW_ROW} and pack.languages == ("english",) and pack.predictor_adapter
    assert pack.checkpoint["variant"] == "custom_voice" and pack.checkpoint["weights_sha256"] != "unknown"
    pack.check_for(_bundle(tiny_bundle).manifest)
    assert cli.main(["voice", "info", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "voice pack" and info["talker"]["modules"] == 14 and info["predictor"]["ranks"] == [4]


def test_damaged_and_foreign_packs_are_refused(packs, tiny_bundle, tmp_path):
    from qwen3_tts_edge.runtime.voices.voice_pack import VoicePack, VoicePackError

    src = packs["talker"][0]
    raw = bytearray(src.read_bytes())
    (tmp_path / "trunc.voicepack").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VoicePackError, match="not a readable voice pack"):
        VoicePack.load(tmp_path / "trunc.voicepack")
    raw[-10] ^= 0xFF  # a flipped bit in the adapter bytes
    (tmp_path / "tampered.voicepack").write_bytes(bytes(raw))
    with pytest.raises(VoicePackError, match="damaged"):
        VoicePack.load(tmp_path / "tampered.voicepack")
    pack = VoicePack.load(src)
    other = VoicePack(pack.talker_adapter, pack.predictor_adapter, scale=1.0,
                      checkpoint={**pack.checkpoint, "model": "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice",
                                  "weights_sha256": "0123456789abcdef"})
    other.save(tmp_path / "other.voicepack")
    with pytest.raises(VoicePackError, match="made for base Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice"):
        VoicePack.load(tmp_path / "other.voicepack").check_for(_bundle(tiny_bundle).manifest)
    for bad in (-0.1, 2.5, float("nan"), "x"):
        with pytest.raises(VoicePackError, match=r"voice scale must be"):
            VoicePack(pack.talker_adapter, scale=bad)


def test_requests_with_bad_packs_fail_before_any_audio(tts, packs, tmp_path):
    from qwen3_tts_edge.runtime.voices.voice_pack import VoicePackError

    path = str(packs["talker"][0])
    with pytest.raises(VoicePackError, match=r"voice scale must be in \[0, 2\]"):
        tts.stream(TEXT, speaker="ryan", voice=path, voice_scale=2.5)
    with pytest.raises(VoicePackError, match="does not exist"):
        tts.stream(TEXT, speaker="ryan", voice=str(tmp_path / "missing.voicepack"))
    with pytest.raises(VoicePackError, match="voice packs .* only"):
        tts.stream(TEXT, speaker="ryan", voice_scale=0.5)


def test_the_onnx_engine_refuses_packs_naming_llama_cpp(tiny_bundle, packs):
    from qwen3_tts_edge.runtime.pipeline import TTS
    from qwen3_tts_edge.runtime.voices.voice_pack import VoicePackError

    path = str(packs["talker"][0])
    for max_batch in (1, 2):  # alone and batched: the ONNX graphs have no adapters either way
        onnx = TTS(tiny_bundle, backend="onnxruntime", max_batch=max_batch, load=("generation",))
        with pytest.raises(VoicePackError, match=r"the onnxruntime engine cannot apply voice packs .* run on the "
                                                 r"llama.cpp engine: load a GGUF talker precision"):
            onnx.stream(TEXT, speaker="ryan", voice=path)


def test_the_adapter_cache_keeps_pack_metadata_and_rereads_the_checked_file(tiny_bundle, packs, tmp_path):
    """Parsed pack files are kept without their adapter bytes; when an adapter must be loaded again the file is
    read again and its checksum checked (a file changed behind an unchanged size and mtime is refused)."""
    import os
    import shutil

    from qwen3_tts_edge.runtime.pipeline import TTS
    from qwen3_tts_edge.runtime.voices.voice_pack import VoicePackError

    tts = TTS(tiny_bundle, talker_precision="f32", load=("generation",))
    cache = tts.engines.adapters
    path = tmp_path / "a.voicepack"
    shutil.copy(packs["talker+predictor"][0], path)
    first = cache.pack(path)
    assert first.has_adapters  # read from the file
    tts.engines.use_pack(first, 1.0)
    shell = cache.pack(path)  # its adapters are loaded: metadata only, no file read
    assert not shell.has_adapters and shell.digest == first.digest and shell.nbytes == first.nbytes > 0
    assert all(not p.has_adapters for p in cache._files.values())  # no adapter bytes kept twice
    cache.max_bytes = 0
    tts.engines.use_pack(None, 0.0)  # the pack leaves the contexts: beyond the budget, its adapters are freed
    assert cache.packs == 0
    assert cache.pack(path).has_adapters  # no adapters loaded: the file is read (and checked) again
    tts.engines.use_pack(shell, 1.0)  # a planned request whose adapters were freed meanwhile: read again
    assert cache.packs == 1
    tts.engines.use_pack(None, 0.0)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    st = path.stat()
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: the cache cannot tell
    with pytest.raises(VoicePackError, match="damaged"):
        cache.pack(path)
    with pytest.raises(VoicePackError, match="damaged"):
        tts.engines.use_pack(shell, 1.0)
    assert cache.packs == 0


# ----------------------------------------------------------------------------------------------------------
# packs in continuous batching (grouped steps)


@pytest.fixture(scope="module")
def alone_and_batched(tiny_bundle):
    """The same f32 engines one request at a time and batching four (the settings test_batching.py compares)."""
    from qwen3_tts_edge.runtime.pipeline import TTS

    return TTS(tiny_bundle, talker_precision="f32"), TTS(tiny_bundle, talker_precision="f32", max_batch=4)


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_streams_with_different_packs_in_one_batch_equal_themselves_alone(alone_and_batched, packs, greedy,
                                                                          monkeypatch):
    """Two packs, the same pack twice and no pack in one batch: each stream's codes are its codes alone (up to a
    numerical near-tie, test_batching.py's rule); the two streams of one pack share decodes."""
    from test_batching import Decisions, _run_together, assert_same_up_to_a_near_tie
    from test_batching import _codes as codes_of

    alone, batched = alone_and_batched
    a, b = str(packs["talker"][0]), str(packs["talker+predictor"][0])
    requests = [dict(text=TEXT, speaker="ryan", language="english", voice=a, seed=11),
                dict(text="A second voice speaks beside the first one for a while.", speaker="vivian",
                     language="english", voice=b, seed=12),
                dict(text="No pack here, only the base model's preset speaker.", speaker="serena",
                     language="english", seed=13),
                dict(text="The first pack again, in another stream.", speaker="aiden", language="english", voice=a,
                     voice_scale=1.0, seed=14)]
    decisions = Decisions(monkeypatch)
    expected = []
    for r in requests:
        expected.append(codes_of(alone.stream(**{"max_frames": 32, **r, "greedy": greedy, "chunk_frames": (1,)})))
    alone_decisions = decisions.take()
    stats = batched.engines.scheduler.stats
    rows, decodes, switches = stats.talker_rows, stats.talker_decodes, stats.adapter_switches
    got = _run_together(batched, requests, greedy, join_after=2)
    batched_decisions = decisions.take()
    assert len({e.tobytes() for e in expected}) == len(expected)
    for i, r in enumerate(requests):
        assert not isinstance(got[i], Exception), got[i]
        assert_same_up_to_a_near_tie(alone_decisions[r["seed"]], batched_decisions[r["seed"]], f"request {i}")
        if all(x[2] == y[2] for x, y in zip(alone_decisions[r["seed"]], batched_decisions[r["seed"]], strict=True)):
            np.testing.assert_array_equal(codes_of(got[i]), expected[i], err_msg=f"request {i}")
    assert stats.adapter_switches > switches  # the groups took turns on the contexts
    assert stats.talker_rows - rows > stats.talker_decodes - decodes  # some decodes held several streams (pack a)
    assert batched.engines.scheduler.active == 0 and batched.engines.adapters.packs >= 2


def test_packs_switching_on_batched_lanes_never_serve_stale_kv(alone_and_batched, packs, monkeypatch):
    """Requests that alternate packs, scales and the base model over the sequences of a batched engine (each
    saving its voice prefix in the store all sequences share) each make their own codes: the same as alone and
    the same every round."""
    from test_batching import Decisions, assert_same_up_to_a_near_tie

    alone, batched = alone_and_batched
    a, b = str(packs["talker"][0]), str(packs["talker+predictor"][0])
    runs = {"a": dict(voice=a), "b": dict(voice=b), "b_half": dict(voice=b, voice_scale=0.25), "base": {}}
    decisions = Decisions(monkeypatch)
    want, alone_decisions = {}, {}
    for name, kw in runs.items():
        want[name] = _codes(alone, frames=12, seed=1, **kw)
        alone_decisions[name] = decisions.take()[1]
    assert len({v.tobytes() for v in want.values()}) == len(want)  # four different voices
    first = {}
    for round_ in range(3):
        for name, kw in runs.items():
            got = _codes(batched, frames=12, seed=1, **kw)
            assert_same_up_to_a_near_tie(alone_decisions[name], decisions.take()[1], f"{name}, round {round_}")
            if round_ == 0:
                first[name] = got
            else:
                assert np.array_equal(got, first[name]), name
    assert batched.engines.lanes.saved.voices >= len(runs)  # each voice's prefix saved under its own key


def test_unmappable_modules_are_refused_with_the_list(official, tiny_bundle, tmp_path):
    from qwen3_tts_edge.export.voice_pack import VoicePackExportError, make_voice_pack

    _peft_adapter(official, tmp_path / "head", MODULES, 4, extra_targets=["codec_head", "linear_fc1"])
    with pytest.raises(VoicePackExportError, match=r"cannot carry: \['talker.codec_head', "
                                                    r"'talker.text_projection.linear_fc1'\]"):
        make_voice_pack(tmp_path / "head", tiny_bundle, tmp_path / "x.voicepack")
    _peft_adapter(official, tmp_path / "rows", MODULES, 5, speaker_row=True)
    with pytest.raises(VoicePackExportError, match="name the rows it wrote with --speaker-row"):
        make_voice_pack(tmp_path / "rows", tiny_bundle, tmp_path / "x.voicepack")
    with pytest.raises(VoicePackExportError, match=r"rows \[3000\] not named"):
        make_voice_pack(tmp_path / "rows", tiny_bundle, tmp_path / "x.voicepack", speaker_rows={"s": 2999})
    assert not (tmp_path / "x.voicepack").exists()


def test_cli_pack_and_speak(official, tiny_bundle, tmp_path, capsys):
    from qwen3_tts_edge.runtime import cli

    _peft_adapter(official, tmp_path / "p", TALKER_ONLY, 6)
    out = tmp_path / "v.voicepack"
    assert cli.main(["voice", "pack", str(tmp_path / "p"), "-b", str(tiny_bundle), "-o", str(out),
                     "--scale", "0.35"]) == 0
    assert "default scale 0.35" in capsys.readouterr().err
    wav = tmp_path / "a.wav"
    assert cli.main(["speak", "Hello.", "-b", str(tiny_bundle), "--speaker", "ryan", "--voice", str(out),
                     "--voice-scale", "0.5", "--max-frames", "4", "-o", str(wav)]) == 0
    assert wav.stat().st_size > 0
    assert cli.main(["speak", "Hello.", "-b", str(tiny_bundle), "--speaker", "ryan", "--voice", str(out),
                     "--voice-scale", "3", "--max-frames", "4", "-o", str(wav)]) == cli.EXIT_ERROR
    assert "voice scale must be in [0, 2]" in capsys.readouterr().err
