"""Engine conformance: every engine behind the contract (runtime/engine/contract.py) has the same behaviour.

Run on the llama.cpp engines (f32 GGUFs, f32 KV cache), the ONNX Runtime engines (fp32 graphs), the official
PyTorch modules (the parity reference) and the tests' numpy fake engine (tests/fake_engine.py), all on the
tiny random checkpoint. A new engine joins by adding one loader to ``_load``.

Talker: ``prefill(a ++ b)`` = ``prefill(a)`` + ``extend(b)`` = ``prefill(a)`` + one ``step`` per row; ``n_past``
counts positions; ``reset`` empties; with ``KV_STATE``, ``rewind`` + ``extend`` = a fresh prefill and
``save_state``/``load_state`` round-trip exactly. Predictor: greedy is deterministic; a host chooser is called
for steps 0..14 in order and its choices are returned; a seed replays the same sampled codes, natively and on
the host alike, using exactly 15 numbers of the stream per frame. Tables: shapes, and ``frame_embeds`` is
E(c0) plus a part that depends on the residual codes only. Decoder: any chunking of a stream gives the same PCM,
``prime`` continues after a reference. ``prompt_talker`` picks the prefix cache iff ``KV_STATE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from fake_engine import FakeDecoder, FakeDims, FakeTalker, fake_generation

from conftest import needs_export
from qwen3_tts_edge.runtime.engine.contract import (
    CAPABILITIES,
    DECODER_PRIMED_CACHE,
    KV_STATE,
    SEQUENCES,
    EngineContractError,
    FreshPromptTalker,
    GenerationEngines,
    Placement,
    capabilities,
    check_engine,
    prompt_talker,
)
from qwen3_tts_edge.runtime.sampler import GREEDY, CodeSampler, ResidualSampling, SamplingParams

NUM_STEPS = 15
SAMPLED = dict(do_sample=True, temperature=0.9, top_k=50, top_p=0.95)


@dataclass
class Gen:
    name: str
    engines: GenerationEngines
    codebook_size: int
    rtol: float  # relative tolerance between batched and one-by-one computation of the same positions

    def __post_init__(self) -> None:
        self.talker, self.predictor, self.tables = self.engines.talker, self.engines.predictor, self.engines.tables


def _load(name: str, request: pytest.FixtureRequest) -> Gen:
    if name == "fake":
        dims = FakeDims()
        return Gen(name, fake_generation(dims), dims.codebook_size, rtol=1e-6)
    from qwen3_tts_edge.runtime.bundle import load_bundle

    bundle = load_bundle(request.getfixturevalue("tiny_bundle"))
    codebook = int(bundle.manifest.audio["codebook_size"])
    if name == "llama_cpp":
        from qwen3_tts_edge.runtime.backends.llama_cpp import load_generation

        engines = load_generation(bundle, "f32", n_ctx=256, threads=1, kv_type="f32", flash_attn=False)
    elif name == "onnxruntime":
        from qwen3_tts_edge.runtime.backends.onnxruntime.generation import load_generation_onnx

        engines = load_generation_onnx(bundle, "fp32", threads=1, n_ctx=256)
    else:
        import torch

        from qwen3_tts_edge.export.torch_reference import TorchPredictor, TorchTables, TorchTalker, load_official

        torch.set_num_threads(1)
        model = load_official(request.getfixturevalue("tiny_checkpoint"))
        engines = GenerationEngines(TorchTalker(model), TorchPredictor(model), TorchTables(model))
    return Gen(name, engines, codebook, rtol=1e-4)


GENERATION = [pytest.param("fake", id="fake"),
              pytest.param("llama_cpp", id="llama_cpp", marks=needs_export),
              pytest.param("onnxruntime", id="onnxruntime", marks=needs_export),
              pytest.param("torch", id="torch", marks=needs_export)]
DECODERS = [pytest.param("fake", id="fake"), pytest.param("onnxruntime", id="onnxruntime", marks=needs_export)]


@pytest.fixture(scope="module", params=GENERATION)
def gen(request) -> Gen:
    return _load(request.param, request)


@pytest.fixture(scope="module", params=DECODERS)
def decoder(request) -> tuple[Any, int]:
    """(decoder, codebook size)."""
    if request.param == "fake":
        dims = FakeDims()
        return FakeDecoder(dims), dims.codebook_size
    from qwen3_tts_edge.runtime.backends.onnxruntime import load_decoder
    from qwen3_tts_edge.runtime.bundle import load_bundle

    bundle = load_bundle(request.getfixturevalue("tiny_bundle"))
    return load_decoder(bundle, "fp32", threads=1), int(bundle.manifest.audio["codebook_size"])


# -- helpers ------------------------------------------------------------------------------------------------------


def _inputs(gen: Gen, n: int, seed: int) -> np.ndarray:
    """``n`` talker inputs of realistic size: a text-track row plus a codec row, from the engine's own tables."""
    rng = np.random.default_rng(seed)
    text = gen.tables.text_embeds(rng.integers(0, 1000, n))
    codec = gen.tables.codec_embeds(rng.integers(0, 2048, n))
    return np.ascontiguousarray(text + codec, dtype=np.float32)


def _copy(out) -> tuple[np.ndarray, np.ndarray]:
    return np.array(out.logits, dtype=np.float32, copy=True), np.array(out.hidden, dtype=np.float32, copy=True)


def _close(gen: Gen, got, want, what: str) -> None:
    got, want = (_copy(x) if not isinstance(x, tuple) else x for x in (got, want))
    for name, g, w in zip(("logits", "hidden"), got, want, strict=True):
        assert g.shape == w.shape, f"{what}: {name} shape {g.shape} != {w.shape}"
        scale = float(np.abs(w).max()) or 1.0
        np.testing.assert_allclose(g, w, rtol=gen.rtol, atol=gen.rtol * scale, err_msg=f"{gen.name}: {what} {name}")


class Uniforms:
    """A seeded residual stream as ``ResidualSampling.uniforms`` wants it, counting what is taken."""

    def __init__(self, seed: int) -> None:
        self.rng, self.taken = np.random.default_rng(seed), 0

    def __call__(self, n: int) -> np.ndarray:
        self.taken += n
        return self.rng.random(n)


def _hidden(gen: Gen, seed: int = 0) -> np.ndarray:
    out = gen.talker.prefill(_inputs(gen, 4, seed))
    return np.array(out.hidden, dtype=np.float32, copy=True)


def _check_codes(gen: Gen, codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    assert codes.shape == (NUM_STEPS,), codes.shape
    assert np.issubdtype(codes.dtype, np.integer), codes.dtype
    assert codes.min() >= 0 and codes.max() < gen.codebook_size, codes
    return codes.astype(np.int64)


# -- every role passes the check -----------------------------------------------------------------------------------


def test_check_engine_passes_for_every_role(gen):
    declared = {role: check_engine(role, engine) for role, engine in
                (("talker", gen.talker), ("predictor", gen.predictor), ("tables", gen.tables))}
    for role, caps in declared.items():
        assert caps <= CAPABILITIES, (role, caps)
        assert caps == capabilities(getattr(gen, role))
    assert DECODER_PRIMED_CACHE not in declared["talker"] | declared["predictor"]
    for engine in (gen.talker, gen.predictor):
        assert isinstance(engine.placement, Placement), type(engine.placement)
        assert engine.placement.device in ("cpu", "gpu"), engine.placement
    assert gen.talker.hidden_size == gen.tables.hidden_size
    assert gen.talker.n_ctx is None or int(gen.talker.n_ctx) >= 32


# -- talker --------------------------------------------------------------------------------------------------------


def test_prefill_equals_extend_and_steps(gen):
    t = gen.talker
    a, b = _inputs(gen, 5, 1), _inputs(gen, 3, 2)
    whole = np.concatenate([a, b])
    refs = [_copy(t.prefill(whole[:len(a) + i + 1])) for i in range(len(b))]  # after each row of b
    logits, hidden = refs[-1]
    assert logits.ndim == 1 and logits.dtype == np.float32 and len(logits) >= 2048
    assert hidden.shape == (t.hidden_size,) and hidden.dtype == np.float32

    t.prefill(a)
    assert t.n_past == len(a)
    _close(gen, t.extend(b), refs[-1], "prefill(a) + extend(b) vs prefill(a ++ b)")
    assert t.n_past == len(whole)

    t.prefill(a)
    for i, row in enumerate(b):
        _close(gen, t.step(row), refs[i], f"prefill(a) + step {i}")
        assert t.n_past == len(a) + i + 1


def test_n_past_counts_and_reset_empties(gen):
    t = gen.talker
    a, b = _inputs(gen, 6, 3), _inputs(gen, 2, 4)
    fresh = _copy(t.prefill(a))
    assert t.n_past == 6
    t.extend(b)
    t.step(b[0])
    assert t.n_past == 9
    t.reset()
    assert t.n_past == 0
    _close(gen, t.extend(a), fresh, "reset() + extend(a) vs prefill(a)")
    t.prefill(b)
    assert t.n_past == 2  # prefill starts a new sequence
    _close(gen, t.prefill(a), fresh, "prefill(a) again, after other sequences")
    t.reset()
    assert t.n_past == 0


def _kv(gen: Gen):
    if KV_STATE not in capabilities(gen.talker):
        pytest.skip(f"{gen.name} talker does not declare KV_STATE")
    return gen.talker


def test_rewind_then_extend_equals_a_fresh_prefill(gen):
    t = _kv(gen)
    a, b, junk = _inputs(gen, 5, 5), _inputs(gen, 3, 6), _inputs(gen, 4, 7)
    want = _copy(t.prefill(np.concatenate([a, b])))
    t.prefill(np.concatenate([a, junk]))
    t.rewind(len(a))
    assert t.n_past == len(a)
    _close(gen, t.extend(b), want, "rewind(len(a)) + extend(b) vs prefill(a ++ b)")
    t.rewind(t.n_past)  # a no-op
    assert t.n_past == len(a) + len(b)
    t.rewind(0)
    assert t.n_past == 0


def test_save_and_load_state_round_trip_exactly(gen):
    t = _kv(gen)
    a, b, other = _inputs(gen, 5, 8), _inputs(gen, 2, 9), _inputs(gen, 7, 10)
    t.prefill(a)
    n, state = t.save_state()
    assert n == len(a)
    kept = np.array(state, copy=True)
    after = _copy(t.extend(b))
    np.testing.assert_array_equal(state, kept, err_msg="a saved state must not change with the live sequence")
    t.prefill(other)
    t.load_state((n, state))
    assert t.n_past == len(a)
    n2, state2 = t.save_state()
    assert n2 == n
    np.testing.assert_array_equal(state2, kept)
    again = _copy(t.extend(b))
    for name, g, w in zip(("logits", "hidden"), again, after, strict=True):
        np.testing.assert_array_equal(g, w, err_msg=f"{gen.name}: {name} after load_state differs")


# -- predictor -----------------------------------------------------------------------------------------------------


def test_greedy_predict_is_deterministic_and_in_range(gen):
    p = gen.predictor
    h = _hidden(gen, 11)
    default = _check_codes(gen, p.predict(h, 7))
    np.testing.assert_array_equal(_check_codes(gen, p.predict(h, 7, GREEDY)), default)
    np.testing.assert_array_equal(_check_codes(gen, p.predict(h, 7, ResidualSampling())), default)
    argmax = ResidualSampling.host(lambda step, logits: int(np.argmax(logits)))
    np.testing.assert_array_equal(p.predict(h, 7, argmax), default, err_msg="greedy vs a host argmax chooser")


def test_host_chooser_is_called_per_step_in_order(gen):
    p = gen.predictor
    h = _hidden(gen, 12)
    seen: list[tuple[int, np.ndarray]] = []

    def chooser(step: int, logits: np.ndarray) -> int:
        seen.append((step, np.array(logits, copy=True)))
        return (37 * step + 11) % gen.codebook_size

    codes = _check_codes(gen, p.predict(h, 3, ResidualSampling.host(chooser)))
    assert [s for s, _ in seen] == list(range(NUM_STEPS))
    np.testing.assert_array_equal(codes, [(37 * s + 11) % gen.codebook_size for s in range(NUM_STEPS)])
    assert all(logits.shape == (gen.codebook_size,) for _, logits in seen)
    assert all(np.isfinite(logits).all() for _, logits in seen)


def test_a_seed_replays_the_same_sampled_codes(gen):
    p = gen.predictor
    h = _hidden(gen, 13)
    u1, u2 = Uniforms(5), Uniforms(5)
    first = _check_codes(gen, p.predict(h, 9, ResidualSampling(**SAMPLED, uniforms=u1)))
    second = _check_codes(gen, p.predict(h, 9, ResidualSampling(**SAMPLED, uniforms=u2)))
    np.testing.assert_array_equal(first, second)
    assert u1.taken == u2.taken == NUM_STEPS, "a frame takes exactly 15 numbers of the residual stream"


def test_native_sampling_equals_the_host_draw(gen):
    """The engine's own sampling (in the graph for the fused ONNX predictor) = the host draw from the same
    stream (``ResidualSampling.choose``), frame after frame."""
    p = gen.predictor
    native_u, host_u = Uniforms(21), Uniforms(21)
    native_rule = ResidualSampling(**SAMPLED, uniforms=native_u)
    host_rule = ResidualSampling(**SAMPLED, uniforms=host_u)
    for frame in range(3):
        h = _hidden(gen, 30 + frame)
        native = _check_codes(gen, p.predict(h, 100 + frame, native_rule))
        host = _check_codes(gen, p.predict(h, 100 + frame, ResidualSampling.host(host_rule.choose)))
        np.testing.assert_array_equal(native, host, err_msg=f"{gen.name}: frame {frame}")
    assert native_u.taken == host_u.taken == 3 * NUM_STEPS


def test_code_sampler_residual_sampling_replays_a_seed(gen):
    p = gen.predictor
    h = _hidden(gen, 14)
    config = {"do_sample": True, "subtalker_dosample": True, "subtalker_temperature": 0.9, "subtalker_top_k": 50}

    def codes(seed: int) -> np.ndarray:
        sampler = CodeSampler(SamplingParams.from_generation_config(config, seed=seed), vocab_size=3072,
                              eos_id=2150)
        sampling = sampler.residual_sampling()
        return np.stack([_check_codes(gen, p.predict(h, 5, sampling)) for _ in range(2)])

    np.testing.assert_array_equal(codes(4), codes(4))


# -- several sequences (SEQUENCES: the batch scheduler's engines) --------------------------------------------------

BATCHING = [pytest.param("llama_cpp", id="llama_cpp", marks=needs_export),
            pytest.param("onnxruntime", id="onnxruntime", marks=needs_export)]


@pytest.fixture(scope="module", params=BATCHING)
def batch_gen(request) -> tuple[Gen, Gen]:
    """(engines of one sequence, the same engines made with 3 sequences)."""
    from qwen3_tts_edge.runtime.bundle import load_bundle

    bundle = load_bundle(request.getfixturevalue("tiny_bundle"))
    codebook = int(bundle.manifest.audio["codebook_size"])
    if request.param == "llama_cpp":
        from qwen3_tts_edge.runtime.backends.llama_cpp import load_generation

        make = lambda n: load_generation(bundle, "f32", n_ctx=256, threads=1, kv_type="f32", flash_attn=False,  # noqa: E731
                                         sequences=n)
    else:
        from qwen3_tts_edge.runtime.backends.onnxruntime.generation import load_generation_onnx

        make = lambda n: load_generation_onnx(bundle, "fp32", threads=1, n_ctx=256, sequences=n)  # noqa: E731
    return Gen(request.param, make(1), codebook, rtol=1e-4), Gen(request.param, make(3), codebook, rtol=1e-4)


def test_sequences_decoded_together_equal_each_alone(batch_gen):
    """Rows of different lengths, joining at different calls, handed in any order, with a state copied between
    sequences and a rewind: each sequence's outputs equal the same positions computed alone."""
    one, many = batch_gen
    assert SEQUENCES in check_engine("talker", many.talker) and many.talker.sequences == 3
    t, b = one.talker, many.talker
    prompts = [_inputs(one, n, seed) for n, seed in ((7, 1), (12, 2), (3, 3))]
    steps = [_inputs(one, 5, 10 + i) for i in range(3)]
    alone = []
    for p, st in zip(prompts, steps, strict=True):
        alone.append([_copy(t.prefill(p))] + [_copy(t.step(x)) for x in st])
    got: dict[int, list] = {0: [], 1: [], 2: []}
    for seq, out in zip((1, 0), b.decode_sequences([(1, 0, prompts[1]), (0, 0, prompts[0])]), strict=True):
        got[seq].append(_copy(out))
    for k in range(5):
        work = [(0, b.seq_length(0), steps[0][k:k + 1]), (1, b.seq_length(1), steps[1][k:k + 1])]
        if k == 1:
            work.insert(0, (2, 0, prompts[2]))  # joins with its whole prompt, first in the list
        elif k > 1:
            work.append((2, b.seq_length(2), steps[2][k - 2:k - 1]))
        for (seq, _, _), out in zip(work, b.decode_sequences(work), strict=True):
            got[seq].append(_copy(out))
    for seq in range(3):
        for i, (g, w) in enumerate(zip(got[seq], alone[seq], strict=False)):
            _close(one, g, w, f"sequence {seq}, output {i}")
    assert [b.seq_length(s) for s in range(3)] == [12, 17, 6]
    # sequence 0's state copied into sequence 2 continues as sequence 0 does alone
    b.set_seq_state(2, b.seq_state(0))
    t.prefill(prompts[0])
    for x in steps[0]:
        t.step(x)
    want = _copy(t.step(steps[1][0]))
    _close(one, b.decode_sequences([(2, 12, steps[1][:1])])[0], want, "a copied state")
    # a rewind of one sequence leaves the others
    b.seq_remove(1, 12)
    t.prefill(prompts[1])
    _close(one, b.decode_sequences([(1, 12, steps[2][:1]), (0, 12, steps[2][1:2])])[0], t.step(steps[2][0]),
           "after seq_remove(1, 12)")
    assert b.seq_length(0) == 13 and b.seq_length(2) == 13
    for seq in range(3):
        b.seq_remove(seq)
    assert [b.seq_length(s) for s in range(3)] == [0, 0, 0]


def test_predict_many_equals_predict_per_frame(batch_gen):
    one, many = batch_gen
    assert SEQUENCES in check_engine("predictor", many.predictor) and many.predictor.sequences == 3
    rng = np.random.default_rng(4)
    hidden = [rng.standard_normal(one.talker.hidden_size).astype(np.float32) for _ in range(3)]
    c0 = [5, 17, 2]

    def sampling(i: int):
        if i == 1:
            return GREEDY
        draws = np.random.default_rng(100 + i)
        return ResidualSampling(**SAMPLED, uniforms=draws.random)

    want = [one.predictor.predict(hidden[i], c0[i], sampling(i)) for i in range(3)]
    got = many.predictor.predict_many([(hidden[i], c0[i], sampling(i)) for i in range(3)])
    for i in range(3):
        np.testing.assert_array_equal(got[i], want[i], err_msg=f"{one.name}: frame {i}")


# -- tables --------------------------------------------------------------------------------------------------------


def test_tables_shapes_and_frame_embeds(gen):
    tab = gen.tables
    assert check_engine("tables", tab) == capabilities(tab)
    hsz = tab.hidden_size
    text = tab.text_embeds(np.array([1, 2, 3, 4000]))
    codec = tab.codec_embeds(np.array([0, 5, 2049]))
    assert text.shape == (4, hsz) and text.dtype == np.float32
    assert codec.shape == (3, hsz) and codec.dtype == np.float32
    rng = np.random.default_rng(15)
    codes = rng.integers(0, gen.codebook_size, (4, NUM_STEPS + 1))
    codes[:, 0] = [3, 17, 2048, 100]
    frames = tab.frame_embeds(codes)
    assert frames.shape == (4, hsz) and frames.dtype == np.float32
    one_by_one = np.concatenate([tab.frame_embeds(codes[i:i + 1]) for i in range(len(codes))])
    np.testing.assert_allclose(one_by_one, frames, rtol=1e-6, atol=1e-6)
    # E(c0) + a part of the residual codes only: changing c0 changes the row by E(c0') - E(c0).
    other = codes.copy()
    other[:, 0] = [9, 9, 1, 2050]
    residual = frames - tab.codec_embeds(codes[:, 0])
    np.testing.assert_allclose(tab.frame_embeds(other) - tab.codec_embeds(other[:, 0]), residual, atol=1e-5)
    # ... and that part really depends on the residual codes.
    shifted = codes.copy()
    shifted[:, 1:] = (shifted[:, 1:] + 1) % gen.codebook_size
    assert not np.allclose(tab.frame_embeds(shifted), frames)


# -- decoder -------------------------------------------------------------------------------------------------------


def test_decoder_contract(decoder):
    dec, codebook = decoder
    caps = check_engine("decoder", dec)
    assert caps <= CAPABILITIES and KV_STATE not in caps
    assert isinstance(dec.providers, list) and dec.providers and all(isinstance(p, str) for p in dec.providers)


def test_decode_in_chunks_equals_decode_all_at_once(decoder):
    dec, codebook = decoder
    codes = np.random.default_rng(16).integers(0, codebook, (10, NUM_STEPS + 1))
    dec.reset()
    whole = np.asarray(dec.decode(codes))
    assert whole.ndim == 1 and whole.dtype == np.float32 and len(whole) % len(codes) == 0 and len(whole)
    dec.reset()
    parts = np.concatenate([dec.decode(codes[s:e]) for s, e in ((0, 1), (1, 3), (3, 7), (7, 10))])
    np.testing.assert_allclose(parts, whole, atol=1e-5)
    dec.reset()
    np.testing.assert_allclose(dec.decode(codes), whole, atol=1e-5)  # reset starts over


def test_prime_continues_after_the_reference(decoder):
    dec, codebook = decoder
    rng = np.random.default_rng(17)
    ref, codes = rng.integers(0, codebook, (6, NUM_STEPS + 1)), rng.integers(0, codebook, (4, NUM_STEPS + 1))
    dec.reset()
    full = np.asarray(dec.decode(np.concatenate([ref, codes])))
    per_frame = len(full) // (len(ref) + len(codes))
    dec.prime(ref)
    np.testing.assert_allclose(dec.decode(codes), full[len(ref) * per_frame:], atol=1e-5)
    dec.prime(ref)  # again (a primed cache restores it)
    np.testing.assert_allclose(dec.decode(codes), full[len(ref) * per_frame:], atol=1e-5)
    if DECODER_PRIMED_CACHE in capabilities(dec):
        dec.forget_primed()
        dec.prime(ref)
        np.testing.assert_allclose(dec.decode(codes), full[len(ref) * per_frame:], atol=1e-5)


# -- the contract's own checks -------------------------------------------------------------------------------------


def test_a_declaration_without_its_methods_is_refused():
    class NoRewind(FakeTalker):
        def __getattribute__(self, name: str) -> Any:
            if name == "rewind":
                raise AttributeError(name)
            return super().__getattribute__(name)

    class Teleports(FakeTalker):
        capabilities = frozenset({KV_STATE, "teleport"})

    with pytest.raises(EngineContractError, match="rewind"):
        check_engine("talker", NoRewind())
    with pytest.raises(EngineContractError, match="teleport"):
        check_engine("talker", Teleports())
    with pytest.raises(EngineContractError, match="forget_primed"):
        check_engine("decoder", type("Dec", (), {"capabilities": frozenset({DECODER_PRIMED_CACHE}), "providers": [],
                                                 "reset": None, "prime": None, "decode": None})())

    class Batches(FakeTalker):  # SEQUENCES asks each role for its own methods
        capabilities = frozenset({SEQUENCES})

    with pytest.raises(EngineContractError, match="decode_sequences"):
        check_engine("talker", Batches())
    with pytest.raises(EngineContractError, match="fork"):
        check_engine("decoder", type("Dec", (), {"capabilities": frozenset({SEQUENCES}), "providers": [],
                                                 "reset": None, "prime": None, "decode": None})())


def test_an_engine_can_drop_a_capability_when_it_loads():
    """An engine may only know at load time what it can do (say, a talker whose KV cache lives on a GPU
    where this build cannot rewind it): its instance's declaration is the one that counts."""
    talker = FakeTalker()
    talker.capabilities = frozenset()
    assert capabilities(talker) == frozenset()
    assert isinstance(prompt_talker(talker), FreshPromptTalker)


# -- the frame loop's talker ---------------------------------------------------------------------------------------


@needs_export
def test_prompt_talker_uses_the_prefix_cache_iff_kv_state(gen, tiny_bundle):
    from qwen3_tts_edge.runtime.bundle import load_bundle
    from qwen3_tts_edge.runtime.prefix_cache import PrefixReusingTalker
    from qwen3_tts_edge.runtime.prompt import ModelIds, build_prompt
    from qwen3_tts_edge.runtime.text import TextTokenizer

    bundle = load_bundle(tiny_bundle)
    engines = fake_generation(FakeDims.from_manifest(bundle.manifest)) if gen.name == "fake" else gen.engines
    talker, tables = engines.talker, engines.tables
    ids, tok = ModelIds.from_manifest(bundle.manifest), TextTokenizer.from_folder(bundle.root / "tokenizer")
    first = build_prompt(ids, tok, tables, "A first sentence.", language="english", speaker="vivian")
    second = build_prompt(ids, tok, tables, "And then another one, longer.", language="english", speaker="vivian")
    nxt = _inputs(Gen(gen.name, engines, gen.codebook_size, gen.rtol), 1, 18)[0]
    want_first = _copy(talker.prefill(first.embeds))
    want_second = _copy(talker.prefill(second.embeds))
    want_step = _copy(talker.step(nxt))
    talker.reset()

    pt = prompt_talker(talker)
    kv = KV_STATE in capabilities(talker)
    assert isinstance(pt, PrefixReusingTalker) == kv and isinstance(pt, FreshPromptTalker) == (not kv), type(pt)
    assert pt.hidden_size == talker.hidden_size and pt.n_ctx == talker.n_ctx and pt.placement == talker.placement
    check = Gen(gen.name, engines, gen.codebook_size, gen.rtol)
    _close(check, pt.prefill(first), want_first, "prompt_talker.prefill(first prompt)")
    assert (pt.last_prefill.reused, pt.last_prefill.prefilled) == (0, len(first.embeds))
    _close(check, pt.prefill(second), want_second, "prompt_talker.prefill(second prompt, same voice)")
    report = pt.last_prefill
    assert report.reused + report.prefilled == len(second.embeds)
    assert (report.reused > 0) == kv, report  # the voice part is reused only with KV_STATE
    _close(check, pt.step(nxt), want_step, "prompt_talker.step after the second prompt")
    pt.forget()


# -- a whole request on the fake engines ---------------------------------------------------------------------------


@needs_export
def test_a_whole_request_streams_on_the_fake_engines(tiny_bundle):
    """Only this test depends on ``TTS.from_engines``, which is being added: it skips until it exists."""
    from qwen3_tts_edge.runtime.bundle import load_bundle
    from qwen3_tts_edge.runtime.pipeline import TTS

    if not hasattr(TTS, "from_engines"):
        pytest.skip("TTS.from_engines does not exist yet (being added to runtime/pipeline.py)")
    bundle = load_bundle(tiny_bundle)
    dims = FakeDims.from_manifest(bundle.manifest)
    generation, dec = fake_generation(dims), FakeDecoder(dims)
    tts = TTS.from_engines(generation, bundle=tiny_bundle, decoder=dec, name="fake")

    def run(seed: int) -> tuple[list, Any]:
        stream = tts.stream("A fake engine speaks a short line.", speaker="vivian", seed=seed, max_frames=12,
                            min_frames=12, chunk_frames=(1, 2, 4))
        return list(stream), stream.stats

    chunks, stats = run(1)
    assert [c.n_frames for c in chunks if c.n_frames][:3] == [1, 2, 4]
    assert sum(c.n_frames for c in chunks) == stats.frames == 12 and chunks[-1].final
    assert stats.stop_reason == "max_frames"
    codes = np.concatenate([c.codes for c in chunks])
    assert codes.shape == (12, NUM_STEPS + 1)
    pcm = np.concatenate([c.pcm for c in chunks])
    offline = FakeDecoder(dims)
    np.testing.assert_array_equal(pcm, offline.decode(codes))  # the stream equals the offline decode
    assert "numpy fake engine" in stats.devices.get("talker", ""), stats.devices
    again, _ = run(1)
    np.testing.assert_array_equal(np.concatenate([c.codes for c in again]), codes)  # a seed replays the request
