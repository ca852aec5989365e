"""The talker's dual-track prompt, built exactly as the official ``generate`` builds ``inputs_embeds``.

Every prompt position is the sum of a text-track vector (projected text embedding) and a codec-track
vector (talker codec embedding), laid out per mode: CustomVoice (preset speaker row; dialect speakers
switch the language tag; instruct on 1.7B), VoiceDesign (instruct), Base x-vector and Base ICL (reference
codes + reference text), with language ``auto`` or explicit, in the streaming-text layout (one text token
per generated frame, the rest fed as ``trailing``) or the non-streaming layout (whole text in the prompt).
The text is templated and sliced by the official fixed offsets (``runtime/text.py``). Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from .engine.contract import EmbeddingTables
from .errors import Qwen3TTSEdgeError
from .text import CONTENT_SLICE, REF_CONTENT_SLICE, TextTokenizer, assistant_text, instruct_text, ref_text_template
from .text_feed import DEFAULT_TEXT_TIMEOUT_S, StreamingTextTrack, TextError, TextFeed, check_text

MODES = ("custom_voice", "voice_design", "base")


EMPTY_TEXT = "text to speak must be non-empty (it is empty or only whitespace)"


class PromptError(Qwen3TTSEdgeError, ValueError):
    """The request does not fit the model (wrong mode option, unknown speaker/language, bad voice)."""


@dataclass(frozen=True)
class ModelIds:
    """The ids and options a prompt needs, read from the bundle manifest (never constants)."""

    model_type: str
    model_size: str | None
    token_ids: Mapping[str, int]
    codec_ids: Mapping[str, int]
    languages: Mapping[str, int]
    speakers: Mapping[str, int]
    speaker_dialects: Mapping[str, str]

    @classmethod
    def from_manifest(cls, manifest) -> ModelIds:
        return cls(model_type=manifest.model["tts_model_type"], model_size=manifest.model.get("tts_model_size"),
                   token_ids=manifest.token_ids, codec_ids=manifest.codec_ids, languages=manifest.languages,
                   speakers=manifest.speakers, speaker_dialects=manifest.speaker_dialects)

    def public_languages(self) -> list[str]:
        """Languages a caller may ask for: 'auto' plus the non-dialect ones (dialects come from speakers)."""
        return ["auto"] + sorted(name for name in self.languages if "dialect" not in name)


@dataclass(frozen=True)
class VoicePrompt:
    """A Base-model voice: the speaker x-vector, and for ICL cloning the reference codes and text."""

    speaker_embedding: np.ndarray
    ref_codes: np.ndarray | None = None
    ref_text: str | None = None

    @property
    def icl(self) -> bool:
        return self.ref_codes is not None


@dataclass(frozen=True)
class Prompt:
    """Prefill vectors and the text track still to be fed, one vector per generated frame."""

    embeds: np.ndarray  # (n, H) float32
    trailing: np.ndarray  # (m, H) float32: text-track vectors for decode steps 0..m-1
    tts_pad: np.ndarray  # (H,) text-track vector once ``trailing`` is used up
    n_text_tokens: int  # content tokens of the target text (for runaway guards)
    live: StreamingTextTrack | None = None  # incremental text: vectors come from a live feed instead
    # Leading positions that depend only on the voice (instruct, role, codec tags, speaker, ICL reference text),
    # not on the text to speak: the part a per-voice KV cache can keep between requests.
    voice_positions: int = 0

    def text_track(self, step: int) -> np.ndarray:
        """Text-track vector added to the talker input of decode step ``step``."""
        if self.live is not None:
            return self.live.vector(step)
        return self.trailing[step] if step < len(self.trailing) else self.tts_pad

    def text_tokens(self) -> int:
        """Content tokens known so far (all of them unless the text is still arriving)."""
        return self.live.n_text_tokens if self.live is not None else self.n_text_tokens

    def close(self) -> None:
        """Stop an incremental text feed (cancellation)."""
        if self.live is not None:
            self.live.feed.close()


def _ids(values) -> np.ndarray:
    return np.asarray(list(values), dtype=np.int64)


def instruct_token_ids(tokenizer: TextTokenizer, instruct: str | None) -> np.ndarray | None:
    """The instruction's prompt tokens (its chat turn), made once per request: a long request's every segment
    repeats them, and a server lets an instruction run to thousands of characters."""
    return _ids(tokenizer.encode(instruct_text(instruct))) if instruct else None


def resolve_language(ids: ModelIds, language: str | None, speaker: str | None) -> int | None:
    """Codec language id for ``language`` (None for auto), with the official dialect switch."""
    lang = (language or "auto").strip().lower()
    if lang != "auto" and (lang not in ids.languages or "dialect" in lang):
        raise PromptError(f"unsupported language {language!r}; choose one of {', '.join(ids.public_languages())}")
    lang_id = None if lang == "auto" else ids.languages[lang]
    if speaker and lang in ("chinese", "auto"):
        dialect = ids.speaker_dialects.get(speaker.lower())
        if dialect:
            lang_id = ids.languages[dialect]
    return lang_id


def check_request(ids: ModelIds, speaker: str | None, instruct: str | None, voice: VoicePrompt | None) -> None:
    """Reject options the bundle's model type cannot honour, listing what it can."""
    mode = ids.model_type
    if mode not in MODES:
        raise PromptError(f"unknown model type {mode!r} in the bundle; expected one of {', '.join(MODES)}")
    if mode == "custom_voice":
        # No speaker is allowed, as in the official code: the prompt then carries no speaker row.
        if speaker and speaker.lower() not in ids.speakers:
            raise PromptError(f"unknown speaker {speaker!r}; choose one of {', '.join(sorted(ids.speakers))}")
        if instruct and ids.model_size == "0b6":
            raise PromptError("the 0.6B CustomVoice model does not support instruct (the 1.7B one does)")
    elif speaker:
        hint = "give a voice prompt instead" if mode == "base" else "describe the voice with instruct"
        raise PromptError(f"speaker names exist only on CustomVoice models; this is a {mode} model ({hint})")
    if mode == "base":
        if voice is None:
            raise PromptError("a Base model clones a voice: give a voice prompt (speaker embedding, optionally "
                              "reference codes + reference text)")
    elif voice is not None:
        raise PromptError(f"voice prompts are for Base models; this is a {mode} model")
    if mode == "base" and instruct:
        raise PromptError("Base (voice clone) models take no instruct")


def _check_voice(voice: VoicePrompt, hidden: int, groups: int) -> None:
    emb = np.asarray(voice.speaker_embedding)
    if emb.shape != (hidden,) or not np.issubdtype(emb.dtype, np.floating) or not np.all(np.isfinite(emb)):
        raise PromptError(f"speaker embedding must be {hidden} finite floats, got shape {emb.shape} {emb.dtype}")
    if voice.ref_codes is not None:
        codes = np.asarray(voice.ref_codes)
        shape_ok = codes.ndim == 2 and codes.shape[1] == groups and codes.shape[0] >= 1
        if not shape_ok or not np.issubdtype(codes.dtype, np.integer):
            raise PromptError(f"reference codes must be integers of shape (frames, {groups}), got {codes.shape}")
        if not voice.ref_text:
            raise PromptError("ICL cloning needs the reference text (what is said in the reference audio)")


def validate_text(text: str) -> None:
    """The rule for whole text (incremental text follows it as it arrives): valid Unicode, not blank."""
    if not text.strip():
        raise PromptError(EMPTY_TEXT)
    try:
        check_text(text)
    except TextError as exc:
        raise PromptError(str(exc)) from None


def build_prompt(
    ids: ModelIds,
    tokenizer: TextTokenizer,
    tables: EmbeddingTables,
    text: str | Iterable[str],
    *,
    language: str | None = "auto",
    speaker: str | None = None,
    instruct: str | None = None,
    instruct_ids: np.ndarray | None = None,
    voice: VoicePrompt | None = None,
    streaming_text: bool = True,
    num_code_groups: int = 16,
    text_timeout_s: float | None = DEFAULT_TEXT_TIMEOUT_S,
) -> Prompt:
    """Prefill embeddings + trailing text track for one utterance, position by position like the official code.

    ``text`` may be an iterable of pieces still arriving (incremental text, streaming-text layout only): the
    prompt waits for the first token, and the rest is fed frame by frame as it becomes final (each frame waits
    up to ``text_timeout_s`` for its token). Text must hold a non-whitespace character, whole or incremental.
    ``instruct_ids``: ``instruct`` already tokenised (:func:`instruct_token_ids`), as a request's segments share it.
    """
    _check_inputs(ids, tables, text, speaker, instruct, voice, streaming_text, num_code_groups)
    tok, cod = ids.token_ids, ids.codec_ids
    lang_id = resolve_language(ids, language, speaker)
    feed, text_ids, content = _first_content(tokenizer, text, text_timeout_s)
    bos_vec, eos_vec, pad_vec = tables.text_embeds(_ids([tok["tts_bos_token_id"], tok["tts_eos_token_id"],
                                                         tok["tts_pad_token_id"]]))
    parts: list[np.ndarray] = []
    if instruct:
        parts.append(tables.text_embeds(instruct_token_ids(tokenizer, instruct) if instruct_ids is None
                                        else instruct_ids))
    parts.append(tables.text_embeds(text_ids[:3]))  # <|im_start|>assistant\n
    voice_part, codec_bos = _codec_prefix(ids, tables, lang_id, speaker, voice, bos_vec, pad_vec)
    parts.append(voice_part)
    fixed = sum(len(p) for p in parts)  # the target text enters after these (and after an ICL reference text)

    if voice is not None and voice.icl:
        ref_ids = _ids(tokenizer.encode(ref_text_template(voice.ref_text)))[REF_CONTENT_SLICE]
        icl, trailing = _icl_block(ids, tables, ref_ids, content, np.asarray(voice.ref_codes, dtype=np.int64),
                                   eos_vec, pad_vec, streaming_text)
        parts.append(icl)
        fixed += len(ref_ids)
    elif feed is not None:
        parts.append(tables.text_embeds(content[:1]) + codec_bos)
        embeds = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
        live = StreamingTextTrack(feed, tables, consumed=1, eos_vec=eos_vec, pad_vec=pad_vec,
                                  timeout_s=text_timeout_s)
        return Prompt(embeds=embeds, trailing=np.zeros((0, tables.hidden_size), np.float32),
                      tts_pad=pad_vec.astype(np.float32), n_text_tokens=1, live=live, voice_positions=fixed)
    elif streaming_text:
        parts.append(tables.text_embeds(content[:1]) + codec_bos)
        trailing = np.concatenate([tables.text_embeds(content[1:]), eos_vec[None]])
    else:
        pad_rows = tables.codec_embeds(_ids([cod["codec_pad_id"]] * (len(content) + 1)))
        parts.append(np.concatenate([tables.text_embeds(content), eos_vec[None]]) + pad_rows)
        parts.append((pad_vec + codec_bos)[None])
        trailing = pad_vec[None]
    embeds = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    return Prompt(embeds=embeds, trailing=np.ascontiguousarray(trailing, dtype=np.float32),
                  tts_pad=pad_vec.astype(np.float32), n_text_tokens=int(len(content)), voice_positions=fixed)


def _check_inputs(ids: ModelIds, tables: EmbeddingTables, text: str | Iterable[str], speaker: str | None,
                  instruct: str | None, voice: VoicePrompt | None, streaming_text: bool, num_code_groups: int) -> None:
    """Every request error before any work: text, mode options, voice shape."""
    if not isinstance(text, str):
        if not streaming_text:
            raise PromptError("incremental text needs the streaming-text layout (streaming_text=True)")
        if voice is not None and voice.icl:
            raise PromptError("incremental text is not supported with ICL voice prompts (reference codes); "
                              "use an x-vector voice or pass the whole text")
    else:
        validate_text(text)
    check_request(ids, speaker, instruct, voice)
    if voice is not None:
        _check_voice(voice, tables.hidden_size, num_code_groups)


def _first_content(tokenizer: TextTokenizer, text: str | Iterable[str],
                   timeout_s: float | None) -> tuple[TextFeed | None, np.ndarray, np.ndarray]:
    """(live feed or None, templated ids, content ids known now): all of a string, the first token of a feed."""
    if isinstance(text, str):
        text_ids = _ids(tokenizer.encode(assistant_text(text)))
        feed, content = None, text_ids[CONTENT_SLICE]
    else:
        feed = TextFeed(text, tokenizer)
        has_text = feed.wait_for_content(timeout=timeout_s)
        if has_text is None:
            feed.close()
            raise PromptError(f"the text iterator gave no text within {timeout_s:g} s")
        if not has_text:
            raise PromptError(EMPTY_TEXT)
        text_ids = _ids(tokenizer.encode(assistant_text("")))  # role prefix only; content comes from the feed
        content = _ids(feed.available()[0][:1])
    if len(content) == 0:
        raise PromptError("text to speak tokenizes to nothing")
    return feed, text_ids, content


def _codec_prefix(ids: ModelIds, tables: EmbeddingTables, lang_id: int | None, speaker: str | None,
                  voice: VoicePrompt | None, bos_vec: np.ndarray, pad_vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codec tags (+ speaker) summed with tts_pad, the last fed one (codec pad) with tts_bos; and codec bos."""
    cod = ids.codec_ids
    if lang_id is None:
        tags = [cod["codec_nothink_id"], cod["codec_think_bos_id"], cod["codec_think_eos_id"]]
    else:
        tags = [cod["codec_think_id"], cod["codec_think_bos_id"], lang_id, cod["codec_think_eos_id"]]
    codec_rows = [tables.codec_embeds(_ids(tags))]
    if ids.model_type == "custom_voice" and speaker:
        codec_rows.append(tables.codec_embeds(_ids([ids.speakers[speaker.lower()]])))
    elif voice is not None:
        codec_rows.append(np.asarray(voice.speaker_embedding, dtype=np.float32)[None, :])
    codec_rows.append(tables.codec_embeds(_ids([cod["codec_pad_id"], cod["codec_bos_id"]])))
    codec = np.concatenate(codec_rows)
    text_track = np.concatenate([np.repeat(pad_vec[None], len(codec) - 2, axis=0), bos_vec[None]])
    return text_track + codec[:-1], codec[-1]


def _icl_block(ids: ModelIds, tables: EmbeddingTables, ref_ids: np.ndarray, content: np.ndarray,
               ref_codes: np.ndarray, eos_vec: np.ndarray, pad_vec: np.ndarray,
               streaming_text: bool) -> tuple[np.ndarray, np.ndarray]:
    """ICL positions: reference + target text against [codec bos, reference frames] (official generate_icl_prompt)."""
    cod = ids.codec_ids
    text = np.concatenate([tables.text_embeds(np.concatenate([ref_ids, content])), eos_vec[None]])
    codec = np.concatenate([tables.codec_embeds(_ids([cod["codec_bos_id"]])), tables.frame_embeds(ref_codes)])
    if not streaming_text:
        first = text + tables.codec_embeds(_ids([cod["codec_pad_id"]] * len(text)))
        return np.concatenate([first, codec + pad_vec]), pad_vec[None]
    if len(text) > len(codec):
        return text[: len(codec)] + codec, text[len(codec):]
    padded = np.concatenate([text, np.repeat(pad_vec[None], len(codec) - len(text), axis=0)])
    return padded + codec, pad_vec[None]
