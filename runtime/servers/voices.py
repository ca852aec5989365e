"""The servers' voice catalogue: the bundle's preset speakers plus the voice files saved in ``--voices DIR``
and the LoRA voice packs placed there (``DIR/<name>.voicepack``, listed by file name, read on first use).

A saved voice is ``DIR/<name>.voice`` (the runtime's voice file, made by ``qwen3-tts-edge voice create`` or
uploaded through ``POST /v1/audio/voices``). The listing is re-read when the folder's mtime changes (not on
every request), so voices copied in by hand appear without a restart. New files are written durably and
atomically (fsynced, then linked into place, never over an existing voice); temporary files a crash left behind
are removed at start. Names are checked whole (``fullmatch``) so a request can never write outside the folder,
and the folder holds at most ``max_voices`` voices.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import Qwen3TTSEdgeError
from ..languages import language_code, model_language
from ..voices.voice_file import Voice
from ..voices.voice_pack import PACK_SUFFIX

SUFFIX = ".voice"
NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_VOICE = "default"  # the one voice of a bundle without preset speakers (VoiceDesign: instruct decides)
DEFAULT_MAX_VOICES = 256  # saved voices a server keeps; a full folder refuses uploads (409)
# OpenAI's voice names. Its API refuses any other, and so do clients that check before sending (pipecat's
# OpenAITTSService); Home Assistant's and LiveKit's OpenAI plugins default to one of them.
OPENAI_VOICES = ("alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage",
                 "shimmer", "verse")
# The default table on a CustomVoice bundle: OpenAI's higher voices to the female presets, its lower ones to the
# male presets with English as their own language, alternating so that neighbouring names sound different.
CUSTOM_VOICE_ALIASES = {"alloy": "vivian", "coral": "serena", "marin": "vivian", "nova": "serena", "sage": "vivian",
                        "shimmer": "serena", "ash": "ryan", "ballad": "aiden", "cedar": "ryan", "echo": "aiden",
                        "fable": "ryan", "onyx": "aiden", "verse": "ryan"}
# Temporary files of a voice being written (Voice.save's and create's): hidden, '.<name>.voice.<random>'.
_TEMP_RULE = re.compile(r"^\..*\.voice\..+$")

log = logging.getLogger("qwen3_tts_edge.server")


class VoiceRequestError(Qwen3TTSEdgeError):
    """A voice request that cannot be served; ``status`` and ``param`` say how to answer it over HTTP."""

    status = 400

    def __init__(self, message: str, param: str | None = "voice"):
        super().__init__(message)
        self.param = param


class UnknownVoice(VoiceRequestError):
    pass


class VoiceNotFound(VoiceRequestError):
    status = 404


class VoiceExists(VoiceRequestError):
    status = 409


@dataclass(frozen=True)
class VoiceChoice:
    """What a voice name means here: a preset speaker, a saved voice, a voice pack, or neither (the bundle's
    default)."""

    name: str
    speaker: str | None = None
    voice: Voice | None = None
    pack: Path | None = None

    @property
    def spoken(self) -> Voice | str | None:
        """What the request's ``SpeakOptions.voice`` gets: the saved voice, the pack's path, or None."""
        return self.voice if self.pack is None else str(self.pack)


def language_name(value: str | None, known: list[str]) -> str:
    """A request's language (a model name such as 'english', or a code such as 'en' / 'en-US') to the model's
    name; ``known`` is the bundle's list (with 'auto'). Raises ``VoiceRequestError`` naming the choices."""
    if value is None or value == "":
        return "auto"
    name = model_language(value, known)
    if name is not None:
        return name
    choices = ", ".join(f"{n} ({language_code(n)})" if language_code(n) != n else n for n in known)
    raise VoiceRequestError(f"unsupported language {value!r}; choose one of {choices}", param="language")


def default_aliases(model_type: str, speakers: list[str]) -> dict[str, str]:
    """OpenAI's voice names on a bundle of this kind: CustomVoice, its presets (``CUSTOM_VOICE_ALIASES``, a preset
    the bundle lacks replaced by its first); VoiceDesign, its one voice (the request's ``instructions`` describe it);
    Base, none (saved voices are the user's: map them with ``--voice-alias``)."""
    if model_type == "base":
        return {}
    if not speakers:
        return dict.fromkeys(OPENAI_VOICES, DEFAULT_VOICE)
    ordered = sorted(speakers)
    return {name: target if target in speakers else ordered[0] for name, target in CUSTOM_VOICE_ALIASES.items()}


def parse_alias(text: str) -> tuple[str, str]:
    """``NAME=VOICE`` (the ``--voice-alias`` flag) -> (name, voice)."""
    name, sep, target = text.partition("=")
    if not sep or not name.strip() or not target.strip():
        raise ValueError(f"expected NAME=VOICE (e.g. alloy=vivian), got {text!r}")
    return name.strip().lower(), target.strip()


def _shown(value: object) -> str:
    """A name quoted in an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 70 else text[:67] + "..."


class VoiceCatalog:
    """Preset speakers of the bundle plus saved voices in ``directory`` (None: presets only)."""

    stray_temp_age_s = 0.0  # see _remove_stray_temporaries

    def __init__(self, speakers: list[str], model_type: str, directory: str | Path | None = None,
                 max_voices: int = DEFAULT_MAX_VOICES):
        self.speakers = sorted(speakers)
        self.model_type = model_type
        self.max_voices = max_voices
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_stray_temporaries()
        self._cache: dict[Path, tuple[tuple[int, int], Voice]] = {}
        # Per kind of file: (folder mtime_ns, inode), names.
        self._listed: dict[str, tuple[tuple[int, int], list[str]]] = {}
        self._lock = threading.Lock()
        self.aliases: dict[str, str] = {}  # other names for voices (OpenAI's), see set_aliases

    def set_aliases(self, aliases: dict[str, str]) -> None:
        """Answer ``aliases``' names (e.g. OpenAI's ``alloy``) with their voices. A name may not hide a preset; a
        target is a preset (or ``default``), a voice pack in the folder, or, on a Base bundle, a saved voice, which
        may be uploaded later."""
        checked, packs = {}, set(self.packs())
        for name, target in aliases.items():
            name = name.strip().lower()
            if not NAME_RULE.fullmatch(name):
                raise ValueError(f"voice alias {name!r} is not a usable name: use 1-64 letters, digits, '_', '-' or "
                                 "'.', starting with a letter or digit")
            if name in self.speakers or name == DEFAULT_VOICE:
                raise ValueError(f"voice alias {name!r} would hide the preset voice of that name; choose another")
            if target.lower() in self.presets:
                target = target.lower()
            elif target not in packs and (self.model_type != "base" or not NAME_RULE.fullmatch(target)):
                voices = ", ".join(self.presets + sorted(packs)) + (" or a saved voice's name"
                                                                     if self.model_type == "base" else "")
                raise ValueError(f"voice alias {name}={target}: {target!r} is not a voice of this bundle; map it to "
                                 f"one of {voices}")
            checked[name] = target
        chained = sorted(n for n, t in checked.items() if t.lower() in checked)
        if chained:
            raise ValueError(f"voice alias {chained[0]}={checked[chained[0]]} names another alias; map it to a voice")
        self.aliases = checked

    def alias_listing(self) -> dict[str, str]:
        """The aliases whose voice is there now (a saved voice may not have been uploaded yet, a pack removed)."""
        files = (set(self.saved()) | set(self.packs())
                 if any(t not in self.presets for t in self.aliases.values()) else set())
        return {n: t for n, t in self.aliases.items() if t in self.presets or t in files}

    def _remove_stray_temporaries(self) -> None:
        """Half-written voices of a server that stopped mid-write (they would fill the disk over months): those
        older than ``stray_temp_age_s`` (0 for a folder this server alone writes)."""
        cutoff = time.time() - self.stray_temp_age_s
        for p in self.directory.iterdir():
            with contextlib.suppress(OSError):
                if _TEMP_RULE.match(p.name) and p.is_file() and (not self.stray_temp_age_s or
                                                                 p.stat().st_mtime < cutoff):
                    p.unlink()
                    log.info("removed the unfinished voice file %s", p)

    @property
    def presets(self) -> list[str]:
        if self.speakers:
            return list(self.speakers)
        return [DEFAULT_VOICE] if self.model_type != "base" else []

    def saved(self) -> list[str]:
        # Voice files hold a Base checkpoint's x-vector: only a Base bundle can speak with them.
        if self.model_type != "base":
            return []
        return self._files("voices", SUFFIX)

    def packs(self) -> list[str]:
        """Voice packs in the folder (any bundle kind; a pack made for another base is refused when used)."""
        return self._files("packs", PACK_SUFFIX, lambda: set(self.presets) | set(self.saved()))

    def _files(self, kind: str, suffix: str, taken: Callable[[], set[str]] = set) -> list[str]:
        """Names of the ``*suffix`` files in the folder (not among the names ``taken()`` gives when the folder is
        re-read), re-read only when the folder's mtime or inode changed since the last listing of this kind."""
        if self.directory is None:
            return []
        try:
            st = self.directory.stat()
        except OSError:
            return []
        key = (st.st_mtime_ns, st.st_ino)
        listed = self._listed.get(kind)
        if listed is not None and listed[0] == key:
            return list(listed[1])
        exclude = taken()
        names = sorted(n for p in self.directory.glob(f"*{suffix}") if (n := p.name[: -len(suffix)])
                       not in exclude and NAME_RULE.fullmatch(n) and p.is_file())
        self._listed[kind] = (key, names)
        return list(names)

    def names(self) -> list[str]:
        return self.presets + self.saved() + self.packs()

    def default_name(self) -> str | None:
        names = self.names()
        return names[0] if names else None

    def listing(self) -> list[dict[str, str]]:
        """Voices as objects (Open WebUI reads ``id``): presets first, then saved voices, voice packs, then the
        aliases that speak (``voice`` names what they speak with)."""
        return ([{"id": n, "name": n.replace("_", " ").title() if n in self.speakers else n, "type": "preset"}
                 for n in self.presets] + [{"id": n, "name": n, "type": "saved"} for n in self.saved()]
                + [{"id": n, "name": n, "type": "pack"} for n in self.packs()]
                + [{"id": n, "name": n, "type": "alias", "voice": t} for n, t in self.alias_listing().items()])

    def _path(self, name: str) -> Path:
        if not NAME_RULE.fullmatch(name or ""):
            raise VoiceRequestError(f"voice name {_shown(name)} is not allowed: use 1-64 letters, digits, '_', '-' or "
                                    "'.', starting with a letter or digit", param="name")
        if self.directory is None:
            raise VoiceRequestError("this server keeps no saved voices; start it with --voices DIR", param=None)
        return self.directory / f"{name}{SUFFIX}"

    def resolve(self, name: str | None) -> VoiceChoice:
        """A request's voice name to what to speak with; an unknown name lists the voices there are."""
        if name is None or name == "":
            name = self.default_name()
            if name is None:
                raise UnknownVoice("this Base bundle has no voices yet: upload one (POST /v1/audio/voices, or "
                                   "`qwen3-tts-edge voice create` into the --voices folder) or pass ref_audio")
        lowered = name.strip().lower()
        if lowered in self.speakers:
            return VoiceChoice(lowered, speaker=lowered)
        if lowered == DEFAULT_VOICE and DEFAULT_VOICE in self.presets:
            return VoiceChoice(DEFAULT_VOICE)
        if NAME_RULE.fullmatch(name) and name in self.saved():
            return VoiceChoice(name, voice=self.load(name))
        if NAME_RULE.fullmatch(name) and name in self.packs():
            return VoiceChoice(name, pack=self.directory / f"{name}{PACK_SUFFIX}")
        target = self.aliases.get(lowered)
        if target is not None:
            try:
                return self.resolve(target)
            except UnknownVoice:
                raise UnknownVoice(f"voice {_shown(name)} is an alias of {target!r}, which is not saved here (yet): "
                                   f"upload it (POST /v1/audio/voices) or map {lowered} to another voice with "
                                   "--voice-alias") from None
        available = self.names()
        hint = ", ".join(available) if available else "none yet (upload one with POST /v1/audio/voices)"
        listed = self.alias_listing()
        if listed:
            hint += "; aliases: " + ", ".join(f"{n} ({t})" for n, t in listed.items())
        elif lowered in OPENAI_VOICES:
            hint += (f"; OpenAI's voice names are not mapped on this server: start it with --voice-alias "
                     f"{lowered}=VOICE")
        raise UnknownVoice(f"unknown voice {_shown(name)}; available voices: {hint}")

    def load(self, name: str) -> Voice:
        """A saved voice, read once and kept while its file is unchanged."""
        path = self._path(name)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise VoiceNotFound(f"no saved voice {name!r}") from None
        key = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._cache.get(path)
            if hit is not None and hit[0] == key:
                return hit[1]
        voice = Voice.load(path)
        with self._lock:
            self._cache[path] = (key, voice)
        return voice

    def check_new_name(self, name: str) -> Path:
        """The file a new voice would get; refuses bad names, preset names and existing voices."""
        path = self._path(name)
        if name.lower() in self.speakers or name.lower() == DEFAULT_VOICE:
            raise VoiceExists(f"{name!r} is a preset voice of this bundle; choose another name", param="name")
        if name.lower() in self.aliases:
            raise VoiceExists(f"{name!r} is an alias (of {self.aliases[name.lower()]!r}) on this server; choose "
                              "another name", param="name")
        if path.exists():
            raise VoiceExists(f"a voice named {name!r} exists; delete it first (DELETE /v1/audio/voices/{name})",
                              param="name")
        if path.with_suffix(PACK_SUFFIX).exists():
            raise VoiceExists(f"{name!r} is a voice pack in the voices folder; choose another name", param="name")
        return path

    def check_room(self) -> None:
        """Refuse a new voice when the folder already holds ``max_voices`` (before any audio is processed)."""
        if self.directory is not None and len(self.saved()) >= self.max_voices:
            raise VoiceExists(f"this server keeps at most {self.max_voices} saved voices and has them all; delete "
                              "one first (DELETE /v1/audio/voices/NAME)", param="name")

    def create(self, name: str, voice: Voice) -> Path:
        """Save a new voice durably: written to a temporary file, fsynced, then linked into place, which fails
        rather than replace a voice another request saved under the same name meanwhile."""
        path = self.check_new_name(name)
        self.check_room()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.directory)
        os.close(fd)
        try:
            voice.save(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise VoiceExists(f"a voice named {name!r} was just saved by another request; choose another name",
                                  param="name") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new name itself survives a power cut
        finally:
            os.close(dir_fd)
        return path

    def delete(self, name: str) -> None:
        if name.lower() in self.speakers or name.lower() == DEFAULT_VOICE:
            raise VoiceRequestError(f"{name!r} is a preset voice of the bundle and cannot be deleted", param="name")
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise VoiceNotFound(f"no saved voice {name!r}; saved voices: {', '.join(self.saved()) or 'none'}",
                                param="name") from None
        with self._lock:
            self._cache.pop(path, None)
