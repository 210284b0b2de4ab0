"""Limits on what one record may hold, checked on every record from every source before a reader sees it.

A record must be plain JSON that survives a round trip through a JSON Lines file and a tokenizer: strings that are
valid Unicode (no lone surrogate such as ``"\\ud800"``, which UTF-8 cannot encode), finite numbers (``NaN`` and
``Infinity`` are not standard JSON), string keys, and nesting no deeper than :data:`MAX_DEPTH`.
"""

from __future__ import annotations

import math
import re

from .canonical import Found, Where

MAX_DEPTH = 64
"""Deepest nesting of lists and objects in one record (a ShareGPT record is 3 deep)."""

MAX_RECORD_BYTES = 64 * 1024 * 1024
"""Largest single record (a JSON Lines line, one element of a JSON list, a CSV cell) in bytes."""

_SURROGATE = re.compile("[\ud800-\udfff]")


def _path(parent: str, key) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def check_value(record, where: Where) -> None:
    """Raise a located error if ``record`` holds anything but plain, finite, encodable JSON within the limits.

    Args:
        record: One record as read from its source.
        where: Its position.

    Raises:
        DataFormatError: Naming the field (``conversations[2].value``) of the first offending value.
    """
    if _plain(record, 1):
        return  # the common case, checked without building a field path for every value
    _locate(record, where)


def _plain(value, depth: int) -> bool:
    """Whether ``value`` is plain JSON within the limits (exact built-in types only; anything else is left to
    :func:`_locate`, which decides). Recursion is bounded by :data:`MAX_DEPTH`."""
    kind = type(value)
    if kind is str:
        return value.isascii() or _SURROGATE.search(value) is None
    if kind is dict:
        if depth > MAX_DEPTH:
            return False
        for key, item in value.items():
            if type(key) is not str or not (key.isascii() or _SURROGATE.search(key) is None):
                return False
            if not _plain(item, depth + 1):
                return False
        return True
    if kind is list:
        if depth > MAX_DEPTH:
            return False
        return all(_plain(item, depth + 1) for item in value)
    if kind is float:
        return math.isfinite(value)
    return kind is int or kind is bool or value is None


def _locate(record, where: Where) -> None:
    """Find and raise the first problem :func:`_plain` saw, with its field path (or return: there was none)."""
    stack = [(record, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            found = _SURROGATE.search(value)
            if found:
                raise where.error(
                    path or None,
                    "valid Unicode text",
                    Found(f"a lone surrogate \\u{ord(found.group()):04x} at character {found.start()}"),
                )
        elif isinstance(value, bool) or value is None or isinstance(value, int):
            continue
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise where.error(path or None, "a finite number (NaN and Infinity are not standard JSON)", value)
        elif isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise where.error(
                    path or None, f"lists and objects nested at most {MAX_DEPTH} deep", Found("deeper nesting")
                )
            if isinstance(value, dict):
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise where.error(path or None, "an object with string keys", Found(f"a key {key!r}"))
                    if _SURROGATE.search(key):
                        raise where.error(path or None, "keys that are valid Unicode text", key)
                    stack.append((item, _path(path, key), depth + 1))
            else:
                stack.extend((item, _path(path, i), depth + 1) for i, item in enumerate(value))
        else:
            raise where.error(
                path or None,
                "a JSON value (string, number, boolean, null, list or object)",
                Found(f"a {type(value).__name__}"),
                hint="cast or drop that column before training",
            )
