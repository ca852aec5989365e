"""The model's language names and the ISO 639-1 codes clients use for them ('english' <-> 'en').

Home Assistant groups voices by code, OpenAI clients and pipecat send codes such as 'en-US'; the model's
prompt takes names. The servers and the agent plugins share this table so they cannot disagree.
"""

from __future__ import annotations

LANGUAGE_CODES = {"chinese": "zh", "english": "en", "japanese": "ja", "korean": "ko", "german": "de",
                  "french": "fr", "russian": "ru", "portuguese": "pt", "spanish": "es", "italian": "it"}


def language_code(name: str) -> str:
    """The short code of a model language name ('english' -> 'en'); unknown names are kept as they are."""
    return LANGUAGE_CODES.get(name, name)


def model_language(value: str, known: list[str]) -> str | None:
    """A language as a model name ('english') or a code ('en', 'en-US', 'en_us') -> the model's name among
    ``known`` (the bundle's list), or None when the bundle does not speak it."""
    v = value.strip().lower().replace("_", "-")
    if v in known:
        return v
    by_code = {language_code(n): n for n in known}
    return by_code.get(v.split("-")[0])
