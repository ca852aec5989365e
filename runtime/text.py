"""Torch-free Qwen2 text tokenizer for the edge runtime.

Qwen3-TTS checkpoints ship the text tokenizer as ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``
and no ``tokenizer.json``; the official stack gets a ``Qwen2TokenizerFast`` by converting those files with
transformers. The runtime must not depend on torch or transformers, so this module rebuilds the same
``tokenizers`` pipeline from the three files directly:

* normalizer NFC (the official Qwen2 tokenizers normalize; tiktoken-style Qwen encoders do not, so they
  agree only on NFC text),
* pre-tokenizer: the Qwen2 split regex (isolated pieces), then byte-level mapping without its own regex and
  without a prefix space,
* BPE over vocab.json / merges.txt, ByteLevel decoder (invalid UTF-8 decodes to U+FFFD, i.e.
  ``errors="replace"``),
* the added tokens of ``added_tokens_decoder`` at their configured ids, matched before normalization, so
  ``<|im_start|>`` in the prompt template is one id (``split_special_tokens: false``).

The official chat templates around the text (and the slices that cut the content ids back out) are here
too, so that the prompt and the incremental text feed share one copy. Only ``tokenizers`` and the standard
library are used here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .bundle import TOKENIZER_FILES

#: The Qwen2 pre-tokenization pattern (identical to the one tiktoken's Qwen encoders use).
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)

# The official chat templates the talker's text is wrapped in, and where the content sits in their ids
# (the official Qwen3TTSModel wrapper's fixed offsets). They live here, beside the tokenizer, because both
# prompt.py and text_feed.py need them and prompt.py imports text_feed.py (defining them in prompt.py would be a cycle).
ASSISTANT_PREFIX = "<|im_start|>assistant\n"  # 3 ids: <|im_start|>, assistant, \n
ASSISTANT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"  # 5 ids
CONTENT_SLICE = slice(3, -5)  # content ids of ``assistant_text(text)``
REF_CONTENT_SLICE = slice(3, -2)  # content ids of ``ref_text_template(text)``


def assistant_text(text: str) -> str:
    """The text to speak in the official template; its content ids are ``ids[CONTENT_SLICE]``."""
    return f"{ASSISTANT_PREFIX}{text}{ASSISTANT_SUFFIX}"


def ref_text_template(text: str) -> str:
    """A Base ICL reference text in the official template; its content ids are ``ids[REF_CONTENT_SLICE]``."""
    return f"{ASSISTANT_PREFIX}{text}<|im_end|>\n"


def instruct_text(instruct: str) -> str:
    """A voice instruction in the official template (all its ids go into the prompt)."""
    return f"<|im_start|>user\n{instruct}<|im_end|>\n"


def _required(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(
            f"text tokenizer file {name} is missing in {folder} (a Qwen3-TTS checkpoint folder needs "
            f"{', '.join(TOKENIZER_FILES)})"
        )
    return path


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt lines ``left right``; the optional ``#version`` header and blank lines are skipped."""
    merges = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected 'left right', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def load_text_tokenizer(folder: Path) -> Tokenizer:
    """Build the Qwen2 text tokenizer of a checkpoint folder (see the module docstring).

    The added tokens are also put into the BPE vocabulary at their configured ids: ``tokenizers`` only
    numbers new added tokens consecutively after the vocabulary, and writing the ids explicitly keeps them
    right even if a config had gaps. BPE never produces them (no merge leads there).
    """
    folder = Path(folder)
    vocab_path, merges_path, config_path = (_required(folder, name) for name in TOKENIZER_FILES)
    vocab: dict[str, int] = json.loads(vocab_path.read_text(encoding="utf-8"))
    config = json.loads(config_path.read_text(encoding="utf-8"))

    added = sorted(((int(k), v) for k, v in config.get("added_tokens_decoder", {}).items()), key=lambda t: t[0])
    for token_id, spec in added:
        known = vocab.get(spec["content"])
        if known is not None and known != token_id:
            raise ValueError(f"added token {spec['content']!r} has id {token_id} but vocab.json says {known}")
        vocab[spec["content"]] = token_id

    tokenizer = Tokenizer(BPE(vocab=vocab, merges=_read_merges(merges_path), fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    for token_id, spec in added:
        token = AddedToken(
            spec["content"],
            single_word=spec.get("single_word", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            normalized=spec.get("normalized", False),
            special=spec.get("special", True),
        )
        if token.special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
        if tokenizer.token_to_id(spec["content"]) != token_id:
            raise ValueError(f"added token {spec['content']!r} did not land at id {token_id}")
    return tokenizer


class TextTokenizer:
    """The runtime's view of the text tokenizer: plain id lists, no special handling beyond the config.

    ``encode`` never adds BOS/EOS (Qwen2 has none); callers tokenize the full templated prompt (e.g.
    :func:`assistant_text`) and slice it (:data:`CONTENT_SLICE`), as the official code does.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer

    @classmethod
    def from_folder(cls, folder: Path) -> TextTokenizer:
        """Load from a folder holding vocab.json, merges.txt and tokenizer_config.json."""
        return cls(load_text_tokenizer(folder))

    @property
    def tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Regular plus added tokens (151676 for Qwen3-TTS)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; added tokens written literally in ``text`` become their single ids."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        """Id of one token string: an added token (``"<tts_pad>"``) or a vocab.json entry in its
        byte-level spelling (``"Ġworld"`` for " world")."""
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{token!r} is not a token of this text tokenizer")
        return token_id
