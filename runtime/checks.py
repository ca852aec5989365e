"""Small argument checks shared by options, guards and sampling: one wording for every integer rule."""

from __future__ import annotations

from typing import Any


def is_int(value: Any) -> bool:
    """A real integer (``True`` is not a frame count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(name: str, value: Any, *, minimum: int = 0, optional: bool = False, note: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is an integer >= ``minimum`` (or None when ``optional``)."""
    if optional and value is None:
        return
    if is_int(value) and value >= minimum:
        return
    kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}{note}, got {value!r}")
